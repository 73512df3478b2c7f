"""`callfabric up`: the whole stack on this machine, staying up until Ctrl-C.

Starts Redis (append-only file in `.callfabric/redis`), Kamailio with our kamailio.cfg (the
edge's own decisions on when app_python3 is installed), the controller (`callfabric run`
with the same config file), Prometheus scraping the controller and Kamailio (and Asterisk)
with our alert rules, and a media node: a real Asterisk with our config set when one is
installed (`CALLFABRIC_ASTERISK`, `/opt/asterisk/sbin/asterisk`, or `asterisk` on the PATH),
else the stand-in media node of controller/localstack/standin.py. What the policy points at on
this machine and nothing listens to gets a stand-in too: echo agents on the agents' endpoints,
packet sinks on the fork targets', SIP stand-ins that answer and echo on the destinations'.

The settings live in `callfabric.yaml` (written on the first run, with a generated API token,
then reused and never rewritten): the controller's own settings, read by `callfabric run` and
by the client commands alike, plus an `x-up` section the controller ignores (the edge's SIP
address, Prometheus' address, which media node). `callfabric up --check` places one call
through the running stack (or starts it, checks, and stops it) and exits 0 or 1.
"""
from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.localstack.asterisk import Asterisk, asterisk_binary
from controller.localstack.kamailio import CFG, REPO, Kamailio
from controller.localstack.process import spawn, stop_group
from controller.localstack.redis import RedisServer
from controller.localstack.standin import StandInMediaNode, StandInUas

PREFERRED = {"sip": 5060, "http": 8460, "redis": 6390, "evapi": 8448, "rpc": 8090, "prometheus": 9095}
MEDIA_CHOICES = ("auto", "asterisk", "stand-in")
DEFAULT_ASTERISK = "/opt/asterisk/sbin/asterisk"
CHECK_CALLER = "+12025550123"


class UpError(Exception):
    """Why the stack cannot start; one line for the user."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _free(port: int, kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _port(preferred: int, kind: int = socket.SOCK_STREAM) -> int:
    if _free(preferred, kind):
        return preferred
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostport(text: str) -> tuple[str, int]:
    from controller.config import split_host_port
    return split_host_port(text, "address")


# ---------------------------------------------------------------------- the config file
CONFIG_TEMPLATE = """\
# callfabric.yaml, written by `callfabric up` on {date}. Edit it and run `callfabric up` again:
# it is reused as it is. The controller's settings (`callfabric config describe`): `callfabric
# run --config callfabric.yaml` reads the same file, and so do `callfabric calls/call/bans`
# run from this folder (API address and token). Keep it private: it holds the API token.
# `x-` keys are for `callfabric up` only; the controller ignores them.
x-up:
  sip: {sip}                  # the edge's SIP address (UDP); 0.0.0.0:{sip_port} takes calls from other machines
  prometheus: {prometheus}      # Prometheus (web UI and API)
  media: auto                         # auto (Asterisk when installed, else the stand-in), asterisk, stand-in
