"""Risk scoring in the policy (`security:`): validation with positions, what each detector
kind measures, how scores become outcomes, exemptions, the call-duration cap, explain and
operators' test cases."""
from __future__ import annotations

import textwrap

import pytest

from controller.policy import Call, PolicyInvalid, policy_from_texts
from controller.policy.testing import run_policy_tests
from tests.policy.helpers import AT, DECLARATIONS

SECURITY = textwrap.dedent("""\
    security:
      exempt: {source_ip: 192.0.2.0/24}
      detectors:
        - {name: premium-destination, kind: match, when: {destination_risk: premium}, score: 40}
        - {name: premium-burst, kind: destination_rate, lists: [premium], window: 10m, max: 3, score: 100}
        - {name: source-spike, kind: rate_spike, scope: source, window: 60s, baseline: 1h, factor: 5,
           min_calls: 20, score: 60}
        - {name: acme-concurrency, kind: concurrent_calls, scope: tenant, when: {tenant: acme}, max: 2, score: 70}
        - {name: short-calls, kind: short_calls, shorter_than: 4s, window: 60s, max: 5, score: 100}
        - {name: enumeration, kind: distinct_callees, window: 60s, max: 10, score: 100}
        - {name: asterisk-auth, kind: asterisk_security, window: 60s, max: 5, score: 100}
        - {name: acme-out-of-hours, kind: match, score: 40,
           when: {all: [{tenant: acme}, {not: {time: {days: mon-fri, hours: "08:00-18:00"}}}]}}
      outcomes:
        challenge: {at_least: 40, actions: [route_agent: billing]}
        reject: {at_least: 70, code: 403, reason: Fraud Suspected}
        ban: {at_least: 100, for: 15m}
      max_call_duration: 2h
""")


@pytest.fixture(scope="module")
def policy():
    return policy_from_texts({"p.yaml": DECLARATIONS, "security.yaml": SECURITY})


def call(src="198.51.100.7", to="02079460123", counters=None, at=AT, **kw) -> Call:
    return Call(call_id="sec-1", from_user="07700900999", to_user=to, ruri_user=to, src_ip=src, src_port=5060,
                at=at, counters=counters or {}, **kw)


def test_no_finding_means_the_rules_decide_with_the_duration_cap(policy):
    decision = policy.decide(call())
    assert decision.outcome == "agent" and decision.rule == "default" and decision.risk is None
    assert decision.max_duration_s == 7200


def test_a_risky_destination_alone_is_challenged(policy):
    decision = policy.decide(call(to="0909123456"))
    assert decision.rule == "security" and decision.outcome == "agent" and decision.agent.name == "billing"
    assert decision.risk.outcome == "challenge" and decision.risk.score == 40
    assert [f.detector for f in decision.risk.findings] == ["premium-destination"]


def test_a_burst_to_one_premium_prefix_is_banned_and_says_why(policy):
    decision = policy.decide(call(to="0909123456", counters={"risk:premium-burst": 3}))
    assert decision.outcome == "reject" and decision.reject_code == 403 and decision.reject_reason == "Forbidden"
    assert decision.risk.outcome == "ban" and decision.risk.ban_s == 900 and decision.risk.score == 140
    why = {f.detector: f.why for f in decision.risk.findings}
    assert why["premium-burst"] == "4 calls to prefix +44909 (premium) in 600s, more than 3"
    below = policy.decide(call(to="0909123456", counters={"risk:premium-burst": 2}))
    assert below.risk.outcome == "challenge"


@pytest.mark.parametrize("seen, baseline, fires", [
    (19, 19, True),      # 20 calls, no history: a new source at the minimum fires
    (18, 18, False),     # 19 calls: under min_calls
    (30, 3000, False),   # 31 calls vs a baseline of ~50 per minute: normal for this source
    (300, 3000, True),   # 301 calls vs ~46 per minute: ×6.5
])
def test_rate_spike_compares_with_the_learned_baseline(policy, seen, baseline, fires):
    decision = policy.decide(call(counters={"risk:source-spike:window": seen, "risk:source-spike:baseline": baseline}))
    found = [f.detector for f in decision.risk.findings] if decision.risk else []
    assert ("source-spike" in found) is fires
    if fires:
        assert decision.risk.outcome == "challenge" and decision.agent.name == "billing"  # score 60


def test_scores_add_up_to_the_outcome(policy):
    counters = {"risk:source-spike:window": 19, "risk:source-spike:baseline": 19}
    decision = policy.decide(call(to="0909123456", counters=counters))  # 40 + 60
    assert decision.risk.score == 100 and decision.risk.outcome == "ban"


