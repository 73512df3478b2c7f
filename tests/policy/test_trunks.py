"""Trunks in the policy: declarations validated with positions, the `trunk` fact, numbers a trunk
carries, tenants from trunks, destinations through outbound trunks with failover."""
from __future__ import annotations

import textwrap

from tests.policy.helpers import DECLARATIONS, call, issues_of, policy_with

TRUNKS = textwrap.dedent("""\
    trunks:
      carrier-a:
        inbound:
          sources: ["203.0.113.0/24", "2001:db8::/32"]
          digest: {username: carrier-a, password_env: CARRIER_A_PASSWORD}
          numbers: {prefix: "+4420"}
          tenant: initech
          transports: [udp, tls]
          srtp: required
        outbound:
          address: "sip.carrier-a.example:5061"
          transport: tls
          digest: {username: acme, password_file: /run/secrets/carrier-a}
          from_host: pbx.example.com
          caller_ids: ["020 7946 0001"]
          failover: [carrier-b]
      carrier-b:
        inbound: {digest: {username: b-user, password_env: CARRIER_B_PASSWORD}, numbers: ["02079460000", "+442079460001"]}
        outbound: {address: "sip.carrier-b.example"}
    destinations:
      london-desk: {trunk: carrier-a, number: "020 7946 0999", attempt_timeout_ms: 3000}
""")


def with_trunks(rules: str):
    return policy_with(rules, {"05-trunks.yaml": TRUNKS})


def test_trunk_is_a_fact_rules_match_and_tenant_comes_from_the_trunk():
    policy = with_trunks("""\
        rules:
          - name: carrier-a-calls
            match: {trunk: carrier-a}
            actions: [route_agent: billing]
    """)
    decision = policy.decide(call(to_user="+442071234567", trunk="carrier-a"))
    assert (decision.rule, decision.agent.name, decision.trunk, decision.tenant) == (
        "carrier-a-calls", "billing", "carrier-a", "initech")
    # the same call from no trunk (or a name the policy does not declare) is not carrier-a's
    for trunk in ("", "carrier-z"):
        other = policy.decide(call(to_user="+442071234567", trunk=trunk))
        assert (other.rule, other.trunk) == ("default", None)
    assert policy.explain(call(to_user="+442071234567", trunk="carrier-a")).decision == decision


def test_a_number_the_trunk_does_not_carry_is_refused_before_any_rule():
    policy = with_trunks("""\
        rules:
          - name: everything
            actions: [route_agent: billing]
    """)
    refused = policy.decide(call(to_user="+15551234567", trunk="carrier-a"))
    assert (refused.outcome, refused.rule, refused.reject_code, refused.trunk) == ("reject", "trunk", 404, "carrier-a")
    assert (refused.policy_version, refused.tenant) == (policy.version, "initech")  # carrier-a's tenant
    explanation = policy.explain(call(to_user="+15551234567", trunk="carrier-a"))
    assert explanation.decision == refused
    assert "does not carry this number" in explanation.traces[0].reason
    assert str(explanation.traces[0].position).startswith("05-trunks.yaml:2:")
    # numbers are normalised like every number in the policy (national form, list of numbers)
    assert policy.decide(call(to_user="02079460000", trunk="carrier-b")).rule == "everything"
    assert policy.decide(call(to_user="02079460002", trunk="carrier-b")).rule == "trunk"
    # a call on no trunk is not restricted by any trunk's numbers
    assert policy.decide(call(to_user="+15551234567")).rule == "everything"


def test_destination_through_an_outbound_trunk_fails_over_to_its_trunks():
    policy = with_trunks("""\
        rules:
          - name: to-desk
            actions: [route_sip: london-desk]
    """)
    decision = policy.decide(call(to_user="+442071234567"))
    assert decision.destination.uris == (
        "sip:+442079460999@sip.carrier-a.example:5061;transport=tls;cf-trunk=carrier-a",
        "sip:+442079460999@sip.carrier-b.example;cf-trunk=carrier-b")
    # a media node dials the number on the first trunk; the edge builds the carrier's URIs
    assert decision.destination.dial_uri() == "sip:+442079460999@sip.carrier-a.example:5061;cf-trunk=carrier-a"
    assert decision.destination.trunks == ("carrier-a", "carrier-b")
    assert decision.to_dict()["destination"]["trunks"] == ["carrier-a", "carrier-b"]
    trunk = policy.source.trunks["carrier-a"]
    assert trunk.outbound.caller_ids == ("+442079460001",)
    assert trunk.inbound.digest.secret.env == "CARRIER_A_PASSWORD"
    assert trunk.outbound.digest.secret.file == "/run/secrets/carrier-a"


