"""The compiled evaluator exactly: which rules the index offers a call (and so which can win),
decisions shared between calls only when they read nothing of the call, the counters a
policy asks the edge for, the outcome of a low risk score, and the conditions whose parts
the other tests reach only through the index. Every policy is compiled per test: bench/
mutation.py runs, for a mutant, only the tests during which its function ran."""
from __future__ import annotations

import pytest

from controller.policy import compile as compiled_module
from controller.policy.conditions import split_bucket
from controller.policy.model import CounterSpec
from tests.policy.helpers import call, policy_with

INDEXED = """\
    rules:
      - {name: exact-callee, match: {callee: "+442079460001"}, actions: [reject: 403]}
      - {name: prefix-in-all, match: {all: [{caller: {prefix: "+4420"}}, {transport: tcp}]}, actions: [reject: 403]}
      - {name: vip-callee, match: {callee: {in_list: [vip]}, transport: tcp}, actions: [reject: 403]}
      - {name: exact-over-list, match: {callee: {in_list: [vip]}, caller: "+441234567890"}, actions: [reject: 403]}
      - {name: list-over-prefix, match: {caller: {prefix: "+4420"}, callee: {in_list: [vip]}, transport: tcp}, actions: [reject: 403]}
      - {name: acme, match: {tenant: acme}, actions: [reject: 403]}
      - {name: unindexed, match: {transport: tls}, actions: [reject: 403]}
      - {name: second-hit, match: {caller: {prefix: "+4420"}, transport: udp}, actions: [route_agent: billing]}
      - {name: prefix-over-tenant, match: {tenant: acme, caller: {prefix: "+4420"}, transport: tcp}, actions: [reject: 403]}
    """


def candidates(policy, **fields) -> list[str]:
    compiled = policy.compiled
    return [compiled.rules[p].name for p in compiled._candidates(compiled.facts(call(**fields)))]


def test_the_index_offers_a_call_only_the_rules_its_numbers_or_tenant_can_match():
    policy = policy_with(INDEXED)
    # no index entry for this call: the unindexed rules only
    assert candidates(policy, from_user="+15550001111", to_user="+15550002222") == ["unindexed"]
    # one entry (the exact callee)
    assert candidates(policy, from_user="+15550001111", to_user="+442079460001") == ["exact-callee", "unindexed"]
    # a rule keyed by the conjunct inside `all`; an exact number is preferred to a list, a list to a prefix
    assert candidates(policy, from_user="+442079460005", to_user="+15550002222") == [
        "prefix-in-all", "unindexed", "second-hit", "prefix-over-tenant"]
    assert candidates(policy, from_user="+15550001111", to_user="+442079460000") == [
        "vip-callee", "list-over-prefix", "unindexed"]
    assert candidates(policy, from_user="+441234567890", to_user="+15550002222") == ["exact-over-list", "unindexed"]
    # a prefix is preferred to a tenant
    assert candidates(policy, from_user="+15550001111", to_user="+15550002222", src_ip="203.0.113.9") == [
        "acme", "unindexed"]
    # three entries at once (list callee, prefix caller, tenant): every rule of each, in policy order
    assert candidates(policy, from_user="+442079460005", to_user="+442079460000", src_ip="203.0.113.9") == [
        "prefix-in-all", "vip-callee", "list-over-prefix", "acme", "unindexed", "second-hit", "prefix-over-tenant"]


def test_a_rule_offered_by_the_second_index_entry_still_decides():
    policy = policy_with(INDEXED)
    # the callee is in vip (first entry: no rule of it matches on udp), the caller's prefix (second entry) does
    decision = policy.decide(call(from_user="+442079460005", to_user="07700900123", transport="udp"))
    assert (decision.rule, decision.agent.name) == ("second-hit", "billing")


