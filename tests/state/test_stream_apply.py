"""An edge's events applied inside Redis (Journal.apply_stream, one script per batch) write
exactly what the controller writes when it applies them itself (EdgeRecorder.apply →
Journal.apply): records, timelines, live and recent indexes, counters, and the same metrics,
hot scopes and short calls; garbage is counted, never applied; what Redis leaves to the
controller (bans, Call-IDs hashed into keys) stays unacknowledged until the controller
applied it; a batch delivered again changes nothing."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from controller.edge.decisions import EdgeDecisions
from controller.edge.recorder import GROUP, EdgeRecorder, stream_key, summaries_key
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from controller.security.bans import BanList
from controller.security.guard import SecurityGuard
from controller.security.hot import HotScopes
from controller.state.calls import CallStore
from controller.state.journal import Journal
from tests.policy.helpers import DECLARATIONS

AT = 0  # when the calls were decided: now, clear of a minute's edge (see `now`)


@pytest.fixture(autouse=True)
async def now():
    """Counter windows are read as of now, like the controller reads them: the calls are
    decided now, at least 5 s from a window edge, so both paths read the same buckets."""
    global AT
    while time.time() % 60 > 50:
        await asyncio.sleep(1)
    AT = int(time.time() * 1000)


def call_events(call_id: str, src: str, *, end: str = "ended", tenant: str = "acme") -> list[dict]:
    """What an edge sends for one call it decided: decided, answered, then its end."""
    record = {"state": "routing", "outcome": "agent", "rule": "sales", "applied_rules": ["tag", "sales"],
              "target": "sales", "policy_version": "v1",
              "decision": {"outcome": "agent", "rule": "sales", "agent": {"name": "sales", "dispatcher_set": 2},
                           "headers": {"X-Tag": "caf\u00e9 / \"q\""}, "max_duration_s": 3600},
              "from_uri": "sip:+12025550123@192.0.2.9", "to_uri": "sip:18005550200@edge", "ruri": "sip:18005550200@edge",
              "caller": "+12025550123", "callee": "+18005550200", "dialled": "+18005550200", "src": f"{src}:5060",
              "transport": "udp", "tenant": tenant, "trunk": None, "user_agent": "phone/1.0", "tx": "12:34",
              "created_at_ms": AT, "decided_by": "edge", "end_reason": None, "end_code": None, "ended_at_ms": None}
    timeline = {"event": "decided", "ts": AT, "outcome": "agent", "rule": "sales", "target": "sales",
                "policy_version": "v1", "decide_ms": 0.058, "counters": None, "decided_by": "edge"}
    counters = [["window:source:60", "window", "source", src, 60, True, ""],
                ["risk:spike:window", "window", "source", src, 60, True, ""],
                ["risk:spike:baseline", "window", "source", src, 3600, True, ""],
                ["risk:enumeration", "distinct", "callees:source", src, 60, True, "+18005550200"],
                ["risk:short", "window", "short:source", src, 60, False, ""],
                ["live:tenant", "live", "tenant", tenant, 0, True, ""]]
    events = [{"event": "decided", "call_id": call_id, "tx": "12:34", "record": record, "timeline": timeline,
               "live_scopes": {"tenant": tenant}, "counters": counters},
              {"event": "dialog", "state": "confirmed", "call_id": call_id, "from_tag": "ft", "code": 200,
               "reason": "answered", "ts": AT + 150, "tx": "12:34", "fallback": ""}]
    if end:
        events.append({"event": "dialog", "state": end, "call_id": call_id, "from_tag": "ft", "code": 0,
                       "reason": "bye-caller", "ts": AT + 1150, "tx": "12:34", "fallback": ""})
    return events


def fallback_events(call_id: str) -> list[dict]:
    return [{"event": "fallback", "call_id": call_id, "from_tag": "ft", "tx": "1:2", "reason": "no-controller",
             "mode": "open", "ts": AT},
            {"event": "dialog", "state": "failed", "call_id": call_id, "from_tag": "ft", "code": 503,
             "reason": "failed", "ts": AT + 20, "tx": "1:2", "fallback": "no-controller"}]


SECURITY = """\
security:
  detectors:
    - {name: short-calls, kind: short_calls, shorter_than: 2s, window: 60s, max: 5, score: 50}
  outcomes:
    reject: {at_least: 50}
