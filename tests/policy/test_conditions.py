"""Every match condition, true and false, on both evaluators (compiled and reference)."""
import re
from datetime import datetime, timezone

import pytest

from controller.policy.conditions import split_bucket
from tests.policy.helpers import call, policy_with

EVALUATORS = ["compiled", "reference"]


def decides(rules_yaml: str, evaluator: str, **call_fields) -> str:
    """The rule that decides the call."""
    policy = policy_with(rules_yaml)
    c = call(**call_fields)
    decision = policy.decide(c) if evaluator == "compiled" else policy.explain(c).decision
    return decision.rule


def rule(match: str) -> str:
    return f"rules:\n  - name: hit\n    match: {match}\n    actions: [route_agent: billing]\n"


CASES = [
    # (match, call fields, expected to match)
    ("{caller: '+442079460000'}", dict(from_user="02079460000"), True),
    ("{caller: '02079460000'}", dict(from_user="+44 20 7946 0000"), True),
    ("{caller: 442079460000}", dict(from_user="+442079460000"), False),  # an int is a dialled string: +44 + 442…
    ("{caller: {exact: ['+441', '+442079460000']}}", dict(from_user="00442079460000"), True),
    ("{caller: {exact: alice}}", dict(from_user="alice"), True),
    ("{caller: {exact: alice}}", dict(from_user="bob"), False),
    ("{callee: {prefix: '+44800'}}", dict(to_user="08001234567"), True),
    ("{callee: {prefix: ['+44900', '+44800']}}", dict(to_user="08001234567"), True),
    ("{callee: {prefix: '+44800'}}", dict(to_user="08011234567"), False),
    ("{callee: {regex: '^\\+4480[01]'}}", dict(to_user="08011234567"), True),
    ("{callee: {regex: '4567$'}}", dict(to_user="08011234567"), True),   # searched, not anchored
    ("{callee: {regex: '^5678'}}", dict(to_user="08011234567"), False),
    ("{caller: {in_list: vip}}", dict(from_user="+447700900123"), True),
    ("{caller: {in_list: [vip]}}", dict(from_user="+447700900124"), False),
    ("{caller: {prefix: '+44', regex: '0000$'}}", dict(from_user="02079460000"), True),  # several keys: all hold
    ("{caller: {prefix: '+44', regex: '0001$'}}", dict(from_user="02079460000"), False),
    ("{ruri: '+442079460000'}", dict(to_user="+449999", ruri_user="02079460000"), True),
    ("{ruri: '+449999'}", dict(to_user="+449999", ruri_user=""), True),  # no R-URI user: the To user
    ("{source_ip: '192.0.2.0/24'}", dict(src_ip="192.0.2.77"), True),
    ("{source_ip: ['10.0.0.0/8', '192.0.2.1']}", dict(src_ip="192.0.2.1"), True),
    ("{source_ip: '192.0.2.0/24'}", dict(src_ip="192.0.3.1"), False),
    ("{source_ip: '2001:db8::/32'}", dict(src_ip="2001:db8::5"), True),
    ("{source_ip: '2001:db8::/32'}", dict(src_ip="192.0.2.1"), False),
    ("{source_ip: '0.0.0.0/0'}", dict(src_ip="not-an-ip"), False),
    ("{transport: tls}", dict(transport="TLS"), True),
    ("{transport: [tcp, tls]}", dict(transport="udp"), False),
    ("{header: {name: X-Priority, present: true}}", dict(headers={"x-priority": "1"}), True),
    ("{header: {name: X-Priority, present: true}}", dict(headers={}), False),
    ("{header: {name: X-Priority, present: false}}", dict(headers={}), True),
    ("{header: {name: X-Lang, equals: fr}}", dict(headers={"X-LANG": ["de", "fr"]}), True),
    ("{header: {name: X-Lang, equals: FR}}", dict(headers={"X-Lang": "fr"}), False),
    ("{header: {name: X-Lang, equals: FR, ignore_case: true}}", dict(headers={"X-Lang": "fr"}), True),
    ("{header: {name: X-Lang, equals: [es, it]}}", dict(headers={"X-Lang": "fr"}), False),
    ("{header: {name: User-Agent, regex: '(?i)friendly-scanner'}}", dict(headers={"User-Agent": "Friendly-Scanner 1.0"}), True),
    ("{header: {name: User-Agent, regex: 'sipvicious', ignore_case: true}}", dict(headers={"User-Agent": "SIPVicious"}), True),
    ("{header: {name: User-Agent, regex: 'sipvicious'}}", dict(headers={}), False),
    ("{tenant: acme}", dict(src_ip="203.0.113.5"), True),
    ("{tenant: acme}", dict(src_ip="192.0.2.5"), False),
    ("{tenant: globex}", dict(src_ip="192.0.2.5", headers={"X-Tenant": "globex"}), True),
    ("{tenant: acme}", dict(src_ip="203.0.113.5", headers={"X-Tenant": "globex"}), True),  # trunk beats header
    ("{tenant: [initech, globex]}", dict(src_ip="192.0.2.5", headers={"X-Tenant": "initech"}), True),
    ("{time: {days: mon-fri}}", dict(at=datetime(2026, 11, 25, 12, tzinfo=timezone.utc)), True),   # Wednesday
    ("{time: {days: weekend}}", dict(at=datetime(2026, 11, 25, 12, tzinfo=timezone.utc)), False),
    ("{time: {days: [sat, sunday]}}", dict(at=datetime(2026, 11, 29, 12, tzinfo=timezone.utc)), True),
    ("{time: {days: fri-mon}}", dict(at=datetime(2026, 11, 30, 12, tzinfo=timezone.utc)), True),    # wraps
    ("{time: {days: fri-mon}}", dict(at=datetime(2026, 11, 25, 12, tzinfo=timezone.utc)), False),
    ("{time: {hours: '09:00-17:00'}}", dict(at=datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)), True),
    ("{time: {hours: '09:00-17:00'}}", dict(at=datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc)), False),  # end exclusive
    ("{time: {hours: '09:00-17:00'}}", dict(at=datetime(2026, 7, 1, 16, 30, tzinfo=timezone.utc)), False),  # BST: 17:30 local
    ("{time: {hours: '22:00-06:00'}}", dict(at=datetime(2026, 11, 25, 23, 0, tzinfo=timezone.utc)), True),  # wraps midnight
    ("{time: {hours: '22:00-06:00'}}", dict(at=datetime(2026, 11, 25, 5, 59, tzinfo=timezone.utc)), True),
    ("{time: {hours: '22:00-06:00'}}", dict(at=datetime(2026, 11, 25, 6, 0, tzinfo=timezone.utc)), False),
    ("{time: {hours: ['08:00-12:00', '13:00-17:00']}}", dict(at=datetime(2026, 11, 25, 12, 30, tzinfo=timezone.utc)), False),
    ("{time: {hours: '00:00-24:00'}}", dict(at=datetime(2026, 11, 25, 23, 59, tzinfo=timezone.utc)), True),
    ("{time: {tz: America/New_York, hours: '09:00-17:00'}}", dict(at=datetime(2026, 11, 25, 14, 0, tzinfo=timezone.utc)), True),
    ("{time: {tz: America/New_York, hours: '09:00-17:00'}}", dict(at=datetime(2026, 11, 25, 13, 59, tzinfo=timezone.utc)), False),
    ("{time: {tz: Asia/Tokyo, days: thu}}", dict(at=datetime(2026, 11, 25, 16, 0, tzinfo=timezone.utc)), True),  # already Thursday there
    ("{time: {dates: ['12-25']}}", dict(at=datetime(2027, 12, 25, 10, tzinfo=timezone.utc)), True),
    ("{time: {dates: ['2026-12-25']}}", dict(at=datetime(2027, 12, 25, 10, tzinfo=timezone.utc)), False),
    ("{time: {dates: ['2026-12-25'], hours: '09:00-10:00'}}", dict(at=datetime(2026, 12, 25, 9, 30, tzinfo=timezone.utc)), True),
    ("{time: {tz: America/Los_Angeles, dates: ['12-25']}}", dict(at=datetime(2026, 12, 26, 5, tzinfo=timezone.utc)), True),
    ("{destination_risk: premium}", dict(to_user="09091234567"), True),
    ("{destination_risk: [premium]}", dict(to_user="+448712345678"), True),
    ("{destination_risk: premium}", dict(to_user="+448001234567"), False),
    ("{destination_risk: premium}", dict(to_user="+448001234567", ruri_user="09091234567"), True),
    ("{calls_in_window: {scope: source, window: 60, at_least: 10}}", dict(counters={"window:source:60": 10}), True),
    ("{calls_in_window: {scope: source, window: 1m, at_least: 10}}", dict(counters={"window:source:60": 9}), False),
    ("{calls_in_window: {scope: tenant, window: 1h, at_least: 10}}", dict(counters={"window:tenant:3600": 11}), True),
    ("{calls_in_window: {scope: source, window: 60, at_least: 1}}", dict(counters={"window:source:60": "many"}), False),
    ("{concurrent_calls: {scope: global, at_least: 100}}", dict(counters={"live:global": 100}), True),
    ("{concurrent_calls: {scope: global, at_least: 100}}", dict(counters={}), False),
    ("{all: [{caller: {prefix: '+44'}}, {transport: udp}]}", dict(from_user="+441", transport="udp"), True),
    ("{all: [{caller: {prefix: '+44'}}, {transport: tcp}]}", dict(from_user="+441", transport="udp"), False),
    ("{any: [{caller: {prefix: '+33'}}, {transport: udp}]}", dict(from_user="+441", transport="udp"), True),
    ("{any: [{caller: {prefix: '+33'}}, {transport: tcp}]}", dict(from_user="+441", transport="udp"), False),
    ("{not: {caller: {prefix: '+33'}}}", dict(from_user="+441"), True),
    ("{not: {caller: {prefix: '+44'}}}", dict(from_user="+441"), False),
    ("{caller: {prefix: '+44'}, not: {transport: tcp}, any: [{tenant: acme}, {source_ip: '192.0.2.0/24'}]}",
     dict(from_user="+441", transport="udp", src_ip="192.0.2.9"), True),
]


