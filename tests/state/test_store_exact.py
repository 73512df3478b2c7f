"""The call store, exactly (real Redis): what a decision writes for a rejected call and for its
counters, what each timeline entry carries, who hears of a write, how many round trips an end
costs, which writes wait for company in a pipeline, what reconciliation trims, and what happens
to a decision while older changes of its call are held or Redis stops answering. Each store is
built per test: the mutation bench runs only the tests during which a mutated function ran."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from controller.localstack.redis import RedisServer
from controller.state.calls import (LIVE_INDEX, RECENT_INDEX, RECENT_KEEP, CallStore, CounterRequest, call_key,
                                    call_key_id, distinct_key, live_scope_key, now_ms, timeline_key, window_key)
from controller.state.outage import QueueFull
from tests.state.test_calls import pipelines_sent

RETENTION_S, LIVE_TTL_S, WINDOW_S = 3600, 600, 60
AT = 29_000_000 * WINDOW_S * 1000  # the start of a minute bucket
BUCKET = AT // (WINDOW_S * 1000)


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url, call_retention_s=RETENTION_S, live_call_ttl_s=LIVE_TTL_S)
    yield store
    await store.aclose()


def window(value: str, count: bool = True) -> CounterRequest:
    return CounterRequest(f"w:{value}", "window", "source", value, WINDOW_S, count)


def distinct(value: str, member: str) -> CounterRequest:
    return CounterRequest(f"d:{value}", "distinct", "callees:source", value, WINDOW_S, True, member)


async def create(store, call_id, state="routing", scopes=None, counters=(), at_ms=AT, **record):
    await asyncio.wait_for(store.create(call_id, {"state": state, "rule": "r1", **record}, live_scopes=scopes or {},
                                        window_counters=list(counters), at_ms=at_ms,
                                        event={"event": "decided", "ts": 1}), 10)  # a create never hangs


async def pttl_ms(store, key) -> int:
    (ms,) = await store.batch.run([("PTTL", key)])
    return ms


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# -- a decision: record, indexes, counters --------------------------------------------------------
async def test_a_rejected_call_is_kept_for_the_retention_never_live_and_still_counted(store):
    await create(store, "rej", state="failed", scopes={"tenant": "acme"}, counters=[window("192.0.2.1")])
    assert (await store.get("rej"))["state"] == "failed"
    assert await store.batch.run([("ZSCORE", LIVE_INDEX, "rej"), ("ZSCORE", live_scope_key("tenant", "acme"), "rej")]) \
        == [None, None]
    assert (RETENTION_S - 10) * 1000 < await pttl_ms(store, call_key("rej")) <= RETENTION_S * 1000
    assert "rej" not in store._live_scopes  # nothing to take out of live indexes later
    # a rejected flood is what rate limits are for: it counts
    assert await store.read_counter_values([window("192.0.2.1")], AT) == [1]


async def test_a_decision_counts_every_counter_it_adds_to_and_each_bucket_expires_after_two_windows(store):
    counters = [window("192.0.2.9", count=False),  # read only: not counted, and the others still are
                distinct("192.0.2.1", "+15550001"), window("192.0.2.1"), window("192.0.2.2")]
    await create(store, "cnt", scopes={"tenant": "acme"}, counters=counters)
    assert (await store.get("cnt"))["rule"] == "r1"  # the record itself is written with the counters
    assert await store.read_counter_values(counters, AT) == [0, 1, 1, 1]
    for key in (window_key("source", "192.0.2.1", WINDOW_S, BUCKET), window_key("source", "192.0.2.2", WINDOW_S, BUCKET),
                distinct_key("callees:source", "192.0.2.1", WINDOW_S, BUCKET)):
        assert (2 * WINDOW_S) * 1000 < await pttl_ms(store, key) <= (2 * WINDOW_S + 1) * 1000, key
    assert (LIVE_TTL_S - 10) * 1000 < await pttl_ms(store, live_scope_key("tenant", "acme")) <= LIVE_TTL_S * 1000


async def test_a_record_without_its_creation_time_gets_the_decisions_and_is_stored_compact(store):
    await create(store, "new", scopes={"tenant": "acme"}, at_ms=AT + 5, targets=["sip:a@x", "sip:b@x"],
                 context_account="2024")
    got = await store.get("new")
    assert got["created_at_ms"] == AT + 5
    assert got["targets"] == ["sip:a@x", "sip:b@x"]  # a JSON list comes back as a list
    assert got["context_account"] == "2024"  # a context header's digits stay text
    raw = await store.redis.hmget(call_key("new"), "live_scopes", "targets")
    assert raw == [b'{"tenant":"acme"}', b'["sip:a@x","sip:b@x"]']  # compact, as the edges' Lua applier writes


async def test_unreadable_bytes_in_a_record_or_timeline_are_read_with_replacement_characters(store):
    await store.redis.hset(call_key("bin"), mapping={"state": "routing", "user_agent": b"UA\xff\xfe"})
    await store.redis.xadd(timeline_key("bin"), {"event": b"x\xff", "ts": "1", "data": b'{"event":"x\xff"}'})
    assert (await store.get("bin"))["user_agent"] == "UA\ufffd\ufffd"
    assert (await store.get_many(["bin"]))[0]["user_agent"] == "UA\ufffd\ufffd"
    assert (await store.timeline("bin"))[0]["event"] == "x\ufffd"


def test_a_call_id_with_a_lone_surrogate_gets_a_digest_key():
    key_id = call_key_id("a\ud800b")  # json.loads makes one from "\\ud800": a Call-ID is the caller's text
    assert key_id.startswith("h-") and len(key_id) == 34 and key_id != call_key_id("a\ud801b")


# -- timeline entries and listeners --------------------------------------------------------------
async def test_each_timeline_entry_carries_the_events_name_and_time_or_defaults(store):
    before = now_ms()
    await store.append_event("tl", {"event": "note", "ts": 5})
    await store.append_event("tl", {"detail": "no name, no time"})
    after = now_ms()
    entries = [{k.decode(): v.decode() for k, v in data.items()} for _, data in await store.redis.xrange(timeline_key("tl"))]
    assert [(e["event"], e["ts"]) for e in entries[:1]] == [("note", "5")]
    assert entries[1]["event"] == "?" and before <= int(entries[1]["ts"]) <= after
    assert json.loads(entries[1]["data"]) == {"detail": "no name, no time", "call_id": "tl"}
    assert entries[0]["data"] == '{"event":"note","ts":5,"call_id":"tl"}'  # compact


async def test_listeners_hear_each_written_event_with_its_call_id(store):
    heard = []
    store.listeners.append(heard.append)
    await create(store, "ls")
    await store.transition("ls", "answered", {}, {"event": "answered", "ts": 2})
    await store.transition("ls", "answered", {}, {"event": "answered", "ts": 3})  # not applied: not heard
    assert heard == [{"event": "decided", "ts": 1, "call_id": "ls"}, {"event": "answered", "ts": 2, "call_id": "ls"}]


# -- transitions ---------------------------------------------------------------------------------
async def test_a_call_first_seen_by_a_transition_records_its_call_id(store):
    await store.transition("seen@x", "answered", {}, {"event": "answered", "ts": 2})
    assert (await store.get("seen@x"))["call_id"] == "seen@x"


async def test_answering_keeps_a_call_in_its_scope_indexes_and_a_late_answer_does_not_make_it_live(store):
    await create(store, "ans", scopes={"tenant": "acme"})
    await store.transition("ans", "answered", {}, {"event": "answered", "ts": 2})
    assert await store.read_counter_values([CounterRequest("l", "live", "tenant", "acme")], AT) == [1]
    (score,) = await store.batch.run([("ZSCORE", LIVE_INDEX, "ans")])
    assert int(score) == AT  # live since its decision, not since its answer
    await store.transition("ans", "ended", {}, {"event": "ended", "ts": 3})
    late = await store.transition("ans", "answered", {}, {"event": "answered", "ts": 4})
    assert not late.applied
    assert await store.batch.run([("ZSCORE", LIVE_INDEX, "ans"), ("ZCARD", live_scope_key("tenant", "acme"))]) \
        == [None, 0]


async def test_an_end_costs_one_round_trip_and_the_store_forgets_the_calls_scopes(store):
    await create(store, "rt", scopes={"tenant": "acme", "trunk": "t1"})
    assert store._live_scopes == {"rt": {"tenant": "acme", "trunk": "t1"}}
    await store.transition("rt", "answered", {}, {"event": "answered", "ts": 2})
    assert "rt" in store._live_scopes  # still live
    sent = pipelines_sent(store)
    await store.transition("rt", "ended", {}, {"event": "ended", "ts": 3})
    assert sent == [["EVALSHA", "ZREM", "ZREM", "ZREM"]]
    assert store._live_scopes == {}  # a controller's memory does not grow with every call it ever had
    assert await store.batch.run([("ZCARD", live_scope_key("tenant", "acme")), ("ZCARD", live_scope_key("trunk", "t1"))]) \
        == [0, 0]


async def test_an_end_tolerates_live_scopes_stored_as_something_else_than_an_object(store):
    await store.redis.hset(call_key("odd"), mapping={"state": "routing", "live_scopes": "[1,2]"})
    assert (await store.transition("odd", "ended", {}, {"event": "ended", "ts": 1})).applied
    assert (await store.get("odd"))["state"] == "ended"


async def test_an_end_seen_before_the_decision_takes_the_call_out_of_the_indexes_the_decision_adds(store):
    await store.transition("early", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 2})
    await create(store, "early", scopes={"tenant": "acme"}, counters=[window("192.0.2.3")])
    assert (await store.get("early"))["state"] == "ended"
    assert await store.batch.run([("ZSCORE", LIVE_INDEX, "early"), ("ZCARD", live_scope_key("tenant", "acme"))]) \
        == [None, 0]
    assert "early" not in store._live_scopes
    assert await store.read_counter_values([window("192.0.2.3")], AT) == [1]  # it was a call: it counts


async def test_a_counter_that_cannot_be_written_is_logged_and_the_record_stands(store, caplog):
    await store.batch.run([("HSET", window_key("source", "192.0.2.4", WINDOW_S, BUCKET), "x", "1")])  # a wrong type
    with caplog.at_level(logging.ERROR, "callfabric.state"):
        await create(store, "ok", counters=[window("192.0.2.5")])
        assert "were not written" not in caplog.text
        await create(store, "bad", counters=[window("192.0.2.4")])
    assert "call bad: its counters or live indexes were not written" in caplog.text
    assert (await store.get("bad"))["rule"] == "r1"


async def test_a_decision_redis_refuses_is_an_error_not_silence(store):
    from redis.exceptions import ResponseError
    await store.batch.run([("SET", RECENT_INDEX, "not a sorted set")])
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await create(store, "refused")
    assert store.available and store.outage.depth == 0  # refused is not unreachable: nothing held


# -- which writes wait for company in a pipeline ---------------------------------------------------
async def test_decisions_and_reads_leave_at_once_dialog_events_and_counters_wait_for_company(store):
    store.batch.linger_s = 30  # a write that lingers waits for the next urgent one
    recorded = lambda call_id: lambda: store.redis.exists(call_key(call_id))  # noqa: E731
    flushed = lambda: store.batch.run([("PING",)])  # noqa: E731  (urgent: takes the lingering ones along)

    decision = asyncio.create_task(create(store, "urg", counters=[window("192.0.2.6")]))
    await until(recorded("urg"), 5, "an urgent decision lingered")
    await asyncio.sleep(0.2)
    assert not decision.done()  # its counters wait for company
    # an urgent read takes them along, ahead of itself
    assert await asyncio.wait_for(store.read_counter_values([window("192.0.2.6")], AT), 5) == [1]
    await asyncio.wait_for(decision, 5)

    edge = asyncio.create_task(store.send_create("edge", {"state": "routing"}, live_scopes={}, window_counters=[],
                                                 at_ms=AT, event={"event": "decided", "ts": 1}, urgent=False))
    read = asyncio.create_task(store.read_counter_values([window("192.0.2.6")], AT, urgent=False))
    answered = asyncio.create_task(store.transition("urg", "answered", {}, {"event": "answered", "ts": 2}))
    await asyncio.sleep(0.3)
    assert not (edge.done() or read.done() or answered.done()) and not await store.redis.exists(call_key("edge"))
    await flushed()
    await asyncio.wait_for(asyncio.gather(edge, read, answered), 5)
    assert (await store.get("urg"))["state"] == "answered" and await store.redis.exists(call_key("edge"))


# -- reconciliation -------------------------------------------------------------------------------
async def test_reconciling_drops_at_most_a_batch_and_keeps_the_latest_recent_calls(store):
    gone = [f"g{n}" for n in range(501)]
    await store.batch.run([("ZADD", LIVE_INDEX, *[x for n, c in enumerate(gone) for x in (n, c)]),
                           ("ZADD", RECENT_INDEX, *[x for n in range(RECENT_KEEP + 2) for x in (n + 1, f"r{n}")])])
    store._live_scopes["g0"] = {"tenant": "acme"}
    assert await store.reconcile_live(now_ms()) == 500  # the first 500 (score 0 included)
    assert "g0" not in store._live_scopes
    assert await store.batch.run([("ZRANGE", LIVE_INDEX, 0, -1)]) == [[b"g500"]]
    assert await store.batch.run([("ZCARD", RECENT_INDEX), ("ZSCORE", RECENT_INDEX, "r1"), ("ZSCORE", RECENT_INDEX, "r2")]) \
        == [RECENT_KEEP, None, b"3"]  # the two oldest went


async def test_listings_give_the_newest_calls_up_to_the_limit_asked(store):
    await store.batch.run([("ZADD", RECENT_INDEX, *[x for n in range(101) for x in (n, f"r{n}")]),
                           ("ZADD", LIVE_INDEX, *[x for n in range(101) for x in (n, f"l{n}")])])
    for listing, prefix in ((store.recent_calls, "r"), (store.live_calls, "l")):
        assert await listing(1) == [f"{prefix}100"]
        assert await listing(2) == [f"{prefix}100", f"{prefix}99"]
        everything = await listing()
        assert len(everything) == 100 and everything[-1] == f"{prefix}1"  # 100 by default
    assert await store.live_count() == 101


async def test_live_edge_calls_are_the_live_ones_with_an_edge_transaction_live_since_before_the_time_asked(store):
    await create(store, "edge-0", at_ms=0, tx="1:1")
    await create(store, "edge-1", at_ms=10, tx="1:2")
    await create(store, "local", at_ms=10)  # no edge transaction (an API call)
    await create(store, "over", at_ms=10, tx="1:3")
    await store.transition("over", "ended", {}, {"event": "ended", "ts": 2})
    await store.batch.run([("ZADD", LIVE_INDEX, 10, "over")])  # its end missed by the index
    await create(store, "young", at_ms=AT, tx="1:4")
    assert await store.live_edge_calls(100) == ["edge-0", "edge-1"]
    assert await store.live_edge_calls(100, limit=1) == ["edge-0"]
    assert await store.live_edge_calls(-1) == []


async def test_timeline_entries_that_are_not_json_keep_their_name_and_id(store):
    ids = [await store.redis.xadd(timeline_key("tg"), fields) for fields in (
        {"event": "x", "ts": "1", "data": "{broken"}, {"ts": "2", "data": "[1]"}, {"event": "y", "ts": "3"})]
    assert await store.timeline("tg") == [
        {"event": "x", "unreadable": "{broken", "id": ids[0].decode()},
        {"event": "?", "unreadable": "[1]", "id": ids[1].decode()},
        {"id": ids[2].decode()}]  # no data: an empty event, not an error


# -- a decision behind held changes, or with Redis gone ------------------------------------------
async def test_a_decision_behind_held_changes_of_its_call_waits_for_them_and_redis_stays_available(store):
    release = asyncio.Event()
    order = []

    async def older_change() -> None:
        await release.wait()
        order.append("older")
    store.outage.hold("event", "held@x", older_change, failed=False)  # e.g. replayed after an outage
    decision = asyncio.create_task(create(store, "held@x", scopes={"tenant": "acme"}))
    await asyncio.wait_for(decision, 5)  # held, not failed
    assert store.available and store.outage.holds("held@x")
    answered = await store.transition("held@x", "answered", {}, {"event": "answered", "ts": 2})
    assert answered.queued and not answered.applied and store.available
    await store.append_event("held@x", {"event": "note", "ts": 3})
    assert not await store.redis.exists(call_key("held@x"))  # nothing overtook the older change
    with pytest.raises(RedisConnectionError, match=r"Redis unreachable \(4 state changes queued\)"):
        await store.send_create("held@x", {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=AT,
                                event={"event": "decided", "ts": 1}, hold=False)
    release.set()
    assert await store.outage.wait_empty(10) and order == ["older"]
    assert (await store.get("held@x"))["state"] == "answered"
    assert [e["event"] for e in await store.timeline("held@x")] == ["decided", "answered", "note"]
    assert store.available


@pytest.fixture
async def own_redis(tmp_path):
    server = await asyncio.to_thread(RedisServer(tmp_path, name="own").start)
    yield server
    await asyncio.to_thread(server.stop)


async def test_decisions_made_while_redis_is_down_are_held_under_their_call_and_written_when_back(own_redis):
    store = CallStore(own_redis.url, timeout_s=0.5)
    events = CallStore(own_redis.url, timeout_s=0.5)  # another controller, whose first write is an event
    try:
        await create(store, "warm")
        await create(events, "warm-too")
        await asyncio.to_thread(own_redis.stop)
        ended = await events.transition("warm-too", "ended", {}, {"event": "ended", "ts": 2})  # sending fails
        assert ended.queued and not events.available and events.outage.holds("warm-too")
        await create(store, "first", scopes={"tenant": "acme"}, counters=[window("192.0.2.7")])  # sending fails
        assert not store.available and store.outage.holds("first")  # Redis is down from the first failure on
        await create(store, "second", counters=[window("192.0.2.7")])  # Redis known down: held at once
        assert store.outage.holds("second") and store.outage.depth == 2
        await asyncio.to_thread(own_redis.start)
        assert await store.outage.wait_empty(10) and await events.outage.wait_empty(10)
        assert (await store.get("warm-too"))["state"] == "ended"
        for call_id in ("first", "second"):
            assert (await store.get(call_id))["rule"] == "r1"
            assert [e["event"] for e in await store.timeline(call_id)] == ["decided"]
        assert await store.read_counter_values([window("192.0.2.7"), CounterRequest("l", "live", "tenant", "acme")],
                                               AT) == [2, 1]
    finally:
        await store.aclose()
        await events.aclose()


async def test_decisions_redis_never_confirmed_are_held_and_written_once_or_refused_when_the_queue_is_full(own_redis):
    store = CallStore(own_redis.url, timeout_s=0.5, outage_queue_max=1)
    try:
        await create(store, "warm")  # connected, script loaded

        def redis(command: bytes) -> None:
            with socket.create_connection(("127.0.0.1", own_redis.port), timeout=2) as s:
                s.sendall(command)
                assert s.recv(16).startswith(b"+OK")
        await asyncio.to_thread(redis, b"CLIENT PAUSE 20000 WRITE\r\n")  # its writes wait, unanswered
        kept, refused = await asyncio.wait_for(asyncio.gather(
            create(store, "kept", counters=[window("192.0.2.8")]), create(store, "refused"), return_exceptions=True), 10)
        assert kept is None and isinstance(refused, QueueFull)  # the first held, the second said, not hung
        assert store.outage.holds("kept")
        await asyncio.to_thread(redis, b"CLIENT UNPAUSE\r\n")
        assert await store.outage.wait_empty(10)
        assert (await store.get("kept"))["rule"] == "r1"
        assert [e["event"] for e in await store.timeline("kept")] == ["decided"]
    finally:
        await store.aclose()
