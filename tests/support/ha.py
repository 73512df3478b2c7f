"""High-availability harness: controllers as real processes (so they can be killed with
SIGKILL), and a media node made of a SIP user agent in front of the fake ARI — what the edge
routes to it enters our Stasis application like on Asterisk — so calls can go SIPp →
Kamailio → media node → controllers, and a call the controllers drop is seen as dropped.

Used by tests/integration/test_ha_chaos.py and bench/ha.py."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.localstack.kamailio import Kamailio, free_port
from controller.localstack.process import spawn, stop_group
from controller.localstack.sipp import run_uac
from controller.media.model import call_token
from controller.state.calls import CallStore
from tests.support.fake_ari import FakeAri
from tests.support.kamailio import wait_clients

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "h" * 32
APP = "callfabric"

HA_POLICY = """\
settings:
  numbering: {{country_code: "1", national_prefix: "1"}}
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:{agent_port}", transport: rtp, codec: ulaw}}
  billing: {{node_set: media, endpoint: "127.0.0.1:{agent_port2}", transport: rtp, codec: ulaw}}
fork_targets:
  stt: {{endpoint: "127.0.0.1:{fork_port}", transport: rtp, codec: slin16, direction: in}}
rules:
  - name: agent-with-fork
    match: {{ruri: {{prefix: "+1800"}}}}
    actions: [route_agent: intake, fork: stt]
default:
  actions: [route_agent: intake]
"""


def write_policy(directory: Path, agent_port: int = 4000, agent_port2: int = 4001, fork_port: int = 9100) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(HA_POLICY.format(agent_port=agent_port, agent_port2=agent_port2,
                                                            fork_port=fork_port))
    return directory


class ControllerProcess:
    """`callfabric run` in its own process group, configured by a YAML file."""

    def __init__(self, workdir: Path, name: str, settings: dict[str, Any]):
        self.name = name
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http = f"127.0.0.1:{free_port()}"
        self.settings = {"instance_id": name, "http_listen": self.http, "log_format": "text", "log_level": "INFO",
                         "api_tokens": [f"ops:admin,control:{ADMIN_TOKEN}"], **settings}
        self.log_path = self.workdir / "controller.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ControllerProcess":
        """Spawn (call from a sync fixture, or through asyncio.to_thread)."""
        config = self.workdir / "controller.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        self._log = open(self.log_path, "ab")
        self.proc = spawn([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                          stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, Any]:
        """Blocking HTTP to the controller's API (use asyncio.to_thread from async code)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.http}/v1{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def status(self) -> dict | None:
        try:
            code, body = self.request("GET", "/admin/status", timeout=1.0)
        except OSError:
            return None
        return body if code == 200 else None

    def wait_ready(self, timeout: float = 20.0, edges: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"controller {self.name} exited: {self.log_tail()}")
            status = self.status()
            if status and (not edges or all(status["edges"].values())):
                return status
            time.sleep(0.1)
        raise RuntimeError(f"controller {self.name} not ready: {self.log_tail()}")

    def kill9(self) -> float:
        """SIGKILL the whole process group; returns the monotonic time it was sent."""
        at = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        return at

    def stop(self) -> None:
        stop_group(self.proc, 15)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


@dataclass
class MediaCall:
    call_id: str
    channel: str = ""
    answered: bool = False
    bye_at: float = 0.0
    dropped: str = ""  # why the caller's channel disappeared before the caller hung up
    responses: dict[int, bytes] = field(default_factory=dict)  # CSeq number -> last response (retransmissions)
    inviting: int = 0  # CSeq of the INVITE waiting for its final answer (0: none)


def _headers(text: str) -> tuple[str, list[tuple[str, str]]]:
    head = text.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    out = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out.append((name.strip(), value.strip()))
    return lines[0], out


