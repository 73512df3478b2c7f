"""The one JSON Schema validator of policy files, webhook answers and API bodies: Draft 2020-12
with its `pattern` read as ECMA-262 reads it. jsonschema hands patterns to Python's `re`, where
`$` also matches before a final newline: `^[A-Za-z0-9_-]+$` took "X-A\\n", so a header name or a
caller ID could carry a line break toward SIP. Here `$` outside a character class is `\\Z`."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterator

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError


@lru_cache(maxsize=None)
def ecma_pattern(pattern: str) -> re.Pattern[str]:
    """`pattern` compiled for Python with ECMA's `$` (the end of the string, nothing after)."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i:i + 1] == "]":  # (a ']' first in a class is one of its characters)
                out.append("]")
                i += 1
            continue
        elif c == "$":
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not ecma_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


SchemaValidator = validators.extend(Draft202012Validator, {"pattern": _pattern})
