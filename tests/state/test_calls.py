"""The call store on a real Redis: records, timeline, live indexes, counters, transitions."""
import asyncio
import json

import pytest

from controller.state.calls import (
    LIVE_INDEX, CallStore, CounterRequest, call_key, call_key_id, live_scope_key, now_ms, timeline_key,
)


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url, timeline_max_events=50, call_retention_s=3600, live_call_ttl_s=600)
    yield store
    await store.aclose()


def record(**extra):
    return {"state": "routing", "outcome": "agent", "rule": "r1", "policy_version": "abc123",
            "decision": {"outcome": "agent", "agent": {"name": "intake"}}, "created_at_ms": 1, **extra}


def pipelines_sent(store) -> list[list[str]]:
    """The command names of each pipeline `store` writes from now on, as they are written."""
    sent: list[list[str]] = []
    write = store.batch.connection.write

    def recording(protocol, commands):
        sent.append([c[0] for c in commands])
        return write(protocol, commands)
    store.batch.connection.write = recording
    return sent


async def test_create_writes_record_timeline_and_indexes(store):
    await store.create("c1@host", record(), live_scopes={"tenant": "acme"}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1, "rule": "r1"})
    got = await store.get("c1@host")
    assert got["state"] == "routing" and got["policy_version"] == "abc123"
    assert got["decision"] == {"outcome": "agent", "agent": {"name": "intake"}}  # JSON fields come back typed
    assert [e["event"] for e in await store.timeline("c1@host")] == ["decided"]
    assert await store.live_calls() == ["c1@host"]
    assert await store.redis.zcard(live_scope_key("tenant", "acme")) == 1
    ttl = await store.redis.ttl(call_key("c1@host"))
    assert 0 < ttl <= 600  # live safety expiry