"""
POLICY = policy_from_texts({"p.yaml": DECLARATIONS, "s.yaml": SECURITY})  # version: not the events' "v1"


class Hot(HotScopes):
    """Hot scopes with fixed thresholds that keep what they were shown (no edge to tell)."""

    def __init__(self):
        super().__init__([object()], Metrics())
        self.seen = []

    def thresholds(self, policy):
        return {"window:source:60": 2, "risk:short-calls": 1}

    def observe(self, policy, probes, values):
        self.seen += [(p.key, p.value, v) for p, v in zip(probes, values) if v >= self.thresholds(policy)[p.key]]


def recorder_for(store: CallStore) -> tuple[EdgeRecorder, Metrics, Hot, SecurityGuard]:
    metrics, hot = Metrics(), Hot()
    guard = SecurityGuard(store, BanList(store.batch, metrics, edges=[]), metrics, lambda: POLICY, "ctl-1", hot=hot)
    decisions = EdgeDecisions(lambda: POLICY, store, metrics, "ctl-1", hot=hot)
    return EdgeRecorder(decisions, Journal(store), metrics, security=guard), metrics, hot, guard


async def keys_and_values(store: CallStore, pattern: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in await store.redis.keys(pattern):
        kind = (await store.redis.type(key)).decode()
        if key.startswith(b"cf:hll:"):
            out[key.decode()] = await store.redis.pfcount(key)
        elif kind == "string":
            out[key.decode()] = int(await store.redis.get(key))
        elif kind == "zset":
            out[key.decode()] = sorted(m.decode() for m in await store.redis.zrange(key, 0, -1))
        else:
            out[key.decode()] = kind
    return out


async def settled(recorder: EdgeRecorder) -> None:
    await recorder.settled()


async def in_redis(recorder: EdgeRecorder, edge: str, messages: list, count: int = 200):
    """The stream path: the edge's entries, applied by Redis and settled by the recorder."""
    store = recorder.store
    key = stream_key(edge)
    await recorder._ensure_group(key)
    for message in messages:
        await store.redis.xadd(key, {"e": message if isinstance(message, str) else json.dumps(message)})
    batch = await recorder.journal.apply_stream(key, summaries_key(edge), GROUP, "ctl-1", count,
                                                **recorder._apply_params(edge))
    await recorder._settle(batch, edge, key)
    await settled(recorder)
    return batch