class FakeMediaNode(asyncio.DatagramProtocol):
    """A media node for the edge: SIP over UDP in front of a FakeAri. An INVITE becomes a
    caller channel entering Stasis(callfabric, <Call-ID>, <X-Callfabric-Agent>) — refused
    with 503 when no controller listens, like Asterisk's Stasis() failing. Like Asterisk, the
    caller gets its 200 OK only once a controller answered the channel over ARI (POST
    /channels/{id}/answer): a channel hung up before that gets 480, one never answered
    within `answer_timeout_s` 408 — so a caller's success means the controller answered. The
    caller's BYE hangs the channel up; a caller channel that vanishes before it is a dropped
    call."""

    def __init__(self, fake: FakeAri, answer_timeout_s: float = 10.0):
        self.fake = fake
        self.answer_timeout_s = answer_timeout_s
        self.calls: dict[str, MediaCall] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.refused: list[str] = []
        self.unanswered: list[str] = []  # in Stasis, but never answered by a controller

    async def start(self, port: int = 0) -> "FakeMediaNode":
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", port))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def dropped(self) -> list[MediaCall]:
        """Calls whose caller channel went away before the caller hung up (or is gone now
        without a BYE yet)."""
        for call in self.calls.values():
            if call.answered and not call.bye_at and not call.dropped and call.channel not in self.fake._chans:
                call.dropped = "caller channel gone"
        return [c for c in self.calls.values() if c.dropped]

    def datagram_received(self, data: bytes, addr) -> None:
        text = data.decode(errors="replace")
        first, headers = _headers(text)
        if first.startswith("SIP/2.0"):
            return
        method = first.split(" ", 1)[0]
        values = {}
        for name, value in headers:
            values.setdefault(name.lower(), value)
        call_id = values.get("call-id", "")
        cseq = values.get("cseq", "0 X").split()
        call = self.calls.get(call_id)
        if method == "INVITE":
            if call is not None and int(cseq[0]) in call.responses:  # a retransmission
                self.transport.sendto(call.responses[int(cseq[0])], addr)
                return
            if call is not None and call.inviting == int(cseq[0]):  # retransmitted while the controller answers
                self._reply(call, headers, addr, "100 Trying", int(cseq[0]), remember=False)
                return
            call = self.calls.setdefault(call_id, MediaCall(call_id))
            call.inviting = int(cseq[0])
            self._reply(call, headers, addr, "100 Trying", int(cseq[0]), remember=False)
            asyncio.get_running_loop().create_task(self._invite(call, headers, addr, values, int(cseq[0])))
        elif method == "BYE":
            if call is not None:
                self._reply(call, headers, addr, "200 OK", int(cseq[0]))
                if not call.bye_at:
                    call.bye_at = time.monotonic()
                    if call.channel in self.fake._chans:
                        asyncio.get_running_loop().create_task(self.fake.caller_hangup(call.channel))
                    elif call.answered and not call.dropped:
                        call.dropped = "caller channel gone before the BYE"
            else:
                self._reply(MediaCall(call_id), headers, addr, "481 Call/Transaction Does Not Exist", int(cseq[0]))
        elif method in ("OPTIONS", "CANCEL"):
            self._reply(call or MediaCall(call_id), headers, addr, "200 OK", int(cseq[0]), remember=False)

    async def _invite(self, call: MediaCall, headers, addr, values: dict[str, str], cseq: int) -> None:
        agent = values.get("x-callfabric-agent", "")
        call.channel = await self.fake.inbound_call(APP, [call.call_id, agent], sip_call_id=call.call_id,
                                                    if_app_missing="fail")
        if call.channel not in self.fake._chans:
            self.refused.append(call.call_id)
            self._reply(call, headers, addr, "503 Service Unavailable", cseq)
            return
        deadline = time.monotonic() + self.answer_timeout_s
        while True:  # Asterisk sends 200 OK when the Stasis application answers the channel
            channel = self.fake._chans.get(call.channel)
            if channel is not None and channel.model["state"] == "Up":
                break
            if channel is None or time.monotonic() > deadline:
                self.unanswered.append(call.call_id)
                self._reply(call, headers, addr, "480 Temporarily Unavailable" if channel is None
                            else "408 Request Timeout", cseq)
                return
            await asyncio.sleep(0.005)
        call.answered = True
        sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
        self._reply(call, headers, addr, "200 OK", cseq, body=sdp)

    def _reply(self, call: MediaCall, headers, addr, status: str, cseq: int, body: str = "",
               remember: bool = True) -> None:
        lines = [f"SIP/2.0 {status}"]
        for name, value in headers:
            lowered = name.lower()
            if lowered in ("via", "from", "call-id", "cseq", "record-route"):
                lines.append(f"{name}: {value}")
            elif lowered == "to":
                lines.append(f"{name}: {value}" + ("" if "tag=" in value or status.startswith("100") else
                                                   f";tag={uuid.uuid5(uuid.NAMESPACE_URL, call.call_id).hex[:8]}"))
        lines.append(f"Contact: <sip:media@{self.addr}>")
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        message = ("\r\n".join(lines) + "\r\n\r\n" + body).encode()
        if remember:
            call.responses[cseq] = message
        self.transport.sendto(message, addr)


# What a complete record of a call with an agent and a fork has in its timeline.
REQUIRED_EVENTS = {"decided", "answered", "media_start", "media_up", "fork_started", "ended", "media_end"}


