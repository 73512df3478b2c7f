"""The security guard on a real Redis: Asterisk security events and short calls counted
where the detectors read them, bans recorded with their reason, expiry and origin."""
from __future__ import annotations

import asyncio

import pytest

from controller.edge.verdict import call_counters
from controller.media.ami import SecurityEvent
from controller.metrics import Metrics
from controller.policy import Call, policy_from_texts
from controller.security.bans import BanList
from controller.security.guard import SecurityGuard
from controller.state.calls import CallStore, Transition, now_ms
from tests.policy.helpers import DECLARATIONS

SECURITY = """\
security:
  detectors:
    - {name: asterisk-auth, kind: asterisk_security, window: 60s, max: 3, score: 100}
    - {name: short-calls, kind: short_calls, shorter_than: 2s, window: 60s, max: 2, score: 50}
  outcomes:
    reject: {at_least: 50}
    ban: {at_least: 100, for: 5m}
"""

POLICY = policy_from_texts({"p.yaml": DECLARATIONS, "s.yaml": SECURITY})  # (loading reads schema files: not on the loop)


@pytest.fixture
async def guarded(redis_url):
    store = CallStore(redis_url)
    metrics = Metrics()
    policy = POLICY
    bans = BanList(store.batch, metrics, edges=[])
    guard = SecurityGuard(store, bans, metrics, lambda: policy, "test")
    yield guard, policy
    await guard.close()
    await store.aclose()


def event(ip: str, name: str = "InvalidAccountID") -> SecurityEvent:
    return SecurityEvent("media1", name, "PJSIP", "1001", ip, "5060")


async def test_repeated_asterisk_security_events_ban_the_address(guarded):
    guard, _ = guarded
    for _ in range(2):
        guard.asterisk_event(event("203.0.113.66"))
    await guard.close()  # let the background work finish
    assert await guard.bans.get("203.0.113.66") is None
    guard.asterisk_event(event("203.0.113.66", "ChallengeResponseFailed"))
    await guard.close()
    ban = await guard.bans.get("203.0.113.66")
    assert ban is not None and ban.origin == "asterisk" and ban.detector == "asterisk-auth"
    assert "3 Asterisk security events (ChallengeResponseFailed on media1) in 60s" in ban.reason
    assert 299_000 <= ban.expires_ms - ban.created_ms <= 300_000
    assert guard.metrics.registry.get_sample_value("callfabric_bans_total",
                                                   {"origin": "asterisk", "detector": "asterisk-auth"}) == 1
    (listed,) = await guard.bans.active(now_ms())
    assert listed.ip == "203.0.113.66"


async def test_events_without_a_usable_address_are_ignored(guarded):
    guard, _ = guarded
    for garbage in ("", "not-an-ip", "999.0.0.1", "1.2.3.4; DROP"):
        guard.asterisk_event(event(garbage))
    await guard.close()
    assert await guard.bans.active(now_ms()) == []


async def test_short_calls_are_counted_for_their_source_and_then_scored(guarded):
    guard, policy = guarded
    at = now_ms()
    await guard.call_ended(Transition("answered", True, "198.51.100.4:5060", at - 500), at)      # short
    await guard.call_ended(Transition("answered", True, "198.51.100.4:5060", at - 60_000), at)   # long
    await guard.call_ended(Transition("routing", True, "198.51.100.4:5060", None), at)          # never answered
    facts = policy.compiled.facts(Call(call_id="x", from_user="1", to_user="2", src_ip="198.51.100.4"))
    requests = call_counters(policy, facts)
    counters = await guard.store.read_counters(requests, at)
    assert counters["risk:short-calls"] == 1
    await guard.call_ended(Transition("answered", True, "198.51.100.4:5060", at - 1500), at)
    facts.counters = await guard.store.read_counters(requests, at)
    decision = policy.compiled.decide_facts(facts)
    assert decision.risk.outcome == "reject" and decision.risk.findings[0].detector == "short-calls"


async def test_a_ban_is_never_shortened_and_can_be_lifted(guarded):
    guard, _ = guarded
    bans = guard.bans
    long = await bans.add("2001:db8::7", 3600, "fraud", origin="api", detector="manual", now_ms=now_ms())
    assert long.ip == "2001:db8::7"
    short = await bans.add("2001:0db8:0::7", 60, "again", origin="policy", detector="x", now_ms=now_ms())
    assert short.expires_ms == long.expires_ms and short.reason == "fraud"  # same address, the longer ban stays
    assert await bans.remove("2001:db8::7") is True
    assert await bans.get("2001:db8::7") is None and await bans.remove("2001:db8::7") is False
    with pytest.raises(ValueError, match="is not an IP address"):
        await bans.add("example.com", 60, "x", origin="api", detector="manual", now_ms=now_ms())


async def test_damaged_ban_entries_are_skipped(guarded):
    guard, _ = guarded
    await guard.store.batch.run([("HSET", "cf:ban:{192.0.2.1}", "ip", "192.0.2.1", "expires_ms", "soon"),
                                 ("ZADD", "cf:bans", now_ms() + 60_000, "192.0.2.1")])
    assert await guard.bans.active(now_ms()) == []
    await asyncio.sleep(0)


async def test_a_ban_the_edge_made_is_recorded_with_its_reason(guarded, redis_url):
    from controller.edge.decisions import EdgeDecisions
    from controller.edge.recorder import EdgeRecorder
    from controller.state.journal import Journal

    guard, policy = guarded
    decisions = EdgeDecisions(lambda: policy, guard.store, guard.metrics, "test", security=guard)
    recorder = EdgeRecorder(decisions, Journal(guard.store), guard.metrics, security=guard)
    event = {"event": "ban", "ip": "198.51.100.99", "reason": "scanner", "seconds": 120,
             "detail": "User-Agent friendly-scanner", "ts": now_ms()}
    await recorder.apply([event], source="test")
    await recorder.apply([dict(event)], source="test")  # delivered again: the same ban, counted once
    assert guard.metrics.registry.get_sample_value("callfabric_bans_total",
                                                   {"origin": "edge", "detector": "scanner"}) == 1
    ban = await guard.bans.get("198.51.100.99")
    assert ban.origin == "edge" and ban.detector == "scanner" and "friendly-scanner" in ban.reason
    assert 119_000 <= ban.expires_ms - ban.created_ms <= 120_000
    for garbage in ({"event": "ban"}, {"event": "ban", "ip": "1.2.3.4", "reason": "x; DROP", "seconds": 5},
                    {"event": "ban", "ip": "1.2.3.4", "reason": "flood", "seconds": "5"},
                    {"event": "ban", "ip": "::g", "reason": "flood", "seconds": 5}):
        await recorder.apply([garbage], source="test")
    assert guard.metrics.registry.get_sample_value("callfabric_decision_errors_total",
                                                   {"reason": "bad-ban-event"}) == 4
    assert [b.ip for b in await guard.bans.active(now_ms())] == ["198.51.100.99"]
