"""`callfabric demo`: the whole edge slice on this machine. Starts Redis, Kamailio (our
kamailio.cfg) and the controller on free loopback ports, SIPp stand-ins for the AI agents'
media nodes and a human desk, places calls that the demo policy routes, rejects and
decorates with headers, prints what happened, stops everything, and exits 0 only if every
call did what the policy says."""
from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from controller.localstack.kamailio import CFG, Kamailio, free_port
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
  stt: {{endpoint: "127.0.0.1:9100"}}
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

    _say("callfabric demo: starting Redis, SIPp stand-ins, Kamailio and the controller on 127.0.0.1 …")
    redis_server = await _start(started, RedisServer(workdir))
    far_ends = {name: await _start(started, SippUAS(workdir, "uas_answer.xml", name))
                for name in ("media", "billing", "desk")}
    kamailio = await _start(started, Kamailio(workdir, {1: [far_ends["media"].addr], 2: [far_ends["billing"].addr]}))
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "demo.yaml").write_text(DEMO_POLICY.format(policy_dir=policy_dir, desk=far_ends["desk"].addr))
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_server.url, instance_id="demo",
                        edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], http_listen=f"127.0.0.1:{free_port()}")
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", int(settings.http_listen.rsplit(":", 1)[1])).start()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in app[EDGES])), 10)
        _say(f"  redis {redis_server.url} | kamailio sip udp:127.0.0.1:{kamailio.sip_port} | "
             f"controller http {settings.http_listen} | policy {policy_dir / 'demo.yaml'}\n")
        store = CallStore(redis_server.url)
        ok = 0
        for number, call in enumerate(CALLS, 1):
            ok += await _place(number, call, workdir, kamailio, far_ends, store)
        await store.aclose()
        metrics = app[METRICS].exposition().decode()
        _say("metrics (excerpt of http://%s/metrics):" % settings.http_listen)
        for line in metrics.splitlines():
            if line.startswith(("callfabric_decisions_total", "callfabric_decision_duration_seconds_count",
                                "callfabric_decision_duration_seconds_sum", "callfabric_edge_connected")):
                _say(f"  {line}")
        verdict = "every call did what the policy says" if ok == len(CALLS) else f"{len(CALLS) - ok} call(s) went wrong"
        _say(f"\n{ok}/{len(CALLS)} calls OK: {verdict}")
        return 0 if ok == len(CALLS) else 1
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


def _report(problems: list[str]) -> None:
    _say("    OK" if not problems else "    FAILED: " + "; ".join(problems))