class HaStack:
    """Kamailio (given) → FakeMediaNode + FakeAri (in this event loop) ← controller processes,
    all on one Redis; with the checks the chaos tests and bench/ha.py share."""

    def __init__(self, tmp_path, kamailio: Kamailio, media_port: int, redis_url: str, policy_dir):
        self.tmp = tmp_path
        self.kamailio = kamailio
        self.media_port = media_port
        self.redis_url = redis_url
        self.policy_dir = policy_dir
        self.fake: FakeAri | None = None
        self.node: FakeMediaNode | None = None
        self.controllers: list[ControllerProcess] = []

    async def start(self, controllers: int) -> "HaStack":
        self.fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005).start()
        self.node = await FakeMediaNode(self.fake).start(self.media_port)
        for i in range(controllers):
            await self.add_controller(f"ctl-{i}")
        await asyncio.to_thread(wait_clients, self.kamailio, controllers, 15)
        await self.until(lambda: self.fake.app_connected(APP), 10, "a controller owns media1")
        return self

    async def add_controller(self, name: str) -> ControllerProcess:
        controller = ControllerProcess(self.tmp, name, {
            "policy_dir": str(self.policy_dir), "redis_url": self.redis_url,
            "edge_evapi": [f"127.0.0.1:{self.kamailio.evapi_port}"],
            "ari_nodes": [f"media1=http://callfabric:secret@127.0.0.1:{self.fake.port}/ari"],
            "media_health_interval_s": 60.0, "policy_poll_s": 5.0})
        self.controllers.append(controller)
        await asyncio.to_thread(controller.start)
        await asyncio.to_thread(controller.wait_ready)
        return controller

    async def stop(self) -> None:
        for controller in self.controllers:
            await asyncio.to_thread(controller.stop)
        if self.node is not None:
            self.node.close()
        if self.fake is not None:
            await self.fake.stop(check=False)

    async def roles(self) -> dict[str, str]:
        out = {}
        for controller in self.controllers:
            status = await asyncio.to_thread(controller.status)
            if status:
                out[controller.name] = status["nodes"]["media1"]
        return out

    async def owner_and_standby(self) -> tuple[ControllerProcess, ControllerProcess]:
        roles = await self.roles()
        owner = next(c for c in self.controllers if roles.get(c.name) == "owner")
        return owner, next(c for c in self.controllers if c is not owner and roles.get(c.name) == "standby")

    def media_complete(self, call_id: str) -> bool:
        """The call's bridge holds caller + agent, its fork's bridge holds snoop + fork channel."""
        prefix = f"cf-{call_token(call_id)}-"
        bridges = [b for bid, b in self.fake.bridges.items() if bid.startswith(prefix)]
        return len(bridges) == 2 and all(len(b["channels"]) == 2 for b in bridges)

    async def until(self, predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            assert time.monotonic() - started < timeout, f"{what}: not within {timeout}s"
            await asyncio.sleep(0.02)
        return time.monotonic() - started

    async def calls(self, count: int, hold_ms: int, rate: int = 50, service: str = "18005550100"):
        return await asyncio.to_thread(run_uac, self.tmp, self.kamailio.sip_port, "uac_call.xml", calls=count,
                                       rate=rate, limit=count, hold_ms=hold_ms, timeout_s=hold_ms // 1000 + 25,
                                       service=service)

    def requests(self, since: int = 0, method: str | None = None, path_end: str = "") -> int:
        return sum(1 for r in self.fake.requests[since:]
                   if (method is None or r.method == method) and r.path.endswith(path_end)
                   and not r.path.startswith("/events"))

    async def takeover_after(self, mark: int, started: float) -> float:
        """Seconds from `started` until a controller's websocket is back and its resync has
        looked at the node (GET /channels, GET /bridges)."""
        def done() -> bool:
            return self.fake.app_connected(APP) and self.requests(mark, "GET", "/bridges") > 0
        while not done():
            assert time.monotonic() - started < 10, "no controller took media1 over"
            await asyncio.sleep(0.005)
        return time.monotonic() - started

    async def incomplete_records(self, call_ids: list[str], timeout: float = 15.0) -> dict[str, tuple]:
        """Calls whose record is not ended, or whose timeline misses a step or has one twice
        (waits up to `timeout` for the last dialog events): call id → (state, missing, events)."""
        store = CallStore(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while True:  # the media side's last steps may be written after the dialog's end
                records = await store.get_many(call_ids)
                problems = {}
                for call_id, record in zip(call_ids, records):
                    events = [e["event"] for e in await store.timeline(call_id)]
                    missing = REQUIRED_EVENTS - set(events)
                    if not record or record.get("state") != "ended" or missing or events.count("media_start") != 1 \
                            or events.count("decided") != 1:
                        problems[call_id] = (record.get("state") if record else None, sorted(missing), events)
                if not problems or time.monotonic() > deadline:
                    return problems
                await asyncio.sleep(0.1)
        finally:
            await store.aclose()

    async def complete_records(self, call_ids: list[str]) -> list[dict]:
        problems = await self.incomplete_records(call_ids)
        assert not problems, f"{len(problems)} incomplete record(s): {list(problems.items())[:3]}"
        store = CallStore(self.redis_url)
        try:
            return await store.get_many(call_ids)
        finally:
            await store.aclose()