def test_bad_trunks_are_reported_with_positions():
    texts = {"00-decl.yaml": DECLARATIONS, "05-trunks.yaml": """\
        trunks:
          a:
            inbound:
              sources: ["203.0.113.300/24"]
              digest: {username: a, password_env: A_PW, password_file: /x}
              tenant: acmee
              media: never
              srtp: required
          b:
            inbound: {numbers: ["+44"]}
            outbound: {address: "sip carrier", failover: [b, nope, c], media: never, srtp: required}
          c:
            inbound: {sources: ["10.0.0.1"], digest: {username: c, password: hunter2}}
        destinations:
          d1: {trunk: a, number: "+15551234567"}
          d2: {trunk: a, number: "+15551234567", uri: "sip:x@example.com"}
        rules:
          - name: r1
            match: {trunk: d1}
            actions: [route_sip: d1]
          - name: trunk
            actions: [reject: 403]
    """}
    found = {(str(i.position), i.message) for i in issues_of(texts)}
    text = "\n".join(sorted(f"{p}: {m}" for p, m in found))
    for expected in [
        "05-trunks.yaml:4:17: '203.0.113.300/24' is not",
        "05-trunks.yaml:5:15: give the password's source: exactly one of",
        "05-trunks.yaml:6:15: unknown tenant 'acmee'",
        "05-trunks.yaml:8:13: SRTP ends at the edge's rtpengine",
        "05-trunks.yaml:10:14: an inbound trunk needs `sources`",
        "05-trunks.yaml:11:25: 'sip carrier' is not host[:port]",
        "05-trunks.yaml:11:51: a trunk cannot fail over to itself",
        "05-trunks.yaml:11:54: unknown trunk 'nope'",
        "05-trunks.yaml:11:84: SRTP toward the carrier is made by the edge's rtpengine",
        "05-trunks.yaml:13:60: unknown key 'password'",
        "05-trunks.yaml:15:15: trunk 'a' has no `outbound` part",
        "05-trunks.yaml:16:7: a destination is either a SIP `uri`",
        "05-trunks.yaml:19:20: unknown trunk 'd1'",
        "05-trunks.yaml:21:11: 'trunk' is reserved",
    ]:
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_policy_test_cases_take_the_trunk(tmp_path):
    from controller.policy.testing import run_policy_tests

    policy = with_trunks("""\
        rules:
          - name: a-calls
            match: {trunk: carrier-a}
            actions: [route_agent: billing]
    """)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cases.yaml").write_text(textwrap.dedent("""\
        tests:
          - name: carrier a
            call: {to: "+442071234567", trunk: carrier-a}
            expect: {rule: a-calls, trunk: carrier-a, tenant: initech}
          - name: wrong number
            call: {to: "+15551234567", trunk: carrier-a}
            expect: {outcome: reject, rule: trunk, reject: 404}
    """))
    results, issues = run_policy_tests(policy, str(tmp_path))
    assert not issues
    assert [r.passed for r in results] == [True, True], [r.diff for r in results]


def test_the_name_a_tls_carriers_certificate_must_carry():
    """`tls_name`, else the address's host (a DNS name, or an IP address its SubjectAltName
    must hold); nothing for udp/tcp trunks. The edge's table gets it as otls|<trunk>."""
    from controller.edge.trunks import build_table
    policy = policy_with("", {"05-trunks.yaml": """\
        trunks:
          by-host: {outbound: {address: "SIP.Carrier.example:5061", transport: tls}}
          named: {outbound: {address: "203.0.113.7:5061", transport: tls, tls_name: Edge.Carrier.example}}
          by-ip: {outbound: {address: "[2001:DB8::0:1]:5061", transport: tls}}
          plain: {outbound: {address: "sip.carrier.example"}}
    """})
    trunks = policy.source.trunks
    assert [trunks[n].outbound.tls_identity() for n in ("by-host", "named", "by-ip", "plain")] == [
        "sip.carrier.example", "edge.carrier.example", "2001:db8::1", None]
    rows = build_table(policy.source, "callfabric", environ={}).rows
    assert {k: v for k, v in rows.items() if k.startswith("otls|")} == {
        "otls|by-host": "sip.carrier.example", "otls|named": "edge.carrier.example", "otls|by-ip": "2001:db8::1"}


def test_a_tls_name_needs_a_tls_trunk():
    texts = {"00-decl.yaml": DECLARATIONS, "05-trunks.yaml": """\
        trunks:
          a: {outbound: {address: "sip.carrier.example", tls_name: sip.carrier.example}}
          b: {outbound: {address: "sip.carrier.example", transport: tls, tls_name: "*.carrier.example"}}
    """}
    found = "\n".join(sorted(f"{i.position}: {i.message}" for i in issues_of(texts)))
    assert found.splitlines() == [
        "05-trunks.yaml:2:60: `tls_name` is the name the carrier's TLS certificate must carry: it needs `transport: tls`",
        "05-trunks.yaml:3:76: '*.carrier.example' is not text matching ^[A-Za-z0-9]([A-Za-z0-9.\\-]{0,251}[A-Za-z0-9])?$"]
