"""The edge's `decided` event encoder (controller/edge/local.py DecidedEvent), which pastes in
the parts of the event that depend only on the decision, encoded once: for any request the
example policies decide, the same JSON document as encoding the whole event at once."""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from controller.edge import protocol
from controller.edge.local import DecidedEvent, _json
from controller.edge.verdict import call_counters, verdict
from controller.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "policies")
# numbers the example policies route, reject and leave to webhooks, and any others
WEEKDAY_MORNING = datetime(2026, 11, 25, 15, tzinfo=timezone.utc)  # 10:00 in New York: no after-hours rule
DIALLED = ["18005550101", "18005550102", "18005550201", "18005550000", "19005551234", "18005550300", "+442079460001"]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def whole(call_id, tx, v, counters) -> str:
    """The event as edge/local.py encoded it before (every part at once)."""
    return _json({"event": "decided", "call_id": call_id, "tx": tx,
                  "record": {k: x for k, x in v.record.items() if x is not None}, "timeline": v.event,
                  "live_scopes": v.live_scopes, "counters": counters})


@st.composite
def requests(draw) -> dict:
    dialled = draw(st.one_of(st.sampled_from(DIALLED), st.from_regex(r"\+?[0-9]{3,15}", fullmatch=True)))
    return {"event": "decide", "tx": f"{draw(st.integers(0, 99999))}:{draw(st.integers(0, 99999))}",
            "call_id": draw(text.filter(bool)), "from_uri": draw(text), "from_user": draw(st.sampled_from(
                ["+14155550100", "+12025550123", "anonymous", ""]) | text), "from_tag": draw(text),
            "to_uri": f"sip:{dialled}@edge", "to_user": dialled, "ruri": f"sip:{dialled}@edge", "ruri_user": dialled,
            "src_ip": draw(st.sampled_from(["203.0.113.9", "127.0.0.1", "2001:db8::1", "bad"])),
            "src_port": draw(st.integers(0, 65535)), "transport": draw(st.sampled_from(["udp", "tcp", "tls", "ws"])),
            "trunk": draw(st.sampled_from(["", "carrier-a"])), "user_agent": draw(text),
            "headers": draw(st.dictionaries(st.sampled_from(["X-Tenant", "X-Caller-Tier", "Diversion", "X-Intent-Hint"]),
                                            st.lists(text, min_size=1, max_size=2), max_size=3))}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=4), st.floats(0, 50, allow_nan=False), st.booleans())
def test_the_decided_event_is_the_whole_event_encoded_at_once(messages, decide_ms, dropped):
    encoder = DecidedEvent()  # one per batch of requests: decisions met again come from its cache
    for message in messages * 2:
        parsed = protocol.parse_decide(message)
        facts = POLICY.compiled.facts(parsed.call)
        counters = call_counters(POLICY, facts)
        decision = POLICY.compiled.decide_facts(facts)
        if decision.outcome == "webhook" or decision.risk is not None:
            continue  # (left to the controller: no decided event)
        v = verdict(POLICY, parsed, facts, decision, counters, at_ms=1_700_000_000_123, decide_ms=decide_ms,
                    decided_by="edge", timeline_extra={"headers_dropped": ["X-Bad"]} if dropped else None)
        encoded = encoder.encode(parsed.call.call_id, parsed.tx, v.decision, v.record, v.event, v.live_scopes,
                                 counters)
        assert json.loads(encoded) == json.loads(whole(parsed.call.call_id, parsed.tx, v, counters))
        assert encoded.isascii()


def test_a_decision_seen_under_another_policy_version_is_encoded_again():
    message = {"event": "decide", "tx": "1:2", "call_id": "c@x", "ruri_user": "18005550101", "src_ip": "192.0.2.1"}
    parsed = protocol.parse_decide(message)
    facts = POLICY.compiled.facts(parsed.call)
    counters = call_counters(POLICY, facts)
    decision = POLICY.compiled.decide_facts(facts)
    encoder = DecidedEvent()
    for version in ("v1", "v2", "v1"):
        v = verdict(replace_version(POLICY, version), parsed, facts, decision, counters, at_ms=5, decide_ms=0.5,
                    decided_by="edge")
        event = json.loads(encoder.encode("c@x", "1:2", v.decision, v.record, v.event, v.live_scopes, counters))
        assert event["record"]["policy_version"] == event["timeline"]["policy_version"] == version
        assert event == json.loads(whole("c@x", "1:2", v, counters))