async def test_text_of_digits_only_comes_back_as_the_same_text(store):
    """A UA's numeric from-tag (an int made edge forks fail: rtpengine matched no party), a
    national number's leading 0, a digits-only user agent or context header are text."""
    text = {"from_tag": "12345678", "caller": "1001", "dialled": "02079460000", "callee": "0800123456",
            "user_agent": "2024", "tx": "123", "tenant": "42"}
    await store.create("c9@host", record(**text), live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    await store.set_fields("c9@host", {"context_account": "000123"})
    for got in (await store.get("c9@host"), (await store.get_many(["c9@host"]))[0]):
        assert {k: got[k] for k in text} == text and got["context_account"] == "000123"
        assert got["created_at_ms"] == 1  # numbers written as numbers still come back as numbers


async def test_create_is_one_round_trip_and_keys_share_a_hash_tag(store):
    sent = pipelines_sent(store)
    counters = [CounterRequest("window:source:60", "window", "source", "1.2.3.4", 60)]
    await store.read_counters(counters, now_ms())
    await store.create("c2", record(), live_scopes={}, window_counters=counters, at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    # one read round trip, one write round trip (the first also loads the script) before the
    # answer; the window counters follow once Redis says this controller created the call
    assert len(sent) == 3 and sent[1].count("EVALSHA") == 1 and "INCR" not in sent[1]
    assert sent[2] == ["INCR", "EXPIRE"]
    tag = lambda k: k[k.index("{") + 1:k.index("}")]  # noqa: E731
    assert tag(call_key("c2")) == tag(timeline_key("c2")) == "c2"


async def test_concurrent_calls_share_pipelines(store):
    sent = pipelines_sent(store)
    await asyncio.gather(*(store.create(f"p{i}", record(), live_scopes={}, window_counters=[], at_ms=now_ms(),
                                        event={"event": "decided", "ts": 1}) for i in range(100)))
    assert sum(map(len, sent)) >= 300 and len(sent) <= 3  # 100 calls' commands in a couple of pipelines
    assert len(await store.live_calls(limit=1000)) == 100


async def test_redis_restart_loses_scripts_and_the_store_reloads_them(store):
    await store.create("s1", record(), live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    await store.redis.script_flush()
    await store.create("s2", record(), live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    assert (await store.get("s2"))["state"] == "routing"


async def test_rate_counters_count_calls_in_the_window(store):
    request = CounterRequest("window:source:60", "window", "source", "1.2.3.4", 60)
    at = 1_700_000_000_000 - (1_700_000_000_000 % 60000) + 30_000  # the middle of a window
    assert await store.read_counters([request], at) == {"window:source:60": 0}
    for i in range(5):
        await store.create(f"r{i}", record(), live_scopes={}, window_counters=[request], at_ms=at,
                           event={"event": "decided", "ts": at})
    assert await store.read_counters([request], at) == {"window:source:60": 5}
    # next window, 15 s in: the previous window's 5 calls weigh 45/60
    assert await store.read_counters([request], at + 45_000) == {"window:source:60": 3}
    other = CounterRequest("window:source:60", "window", "source", "5.6.7.8", 60)
    assert await store.read_counters([other], at) == {"window:source:60": 0}


async def test_live_counters(store):
    live = CounterRequest("live:tenant", "live", "tenant", "acme", 0)
    glob = CounterRequest("live:global", "live", "global", "*", 0)
    for i in range(3):
        await store.create(f"l{i}", record(), live_scopes={"tenant": "acme"}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 1})
    assert await store.read_counters([live, glob], now_ms()) == {"live:tenant": 3, "live:global": 3}
    await store.transition("l0", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 2})
    assert await store.read_counters([live, glob], now_ms()) == {"live:tenant": 2, "live:global": 2}


async def test_transitions_only_move_forward(store):
    await store.create("t1", record(), live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    assert (await store.transition("t1", "answered", {"answered_at_ms": 5}, {"event": "answered", "ts": 5})).applied
    # the same change written again (replayed after its reply was lost) is applied once
    replayed = await store.transition("t1", "answered", {"answered_at_ms": 6}, {"event": "answered", "ts": 6})
    assert not replayed.applied and replayed.previous == "answered"
    assert (await store.get("t1"))["answered_at_ms"] == 5
    result = await store.transition("t1", "ended", {"end_reason": "bye-callee"}, {"event": "ended", "ts": 9})
    assert result.applied and result.previous == "answered"
    late = await store.transition("t1", "answered", {}, {"event": "answered", "ts": 10})
    assert not late.applied and late.previous == "ended"
    again = await store.transition("t1", "failed", {}, {"event": "failed", "ts": 11})
    assert not again.applied
    got = await store.get("t1")
    assert got["state"] == "ended" and got["end_reason"] == "bye-callee"
    assert [e["event"] for e in await store.timeline("t1")] == ["decided", "answered", "ended"]
    assert await store.live_calls() == []
    assert 3000 < await store.redis.ttl(call_key("t1")) <= 3600  # retention after the end


async def test_a_call_first_seen_by_its_dialog_events_is_recorded(store):
    await store.transition("fb1", "answered", {"fallback": "timeout"}, {"event": "answered", "ts": 1})
    assert await store.live_calls() == ["fb1"]
    assert 0 < await store.redis.ttl(call_key("fb1")) <= 600
    await store.transition("fb1", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 2})
    got = await store.get("fb1")
    assert got["state"] == "ended" and got["fallback"] == "timeout" and await store.live_calls() == []


async def test_a_late_decision_does_not_overwrite_the_state_dialog_events_set(store):
    await store.transition("late", "failed", {"end_reason": "cancel"}, {"event": "failed", "ts": 1})
    await store.create("late", record(), live_scopes={}, window_counters=[], at_ms=now_ms() - 120_000,
                       event={"event": "decided", "ts": 2})
    got = await store.get("late")
    assert got["state"] == "failed" and got["rule"] == "r1"
    assert [e["event"] for e in await store.timeline("late")] == ["decided", "failed"]  # the decision first
    assert await store.live_calls() == []  # the call was over: the late decision leaves no live entry
    assert await store.reconcile_live(now_ms() - 60_000) == 0


async def test_timeline_is_capped(store):
    await store.create("cap", record(), live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    for i in range(300):
        await store.redis.xadd(timeline_key("cap"), {"event": "x", "ts": str(i), "data": json.dumps({"event": "x"})},
                               maxlen=store.timeline_max_events, approximate=True)
    assert await store.redis.xlen(timeline_key("cap")) < 200


@pytest.mark.parametrize("call_id", ["a" * 500, "x y\r\n", "{weird}", "é@host", ""],
                         ids=["long", "crlf", "braces", "non-ascii", "empty"])
def test_odd_call_ids_get_safe_key_ids(call_id):
    key_id = call_key_id(call_id)
    assert key_id.startswith("h-") and len(key_id) == 34 and "{" not in key_id


async def test_garbage_in_redis_does_not_break_reading(store):
    await store.redis.hset(call_key("g"), mapping={"state": "routing", "decision": "{not json", "n": "12"})
    await store.redis.xadd(timeline_key("g"), {"event": "x", "ts": "1", "data": "{broken"})
    await store.redis.hset(call_key("g"), "live_scopes", "[1,2")
    got = await store.get("g")
    assert got["decision"] == "{not json" and got["n"] == 12
    assert (await store.timeline("g"))[0]["unreadable"] == "{broken"
    assert (await store.transition("g", "ended", {}, {"event": "ended", "ts": 1})).applied  # bad live_scopes tolerated
    assert LIVE_INDEX


async def test_a_failing_pipeline_fails_its_callers_and_never_hangs_them(store):
    from redis.exceptions import RedisError
    with pytest.raises(RedisError, match="pipeline failed"):
        await asyncio.wait_for(store.batch.run([("SET", "k", object())]), 5)
    assert await store.batch.run([("SET", "k", "v")]) == [b"OK"]  # the connection is still usable


async def test_redis_going_away_is_an_error_not_a_hang(redis_url):
    from redis.exceptions import RedisError
    store = CallStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(RedisError):
        await asyncio.wait_for(store.read_counters([CounterRequest("live:global", "live", "global", "*")], now_ms()), 5)
    await store.aclose()


async def test_distinct_members_are_counted_once_per_window(store):
    at = 1_700_000_000_000 - 1_700_000_000_000 % 60_000  # the start of a 60 s bucket
    request = lambda member: CounterRequest("risk:enum", "distinct", "callees:source", "203.0.113.5", 60,  # noqa: E731
                                            member=member)
    for i, number in enumerate(["+1555000001", "+1555000002", "+1555000001", "+1555000003"]):
        await store.create(f"enum-{i}", record(), live_scopes={}, window_counters=[request(number)], at_ms=at + i,
                           event={"event": "decided", "ts": at})
    assert (await store.read_counters([request("")], at + 10)) == {"risk:enum": 3}
    # Half-way through the next bucket, half of the previous bucket's numbers still count.
    await store.create("enum-next", record(), live_scopes={}, window_counters=[request("+1555000009")],
                       at_ms=at + 60_000, event={"event": "decided", "ts": at})
    assert (await store.read_counters([request("")], at + 90_000)) == {"risk:enum": 1 + 3 // 2}


async def test_one_counter_read_twice_is_incremented_once(store):
    at = now_ms()
    policy_counter = CounterRequest("window:source:60", "window", "source", "203.0.113.5", 60)
    detector_counter = CounterRequest("risk:spike:window", "window", "source", "203.0.113.5", 60)
    not_counted = CounterRequest("risk:short", "window", "short:source", "203.0.113.5", 60, count=False)
    await store.create("dup-1", record(), live_scopes={}, window_counters=[policy_counter, detector_counter, not_counted],
                       at_ms=at, event={"event": "decided", "ts": at})
    values = await store.read_counters([policy_counter, detector_counter, not_counted], at)
    assert values == {"window:source:60": 1, "risk:spike:window": 1, "risk:short": 0}


async def test_a_transition_reports_the_calls_source_and_answer_time(store):
    await store.create("t-1", record(src="203.0.113.5:5060"), live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    answered = await store.transition("t-1", "answered", {"answered_at_ms": 1234}, {"event": "answered", "ts": 1234})
    assert answered.src == "203.0.113.5:5060" and answered.answered_at_ms is None  # read before this event's write
    ended = await store.transition("t-1", "ended", {"ended_at_ms": 2000}, {"event": "ended", "ts": 2000})
    assert ended.applied and ended.src == "203.0.113.5:5060" and ended.answered_at_ms == 1234


async def test_a_call_decided_by_two_controllers_is_recorded_and_counted_once(store):
    """Kamailio may relay a decide to every controller: each writes the call, only one counts."""
    at = now_ms()
    counter = CounterRequest("window:source:60", "window", "source", "198.51.100.7", 60)
    await asyncio.gather(*(store.create("twice", record(controller=name), live_scopes={"tenant": "acme"},
                                        window_counters=[counter], at_ms=at,
                                        event={"event": "decided", "ts": at, "controller": name})
                           for name in ("ctl-a", "ctl-b")))
    assert await store.read_counters([counter], at) == {"window:source:60": 1}
    timeline = await store.timeline("twice")
    assert [e["event"] for e in timeline] == ["decided"]
    assert (await store.get("twice"))["controller"] == timeline[0]["controller"]  # one writer, whole
    assert await store.live_calls() == ["twice"]
