"""Run a real Kamailio with callfabric's kamailio/kamailio.cfg on free loopback ports
(tests, `callfabric demo`, benchmarks).

Usage::

    with Kamailio(tmp_path, ds_sets={1: ["127.0.0.1:5070"]}) as k:
        k.sip_port, k.http_port, k.evapi_port
        k.jsonrpc("dispatcher.list")

Everything runs in a temp dir (dispatcher list, ctl socket, runtime dir, log file); the
process group is killed at stop() even if the test failed.

Edge defence (kamailio/README.md): the local stack's own callers, media stand-ins and
benchmarks (bench/edge.py, up to 4,000 CPS) all send from 127.0.0.1, so 127.0.0.1 is
exempt from the pike flood check by default (`pike_trusted_net`; the environment variable
CALLFABRIC_KAMAILIO_PIKE_TRUSTED_NET overrides it, empty = nobody exempt). Tests of the
defences attack from other 127.0.0.x addresses. String defines in `extra_defines` need
their double quotes: {"RPC_ALLOWED_NET": '"127.0.0.1/32"'}.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from controller.localstack.process import spawn, stop_group

REPO = Path(__file__).resolve().parents[2]
CFG = Path(os.environ.get("CALLFABRIC_KAMAILIO_CFG", REPO / "kamailio" / "kamailio.cfg"))
EDGE_SCRIPT = CFG.parent / "edge_decide.py"
KAMAILIO_BIN = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD_BIN = shutil.which("kamcmd") or "/usr/sbin/kamcmd"


def free_port(kind: int = socket.SOCK_STREAM, also: int | None = None) -> int:
    """A loopback port free for `kind` (and for `also`, if given) right now."""
    for _ in range(50):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if also is None:
            return port
        t = socket.socket(socket.AF_INET, also)
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
    raise RuntimeError("no free port")


def options_ping(port: int, timeout: float = 0.5) -> str | None:
    """Send one SIP OPTIONS to 127.0.0.1:port over UDP; return the status line or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    lport = s.getsockname()[1]
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    msg = (
        f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@127.0.0.1:{lport}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:127.0.0.1:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@probe\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    try:
        s.sendto(msg.encode(), ("127.0.0.1", port))
        data, _ = s.recvfrom(65535)
        return data.split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError:
        return None
    finally:
        s.close()


def ndb_redis_spec(url: str, name: str = "cfev") -> str:
    """Kamailio's ndb_redis server spec for a redis:// URL (EVENTS_REDIS)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        spec = f"name={name};unix={parts.path}"
    else:
        spec = f"name={name};addr={parts.hostname or '127.0.0.1'};port={parts.port or 6379}"
    db = (parts.path or "/0").strip("/") if parts.scheme != "unix" else ""
    if db.isdigit():
        spec += f";db={db}"
    if parts.password:
        spec += f";pass={parts.password}"
    return spec


class Kamailio:
    def __init__(
        self,
        workdir: Path | str,
        ds_sets: dict[int, list[str]] | None = None,
        *,
        fallback: str = "open",
        fallback_set: int = 1,
        decision_timeout_ms: int = 200,
        fr_timeout_ms: int = 1000,
        fr_inv_timeout_ms: int = 10000,
        cb_threshold: int | None = None,
        children: int = 4,
        shm_mb: int = 64,
        pkg_mb: int = 8,
        log_level: int = 2,
        extra_defines: dict[str, str] | None = None,
        name: str = "kamailio",
        pike_trusted_net: str | None = "127.0.0.1/32",
        edge_policy: Path | str | None = None,
        edge_policy_key: Path | str | None = None,
        trunks_dir: Path | str | None = None,
        events_redis: str | None = None,
        edge_name: str = "edge",
        tcp: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ds_sets = ds_sets or {}
        self.fallback = fallback
        self.fallback_set = fallback_set
        self.decision_timeout_ms = decision_timeout_ms
        self.fr_timeout_ms = fr_timeout_ms
        self.fr_inv_timeout_ms = fr_inv_timeout_ms
        self.cb_threshold = cb_threshold
        self.children = children
        self.shm_mb = shm_mb
        self.pkg_mb = pkg_mb
        self.log_level = log_level
        self.extra_defines = extra_defines or {}
        # where the controller writes the policy for the edge's own decisions (None: off)
        self.edge_policy = Path(edge_policy) if edge_policy is not None else None
        # the key its HMAC is checked with (the controller's edge_policy_key_file): made at
        # start() when missing, by default in Kamailio's own directory
        self.edge_policy_key = Path(edge_policy_key) if edge_policy_key is not None else \
            (self.workdir / "edge-policy.key" if edge_policy is not None else None)
        # where the controller writes the trunk table (None: no trunk checks at the edge)
        self.trunks_dir = Path(trunks_dir) if trunks_dir is not None else None
        # the Redis (URL) the edge writes its events to (None: over evapi to a controller)
        self.events_redis = events_redis
        self.edge_name = edge_name
        env_trusted = os.environ.get("CALLFABRIC_KAMAILIO_PIKE_TRUSTED_NET")
        self.pike_trusted_net = pike_trusted_net if env_trusted is None else (env_trusted or None)
        self.tcp, self.tls = tcp, tls  # SIP over TCP too; SIP over TLS with (certificate, key, CAs for trunks)
        self.sip_port = self.tcp_port = self.tls_port = 0
        self._pick_ports()
        self.ds_file = self.workdir / "dispatcher.list"
        self.ctl_socket = self.workdir / "kamailio_ctl"
        self.rundir = self.workdir / "run"
        self.log_path = self.workdir / "kamailio.log"
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    def _pick_ports(self) -> None:
        self.sip_port = free_port(socket.SOCK_DGRAM, socket.SOCK_STREAM if self.tcp else None)
        self.tcp_port = self.sip_port if self.tcp else 0
        self.tls_port = free_port(socket.SOCK_STREAM) if self.tls else 0
        self.http_port = free_port(socket.SOCK_STREAM)
        self.evapi_port = free_port(socket.SOCK_STREAM)

    # ---------------------------------------------------------------- config
    def write_dispatcher_list(self, ds_sets: dict[int, list[str]] | None = None) -> None:
        if ds_sets is not None:
            self.ds_sets = ds_sets
        lines = ["# setid destination flags priority attrs"]
        for setid, dsts in sorted(self.ds_sets.items()):
            for prio, dst in enumerate(dsts):
                uri = dst if dst.startswith("sip:") else f"sip:{dst}"
                # higher priority first: keep list order for failover
                lines.append(f"{setid} {uri} 0 {len(dsts) - prio}")
        self.ds_file.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        defines = {
            "SIP_LISTEN": f"udp:127.0.0.1:{self.sip_port}",
            "HTTP_ADDR": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "EVAPI_BIND": f'"127.0.0.1:{self.evapi_port}"',
            "DS_LIST": f'"{self.ds_file}"',
            "CTL_SOCKET": f'"unix:{self.ctl_socket}"',
            "FALLBACK": self.fallback,
            "FALLBACK_SET": str(self.fallback_set),
            "DECISION_TIMEOUT_MS": str(self.decision_timeout_ms),
            "FR_TIMEOUT_MS": str(self.fr_timeout_ms),
            "FR_INV_TIMEOUT_MS": str(self.fr_inv_timeout_ms),
            "CHILDREN": str(self.children),
            "LOG_LEVEL": str(self.log_level),
        }
        if self.cb_threshold is not None:
            defines["CB_THRESHOLD"] = str(self.cb_threshold)
        if self.pike_trusted_net:
            defines["PIKE_TRUSTED_NET"] = f'"{self.pike_trusted_net}"'
        if self.edge_policy is not None:
            defines["EDGE_POLICY"] = f'"{self.edge_policy}"'
            defines["EDGE_POLICY_KEY"] = f'"{self.edge_policy_key}"'
            defines["EDGE_POLICY_CACHE"] = f'"{self.workdir / "edge-policy.last-good"}"'
            defines["EDGE_SCRIPT"] = f'"{EDGE_SCRIPT}"'
        if self.trunks_dir is not None:
            defines["TRUNKS_DB"] = f'"text://{self.trunks_dir.resolve()}"'
        if self.events_redis is not None:
            defines["EVENTS_REDIS"] = f'"{ndb_redis_spec(self.events_redis)}"'
            defines["EDGE_NAME"] = f'"{self.edge_name}"'
        if self.tcp:
            defines["SIP_LISTEN_TCP"] = f"tcp:127.0.0.1:{self.tcp_port}"
        if self.tls is not None:
            defines["TLS_CFG"] = f'"{self.workdir / "tls.cfg"}"'
            defines["TLS_LISTEN"] = f"tls:127.0.0.1:{self.tls_port}"
        defines.update(self.extra_defines)
        cmd = [
            KAMAILIO_BIN, "-x", "tlsf", "-m", str(self.shm_mb), "-M", str(self.pkg_mb),
            "-DD", "-E", "-Y", str(self.rundir), "-f", str(CFG),
        ]
        for k, v in defines.items():
            cmd += ["-A", f"{k}={v}"]
        return cmd

    # ------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 15.0, attempts: int = 3) -> "Kamailio":
        """Start and wait until it answers. Its free ports may be taken by another process
        before Kamailio binds them: then it starts again on other ones."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not self.ds_file.exists():
            self.write_dispatcher_list()
        if self.edge_policy_key is not None:
            from controller.edge.bundle import create_key
            create_key(self.edge_policy_key)
        if self.trunks_dir is not None:
            from controller.edge.trunks import seed_table
            seed_table(str(self.trunks_dir))
        if self.tls is not None:
            from controller.localstack.tls import render_tls_cfg
            render_tls_cfg(self.workdir / "tls.cfg", *self.tls)
        for attempt in range(attempts):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._log_fh = open(self.log_path, "ab")
            self.proc = spawn(
                self.command(), stdout=self._log_fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.workdir,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._http_ready() and options_ping(self.sip_port, 0.3):
                    return self
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(f"kamailio not ready after {timeout}s\n{self.log_tail(60)}")
            self.stop()
            with open(self.log_path, "rb") as log:
                log.seek(logged)
                port_taken = b"Address already in use" in log.read()
            if not port_taken or attempt == attempts - 1:
                raise RuntimeError(f"kamailio exited with {self.proc.returncode}\n{self.log_tail(60)}")
            self._pick_ports()
        raise RuntimeError(f"kamailio could not be started in {attempts} attempts")

    def _http_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc, 5)  # whatever is left of the group too (children, stopped ones)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> "Kamailio":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ management
    def jsonrpc(self, method: str, params: list | dict | None = None, timeout: float = 5.0):
        body = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params is not None:
            body["params"] = params
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/RPC", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read().decode())
        if "error" in reply:
            raise RuntimeError(f"jsonrpc {method}: {reply['error']}")
        return reply.get("result")

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:  # type: ignore[attr-defined]
            return e.code, e.read().decode(errors="replace")

    def metrics(self) -> str:
        return self.http_get("/metrics")[1]

    def metric(self, name: str, labels: str = "") -> float:
        """Value of one sample line `name{labels} value [ts]`. A sample that is not there is an
        error (LookupError), never 0: kamailio.cfg creates every callfabric series at start."""
        prefix = f"{name}{{{labels}}}" if labels else name
        text = self.metrics()
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            head, _, rest = line.partition(" ")
            if head.replace(" ", "") == prefix.replace(" ", ""):
                return float(rest.split()[0])
        similar = [line.partition(" ")[0] for line in text.splitlines() if line.startswith(name)]
        raise LookupError(f"Kamailio exports no metric {prefix}; series of that name: {similar or 'none'}")

    def kamcmd(self, *args: str, timeout: float = 5.0) -> str:
        out = subprocess.run([KAMCMD_BIN, "-s", f"unix:{self.ctl_socket}", *args],
                             capture_output=True, text=True, timeout=timeout)
        return out.stdout + out.stderr

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_text().splitlines()
        return "\n".join(lines[-n:])
