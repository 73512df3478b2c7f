"""Which branch of a `gather` a result takes: the first whose `match` holds for the digits
gathered and why the gather ended (see actions.gathered_condition_schema). Pure."""
from __future__ import annotations

import re
from typing import Any, Mapping

from controller.actions import canonical_action, parse_duration_ms

MAX_RECORDING_S = 24 * 3600
# Verbs of live actions that name a declaration, and the section and key of the name.
NAMED = {"route_agent": ("agents", "agent", "agent"), "route_sip": ("destinations", "destination", "destination"),
         "add_human": ("destinations", "destination", "destination"), "fork": ("fork_targets", "target", "fork target")}


def branch_actions(then: list[dict[str, Any]], digits: str, reason: str) -> list[dict[str, Any]] | None:
    """The actions of the first branch that holds (a branch without `match` always does), or
    None when none does. `then` must be schema-valid."""
    for branch in then:
        if "match" not in branch or holds(branch["match"], digits, reason):
            return branch["actions"]
    return None


def holds(condition: dict[str, Any], digits: str, reason: str) -> bool:
    """Whether every key of a gathered-digits condition holds."""
    for kind, value in condition.items():
        if kind == "all":
            ok = all(holds(c, digits, reason) for c in value)
        elif kind == "any":
            ok = any(holds(c, digits, reason) for c in value)
        elif kind == "not":
            ok = not holds(value, digits, reason)
        elif kind == "reason":
            ok = reason in ([value] if isinstance(value, str) else value)
        else:
            ok = _digits_hold(value, digits)
        if not ok:
            return False
    return True


def _digits_hold(value: Any, digits: str) -> bool:
    if isinstance(value, (str, list)):
        return digits in ([value] if isinstance(value, str) else value)
    checks = []
    if "exact" in value:
        checks.append(digits in ([value["exact"]] if isinstance(value["exact"], str) else value["exact"]))
    if "prefix" in value:
        prefixes = [value["prefix"]] if isinstance(value["prefix"], str) else value["prefix"]
        checks.append(any(digits.startswith(p) for p in prefixes))
    if "regex" in value:
        checks.append(re.search(value["regex"], digits) is not None)
    if "min_length" in value:
        checks.append(len(digits) >= value["min_length"])
    if "max_length" in value:
        checks.append(len(digits) <= value["max_length"])
    return all(checks)


def regex_problems(condition: dict[str, Any], path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, message) for every regex of a condition that does not compile."""
    out = []
    for kind, value in condition.items():
        if kind in ("all", "any"):
            for i, sub in enumerate(value):
                out += regex_problems(sub, path + (kind, i))
        elif kind == "not":
            out += regex_problems(value, path + (kind,))
        elif kind == "digits" and isinstance(value, dict) and "regex" in value:
            try:
                re.compile(value["regex"])
            except re.error as exc:
                out.append((path + ("digits", "regex"), f"invalid regex: {exc}"))
    return out


def media_action_problems(verb: str, arg: dict[str, Any],
                          names: Mapping[str, Any] | None = None) -> list[tuple[tuple, str]]:
    """(path, message) for what the schema cannot say about a schema-valid record / gather (or
    a live action in a gather's branch): names the policy does not declare (`names`: section →
    declared names; None: not checked), regexes that do not compile, durations out of range."""
    out: list[tuple[tuple, str]] = []
    if verb in NAMED and names is not None:
        section, key, noun = NAMED[verb]
        if arg[key] not in names[section]:
            out.append(((), f"unknown {noun} {arg[key]!r}"))
    elif verb == "record" and "max_duration" in arg:
        try:
            if parse_duration_ms(arg["max_duration"]) // 1000 > MAX_RECORDING_S:
                out.append((("max_duration",), f"at most {MAX_RECORDING_S // 3600} hours"))
        except ValueError as exc:
            out.append((("max_duration",), str(exc)))
    elif verb == "gather":
        if "timeout" in arg:
            try:
                if not 100 <= parse_duration_ms(arg["timeout"]) <= 120_000:
                    out.append((("timeout",), "the timeout must be 100 ms to 120 s"))
            except ValueError as exc:
                out.append((("timeout",), str(exc)))
        for i, branch in enumerate(arg.get("then", [])):
            out += [(("then", i, "match") + p, m) for p, m in regex_problems(branch.get("match", {}))]
            for j, action in enumerate(branch["actions"]):
                nested_verb, nested_arg = canonical_action(action)
                out += [(("then", i, "actions", j, nested_verb) + p, m)
                        for p, m in media_action_problems(nested_verb, nested_arg, names)]
    return out
