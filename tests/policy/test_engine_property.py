"""Property: on random policies and random calls, the compiled engine (closures + rule
index) decides exactly what the reference evaluator decides."""
import os
from datetime import datetime, timedelta, timezone

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from controller.policy import Call, policy_from_texts
from tests.policy.helpers import DECLARATIONS

NUMBERS = ["+442079460000", "+442079460001", "02079460002", "+448001234567", "08001234568", "+449091234567",
           "+447700900123", "07700900123", "alice", "999", "+15551234567"]
PREFIXES = ["+44", "+4420", "+44207946", "+44800", "+4490", "+1", "+4477"]
REGEXES = ["^\\+44", "0$", "[13579]$", "alice", "^\\+4480"]
CIDRS = ["192.0.2.0/24", "203.0.113.0/25", "10.0.0.1", "198.51.100.0/24"]
SOURCES = ["192.0.2.10", "203.0.113.5", "203.0.113.200", "10.0.0.1", "198.51.100.9", "2001:db8::1", "junk"]
HEADERS = {"X-Lang": ["fr", "en", "FR"], "X-Tenant": ["globex", "initech", "other"], "X-Priority": ["1", "urgent"]}


def one_or_many(strategy):
    return st.one_of(strategy, st.lists(strategy, min_size=1, max_size=3))


number_match = st.one_of(
    st.sampled_from(NUMBERS),
    st.fixed_dictionaries({}, optional={
        "exact": one_or_many(st.sampled_from(NUMBERS)),
        "prefix": one_or_many(st.sampled_from(PREFIXES)),
        "regex": st.sampled_from(REGEXES),
        "in_list": st.sampled_from(["vip", ["vip"]]),
    }).filter(bool),
)
leaf = st.one_of(
    st.builds(lambda k, v: {k: v}, st.sampled_from(["caller", "callee", "ruri"]), number_match),
    st.builds(lambda v: {"source_ip": v}, one_or_many(st.sampled_from(CIDRS))),
    st.builds(lambda v: {"transport": v}, one_or_many(st.sampled_from(["udp", "tcp", "tls"]))),
    st.builds(lambda name, mode, value, fold: {"header": {"name": name, mode: value, **({"ignore_case": fold} if mode != "present" else {})}},
              st.sampled_from(list(HEADERS)), st.sampled_from(["present", "equals", "regex"]),
              st.sampled_from(["fr", "FR", "1"]), st.booleans()).map(
        lambda c: {"header": {**c["header"], "present": True}} if "present" in c["header"] else c),
    st.builds(lambda v: {"tenant": v}, one_or_many(st.sampled_from(["acme", "globex", "initech"]))),
    st.builds(lambda tz, days, hours: {"time": {k: v for k, v in (("tz", tz), ("days", days), ("hours", hours)) if v}},
              st.sampled_from([None, "Europe/London", "America/New_York"]),
              st.sampled_from([None, "mon-fri", "weekend", ["sat"], "fri-mon"]),
              st.sampled_from([None, "09:00-17:00", "22:00-06:00", ["08:00-12:00", "13:00-17:00"]])).filter(
        lambda c: set(c["time"]) - {"tz"}),
    st.builds(lambda p, o, seed: {"split": {"percent": p, "offset": o, "seed": seed}},
              st.sampled_from([10, 25, 50]), st.sampled_from([0, 25, 50]), st.sampled_from(["", "s1"])),
    st.builds(lambda v: {"destination_risk": v}, st.sampled_from(["premium", ["premium"]])),
    st.builds(lambda scope, n: {"calls_in_window": {"scope": scope, "window": 60, "at_least": n}},
              st.sampled_from(["source", "tenant", "global"]), st.integers(1, 4)),
    st.builds(lambda n: {"concurrent_calls": {"scope": "tenant", "at_least": n}}, st.integers(1, 4)),
)
condition = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda items: {"all": items}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda items: {"any": items}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda c: {"not": c}, inner),
        st.builds(lambda a, b: {**b, **a}, inner, inner),  # several keys in one mapping: all hold
    ),
    max_leaves=6,
)
# Conditions the compiled engine indexes rules by (exact number, list, prefix, tenant), on their own
# or next to others, so that the index is exercised, not only the closures.
indexable = st.one_of(
    st.builds(lambda k, v: {k: v}, st.sampled_from(["caller", "callee", "ruri"]), st.one_of(
        st.sampled_from(NUMBERS),
        st.builds(lambda v: {"prefix": v}, one_or_many(st.sampled_from(PREFIXES))),
        st.builds(lambda v: {"exact": v}, one_or_many(st.sampled_from(NUMBERS))),
        st.just({"in_list": "vip"}),
        st.builds(lambda p, r: {"prefix": p, "regex": r}, st.sampled_from(PREFIXES), st.sampled_from(REGEXES)),
    )),
    st.builds(lambda v: {"tenant": v}, one_or_many(st.sampled_from(["acme", "globex", "initech"]))),
)
rule_match = st.one_of(condition, indexable, st.builds(lambda a, b: {**b, **a}, indexable, condition),
                       st.builds(lambda a, b: {"all": [a, b]}, indexable, condition))
