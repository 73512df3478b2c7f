"""Readable messages for JSON Schema errors (policy files, API bodies): what was expected,
what was found, and — for an unknown key — the closest known one."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from controller.actions import DURATION_PATTERN, FORK_ID_PATTERN, PLAY_MEDIA_PATTERN

Path = tuple[Any, ...]

TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "nothing"}
_PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$": "a name (letters, digits, '_', '.', '-', starting with a letter or digit)",
    DURATION_PATTERN: "a duration such as 90, 90s, 15m, 2h or 250ms",
    PLAY_MEDIA_PATTERN: "media to play: sound:NAME or recording:NAME (a relative name), tone:NAME or a tone "
                        "string such as 440+480/2000|0/4000 (;tonezone=uk), digits:0-9*#, number:-?N (up to 9 "
                        "digits), characters:TEXT or an http(s) URL",
    FORK_ID_PATTERN: "a fork id such as f3 (see the call's forks)",
    r"^https?://[^\s]+$": "an http:// or https:// URL",
    r"^[1-9][0-9]{0,2}$": "a country calling code such as '44' or '1'",
    r"^[0-9]{1,4}$": "digits", r"^[0-9]{1,3}$": "digits",
}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _quote_hint(types: Iterable[str], instance: Any) -> str:
    if "string" in types and isinstance(instance, (int, float)) and not isinstance(instance, bool):
        return f" (quote it: '{instance}')"
    return ""


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def describe(error: Any) -> list[tuple[Path, str, bool]]:
    """Operator-facing (path, message, points-at-the-key) for a jsonschema error; several for
    an unknown-keys error, the fitting branch's errors for oneOf/anyOf."""
    path: Path = tuple(error.absolute_path)
    validator, value, instance = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.absolute_schema_path:
        return [(path + (instance,), f"{instance!r} is not a valid name: use {_PATTERN_WORDS.get(value, 'text matching ' + value)}", True)]
    if validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        out = []
        for extra in sorted(set(instance) - set(allowed)):
            what = "action" if _is_action_path(path) else ("condition" if _is_condition(error) else "key")
            hint = difflib.get_close_matches(extra, allowed, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (expected one of: {', '.join(allowed)})"
            out.append((path + (extra,), f"unknown {what} {extra!r}{suggestion}", True))
        return out
    if validator in ("oneOf", "anyOf"):
        branch = _matching_branch(error)
        if branch:
            return [d for sub in branch for d in describe(sub)]
        types = _branch_types(value)
        expected = " or ".join(sorted({TYPE_WORDS.get(t, t) for t in types}))
        return [(path, f"expected {expected}, got {TYPE_WORDS[json_type(instance)]} {show(instance)}"
                       f"{_quote_hint(types, instance)}", False)]
    if validator == "type":
        types = value if isinstance(value, list) else [value]
        expected = " or ".join(TYPE_WORDS.get(t, t) for t in types)
        return [(path, f"expected {expected}, got {TYPE_WORDS[json_type(instance)]} {show(instance)}"
                       f"{_quote_hint(types, instance)}", False)]
    if validator == "required":
        missing = [name for name in value if isinstance(instance, dict) and name not in instance]
        return [(path, f"missing required key {name!r}", False) for name in missing]
    if validator == "enum":
        hint = difflib.get_close_matches(str(instance), [str(v) for v in value], n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return [(path, f"{show(instance)} is not one of: {', '.join(map(str, value))}{suggestion}", False)]
    if validator == "const":
        return [(path, f"expected {value!r}, got {show(instance)}", False)]
    if validator == "pattern":
        words = _PATTERN_WORDS.get(value, f"text matching {value}")
        return [(path, f"{show(instance)} is not {words}", False)]
    if validator in ("maxProperties", "minProperties") and _is_action_path(path):
        verbs = ", ".join(instance) if instance else "none"
        return [(path, f"an action has exactly one verb as its key, found: {verbs}", False)]
    if validator == "minProperties":
        return [(path, "must not be empty", False)]
    if validator == "maxProperties":
        return [(path, f"has more than {value} entries", False)]
    if validator == "minItems":
        return [(path, "must not be empty" if value == 1 else f"needs at least {value} items", False)]
    if validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "more than",
                 "exclusiveMaximum": "less than"}[validator]
        return [(path, f"{show(instance)} must be {words} {value}", False)]
    if validator in ("minLength", "maxLength"):
        words = "at least" if validator == "minLength" else "at most"
        return [(path, f"must be {words} {value} characters long", False)]
    return [(path, error.message, False)]



def _is_action_path(path: Path) -> bool:
    return len(path) >= 2 and isinstance(path[-1], int) and path[-2] in ("actions", "fallback")


def _is_condition(error: Any) -> bool:
    return "caller" in error.schema.get("properties", {})


def _branch_types(branches: list[dict[str, Any]]) -> set[str]:
    types: set[str] = set()
    for branch in branches:
        t = branch.get("type")
        if t:
            types.update(t if isinstance(t, list) else [t])
        elif "enum" in branch or "const" in branch:
            types.add("string")
        elif "anyOf" in branch or "oneOf" in branch:
            types |= _branch_types(branch.get("anyOf") or branch.get("oneOf"))
    return types


def _matching_branch(error: Any) -> list[Any] | None:
    """The sub-errors of the oneOf/anyOf branch whose type fits the instance, if exactly one does."""
    kind = json_type(error.instance)
    fitting = [i for i, branch in enumerate(error.validator_value)
               if kind in _branch_types([branch]) or (kind == "integer" and "number" in _branch_types([branch]))]
    if len(fitting) != 1:
        return None
    subs = [e for e in error.context if e.relative_schema_path and e.relative_schema_path[0] == fitting[0]]
    return subs or None
