"""A validated policy as canonical JSON (controller/policy/canonical.py): every policy survives
the round trip and decides the same, the same policy always gives the same bytes, and a
document that is not a policy of this model is refused with where and why."""
import json
import textwrap
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from controller.policy import Policy, load_policy, policy_from_texts
from controller.policy.canonical import DocumentInvalid, decode, encode
from tests.policy.helpers import DECLARATIONS, call, policy_with
from tests.policy.test_security import SECURITY
from tests.policy.test_trunks import TRUNKS

ROOT = Path(__file__).resolve().parents[2]
RULES = """\
rules:
  - name: premium
    match: {destination_risk: premium}
    actions: [reject: {code: 403, reason: Destination Blocked}]
  - name: vip
    match: {caller: {in_list: vip}, time: {days: mon-fri, hours: "08:00-18:00"}}
    actions: [route_sip: pbx, add_headers: {X-Vip: "yes", X-Caller: "${caller}"}, max_duration: 30m]
  - name: webhook
    match: {any: [{ruri: "+442079460999"}, {header: {name: X-Lang, equals: fr}}]}
    actions:
      - ask_webhook: {url: "http://127.0.0.1:8081/hook", timeout_ms: 150, fallback: [route_agent: billing]}
      - fork: {target: rec, direction: in}
  - name: tagged
    match: {tenant: acme, split: {percent: 20, seed: s}}
    actions: [add_headers: {X-Tag: a}, continue: true]
"""


def rich_policy() -> Policy:
    return policy_from_texts({"00-decl.yaml": DECLARATIONS, "05-trunks.yaml": TRUNKS, "06-sec.yaml": SECURITY,
                              "10-rules.yaml": textwrap.dedent(RULES)})


@pytest.mark.parametrize("make", [lambda: load_policy(ROOT / "policies"), rich_policy,
                                  lambda: policy_with("rules: []\n")], ids=["repository", "rich", "minimal"])
def test_every_policy_survives_the_round_trip(make):
    policy = make()
    data = encode(policy.source)
    assert decode(data) == policy.source
    again = Policy(decode(data))
    for c in (call(to_user="09090000000"), call(from_user="+442079460000"), call(to_user="02079460999"),
              call(src_ip="203.0.113.9", to_user="02079460123", headers={"X-Lang": ["fr"]})):
        assert again.decide(c).to_dict() == policy.decide(c).to_dict()


def test_the_same_policy_gives_the_same_bytes():
    first, second = encode(rich_policy().source), encode(rich_policy().source)
    assert first == second
    document = json.loads(first)
    assert json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == first


def _document(policy: Policy) -> dict:
    return json.loads(encode(policy.source))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["policy"].__setitem__("version", 7), "policy.version: expected str, found int"),
    (lambda d: d["policy"]["agents"]["intake"].pop("codec"), "policy.agents.intake: Agent missing codec"),
    (lambda d: d["policy"]["agents"]["intake"].__setitem__("__reduce__", "os.system"), "unknown __reduce__"),
    (lambda d: d["policy"]["tenants"][0].__setitem__("trunks", ["not-a-net"]), "'not-a-net' is not a network"),
    (lambda d: d["policy"]["node_sets"]["media"].__setitem__("dispatcher_set", True), "expected int, found bool"),
    (lambda d: d["policy"].__setitem__("rules", {"a": 1}), "policy.rules: expected a list"),
    (lambda d: d["policy"].__setitem__("security", []), "policy.security: expected an object (SecurityPolicy)"),
    (lambda d: d.__setitem__("format", 2), "format 2"),
    (lambda d: d.__setitem__("extra", 1), "not a policy document"),
])
def test_a_document_that_is_not_a_policy_is_refused_with_where(change, message):
    document = _document(rich_policy())
    change(document)
    with pytest.raises(DocumentInvalid, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(json.dumps(document).encode())


@pytest.mark.parametrize("data", [b"", b"\xff", b"[]", b'{"format":1}', b"nul" * 10, b"[" * 100000],
                         ids=["empty", "bytes", "list", "no-policy", "words", "deep"])
def test_garbage_is_refused(data):
    with pytest.raises(DocumentInvalid):
        decode(data)


@pytest.mark.parametrize("match", [{"ruri": ("+1", "+2")}, {"time": {"dates": [date(2026, 12, 25)]}}, {1: "x"}],
                         ids=["tuple", "date", "int-key"])
def test_a_value_json_cannot_carry_is_refused_when_encoding(match):
    policy = rich_policy()
    rule = policy.source.rules[0]
    policy.source.rules = (replace(rule, match=match),) + policy.source.rules[1:]
    with pytest.raises(DocumentInvalid, match="policy.rules.0..match"):
        encode(policy.source)
