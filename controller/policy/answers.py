"""Decision-webhook answers: `{"actions": [...]}` in the same vocabulary as policy rules,
validated as strictly (one terminal action, declared names, safe headers; `record` and
`gather` run once the call is connected), turned into the call's decision. Pure: the controller fetches the answer, this decides what it means."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.actions import (
    TERMINAL_VERBS, action_schema, canonical_action, header_name_problem, header_value_problem, parse_duration_ms,
    reason_problem,
)
from controller.json_schema import SchemaValidator
from controller.policy.actionset import REASON_PHRASES, merge_on_answer
from controller.policy.gathered import media_action_problems
from controller.policy.model import Decision, Fork
from controller.schema_errors import describe

_ANSWER = SchemaValidator({
    "type": "object", "required": ["actions"], "additionalProperties": False,
    "properties": {"actions": {"type": "array", "minItems": 1, "maxItems": 32, "items": {"$ref": "#/$defs/action"}}},
    "$defs": {"action": action_schema()},
})


class AnswerInvalid(ValueError):
    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


def decision_from_answer(source: Any, asked: Decision, answer: Any) -> Decision:
    """The decision for a call whose policy asked a webhook (`asked.outcome == "webhook"`):
    the answer's terminal action, plus what the rules already added (headers, forks, limit)."""
    errors = [(".".join(map(str, path)) or "(answer)", message)
              for error in _ANSWER.iter_errors(answer) for path, message, _ in describe(error)]
    if errors:
        raise AnswerInvalid(errors)
    terminal: dict[str, Any] = {}
    headers = dict(asked.headers)
    forks = {(f.target, f.direction): f for f in asked.forks}
    durations = [asked.max_duration_s] if asked.max_duration_s else []
    anchor = asked.anchor_media
    on_answer: list[dict[str, Any]] = []
    names = {section: getattr(source, section) for section in ("agents", "destinations", "fork_targets")}
    for i, action in enumerate(answer["actions"]):
        verb, arg = canonical_action(action)
        where = f"actions.{i}.{verb}"
        if verb in ("ask_webhook", "continue"):
            errors.append((where, f"`{verb}` is not allowed in a webhook answer"))
        elif verb in TERMINAL_VERBS:
            if terminal:
                errors.append((where, "an answer has one terminal action (route_agent, route_sip or reject)"))
            elif verb == "route_agent":
                agent = source.agents.get(arg["agent"])
                if agent is None:
                    errors.append((where, f"unknown agent {arg['agent']!r}"))
                terminal = {"outcome": "agent", "agent": agent}
            elif verb == "route_sip":
                destination = source.destinations.get(arg["destination"])
                if destination is None:
                    errors.append((where, f"unknown destination {arg['destination']!r}"))
                terminal = {"outcome": "sip", "destination": destination}
            else:
                reason = arg.get("reason") or REASON_PHRASES.get(arg["code"], "Rejected")
                if problem := reason_problem(reason):
                    errors.append((where, problem))
                terminal = {"outcome": "reject", "reject_code": arg["code"], "reject_reason": reason}
        elif verb == "add_headers":
            for name, value in arg.items():
                problem = header_name_problem(name) or header_value_problem(value)
                if problem:
                    errors.append((f"{where}.{name}", problem))
                else:
                    headers[name] = value
        elif verb == "fork":
            target = source.fork_targets.get(arg["target"])
            if target is None:
                errors.append((where, f"unknown fork target {arg['target']!r}"))
                continue
            fork = Fork(target.name, target.endpoint, arg.get("transport", target.transport),
                        arg.get("codec", target.codec), arg.get("direction", target.direction))
            forks.setdefault((fork.target, fork.direction), fork)
        elif verb == "max_duration":
            durations.append(max(1, parse_duration_ms(arg) // 1000))
        elif verb == "anchor_media":
            anchor = arg
        elif verb in ("record", "gather"):
            problems = media_action_problems(verb, arg, names)
            errors += [(".".join([where, *map(str, path)]), message) for path, message in problems]
            on_answer.append({verb: arg})
    if not terminal:
        errors.append(("actions", "an answer needs a terminal action (route_agent, route_sip or reject)"))
    if errors:
        raise AnswerInvalid(errors)
    fallback = asked.webhook.fallback
    target = {"agent": None, "destination": None, "reject_code": None, "reject_reason": None, **terminal}
    return replace(fallback, **target, headers=tuple(headers.items()), forks=tuple(forks.values()),
                   max_duration_s=min(durations) if durations else None, anchor_media=anchor,
                   on_answer=merge_on_answer([asked.on_answer, tuple(on_answer)]))