def test_concurrency_cap_of_a_tenant(policy):
    acme = "203.0.113.9"
    assert policy.decide(call(src=acme, counters={"risk:acme-concurrency": 1})).risk is None
    decision = policy.decide(call(src=acme, counters={"risk:acme-concurrency": 2}))
    assert decision.risk.outcome == "reject"
    assert decision.risk.findings[0].why == "3 live calls for tenant acme, more than 2"
    # not measured for other tenants
    assert policy.decide(call(src="198.51.100.9", counters={"risk:acme-concurrency": 50})).risk is None


def test_short_calls_enumeration_and_asterisk_events_count_per_source(policy):
    for key, name, words in (("risk:short-calls", "short-calls", "shorter than 4s"),
                             ("risk:enumeration", "enumeration", "distinct numbers"),
                             ("risk:asterisk-auth", "asterisk-auth", "Asterisk security events")):
        quiet = policy.decide(call(counters={key: 4}))
        assert quiet.risk is None, key
        loud = policy.decide(call(counters={key: 10 if name == "enumeration" else 5}))
        assert loud.risk.outcome == "ban" and loud.risk.findings[0].detector == name and words in loud.risk.findings[0].why


def test_a_tenant_calling_outside_its_window(policy):
    saturday = AT.replace(day=28)
    decision = policy.decide(call(src="203.0.113.9", at=saturday))
    assert decision.risk.outcome == "challenge" and decision.risk.findings[0].detector == "acme-out-of-hours"
    assert policy.decide(call(src="203.0.113.9")).risk is None  # Wednesday 10:00


def test_exempt_sources_are_not_scored(policy):
    decision = policy.decide(call(src="192.0.2.10", to="0909123456", counters={"risk:premium-burst": 99}))
    assert decision.risk is None and decision.rule == "default"
    assert policy.compiled.security.probes(policy.compiled.facts(call(src="192.0.2.10"))) == []


def test_probes_name_the_counters_of_this_call(policy):
    facts = policy.compiled.facts(call(src="203.0.113.9", to="0909123456"))
    probes = {p.key: p for p in policy.compiled.security.probes(facts)}
    assert probes["risk:premium-burst"].scope == "dest" and probes["risk:premium-burst"].value == "+44909"
    assert probes["risk:acme-concurrency"].kind == "live" and probes["risk:acme-concurrency"].value == "acme"
    assert probes["risk:enumeration"].kind == "distinct" and probes["risk:enumeration"].member == "+44909123456"
    assert probes["risk:short-calls"].count is False and probes["risk:asterisk-auth"].count is False
    assert probes["risk:source-spike:baseline"].window_s == 3600
    other = policy.compiled.security.probes(policy.compiled.facts(call(src="198.51.100.7")))
    assert "risk:premium-burst" not in {p.key for p in other}  # not a premium destination: nothing to count


def test_a_rule_duration_below_the_cap_is_kept():
    rules = "rules:\n  - {name: short, match: {callee: '02079460123'}, actions: [route_agent: intake, max_duration: 10m]}\n"
    policy = policy_from_texts({"p.yaml": DECLARATIONS, "s.yaml": SECURITY, "r.yaml": rules})
    assert policy.decide(call()).max_duration_s == 600
    assert policy.decide(call(to="02079460999")).max_duration_s == 7200


def test_explain_shows_the_score_and_the_reasons(policy):
    explanation = policy.explain(call(to="0909123456", counters={"risk:premium-burst": 3}))
    assert explanation.decision.risk.outcome == "ban"
    (trace,) = explanation.traces
    assert trace.rule == "security" and "risk score 140 → ban" in trace.reason and "premium-burst (+100)" in trace.reason
    allowed = policy.explain(call())
    assert allowed.traces[-1].rule == "default"


def test_operators_test_cases_can_expect_risk_outcomes(tmp_path):
    (tmp_path / "p.yaml").write_text(DECLARATIONS)
    (tmp_path / "security.yaml").write_text(SECURITY)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "fraud.yaml").write_text(textwrap.dedent("""\
        tests:
          - name: premium burst is banned
            call: {from: "07700900999", to: "0909123456", src: 198.51.100.7, at: "2026-11-25T10:00:00",
                   counters: {"risk:premium-burst": 3}}
            expect: {outcome: reject, rule: security, risk: ban, findings: [premium-destination, premium-burst]}
          - name: wrong expectation
            call: {from: "07700900999", to: "02079460123", src: 198.51.100.7, at: "2026-11-25T10:00:00"}
            expect: {risk: ban}
    """))
    from controller.policy import load_policy
    results, problems = run_policy_tests(load_policy(tmp_path), str(tmp_path))
    assert problems == []
    assert [r.passed for r in results] == [True, False]
    assert '"risk": "ban"' in results[1].diff and '"risk": null' in results[1].diff


