"""What a hostile caller tried against the edge (issue 18), through the real stack: a real
Kamailio with the repo's config, the controller app (Redis records, bans, its REST API and
CLI), SIPp callers on their own loopback addresses, SIPp media nodes and a SIPp human desk.

- a ban never cuts calls already up: their BYEs pass and their records close;
- trusted peers (media nodes, TRUSTED_NET / trusted_peers) are never banned, whoever tries:
  the API and CLI refuse with the reason, a spoofed scanner User-Agent from their address bans
  nothing and their BYEs go on passing;
- a reply that matches no transaction is dropped and counted, never reflected to its second Via;
- callfabric's header names (X-Callfabric-*, X-Summary, X-Intent, X-Sentiment and their -Ref
  forms) sent by a caller, in any case or spacing, in requests or replies, reach neither the
  agent nor the human desk."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from controller.app import BANS, EDGES, GUARD, METRICS, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.sipp import SCENARIOS, run_uac
from controller.security.trust import BanRefused
from tests.integration.test_edge_defence import finals, send_udp, sip_request
from tests.support.kamailio import wait_clients

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
    reason="kamailio, sipp and redis-server are required")

LEGIT = "127.0.0.10"
PEER = "127.0.0.60"  # a carrier's SBC: TRUSTED_NET at the edge, trusted_peers at the controller
TOKEN = "ops-secret-token"
POLICY = """\
settings:
  numbering: {{country_code: "1", national_prefix: "1", international_prefix: "011"}}
