"""The SIP edge's own defences (kamailio/kamailio.cfg: route[PIKE], route[BAN], route[SWEEP],
route[REQINIT], the floodban/blocklist tables, the management ACLs) against real attack
tools and a hostile corpus: a real Kamailio with the repo's config, the real controller
app (bans recorded in Redis, metrics), SIPp callers and a SIPp media node.

Every attacker sends from its own loopback address (127.0.0.2x-5x); legitimate callers
from 127.0.0.10 (not exempt from pike: the localstack only exempts 127.0.0.1). Every
attack is bounded in requests and time."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from controller.app import BANS, EDGES
from controller.localstack.kamailio import Kamailio, free_port
from controller.localstack.process import spawn
from controller.localstack.sipp import SCENARIOS, SIPP_BIN
from tests.integration.test_security_edge import SecureStack

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server", "svmap", "svwar")),
    reason="kamailio, sipp, redis-server and sipvicious (svmap, svwar) are required")

LEGIT = "127.0.0.10"
SIPVICIOUS = Path("/usr/share/sipvicious")
POLICY = """\
settings:
  numbering: {country_code: "1", national_prefix: "1", international_prefix: "011"}
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
default:
  actions: [route_agent: intake]
"""

# The media node stand-in leaks internal headers in every answer it sends: the edge must
# strip them on the way out.
LEAKY_UAS = (SCENARIOS / "uas_answer.xml").read_text().replace(
    "[last_CSeq:]\n", "[last_CSeq:]\n      X-Callfabric-Internal: leaked-by-media\n")

# One OPTIONS per "call", nothing awaited: a flood.
OPTIONS_FLOOD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options flood">
  <send>
    <![CDATA[
      OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:flood@[local_ip]:[local_port]>;tag=[pid]F[call_number]
      To: <sip:[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      User-Agent: Generic/1.0
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


class DefenceStack(SecureStack):
    """Kamailio (UDP + TCP SIP) + a SIPp media node + the controller app, with a spy on
    everything the controller receives from the edge."""

    def __init__(self, tmp_path: Path, procs, redis_url: str, **kamailio_kw):
        scenario = tmp_path / "uas_leaky.xml"
        scenario.write_text(LEAKY_UAS)
        self.tcp_port = free_port(socket.SOCK_STREAM)
        defines = {"SIP_LISTEN_TCP": f"tcp:127.0.0.1:{self.tcp_port}", **kamailio_kw.pop("extra_defines", {})}
        super().__init__(tmp_path, procs, redis_url, policy=POLICY, media_scenario=str(scenario),
                         instance_id="defence-controller", extra_defines=defines, **kamailio_kw)
        self.frames: list[bytes] = []
        self.decides: list[dict] = []

    async def start(self) -> DefenceStack:
        await super().start()
        for channel in self.app[EDGES]:
            self._spy(channel)
        return self

    def _spy(self, channel) -> None:
        dispatch, decide = channel._dispatch, channel.decisions.decide

        def spy_dispatch(frame: bytes, received: float) -> None:
            self.frames.append(bytes(frame))
            dispatch(frame, received)

        async def spy_decide(message: dict, received: float):
            self.decides.append(message)
            return await decide(message, received)

        channel._dispatch = spy_dispatch
        channel.decisions.decide = spy_decide

    # -- what the parties see ------------------------------------------------------------------
    async def edge_metric(self, name: str, label: str = "") -> float:
        return await asyncio.to_thread(self.kamailio.metric, f"kamailio_callfabric_{name}", label)

    async def floodban(self) -> dict[str, str]:
        return _dump(await asyncio.to_thread(self.kamailio.jsonrpc, "htable.dump", ["floodban"]))

    async def blocklist(self) -> dict[str, str]:
        return _dump(await asyncio.to_thread(self.kamailio.jsonrpc, "htable.dump", ["blocklist"]))

    async def media_messages(self):
        return await asyncio.to_thread(self.media.messages)

    async def call(self, source: str = LEGIT, service: str = "18005550100", **kw):
        return await super().call(service, source, **kw)

    async def edge_ban_recorded(self, ip: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ban = await self.app[BANS].get(ip)
            if ban is not None:
                return ban
            await asyncio.sleep(0.1)
        raise AssertionError(f"the controller never recorded a ban of {ip}")


def _dump(result) -> dict[str, str]:
    return {item["name"]: str(item.get("value")) for slot in result or [] for item in slot.get("slot", [])}


@pytest.fixture
def defence_stack(tmp_path, procs, redis_url):
    return DefenceStack(tmp_path, procs, redis_url)  # processes are started here, off the event loop


@pytest.fixture
async def defence(defence_stack, caplog):
    caplog.set_level(logging.WARNING)
    yield await defence_stack.start()
    await defence_stack.stop()
    # the controller handled whatever the edge sent without a traceback
    crashes = [r for r in caplog.records if r.exc_info and r.name.startswith("callfabric")]
    assert not crashes, [r.getMessage() for r in crashes]


# -- attack tools -------------------------------------------------------------------------------
def sipvicious(tool: str, args: list[str], bind: str, user_agent: str | None = None,
               timeout: float = 25.0) -> subprocess.CompletedProcess:
    """Run svmap/svwar from `bind`. svwar 0.3.3 ignores its -b option (the binding ip is not
    passed to TakeASip), so the tool is run in-process with the address (and optionally a
    disguised User-Agent: a scanner that hides its name) patched in."""
    code = f"""
