"""Every action, and how the actions of the rules a call goes through combine."""
import pytest

from controller.policy import policy_from_texts
from tests.policy.helpers import DECLARATIONS, call, policy_with


def test_route_agent_carries_the_agent_declaration():
    d = policy_with("rules:\n  - {name: r, actions: [route_agent: billing]}\n").decide(call())
    assert d.outcome == "agent" and d.rule == "r"
    assert (d.agent.name, d.agent.endpoint, d.agent.transport, d.agent.codec) == ("billing", "127.0.0.1:4001", "audiosocket", "slin16")
    assert d.agent.node_set.dispatcher_set == 1


def test_agent_defaults_rtp_ulaw():
    d = policy_with("rules: []\n").decide(call())
    assert (d.rule, d.agent.name, d.agent.transport, d.agent.codec) == ("default", "intake", "rtp", "ulaw")


def test_route_sip_carries_failover_in_order():
    d = policy_with("rules:\n  - {name: r, actions: [route_sip: {destination: pbx}]}\n").decide(call())
    assert d.outcome == "sip"
    assert d.destination.uris == ("sip:desk@pbx.example.com", "sip:desk@pbx2.example.com:5062")
    assert d.destination.attempt_timeout_ms == 2000


@pytest.mark.parametrize("action, code, reason", [
    ("reject: 403", 403, "Forbidden"),
    ("reject: {code: 486}", 486, "Busy Here"),
    ("reject: {code: 503, reason: Try Later}", 503, "Try Later"),
    ("reject: 499", 499, "Rejected"),
])
def test_reject(action, code, reason):
    d = policy_with(f"rules:\n  - {{name: r, actions: [{action}]}}\n").decide(call())
    assert (d.outcome, d.reject_code, d.reject_reason) == ("reject", code, reason)


def test_headers_with_placeholders_are_rendered_and_sanitised():
    policy = policy_with("""\
        rules:
          - name: r
            actions:
              - route_agent: intake
              - add_headers: {X-Caller: "${caller}", X-Call: "${call_id}", X-Why: "${rule}@${policy_version}",
                              X-Tenant: "${tenant}", X-Src: "${source_ip}", X-Static: "plain", Subject: "${callee}/${ruri}"}
        """)
    d = policy.decide(call(from_user="02079460000", to_user="+441", call_id="abc\r\nVia: evil", src_ip="203.0.113.1"))
    headers = dict(d.headers)
    assert headers == {"X-Caller": "+442079460000", "X-Call": "abc  Via: evil", "X-Why": f"r@{policy.version}",
                       "X-Tenant": "acme", "X-Src": "203.0.113.1", "X-Static": "plain", "Subject": "+441/+441"}
    assert all("\r" not in v and "\n" not in v for v in headers.values())


def test_rendered_header_values_are_capped_at_1024_bytes():
    policy = policy_with("rules:\n  - {name: r, actions: [route_agent: intake, add_headers: {X-C: 'caller=${caller}'}]}\n")
    d = policy.decide(call(from_user="é" * 2000))
    assert len(dict(d.headers)["X-C"].encode()) <= 1024


def test_fork_defaults_come_from_the_target_and_can_be_overridden():
    d = policy_with("""\
        rules:
          - name: r
            actions: [route_agent: intake, fork: stt, fork: {target: rec, direction: in, codec: slin16, transport: audiosocket}]
        """).decide(call())
    assert [(f.target, f.endpoint, f.transport, f.codec, f.direction) for f in d.forks] == [
        ("stt", "127.0.0.1:9100", "rtp", "slin16", "in"),
        ("rec", "127.0.0.1:9200", "audiosocket", "slin16", "in"),
    ]


def test_continue_accumulates_and_later_rules_override_headers():
    policy = policy_with("""\
        rules:
          - {name: tag, actions: [add_headers: {X-A: first, X-B: kept}, fork: stt, max_duration: 2h, continue: true]}
          - {name: skipped, match: {transport: tcp}, actions: [add_headers: {X-C: never}, continue: true]}
          - {name: tag2, actions: [add_headers: {X-A: second}, fork: stt, fork: rec, max_duration: 90s, continue: true]}
          - {name: final, actions: [route_agent: billing, max_duration: 10m]}
        """)
    d = policy.decide(call())
    assert d.rule == "final" and d.applied_rules == ("tag", "tag2", "final")
    assert d.headers == (("X-A", "second"), ("X-B", "kept"))
    assert [f.target for f in d.forks] == ["stt", "rec"]  # one fork per (target, direction)
    assert d.max_duration_s == 90  # the smallest wins


def test_continue_rules_then_default():
    d = policy_with("rules:\n  - {name: tag, actions: [add_headers: {X-A: b}, continue: true]}\n").decide(call())
    assert d.rule == "default" and d.applied_rules == ("tag", "default") and d.headers == (("X-A", "b"),)


