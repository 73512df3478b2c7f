"""Hostile input at the decision path, fuzzed (hypothesis): whatever a decide or dialog event
holds — SIP-derived text, wrong types, huge or odd values — the controller answers with a
valid answer or the edge fallback, never raises, and keeps the call store consistent (real
Redis). And whatever text a policy file holds, loading it gives a policy or a PolicyInvalid
with positions, nothing else."""
from __future__ import annotations

import asyncio
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.edge import bundle, protocol
from controller.edge.decisions import EdgeDecisions
from controller.edge.recorder import EdgeRecorder
from controller.edge.local import EdgeDecider
from controller.metrics import Metrics
from controller.policy import Call, PolicyInvalid, policy_from_texts
from controller.state.calls import CallStore
from controller.state.journal import Journal
from tests.policy.helpers import DECLARATIONS

SECURITY = """\
security:
  detectors:
    - {name: premium, kind: match, when: {destination_risk: premium}, score: 40}
    - {name: burst, kind: destination_rate, lists: [premium], window: 60s, max: 2, score: 100}
    - {name: enumeration, kind: distinct_callees, window: 60s, max: 5, score: 100}
    - {name: spike, kind: rate_spike, window: 60s, baseline: 1h, min_calls: 3, score: 70}
    - {name: acme-cap, kind: concurrent_calls, scope: tenant, max: 3, score: 70}
  outcomes:
    challenge: {at_least: 40, actions: [route_agent: billing]}
    reject: {at_least: 70}
    ban: {at_least: 100, for: 1m}
rules:
  - name: tag
    actions:
      - add_headers: {X-Caller: "${caller}", X-Callee: "${callee}", X-Dialled: "${ruri}", X-Call: "${call_id}",
                      X-Tenant: "${tenant}", X-Source: "${source_ip}"}
      - continue: true
  - {name: vip, match: {caller: {in_list: vip}}, actions: [route_sip: pbx]}
  - {name: counted, match: {calls_in_window: {scope: source, window: 60s, at_least: 4}}, actions: [reject: {code: 486}]}
"""
POLICY = policy_from_texts({"p.yaml": DECLARATIONS, "s.yaml": SECURITY})

TEXT = st.one_of(st.text(max_size=40), st.text(alphabet="0123456789+#*@:;<>\"\\ \r\n\x00%", max_size=30),
                 st.sampled_from(["+44909123456", "0909123456", "07700900123", "sip:x@y", "", "\u202e", "a" * 2000]))
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                        max_leaves=12)
FIELDS = ("tx", "call_id", "from_user", "to_user", "ruri_user", "src_ip", "src_port", "transport", "headers",
          "from_uri", "to_uri", "ruri", "from_tag", "user_agent")


@st.composite
def decide_messages(draw):
    message = {"event": "decide"}
    for field in FIELDS:
        choice = draw(st.integers(0, 3))
        if choice == 0:
            continue  # missing
        if choice == 1:
            message[field] = draw(ANY_JSON)  # anything
        else:  # plausible
            message[field] = draw({
                "tx": st.from_regex(r"^[0-9]{1,10}:[0-9]{1,10}$", fullmatch=True),
                "src_ip": st.sampled_from(["203.0.113.5", "198.51.100.9", "::1", "999.1.1.1", "not-an-ip", ""]),
                "src_port": st.integers(-5, 70000),
                "transport": st.sampled_from(["udp", "TCP", "wss", "carrier-pigeon"]),
                "headers": st.dictionaries(TEXT, st.lists(TEXT, max_size=3), max_size=4),
            }.get(field, TEXT))
    return message


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


HEADER_LINE = re.compile(r"[A-Za-z0-9-]+: [^\x00-\x08\x0a-\x1f\x7f]*")


def _check_answer(message: dict, answer) -> list[str]:
    """Checks one answer; returns the header lines it asks Kamailio to add."""
    if answer is None:  # only when no usable tx was given
        tx = message.get("tx")
        assert not (isinstance(tx, str) and protocol._TX.match(tx))
        return []
    assert answer["tx"] == message["tx"]
    assert answer["action"] in ("dispatch", "relay", "reject", "fallback")
    encoded = json.dumps(answer).encode()
    assert len(encoded) <= protocol.MAX_ANSWER_BYTES
    if answer["action"] == "fallback":
        assert "hdrs" not in answer
        return []
    # kamailio/PROTOCOL.md: "hdrs" is CRLF-terminated "Name: value" lines and nothing else; a
    # CR, LF or NUL from the caller would start a header (or a body) of the caller's choosing.
    hdrs = answer["hdrs"]
    assert isinstance(hdrs, str) and len(hdrs.encode()) <= protocol.MAX_HDRS_BYTES
    assert hdrs == "" or hdrs.endswith("\r\n"), hdrs
    lines = hdrs.split("\r\n")[:-1]
    for line in lines:
        assert HEADER_LINE.fullmatch(line), f"header injection: {line!r}"
    return lines


