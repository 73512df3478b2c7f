"""Toll-fraud scenarios through the real stack: SIPp callers on several loopback "sources"
(127.0.0.x) → real Kamailio → the controller's risk scoring (policy `security`) → bans pushed
to Kamailio's blocklist over JSON-RPC. Each scenario is stopped by the right detector, the
call's timeline says why, and a legitimate source keeps getting through."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from controller.app import BANS, EDGES, METRICS, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.sipp import run_uac
from controller.state.calls import CallStore
from tests.support.kamailio import wait_clients
from tests.support.metrics import sample, sample_or_zero

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None or shutil.which("redis-server") is None,
    reason="kamailio, sipp and redis-server binaries are required")

LEGIT = "127.0.0.10"
POLICY = """\
settings:
  numbering: {country_code: "1", national_prefix: "1", international_prefix: "011"}
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
  screening: {node_set: media, endpoint: "127.0.0.1:4001"}
risk_lists:
  premium: ["+1900"]
tenants:
  acme: {trunks: ["127.0.0.6/32"]}
security:
  exempt: {source_ip: "127.0.0.9/32"}
  detectors:
    - {name: premium-destination, kind: match, when: {destination_risk: premium}, score: 40}
    - {name: premium-burst, kind: destination_rate, lists: [premium], window: 10m, max: 2, score: 100}
    - {name: short-call-burst, kind: short_calls, shorter_than: 3s, window: 60s, max: 4, score: 100}
    - {name: enumeration, kind: distinct_callees, window: 60s, max: 6, score: 100}
    - {name: tenant-spike, kind: rate_spike, scope: tenant, window: 60s, baseline: 1h, factor: 5, min_calls: 5,
       score: 70}
  outcomes:
    challenge: {at_least: 40, actions: [route_agent: screening]}
    reject: {at_least: 70, code: 403, reason: Fraud Suspected}
    ban: {at_least: 100, for: 10m}
default:
  actions: [route_agent: intake]
"""


class SecureStack:
    """Kamailio + a SIPp media node + the controller app (in this process) with bans pushed
    to the edge over JSON-RPC."""

    def __init__(self, tmp_path, procs, redis_url: str, *, policy: str = POLICY, media_scenario: str = "uas_answer.xml",
                 instance_id: str = "secure-controller", settings_kw: dict | None = None, **kamailio_kw):
        self.tmp = tmp_path
        self.media = procs.uas(media_scenario, "media")
        self.kamailio = procs.kamailio({1: [self.media.addr]}, **kamailio_kw)
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "policy.yaml").write_text(policy)
        self.settings = Settings(policy_dir=str(policy_dir), policy_poll_s=0.5, redis_url=redis_url,
                                 edge_evapi=[f"127.0.0.1:{self.kamailio.evapi_port}"],
                                 edge_rpc=[f"http://127.0.0.1:{self.kamailio.http_port}/RPC"],
                                 http_listen=f"127.0.0.1:{free_port()}", instance_id=instance_id,
                                 **(settings_kw or {}))
        self.app = build_app(self.settings)
        self.runner = None

    async def start(self) -> "SecureStack":
        from aiohttp import web
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in self.app[EDGES])), 10)
        await asyncio.to_thread(wait_clients, self.kamailio, 1)
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def call(self, service: str, source: str, scenario: str = "uac_call.xml", **kw):
        return await asyncio.to_thread(run_uac, self.tmp, self.kamailio.sip_port, scenario, service=service,
                                       source_ip=source, **kw)

    def metric(self, name: str, **labels) -> float:
        """One sample of this controller's metrics; a missing one fails the test."""
        return sample(self.app[METRICS].registry, name, **labels)

    async def blocklist(self) -> dict:
        return await asyncio.to_thread(self.kamailio.jsonrpc, "htable.dump", ["blocklist"])


@pytest.fixture
def secure_stack(tmp_path, procs, redis_url):
    return SecureStack(tmp_path, procs, redis_url)  # processes are started here, off the event loop


async def clear_of_window_edges(needed_s: float = 15.0) -> None:
    """Detectors count with two fixed buckets per window (a sliding estimate that under-counts
    just after a bucket edge); the scenarios need a few seconds in one bucket to be exact. All
    windows here are whole minutes, so their edges fall on minute edges."""
    left = 60 - time.time() % 60
    if left < needed_s:
        await asyncio.sleep(left + 0.2)


@pytest.fixture
async def secure(secure_stack):
    await clear_of_window_edges()
    yield await secure_stack.start()
    await secure_stack.stop()


def statuses(result) -> list[int]:
    return [int(line.split()[1]) for line in result.status_lines() if line.split()[1] != "100"]


def call_ids(result) -> list[str]:
    """Call-IDs in the order the calls were placed."""
    seen: list[str] = []
    for message in result.messages:
        for cid in message.header("Call-ID"):
            if cid not in seen:
                seen.append(cid)
    return seen


async def decided(store: CallStore, call_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await store.timeline(call_id)
        found = [e for e in events if e.get("event") == "decided"]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"call {call_id} was never decided")


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s")


async def legit_call_succeeds(secure: SecureStack) -> None:
    result = await secure.call("18005550100", LEGIT)
    assert result.rc == 0 and result.successful == 1, result.output