def test_number_conditions_outside_the_index_test_every_part():
    """Under `not` and `any` no index narrows the rules: the matcher alone must test the number."""
    policy = policy_with("""\
        rules:
          - {name: not-exact, match: {not: {callee: "+442079460001"}, transport: tcp}, actions: [reject: 403]}
          - {name: not-exact-key, match: {not: {callee: {exact: "+442079460001"}}, transport: tls}, actions: [reject: 403]}
          - {name: any-list, match: {any: [{callee: {in_list: [vip]}}, {transport: ws}]}, actions: [reject: 403]}
        """)
    assert policy.decide(call(to_user="+442079460002", transport="tcp")).rule == "not-exact"
    assert policy.decide(call(to_user="+442079460001", transport="tcp")).rule == "default"
    assert policy.decide(call(to_user="+442079460002", transport="tls")).rule == "not-exact-key"
    assert policy.decide(call(to_user="+442079460001", transport="tls")).rule == "default"
    assert policy.decide(call(to_user="07700900123")).rule == "any-list"
    assert policy.decide(call(to_user="+442079460002")).rule == "default"


def test_a_decision_reading_the_call_is_never_shared_with_another_call():
    policy = policy_with("""\
        rules:
          - {name: tagged, match: {transport: tcp}, actions: [route_agent: intake, add_headers: {X-Caller: "${caller}"}]}
          - name: hook
            actions:
              - ask_webhook: {url: "https://app.example.com/hook",
                              fallback: [route_agent: billing, add_headers: {X-Who: "${caller}"}]}
        """)
    for transport, headers in (("tcp", lambda d: d.headers), ("udp", lambda d: d.webhook.fallback.headers)):
        first = policy.decide(call(from_user="+442079460001", transport=transport))
        second = policy.decide(call(from_user="+442079460002", transport=transport))
        assert [v for _, v in headers(first)] == ["+442079460001"]
        assert [v for _, v in headers(second)] == ["+442079460002"]


def test_a_decision_reading_nothing_of_the_call_is_built_once_and_the_shared_ones_are_bounded(monkeypatch):
    policy = policy_with("""\
        rules:
          - {name: a, match: {callee: "+441"}, actions: [route_agent: intake]}
          - {name: b, match: {callee: "+442"}, actions: [route_agent: billing]}
          - {name: c, match: {callee: "+443"}, actions: [route_sip: pbx]}
        """)
    one, two = policy.decide(call(to_user="+441", call_id="x1")), policy.decide(call(to_user="+441", call_id="x2"))
    assert one.rule == "a" and one is two
    monkeypatch.setattr(compiled_module, "MAX_SHARED_DECISIONS", 2)
    for callee in ("+442", "+443", "+444"):
        policy.decide(call(to_user=callee))
    assert len(policy.compiled._decisions) == 2
    assert policy.decide(call(to_user="+443")).rule == "c"  # not shared, still decided


def test_the_counters_a_policy_reads_and_the_lowest_value_that_fires_each():
    policy = policy_with("""\
        rules:
          - {name: busy, match: {calls_in_window: {scope: source, window: 60, at_least: 3}}, actions: [reject: 486]}
          - {name: busier, match: {calls_in_window: {scope: source, window: 1m, at_least: 5}}, actions: [reject: 503]}
          - {name: live, match: {concurrent_calls: {scope: tenant, at_least: 7}}, actions: [reject: 480]}
        """)
    assert policy.counter_specs == {CounterSpec("window", "source", 60), CounterSpec("live", "tenant")}
    assert policy.compiled.counter_limits == {"window:source:60": 3, "live:tenant": 7}
    assert policy.decide(call(counters={"live:tenant": 7})).rule == "live"
    assert policy.decide(call(counters={"live:tenant": 6})).rule == "default"