def test_ask_webhook_fallback_keeps_what_was_accumulated():
    d = policy_with("""\
        rules:
          - {name: tag, actions: [add_headers: {X-A: b}, continue: true]}
          - name: hook
            actions:
              - add_headers: {X-Hook: yes-please}
              - max_duration: 1h
              - ask_webhook:
                  url: https://app.example.com/hook
                  timeout_ms: 300
                  fallback: [route_agent: billing, add_headers: {X-Fallback: "1"}, max_duration: 5m]
        """).decide(call())
    assert d.outcome == "webhook" and d.webhook.url == "https://app.example.com/hook" and d.webhook.timeout_ms == 300
    assert d.headers == (("X-A", "b"), ("X-Hook", "yes-please"))
    fb = d.webhook.fallback
    assert fb.outcome == "agent" and fb.agent.name == "billing" and fb.rule == "hook"
    assert fb.applied_rules == ("tag", "hook")
    assert fb.headers == (("X-A", "b"), ("X-Hook", "yes-please"), ("X-Fallback", "1"))
    assert fb.max_duration_s == 300


def test_anchor_media_is_decided_per_call_the_last_rule_winning():
    from controller.edge.protocol import answer_for
    from controller.policy.answers import decision_from_answer

    policy = policy_with("""\
        rules:
          - {name: everyone, actions: [anchor_media: always, continue: true]}
          - {name: lan, match: {source_ip: "10.0.0.0/8"}, actions: [anchor_media: never, route_agent: billing]}
          - name: hook
            match: {caller: "+442079460000"}
            actions: [ask_webhook: {url: "https://app/hook", fallback: [anchor_media: nat-only, route_agent: billing]}]
        """)
    lan = policy.decide(call(src_ip="10.1.2.3"))
    assert (lan.rule, lan.anchor_media, lan.to_dict()["anchor_media"]) == ("lan", "never", "never")
    assert answer_for("1:2", lan, [])[0]["media"] == "never"
    assert policy.decide(call()).anchor_media == "always"
    asked = policy.decide(call(from_user="+442079460000"))
    assert asked.webhook.fallback.anchor_media == "nat-only"
    answered = decision_from_answer(policy.source, asked, {"actions": [{"route_agent": "intake"},
                                                                      {"anchor_media": "never"}]})
    assert answered.anchor_media == "never"
    # none said: the edge keeps the trunk's anchoring (no "media" in the answer)
    plain = policy_with("").decide(call())
    assert plain.anchor_media is None and "media" not in answer_for("1:2", plain, [])[0]


def test_ask_webhook_default_timeout():
    d = policy_with("rules:\n  - {name: h, actions: [ask_webhook: {url: 'http://h', fallback: [reject: 503]}]}\n").decide(call())
    assert d.webhook.timeout_ms == 1000 and d.webhook.fallback.reject_code == 503


def test_disabled_rules_are_skipped():
    policy = policy_with("rules:\n  - {name: off, enabled: false, actions: [reject: 403]}\n")
    assert policy.decide(call()).rule == "default"
    assert policy.explain(call()).traces[0].reason.startswith("disabled")


def test_first_match_wins():
    policy = policy_with("""\
        rules:
          - {name: one, match: {caller: {prefix: '+44'}}, actions: [route_agent: billing]}
          - {name: two, match: {caller: {prefix: '+4420'}}, actions: [reject: 403]}
        """)
    assert policy.decide(call(from_user="+442071")).rule == "one"


def test_every_decision_carries_the_policy_version():
    a = policy_with("rules: []\n")
    b = policy_with("rules: []\n# a comment changes the content hash\n")
    assert a.version != b.version and len(a.version) == 12
    assert a.decide(call()).policy_version == a.version
    assert a.decide(call()).to_dict()["policy_version"] == a.version
    assert policy_with("rules: []\n").version == a.version  # same content, same version


def test_decision_to_dict_is_json_ready():
    import json
    d = policy_with("rules:\n  - {name: r, actions: [route_sip: pbx, add_headers: {X-A: b}, fork: stt, max_duration: 60]}\n").decide(
        call(src_ip="203.0.113.4"))
    out = json.loads(json.dumps(d.to_dict()))
    assert out == {"outcome": "sip", "rule": "r",
                   "destination": {"name": "pbx", "uris": ["sip:desk@pbx.example.com", "sip:desk@pbx2.example.com:5062"],
                                   "attempt_timeout_ms": 2000},
                   "headers": {"X-A": "b"},
                   "forks": [{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "slin16",
                              "direction": "in"}],
                   "max_duration_s": 60, "tenant": "acme", "policy_version": d.policy_version}


def test_counter_specs_and_header_names_tell_the_edge_what_to_fetch():
    policy = policy_with("""\
        rules:
          - name: r
            match:
              any:
                - calls_in_window: {scope: source, window: 1m, at_least: 5}
                - concurrent_calls: {scope: tenant, at_least: 9}
                - header: {name: X-Campaign, present: true}
            actions: [reject: 503]
        """)
    assert {s.key for s in policy.counter_specs} == {"window:source:60", "live:tenant"}
    assert policy.header_names == {"x-campaign", "x-tenant"}  # x-tenant: tenants recognised by header


def test_policy_split_over_many_files_is_one_policy():
    policy = policy_from_texts({
        "a.yaml": DECLARATIONS,
        "b.yaml": "rules:\n  - {name: from-b, match: {transport: tcp}, actions: [reject: 403]}\n",
        "c.yaml": "rules:\n  - {name: from-c, actions: [route_agent: billing]}\n",
    })
    assert [r.name for r in policy.source.rules] == ["from-b", "from-c"]  # file name order, then file order
    assert policy.decide(call(transport="tcp")).rule == "from-b"
    assert policy.decide(call(transport="udp")).rule == "from-c"