policy_dir: {policy_dir}           # routing policies, hot-reloaded (relative to this file)
redis_url: redis://127.0.0.1:{redis}/0
edge_evapi: ["127.0.0.1:{evapi}"]
edge_rpc: ["http://127.0.0.1:{rpc}/RPC"]
edge_policy_file: {edge_policy}
edge_policy_key_file: {edge_key}    # made on the first run; the edge refuses policy files it does not verify
http_listen: 127.0.0.1:{http}
api_tokens: ["ops:read,control,admin:{token}"]
log_format: text
"""


def write_config(path: Path) -> None:
    """A new callfabric.yaml: free ports (the usual ones when free), a new API token."""
    sip = _port(PREFERRED["sip"], socket.SOCK_DGRAM)
    local_policies = path.parent / "policies"
    policy_dir = "policies" if local_policies.is_dir() else str(REPO / "policies")
    text = CONFIG_TEMPLATE.format(
        date=time.strftime("%Y-%m-%d %H:%M"), sip=f"127.0.0.1:{sip}", sip_port=sip,
        prometheus=f"127.0.0.1:{_port(PREFERRED['prometheus'])}", policy_dir=policy_dir,
        redis=_port(PREFERRED["redis"]), evapi=_port(PREFERRED["evapi"]), rpc=_port(PREFERRED["rpc"]),
        edge_policy=(path.parent / ".callfabric" / "edge" / "policy.bin").resolve(),
        edge_key=(path.parent / ".callfabric" / "keys" / "edge-policy.key").resolve(),
        http=_port(PREFERRED["http"]), token=secrets.token_urlsafe(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


@dataclass
class UpConfig:
    path: Path
    settings: Any
    sip: tuple[str, int]
    prometheus: tuple[str, int]
    media: str
    created: bool = False

    @property
    def workdir(self) -> Path:
        return self.path.parent / ".callfabric"

    @property
    def token(self) -> str:
        from controller.api.auth import parse_tokens
        tokens = [t for t in parse_tokens(self.settings.api_tokens) if t.allows("admin")]
        if not tokens:
            raise UpError(f"{self.path}: api_tokens has no token with the admin scope (`callfabric up --check` and the "
                          f"CLI need one)")
        return tokens[0].secret.decode()

    @property
    def api(self) -> str:
        host, port = _hostport(self.settings.http_listen)
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1"


def load_config(path: Path, media: str | None = None) -> UpConfig:
    from controller.config import ConfigError, check_settings, load_settings

    created = not path.exists()
    if created:
        write_config(path)
    try:
        settings = load_settings(path)
        if settings.edge_policy_file and not settings.edge_policy_key_file:  # (a config of an older callfabric)
            key = path.parent.resolve() / ".callfabric" / "keys" / "edge-policy.key"
            raise ConfigError(f"config file {path}: edge_policy_key_file is missing (the edge refuses unsigned policy "
                              f"files): add `edge_policy_key_file: {key}` (callfabric up makes the key)")
        check_settings(settings)
        raw = yaml.safe_load(path.read_text()) or {}
        up = raw.get("x-up") or {}
        if not isinstance(up, dict):
            raise ConfigError(f"config file {path}: x-up must be a mapping")
        sip = _hostport(str(up.get("sip", f"127.0.0.1:{PREFERRED['sip']}")))
        prometheus = _hostport(str(up.get("prometheus", f"127.0.0.1:{PREFERRED['prometheus']}")))
    except ConfigError as exc:
        raise UpError(str(exc)) from None
    media = media or str(up.get("media", "auto"))
    if media not in MEDIA_CHOICES:
        raise UpError(f"config file {path}: x-up.media: {media!r}: expected one of {', '.join(MEDIA_CHOICES)}")
    return UpConfig(path.resolve(), settings, sip, prometheus, media, created)


# ---------------------------------------------------------------------- the stack
def _asterisk(media: str) -> str | None:
    if media == "stand-in":
        return None
    binary = asterisk_binary() or (DEFAULT_ASTERISK if os.access(DEFAULT_ASTERISK, os.X_OK) else None)
    if binary is None and media == "asterisk":
        raise UpError("x-up.media is asterisk but no asterisk binary was found (CALLFABRIC_ASTERISK, "
                      f"{DEFAULT_ASTERISK}, PATH)")
    return binary


def _edge_python() -> bool:
    import glob
    return bool(glob.glob("/usr/lib/*/kamailio/modules/app_python3.so") + glob.glob("/usr/lib/kamailio/modules/"
                                                                                    "app_python3.so"))


class Process:
    """A child process of the stack (the controller, Prometheus) with its log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.cmd, self.log_path, self.env = name, cmd, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = spawn(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=self.env)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_group(self.proc, 15)

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _http_ok(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class Stack:
    config: UpConfig
    redis: RedisServer | None = None
    kamailio: Kamailio | None = None
    asterisk: Asterisk | None = None
    standin: StandInMediaNode | None = None
    controller: Process | None = None
    prometheus: Process | None = None
    stand_ins: list[str] = field(default_factory=list)     # what was started for the policy's endpoints
    notes: list[str] = field(default_factory=list)
    _closers: list = field(default_factory=list)

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        cfg, settings = self.config, self.config.settings
        for binary in ("kamailio", "redis-server"):
            if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists() \
                    and not Path(f"/usr/bin/{binary}").exists():
                raise UpError(f"{binary} is not installed: run `bash .ci/install-system-packages`")
        if not CFG.exists():
            raise UpError(f"the Kamailio config {CFG} is missing (CALLFABRIC_KAMAILIO_CFG)")
        policy = self._policy()
        workdir = cfg.workdir
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

        redis_host, redis_port = self._redis_address()
        if _loopback(redis_host):
            self.redis = RedisServer(workdir, appendonly=True)
            self.redis.port = redis_port
            await self._start_thing(self.redis, f"Redis on {redis_host}:{redis_port}")
        else:
            self.notes.append(f"Redis at {redis_host}:{redis_port} is not on this machine: not started")

        sip_host, sip_port = cfg.sip
        edge_policy = Path(settings.edge_policy_file) if settings.edge_policy_file and _edge_python() else None
        if settings.edge_policy_file and edge_policy is None:
            self.notes.append("Kamailio's app_python3 is not installed: every call is decided by the controller "
                              "(kamailio-python3-modules enables the edge's own decisions)")
        edge_key = Path(settings.edge_policy_key_file) if edge_policy is not None else None
        if edge_policy is not None:
            edge_policy.parent.mkdir(parents=True, exist_ok=True)
            edge_key.parent.mkdir(parents=True, exist_ok=True)
        # (a human desk on this machine is the developer's own: it gets the context headers)
        kamailio = Kamailio(workdir, {}, edge_policy=edge_policy, edge_policy_key=edge_key, log_level=2,
                            extra_defines={"SIP_LISTEN": f"udp:{sip_host}:{sip_port}",
                                           "TRUSTED_DEST_NET": '"127.0.0.0/8"'})
        kamailio.sip_port = sip_port
        kamailio.evapi_port = _hostport(settings.edge_evapi[0])[1]
        kamailio.http_port = self._rpc_port()
        self.kamailio = kamailio

        binary = _asterisk(cfg.media)
        if binary:
            self.asterisk = Asterisk(workdir, edge_port=sip_port, binary=binary)
            media_addr = f"127.0.0.1:{self.asterisk.sip_port}"
        else:
            self.standin = await StandInMediaNode(settings.ari_app).start()
            self._closers.append(self.standin.stop)
            media_addr = self.standin.sip_addr
        kamailio.write_dispatcher_list({ns.dispatcher_set: [media_addr]
                                        for ns in policy.source.node_sets.values()} or {1: [media_addr]})
        await self._start_thing(kamailio, f"Kamailio on udp {sip_host}:{sip_port}", attempts=1)
        if self.asterisk is not None:
            await self._start_thing(self.asterisk, "Asterisk")

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.asterisk is not None:
            env.update(CALLFABRIC_ARI_NODES=self.asterisk.ari_node(), CALLFABRIC_AMI_NODES=self.asterisk.ami_node())
        else:
            env["CALLFABRIC_ARI_NODES"] = self.standin.ari_node()
        if not settings.edge_rpc:
            env["CALLFABRIC_EDGE_RPC"] = f"http://127.0.0.1:{kamailio.http_port}/RPC"
        self.controller = Process("controller", [sys.executable, "-m", "controller.cli", "run", "--config",
                                                 str(cfg.path)], workdir / "logs" / "controller.log", env)
        await asyncio.to_thread(self.controller.start)
        await self._wait_controller()

        await self._start_stand_ins(policy)
        await self._start_prometheus()

    def _policy(self):
        from controller.policy import PolicyInvalid, load_policy
        try:
            return load_policy(self.config.settings.policy_dir)
        except PolicyInvalid as exc:
            raise UpError(f"the policy in {self.config.settings.policy_dir} is refused: {exc.issues[0]} "
                          f"(`callfabric policy check {self.config.settings.policy_dir}` lists every error)") from None

    def _redis_address(self) -> tuple[str, int]:
        from controller.config import redis_target
        target = redis_target(self.config.settings)
        if target.mode != "single" or not target.url.startswith("redis://"):
            return "not-local", 0
        from urllib.parse import urlsplit
        parts = urlsplit(target.url)
        return parts.hostname or "127.0.0.1", parts.port or 6379

    def _rpc_port(self) -> int:
        from urllib.parse import urlsplit
        for url in self.config.settings.edge_rpc:
            parts = urlsplit(url)
            if _loopback(parts.hostname or ""):
                return parts.port or 80
        return _port(PREFERRED["rpc"])

    async def _start_thing(self, thing, what: str, **kwargs) -> None:
        try:
            await asyncio.to_thread(thing.start, **kwargs)
        except (RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = " (is another `callfabric up` or service using its port?)" if "in use" in str(exc) \
                or "not ready" in str(exc) or "exited" in str(exc) else ""
            raise UpError(f"{what} did not start: {first}{hint}; its log: {getattr(thing, 'log_path', '?')}") from None
        self._closers.append(thing.stop)

    async def _wait_controller(self, timeout: float = 30.0) -> None:
        self._closers.append(self.controller.stop)
        health = self.config.api.removesuffix("/v1") + "/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.controller.alive():
                raise UpError(f"the controller exited: {self.controller.log_tail(5)}")
            status = await asyncio.to_thread(_http_ok, health)
            if status == 200:
                return
            await asyncio.sleep(0.2)
        raise UpError(f"the controller is not healthy after {timeout:.0f}s ({health}); its log: "
                      f"{self.controller.log_path}")

    async def _start_prometheus(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            self.notes.append("prometheus is not installed: no Prometheus (bash .ci/install-system-packages)")
            return
        host, port = self.config.prometheus
        home = self.config.workdir / "prometheus"
        home.mkdir(parents=True, exist_ok=True)
        targets = {"callfabric": self.config.api.removesuffix("/v1").split("//", 1)[1],
                   "kamailio": f"127.0.0.1:{self.kamailio.http_port}"}
        if self.asterisk is not None:
            targets["asterisk"] = f"127.0.0.1:{self.asterisk.http_port}"
        config = {"global": {"scrape_interval": "10s", "evaluation_interval": "10s"},
                  "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yml")],
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (home / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.prometheus = Process("prometheus", [binary, f"--config.file={home / 'prometheus.yml'}",
                                                 f"--storage.tsdb.path={home / 'data'}",
                                                 f"--web.listen-address={host}:{port}"],
                                  self.config.workdir / "logs" / "prometheus.log")
        await asyncio.to_thread(self.prometheus.start)
        self._closers.append(self.prometheus.stop)
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/-/ready"
        for _ in range(100):
            if not self.prometheus.alive():
                raise UpError(f"Prometheus exited: {self.prometheus.log_tail(3)}")
            if await asyncio.to_thread(_http_ok, url) == 200:
                return
            await asyncio.sleep(0.2)
        raise UpError(f"Prometheus is not ready ({url}); its log: {self.prometheus.log_path}")

    async def _start_stand_ins(self, policy) -> None:
        """Echo agents, fork sinks and answering desks where the policy points on this machine
        and nothing listens."""
        spec = importlib.util.spec_from_file_location("callfabric_media_agent", REPO / "examples" / "media_agent.py")
        agents = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(agents)
        loop = asyncio.get_running_loop()
        source = policy.source
        for kind, items in (("agent", source.agents.values()), ("fork target", source.fork_targets.values())):
            for item in items:
                if item.transport not in ("rtp", "audiosocket"):
                    continue
                host, port = item.endpoint.rsplit(":", 1)
                port = int(port)
                udp = item.transport == "rtp"
                if not _loopback(host) or not _free(port, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM, host):
                    continue
                if udp:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda echo=kind == "agent": agents.RtpAgent(echo=echo), local_addr=(host, port))
                    self._closers.append(transport.close)
                else:
                    server = await asyncio.start_server(agents.AudioSocketAgent().handle, host, port)
                    self._closers.append(server.close)
                self.stand_ins.append(f"{kind} {item.name} ({'echo' if kind == 'agent' else 'sink'}, "
                                      f"{item.transport} {host}:{port})")
        for destination in source.destinations.values():
            for uri in destination.uris:
                try:
                    host, port = _sip_hostport(uri)
                except ValueError:
                    continue
                if not _loopback(host) or not _free(port, socket.SOCK_DGRAM, host):
                    continue
                uas = await StandInUas(destination.name, host).start(port)
                self._closers.append(uas.close)
                self.stand_ins.append(f"destination {destination.name} (answers and echoes, sip udp {host}:{port})")

    # ------------------------------------------------------------------ watch and stop
    def dead(self) -> str | None:
        for name, thing in (("Redis", self.redis), ("Kamailio", self.kamailio), ("Asterisk", self.asterisk),
                            ("the controller", self.controller), ("Prometheus", self.prometheus)):
            proc = getattr(thing, "proc", None) if thing is not None else None
            if proc is not None and proc.poll() is not None:
                log = getattr(thing, "log_path", None)
                return f"{name} exited with {proc.returncode}" + (f" (its log: {log})" if log else "")
        return None

    async def stop(self) -> None:
        for closer in reversed(self._closers):
            try:
                result = closer() if not asyncio.iscoroutinefunction(closer) else await closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - go on stopping the rest
                print(f"  could not stop {closer!r}: {exc}", file=sys.stderr)
        self._closers.clear()

    def summary(self) -> list[str]:
        cfg, settings = self.config, self.config.settings
        sip_host, sip_port = cfg.sip
        api = cfg.api
        lines = [f"  SIP edge (Kamailio)     udp:{sip_host}:{sip_port}   <- point SIP phones and trunks here",
                 f"  REST API                {api}   token: {cfg.token}",
                 f"  controller              {api.removesuffix('/v1')}/metrics  /healthz   (log: "
                 f"{self.controller.log_path})"]
        if self.prometheus is not None:
            host, port = cfg.prometheus
            lines.append(f"  Prometheus              http://{host}:{port}   (scrapes the controller, Kamailio"
                         f"{', Asterisk' if self.asterisk else ''}; alert rules deploy/prometheus/alerts.yml)")
        if self.redis is not None:
            lines.append(f"  Redis                   {self.redis.url}   (append-only file in {self.redis.workdir})")
        lines.append(f"  Kamailio JSON-RPC       http://127.0.0.1:{self.kamailio.http_port}/RPC   /metrics   "
                     f"(log: {self.kamailio.log_path})"
                     + ("   edge decisions on" if self.kamailio.edge_policy else ""))
        if self.asterisk is not None:
            lines.append(f"  media node              Asterisk ({self.asterisk.binary}): sip udp:127.0.0.1:"
                         f"{self.asterisk.sip_port}, ARI {self.asterisk.ari_url}")
        else:
            lines.append(f"  media node              stand-in, not Asterisk: it answers and echoes, the controller "
                         f"drives it over ARI {self.standin.ari_url} (no audio between legs)")
        for item in self.stand_ins:
            lines.append(f"  stand-in                {item}")
        lines.append(f"  policy                  {settings.policy_dir}   (hot-reloaded)")
        lines.append(f"  config                  {cfg.path}" + ("   (new: edit it and run again)" if cfg.created else
                                                                "   (reused)"))
        return lines + [f"  note                    {n}" for n in self.notes]


def _sip_hostport(uri: str) -> tuple[str, int]:
    from controller.localstack.standin import _hostport as sip_hostport
    return sip_hostport(uri)


# ---------------------------------------------------------------------- one call through the stack
def _pick_number(policy) -> tuple[str, Any]:
    """A number this policy routes now to an agent (else to a SIP destination)."""
    from controller.policy.testing import build_call

    lists = [n for values in policy.source.number_lists.values() for n in values]
    candidates = ["+18005550000", "+18005550199", *lists]
    decided = []
    for number in candidates:
        call = build_call({"from": CHECK_CALLER, "to": number}, policy.source.settings.timezone)
        decision = policy.decide(call)
        decided.append((number, decision))
        if decision.outcome == "agent":
            return number, decision
    return next(((n, d) for n, d in decided if d.outcome == "sip"), decided[0])


async def _api(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, Any]:
    import aiohttp
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status, await response.json(content_type=None)


async def check_call(config: UpConfig) -> bool:
    """Place one call through the edge and follow it: decided, answered, audio back, a live-call
    action through the REST API when it reaches an agent, the record and timeline complete."""
    from controller.localstack.sip_ua import SipCaller
    from controller.policy import load_policy

    policy = await asyncio.to_thread(load_policy, config.settings.policy_dir)
    number, decision = _pick_number(policy)
    target = decision.agent.name if decision.agent else decision.destination.name if decision.destination else "-"
    _say(f"check: {CHECK_CALLER} calls {number}: the policy says rule {decision.rule} -> {decision.outcome} {target}")
    token, api = config.token, config.api
    action: dict[str, Any] = {}

    async def during(result) -> None:
        """Once the agent leg is up, move the caller to another agent through the REST API."""
        if decision.outcome != "agent":
            return
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            status, body = await _api("GET", f"{api}/calls/{result.call_id}/timeline", token)
            if status == 200 and "media_up" in [e.get("event") for e in body.get("events", [])]:
                break
            await asyncio.sleep(0.1)
        status, body = await _api("GET", f"{api}/calls/{result.call_id}", token)
        serving = body.get("call", {}).get("target") if status == 200 else target   # a split may pick another
        others = [name for name in policy.source.agents if name != serving]
        if not others:
            return
        status, body = await _api("POST", f"{api}/calls/{result.call_id}/actions", token,
                                  {"action": {"route_agent": others[0]}})
        action.update(status=status, body=body, agent=others[0], serving=serving)

    sip_host, sip_port = config.sip
    result = await SipCaller(sip_port, from_user=CHECK_CALLER).call(number, hold_s=4.0, while_up=during)
    problems = []
    _say(f"  answered: {result.status} {result.reason}; sent {result.rtp_sent} RTP packets, heard {result.rtp_received}"
         " back")
    if result.status != 200:
        problems.append("the call was not answered")
    elif result.rtp_received < result.rtp_sent // 4:
        problems.append("too little audio came back")
    if action:
        _say(f"  live-call action through the REST API: {action['serving']} -> route_agent {action['agent']}: "
             f"{action['status']}"
             f"{'' if action['status'] == 200 else ' ' + json.dumps(action['body'])[:200]}")
        if action["status"] != 200:
            problems.append("the live-call action failed")
    wanted = {"decided", "answered", "ended"}
    if decision.outcome == "agent":
        wanted |= {"media_up", "media_end"} | ({"transfer_completed"} if action else set())
    events: list[str] = []
    record: dict = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = await _api("GET", f"{api}/calls/{result.call_id}", token)
        record = body.get("call", {}) if status == 200 else {}
        status, body = await _api("GET", f"{api}/calls/{result.call_id}/timeline", token)
        events = [e.get("event") for e in body.get("events", [])] if status == 200 else []
        if record.get("state") == "ended" and wanted <= set(events):
            break
        await asyncio.sleep(0.2)
    _say(f"  record: {record.get('state', 'none')}, timeline: {' -> '.join(map(str, events)) or 'none'}")
    if record.get("state") != "ended" or not wanted <= set(events):
        problems.append(f"the record or timeline is incomplete (missing {sorted(wanted - set(events))})")
    _say("check: OK" if not problems else "check: FAILED: " + "; ".join(problems))
    return not problems


# ---------------------------------------------------------------------- entry point
async def _run(config: UpConfig, check: bool) -> int:
    health = config.api.removesuffix("/v1") + "/healthz"
    if await asyncio.to_thread(_http_ok, health, 2.0):
        if check:
            _say(f"callfabric up --check: a stack answers at {health}: checking it")
            return 0 if await check_call(config) else 1
        raise UpError(f"a controller already answers at {health}: is `callfabric up` running already? (Ctrl-C it, or "
                      f"use another config)")
    stack = Stack(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _say(f"callfabric up: starting Redis, Kamailio, a media node, the controller and Prometheus "
         f"(config {config.path}) …")
    try:
        await stack.start()
        for line in stack.summary():
            _say(line)
        if check:
            return 0 if await check_call(config) else 1
        _say("\nup. Try `callfabric up --check` or `callfabric calls list` in another terminal (same folder). "
             "Ctrl-C stops everything.")
        while not stop.is_set():
            problem = stack.dead()
            if problem:
                _say(f"stopping: {problem}")
                return 1
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        _say("\nstopping everything `callfabric up` started …")
        return 0
    finally:
        await stack.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_up(config_path: str | os.PathLike[str], *, check: bool = False, media: str | None = None) -> int:
    """`callfabric up [--check]`: 0 when up and stopped by Ctrl-C (or the check passed)."""
    try:
        config = load_config(Path(config_path), media)
        return asyncio.run(_run(config, check))
    except UpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "config" in str(exc) else 1