def samples(metrics: Metrics) -> dict:
    out = {}
    for family in metrics.registry.collect():
        if family.name.startswith(("callfabric_decisions", "callfabric_edge_made", "callfabric_dialog_events",
                                   "callfabric_edge_fallbacks", "callfabric_decision_errors",
                                   "callfabric_edge_policy_mismatch")):
            for s in family.samples:
                if s.name.endswith("_total") and s.value:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_redis_applies_an_edges_events_as_the_controller_does(redis_url):
    store = CallStore(redis_url)
    try:
        here, here_metrics, here_hot, here_guard = recorder_for(store)
        there, there_metrics, there_hot, there_guard = recorder_for(store)
        store.wants_events = lambda: True
        emitted = []
        store.listeners.append(emitted.append)
        # the same calls, by each path: answered and ended, rejected at once, live, routed by fallback
        rejected = [dict(e) for e in call_events("{id}-rej", "{src}", end="")[:1]]
        rejected[0]["record"] = {**rejected[0]["record"], "state": "failed", "outcome": "reject", "rule": "premium",
                                 "end_reason": "rejected", "end_code": 403, "ended_at_ms": AT}

        def batch(tag: str, src: str) -> list[dict]:
            text = json.dumps(call_events("{id}-a", "{src}") + rejected + call_events("{id}-live", "{src}", end="")
                              + fallback_events("{id}-fb") + call_events("{id}-a", "{src}"))  # the last: again
            return json.loads(text.replace("{id}", tag).replace("{src}", src))

        await here.apply(batch("py", "192.0.2.1"), source="edge-a")
        await settled(here)
        done = await in_redis(there, "edge-a", batch("lua", "192.0.2.2"))
        assert done.read == 11 and done.left == []

        for name in ("a", "rej", "live", "fb"):
            py, lua = await store.get(f"py-{name}"), await store.get(f"lua-{name}")
            assert py is not None and lua is not None, name
            assert ({**py, "call_id": "", "src": py.get("src", "").replace("192.0.2.1", "S")}
                    == {**lua, "call_id": "", "src": lua.get("src", "").replace("192.0.2.2", "S")}), name
            timelines = [[{k: v for k, v in e.items() if k not in ("id", "call_id")}
                          for e in await store.timeline(f"{who}-{name}")] for who in ("py", "lua")]
            assert timelines[0] == timelines[1], name
        indexes = await keys_and_values(store, "cf:*")
        for key in ("cf:live", "cf:recent"):
            assert sorted(m.replace("py-", "") for m in indexes[key] if m.startswith("py-")) == \
                sorted(m.replace("lua-", "") for m in indexes[key] if m.startswith("lua-")), key
        assert indexes["cf:live"] == ["lua-live", "py-live"]
        counted = [{k.replace(src, "S"): v for k, v in indexes.items() if src in k and k.startswith(("cf:rate:", "cf:hll:"))}
                   for src in ("192.0.2.1", "192.0.2.2")]
        # the 60 s and 1 h windows, the callees, the short calls
        assert counted[0] == counted[1] and len(counted[0]) == 4, counted
        assert indexes["cf:rate:{source:S}:60:%d".replace("S", "192.0.2.2") % (AT // 60000)] == 3
        assert indexes["cf:live:{tenant:acme}"] == ["lua-live", "py-live"]
        assert samples(here_metrics) == samples(there_metrics)
        assert samples(there_metrics)[("callfabric_edge_policy_mismatch_total", ())] == 3  # decided with v1
        assert sorted((k, v) for k, _, v in here_hot.seen) == sorted((k, v) for k, _, v in there_hot.seen) == \
            [("risk:short-calls", 1), ("window:source:60", 3)]  # three calls counted (threshold 2), one short
        assert indexes["cf:rate:{short:source:192.0.2.2}:60:%d" % ((AT + 1150) // 60000)] == 1
        assert sorted(e["event"] for e in emitted if e["call_id"].startswith("lua-")) == \
            sorted(e["event"] for e in emitted if e["call_id"].startswith("py-"))
        assert await store.redis.xlen(stream_key("edge-a")) == 0  # applied: acknowledged and deleted
    finally:
        await store.aclose()


async def test_garbage_is_counted_and_what_redis_leaves_is_applied_by_the_controller(redis_url):
    store = CallStore(redis_url)
    try:
        recorder, metrics, _, guard = recorder_for(store)
        odd = "odd id/with=slash"  # keyed by its digest: Redis cannot compute it
        broken = call_events("c-broken", "192.0.2.3")[0]
        broken["counters"] = [["window:source:60", "window", "source", "192.0.2.3", "60", True, ""]]
        messages = ["{not json", json.dumps([1, 2]), {"event": "mystery"}, {"event": "dialog", "state": "x"},
                    broken, {"event": "fallback", "call_id": "c-fb", "reason": "Bad Reason", "mode": "open"},
                    {"event": "ban", "ip": "203.0.113.5", "reason": "flood", "seconds": 300, "detail": "d",
                     "ts": AT}] + call_events(odd, "192.0.2.4")
        done = await in_redis(recorder, "edge-c", messages)
        assert done.read == 10 and len(done.left) == 4
        errors = {reason: metrics.registry.get_sample_value("callfabric_decision_errors_total", {"reason": reason})
                  for reason in ("bad-json", "bad-event", "bad-dialog-event", "bad-decided-event",
                                 "bad-fallback-event")}
        assert errors == {"bad-json": 2, "bad-event": 1, "bad-dialog-event": 1, "bad-decided-event": 1,
                          "bad-fallback-event": 1}
        assert await store.get("c-broken") is None and await store.get("c-fb") is None
        record = await store.get(odd)
        assert record["state"] == "ended" and record["rule"] == "sales"  # applied by the controller
        assert (await guard.bans.get("203.0.113.5")).detector == "flood"  # applied by the controller
        assert await store.redis.xlen(stream_key("edge-c")) == 0
        again = await in_redis(recorder, "edge-c", [])
        assert again.read == 0
    finally:
        await store.aclose()


async def test_a_consumers_pending_entries_are_applied_first_and_once(redis_url):
    """Entries a consumer read before it stopped (or claimed from a dead one) are its own
    pending ones: the next batch applies them before new ones. A batch whose reply never
    reached the controller (Redis stopped just after it) is handed over again by the next
    call, which applies nothing more: what was applied is counted once."""
    store = CallStore(redis_url)
    try:
        recorder, _, _, _ = recorder_for(store)
        key = stream_key("edge-d")
        await recorder._ensure_group(key)
        for event in call_events("c-1", "192.0.2.5"):
            await store.redis.xadd(key, {"e": json.dumps(event)})
        await store.redis.xreadgroup(GROUP, "ctl-1", {key: ">"}, count=2)  # read, never applied
        for event in call_events("c-2", "192.0.2.5"):
            await store.redis.xadd(key, {"e": json.dumps(event)})
        apply = lambda: recorder.journal.apply_stream(key, summaries_key("edge-d"), GROUP, "ctl-1", 4,  # noqa: E731
                                                      **recorder._apply_params("edge-d"))
        first = await apply()
        assert first.read == 4
        assert (await store.get("c-1"))["state"] == "ended" and (await store.get("c-2"))["state"] == "routing"
        rest = await apply()
        assert rest.read == 2 and (await store.get("c-2"))["state"] == "ended"
        # Redis stopped right after applying a batch, before its reply: the next call hands that
        # batch's summary over again (counted once) and applies nothing more meanwhile
        settled = dict(recorder.journal._settled)
        await store.redis.xadd(key, {"e": json.dumps(call_events("c-3", "192.0.2.5")[0])})
        replied = await apply()
        assert replied.read == 1 and ("decision", "agent", "sales", 1) in replied.tallies
        recorder.journal._settled = settled  # the reply was lost
        await store.redis.xadd(key, {"e": json.dumps(call_events("c-4", "192.0.2.5")[0])})
        again = await apply()
        assert (again.read, again.tallies) == (replied.read, replied.tallies)
        assert await store.get("c-4") is None
        after = await apply()
        assert after.read == 1 and (await store.get("c-4"))["state"] == "routing"
        assert await store.redis.get("cf:rate:{source:192.0.2.5}:60:%d" % (AT // 60000)) == b"4"
        assert [e["event"] for e in await store.timeline("c-1")] == ["decided", "answered", "ended"]
    finally:
        await store.aclose()


async def test_timeline_events_reach_channel_and_pattern_subscribers(redis_url):
    """The applier publishes a batch's timeline events on cf:events only when someone listens
    (PUBSUB NUMSUB / NUMPAT, looked at once per batch): a channel subscriber (the API's event
    streams) and a pattern subscriber both receive every event; a window counter's bucket
    gets its expiry when the batch creates it."""
    store = CallStore(redis_url)
    try:
        recorder, _, _, _ = recorder_for(store)
        for subscribe in ("subscribe", "psubscribe"):
            listener = store.redis.pubsub()
            await getattr(listener, subscribe)("cf:events" if subscribe == "subscribe" else "cf:ev*")
            await listener.get_message(timeout=1)  # the subscription's confirmation
            call_id = f"c-{subscribe}"
            await in_redis(recorder, "edge-p", call_events(call_id, "192.0.2.7"))
            heard, deadline = [], time.monotonic() + 10
            while len(heard) < 3 and time.monotonic() < deadline:
                message = await listener.get_message(timeout=1)
                if message and message["type"] in ("message", "pmessage"):
                    heard.append(json.loads(message["data"]))
            await listener.aclose()
            assert [(e["call_id"], e["event"]) for e in heard] == \
                [(call_id, "decided"), (call_id, "answered"), (call_id, "ended")], subscribe
        ttl = await store.redis.ttl("cf:rate:{source:192.0.2.7}:60:%d" % (AT // 60000))
        assert 0 < ttl <= 121
    finally:
        await store.aclose()
