"""Redis outages end when Redis is back (a real redis-server stopped and started): the queued
state changes are replayed in shared pipelines, in order per call, while changes of other
calls go straight to Redis; the store says it is degraded until the replay is over; a policy
that is fail-closed for limits refuses the calls whose counters are unknown."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from controller.edge.decisions import LIMITS_UNCHECKED_RULE, EdgeDecisions
from controller.localstack.redis import RedisServer
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from controller.policy.model import CounterProbe as CounterRequest
from controller.state.calls import CallStore, call_key, timeline_key, window_key
from controller.state.journal import DialogChange, Journal

POLICY = """\
settings:
  limits_without_counters: {mode}
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:4000", transport: rtp, codec: ulaw}}
rules:
  - name: source-cap
    match:
      calls_in_window: {{scope: source, window: 60s, at_least: 30}}
    actions: [reject: {{code: 503, reason: Rate Limited}}]
default:
  actions: [route_agent: intake]
"""


@pytest.fixture
async def redis_server(tmp_path):
    server = await asyncio.to_thread(RedisServer(tmp_path).start)
    yield server
    await asyncio.to_thread(server.stop)


def decide(call_id: str, src: str = "192.0.2.7") -> dict:
    return {"event": "decide", "tx": "1:1", "call_id": call_id, "from_user": "alice", "to_user": "100",
            "ruri_user": "100", "src_ip": src, "src_port": 5060, "transport": "udp", "headers": {}}


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_replay_is_pipelined_ordered_per_call_and_new_calls_go_straight(redis_server):
    metrics = Metrics()
    store = CallStore(redis_server.url, observe_outage=metrics.redis_outage, timeout_s=0.5)
    try:
        await asyncio.to_thread(redis_server.stop)
        held = 2000
        for n in range(held):  # each call: created, answered, ended, all while Redis is down
            call = f"held-{n}"
            await store.create(call, {"state": "routing", "outcome": "agent", "rule": "r", "created_at_ms": 1},
                               live_scopes={}, window_counters=[], at_ms=1, event={"event": "decided", "ts": 1})
            await store.transition(call, "answered", {"answered_at_ms": 2}, {"event": "answered", "ts": 2})
            await store.transition(call, "ended", {"ended_at_ms": 3}, {"event": "ended", "ts": 3})
        assert store.outage.depth == 3 * held and store.degraded and not store.available
        assert metrics.registry.get_sample_value("callfabric_state_degraded") == 1
        await asyncio.to_thread(redis_server.start)
        await until(lambda: store.available, 10, "Redis never seen back")
        back = time.monotonic()
        # a new call goes straight to Redis while the old ones replay; a held call's new change waits behind
        await store.create("new-1", {"state": "routing", "outcome": "agent", "rule": "r", "created_at_ms": 5},
                           live_scopes={}, window_counters=[], at_ms=5, event={"event": "decided", "ts": 5})
        late = await store.transition(f"held-{held - 1}", "failed", {}, {"event": "failed", "ts": 9})
        assert late.queued or store.outage.depth == 0
        await until(lambda: not store.degraded, 30, "replay never finished")
        replay_s = time.monotonic() - back
        print(f"replayed {3 * held} changes in {replay_s:.2f}s")
        assert metrics.registry.get_sample_value("callfabric_state_degraded") == 0
        records = await store.get_many([f"held-{n}" for n in range(held)] + ["new-1"])
        assert all(r and r["state"] == "ended" for r in records[:-1])  # in order: never failed after ended
        assert records[-1]["state"] == "routing"
        for n in (0, held // 2, held - 1):
            assert [e["event"] for e in await store.timeline(f"held-{n}")] == ["decided", "answered", "ended"]
        assert metrics.registry.get_sample_value("callfabric_redis_outage_queue_total", {"event": "flushed"}) \
            == 3 * held + (1 if late.queued else 0)
    finally:
        await store.aclose()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_limits_without_counters_follow_the_policy(redis_server, mode):
    policy = policy_from_texts({"p.yaml": POLICY.format(mode=mode)})
    assert policy.source.settings.limits_without_counters == mode
    metrics = Metrics()
    store = CallStore(redis_server.url, observe_outage=metrics.redis_outage, timeout_s=0.5)
    decisions = EdgeDecisions(lambda: policy, store, metrics, "t", state_unavailable="open")
    try:
        await asyncio.to_thread(redis_server.stop)
        answer = await decisions.decide(decide("c-1"), time.perf_counter())
        refused = metrics.registry.get_sample_value("callfabric_decisions_without_state_total", {"mode": "refused"})
        if mode == "closed":
            assert answer["action"] == "reject" and answer["code"] == 503 and "Retry-After: 5" in answer["hdrs"]
            assert refused == 1
        else:
            assert answer["action"] == "dispatch" and not refused
        assert metrics.registry.get_sample_value("callfabric_decisions_without_state_total", {"mode": "open"}) == 1
        await asyncio.to_thread(redis_server.start)
        await until(lambda: not store.degraded, 10, "the held record was never written")
        record = await store.get("c-1")
        assert record["rule"] == (LIMITS_UNCHECKED_RULE if mode == "closed" else "default")
    finally:
        await store.aclose()


def test_an_unknown_limits_mode_is_refused_with_its_place():
    from controller.policy import PolicyInvalid
    with pytest.raises(PolicyInvalid) as caught:
        policy_from_texts({"p.yaml": POLICY.format(mode="maybe")})
    assert "p.yaml:2" in str(caught.value) and "limits_without_counters" in str(caught.value)



DIALOG = {"answered": "confirmed", "ended": "ended"}


def apply_edge_events(store: CallStore, applier: str, call_id: str, states: list[str]) -> asyncio.Future:
    """The edge's dialog events of a call, applied as the controller applies them (Journal.apply:
    evapi events, a Redis Cluster) or as Redis does (Journal.apply_stream: one Redis)."""
    journal = Journal(store)
    if applier == "controller":
        return asyncio.ensure_future(journal.apply([DialogChange(
            call_id, state, {"answered_at_ms": 2} if state == "answered" else {"ended_at_ms": 3, "end_reason": "bye"},
            {"event": state, "ts": 2 if state == "answered" else 3}) for state in states]))

    async def in_redis():
        stream = "cf:edge:{e1}:events"
        await store.redis.xgroup_create(stream, "callfabric", id="0", mkstream=True)
        for state in states:
            await store.redis.xadd(stream, {"e": json.dumps({
                "event": "dialog", "state": DIALOG[state], "call_id": call_id, "from_tag": "ft", "code": 0,
                "reason": "bye-caller", "ts": 2 if state == "answered" else 3, "tx": "1:1", "fallback": ""})})
        return await journal.apply_stream(
            stream, "cf:edge:{e1}:applied", "callfabric", "ctl-1", 10, now_ms=4, instance="ctl-1", policy_version="",
            thresholds={}, short_calls=[], events=False, edge="e1")
    return asyncio.ensure_future(in_redis())


def replay_when_told(store: CallStore) -> asyncio.Event:
    """The outage queue looks for Redis again only when the returned event is set (instead of
    every retry_s): the moment its replay starts is the test's."""
    probe, told = store.outage.probe, asyncio.Event()

    async def probe_when_told() -> None:
        await told.wait()
        await probe()
    store.outage.probe = probe_when_told
    return told


