"""Every validation error path: the message, the key path and the file:line:column."""
import textwrap

import pytest

from controller.policy import PolicyInvalid, load_policy, policy_from_texts
from tests.policy.helpers import DECLARATIONS, issues_of


def rule_issues(rules_yaml: str):
    return [i for i in issues_of({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": rules_yaml}) if i.severity == "error"]


def one_rule(match: str | None = None, actions: str = "[route_agent: intake]") -> str:
    text = "rules:\n  - name: r\n"
    if match is not None:
        text += f"    match: {match}\n"
    return text + f"    actions: {actions}\n"


CASES = [
    # (rules file, expected path, message fragment)
    ("rulez: []\n", "rulez", "unknown key 'rulez' (did you mean 'rules'?)"),
    (one_rule("{caler: '+44'}"), "rules[0].match.caler", "unknown condition 'caler' (did you mean 'caller'?)"),
    (one_rule(actions="[rout_agent: intake]"), "rules[0].actions[0].rout_agent", "unknown action 'rout_agent'"),
    (one_rule(actions="[{route_agent: intake, reject: 403}]"), "rules[0].actions[0]", "exactly one verb"),
    (one_rule(actions="[add_headers: {X-A: b}]"), "rules[0].actions", "needs a terminal action"),
    (one_rule(actions="[route_agent: intake, reject: 403]"), "rules[0].actions[1]", "one terminal action, found 2"),
    (one_rule(actions="[route_agent: intake, continue: true]"), "rules[0].actions[1]", "cannot be combined"),
    (one_rule(actions="[continue: false]"), "rules[0].actions[0].continue", "expected True"),
    (one_rule(actions="[route_agent: nobody]"), "rules[0].actions[0].route_agent", "unknown agent 'nobody'"),
    (one_rule(actions="[route_agent: billng]"), "rules[0].actions[0].route_agent", "did you mean 'billing'"),
    (one_rule(actions="[route_sip: nowhere]"), "rules[0].actions[0].route_sip", "unknown destination 'nowhere'"),
    (one_rule(actions="[route_agent: intake, fork: tts]"), "rules[0].actions[1].fork", "unknown fork target 'tts'"),
    (one_rule(actions="[route_agent: {agent: intake, node: x}]"), "rules[0].actions[0].route_agent.node", "unknown key 'node'"),
    (one_rule(actions="[route_agent: 5]"), "rules[0].actions[0].route_agent", "expected a mapping or a string, got an integer 5"),
    (one_rule(actions="[reject: 200]"), "rules[0].actions[0].reject", "200 must be at least 400"),
    (one_rule(actions="[reject: {code: 700}]"), "rules[0].actions[0].reject.code", "700 must be at most 699"),
    (one_rule(actions='[reject: {code: 403, reason: "a\\r\\nVia: x"}]'), "rules[0].actions[0].reject.reason", "control character"),
    (one_rule(actions="[route_agent: intake, add_headers: {Via: x}]"), "rules[0].actions[1].add_headers.Via", "belong to the SIP stack"),
    (one_rule(actions="[route_agent: intake, add_headers: {Content-Type: x}]"), "rules[0].actions[1].add_headers.Content-Type", "Content-*"),
    (one_rule(actions="[route_agent: intake, add_headers: {Contact: x}]"), "rules[0].actions[1].add_headers.Contact", "belong to the SIP stack"),
    (one_rule(actions="[route_agent: intake, add_headers: {Proxy-Authorization: x}]"), "rules[0].actions[1].add_headers.Proxy-Authorization", "auth"),
    (one_rule(actions="[route_agent: intake, add_headers: {Foo: x}]"), "rules[0].actions[1].add_headers.Foo", "must start with 'X-'"),
    (one_rule(actions="[route_agent: intake, add_headers: {X-Callfabric-Agent: x}]"), "rules[0].actions[1].add_headers.X-Callfabric-Agent", "reserved"),
    (one_rule(actions="[route_agent: intake, add_headers: {'X-A b': x}]"), "rules[0].actions[1].add_headers.X-A b", "not a SIP token"),
    (one_rule(actions='[route_agent: intake, add_headers: {X-A: "a\\r\\nVia: evil"}]'), "rules[0].actions[1].add_headers.X-A", "control character"),
    (one_rule(actions='[route_agent: intake, add_headers: {X-A: "a\\u0000b"}]'), "rules[0].actions[1].add_headers.X-A", "control character"),
    (one_rule(actions=f"[route_agent: intake, add_headers: {{X-A: {'x' * 1025}}}]"), "rules[0].actions[1].add_headers.X-A", "longer than 1024 bytes"),
    (one_rule(actions="[route_agent: intake, add_headers: {X-A: '${callr}'}]"), "rules[0].actions[1].add_headers.X-A", "unknown placeholder ${callr}"),
    (one_rule(actions="[route_agent: intake, add_headers: {X-A: a, x-a: b}]"), "rules[0].actions[1].add_headers.x-a", "set twice"),
    (one_rule(actions="[route_agent: intake, add_headers: {}]"), "rules[0].actions[1].add_headers", "must not be empty"),
    (one_rule(actions="[route_agent: intake, max_duration: 10x]"), "rules[0].actions[1].max_duration", "not a duration"),
    (one_rule(actions="[route_agent: intake, max_duration: 500ms]"), "rules[0].actions[1].max_duration", "at least 1 second"),
    (one_rule(actions="[route_agent: intake, max_duration: 60, max_duration: 30]"), "rules[0].actions[2]", "max_duration is given twice"),
    (one_rule(actions="[route_agent: intake, anchor_media: never, anchor_media: always]"), "rules[0].actions[2]", "anchor_media is given twice"),
    (one_rule(actions="[route_agent: intake, anchor_media: sometimes]"), "rules[0].actions[1].anchor_media", "not one of: always, nat-only, never"),
    (one_rule(actions="[route_agent: intake, fork: {target: stt, direction: sideways}]"), "rules[0].actions[1].fork.direction", "not one of: in, out, both"),
    (one_rule(actions="[ask_webhook: {url: 'ftp://x', fallback: [route_agent: intake]}]"), "rules[0].actions[0].ask_webhook.url", "http:// or https:// URL"),
    (one_rule(actions="[ask_webhook: {url: 'http://x', timeout_ms: 5, fallback: [route_agent: intake]}]"), "rules[0].actions[0].ask_webhook.timeout_ms", "at least 20"),
    (one_rule(actions="[ask_webhook: {url: 'http://x'}]"), "rules[0].actions[0].ask_webhook", "missing required key 'fallback'"),
    (one_rule(actions="[ask_webhook: {url: 'http://x', fallback: [add_headers: {X-A: b}]}]"), "rules[0].actions[0].ask_webhook.fallback", "a webhook fallback needs a terminal action"),
    (one_rule(actions="[ask_webhook: {url: 'http://x', fallback: [route_agent: intake, continue: true]}]"), "rules[0].actions[0].ask_webhook.fallback[1]", "cannot be combined"),
    (one_rule(actions="[ask_webhook: {url: 'http://x', fallback: [ask_webhook: {url: 'http://y', fallback: [reject: 503]}]}]"),
     "rules[0].actions[0].ask_webhook.fallback[0].ask_webhook", "cannot ask another webhook"),
    (one_rule("{caller: {in_list: vips}}"), "rules[0].match.caller.in_list", "unknown number list 'vips' (did you mean 'vip'?)"),
    (one_rule("{caller: {exact: [true]}}"), "rules[0].match.caller.exact[0]", "expected a string or an integer, got true or false"),
    (one_rule("{callee: {prefix: '4490'}}"), "rules[0].match.callee.prefix", "leading '+'"),
    (one_rule("{callee: {prefix: '+44a'}}"), "rules[0].match.callee.prefix", "only digits"),
    (one_rule("{callee: {regex: '(+44'}}"), "rules[0].match.callee.regex", "invalid regex"),
    (one_rule("{callee: {exactly: '+44'}}"), "rules[0].match.callee.exactly", "unknown key 'exactly' (did you mean 'exact'?)"),
    (one_rule("{source_ip: ['10.0.0.0/8', '10.0.0.300']}"), "rules[0].match.source_ip[1]", "not an IP address or CIDR"),
    (one_rule("{transport: udpp}"), "rules[0].match.transport", "not one of: udp, tcp, tls, sctp, ws, wss (did you mean 'udp'?)"),
    (one_rule("{header: {name: X-A}}"), "rules[0].match.header", "exactly one of `present`, `equals`, `regex`"),
    (one_rule("{header: {name: X-A, present: true, equals: b}}"), "rules[0].match.header", "(found present, equals)"),
    (one_rule("{header: {name: 'X A', present: true}}"), "rules[0].match.header.name", "not a SIP header name"),
    (one_rule("{header: {name: X-A, regex: '['}}"), "rules[0].match.header.regex", "invalid regex"),
    (one_rule("{tenant: acmee}"), "rules[0].match.tenant", "unknown tenant 'acmee' (did you mean 'acme'?)"),
    (one_rule("{time: {tz: Mars/Olympus}}"), "rules[0].match.time.tz", "unknown time zone 'Mars/Olympus'"),
    (one_rule("{time: {days: mon-frii}}"), "rules[0].match.time.days", "not a day or day range"),
    (one_rule("{time: {hours: '9-17'}}"), "rules[0].match.time.hours", "not an hours window"),
    (one_rule("{time: {hours: '09:00-09:00'}}"), "rules[0].match.time.hours", "empty window"),
    (one_rule("{time: {hours: '09:00-24:30'}}"), "rules[0].match.time.hours", "the end of the day is 24:00"),
    (one_rule("{time: {dates: ['2026-02-30']}}"), "rules[0].match.time.dates", "not a real date"),
    (one_rule("{time: {dates: ['25/12']}}"), "rules[0].match.time.dates", "not a date"),
    (one_rule("{time: {}}"), "rules[0].match.time", "must not be empty"),
    (one_rule("{split: {percent: 60, offset: 50}}"), "rules[0].match.split", "more than 100"),
    (one_rule("{split: {percent: 33.333}}"), "rules[0].match.split", "two decimals"),
    (one_rule("{split: {percent: 0}}"), "rules[0].match.split.percent", "must be more than 0"),
    (one_rule("{destination_risk: [premium, toll]}"), "rules[0].match.destination_risk[1]", "unknown risk list 'toll'"),
    (one_rule("{calls_in_window: {scope: source, window: 1500ms, at_least: 3}}"), "rules[0].match.calls_in_window.window", "whole number of seconds"),
    (one_rule("{calls_in_window: {scope: planet, window: 60, at_least: 3}}"), "rules[0].match.calls_in_window.scope", "not one of"),
    (one_rule("{concurrent_calls: {scope: tenant}}"), "rules[0].match.concurrent_calls", "missing required key 'at_least'"),
    (one_rule("{not: {any: []}}"), "rules[0].match.not.any", "must not be empty"),
    (one_rule("{all: [{caller: {prefix: '447'}}]}"), "rules[0].match.all[0].caller.prefix", "leading '+'"),
    (one_rule("{}"), "rules[0].match", "must not be empty"),
    ("rules:\n  - name: 'bad name!'\n    actions: [route_agent: intake]\n", "rules[0].name", "is not a name"),
    ("rules:\n  - name: default\n    actions: [route_agent: intake]\n", "rules[0].name", "reserved"),
    ("rules:\n  - name: a\n    actions: [route_agent: intake]\n    match: {caller: '+1'}\n"
     "  - name: a\n    match: {caller: '+2'}\n    actions: [route_agent: intake]\n", "rules[1].name", "already defined at 10-rules.yaml:2:5"),
    ("rules:\n  - actions: [route_agent: intake]\n", "rules[0]", "missing required key 'name'"),
    ("rules: {a: 1}\n", "rules", "expected a list, got a mapping"),
    ("default:\n  actions: [route_agent: billing]\n", "default", "the default is already given at 00-decl.yaml"),
    ("agents:\n  intake: {node_set: media, endpoint: '127.0.0.1:4100'}\n", "agents.intake", "agent 'intake' is already declared at 00-decl.yaml"),
    ("agents:\n  a2: {node_set: medai, endpoint: '127.0.0.1:4100'}\n", "agents.a2.node_set", "unknown node set 'medai' (did you mean 'media'?)"),
    ("agents:\n  a2: {node_set: media, endpoint: 'localhost'}\n", "agents.a2.endpoint", "not host:port"),
    ("agents:\n  a2: {node_set: media, endpoint: '1.2.3.4:70000'}\n", "agents.a2.endpoint", "not host:port"),
    ("agents:\n  a2: {node_set: media, endpoint: 'ws://x', transport: websocket}\n", "agents.a2.endpoint", "websocket_client.conf"),
    ("agents:\n  a2: {node_set: media, endpoint: '1.2.3.4:5', codec: mp3}\n", "agents.a2.codec", "not one of"),
    ("agents:\n  a2: {endpoint: '1.2.3.4:5'}\n", "agents.a2", "missing required key 'node_set'"),
    ("agents:\n  'a b': {node_set: media, endpoint: '1.2.3.4:5'}\n", "agents.a b", "is not a valid name"),
    ("destinations:\n  d: {uri: 'pbx.example.com'}\n", "destinations.d.uri", "not a SIP URI"),
    ("destinations:\n  d: {uri: 'sip:a@b', failover: ['sip:a b@c']}\n", "destinations.d.failover[0]", "not a SIP URI"),
    ("number_lists:\n  l: ['+44', '']\n", "number_lists.l[1]", "empty number"),
    ("risk_lists:\n  r: ['4490']\n", "risk_lists.r[0]", "E.164 prefix"),
    ("risk_lists:\n  r: {category: x}\n", "risk_lists.r", "needs `prefixes` or a `file`"),
    ("tenants:\n  t: {trunks: ['300.1.1.1']}\n", "tenants.t.trunks[0]", "not an IP address"),
    ("tenants:\n  t: {}\n", "tenants.t", "must not be empty"),
    ("node_sets:\n  n2: {dispatcher_set: 0}\n", "node_sets.n2.dispatcher_set", "at least 1"),
    ("settings:\n  timezone: Europe/Lundon\n", "settings", "settings are already given"),
    ("- a\n- b\n", "", "must be a mapping of sections"),
]


@pytest.mark.parametrize("rules_yaml, path, fragment", CASES, ids=[f"{c[1]}:{c[2][:30]}" for c in CASES])
def test_validation_error(rules_yaml, path, fragment):
    issues = rule_issues(rules_yaml)
    found = [i for i in issues if i.path == path and fragment in i.message]
    assert found, f"no issue at {path!r} containing {fragment!r}; got:\n" + "\n".join(map(str, issues))
    assert found[0].position.file in ("10-rules.yaml", "00-decl.yaml")


def test_positions_point_at_the_offending_line_and_column():
    issues = rule_issues("rules:\n  - name: r\n    match:\n      caller: {in_list: nope}\n    actions: [route_agent: intake]\n")
    (issue,) = issues
    assert str(issue) == "10-rules.yaml:4:25: error: rules[0].match.caller.in_list: unknown number list 'nope' (declared: vip)"


def test_unknown_key_points_at_the_key():
    (issue,) = rule_issues("rules:\n  - name: r\n    actions: [route_agent: intake]\n    mtch: {caller: '+44'}\n")
    assert (issue.position.line, issue.position.column) == (4, 5)


def test_all_errors_are_reported_at_once_across_files():
    issues = issues_of({
        "a.yaml": DECLARATIONS,
        "b.yaml": "rules:\n  - name: r1\n    match: {caller: {in_list: x}}\n    actions: [route_agent: y]\n",
        "c.yaml": "rules:\n  - name: r2\n    match: {time: {tz: Nowhere/City}}\n    actions: [reject: 99]\n",
    })
    errors = [str(i) for i in issues if i.severity == "error"]
    assert len(errors) == 4, errors
    assert [e.split(":")[0] for e in errors] == ["b.yaml", "b.yaml", "c.yaml", "c.yaml"]


def test_semantic_errors_are_reported_alongside_structural_ones_in_the_same_rule():
    issues = rule_issues(one_rule("{callee: {prefix: '4490'}, source_ip: '1.2.3'}", "[route_agent: x, rejct: 1]"))
    paths = {i.path for i in issues}
    assert {"rules[0].match.callee.prefix", "rules[0].match.source_ip", "rules[0].actions[0].route_agent",
            "rules[0].actions[1].rejct"} <= paths


def test_missing_default():
    issues = issues_of({"a.yaml": DECLARATIONS.replace("default:\n  actions: [route_agent: intake]\n", "")})
    assert any(i.path == "default" and "no default" in i.message for i in issues)


def test_continue_is_not_allowed_in_the_default():
    decl = DECLARATIONS.replace("actions: [route_agent: intake]", "actions: [route_agent: intake, continue: true]")
    issues = issues_of({"a.yaml": decl})
    assert any(i.path == "default.actions[1]" and "cannot be combined" in i.message for i in issues)


def test_yaml_syntax_error_and_duplicate_keys_are_positioned():
    issues = issues_of({"a.yaml": DECLARATIONS, "b.yaml": "rules:\n  - name: r\n    name: s\n"})
    assert [str(i) for i in issues] == ["b.yaml:3:5: error: duplicate key 'name' (first defined at line 2)"]


def test_integer_where_a_string_is_expected_suggests_quoting():
    issues = rule_issues("rules:\n  - name: r\n    match: {header: {name: X-A, equals: 42}}\n    actions: [route_agent: intake]\n")
    assert any("quote it: '42'" in i.message for i in issues)


def test_unreachable_rules_are_a_warning_not_an_error():
    policy = policy_from_texts({"a.yaml": DECLARATIONS, "b.yaml": textwrap.dedent("""\
        rules:
          - name: catch-all
            actions: [route_agent: billing]
          - name: never
            match: {caller: '+44'}
            actions: [route_agent: intake]
        """)})
    (warning,) = policy.warnings
    assert warning.severity == "warning" and "never reached: never" in warning.message


def test_number_list_from_file_with_line_numbers(tmp_path):
    (tmp_path / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "b.yaml").write_text("number_lists:\n  big: {file: lists/big.txt}\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "big.txt").write_text("# VIPs\n+442079460001\n\n02079460002  # national\n")
    policy = load_policy(tmp_path)
    assert policy.source.number_lists["big"] == {"+442079460001", "+442079460002"}
    (tmp_path / "lists" / "big.txt").write_text("+442079460001\n+44 20\x00\n")
    with pytest.raises(PolicyInvalid):
        load_policy(tmp_path)
    (tmp_path / "lists" / "big.txt").write_text("+442079460001\ntrue\n\n")
    policy = load_policy(tmp_path)  # 'true' in a list file is a SIP user, not a boolean
    assert "true" in policy.source.number_lists["big"]


def test_list_file_errors_name_the_list_file_and_line(tmp_path):
    (tmp_path / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "b.yaml").write_text("risk_lists:\n  r: {file: risky.txt}\n")
    (tmp_path / "risky.txt").write_text("+1900\n1976\n")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(tmp_path)
    assert [str(i) for i in info.value.issues] == [
        "risky.txt:2:1: error: risk list entry '1976' must be an E.164 prefix such as '+1900'"]


@pytest.mark.parametrize("relative, message", [
    ("../outside.txt", "outside the policy directory"),
    ("/etc/passwd", "relative to the policy directory"),
    ("missing.txt", "cannot read file"),
])
def test_list_files_must_exist_inside_the_policy_directory(tmp_path, relative, message):
    (tmp_path / "p").mkdir()
    (tmp_path / "outside.txt").write_text("+1\n")
    (tmp_path / "p" / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "p" / "b.yaml").write_text(f"number_lists:\n  l: {{file: '{relative}'}}\n")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(tmp_path / "p")
    assert any(message in i.message for i in info.value.issues), info.value.issues


def test_files_that_cannot_be_read_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "b.yaml").write_bytes(b"agents: \xff\xfe\n")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(tmp_path)
    assert [str(i) for i in info.value.issues] == ["b.yaml:1:1: error: file is not UTF-8 (byte 8)"]


def test_missing_directory():
    with pytest.raises(PolicyInvalid) as info:
        load_policy("/nonexistent/policies")
    assert "does not exist" in str(info.value)


def test_only_yaml_files_at_the_top_are_policy_files(tmp_path):
    (tmp_path / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "notes.txt").write_text("not: [valid")
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text("tests: []\n")
    assert load_policy(tmp_path).source.files == ("a.yaml",)
