"""The controller's side of the decision channel against a scripted edge (an asyncio evapi
server) that sends good events, garbage and broken streams: the controller answers what it
can, counts the rest, reconnects, and never goes down. Real Redis underneath."""
import asyncio

import pytest

from controller.edge import protocol
from controller.edge.channel import HEARTBEAT, EdgeChannel
from controller.edge.decisions import EdgeDecisions
from controller.edge.recorder import EdgeRecorder
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from controller.state.calls import CallStore
from controller.state.journal import Journal
from tests.policy.helpers import DECLARATIONS
from tests.support.evapi import ScriptedEdge, frame, read_answers
from tests.support.metrics import sample
from tests.support.wait import until

RULES = "rules:\n  - {name: blocked, match: {ruri: {prefix: '+44909'}}, actions: [reject: 403]}\n"


def decide(tx, **fields):
    return {"event": "decide", "tx": tx, "call_id": f"call-{tx}", "from_user": "+15551230000",
            "to_user": "02079460000", "ruri_user": "02079460000", "src_ip": "192.0.2.1", "src_port": 5060,
            "transport": "udp", "headers": {}, **fields}


@pytest.fixture
def policy():
    return policy_from_texts({"a.yaml": DECLARATIONS, "b.yaml": RULES})  # loading: off the loop, like the product


@pytest.fixture
async def channel(redis_url, policy):
    metrics = Metrics()
    store = CallStore(redis_url)
    edge = ScriptedEdge()
    port = await edge.start()
    decisions = EdgeDecisions(lambda: policy, store, metrics, "unit")
    recorder = EdgeRecorder(decisions, Journal(store), metrics)
    ch = EdgeChannel("127.0.0.1", port, decisions, recorder, metrics, max_in_flight=50, reconnect_max_s=0.2)
    tasks = [asyncio.create_task(ch.run()), asyncio.create_task(recorder.run_local())]
    yield ch, edge, store, metrics
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await edge.stop()
    await store.aclose()


def errors(metrics, reason):
    return sample(metrics.registry, "callfabric_decision_errors_total", reason=reason)


async def test_decides_are_answered_and_recorded(channel):
    ch, edge, store, metrics = channel
    reader, writer = await edge.connections.get()
    writer.write(frame(decide("1:1")) + frame(decide("1:2", ruri_user="09091234567")))
    answers = {a["tx"]: a for a in await read_answers(reader, 2)}
    assert answers["1:1"]["action"] == "dispatch" and answers["1:1"]["set"] == 1
    assert "X-Callfabric-Agent: intake\r\n" in answers["1:1"]["hdrs"]
    assert answers["1:2"] == {"tx": "1:2", "action": "reject", "code": 403, "reason": "Forbidden",
                              "hdrs": answers["1:2"]["hdrs"]}
    assert (await store.get("call-1:1"))["state"] == "routing"
    assert (await store.get("call-1:2"))["state"] == "failed"


async def test_garbage_is_counted_and_the_controller_keeps_answering(channel):
    ch, edge, store, metrics = channel
    reader, writer = await edge.connections.get()
    writer.write(frame(b"not json") + frame(b"[1,2]") + frame({"event": "mystery"})
                 + frame({"event": "decide", "call_id": "x"})                      # no tx: cannot answer
                 + frame({"event": "decide", "tx": "9:9", "call_id": 12})          # answerable, unusable
                 + frame({"event": "dialog", "state": "exploded", "call_id": "x"})
                 + frame(decide("2:1", headers={"X-A": "no list"}, src_port="x", from_user=None)))
    answers = {a["tx"]: a for a in await read_answers(reader, 2)}
    assert answers["9:9"] == {"tx": "9:9", "action": "fallback", "reason": "bad-request"}
    assert answers["2:1"]["action"] == "dispatch"
    assert errors(metrics, "bad-json") == 2 and errors(metrics, "bad-request") == 2
    assert errors(metrics, "bad-dialog-event") == 1


async def test_a_broken_stream_resets_the_connection_and_the_controller_reconnects(channel):
    ch, edge, store, metrics = channel
    reader, writer = await edge.connections.get()
    writer.write(b"99999999999999:")
    rest = await asyncio.wait_for(reader.read(), 5)  # up to the end: the controller hung up
    assert rest.replace(HEARTBEAT, b"") == b""  # (having said it was alive, nothing else)
    assert errors(metrics, "framing") == 1
    reader, writer = await asyncio.wait_for(edge.connections.get(), 5)
    writer.write(frame(decide("3:1")))
    (answer,) = await read_answers(reader, 1)
    assert answer["tx"] == "3:1" and answer["action"] == "dispatch"