import sys
sys.path.insert(0, {str(SIPVICIOUS)!r})
from sipvicious import {tool} as tool
from sipvicious.libs import svhelper
BIND, UA = {bind!r}, {user_agent!r}
if UA is not None:
    make = svhelper.makeRequest
    def disguised(*a, **kw):
        kw["useragent"] = UA
        return make(*a, **kw)
    tool.makeRequest = disguised
if hasattr(tool, "TakeASip"):
    init = tool.TakeASip.__init__
    def bound(self, *a, **kw):
        kw["bindingip"] = BIND
        init(self, *a, **kw)
    tool.TakeASip.__init__ = bound
sys.argv = ["{tool}"] + {args!r} + ["-b", BIND]
sys.exit(tool.main())
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def sipp_flood(workdir: Path, port: int, source: str, requests: int, rate: int) -> subprocess.CompletedProcess:
    xml = workdir / f"flood-{uuid.uuid4().hex[:6]}.xml"
    xml.write_text(OPTIONS_FLOOD)
    cmd = [SIPP_BIN, f"127.0.0.1:{port}", "-sf", str(xml), "-i", source, "-p", str(free_port(socket.SOCK_DGRAM)),
           "-t", "u1", "-m", str(requests), "-r", str(rate), "-l", str(requests), "-timeout", "20s", "-nostdin"]
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, b"")


