"""Batches of call changes (state/journal.py) on a real Redis: applied once whatever is
delivered again, in order, with the same record, timeline, indexes and counters as the
decision path; a batch cut between its two pipelines is completed when delivered again."""
from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from controller.policy.model import CounterProbe
from controller.state.calls import CallStore, window_key
from controller.state.journal import DialogChange, FallbackTaken, Journal, NewCall, PartlyApplied

AT = 1_700_000_000_000
COUNTER = CounterProbe("window:source:60", "window", "source", "192.0.2.9", 60, True, "")


def new_call(call_id: str) -> NewCall:
    record = {"state": "routing", "outcome": "agent", "rule": "r", "policy_version": "v", "decided_by": "edge",
              "created_at_ms": AT, "tx": "1:1"}
    return NewCall(call_id, record, {"event": "decided", "ts": AT}, {"tenant": "acme"}, [COUNTER], AT)


def ended(call_id: str, ts: int = AT + 2000) -> DialogChange:
    return DialogChange(call_id, "ended", {"ended_at_ms": ts, "end_reason": "bye-caller"},
                        {"event": "ended", "ts": ts, "reason": "bye-caller"})


def answered(call_id: str) -> DialogChange:
    return DialogChange(call_id, "answered", {"answered_at_ms": AT + 1000}, {"event": "answered", "ts": AT + 1000})


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url)
    await store.redis.flushdb()
    yield store
    await store.aclose()


async def counted(store: CallStore) -> int:
    return int(await store.redis.get(window_key("source", "192.0.2.9", 60, AT // 60_000)) or 0)


async def test_a_batch_delivered_twice_changes_and_counts_nothing_twice(store):
    journal = Journal(store)
    batch = [new_call("j-1"), answered("j-1"), new_call("j-2"), answered("j-2"), ended("j-2")]
    first = await journal.apply(batch)
    assert [r.applied for r in first] == [True] * 5
    again = await journal.apply([new_call("j-1"), answered("j-1"), new_call("j-2"), answered("j-2"), ended("j-2")])
    assert [r.applied for r in again] == [False] * 5
    assert await counted(store) == 2
    assert (await store.get("j-1"))["state"] == "answered" and (await store.get("j-2"))["state"] == "ended"
    assert [e["event"] for e in await store.timeline("j-2")] == ["decided", "answered", "ended"]
    assert await store.live_calls() == ["j-1"]  # j-2 ended in the same batch: never indexed live
    assert await store.redis.zrange("cf:live:{tenant:acme}", 0, -1) == [b"j-1"]


async def test_a_fallback_corrects_a_late_decision_and_is_noted_once(store):
    journal = Journal(store)
    await journal.apply([new_call("f-1")])  # a decision that came too late to be applied
    fallback = FallbackTaken("f-1", "timeout", {"state": "routing", "decided_by": "edge-fallback",
                                                "outcome": "fallback", "rule": ""},
                             {"event": "fallback", "ts": AT + 5, "reason": "timeout"}, AT + 5)
    (result,) = await journal.apply([fallback])
    assert result.applied and not result.created
    (again,) = await journal.apply([fallback])
    assert not again.applied
    record = await store.get("f-1")
    assert record["decided_by"] == "edge-fallback" and record["outcome"] == "fallback"
    assert record["fallback"] == "timeout" and record["late_decision_rule"] == "r" and record["rule"] == ""
    assert [e["event"] for e in await store.timeline("f-1")] == ["decided", "fallback"]


async def test_a_batch_cut_between_its_pipelines_is_completed_when_delivered_again(store, monkeypatch):
    journal = Journal(store)
    submit = store.batch.submit
    calls = {"n": 0}

    def cut_second(commands, urgent):
        calls["n"] += 1
        if calls["n"] != 2:
            return submit(commands, urgent)
        operation = submit([("PING",)], urgent)  # the second pipeline never reaches Redis
        operation.replies.set_exception(RedisConnectionError("connection lost"))
        return operation

    monkeypatch.setattr(store.batch, "submit", cut_second)
    with pytest.raises(PartlyApplied) as cut:
        await journal.apply([new_call("c-1"), answered("c-1")])
    assert [r.applied for r in cut.value.results] == [True, True]  # applied: counted by the caller now
    monkeypatch.setattr(store.batch, "submit", submit)
    assert await counted(store) == 0 and await store.live_calls() == []
    again = await journal.apply([new_call("c-1"), answered("c-1")])  # delivered again
    assert [r.applied for r in again] == [False, False]
    assert await counted(store) == 1 and await store.live_calls() == ["c-1"]
    third = await journal.apply([new_call("c-1")])
    assert not third[0].indexing and await counted(store) == 1
