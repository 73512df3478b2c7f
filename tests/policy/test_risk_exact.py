"""Risk detectors exactly: the counters each kind asks for (key, kind, scope, value, window,
counted or not, member), the value at which each fires (one below: silent), the arithmetic of a
rate spike, the words of each finding, and what each outcome imposes on the call."""
from __future__ import annotations

import datetime
import textwrap

import pytest

from controller.policy import Call, policy_from_texts
from controller.policy.model import CounterProbe, Finding
from controller.policy.risk import ASTERISK_SECURITY_SCOPE, SHORT_CALLS_SCOPE, _compact
from tests.policy.helpers import AT, DECLARATIONS

SECURITY = textwrap.dedent("""\
    security:
      detectors:
        - {name: dest, kind: destination_rate, lists: [shortp, longp], window: 10m, max: 3, score: 10}
        - {name: spike, kind: rate_spike, scope: source, window: 60s, baseline: 1h, factor: 5, min_calls: 20,
           score: 10}
        - {name: live, kind: concurrent_calls, scope: tenant, max: 2, score: 10}
        - {name: short, kind: short_calls, shorter_than: 4s, window: 60s, max: 5, score: 10}
        - {name: enum, kind: distinct_callees, window: 60s, max: 10, score: 10}
        - {name: ast, kind: asterisk_security, window: 60s, max: 5, score: 10}
        - {name: all-live, kind: concurrent_calls, scope: global, max: 1000, score: 10}
      outcomes:
        challenge: {at_least: 10, actions: [route_agent: billing, max_duration: 2h]}
        reject: {at_least: 30, code: 486, reason: Busy Tonight}
        ban: {at_least: 50, for: 10m, code: 603}
      max_call_duration: 1h
    """)
DECL = DECLARATIONS.replace('risk_lists:\n  premium: ["+44909", "+4487"]\n',
                            'risk_lists:\n  shortp: ["+4490"]\n  longp: ["+449091"]\n')
assert DECL != DECLARATIONS


# Compiled per test, not per module: bench/mutation.py runs, for a mutant, the tests during
# which its function ran, and a module fixture compiles only during the first of them.
@pytest.fixture
def security():
    policy = policy_from_texts({"a.yaml": DECL, "b.yaml": SECURITY})
    return policy, policy.compiled.security


def facts(policy, ruri="+449091234", counters=None, tenant_header=None):
    headers = {"X-Tenant": [tenant_header]} if tenant_header else {}
    f = policy.compiled.facts(Call(call_id="c-1", from_user="+442079460000", to_user=ruri, ruri_user=ruri,
                                   src_ip="192.0.2.7", headers=headers, at=AT))
    f.counters = dict(counters or {})
    return f


def by_key(probes):
    return {p.key: p for p in probes}


def test_each_detector_kind_asks_for_its_own_counters(security):
    policy, sec = security
    probes = by_key(sec.probes(facts(policy, tenant_header="initech")))
    assert probes["risk:dest"] == CounterProbe("risk:dest", "window", "dest", "+449091", 600)  # the longest prefix
    assert probes["risk:spike:window"] == CounterProbe("risk:spike:window", "window", "source", "192.0.2.7", 60)
    assert probes["risk:spike:baseline"] == CounterProbe("risk:spike:baseline", "window", "source", "192.0.2.7",
                                                         3600)
    assert probes["risk:live"] == CounterProbe("risk:live", "live", "tenant", "initech")
    assert probes["risk:short"] == CounterProbe("risk:short", "window", SHORT_CALLS_SCOPE, "192.0.2.7", 60,
                                                count=False)
    assert probes["risk:enum"] == CounterProbe("risk:enum", "distinct", "callees:source", "192.0.2.7", 60,
                                               member="+449091234")
    assert probes["risk:ast"] == CounterProbe("risk:ast", "window", ASTERISK_SECURITY_SCOPE, "192.0.2.7", 60,
                                              count=False)
    assert probes["risk:all-live"].scope == "global" and probes["risk:all-live"].kind == "live"


def test_a_call_without_the_scope_value_asks_nothing_of_that_detector(security):
    policy, sec = security
    keys = set(by_key(sec.probes(facts(policy, ruri="+442079460001"))))  # no tenant, no risk prefix
    assert "risk:dest" not in keys and "risk:live" not in keys and "risk:spike:window" in keys


