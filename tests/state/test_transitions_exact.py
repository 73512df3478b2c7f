"""A call's record through its transitions, exactly (real Redis): what each writes, which
indexes it leaves, how long the record is kept, and what a transition says back."""
from __future__ import annotations

import pytest

from controller.state.calls import LIVE_INDEX, CallStore, Transition, call_key, live_scope_key, now_ms, timeline_key


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url, call_retention_s=3600, live_call_ttl_s=600)
    yield store
    await store.aclose()


async def create(store, call_id, **scopes):
    await store.create(call_id, {"state": "routing", "src": "192.0.2.1:5060"}, live_scopes=scopes,
                       window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})


async def ttl_s(store, call_id) -> float:
    (ms,) = await store.batch.run([("PTTL", call_key(call_id))])
    return ms / 1000


async def test_answered_then_ended_with_fields_events_indexes_and_retention(store):
    await create(store, "t1", tenant="acme")
    answered = await store.transition("t1", "answered", {"answered_at_ms": 1234, "gone": None},
                                      {"event": "answered", "ts": 2})
    assert answered == Transition("routing", True, "192.0.2.1:5060", None)  # when it was answered before: never
    record = await store.get("t1")
    assert record["state"] == "answered" and record["call_id"] == "t1" and "gone" not in record
    assert 590 < await ttl_s(store, "t1") <= 600  # live: the live TTL, not the retention
    ended = await store.transition("t1", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 3})
    assert (ended.previous, ended.applied, ended.answered_at_ms) == ("answered", True, 1234)
    assert 3590 < await ttl_s(store, "t1") <= 3600  # over: kept for the retention
    timeline = await store.timeline("t1")
    assert [e["event"] for e in timeline] == ["decided", "answered", "ended"]
    assert all(e["call_id"] == "t1" for e in timeline[1:])
    assert await store.batch.run([("ZSCORE", LIVE_INDEX, "t1"), ("ZSCORE", live_scope_key("tenant", "acme"), "t1")]) \
        == [None, None]


async def test_a_call_created_by_another_store_leaves_its_scope_indexes_too(store, redis_url):
    other = CallStore(redis_url)
    try:
        await create(other, "t2", tenant="acme")
    finally:
        await other.aclose()
    await store.transition("t2", "failed", {"end_code": 486}, {"event": "failed", "ts": 2})
    assert await store.batch.run([("ZSCORE", live_scope_key("tenant", "acme"), "t2")]) == [None]


async def test_a_transition_after_the_end_is_not_applied(store):
    await create(store, "t3")
    await store.transition("t3", "ended", {}, {"event": "ended", "ts": 2})
    late = await store.transition("t3", "answered", {}, {"event": "answered", "ts": 3})
    assert (late.previous, late.applied) == ("ended", False)
    assert (await store.get("t3"))["state"] == "ended"


async def test_a_call_first_seen_by_a_transition_is_created_live(store):
    seen = await store.transition("t4", "answered", {}, {"event": "answered", "ts": 2})
    assert (seen.previous, seen.applied, seen.src, seen.answered_at_ms) == ("", True, "", None)
    assert (await store.batch.run([("ZSCORE", LIVE_INDEX, "t4")]))[0] is not None
    assert [e["event"] for e in await store.timeline("t4")] == ["answered"]


async def test_an_unknown_state_is_refused_with_its_name(store):
    with pytest.raises(ValueError, match="unknown call state 'exploded'"):
        await store.transition("t5", "exploded", {}, {"event": "x", "ts": 1})
    assert await store.batch.run([("EXISTS", call_key("t5")), ("EXISTS", timeline_key("t5"))]) == [0, 0]


async def test_with_redis_gone_a_transition_is_queued_and_says_so():
    store = CallStore("redis://127.0.0.1:1/0", timeout_s=0.3)
    try:
        result = await store.transition("t6", "ended", {}, {"event": "ended", "ts": 1})
        assert result == Transition("", False, queued=True)
    finally:
        await store.aclose()


async def test_reconciling_drops_live_entries_of_calls_over_or_gone_and_keeps_the_live_ones(store):
    from controller.state.calls import LIVE_INDEX
    for call_id in ("live", "over", "gone"):
        await create(store, call_id, tenant="acme")
    await store.transition("over", "ended", {}, {"event": "ended", "ts": 2})
    await store.batch.run([("ZADD", LIVE_INDEX, 1, "over"), ("DEL", call_key("gone"))])  # an end missed, an expiry
    assert await store.reconcile_live(now_ms() + 1000) == 2
    (left,) = await store.batch.run([("ZRANGE", LIVE_INDEX, 0, -1)])
    assert [c.decode() for c in left] == ["live"]
    assert await store.reconcile_live(now_ms() + 1000) == 0
    assert await store.reconcile_live(0) == 0  # nothing live for that long


def test_command_keys_share_the_calls_hash_tag_and_take_any_key_text():
    from controller.state.calls import call_key_id, command_key
    key = command_key("c@x", "idem-1")
    assert key.startswith(f"cf:{{{call_key_id('c@x')}}}:command:") and len(key.rsplit(":", 1)[1]) == 32
    assert command_key("c@x", "idem-1") == key != command_key("c@x", "idem-2")
    assert command_key("c@x", "\ud800 lone surrogate").rsplit(":", 1)[1]  # never an encoding error
