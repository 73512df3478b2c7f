"""A rule's validated actions, prepared once per load, and how the actions of the rules a
call went through combine into one Decision (shared by every evaluator)."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from controller.actions import ON_ANSWER_VERBS, canonical_action, parse_duration_ms, sanitize_header_value
from controller.policy.facts import Facts
from controller.policy.model import Agent, Decision, Destination, Fork, ForkTarget, WebhookAsk

PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
PLACEHOLDERS = ("caller", "callee", "ruri", "call_id", "tenant", "source_ip", "rule", "policy_version")


@dataclass(frozen=True, slots=True)
class HeaderTemplate:
    name: str
    text: str
    dynamic: bool  # contains ${...} placeholders

    def render(self, facts: Facts, rule: str, version: str) -> str:
        if not self.dynamic:
            return self.text
        values = {
            "caller": facts.caller, "callee": facts.callee, "ruri": facts.ruri, "call_id": facts.call_id,
            "tenant": facts.tenant or "", "source_ip": str(facts.src_ip or ""), "rule": rule,
            "policy_version": version,
        }
        return sanitize_header_value(PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text))


@dataclass(frozen=True, slots=True)
class ActionSet:
    terminal: str | None  # agent | sip | reject | webhook; None for a `continue` rule
    agent: Agent | None = None
    destination: Destination | None = None
    reject_code: int | None = None
    reject_reason: str | None = None
    webhook_url: str | None = None
    webhook_timeout_ms: int | None = None
    webhook_fallback: "ActionSet | None" = None
    headers: tuple[HeaderTemplate, ...] = ()
    forks: tuple[Fork, ...] = ()
    max_duration_s: int | None = None
    anchor_media: str | None = None
    on_answer: tuple[dict[str, Any], ...] = ()  # record / gather, as live action documents


# Standard reason phrases for the reject codes operators use most.
REASON_PHRASES = {
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    406: "Not Acceptable", 408: "Request Timeout", 410: "Gone", 480: "Temporarily Unavailable",
    484: "Address Incomplete", 486: "Busy Here", 488: "Not Acceptable Here", 500: "Server Internal Error",
    502: "Bad Gateway", 503: "Service Unavailable", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


def build_action_set(actions: list[dict[str, Any]], agents: dict[str, Agent], destinations: dict[str, Destination],
                     fork_targets: dict[str, ForkTarget], default_timeout_ms: int = 1000) -> ActionSet:
    """`actions` must already be validated (names resolve, one terminal verb at most)."""
    fields: dict[str, Any] = {"terminal": None}
    headers: list[HeaderTemplate] = []
    forks: list[Fork] = []
    on_answer: list[dict[str, Any]] = []
    for action in actions:
        verb, arg = canonical_action(action)
        if verb == "route_agent":
            fields.update(terminal="agent", agent=agents[arg["agent"]])
        elif verb == "route_sip":
            fields.update(terminal="sip", destination=destinations[arg["destination"]])
        elif verb == "reject":
            code = arg["code"]
            fields.update(terminal="reject", reject_code=code,
                          reject_reason=arg.get("reason") or REASON_PHRASES.get(code, "Rejected"))
        elif verb == "ask_webhook":
            fallback = build_action_set(arg["fallback"], agents, destinations, fork_targets)
            fields.update(terminal="webhook", webhook_url=arg["url"],
                          webhook_timeout_ms=arg.get("timeout_ms", default_timeout_ms), webhook_fallback=fallback)
        elif verb == "add_headers":
            headers.extend(HeaderTemplate(n, v, bool(PLACEHOLDER.search(v))) for n, v in arg.items())
        elif verb == "fork":
            target = fork_targets[arg["target"]]
            forks.append(Fork(target.name, target.endpoint, arg.get("transport", target.transport),
                              arg.get("codec", target.codec), arg.get("direction", target.direction)))
        elif verb == "max_duration":
            fields["max_duration_s"] = max(1, parse_duration_ms(arg) // 1000)
        elif verb == "anchor_media":
            fields["anchor_media"] = arg
        elif verb in ON_ANSWER_VERBS:
            on_answer.append({verb: arg})
    return ActionSet(headers=tuple(headers), forks=tuple(forks), on_answer=tuple(on_answer), **fields)


def merge_on_answer(lists: list[tuple[dict[str, Any], ...]]) -> tuple[dict[str, Any], ...]:
    """Media actions of several rules, in order: each recording (by what it records) once, the
    last gather only (a gather replaces the one before)."""
    records: dict[str, dict[str, Any]] = {}
    gather: dict[str, Any] | None = None
    for actions in lists:
        for action in actions:
            ((verb, arg),) = action.items()
            if verb == "record":
                records.setdefault(arg.get("channels", "both"), action)
            else:
                gather = action
    return tuple(records.values()) + ((gather,) if gather else ())


def assemble(applied: list[tuple[str, ActionSet]], facts: Facts, version: str) -> Decision:
    """Combine the actions of the rules applied, in order; the last one is terminal.

    Headers: a later rule's value replaces an earlier one of the same name. Forks: each
    (target, direction) once. Maximum duration: the smallest one given wins. Media anchoring:
    the last one given. Media actions: see merge_on_answer.
    """
    rule, final = applied[-1]
    headers: dict[str, tuple[str, str]] = {}
    forks: dict[tuple[str, str], Fork] = {}
    max_duration: int | None = None
    anchor: str | None = None
    for rule_name, actions in applied:
        for header in actions.headers:
            headers[header.name.lower()] = (header.name, header.render(facts, rule_name, version))
        for fork in actions.forks:
            forks.setdefault((fork.target, fork.direction), fork)
        if actions.max_duration_s is not None:
            max_duration = actions.max_duration_s if max_duration is None else min(max_duration, actions.max_duration_s)
        anchor = actions.anchor_media or anchor
    common = dict(rule=rule, applied_rules=tuple(name for name, _ in applied), policy_version=version,
                  headers=tuple(headers.values()), forks=tuple(forks.values()), max_duration_s=max_duration,
                  tenant=facts.tenant, trunk=facts.trunk, anchor_media=anchor,
                  on_answer=merge_on_answer([a.on_answer for _, a in applied]))
    if final.terminal == "agent":
        return Decision(outcome="agent", agent=final.agent, **common)
    if final.terminal == "sip":
        return Decision(outcome="sip", destination=final.destination, **common)
    if final.terminal == "reject":
        return Decision(outcome="reject", reject_code=final.reject_code, reject_reason=final.reject_reason, **common)
    fallback = assemble(applied[:-1] + [(rule, _with_fallback(final))], facts, version)
    return Decision(outcome="webhook", webhook=WebhookAsk(final.webhook_url, final.webhook_timeout_ms, fallback), **common)


def _with_fallback(actions: ActionSet) -> ActionSet:
    """The webhook rule's own headers/forks/limit, decided by its fallback actions."""
    fallback = actions.webhook_fallback
    limits = [d for d in (actions.max_duration_s, fallback.max_duration_s) if d is not None]
    return replace(fallback, headers=actions.headers + fallback.headers, forks=actions.forks + fallback.forks,
                   max_duration_s=min(limits) if limits else None,
                   anchor_media=fallback.anchor_media or actions.anchor_media,
                   on_answer=actions.on_answer + fallback.on_answer)