async def test_overload_sheds_to_the_edge_fallback(channel, monkeypatch):
    ch, edge, store, metrics = channel
    gate = asyncio.Event()
    real_decide = ch.decisions.decide

    async def slow_decide(message, received):
        await gate.wait()
        return await real_decide(message, received)
    monkeypatch.setattr(ch.decisions, "decide", slow_decide)
    reader, writer = await edge.connections.get()
    writer.write(b"".join(frame(decide(f"4:{i}")) for i in range(60)))
    shed = await read_answers(reader, 10)
    assert all(a["action"] == "fallback" and a["reason"] == "overload" for a in shed)
    # a call the policy blocks is refused even when shed: no fallback routes it
    writer.write(frame(decide("4:60", ruri_user="09091234567")) + frame({"event": "decide", "tx": "4:61"}))
    blocked, unusable = await read_answers(reader, 2)
    assert (blocked["tx"], blocked["action"], blocked["code"]) == ("4:60", "reject", 403)
    assert unusable == {"tx": "4:61", "action": "fallback", "reason": "overload"}
    gate.set()
    rest = await read_answers(reader, 50)
    assert sorted(a["tx"] for a in shed + rest) == sorted(f"4:{i}" for i in range(60))
    assert errors(metrics, "overload") == 12
    assert metrics.registry.get_sample_value("callfabric_fallback_rejects_total", {"reason": "overload"}) == 1


async def test_dialog_events_follow_the_call_and_wait_for_its_decision(channel):
    ch, edge, store, metrics = channel
    reader, writer = await edge.connections.get()
    # the decision and its dialog events in one burst: the events must apply after the record exists
    writer.write(frame(decide("5:1"))
                 + frame({"event": "dialog", "state": "confirmed", "call_id": "call-5:1", "code": 200,
                          "reason": "answered", "ts": 1_000, "fallback": ""})
                 + frame({"event": "dialog", "state": "ended", "call_id": "call-5:1", "code": 0,
                          "reason": "bye-callee", "ts": 2_000, "fallback": ""}))
    await read_answers(reader, 1)
    async def ended():
        record = await store.get("call-5:1")
        return record if record and record["state"] == "ended" else None
    record = await until(ended, what="call-5:1 ended")
    assert record["state"] == "ended" and record["end_reason"] == "bye-callee" and record["rule"] == "default"
    assert [e["event"] for e in await store.timeline("call-5:1")] == ["decided", "answered", "ended"]


async def test_no_policy_asks_for_the_edge_fallback(redis_url):
    store = CallStore(redis_url)
    decisions = EdgeDecisions(lambda: None, store, Metrics(), "unit")
    answer = await decisions.decide(decide("6:1"), 0.0)
    assert answer == {"tx": "6:1", "action": "fallback", "reason": "no-policy"}
    await store.aclose()


async def test_redis_down_asks_for_the_edge_fallback(policy):
    store = CallStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    metrics = Metrics()
    decisions = EdgeDecisions(lambda: policy, store, metrics, "unit")
    answer = await decisions.decide(decide("7:1"), 0.0)
    assert answer == {"tx": "7:1", "action": "fallback", "reason": "state-unavailable"}
    assert metrics.registry.get_sample_value("callfabric_redis_errors_total", {"operation": "create"}) == 1
    # without Redis the controller still knows what the policy blocks: no fallback for those
    answer = await decisions.decide(decide("7:2", ruri_user="09091234567"), 0.0)
    assert (answer["action"], answer["code"], answer["reason"]) == ("reject", 403, "Forbidden")
    assert metrics.registry.get_sample_value("callfabric_fallback_rejects_total",
                                             {"reason": "state-unavailable"}) == 1
    await store.aclose()


async def test_a_decision_that_fails_still_keeps_the_policys_reject(redis_url, policy, monkeypatch):
    store = CallStore(redis_url)
    metrics = Metrics()
    decisions = EdgeDecisions(lambda: policy, store, metrics, "unit")

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(decisions, "_decide", broken)
    assert await decisions.decide(decide("8:1"), 0.0) == {"tx": "8:1", "action": "fallback", "reason": "internal"}
    answer = await decisions.decide(decide("8:2", ruri_user="09091234567"), 0.0)
    assert answer["action"] == "reject" and answer["code"] == 403
    await store.aclose()


async def test_the_controller_tells_the_edge_it_is_alive_every_second(channel):
    ch, edge, store, metrics = channel
    reader, writer = await edge.connections.get()
    decoder = protocol.NetstringDecoder()
    frames: list[bytes] = []
    async with asyncio.timeout(5):
        while frames.count(b'{"event":"alive"}') < 2:  # the first at once, the next a second later
            frames += decoder.feed(await reader.read(65536))
    assert set(frames) == {b'{"event":"alive"}'}  # nothing else unasked