async def test_a_premium_burst_is_challenged_then_banned_at_the_edge(secure, store):
    source = "127.0.0.2"
    first = await secure.call("19005550001", source)  # a premium destination: challenged (screening agent)
    assert first.successful == 1, first.output
    event = await decided(store, call_ids(first)[0])
    assert event["rule"] == "security" and event["target"] == "screening"
    assert event["risk"]["outcome"] == "challenge"
    assert [f["detector"] for f in event["risk"]["findings"]] == ["premium-destination"]

    burst = await secure.call("19005550002", source, scenario="uac_reject.xml", code=403, calls=2, rate=5)
    ids = call_ids(burst)
    assert ids, burst.output
    third = await decided(store, ids[-1])
    assert third["outcome"] == "reject" and third["rule"] == "security"
    assert third["risk"]["outcome"] == "ban"
    why = {f["detector"]: f["why"] for f in third["risk"]["findings"]}
    assert "premium-burst" in why and "prefix +1900" in why["premium-burst"], why

    ban = await wait_for(lambda: secure.app[BANS].get(source), what="the ban recorded")
    assert ban.origin == "policy" and ban.detector == "premium-burst" and ban.call_id == ids[-1]
    assert "premium-burst" in ban.reason
    dump = await secure.blocklist()
    assert source in str(dump), dump

    # Now the edge refuses the source without asking the controller; a legitimate source
    # still gets through.
    decisions_before = sample_or_zero(secure.app[METRICS].registry, "callfabric_decisions_total", outcome="agent",
                                      rule="default")
    refused = await secure.call("18005550123", source, scenario="uac_reject.xml", code=403)
    assert refused.successful == 1 and 403 in statuses(refused), refused.output
    assert await store.get(call_ids(refused)[0]) is None  # never reached the controller
    await legit_call_succeeds(secure)
    assert secure.metric("callfabric_decisions_total", outcome="agent", rule="default") == decisions_before + 1
    assert secure.metric("callfabric_bans_total", origin="policy", detector="premium-burst") == 1
    assert secure.metric("callfabric_risk_outcomes_total", outcome="ban") >= 1


async def test_a_burst_of_very_short_calls_bans_its_source(secure, store):
    source = "127.0.0.4"
    short = await secure.call("18005550150", source, calls=4, rate=10, hold_ms=100)
    assert short.successful == 4, short.output
    # Their ends are counted when the dialogs end (after the decision): wait for them.
    for call_id in call_ids(short):
        await wait_for(lambda c=call_id: _ended(store, c), what=f"{call_id} ended")
    nxt = await secure.call("18005550151", source, scenario="uac_reject.xml", code=403)
    event = await decided(store, call_ids(nxt)[0])
    assert event["risk"]["outcome"] == "ban", event
    (finding,) = event["risk"]["findings"]
    assert finding["detector"] == "short-call-burst" and "shorter than 3s" in finding["why"]
    await legit_call_succeeds(secure)


async def _ended(store: CallStore, call_id: str) -> bool:
    record = await store.get(call_id)
    return bool(record and record.get("state") == "ended")


async def test_enumeration_of_numbers_from_one_source_is_banned(secure, store):
    source = "127.0.0.5"
    sweep = await secure.call("1800555020", source, scenario="uac_call.xml", calls=6, rate=20, hold_ms=3200,
                              number_per_call=True)
    assert sweep.successful == 6, sweep.output
    nxt = await secure.call("18005550299", source, scenario="uac_reject.xml", code=403)
    event = await decided(store, call_ids(nxt)[0])
    assert event["risk"]["outcome"] == "ban"
    assert [f["detector"] for f in event["risk"]["findings"]] == ["enumeration"]
    assert "7 distinct numbers" in event["risk"]["findings"][0]["why"]


async def test_a_tenant_call_spike_is_rejected_without_a_ban(secure, store):
    tenant_trunk = "127.0.0.6"
    normal = await secure.call("18005550300", tenant_trunk, calls=4, rate=20, hold_ms=3200)  # not short calls
    assert normal.successful == 4, normal.output
    spike = await secure.call("18005550301", tenant_trunk, scenario="uac_reject.xml", code=403, calls=2, rate=20)
    assert spike.successful == 2, spike.output
    event = await decided(store, call_ids(spike)[-1])
    assert event["risk"]["outcome"] == "reject" and event["outcome"] == "reject"
    assert "tenant acme" in event["risk"]["findings"][0]["why"]
    assert await secure.app[BANS].get(tenant_trunk) is None  # reject, not ban: the trunk is not cut off
    await legit_call_succeeds(secure)


async def test_exempt_sources_are_never_scored(secure, store):
    trusted = "127.0.0.9"
    result = await secure.call("19005550009", trusted, calls=4, rate=20, hold_ms=0)
    assert result.successful == 4, result.output
    event = await decided(store, call_ids(result)[-1])
    assert event["rule"] == "default" and "risk" not in event


async def test_operators_ban_and_lift_through_the_api_and_the_edge_follows(secure, store):
    bans = secure.app[BANS]
    source = "127.0.0.7"
    await bans.add(source, 60, "scanner seen in the logs", origin="api", detector="manual", now_ms=int(time.time() * 1000))
    refused = await secure.call("18005550400", source, scenario="uac_reject.xml", code=403)
    assert 403 in statuses(refused), refused.output
    assert await bans.remove(source) is True
    assert source not in str(await secure.blocklist())
    ok = await secure.call("18005550401", source)
    assert ok.successful == 1, ok.output


async def test_a_restarted_edge_gets_the_bans_back(secure, store):
    bans = secure.app[BANS]
    source = "127.0.0.8"
    await bans.add(source, 600, "toll fraud", origin="api", detector="manual", now_ms=int(time.time() * 1000))
    await asyncio.to_thread(secure.kamailio.jsonrpc, "htable.flush", ["blocklist"])  # as after a restart
    assert source not in str(await secure.blocklist())
    assert await bans.resync(int(time.time() * 1000)) >= 1
    assert source in str(await secure.blocklist())
