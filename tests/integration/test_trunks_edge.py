"""Inbound trunks at the real edge: the controller writes the trunk table from the policy,
Kamailio checks every initial INVITE against it before any controller work — a source that is
no trunk gets 403 (no decision, no record), a digest trunk is challenged and then let in or
refused, wrong credentials count toward the brute-force detector until the source is banned,
and the trunk's name reaches the policy as a fact."""
from __future__ import annotations

import asyncio
import shutil

import pytest

from controller.app import BANS, METRICS, POLICIES
from controller.localstack.sip_ua import SipCaller
from tests.integration.test_security_edge import SecureStack, decided

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None or shutil.which("redis-server") is None,
    reason="kamailio, sipp and redis-server binaries are required")

PASSWORD = "s3cret:with\\odd chars"
POLICY = """\
settings:
  numbering: {country_code: "1", national_prefix: "1", international_prefix: "011"}
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
  carrier-agent: {node_set: media, endpoint: "127.0.0.1:4001"}
tenants:
  acme: {header: {name: X-Never, equals: never}}
trunks:
  by-address:
    inbound: {sources: ["127.0.0.21/32"], tenant: acme, numbers: {prefix: "+1800"}}
  by-digest:
    inbound: {sources: ["127.0.0.20/30"], digest: {username: carrier-b, password_env: CF_TEST_TRUNK_PW}}
security:
  detectors:
    - {name: brute-force, kind: asterisk_security, window: 60s, max: 3, score: 100}
  outcomes:
    ban: {at_least: 100, for: 10m}
rules:
  - name: carrier-calls
    match: {trunk: [by-address, by-digest]}
    actions: [route_agent: carrier-agent]
default:
  actions: [route_agent: intake]
"""


@pytest.fixture
async def trunk_stack(tmp_path, procs, redis_url, monkeypatch):
    monkeypatch.setenv("CF_TEST_TRUNK_PW", PASSWORD)
    await asyncio.to_thread((tmp_path / "roamer.pw").write_text, "roam-pw\n")
    trunks = tmp_path / "trunks"
    stack = await asyncio.to_thread(
        SecureStack, tmp_path, procs, redis_url, policy=POLICY,
        settings_kw={"edge_trunks_dir": str(trunks)}, trunks_dir=trunks)
    await stack.start()
    await edge_table_is_current(stack)
    yield stack
    await stack.stop()


def sum_samples(registry, name: str) -> float:
    """Every series of a counter added up (0 before the first)."""
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


async def edge_table_is_current(stack) -> None:
    """Wait until the edge holds the table the controller wrote for the policy it serves."""
    for _ in range(100):
        version = stack.app[POLICIES].policy.version
        held = await asyncio.to_thread(stack.kamailio.jsonrpc, "htable.get", ["cftrunk", "v"])
        if held["item"]["value"] == version:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the edge never loaded trunk table {version}: it holds {held}")


async def call(stack, source: str, to: str = "+18005550100", auth=None, **kw):
    caller = SipCaller(stack.kamailio.sip_port, source_ip=source, auth=auth, **kw)
    result = await caller.call(to, 0.3)
    return caller, result


async def test_unknown_source_gets_403_before_any_controller_work(trunk_stack, store):
    registry = trunk_stack.app[METRICS].registry
    decisions_before = sum_samples(registry, "callfabric_decisions_total")
    _, result = await call(trunk_stack, "127.0.0.30")
    assert (result.status, result.reason) == (403, "Forbidden")
    await asyncio.sleep(0.3)
    assert await store.timeline(result.call_id) == []  # no record, no decision
    assert sum_samples(registry, "callfabric_decisions_total") == decisions_before
    _, allowed = await call(trunk_stack, "127.0.0.21")  # (and decisions are counted here)
    assert allowed.status == 200 and sum_samples(registry, "callfabric_decisions_total") == decisions_before + 1
    assert await asyncio.to_thread(trunk_stack.kamailio.metric, "kamailio_callfabric_trunk_checks_total",
                                   'result="unknown-trunk"') == 1


async def test_trunk_by_address_is_a_policy_fact_with_its_tenant_and_numbers(trunk_stack, store):
    _, result = await call(trunk_stack, "127.0.0.21")
    assert result.status == 200
    event = await decided(store, result.call_id)
    record = await store.get(result.call_id)
    assert (event["rule"], record["trunk"], record["tenant"]) == ("carrier-calls", "by-address", "acme")
    _, other = await call(trunk_stack, "127.0.0.21", to="+12025550100")  # a number the trunk does not carry
    assert other.status == 404
    assert (await decided(store, other.call_id))["rule"] == "trunk"


async def test_digest_trunk_is_challenged_then_routed(trunk_stack, store):
    caller, result = await call(trunk_stack, "127.0.0.22", auth=("carrier-b", PASSWORD))
    assert caller.challenges == [407] and result.status == 200
    assert (await store.get(result.call_id))["trunk"] == "by-digest"
    # a trunk without sources (hot reload: the edge gets the new table) authenticates from anywhere,
    # so a source that is no trunk is now challenged instead of refused
    version = trunk_stack.app[POLICIES].policy.version
    roaming = POLICY.replace("security:", f"  roaming:\n    inbound: {{digest: {{username: roamer, "
                                          f"password_file: {trunk_stack.tmp / 'roamer.pw'}}}}}\nsecurity:")
    await asyncio.to_thread((trunk_stack.tmp / "policy" / "policy.yaml").write_text, roaming)
    for _ in range(100):
        if trunk_stack.app[POLICIES].policy.version != version:
            break
        await asyncio.sleep(0.1)
    await edge_table_is_current(trunk_stack)
    caller, result = await call(trunk_stack, "127.0.0.31")
    assert result.status == 407
    caller, result = await call(trunk_stack, "127.0.0.31", auth=("roamer", "roam-pw"))
    assert caller.challenges == [407] and result.status == 200
    assert (await store.get(result.call_id))["trunk"] == "roaming"
    # credentials of a trunk whose sources do not hold the caller are no use
    caller, result = await call(trunk_stack, "127.0.0.31", auth=("carrier-b", PASSWORD))
    assert result.status == 403


async def test_wrong_credentials_are_refused_and_count_toward_the_brute_force_ban(trunk_stack):
    source = "127.0.0.23"
    for attempt in range(3):
        caller, result = await call(trunk_stack, source, auth=("carrier-b", f"guess-{attempt}"))
        assert caller.challenges == [407] and (result.status, result.reason) == (403, "Forbidden")
    # the third failure reached the detector's max: the source is banned at the edge
    for _ in range(100):
        if source in str(await trunk_stack.blocklist()):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the brute-forcing source was never banned")
    ban = await trunk_stack.app[BANS].get(source)
    assert ban.origin == "edge" and "3 failed trunk authentications" in ban.reason
    assert trunk_stack.metric("callfabric_edge_auth_failures_total", reason="bad-password") == 3
    assert trunk_stack.metric("callfabric_bans_total", origin="edge", detector="brute-force") == 1
    _, result = await call(trunk_stack, source, auth=("carrier-b", PASSWORD))
    assert result.status == 403  # banned: even the right password is refused now