class replace_version:  # noqa: N801 (a policy seen with another version: what verdict reads of it)
    def __init__(self, policy, version):
        self._policy, self.version = policy, version

    def __getattr__(self, name):
        return getattr(self._policy, name)


def test_placeholder_decisions_do_not_grow_the_cache_without_bound():
    encoder = DecidedEvent()
    message = {"event": "decide", "tx": "1:2", "call_id": "c@x", "ruri_user": "18005550101", "src_ip": "192.0.2.1"}
    parsed = protocol.parse_decide(message)
    facts = POLICY.compiled.facts(parsed.call)
    counters = call_counters(POLICY, facts)
    for n in range(2000):  # a new decision object per call, like a rule with placeholders
        decision = replace(POLICY.compiled.decide_facts(facts), rule=f"r{n}")
        v = verdict(POLICY, parsed, facts, decision, counters, at_ms=5, decide_ms=0.5, decided_by="edge")
        assert json.loads(encoder.encode("c@x", "1:2", v.decision, v.record, v.event, v.live_scopes, counters)) \
            == json.loads(whole("c@x", "1:2", v, counters))
    assert len(encoder._decisions) <= 512


def test_probes_of_many_sources_do_not_grow_the_cache_without_bound():
    encoder = DecidedEvent()
    for n in range(1500):  # each source its own probes (7 per call with the example policies)
        message = {"event": "decide", "tx": "1:2", "call_id": "c@x", "ruri_user": "18005550101",
                   "src_ip": f"10.{n // 256}.{n % 256}.1"}
        parsed = protocol.parse_decide(message)
        facts = POLICY.compiled.facts(parsed.call)
        counters = call_counters(POLICY, facts)
        decision = POLICY.compiled.decide_facts(facts)
        v = verdict(POLICY, parsed, facts, decision, counters, at_ms=5, decide_ms=0.5, decided_by="edge")
        assert json.loads(encoder.encode("c@x", "1:2", v.decision, v.record, v.event, v.live_scopes, counters)) \
            == json.loads(whole("c@x", "1:2", v, counters))
    assert 0 < len(encoder._probes) <= 4096


def test_answers_of_one_decision_carry_their_call_s_tx_and_are_their_own():
    """verdict works the answer out once per decision: each call's is still what answer_for
    makes of it, with its own tx, and its own lists."""
    seen = set()
    for dialled in DIALLED:
        for caller in ("+14155550100", "+12025550123"):
            message = {"event": "decide", "tx": "1:2", "call_id": "c@x", "from_user": caller, "ruri_user": dialled,
                       "src_ip": "192.0.2.1"}
            parsed = protocol.parse_decide(message)
            facts = POLICY.compiled.facts(replace(parsed.call, at=WEEKDAY_MORNING))
            decision = POLICY.compiled.decide_facts(facts)
            if decision.outcome == "webhook":
                continue
            internal = [("X-Callfabric-Policy", POLICY.version), ("X-Callfabric-Rule", decision.rule)]
            if decision.outcome == "agent":
                internal.insert(0, ("X-Callfabric-Agent", decision.agent.name))
            answers = []
            for tx in ("1:2", "3:4"):
                v = verdict(POLICY, protocol.parse_decide({**message, "tx": tx}), facts, decision, [], at_ms=5,
                            decide_ms=0.5, decided_by="edge")
                expected, _ = protocol.answer_for(tx, decision, internal)
                assert v.answer == expected and list(v.answer) == list(expected)  # same keys, same order
                answers.append(v.answer)
            if "uris" in answers[0]:
                answers[0]["uris"].append("sip:x@y")
                assert "sip:x@y" not in answers[1]["uris"]
            seen.add(decision.outcome)
    assert {"agent", "sip", "reject"} <= seen