def test_any_decide_event_gets_an_answer_or_is_dropped_never_an_exception(redis_url, loop):
    store = CallStore(redis_url)
    metrics = Metrics()
    decisions = EdgeDecisions(lambda: POLICY, store, metrics, "fuzz")

    tagged = []

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(decide_messages())
    def run(message):
        answer = loop.run_until_complete(decisions.decide(message, 0.0))
        lines = _check_answer(message, answer)
        tagged.extend(line for line in lines if line.startswith("X-Call: "))

    try:
        run()
        assert tagged, "no fuzzed call carried the caller-derived headers: header injection was not tried"
        # Dialog events made of garbage are refused with a count, never raise.
        for garbage in ({}, {"event": "dialog"}, {"event": "dialog", "call_id": 5, "state": "ended"},
                        {"event": "dialog", "call_id": "x", "state": "exploded", "code": "nan"}):
            loop.run_until_complete(EdgeRecorder(decisions, Journal(store), metrics).apply([garbage], source="fuzz"))
        assert metrics.registry.get_sample_value("callfabric_decision_errors_total",
                                                 {"reason": "bad-dialog-event"}) == 3
        assert metrics.registry.get_sample_value("callfabric_decision_errors_total", {"reason": "bad-event"}) == 1
        # Whatever was decided left readable records.
        ids = loop.run_until_complete(store.recent_calls(1000))
        assert ids, "some fuzzed calls must have been decided"
        for record in loop.run_until_complete(store.get_many(ids)):
            assert record is not None and record["state"] in ("routing", "failed")
            assert record["outcome"] in ("agent", "sip", "reject", "webhook")
    finally:
        loop.run_until_complete(store.aclose())


def test_the_edge_decides_or_leaves_any_decide_event_to_the_controller(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edge")
    path, key = directory / "edge.policy", directory / "edge-policy.key"
    bundle.create_key(key)
    bundle.write(path, POLICY.source, bundle.read_key(key))
    decider = EdgeDecider(str(path), str(key), lambda level, message: None)

    tagged = []

    @settings(max_examples=300, deadline=None)
    @given(decide_messages(), st.booleans())
    def run(message, hot):
        outcome = decider.decide(json.dumps(message), lambda key: hot)
        if outcome.deferred:
            assert outcome.deferred in ("bad-request", "exact-counter", "hot", "webhook", "risk", "too-big"), outcome
            assert not outcome.answer and not outcome.event
            return
        answer = json.loads(outcome.answer)
        tagged.extend(line for line in _check_answer(message, answer) if line.startswith("X-Call: "))
        assert answer["action"] != "fallback"
        assert protocol.parse_decided(json.loads(outcome.event)).call_id  # the controller takes what it sends

    run()
    assert tagged, "the edge decided no call carrying the caller-derived headers: header injection was not tried"


@st.composite
def decided_messages(draw):
    """`decided` events as the edge sends them, then broken in one place (or replaced by anything)."""
    if draw(st.booleans()):
        return draw(st.dictionaries(TEXT, ANY_JSON, max_size=6)) | {"event": "decided"}
    message = {"event": "decided", "call_id": draw(TEXT), "tx": "1:2",
               "record": {"state": "routing", "outcome": "agent", "rule": "r", "policy_version": "v",
                          "created_at_ms": 1700000000000, "decision": {"x": [1]}, "src": draw(TEXT)},
               "timeline": {"event": "decided", "ts": 1, "note": draw(TEXT)},
               "live_scopes": {"tenant": "acme"},
               "counters": [["window:source:60", "window", "source", "192.0.2.1", 60, True, ""]]}
    where = draw(st.sampled_from(["record", "timeline", "live_scopes", "counters", "call_id", None]))
    if where == "counters":
        message["counters"] = [draw(st.lists(ANY_JSON, max_size=8))]
    elif where is not None:
        message[where] = draw(ANY_JSON)
    return message


def test_any_decided_event_is_recorded_or_refused_never_an_exception(redis_url, loop):
    store = CallStore(redis_url)
    metrics = Metrics()
    decisions = EdgeDecisions(lambda: POLICY, store, metrics, "fuzz")
    recorder = EdgeRecorder(decisions, Journal(store), metrics)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(decided_messages())
    def run(message):
        loop.run_until_complete(recorder.apply([message], source="fuzz"))

    try:
        run()
        refused = metrics.registry.get_sample_value("callfabric_decision_errors_total", {"reason": "bad-decided-event"})
        recorded = metrics.registry.get_sample_value("callfabric_edge_made_decisions_total", {"outcome": "agent"})
        assert refused and recorded, (refused, recorded)
        records = loop.run_until_complete(store.get_many(loop.run_until_complete(store.recent_calls(1000))))
        assert records
        for record in records:
            assert record is not None and record["state"] in ("routing", "failed") and record["controller"] == "fuzz"
    finally:
        loop.run_until_complete(store.aclose())


YAML_PIECES = st.sampled_from([
    "rules:", "  - name: r", "    match: {caller: '+44'}", "    actions: [route_agent: intake]", "default:",
    "  actions: [reject: {code: 603}]", "security:", "  detectors:", "    - {name: d, kind: match, score: 5}",
    "  outcomes: {ban: {at_least: 5, for: 1m}}", "agents: {x: {node_set: nowhere, endpoint: '1.2.3.4:5'}}",
    "risk_lists: {p: ['+1900']}", "- just a list", "key: [unclosed", "\t tab", "&anchor a: *anchor", "!!python/object:os.system x",
    "{", "%YAML 9.9", "settings: {timezone: Mars/Olympus}", "number_lists: {v: {file: /etc/passwd}}",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(YAML_PIECES, st.text(max_size=30)), max_size=12))
def test_any_policy_text_loads_or_is_refused_with_positions(lines):
    text = "\n".join(lines)
    try:
        policy = policy_from_texts({"p.yaml": DECLARATIONS, "fuzz.yaml": text})
    except PolicyInvalid as exc:
        assert exc.issues and all(i.position.line >= 1 and i.position.file in ("p.yaml", "fuzz.yaml")
                                  for i in exc.issues)
        return
    # a policy that loads decides: every call gets one of the four outcomes
    decision = policy.decide(Call(call_id="fuzz-1", from_user="+442079460000", to_user="02079460001",
                                  ruri_user="02079460001", src_ip="192.0.2.1"))
    assert decision.outcome in ("agent", "sip", "reject", "webhook") and decision.rule