node_sets:
  media: {{dispatcher_set: 1}}
  brief-nodes: {{dispatcher_set: 2}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:4000"}}
  brief: {{node_set: brief-nodes, endpoint: "127.0.0.1:4001"}}
destinations:
  desk: {{uri: "sip:desk@{desk}"}}
rules:
  - name: to-desk
    match: {{ruri: "+18005550177"}}
    actions: [route_sip: desk, add_headers: {{X-Summary: "VIP ${{caller}}", X-Vip: "yes"}}]
  - name: brief-agent
    match: {{ruri: "+18005550188"}}
    actions: [route_agent: brief]
default:
  actions: [route_agent: intake]
"""

# Media node (set 1): answers, waits for the caller's BYE; every reply it sends carries
# handoff header names a media node never sets in replies: the edge strips them.
MEDIA_UAS = (SCENARIOS / "uas_answer.xml").read_text().replace(
    "[last_CSeq:]\n", "[last_CSeq:]\n      X-Intent: leaked-by-media\n")
# Media node (set 2): answers, then hangs up itself after 3 s (its BYE must pass).
BRIEF_UAS = (SCENARIOS / "uas_answer_bye.xml").read_text().replace(
    '<pause milliseconds="300"/>', '<pause milliseconds="3000"/>')
# The human desk: answers with handoff headers of its own in its reply (never towards the caller).
DESK_UAS = (SCENARIOS / "uas_answer.xml").read_text().replace(
    "[last_CSeq:]\n", "[last_CSeq:]\n      x-sentiment : leaked-by-desk\n      X-Callfabric-Agent: desk\n")
# A caller that waits for the agent's BYE and answers it with forged handoff headers.
FORGING_WAIT_BYE = (SCENARIOS / "uac_wait_bye.xml").read_text().replace(
    "[last_CSeq:]\n      Content-Length: 0",
    "[last_CSeq:]\n      X-SUMMARY: forged-in-reply\n      x-intent-ref : forged-in-reply\n      Content-Length: 0")
FORGED = [("X-Summary", "forged-summary"), ("x-intent", "forged-intent"), ("X-SENTIMENT", "forged-sentiment"),
          ("X-Summary-Ref", "forged-ref"), ("x-callfabric-agent", "forged-agent"), ("X-Lang", "kept")]


class HardeningStack:
    def __init__(self, tmp_path: Path, procs, redis_url: str):
        self.tmp = tmp_path
        scenarios = {}
        for name, text in (("media", MEDIA_UAS), ("brief", BRIEF_UAS), ("desk", DESK_UAS),
                           ("caller_forging", FORGING_WAIT_BYE)):
            scenarios[name] = tmp_path / f"{name}.xml"
            scenarios[name].write_text(text)
        self.scenarios = scenarios
        self.media = procs.uas(str(scenarios["media"]), "media")
        self.brief = procs.uas(str(scenarios["brief"]), "brief")
        self.desk = procs.uas(str(scenarios["desk"]), "desk")
        # the desk's PBX is a trusted destination (it may get the context headers)
        self.kamailio = procs.kamailio({1: [self.media.addr], 2: [self.brief.addr]},
                                       extra_defines={"TRUSTED_NET": f'"{PEER}/32"',
                                                      "TRUSTED_DEST_NET": '"127.0.0.1/32"'})
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "policy.yaml").write_text(POLICY.format(desk=self.desk.addr))
        self.api_port = free_port()
        self.settings = Settings(policy_dir=str(policy_dir), policy_poll_s=0.5, redis_url=redis_url,
                                 edge_evapi=[f"127.0.0.1:{self.kamailio.evapi_port}"],
                                 edge_rpc=[f"http://127.0.0.1:{self.kamailio.http_port}/RPC"],
                                 http_listen=f"127.0.0.1:{self.api_port}", instance_id="hardening",
                                 trusted_peers=[f"{PEER}/32"], api_tokens=[f"ops:admin:{TOKEN}"])
        self.app = build_app(self.settings)
        self.runner: web.AppRunner | None = None
        self.decides: list[dict] = []

    async def start(self) -> "HardeningStack":
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.api_port).start()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in self.app[EDGES])), 10)
        await asyncio.to_thread(wait_clients, self.kamailio, 1)
        for channel in self.app[EDGES]:
            decide = channel.decisions.decide

            async def spy(message, received, decide=decide):
                self.decides.append(message)
                return await decide(message, received)
            channel.decisions.decide = spy
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def call(self, source: str = LEGIT, service: str = "18005550100", **kw):
        return await asyncio.to_thread(run_uac, self.tmp, self.kamailio.sip_port, kw.pop("scenario", "uac_call.xml"),
                                       service=service, source_ip=source, **kw)

    def metric(self, name: str, **labels) -> float:
        return self.app[METRICS].registry.get_sample_value(name, labels) or 0.0

    async def edge_metric(self, name: str, label: str = "") -> float:
        return await asyncio.to_thread(self.kamailio.metric, f"kamailio_callfabric_{name}", label)

    async def table(self, name: str) -> dict[str, str]:
        result = await asyncio.to_thread(self.kamailio.jsonrpc, "htable.dump", [name])
        return {item["name"]: str(item.get("value")) for slot in result or [] for item in slot.get("slot", [])}

    async def confirmed_dialogs(self) -> int:
        dialogs = await asyncio.to_thread(self.kamailio.jsonrpc, "dlg.list")
        return sum(1 for d in dialogs or [] if d.get("state") == 4)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "CALLFABRIC_TOKEN": TOKEN}
        return subprocess.run([sys.executable, "-m", "controller.cli", "bans", "--api",
                               f"http://127.0.0.1:{self.api_port}/v1", *args],
                              capture_output=True, text=True, timeout=30, env=env, check=False)


@pytest.fixture
def hardening_stack(tmp_path, procs, redis_url):
    return HardeningStack(tmp_path, procs, redis_url)  # processes are started here, off the event loop


@pytest.fixture
async def hardened(hardening_stack):
    yield await hardening_stack.start()
    await hardening_stack.stop()


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s")


def call_ids(result) -> list[str]:
    return sorted({c for m in result.messages if m.direction == "out" for c in m.header("Call-ID")})


# ===============================================================================================
# Bans never cut live calls
# ===============================================================================================
async def test_a_ban_never_cuts_calls_already_up(hardened, store):
    source = "127.0.0.31"
    port = hardened.kamailio.sip_port
    # three calls up from the source, its caller hangs up after 5 s
    calls = asyncio.create_task(hardened.call(source, calls=3, rate=10, hold_ms=5000, timeout_s=20))
    await wait_until(lambda: _eq(hardened.confirmed_dialogs(), 3), what="three calls up")

    # now the source is banned twice over: by the edge itself (a scanner User-Agent) and by an
    # operator through the API (the controller's blocklist)
    assert await asyncio.to_thread(send_udp, port, source, sip_request(port, source, user_agent="sipcli/1.0"),
                                   0.3) == []
    await wait_until(lambda: _has(hardened.table("floodban"), source), what="the edge's ban")
    await hardened.app[BANS].add(source, 600, "test", origin="api", detector="manual", now_ms=int(time.time() * 1000))
    assert source in await hardened.table("blocklist")

    result = await calls
    assert result.rc == 0 and result.successful == 3, result.output  # every BYE got its 200
    assert len(await asyncio.to_thread(hardened.media.requests, "BYE")) >= 3
    for call_id in call_ids(result):
        record = await wait_until(lambda c=call_id: _closed(store, c), what=f"record of {call_id} closed")
        assert record["state"] == "ended" and record["end_reason"] == "bye-caller", record
    assert await hardened.confirmed_dialogs() == 0

    # the ban holds for anything new from the source
    dropped = await hardened.edge_metric("dropped_total", 'reason="banned"')
    refused = await hardened.call(source, timeout_s=3)
    assert refused.successful == 0
    assert await hardened.edge_metric("dropped_total", 'reason="banned"') > dropped
    # a BYE of a dialog the edge does not know is not let through either
    bye = sip_request(port, source, "BYE", to_tag="no-such-dialog")
    assert await asyncio.to_thread(send_udp, port, source, bye, 0.3) == []


async def _eq(value, expected):
    return await value == expected


async def _has(table, key):
    return key in await table


async def _closed(store, call_id):
    record = await store.get(call_id)
    return record if record and record.get("state") in ("ended", "failed") else None


# ===============================================================================================
# Trusted peers are never banned
# ===============================================================================================
async def test_a_ban_on_a_media_node_or_a_trusted_peer_is_refused(hardened):
    media_ip = "127.0.0.1"  # the media nodes' address (the edge's dispatcher list)
    for ip in (media_ip, PEER):
        with pytest.raises(BanRefused, match=f"{ip} cannot be banned"):
            await hardened.app[BANS].add(ip, 60, "test", origin="api", detector="manual", now_ms=1)
    # the operator's tools say why
    cli = await asyncio.to_thread(hardened.cli, "add", media_ip, "--for", "10m")
    assert cli.returncode != 0
    assert cli.stderr.startswith("error: 422 127.0.0.1 cannot be banned: it is a media node (sip:127.0.0.1:"), cli.stderr
    cli = await asyncio.to_thread(hardened.cli, "add", PEER)
    assert cli.returncode != 0 and f"trusted peer (trusted_peers {PEER}/32)" in cli.stderr, cli.stderr
    ok = await asyncio.to_thread(hardened.cli, "add", "127.0.0.99", "--for", "1m")
    assert ok.returncode == 0, ok.stderr
    assert hardened.metric("callfabric_bans_refused_total", origin="api") == 4
    assert set(await hardened.table("blocklist")) == {"127.0.0.99"}

    # an entry pushed to the edge by hand is ignored for a trusted peer: its calls go on
    await asyncio.to_thread(hardened.kamailio.jsonrpc, "htable.setxi", ["blocklist", PEER, 1, 600])
    assert (await hardened.call(PEER)).successful == 1

    # and a ban the edge would report for a trusted peer (an edge without it in TRUSTED_NET) is
    # not recorded but lifted at every edge
    await asyncio.to_thread(hardened.kamailio.jsonrpc, "htable.sets", ["floodban", PEER, "scanner"])
    await hardened.app[GUARD].edge_ban(PEER, 300, "scanner", "test")
    assert PEER not in await hardened.table("floodban") and PEER not in await hardened.table("blocklist")
    assert hardened.metric("callfabric_bans_refused_total", origin="edge") == 1
    assert await hardened.app[BANS].get(PEER) is None


async def test_a_spoofed_scanner_user_agent_from_a_trusted_address_bans_nothing_and_its_byes_pass(hardened, store):
    port = hardened.kamailio.sip_port
    # a call to the agent whose media node hangs up (BYE from the media node) after 3 s
    call = asyncio.create_task(hardened.call(service="18005550188", scenario="uac_wait_bye.xml", timeout_s=15))
    await wait_until(lambda: _eq(hardened.confirmed_dialogs(), 1), what="the call up")
    bans = await hardened.edge_metric("bans_total", 'reason="scanner"')
    # meanwhile someone spoofs the media node's address (another port) and a carrier's SBC with
    # scanner User-Agents, out of dialog and in dialog
    for source in ("127.0.0.1", PEER):
        for request in (sip_request(port, source, user_agent="friendly-scanner"),
                        sip_request(port, source, "INVITE", f"sip:18005550100@127.0.0.1:{port}",
                                    user_agent="sipvicious"),
                        sip_request(port, source, "BYE", user_agent="friendly-scanner", to_tag="x")):
            await asyncio.to_thread(send_udp, port, source, request, 0.3)
    assert await hardened.table("floodban") == {}
    assert await hardened.edge_metric("bans_total", 'reason="scanner"') == bans

    result = await call
    assert result.rc == 0 and result.successful == 1, result.output  # the media node's BYE reached the caller
    (call_id,) = call_ids(result)
    record = await wait_until(lambda: _closed(store, call_id), what="the record closed")
    assert record["end_reason"] == "bye-callee", record
    await asyncio.sleep(0.5)
    assert await hardened.app[BANS].active(int(time.time() * 1000)) == []


# ===============================================================================================
# No reflection
# ===============================================================================================
async def test_an_unsolicited_response_is_dropped_and_counted_never_reflected(hardened):
    port = hardened.kamailio.sip_port
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind(("127.0.0.77", 0))
    victim.setblocking(False)
    victim_port = victim.getsockname()[1]
    before = await hardened.edge_metric("dropped_total", 'reason="stray-reply"')
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.66", 0))
    try:
        for code, method in ((200, "INVITE"), (180, "INVITE"), (486, "INVITE"), (200, "OPTIONS"), (200, "BYE")):
            reply = (f"SIP/2.0 {code} Whatever\r\n"
                     f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{uuid.uuid4().hex}\r\n"
                     f"Via: SIP/2.0/UDP 127.0.0.77:{victim_port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                     f"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                     f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n")
            attacker.sendto(reply.encode(), ("127.0.0.1", port))
        await wait_until(lambda: _at_least(hardened.edge_metric("dropped_total", 'reason="stray-reply"'), before + 5),
                         what="five stray replies counted")
        await asyncio.sleep(0.3)
        with pytest.raises(BlockingIOError):
            victim.recv(65535)  # nothing reached the address in the second Via
    finally:
        victim.close()
        attacker.close()
    # replies of real transactions still flow
    assert (await hardened.call()).successful == 1


async def _at_least(value, expected):
    return await value >= expected


# ===============================================================================================
# Trusted header names are never taken from a caller
# ===============================================================================================
async def test_forged_handoff_headers_never_reach_the_agent_nor_the_desk(hardened):
    port = hardened.kamailio.sip_port
    # to the agent (media node), with the agent hanging up: the caller's 200 to that BYE is forged too
    to_agent = await hardened.call(service="18005550188", headers=FORGED,
                                   scenario=str(hardened.scenarios["caller_forging"]), timeout_s=15)
    assert to_agent.successful == 1, to_agent.output
    # to the human desk, the handoff headers set by the policy
    to_desk = await hardened.call(service="18005550177", headers=FORGED)
    assert to_desk.successful == 1, to_desk.output
    # over TCP-less raw UDP with odd spacing and case, to the default agent
    raw = sip_request(port, "127.0.0.42", "INVITE", f"sip:18005550100@127.0.0.1:{port}",
                      headers=["X-Summary : forged-spaced", "x-SENTIMENT:forged-tight", "X-Intent\t: forged-tab"])
    replies = await asyncio.to_thread(send_udp, port, "127.0.0.42", raw, 2.0)
    assert 200 in finals(replies), replies
    await asyncio.sleep(0.5)

    brief_in = [m for m in await asyncio.to_thread(hardened.brief.messages) if m.direction == "in"]
    media_in = [m for m in await asyncio.to_thread(hardened.media.messages) if m.direction == "in"]
    desk_in = [m for m in await asyncio.to_thread(hardened.desk.messages) if m.direction == "in"]
    assert brief_in and media_in and desk_in
    for message in brief_in + media_in + desk_in:
        assert "forged" not in message.raw, message.raw
    # the agent got the caller's own X- header, and its controller's names only
    invite = next(m for m in brief_in if m.first_line.startswith("INVITE "))
    assert invite.header("X-Lang") == ["kept"] and invite.header("X-Callfabric-Agent") == ["brief"]
    # the desk sees exactly what callfabric set
    desk_invite = next(m for m in desk_in if m.first_line.startswith("INVITE "))
    assert desk_invite.header("X-Summary") == ["VIP +15551230000"], desk_invite.raw
    assert desk_invite.header("X-Vip") == ["yes"] and not desk_invite.header("X-Intent")
    assert not [k for k, _ in desk_invite.headers if k.lower().startswith("x-callfabric-")]
    # nothing the media nodes or the desk leaked came back to a caller
    got = [m for r in (to_agent, to_desk) for m in r.messages if m.direction == "in"] + \
          [m for m in map(_parse, replies)]
    for message in got:
        names = {k.lower() for k, _ in message.headers}
        assert not names & {"x-intent", "x-sentiment", "x-summary", "x-callfabric-agent"}, message.raw
    # the policy and the webhooks never saw the forged names
    for decide in hardened.decides:
        assert {h.lower() for h in decide["headers"]} <= {"x-lang", "subject", "user-agent"}, decide["headers"]


def _parse(raw: bytes):
    from controller.localstack.sipp import parse_sip
    return parse_sip(raw.decode(errors="replace"))