def test_the_limits_are_the_values_each_detector_fires_at(security):
    _, sec = security
    assert sec.limits() == {"risk:dest": 3, "risk:spike:window": 19, "risk:live": 2, "risk:short": 5,
                            "risk:enum": 10, "risk:ast": 5, "risk:all-live": 1000}


@pytest.mark.parametrize("key, silent, fires, why", [
    # the call itself counts (+1) where the detector counts calls; short calls and Asterisk events do not
    ("risk:dest", 2, 3, "4 calls to prefix +449091 (longp) in 600s, more than 3"),
    ("risk:live", 1, 2, "3 live calls for tenant initech, more than 2"),
    ("risk:enum", 9, 10, "11 distinct numbers called by source 192.0.2.7 in 60s, more than 10"),
    ("risk:short", 4, 5, "5 answered calls shorter than 4s from source 192.0.2.7 in 60s (at most 4)"),
    ("risk:ast", 4, 5, "5 Asterisk security events from source 192.0.2.7 in 60s"),
])
def test_each_detector_fires_exactly_at_its_limit_and_says_why(security, key, silent, fires, why):
    policy, sec = security
    name = key.split(":")[1]
    quiet = sec.assess(facts(policy, counters={key: silent}, tenant_header="initech"))
    assert quiet is None or name not in {x.detector for x in quiet.findings}
    risk = sec.assess(facts(policy, counters={key: fires}, tenant_header="initech"))
    (finding,) = [x for x in risk.findings if x.detector == name]
    assert finding.why == why and finding.score == 10


def test_a_rate_spike_compares_the_window_with_the_rest_of_the_baseline(security):
    policy, sec = security
    # 19 seen + this call = 20 (min_calls); the hour held 20 more: 20 * 60 / 3540 per minute expected
    risk = sec.assess(facts(policy, ruri="+442079460001", counters={"risk:spike:window": 19,
                                                                   "risk:spike:baseline": 39}))
    (finding,) = risk.findings
    assert finding.why == ("20 calls in 60s from source 192.0.2.7; its baseline is 0.3 per 60s "
                           "(spike at ×5, at least 20)")
    # a baseline high enough that 20 calls are no spike (20 < 5 × 4.02)
    assert sec.assess(facts(policy, ruri="+442079460001", counters={"risk:spike:window": 19,
                                                                    "risk:spike:baseline": 19 + 237})) is None
    # exactly at factor × expected: it fires (>=)
    at = sec.assess(facts(policy, ruri="+442079460001", counters={"risk:spike:window": 19,
                                                                  "risk:spike:baseline": 19 + 236}))
    assert at is not None and "baseline is 4.0 per 60s" in at.findings[0].why
    # below min_calls: silent whatever the baseline
    assert sec.assess(facts(policy, ruri="+442079460001", counters={"risk:spike:window": 18})) is None


def test_global_scope_is_named_all_calls(security):
    policy, sec = security
    risk = sec.assess(facts(policy, ruri="+442079460001", counters={"risk:all-live": 1000}))
    assert risk.findings[0].why == "1001 live calls for all calls, more than 1000"


@pytest.mark.parametrize("score_counters, outcome", [
    ({"risk:ast": 5}, "challenge"),                                         # 10
    ({"risk:ast": 5, "risk:short": 5, "risk:enum": 10}, "reject"),          # 30
    ({"risk:ast": 5, "risk:short": 5, "risk:enum": 10, "risk:dest": 3, "risk:live": 2}, "ban"),  # 50
])
def test_scores_add_up_to_the_outcome(security, score_counters, outcome):
    policy, sec = security
    risk = sec.assess(facts(policy, counters=score_counters, tenant_header="initech"))
    assert risk.outcome == outcome and risk.score == 10 * len(risk.findings)
    assert (risk.ban_s == 600) if outcome == "ban" else (risk.ban_s in (None, 0))


