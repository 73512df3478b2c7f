"""Media actions in policies and decision-webhook answers: `record` and `gather` run once the
call is connected to its agent. They travel in the decision (`on_answer`), rules that add to
each other combine them, and what the schema cannot check (names in a gather's branches,
regexes, durations) is refused with its file:line."""
from __future__ import annotations

import pytest

from controller.policy.answers import AnswerInvalid, decision_from_answer
from controller.policy.gathered import branch_actions, holds
from tests.policy.helpers import call, issues_of, policy_with
from tests.policy.helpers import DECLARATIONS


def test_record_and_gather_travel_in_the_decision():
    policy = policy_with("""\
        rules:
          - name: recorded
            match: {callee: "+442079460001"}
            actions: [record: both, continue: true]
          - name: ivr
            match: {callee: "+442079460001"}
            actions:
              - route_agent: intake
              - record: {channels: caller, beep: true}
              - record: both
              - gather: {max_digits: 1, prompt: "sound:menu", then: [{match: {digits: "1"}, actions: [route_agent: billing]}]}
        """)
    decision = policy.decide(call(to_user="02079460001"))
    assert decision.rule == "ivr"
    assert [dict(a) for a in decision.on_answer] == [
        {"record": {"channels": "both"}}, {"record": {"channels": "caller", "beep": True}},
        {"gather": {"max_digits": 1, "prompt": "sound:menu",
                    "then": [{"match": {"digits": "1"}, "actions": [{"route_agent": "billing"}]}]}}]
    assert decision.to_dict()["on_answer"][0] == {"record": {"channels": "both"}}
    assert policy.explain(call(to_user="02079460001")).decision.to_dict() == decision.to_dict()
    assert "on_answer" not in policy.decide(call(to_user="02079460002")).to_dict()


@pytest.mark.parametrize("action, path, fragment", [
    ("gather: {then: [{actions: [route_agent: nobody]}]}", "rules[0].actions[1].gather.then[0].actions[0].route_agent",
     "unknown agent 'nobody'"),
    ("gather: {then: [{match: {digits: {regex: '(('}}, actions: [hangup: true]}]}",
     "rules[0].actions[1].gather.then[0].match.digits.regex", "invalid regex"),
    ("gather: {timeout: 5m}", "rules[0].actions[1].gather.timeout", "100 ms to 120 s"),
    ("record: {max_duration: 48h}", "rules[0].actions[1].record.max_duration", "at most 24 hours"),
    ("record: everything", "rules[0].actions[1].record", ""),
])
def test_media_actions_are_checked_with_their_position(action, path, fragment):
    issues = issues_of({"00-decl.yaml": DECLARATIONS,
                        "10-rules.yaml": f"rules:\n  - name: r\n    actions: [route_agent: intake, {action}]\n"})
    found = [i for i in issues if i.path.startswith(path) and fragment in i.message]
    assert found, "\n".join(map(str, issues))
    assert found[0].position.file == "10-rules.yaml" and found[0].position.line == 3


def test_a_decision_webhook_answer_may_record_and_gather():
    policy = policy_with("""\
        rules:
          - name: ask
            actions:
              - ask_webhook: {url: "http://app/hook", fallback: [route_agent: intake]}
              - record: agent
        """)
    asked = policy.decide(call())
    decision = decision_from_answer(policy.source, asked, {"actions": [
        {"route_agent": "billing"}, {"record": "caller"}, {"gather": {"max_digits": 4, "webhook": "http://app/pin"}}]})
    assert decision.agent.name == "billing"
    assert [dict(a) for a in decision.on_answer] == [{"record": {"channels": "agent"}},
                                                     {"record": {"channels": "caller"}},
                                                     {"gather": {"max_digits": 4, "webhook": "http://app/pin"}}]
    with pytest.raises(AnswerInvalid, match="unknown destination 'nowhere'"):
        decision_from_answer(policy.source, asked, {"actions": [
            {"route_agent": "billing"}, {"gather": {"then": [{"actions": [{"route_sip": "nowhere"}]}]}}]})


def test_gathered_conditions():
    then = [{"match": {"digits": "1"}, "actions": ["one"]},
            {"match": {"all": [{"digits": {"prefix": "9", "min_length": 3}}, {"not": {"reason": "timeout"}}]},
             "actions": ["nine"]},
            {"match": {"any": [{"digits": ["", "0"]}, {"reason": ["timeout"]}]}, "actions": ["operator"]},
            {"match": {"digits": {"regex": "^[2-8]$", "max_length": 1}}, "actions": ["menu"]}]
    assert branch_actions(then, "1", "max_digits") == ["one"]
    assert branch_actions(then, "912", "finish_key") == ["nine"]
    assert branch_actions(then, "912", "timeout") == ["operator"]
    assert branch_actions(then, "", "timeout") == ["operator"]
    assert branch_actions(then, "5", "max_digits") == ["menu"]
    assert branch_actions(then, "55", "max_digits") is None
    assert holds({"digits": {"exact": ["12", "34"]}}, "34", "finish_key")
    assert not holds({"digits": {"exact": "12"}, "reason": "timeout"}, "12", "finish_key")
