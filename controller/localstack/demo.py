"""`callfabric demo`: the whole stack on this machine. Starts Redis, Kamailio (our
kamailio.cfg) and the controller on free loopback ports, SIPp stand-ins for the AI agents'
media nodes and a human desk, places calls that the demo policy routes, rejects and
decorates with headers, prints what happened, stops everything (also on Ctrl-C), and exits 0
only if every call did what the policy says. With an `asterisk` binary (PATH or
CALLFABRIC_ASTERISK) it also starts a real Asterisk media node with our config set and
places a voice call with real RTP: the AI agent (an echo) hears the caller and answers, and
a speech-to-text fork receives the caller's audio live."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from controller.localstack.asterisk import Asterisk, asterisk_binary
from controller.localstack.kamailio import CFG, REPO, Kamailio, free_port
from controller.localstack.redis import RedisServer
from controller.localstack.sipp import SippUAS, run_uac

DEMO_POLICY = """\
# The demo's routing policy (written to {policy_dir}).
settings:
  numbering: {{country_code: "1", national_prefix: "1", international_prefix: "011"}}
  timezone: America/New_York
node_sets:
  media: {{dispatcher_set: 1}}
  billing-nodes: {{dispatcher_set: 2}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:4000"}}
  billing: {{node_set: billing-nodes, endpoint: "127.0.0.1:4001", transport: audiosocket, codec: slin16}}
destinations:
  human-desk: {{uri: "sip:desk@{desk}"}}
number_lists:
  vip-callers: ["+12025550100"]
risk_lists:
  premium: ["+1900", "+1976"]
rules:
  - name: block-premium
    match: {{destination_risk: premium}}
    actions: [reject: {{code: 403, reason: Destination Blocked}}]
  - name: vip-to-human
    match: {{caller: {{in_list: vip-callers}}}}
    actions: [route_sip: human-desk, add_headers: {{X-VIP: "yes", X-Summary: "VIP ${{caller}} calling ${{ruri}}"}}]
  - name: billing-line
    match: {{ruri: "+18005550101"}}
    actions: [route_agent: billing, add_headers: {{X-Department: billing}}, max_duration: 30m]
default:
  actions: [route_agent: intake, fork: stt]
fork_targets:
  stt: {{endpoint: "127.0.0.1:{stt}"}}
"""
# Added when a real Asterisk runs: its node set, an agent with real RTP, the rule sending a
# number to it with a speech-to-text fork (the fork target is the same `stt`).
VOICE_POLICY = """\
node_sets:
  asterisk-nodes: {{dispatcher_set: 3}}
agents:
  voice-agent: {{node_set: asterisk-nodes, endpoint: "127.0.0.1:{agent}", transport: rtp, codec: ulaw}}
rules:
  - name: voice-line
    match: {{ruri: "+18005550199"}}
    actions: [route_agent: voice-agent, fork: stt]
"""


@dataclass
class DemoCall:
    title: str
    caller: str
    dialled: str
    expect_rule: str
    expect_outcome: str
    far_end: str | None  # which UAS must receive the INVITE ("media", "billing", "desk")
    expect_headers: dict[str, str] = field(default_factory=dict)
    expect_code: int | None = None


CALLS = [
    DemoCall("general call -> AI intake agent", "+12025550123", "18005550000", "default", "agent", "media",
             {"X-Callfabric-Agent": "intake"}),
    DemoCall("billing line -> billing agent, with a header", "2025550123", "18005550101", "billing-line", "agent",
             "billing", {"X-Callfabric-Agent": "billing", "X-Department": "billing"}),
    DemoCall("VIP caller -> human desk, with context headers", "2025550100", "18005550000", "vip-to-human", "sip",
             "desk", {"X-VIP": "yes", "X-Summary": "VIP +12025550100 calling +18005550000"}),
    DemoCall("premium-rate destination -> rejected", "+12025550123", "19005551234", "block-premium", "reject", None,
             expect_code=403),
]


def _say(text: str) -> None:
    print(text, flush=True)


def missing_binaries() -> list[str]:
    return [name for name in ("kamailio", "sipp", "redis-server") if shutil.which(name) is None
            and not Path(f"/usr/sbin/{name}").exists()]


def run_demo(keep: bool = False) -> int:
    missing = missing_binaries()
    if missing:
        print(f"callfabric demo needs {', '.join(missing)}: run `bash .ci/install-system-packages` "
              "(Debian: kamailio, kamailio-extra-modules, kamailio-json-modules, kamailio-utils-modules, "
              "sip-tester, redis-server)", file=sys.stderr)
        return 2
    if not CFG.exists():
        print(f"callfabric demo needs the Kamailio config at {CFG} (set CALLFABRIC_KAMAILIO_CFG)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-demo-"))
    logging.basicConfig(level=logging.WARNING, format="    controller: %(levelname)s %(message)s")
    started: list = []
    try:
        return asyncio.run(_demo(workdir, started))
    except KeyboardInterrupt:
        _say("\ninterrupted: stopping everything the demo started")
        return 130
    finally:
        for thing in reversed(started):
            try:
                thing.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"  could not stop {thing!r}: {exc}", file=sys.stderr)
        if keep:
            _say(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _start(started: list, thing):
    await asyncio.to_thread(thing.start)
    started.append(thing)
    return thing


async def _demo(workdir: Path, started: list) -> int:
    from aiohttp import web

    from controller.app import EDGES, METRICS, build_app
    from controller.config import Settings
    from controller.state.calls import CallStore

    binary = asterisk_binary()
    _say("callfabric demo: starting Redis, SIPp stand-ins, Kamailio" + (", Asterisk" if binary else "")
         + " and the controller on 127.0.0.1 …")
    if not binary:
        _say("  (no asterisk binary: the voice call with real RTP is skipped; set CALLFABRIC_ASTERISK to include it)")
    redis_server = await _start(started, RedisServer(workdir))
    far_ends = {name: await _start(started, SippUAS(workdir, "uas_answer.xml", name))
                for name in ("media", "billing", "desk")}
    # the desk's PBX is a trusted destination: it gets the call's context headers
    kamailio = Kamailio(workdir, {1: [far_ends["media"].addr], 2: [far_ends["billing"].addr]},
                        events_redis=redis_server.url, extra_defines={"TRUSTED_DEST_NET": '"127.0.0.1/32"'})
    asterisk = None
    if binary:
        asterisk = Asterisk(workdir, edge_port=kamailio.sip_port, binary=binary)
        kamailio.write_dispatcher_list({1: [far_ends["media"].addr], 2: [far_ends["billing"].addr],
                                        3: [f"127.0.0.1:{asterisk.sip_port}"]})
    await _start(started, kamailio)
    if asterisk is not None:
        _say("  starting Asterisk (a few seconds) …")
        await _start(started, asterisk)
    voice = await _VoiceEndpoints.open() if asterisk is not None else None
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    stt_port = voice.ports["stt"] if voice else free_port(socket.SOCK_DGRAM)
    (policy_dir / "demo.yaml").write_text(DEMO_POLICY.format(policy_dir=policy_dir, desk=far_ends["desk"].addr,
                                                             stt=stt_port))
    if voice:
        (policy_dir / "voice.yaml").write_text(VOICE_POLICY.format(agent=voice.ports["agent"]))
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_server.url, instance_id="demo",
                        edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                        edge_rpc=[f"http://127.0.0.1:{kamailio.http_port}/RPC"],
                        ari_nodes=[asterisk.ari_node()] if asterisk else [])
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", int(settings.http_listen.rsplit(":", 1)[1])).start()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in app[EDGES])), 10)
        if asterisk is not None:
            await _wait_ari(app)
        _say(f"  redis {redis_server.url} | kamailio sip udp:127.0.0.1:{kamailio.sip_port} | "
             + (f"asterisk sip udp:127.0.0.1:{asterisk.sip_port}, ari {asterisk.ari_url} | " if asterisk else "")
             + f"controller http {settings.http_listen} | policy {policy_dir}\n")
        store = CallStore(redis_server.url)
        ok, total = 0, len(CALLS)
        for number, call in enumerate(CALLS, 1):
            ok += await _place(number, call, workdir, kamailio, far_ends, store)
        if voice is not None:
            total += 1
            ok += await _voice_call(total, kamailio, voice, store)
            voice.close()
        await store.aclose()
        metrics = app[METRICS].exposition().decode()
        _say("metrics (excerpt of http://%s/metrics):" % settings.http_listen)
        for line in metrics.splitlines():
            if line.startswith(("callfabric_decisions_total", "callfabric_decision_duration_seconds_count",
                                "callfabric_decision_duration_seconds_sum", "callfabric_edge_connected")):
                _say(f"  {line}")
        verdict = "every call did what the policy says" if ok == total else f"{total - ok} call(s) went wrong"
        _say(f"\n{ok}/{total} calls OK: {verdict}")
        return 0 if ok == total else 1
    finally:
        await runner.cleanup()


async def _place(number: int, call: DemoCall, workdir: Path, kamailio: Kamailio, far_ends: dict[str, SippUAS],
                 store) -> bool:
    _say(f"[{number}] {call.title}: {call.caller} dials {call.dialled}")
    scenario = "uac_reject.xml" if call.expect_code else "uac_call.xml"
    result = await asyncio.to_thread(run_uac, workdir, kamailio.sip_port, scenario, service=call.dialled,
                                     from_user=call.caller, code=call.expect_code, hold_ms=300)
    problems = []
    call_ids = sorted({c for m in result.messages for c in m.header("Call-ID")})
    if result.successful != 1 or not call_ids:
        problems.append(f"SIPp caller did not complete (rc {result.rc}): {result.output[-300:]}")
        _report(problems)
        return False
    call_id = call_ids[0]
    statuses = [line for line in result.status_lines() if not line.startswith("SIP/2.0 1")]
    _say(f"    caller got: {statuses[0] if statuses else 'nothing'}")
    if call.far_end:
        invites = [m for m in await asyncio.to_thread(far_ends[call.far_end].invites) if call_id in m.header("Call-ID")]
        if not invites:
            problems.append(f"the {call.far_end} endpoint never received the INVITE")
        else:
            seen = {name: invites[0].header(name) for name in call.expect_headers}
            _say(f"    {call.far_end} received INVITE with " + ", ".join(f"{k}: {v[0] if v else '(none)'}" for k, v in seen.items()))
            for name, value in call.expect_headers.items():
                if seen[name] != [value]:
                    problems.append(f"header {name}: expected {value!r}, saw {seen[name]}")
    record = None
    final = "failed" if call.expect_code else "ended"
    for _ in range(100):
        record = await store.get(call_id)
        if record and record.get("state") == final:
            break
        await asyncio.sleep(0.05)
    if not record:
        problems.append("no call record in Redis")
    else:
        _say(f"    decision: rule {record.get('rule')} -> {record.get('outcome')} {record.get('target')} "
             f"(policy {record.get('policy_version')}); record state {record.get('state')}"
             f"{', ' + str(record.get('end_reason')) if record.get('end_reason') else ''}")
        if record.get("rule") != call.expect_rule or record.get("outcome") != call.expect_outcome:
            problems.append(f"expected rule {call.expect_rule} / {call.expect_outcome}")
        if record.get("state") != final:
            problems.append(f"expected the record to be {final}")
    _report(problems)
    return not problems


class _VoiceEndpoints:
    """The AI agent (an echo of the caller) and the speech-to-text fork target (counts
    packets), from examples/media_agent.py, on free UDP ports."""

    def __init__(self, agent, stt, transports, ports):
        self.agent, self.stt, self.transports, self.ports = agent, stt, transports, ports

    @classmethod
    async def open(cls) -> "_VoiceEndpoints":
        spec = importlib.util.spec_from_file_location("media_agent", REPO / "examples" / "media_agent.py")
        module = importlib.util.module_from_spec(spec)
        await asyncio.to_thread(spec.loader.exec_module, module)
        agent, stt = module.RtpAgent(echo=True), module.RtpAgent(echo=False)
        loop = asyncio.get_running_loop()
        transports, ports = [], {}
        for name, protocol in (("agent", agent), ("stt", stt)):
            port = free_port(socket.SOCK_DGRAM)
            transport, _ = await loop.create_datagram_endpoint(lambda p=protocol: p, local_addr=("127.0.0.1", port))
            transports.append(transport)
            ports[name] = port
        return cls(agent, stt, transports, ports)

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


async def _wait_ari(app) -> None:
    from controller.app import METRICS

    for _ in range(200):
        if app[METRICS].registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the controller could not connect to Asterisk's ARI")


async def _voice_call(number: int, kamailio: Kamailio, voice: _VoiceEndpoints, store) -> bool:
    from controller.localstack.sip_ua import SipCaller

    _say(f"[{number}] voice call through Asterisk -> AI voice agent (real RTP both ways) + speech-to-text fork: "
         "+15551230000 dials 18005550199, talks for 3 s")
    result = await SipCaller(kamailio.sip_port).call("18005550199", hold_s=3.0)
    problems = []
    _say(f"    caller got: {result.status} {result.reason}; sent {result.rtp_sent} RTP packets, "
         f"heard {result.rtp_received} back from the agent")
    _say(f"    agent heard {voice.agent.received} packets of the caller; the STT fork received {voice.stt.received}")
    if result.status != 200:
        problems.append("the call was not answered")
    if voice.agent.received < 100 or result.rtp_received < 100:
        problems.append("audio did not flow both ways (expected ≥ 100 packets each way in 3 s)")
    if voice.stt.received < 100:
        problems.append("the fork did not deliver the caller's audio")
    record = None
    for _ in range(100):
        record = await store.get(result.call_id)
        if record and record.get("state") == "ended" and isinstance(record.get("media"), dict):
            break
        await asyncio.sleep(0.05)
    media = record.get("media") if record else None
    if not isinstance(media, dict):
        problems.append("no media record in Redis")
    else:
        forks = media.get("forks") or {}
        agent = media.get("agent") if isinstance(media.get("agent"), dict) else {}
        _say(f"    media record: node {media.get('node')}, agent {agent.get('name')} (Asterisk sends its audio "
             f"from {agent.get('local_rtp')}), "
             f"{len(forks)} fork(s) {[f.get('target') for f in forks.values() if isinstance(f, dict)]}")
    timeline = [e.get("event") for e in await store.timeline(result.call_id)]
    _say(f"    timeline: {' → '.join(str(e) for e in timeline)}")
    _report(problems)
    return not problems


def _report(problems: list[str]) -> None:
    _say("    OK" if not problems else "    FAILED: " + "; ".join(problems))
