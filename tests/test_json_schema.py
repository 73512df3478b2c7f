"""Schema patterns read as JSON Schema (ECMA-262) reads them: `$` is the end of the string, so a
value with a final newline never passes a pattern meant to keep line breaks out of SIP."""
from __future__ import annotations

import pytest

from controller.actions import CALLER_ID_SCHEMA, live_action_schema
from controller.json_schema import SchemaValidator, ecma_pattern


@pytest.mark.parametrize("pattern, text, matches", [
    (r"^[A-Za-z0-9_-]+$", "X-A", True),
    (r"^[A-Za-z0-9_-]+$", "X-A\n", False),
    (r"^[^\r\n\x00]*$", "Bob\n", False),
    (r"^https?://[^\s]+$", "http://x\n", False),
    (r"^[$]+$", "$$", True),            # a '$' in a class is the character
    (r"^a\$$", "a$", True),             # an escaped '$' too
    (r"^[]$]+$", "]$", True),           # a ']' first in a class is one of its characters
    (r"^(a$|b)c?$", "a", True),
    (r"^(a$|b)c?$", "a\n", False),
])
def test_dollar_is_the_end_of_the_string(pattern, text, matches):
    assert bool(ecma_pattern(pattern).search(text)) is matches


def test_a_final_newline_is_refused_where_python_re_took_it():
    caller_id = SchemaValidator(CALLER_ID_SCHEMA)
    assert caller_id.is_valid("Bob")
    assert not caller_id.is_valid("Bob\n")
    live = SchemaValidator(live_action_schema())
    assert live.is_valid({"send_dtmf": "12#"})
    assert not live.is_valid({"send_dtmf": "12#\n"})