terminal = st.sampled_from([{"route_agent": "intake"}, {"route_agent": "billing"}, {"route_sip": "pbx"},
                            {"reject": 403}, {"ask_webhook": {"url": "http://h", "fallback": [{"reject": 503}]}}])
modifiers = st.lists(st.sampled_from([{"add_headers": {"X-A": "${caller}"}}, {"add_headers": {"X-B": "b"}},
                                      {"fork": "stt"}, {"max_duration": 60}]), max_size=2, unique_by=lambda a: list(a)[0])


@st.composite
def rules(draw):
    out = []
    for i in range(draw(st.integers(0, 10))):
        rule = {"name": f"r{i}"}
        if draw(st.booleans()) or i == 0:
            rule["match"] = draw(rule_match)
        cont = draw(st.integers(0, 4)) == 0
        rule["actions"] = draw(modifiers) + ([{"continue": True}] if cont else [draw(terminal)])
        if draw(st.integers(0, 9)) == 0:
            rule["enabled"] = False
        out.append(rule)
    return out


calls = st.builds(
    lambda frm, to, ruri, src, transport, headers, minutes, call_id, counters: Call(
        call_id=call_id, from_user=frm, to_user=to, ruri_user=ruri, src_ip=src, transport=transport,
        headers=headers, at=datetime(2026, 11, 23, tzinfo=timezone.utc) + timedelta(minutes=minutes), counters=counters),
    st.sampled_from(NUMBERS), st.sampled_from(NUMBERS), st.sampled_from(NUMBERS + [""]), st.sampled_from(SOURCES),
    st.sampled_from(["udp", "tcp", "tls", "TCP"]),
    st.dictionaries(st.sampled_from(list(HEADERS)), st.sampled_from(["fr", "FR", "1", "globex", "initech"]), max_size=3),
    st.integers(0, 7 * 24 * 60), st.text(min_size=0, max_size=8),
    st.fixed_dictionaries({}, optional={"window:source:60": st.integers(0, 5), "window:tenant:60": st.integers(0, 5),
                                        "window:global:60": st.integers(0, 5), "live:tenant": st.integers(0, 5)}),
)


# bench/mutation.py runs this once per mutant: fewer examples there (and a fixed seed, so a
# mutant is judged the same on every run)
EXAMPLES = int(os.environ.get("CALLFABRIC_PROPERTY_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=EXAMPLES != 300)
@given(rules=rules(), batch=st.lists(calls, min_size=1, max_size=15))
def test_compiled_engine_agrees_with_the_reference(rules, batch):
    policy = policy_from_texts({"a.yaml": DECLARATIONS, "b.yaml": yaml.safe_dump({"rules": rules})})
    for c in batch:
        assert policy.compiled.decide(c) == policy.reference.decide(c), (rules, c)
