"""The call store's counters, exactly (real Redis): which keys a read looks at, how the previous
bucket is weighted by the part of the window still covering it, what a missing key reads as,
and live counts per scope."""
from __future__ import annotations

import pytest

from controller.state.calls import (LIVE_INDEX, CallStore, CounterRequest, distinct_key, live_scope_key,
                                    window_key)

WINDOW_S = 60
BUCKET = 29_000_000  # some minute: at_ms = BUCKET * 60_000 + elapsed


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url)
    yield store
    await store.aclose()


def at(elapsed_ms: int) -> int:
    return BUCKET * WINDOW_S * 1000 + elapsed_ms


WINDOW = CounterRequest("w", "window", "source", "192.0.2.1", WINDOW_S)
DISTINCT = CounterRequest("d", "distinct", "callees:source", "192.0.2.1", WINDOW_S)


@pytest.mark.parametrize("elapsed_ms, current, previous, expected", [
    (0, 0, 10, 10),           # the window's start: the whole previous bucket counts
    (30_000, 4, 10, 9),       # half-way: half of it
    (59_000, 0, 1000, 16),    # 1/60 of it left: 16.67 -> 16
    (59_999, 7, 1000, 7),     # almost none of it
])
async def test_calls_in_a_window_weight_the_previous_bucket_by_what_the_window_still_covers(
        store, elapsed_ms, current, previous, expected):
    commands = []
    if current:
        commands.append(("SET", window_key("source", "192.0.2.1", WINDOW_S, BUCKET), current))
    commands.append(("SET", window_key("source", "192.0.2.1", WINDOW_S, BUCKET - 1), previous))
    await store.batch.run(commands)
    assert await store.read_counter_values([WINDOW], at(elapsed_ms)) == [expected]


async def test_missing_counters_read_zero_at_any_point_of_the_window(store):
    for elapsed in (0, 1, 59_999):
        assert await store.read_counter_values([WINDOW, DISTINCT], at(elapsed)) == [0, 0]
    assert await store.read_counters([CounterRequest("l", "live", "tenant", "acme")], at(0)) == {"l": 0}


async def test_distinct_members_weight_those_only_the_previous_bucket_saw(store):
    previous = distinct_key("callees:source", "192.0.2.1", WINDOW_S, BUCKET - 1)
    current = distinct_key("callees:source", "192.0.2.1", WINDOW_S, BUCKET)
    await store.batch.run([("PFADD", previous, *[f"+1555{i:04d}" for i in range(100)]),
                           ("PFADD", current, "+15550000", "+15559999")])
    # 2 now; 99 only seen before (100 + 2 - 1 shared = 101 in the union)
    assert await store.read_counter_values([DISTINCT], at(0)) == [101]
    assert await store.read_counter_values([DISTINCT], at(30_000)) == [2 + 99 // 2]
    assert await store.read_counter_values([DISTINCT], at(59_400)) == [2]  # 99 * 0.01 = 0.99 -> 0


async def test_live_counts_read_the_scopes_index_or_every_live_call(store):
    await store.batch.run([("ZADD", LIVE_INDEX, 1, "a", 2, "b", 3, "c"),
                           ("ZADD", live_scope_key("tenant", "acme"), 1, "a", 2, "b")])
    values = await store.read_counter_values([CounterRequest("g", "live", "global", "*"),
                                              CounterRequest("t", "live", "tenant", "acme"),
                                              CounterRequest("o", "live", "tenant", "other")], at(0))
    assert values == [3, 2, 0]


async def test_several_requests_come_back_in_the_order_asked(store):
    await store.batch.run([("SET", window_key("source", "192.0.2.2", WINDOW_S, BUCKET), 5)])
    other = CounterRequest("w", "window", "source", "192.0.2.2", WINDOW_S)
    assert await store.read_counter_values([WINDOW, other, WINDOW], at(0)) == [0, 5, 0]
    assert await store.read_counter_values([], at(0)) == []