@pytest.mark.parametrize("evaluator", EVALUATORS)
# ids a command line can select again (bench/mutation.py does): no '::', brackets or quotes
@pytest.mark.parametrize("match, fields, expected", CASES,
                         ids=[f"{i}-" + re.sub(r"[^A-Za-z0-9+._-]+", "_", c[0])[:40] for i, c in enumerate(CASES)])
def test_condition(match, fields, expected, evaluator):
    assert (decides(rule(match), evaluator, **fields) == "hit") is expected


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_split_is_deterministic_and_proportional(evaluator):
    policy = policy_with(rule("{split: {percent: 30, seed: exp1}}"))
    hits = 0
    for i in range(2000):
        c = call(call_id=f"call-{i}")
        decision = policy.decide(c) if evaluator == "compiled" else policy.explain(c).decision
        assert (decision.rule == "hit") is (split_bucket("exp1", f"call-{i}") < 3000)
        hits += decision.rule == "hit"
    assert 500 <= hits <= 700  # 30 % of 2,000, within sampling noise


def test_splits_with_offsets_partition_calls():
    policy = policy_with("""\
        rules:
          - {name: a, match: {split: {percent: 25, seed: s}}, actions: [route_agent: intake]}
          - {name: b, match: {split: {percent: 25, offset: 25, seed: s}}, actions: [route_agent: billing]}
          - {name: c, match: {split: {percent: 50, offset: 50, seed: s}}, actions: [route_sip: pbx]}
        """)
    counts = {"a": 0, "b": 0, "c": 0, "default": 0}
    for i in range(1000):
        counts[policy.decide(call(call_id=f"x{i}")).rule] += 1
    assert counts["default"] == 0 and all(150 < counts[k] < 350 for k in "ab") and 400 < counts["c"] < 600


