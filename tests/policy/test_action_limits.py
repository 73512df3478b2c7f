"""What may reach a SIP message, at its exact limits (controller/actions.py): header values of
1024 bytes, reasons of 128, control characters, durations from 1 second."""
from __future__ import annotations

import pytest

from controller.actions import (MAX_HEADER_BYTES, STANDARD_SETTABLE_HEADERS, canonical_action, header_name_problem,
                                header_value_problem, parse_duration_ms, reason_problem, sanitize_header_value)


def test_header_values_up_to_1024_bytes():
    assert MAX_HEADER_BYTES == 1024
    assert header_value_problem("a" * 1024) is None
    assert "longer than 1024 bytes" in header_value_problem("a" * 1025)
    assert "longer than 1024 bytes" in header_value_problem("é" * 513)  # 1026 bytes
    assert header_value_problem("tab\tkept") is None
    for bad in ("a\rb", "a\nb", "a\x00b", "a\x7fb"):
        assert "control character" in header_value_problem(bad)
    assert header_value_problem(5) == "header value must be a string"


def test_sanitising_replaces_control_characters_and_cuts_at_1024_bytes_on_a_character_boundary():
    assert sanitize_header_value("a" * 1024) == "a" * 1024
    assert sanitize_header_value("a" * 1025) == "a" * 1024
    assert sanitize_header_value("x\r\ny\x00z\tw") == "x  y z\tw"
    cut = sanitize_header_value("é" * 600)  # 1200 bytes: cut between two characters
    assert cut == "é" * 512 and len(cut.encode()) == 1024


def test_a_header_name_is_a_token_to_its_last_character():
    """A regex `$` also matches before a final newline: a webhook answer's header name "X-A\\n"
    would reach the edge's header block as a line break."""
    assert header_name_problem("X-Agent-Hint") is None
    for bad in ("X-A\n", "X-A\r\n", "X A", "X-A:"):
        assert header_name_problem(bad) is not None, bad


def test_header_names_up_to_64_characters_and_what_is_said_of_the_others():
    assert header_name_problem("X-" + "a" * 62) is None
    name = "X-" + "a" * 63
    assert header_name_problem(name) == f"header name {name[:20]!r}… is longer than 64 characters"
    assert header_name_problem("") == header_name_problem(5) == "header name must be a non-empty string"
    allowed = ", ".join(sorted(STANDARD_SETTABLE_HEADERS))
    assert header_name_problem("Foo") == f"custom header 'Foo' must start with 'X-' (standard headers allowed: {allowed})"
    assert "subject, user-to-user" in allowed


@pytest.mark.parametrize("action, expanded", [
    ({"send_dtmf": "12#"}, ("send_dtmf", {"digits": "12#"})),
    ({"record": "caller"}, ("record", {"channels": "caller"})),
    ({"stop_record": True}, ("stop_record", {})),
    ({"stop_record": {"recording_id": "r1"}}, ("stop_record", {"recording_id": "r1"})),
    ({"continue": True}, ("continue", True)),  # (only stop_record's true is a shorthand)
    ({"send_dtmf": {"digits": "1", "to": "caller"}}, ("send_dtmf", {"digits": "1", "to": "caller"})),
])
def test_shorthand_actions_expand_to_their_full_form(action, expanded):
    assert canonical_action(action) == expanded


def test_reasons_up_to_128_bytes_without_control_characters():
    assert reason_problem("r" * 128) is None
    assert reason_problem("r" * 129) == "reason is longer than 128 bytes"
    assert "control character" in reason_problem("Busy\r\nX-Evil: 1")


@pytest.mark.parametrize("value, ms", [(1, 1000), (90, 90_000), ("1", 1000), ("250ms", 250), ("15m", 900_000),
                                       ("2h", 7_200_000), ("90s", 90_000)])
def test_durations(value, ms):
    assert parse_duration_ms(value) == ms


@pytest.mark.parametrize("value, problem", [(0, "must be positive, got 0"), (-3, "must be positive"),
                                            (True, "is not a duration"), ("0", "is not a duration"),
                                            ("1.5s", "is not a duration"), ("15 m", "is not a duration"),
                                            (14.0, "is not a duration")])
def test_what_is_not_a_duration_is_refused_with_a_reason(value, problem):
    with pytest.raises(ValueError, match=problem):
        parse_duration_ms(value)