def test_what_each_outcome_imposes(security):
    policy, sec = security
    f = facts(policy, counters={"risk:ast": 5, "risk:short": 5, "risk:enum": 10, "risk:dest": 3, "risk:live": 2},
              tenant_header="initech")
    ban = sec.assess(f)
    banned = sec.decision(ban, f, "v1")
    assert (banned.outcome, banned.rule, banned.reject_code, banned.reject_reason, banned.policy_version,
            banned.applied_rules, banned.risk) == ("reject", "security", 603, "Decline", "v1", ("security",), ban)
    assert banned.tenant == "initech"
    f = facts(policy, counters={"risk:ast": 5, "risk:short": 5, "risk:enum": 10})
    rejected = sec.decision(sec.assess(f), f, "v1")
    assert (rejected.reject_code, rejected.reject_reason) == (486, "Busy Tonight")
    f = facts(policy, counters={"risk:ast": 5})
    challenged = sec.decision(sec.assess(f), f, "v1")
    assert challenged.outcome == "agent" and challenged.agent.name == "billing" and challenged.rule == "security"
    assert challenged.max_duration_s == 3600  # the challenge asked 2 h: the policy-wide cap wins
    assert challenged.risk.outcome == "challenge"


def test_the_call_duration_cap(security):
    policy, sec = security
    plain = policy.decide(Call(call_id="c-2", from_user="+442079460000", to_user="02079460001",
                               ruri_user="02079460001", src_ip="203.0.113.5", at=AT))
    assert plain.max_duration_s == 3600  # no duration from the rules: the cap
    from dataclasses import replace
    shorter = replace(plain, max_duration_s=60)
    assert sec.cap(shorter) is shorter
    exactly = replace(plain, max_duration_s=3600)
    assert sec.cap(exactly) is exactly
    assert sec.cap(replace(plain, max_duration_s=3601)).max_duration_s == 3600
    rejected = replace(plain, outcome="reject", max_duration_s=None)
    assert sec.cap(rejected) is rejected


def test_compact_keeps_short_text_and_cuts_long_text_at_160():
    assert _compact({"tenant": "acme", "n": [1, 2]}) == '{"tenant":"acme","n":[1,2]}'
    assert _compact({"name": "é"}) == '{"name":"é"}'
    long = _compact({"k": "x" * 500})
    assert len(long) == 160 and long.endswith("…") and long.startswith('{"k":"xxx')
    assert _compact("y" * 158) == '"' + "y" * 158 + '"'  # 160 exactly: kept whole


MORE = textwrap.dedent("""\
    trunks:
      carrier-b:
        inbound: {sources: ["198.51.100.0/24"]}
    security:
      exempt: {tenant: acme}
      detectors:
        - {name: premium, kind: match, when: {destination_risk: premium}, score: 5}
        - {name: burst, kind: rate_spike, scope: source, window: 60s, baseline: 120s, factor: 5, min_calls: 1,
           score: 5}
        - {name: short, kind: short_calls, shorter_than: 4s, window: 60s, max: 2, score: 50}
      outcomes:
        challenge: {at_least: 10, actions: [route_agent: billing]}
        ban: {at_least: 50, for: 10m, code: 499}
      max_call_duration: 1h
    rules:
      - name: hook
        match: {callee: {prefix: "+4420"}}
        actions: [ask_webhook: {url: "https://app.example.com/hook", fallback: [route_agent: billing]}]
    """)
QUIET_BURST = {"risk:burst:window": 0, "risk:burst:baseline": 10}  # 1 call against 10 expected


@pytest.fixture
def more():
    policy = policy_from_texts({"a.yaml": DECLARATIONS, "b.yaml": MORE})
    return policy, policy.compiled.security


def call_facts(policy, ruri="+449091234", src_ip="192.0.2.7", counters=None, trunk=None):
    f = policy.compiled.facts(Call(call_id="c-9", from_user="+442079460000", to_user=ruri, ruri_user=ruri,
                                   src_ip=src_ip, at=AT, trunk=trunk))
    f.counters = dict(counters or {})
    return f


def test_a_match_detector_asks_no_counter_and_says_what_it_matched(more):
    policy, sec = more
    f = call_facts(policy, counters=QUIET_BURST)
    assert {p.key for p in sec.probes(f)} == {"risk:burst:window", "risk:burst:baseline", "risk:short"}
    risk = sec.assess(f)
    assert (risk.score, risk.outcome, risk.findings) == (
        5, "allow", (Finding("premium", 5, 'matched {"destination_risk":"premium"}'),))