def test_same_call_id_same_branch_every_time():
    policy = policy_with(rule("{split: {percent: 50}}"))
    first = [policy.decide(call(call_id=f"c{i}")).rule for i in range(50)]
    assert first == [policy.decide(call(call_id=f"c{i}")).rule for i in range(50)]
    assert set(first) == {"hit", "default"}


@pytest.mark.parametrize("garbage", [
    dict(from_user=None, to_user=123, ruri_user=b"x", src_ip=None, transport=None, headers="junk", counters=None),
    dict(from_user="\x00\r\n" * 100, to_user="+44" + "9" * 5000, headers={"X-A": [None, 5, {"a": 1}], 7: "x"}),
    dict(at="yesterday", call_id=None, headers={"": "x", "X-B": "y" * 100_000}),
])
def test_garbage_calls_never_raise(garbage):
    policy = policy_with(rule("{any: [{caller: {regex: 'x'}}, {header: {name: X-A, present: true}}, "
                              "{time: {hours: '09:00-10:00'}}, {source_ip: '0.0.0.0/0'}]}"))
    c = call(**garbage)
    assert policy.decide(c) == policy.explain(c).decision


def test_a_leap_day_without_a_year_is_a_date_every_year_may_have():
    policy = policy_with("""
        rules:
          - {name: leap, match: {time: {dates: ['02-29']}}, actions: [reject: 486]}
        """)
    assert policy.decide(call(at=datetime(2028, 2, 29, 12, 0, tzinfo=timezone.utc))).rule == "leap"