BAD = textwrap.dedent("""\
    security:
      detectors:
        - {name: a, kind: destination_rate, lists: [premum], window: 10m, score: 100}
        - {name: a, kind: match, when: {tenant: acme}, score: 5}
        - {name: b, kind: rate_spike, scope: global, window: 60s, baseline: 90s, score: 5, max: 3}
        - {name: c, kind: short_calls, max: 0, score: 5}
      outcomes:
        challenge: {at_least: 80, actions: [{ask_webhook: {url: "http://x/", fallback: [route_agent: intake]}}]}
        reject: {at_least: 60}
        ban: {at_least: 100, for: 15x}
""")


def test_every_security_error_is_reported_with_its_position():
    with pytest.raises(PolicyInvalid) as info:
        policy_from_texts({"p.yaml": DECLARATIONS, "security.yaml": BAD})
    messages = [str(i) for i in info.value.issues if i.severity == "error"]
    expected = [
        "security.yaml:3:7: error: security.detectors[0]: a destination_rate detector needs 'max'",
        "security.yaml:3:49: error: security.detectors[0].lists[0]: unknown risk list 'premum' (did you mean 'premium'?)",
        "security.yaml:4:14: error: security.detectors[1].name: detector 'a' is already defined at security.yaml:3:7",
        "security.yaml:5:42: error: security.detectors[2].scope: a rate_spike detector counts per source / tenant, "
        "not 'global'",
        "security.yaml:5:73: error: security.detectors[2].baseline: the baseline (90s) must be at least twice the "
        "window (60s) to learn from",
        "security.yaml:5:88: error: security.detectors[2].max: a rate_spike detector does not use 'max' (it reads: "
        "baseline, factor, min_calls, scope, when, window)",
        "security.yaml:6:41: error: security.detectors[3].max: a short_calls detector with max 0 would fire on every "
        "call (use ≥ 1)",
        "security.yaml:8:55: error: security.outcomes.challenge.actions[0].ask_webhook: a challenge routes the call "
        "(to an IVR, a human); it cannot ask a webhook",
        "security.yaml:9:24: error: security.outcomes.reject.at_least: reject must need a higher score than challenge "
        "(60 ≤ 80)",
        "security.yaml:10:31: error: security.outcomes.ban.for: '15x' is not a duration such as 90, 90s, 15m, 2h or "
        "250ms",
    ]
    assert messages == expected


def test_detectors_without_outcomes_and_a_second_security_section_are_refused():
    lonely = "security:\n  detectors: [{name: a, kind: match, when: {tenant: acme}, score: 5}]\n"
    with pytest.raises(PolicyInvalid) as info:
        policy_from_texts({"p.yaml": DECLARATIONS, "a.yaml": lonely, "b.yaml": "security: {max_call_duration: 1h}\n"})
    text = str(info.value)
    assert "a.yaml:2:3: error: security: detectors score calls but no outcome uses the score" in text
    assert "b.yaml:1:1: error: security: the security section is already given at a.yaml:1:1" in text


def test_a_rule_cannot_be_called_security():
    rules = "rules:\n  - {name: security, actions: [route_agent: intake]}\n"
    with pytest.raises(PolicyInvalid, match=r"r.yaml:2:12: error: rules\[0\].name: 'security' is reserved"):
        policy_from_texts({"p.yaml": DECLARATIONS, "r.yaml": rules})


def test_a_detector_whose_condition_reads_counters_sees_the_counters_handed_over():
    """The controller derives the facts, asks which counters the detectors need, then hands
    them over: a detector's `when` reading a counter is judged on the counts, not on the
    empty counters it was first asked with."""
    policy = policy_from_texts({"p.yaml": DECLARATIONS, "security.yaml": textwrap.dedent("""\
        security:
          detectors:
            - {name: busy-source, kind: match, when: {calls_in_window: {scope: source, window: 60s, at_least: 3}},
               score: 40}
          outcomes:
            challenge: {at_least: 40, actions: [route_agent: billing]}
        """)})
    facts = policy.compiled.facts(call())
    assert policy.compiled.security.probes(facts) == []  # asked before any count is known
    facts.counters = {"window:source:60": 5}
    decision = policy.compiled.decide_facts(facts)
    assert decision.risk is not None and [f.detector for f in decision.risk.findings] == ["busy-source"]
    quiet = policy.compiled.facts(call())
    quiet.counters = {"window:source:60": 2}
    assert policy.compiled.decide_facts(quiet).risk is None
