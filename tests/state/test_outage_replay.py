"""Redis outages end when Redis is back (a real redis-server stopped and started): the queued
state changes are replayed in shared pipelines, in order per call, while changes of other
calls go straight to Redis; the store says it is degraded until the replay is over; a policy
that is fail-closed for limits refuses the calls whose counters are unknown."""
from __future__ import annotations

import asyncio
import time

import pytest

from controller.edge.decisions import LIMITS_UNCHECKED_RULE, EdgeDecisions
from controller.localstack.redis import RedisServer
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from controller.state.calls import CallStore

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