def test_a_rate_spike_of_at_least_one_call_fires_on_a_source_with_no_history(more):
    policy, sec = more
    assert sec.limits()["risk:burst:window"] == 0
    risk = sec.assess(call_facts(policy, ruri="+442079460001"))  # no baseline at all: nothing expected
    assert [x.detector for x in risk.findings] == ["burst"]
    assert risk.findings[0].why.startswith("1 calls in 60s from source 192.0.2.7; its baseline is 0.0 per 60s")
    # the baseline's own calls beyond the window make the expectation: 1 more in 60 s is no spike at ×5
    assert sec.assess(call_facts(policy, ruri="+442079460001",
                                 counters={"risk:burst:window": 0, "risk:burst:baseline": 1})) is None


def test_an_exempt_call_is_neither_counted_nor_scored(more):
    policy, sec = more
    f = call_facts(policy, src_ip="203.0.113.5", counters={"risk:short": 9})  # acme's trunk
    assert f.tenant == "acme"
    assert sec.probes(f) == [] and sec.assess(f) is None


def test_a_ban_with_a_code_without_a_phrase_says_forbidden_and_keeps_the_trunk(more):
    policy, sec = more
    f = call_facts(policy, src_ip="198.51.100.5", counters={"risk:short": 2, **QUIET_BURST}, trunk="carrier-b")
    assert f.trunk == "carrier-b"
    risk = sec.assess(f)
    assert (risk.outcome, risk.score) == ("ban", 55)
    banned = sec.decision(risk, f, "v7")
    assert (banned.reject_code, banned.reject_reason, banned.trunk, banned.policy_version) == (
        499, "Forbidden", "carrier-b", "v7")


def test_a_challenge_carries_the_policy_version(more):
    policy, sec = more
    f = call_facts(policy)  # premium (5) + a first burst (5)
    risk = sec.assess(f)
    assert risk.outcome == "challenge"
    challenged = sec.decision(risk, f, "v7")
    assert (challenged.outcome, challenged.policy_version, challenged.risk) == ("agent", "v7", risk)


def test_the_cap_reaches_a_webhooks_fallback(more):
    policy, sec = more
    d = policy.decide(Call(call_id="c-10", from_user="+442079460000", to_user="+442079460001",
                           ruri_user="+442079460001", src_ip="203.0.113.5", at=AT))
    assert d.outcome == "webhook" and d.max_duration_s == 3600
    assert d.webhook.url == "https://app.example.com/hook" and d.webhook.fallback.max_duration_s == 3600
    assert sec.cap(d) is d


def test_which_detectors_end_short_calls_and_which_watch_asterisk(more, security):
    _, sec = more
    assert [d.name for d in sec.ends_short_calls()] == ["short"] and sec.watches_asterisk() == ()
    _, full = security
    assert [d.name for d in full.watches_asterisk()] == ["ast"]


def test_compact_writes_what_json_cannot_as_text():
    assert _compact({"on": datetime.date(2030, 1, 2)}) == '{"on":"2030-01-02"}'


def test_probes_are_made_once_per_scope_value_and_kept_within_a_bound(more):
    from controller.policy.risk import MAX_PROBED_VALUES
    policy, sec = more
    first = sec.probes(call_facts(policy, src_ip="192.0.2.7"))
    again = sec.probes(call_facts(policy, src_ip="192.0.2.7"))
    other = sec.probes(call_facts(policy, src_ip="192.0.2.8"))
    assert first == again and all(a is b for a, b in zip(first, again))  # the same probes, made once
    assert {p.value for p in other} == {"192.0.2.8"} and {p.key for p in other} == {p.key for p in first}
    kept = [m for m in sec.measures if m.d.kind not in ("match", "distinct_callees")]
    for n in range(MAX_PROBED_VALUES + 10):
        sec.probes(call_facts(policy, src_ip=f"10.{n // 256}.{n % 256}.1"))
        assert all(len(m._made) <= MAX_PROBED_VALUES for m in kept)  # at no time more
    assert kept and all(len(m._made) > 0 for m in kept)