# -- raw SIP ------------------------------------------------------------------------------------
def _sip_request(port: int, source: str, method: str = "OPTIONS", ruri: str | None = None, *,
                headers: list[str] = (), body: bytes = b"", user_agent: str = "Generic/1.0",
                via: str | None = None, content_length: int | None = None, transport: str = "UDP",
                to_tag: str | None = None) -> bytes:
    ruri = ruri or f"sip:127.0.0.1:{port}"
    branch = "z9hG4bK" + uuid.uuid4().hex[:16]
    lines = [f"{method} {ruri} SIP/2.0",
             via if via is not None else f"Via: SIP/2.0/{transport} {source}:@PORT@;branch={branch};rport",
             "Max-Forwards: 70",
             f"From: <sip:attacker@{source}>;tag={uuid.uuid4().hex[:8]}",
             f"To: <sip:callee@127.0.0.1:{port}>" + (f";tag={to_tag}" if to_tag else ""),
             f"Call-ID: {uuid.uuid4().hex}@{source}",
             f"CSeq: 1 {method}",
             f"Contact: <sip:attacker@{source}:@PORT@>",
             f"User-Agent: {user_agent}", *headers,
             f"Content-Length: {len(body) if content_length is None else content_length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


sip_request = _sip_request


def send_udp(port: int, source: str, data: bytes, wait: float = 1.0) -> list[bytes]:
    """Send one datagram from `source`; every reply received within `wait` seconds (provisional
    ones included)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    data = data.replace(b"@PORT@", str(s.getsockname()[1]).encode())
    s.settimeout(wait)
    replies = []
    try:
        s.sendto(data, ("127.0.0.1", port))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            replies.append(s.recv(65535))
            if not replies[-1].startswith(b"SIP/2.0 1"):
                break
    except OSError:
        pass
    finally:
        s.close()
    return replies


def send_tcp(port: int, source: str, data: bytes, wait: float = 1.0) -> list[bytes]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    data = data.replace(b"@PORT@", str(s.getsockname()[1]).encode())
    s.settimeout(wait)
    buf = b""
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65535)
            if not chunk:
                break
            buf += chunk
            if b"\r\n\r\n" in buf and not buf.startswith(b"SIP/2.0 1"):
                break
    except OSError:
        pass
    finally:
        s.close()
    return [b"SIP/2.0 " + part for part in buf.split(b"SIP/2.0 ")[1:]]


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def finals(replies: list[bytes]) -> list[int]:
    return [status(r) for r in replies if not r.startswith(b"SIP/2.0 1")]


# ===============================================================================================
# Scanners
# ===============================================================================================
async def test_svmap_is_banned_at_its_first_request_and_legit_calls_go_on(defence):
    scanner = "127.0.0.21"
    port = defence.kamailio.sip_port
    legit = asyncio.create_task(defence.call(calls=10, rate=5))
    # a port sweep around the edge's SIP port (only one port answers SIP), twice
    scans = []
    for _ in range(2):
        scans.append(await asyncio.to_thread(sipvicious, "svmap", ["-p", f"{port - 3}-{port + 3}", "127.0.0.1"],
                                             scanner))
    result = await legit
    assert result.successful == 10 and result.failed == 0, result.output

    for scan in scans:  # the scanner learned nothing: the edge never answered it
        assert "found nothing" in scan.stderr + scan.stdout, scan.stdout + scan.stderr
    assert await defence.floodban() == {scanner: "scanner"}
    assert await defence.edge_metric("dropped_total", 'reason="scanner"') == 1  # its first request
    assert await defence.edge_metric("dropped_total", 'reason="banned"') >= 1   # the second scan
    assert await defence.edge_metric("bans_total", 'reason="scanner"') == 1

    ban = await defence.edge_ban_recorded(scanner)
    assert ban.origin == "edge" and ban.detector == "scanner"
    assert ban.reason == "banned by the edge (scanner): User-Agent friendly-scanner"
    assert 299_000 <= ban.expires_ms - ban.created_ms <= 300_000  # FLOOD_BAN_S
    assert defence.metric("callfabric_bans_total", origin="edge", detector="scanner") == 1
    # the ban is pushed to every edge's blocklist too (an edge that never saw the scanner)
    assert scanner in await defence.blocklist()
    assert LEGIT not in await defence.floodban() and LEGIT not in await defence.blocklist()
    assert not [m for m in defence.decides if m.get("src_ip") == scanner]


async def test_svwar_enumeration_is_banned_whatever_the_method(defence):
    port = defence.kamailio.sip_port
    sources = {"REGISTER": "127.0.0.22", "OPTIONS": "127.0.0.23", "INVITE": "127.0.0.24"}

    def svwar(method: str, source: str, user_agent: str | None = None):
        return sipvicious("svwar", ["-p", str(port), "-e", "100-160", "-m", method, "--force",
                                    "--maximumtime", "3", "127.0.0.1"], source, user_agent)

    # stock svwar ("friendly-scanner"), one run per method, in parallel
    runs = await asyncio.gather(*(asyncio.to_thread(svwar, m, s) for m, s in sources.items()))
    for run in runs:
        assert "found nothing" in run.stderr + run.stdout, run.stdout + run.stderr
    assert await defence.floodban() == {s: "scanner" for s in sources.values()}
    assert await defence.edge_metric("dropped_total", 'reason="scanner"') == 3  # one request each
    assert await defence.edge_metric("bans_total", 'reason="scanner"') == 3

    assert defence.metric("callfabric_bans_total", origin="edge", detector="scanner") == 3
    for source in sources.values():
        ban = await defence.edge_ban_recorded(source)
        assert ban.origin == "edge" and ban.detector == "scanner"

    # svwar disguised as a phone: every user gets the same answer (REGISTER 403, OPTIONS 405:
    # the edge is no registrar), so it learns nothing and gives up at its second request
    disguised = {"REGISTER": "127.0.0.25", "OPTIONS": "127.0.0.26"}
    runs = await asyncio.gather(*(asyncio.to_thread(svwar, m, s, "Linphone/5.2.0") for m, s in disguised.items()))
    for run in runs:
        assert "found nothing" in run.stdout + run.stderr, run.stdout + run.stderr
    assert await defence.edge_metric("dropped_total", 'reason="register"') <= 2
    assert await defence.edge_metric("dropped_total", 'reason="method-not-allowed"') <= 2
    # nobody got to the controller's decision
    assert not [m for m in defence.decides if m.get("src_ip") in {*sources.values(), *disguised.values()}]
    ok = await defence.call()
    assert ok.successful == 1, ok.output


async def test_a_persistent_register_or_options_sweep_is_banned(defence):
    """A sweeper that does not give up (unlike svwar) and hides its User-Agent: banned at its
    SWEEP_MAX_USERS + 1st (11th) distinct user, silent from then on."""
    port = defence.kamailio.sip_port
    answered = {}
    for method, source in (("REGISTER", "127.0.0.27"), ("OPTIONS", "127.0.0.28")):
        replies = []
        for n in range(100, 130):
            data = sip_request(port, source, method, f"sip:{n}@127.0.0.1:{port}").replace(
                b"sip:callee@", f"sip:{n}@".encode())
            replies.append(finals(await asyncio.to_thread(send_udp, port, source, data, 0.3)))
        answered[method] = [r for r in replies if r]
        assert replies[:10] == [[403 if method == "REGISTER" else 405]] * 10, replies
        assert replies[10:] == [[]] * 20  # the 11th banned it
    floodban = await defence.floodban()
    assert floodban == {"127.0.0.27": "sweep", "127.0.0.28": "sweep"}
    assert await defence.edge_metric("bans_total", 'reason="sweep"') == 2
    assert await defence.edge_metric("dropped_total", 'reason="banned"') == 2 * 19
    for source in ("127.0.0.27", "127.0.0.28"):
        ban = await defence.edge_ban_recorded(source)
        assert ban.origin == "edge" and ban.detector == "sweep"
        assert ban.reason == "banned by the edge (sweep): 11 distinct users by OPTIONS/REGISTER"
    # the same user again and again is no sweep (a phone's re-REGISTER, a keepalive OPTIONS)
    for _ in range(30):
        data = sip_request(port, "127.0.0.29", "OPTIONS", f"sip:100@127.0.0.1:{port}")
        assert finals(await asyncio.to_thread(send_udp, port, "127.0.0.29", data, 0.3)) == [405]
    assert "127.0.0.29" not in await defence.floodban()


# ===============================================================================================
# Flood
# ===============================================================================================
async def test_a_flood_from_one_source_is_banned_while_legit_load_completes(defence):
    flooder, port = "127.0.0.30", defence.kamailio.sip_port
    sl_before = await asyncio.to_thread(_sl_200, defence.kamailio)
    legit = asyncio.create_task(defence.call(calls=30, rate=10))
    await asyncio.sleep(0.5)
    flood = await asyncio.to_thread(sipp_flood, defence.tmp, port, flooder, 6000, 3000)
    result = await legit
    answered = await asyncio.to_thread(_sl_200, defence.kamailio) - sl_before
    dropped = await defence.edge_metric("dropped_total", 'reason="banned"')
    print(f"\nflood: {answered:.0f} OPTIONS answered before the ban, {dropped:.0f} dropped after it "
          f"(+1 banning request); sipp rc={flood.returncode}")
    assert result.successful == 30 and result.failed == 0, result.output

    assert (await defence.floodban()).get(flooder) == "flood"
    assert await defence.edge_metric("bans_total", 'reason="flood"') == 1
    # pike bans after at most ~1.75 x PIKE_DENSITY (1000 per PIKE_SAMPLING_S) requests
    assert answered <= 1750, answered
    assert dropped >= 4000  # the rest of the flood: dropped before any parsing
    ban = await defence.edge_ban_recorded(flooder)
    assert ban.origin == "edge" and ban.detector == "flood"
    assert "more than 1000 requests in 2 s" in ban.reason
    assert defence.metric("callfabric_bans_total", origin="edge", detector="flood") == 1
    assert LEGIT not in await defence.floodban()
    assert defence.kamailio.alive()


def _sl_200(k: Kamailio) -> float:
    return k.metric("kamailio_sl_200_replies")


# ===============================================================================================
# Hostile corpus
# ===============================================================================================
def corpus(port: int, source: str, transport: str = "UDP") -> list[tuple[str, bytes]]:
    def sip_request(*a, **kw) -> bytes:
        return _sip_request(*a, transport=transport, **kw)
    invite = "INVITE"
    ok_ruri = f"sip:18005550100@127.0.0.1:{port}"
    return [
        ("bad Via", sip_request(port, source, via="Via: SIP/2.0/UDP ;;;;branch")),
        ("no Via", sip_request(port, source, via="X-Nothing: here")),
        ("Via of another protocol", sip_request(port, source, via="Via: HTTP/1.1/UDP 1.2.3.4:5060;branch=z9hG4bKx")),
        ("huge header field", sip_request(port, source, headers=["X-Big: " + "A" * 6000])),
        ("oversize request", sip_request(port, source, invite, ok_ruri, body=b"v=0\r\n" * 4000,
                                         headers=["Content-Type: application/sdp"])),
        ("too many headers", sip_request(port, source, headers=[f"X-H{i}: {i}" for i in range(80)])),
        ("NUL bytes in a header", sip_request(port, source, invite, ok_ruri, headers=["X-Nul: a\x00b\x00c"])),
        ("NUL in the request line", sip_request(port, source, ruri=f"sip:a\x00b@127.0.0.1:{port}")),
        ("Content-Length too big", sip_request(port, source, invite, ok_ruri, body=b"v=0\r\n", content_length=500)),
        ("Content-Length negative", sip_request(port, source, body=b"", content_length=-5)),
        ("Content-Length garbage", sip_request(port, source, headers=["Content-Length: 12abc"])),
        ("unknown method", sip_request(port, source, "FOOBAR")),
        ("lower-case method", sip_request(port, source, "invite", ok_ruri)),
        ("CSeq method mismatch", sip_request(port, source, headers=["CSeq: 1 INVITE"])),
        ("SIP/3.0", sip_request(port, source).replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1)),
        ("http URI", sip_request(port, source, invite, "http://127.0.0.1/x")),
        ("escaped garbage URI", sip_request(port, source, invite, f"sip:%00%ff%0d%0a@127.0.0.1:{port}")),
        ("unbalanced IPv6 URI", sip_request(port, source, invite, "sip:a@[::1:5060")),
        ("URI of @ signs", sip_request(port, source, invite, "sip:@@@@")),
        ("Max-Forwards 0", sip_request(port, source).replace(b"Max-Forwards: 70", b"Max-Forwards: 0")),
        ("binary noise", bytes(range(256)) * 4),
        ("empty lines", b"\r\n\r\n\r\n\r\n"),
        ("half a request", b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4"),
        ("response from nowhere", (b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKnope\r\n"
                                   b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\n"
                                   b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")),
        ("forged in-dialog BYE", sip_request(port, source, "BYE", "sip:victim@192.0.2.1", to_tag="forged",
                                             headers=[f"Route: <sip:127.0.0.1:{port};lr>"])),
    ]


# odd but valid requests: routed like any call (the controller gets them as valid JSON)
ROUTABLE = {"NUL bytes in a header", "escaped garbage URI", "lower-case method"}


async def test_a_hostile_corpus_is_answered_or_dropped_and_the_edge_keeps_working(defence):
    port, tcp_port = defence.kamailio.sip_port, defence.tcp_port
    outcomes: dict[str, tuple[list[int], list[int]]] = {}
    over_tcp = dict(corpus(tcp_port, "127.0.0.41", "TCP"))
    for name, data in corpus(port, "127.0.0.40"):
        udp = finals(await asyncio.to_thread(send_udp, port, "127.0.0.40", data, 0.5))
        tcp = finals(await asyncio.to_thread(send_tcp, tcp_port, "127.0.0.41", over_tcp[name], 0.5))
        outcomes[name] = (udp, tcp)
    print("\n" + "\n".join(f"{n:28} udp {u or 'dropped'}  tcp {t or 'dropped'}" for n, (u, t) in outcomes.items()))

    for name, (udp, tcp) in outcomes.items():
        for code in udp + tcp:  # answered with an error, or dropped (a valid call may be routed)
            assert 400 <= code < 700 or name in ROUTABLE, (name, code)
    assert outcomes["huge header field"][0] == [400]
    assert outcomes["too many headers"][0] == [400]
    assert outcomes["oversize request"][0] == [513]
    assert outcomes["unknown method"][0] == [501]
    assert outcomes["Max-Forwards 0"][0] == [483]
    assert outcomes["forged in-dialog BYE"] == ([481], [481])  # not relayed anywhere
    assert outcomes["http URI"][0] in ([400], [416])
    # unparseable Content-Length / duplicate CSeq: sanity cannot even answer; counted
    assert await defence.edge_metric("dropped_total", 'reason="sanity"') >= 3

    # nothing of that got any source banned, Kamailio is alive and still routes a call
    assert defence.kamailio.alive()
    assert await defence.floodban() == {}
    ok = await defence.call()
    assert ok.successful == 1, ok.output
    # everything the controller got from the edge was one JSON object per frame, and it had
    # nothing it could not handle
    assert defence.frames and all(isinstance(json.loads(f), dict) for f in defence.frames)
    for why in ("framing", "bad-json", "internal", "bad-ban-event", "bad-dialog-event"):
        assert defence.metric("callfabric_decision_errors_total", reason=why) == 0, why
    assert defence.decides
    for message in defence.decides:
        assert isinstance(message.get("headers"), dict)
        assert not [h for h in message["headers"] if h.lower().startswith("x-callfabric-")]


async def test_forged_internal_headers_never_reach_the_media_node_nor_the_controller(defence):
    forged = [("X-Callfabric-Agent", "evil"), ("x-callfabric-fallback", "forged"),
              ("X-CALLFABRIC-RULE", "forged"), ("X-Callfabric-Policy", "forged"), ("X-Tenant-Hint", "kept")]
    result = await defence.call(headers=forged)
    assert result.successful == 1, result.output
    # over raw TCP as well, header name spelled with odd spacing
    data = sip_request(defence.tcp_port, "127.0.0.42", "INVITE", f"sip:18005550101@127.0.0.1:{defence.tcp_port}",
                       headers=["X-Callfabric-Agent : evil-tcp", "X-Callfabric-Agent:evil-tcp2"], transport="TCP")
    tcp_replies = await asyncio.to_thread(send_tcp, defence.tcp_port, "127.0.0.42", data, 2.0)
    assert 200 in finals(tcp_replies), tcp_replies

    deadline = time.monotonic() + 10
    while True:  # both calls were answered: wait for the media node's log of their INVITEs
        media_messages = await defence.media_messages()
        invites = [m for m in media_messages if m.direction == "in" and m.first_line.startswith("INVITE ")]
        if len({c for m in invites for c in m.header("Call-ID")}) >= 2 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len({c for m in invites for c in m.header("Call-ID")}) == 2, [m.raw for m in invites]
    seen = "\n".join(m.raw for m in media_messages if m.direction == "in")
    assert "evil" not in seen and "forged" not in seen, seen
    for invite in invites:  # only the controller's own internal headers
        assert invite.header("X-Callfabric-Agent") == ["intake"], invite.raw
    assert "X-Tenant-Hint: kept" in seen

    assert len(defence.decides) == 2
    for message in defence.decides:
        names = {h.lower() for h in message["headers"]}
        assert not [n for n in names if n.startswith("x-callfabric-")], message["headers"]
    assert defence.decides[0]["headers"].get("X-Tenant-Hint") == ["kept"]

    # the way out: the media node's 100/200 (and the BYE's 200) carry X-Callfabric-Internal;
    # nothing the caller got does
    got = [m for m in result.messages if m.direction == "in"]
    assert got and not [m for m in got if any(k.lower().startswith("x-callfabric-") for k, _ in m.headers)], \
        [m.raw for m in got]
    assert b"x-callfabric" not in b"".join(tcp_replies).lower()
    leaked = [m for m in media_messages if m.direction == "out" and "X-Callfabric-Internal" in m.raw]
    assert leaked  # (the stand-in did send them)


# ===============================================================================================
# Management interfaces
# ===============================================================================================
def http_request(port: int, source: str, method: str, path: str, body: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


async def test_json_rpc_answers_only_the_controllers_address(defence):
    port = defence.kamailio.http_port
    body = json.dumps({"jsonrpc": "2.0", "method": "htable.seti", "params": ["blocklist", "127.0.0.10", 1], "id": 1})
    code, text = await asyncio.to_thread(http_request, port, "127.0.0.5", "POST", "/RPC", body)
    assert code == 403, text
    assert await defence.blocklist() == {}  # not applied
    code, text = await asyncio.to_thread(http_request, port, "127.0.0.5", "GET", "/RPC", None)
    assert code == 403
    # the monitoring side (HTTP_ALLOWED_NET 127.0.0.0/8) is open to it
    code, _ = await asyncio.to_thread(http_request, port, "127.0.0.5", "GET", "/metrics", None)
    assert code == 200
    # from 127.0.0.1 (RPC_ALLOWED_NET) it works
    dump = json.dumps({"jsonrpc": "2.0", "method": "htable.dump", "params": ["floodban"], "id": 2})
    code, text = await asyncio.to_thread(http_request, port, "127.0.0.1", "POST", "/RPC", dump)
    assert code == 200 and json.loads(text)["result"] == [], text
    assert "JSON-RPC refused to 127.0.0.5" in await asyncio.to_thread(defence.kamailio.log_text)


# ===============================================================================================
# Lifting bans
# ===============================================================================================
async def test_lifting_a_ban_lifts_the_edges_own_ban_too(defence):
    port = defence.kamailio.sip_port
    scanner = "127.0.0.50"
    assert await asyncio.to_thread(send_udp, port, scanner, sip_request(port, scanner, user_agent="friendly-scanner"),
                                   0.5) == []
    await defence.edge_ban_recorded(scanner)
    assert await defence.floodban() == {scanner: "scanner"} and scanner in await defence.blocklist()
    refused = await defence.call(scanner, timeout_s=3)
    assert refused.successful == 0

    assert await defence.app[BANS].remove(scanner) is True
    assert scanner not in await defence.floodban() and scanner not in await defence.blocklist()
    assert await defence.app[BANS].get(scanner) is None
    ok = await defence.call(scanner)
    assert ok.successful == 1, ok.output

    # a ban only the edge knows of (made while no controller was connected) is lifted too
    other = "127.0.0.51"
    await asyncio.to_thread(defence.kamailio.jsonrpc, "htable.sets", ["floodban", other, "flood"])
    assert other in await defence.floodban()
    assert await defence.app[BANS].remove(other) is False
    assert other not in await defence.floodban()
    assert defence.metric("callfabric_edge_rpc_errors_total", method="unblock") == 0