async def decide_while_down(store: CallStore, call_id: str) -> None:
    await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "r", "created_at_ms": 1},
                       live_scopes={"tenant": "acme"}, window_counters=[COUNTED], at_ms=1,
                       event={"event": "decided", "ts": 1})
    assert store.outage.holds(call_id)


COUNTED = CounterRequest("window:source:60", "window", "source", "192.0.2.7", 60, True, "")


@pytest.mark.parametrize("applier", ["controller", "redis"])
async def test_an_edge_event_of_a_held_call_is_applied_after_its_held_decision(redis_server, applier):
    """A call decided while Redis was down (its record held in the outage queue) is answered;
    the edge's `confirmed` reaches Redis's writers once Redis is back, before the queue is
    replayed. Whoever applies it — the controller (Journal.apply) or Redis itself
    (apply_stream) — applies it after the held decision."""
    store = CallStore(redis_server.url, timeout_s=0.5)
    replay = replay_when_told(store)
    heard: list[str] = []
    try:
        await asyncio.to_thread(redis_server.stop)
        await decide_while_down(store, "c-1")
        store.listeners.append(lambda event: heard.append(event["event"]))  # from the replay on
        await asyncio.to_thread(redis_server.start)
        applying = apply_edge_events(store, applier, "c-1", ["answered"])
        await asyncio.wait({applying}, timeout=1.0)  # time enough to write it now, were it allowed
        assert not applying.done()  # it waits behind the decision held here
        replay.set()
        await applying
        await until(lambda: not store.degraded, 10, "the held decision was never written")
        assert [e["event"] for e in await store.timeline("c-1")] == ["decided", "answered"]
        if applier == "controller":  # webhooks hear of them in that order too
            assert heard == ["decided", "answered"]
        record = await store.get("c-1")
        assert record["state"] == "answered" and record["created_at_ms"] == 1
        assert await store.live_calls() == ["c-1"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("applier", ["controller", "redis"])
@pytest.mark.parametrize("seen_first", [["answered"], ["answered", "ended"]])
async def test_a_decision_another_controller_held_goes_first_in_its_calls_timeline(redis_server, applier, seen_first):
    """Controller A decided a call while Redis was down (held in A's queue); controller B
    applies the edge's events of the call as soon as Redis is back (B holds nothing of it).
    When A's decision is written, it goes first in the timeline; the state stays where the
    events took it (forward only); a call that is over already keeps its retention and is in
    no live index; its counters are counted once."""
    a, b = CallStore(redis_server.url, timeout_s=0.5), CallStore(redis_server.url, timeout_s=0.5)
    replay = replay_when_told(a)
    try:
        await asyncio.to_thread(redis_server.stop)
        await decide_while_down(a, "c-2")
        await asyncio.to_thread(redis_server.start)
        await apply_edge_events(b, applier, "c-2", seen_first)
        assert [e["event"] for e in await b.timeline("c-2")] == seen_first
        replay.set()
        await until(lambda: not a.degraded, 10, "the held decision was never written")
        assert [e["event"] for e in await b.timeline("c-2")] == ["decided", *seen_first]
        record = await b.get("c-2")
        assert record["state"] == seen_first[-1] and record["rule"] == "r" and record["created_at_ms"] == 1
        over = seen_first[-1] == "ended"
        assert await b.live_calls() == ([] if over else ["c-2"])
        assert await b.redis.zrange("cf:live:{tenant:acme}", 0, -1) == ([] if over else [b"c-2"])
        retention = await b.redis.ttl(call_key("c-2"))
        assert retention > (b.live_call_ttl_s if over else 0)
        assert abs(await b.redis.ttl(timeline_key("c-2")) - retention) <= 1
        assert await b.redis.get(window_key("source", "192.0.2.7", 60, 0)) == b"1"
    finally:
        await a.aclose()
        await b.aclose()