def test_trunk_condition():
    policy = policy_with("""\
        trunks:
          carrier-a: {inbound: {sources: ["203.0.113.0/24"]}}
          carrier-b: {inbound: {sources: ["198.51.100.0/24"]}}
        rules:
          - {name: from-a, match: {trunk: carrier-a}, actions: [route_agent: billing]}
          - {name: not-from-b, match: {not: {trunk: [carrier-b]}}, actions: [reject: 403]}
        """)
    assert policy.decide(call(trunk="carrier-a")).rule == "from-a"
    assert policy.decide(call(trunk="carrier-b")).rule == "default"
    assert policy.decide(call()).rule == "not-from-b"


def test_header_regex_is_case_sensitive_unless_asked_and_takes_repeats():
    policy = policy_with("""\
        rules:
          - {name: exact-case, match: {header: {name: User-Agent, regex: "^sipvicious"}}, actions: [reject: 403]}
          - {name: repeat, match: {header: {name: X-Id, regex: "^[a-z]+-[0-9]+$"}}, actions: [reject: 404]}
          - {name: number-repeat, match: {callee: {regex: "^[+]44(20|80)[0-9]+$"}}, actions: [reject: 410]}
        """)
    assert policy.decide(call(headers={"User-Agent": "sipvicious 1.0"})).rule == "exact-case"
    assert policy.decide(call(headers={"User-Agent": "SIPVicious 1.0"})).rule == "default"
    assert policy.decide(call(headers={"X-Id": "abc-12"})).rule == "repeat"
    assert policy.decide(call(headers={"X-Id": "ABC-12"})).rule == "default"
    assert policy.decide(call(to_user="02071234567")).rule == "number-repeat"


def test_split_without_a_seed_uses_the_empty_seed_and_its_range_ends_before_high():
    policy = policy_with("rules:\n  - {name: half, match: {split: {percent: 50}}, actions: [reject: 403]}\n")
    ids = [f"call-{i}" for i in range(40)]
    expected = {i for i in ids if split_bucket("", i) < 5000}
    assert 0 < len(expected) < len(ids)
    assert {i for i in ids if policy.decide(call(call_id=i)).rule == "half"} == expected
    # the range is [offset, offset + percent): a call whose bucket is the upper bound is outside
    bucket = split_bucket("s", "edge-call")
    assert bucket > 0
    policy = policy_with(f"""\
        rules:
          - {{name: below, match: {{split: {{percent: {bucket / 100}, seed: s}}}}, actions: [reject: 403]}}
          - {{name: from, match: {{split: {{percent: 0.01, offset: {bucket / 100}, seed: s}}}}, actions: [reject: 404]}}
        """)
    assert policy.decide(call(call_id="edge-call")).rule == "from"


def test_an_empty_risk_list_matches_no_call():
    policy = policy_with("""\
        risk_lists:
          none: []
        rules:
          - {name: risky, match: {destination_risk: none}, actions: [reject: 403]}
        """)
    assert policy.decide(call(to_user="+449091234567")).rule == "default"


SECURITY = """\
    security:
      detectors:
        - {name: live, kind: concurrent_calls, scope: global, max: 2, score: 5}
        - {name: live-source, kind: concurrent_calls, scope: source, max: 2, score: 5}
      outcomes:
        reject: {at_least: 10, code: 486, reason: Busy Here}
    rules:
      - {name: to-billing, actions: [route_agent: billing]}
    """


def decide_with_counters(policy, counters):
    f = policy.compiled.facts(call())
    f.counters = counters
    return policy.compiled.decide_facts(f)


def test_a_risk_score_below_every_outcome_lets_the_rules_decide_and_records_the_risk():
    policy = policy_with(SECURITY)
    decision = decide_with_counters(policy, {"risk:live": 5})
    assert (decision.outcome, decision.rule, decision.agent.name) == ("agent", "to-billing", "billing")
    assert (decision.risk.score, decision.risk.outcome) == (5, "allow")
    refused = decide_with_counters(policy, {"risk:live": 5, "risk:live-source": 5})
    assert (refused.outcome, refused.rule, refused.reject_code, refused.policy_version) == (
        "reject", "security", 486, policy.version)
    assert refused.risk.outcome == "reject"

