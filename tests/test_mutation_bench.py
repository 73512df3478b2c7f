"""bench/mutation.py excuses some surviving mutants by reading their change: these checks keep
those reasons narrow (a change that alters what reaches Redis or the wire gets no reason)."""
from __future__ import annotations

import pytest

from bench.mutation import codec_case_only, reason_for, redis_case_only, text_only


@pytest.mark.parametrize("old, new", [
    ('commands.append(("ZCARD", LIVE_INDEX))', 'commands.append(("zcard", LIVE_INDEX))'),
    ('("ZRANGEBYSCORE", BANS_INDEX, now_ms, "+inf", "LIMIT", 0, limit)])',
     '("ZRANGEBYSCORE", BANS_INDEX, now_ms, "+INF", "LIMIT", 0, limit)])'),
    ('_, ips = await self.batch.run([("ZREMRANGEBYSCORE", BANS_INDEX, "-inf", now_ms),',  # goes on below
     '_, ips = await self.batch.run([("zremrangebyscore", BANS_INDEX, "-inf", now_ms),'),
], ids=["command", "keyword", "command-of-a-call-on-several-lines"])
def test_a_redis_command_or_keyword_in_other_letters_is_equivalent(old, new):
    assert redis_case_only(old, new)


@pytest.mark.parametrize("old, new", [
    ('states = await self.batch.run([("HGET", call_key(c), "state") for c in candidates])',
     'states = await self.batch.run([("HGET", call_key(c), "STATE") for c in candidates])'),  # another field
    ('claimed, previous = await self.batch.run([("SET", redis_key, "pending", "NX", "EX", ttl_s),',
     'claimed, previous = await self.batch.run([("SET", redis_key, "PENDING", "NX", "EX", ttl_s),'),  # a value
    ('commands.append(("ZCARD", LIVE_INDEX))', 'commands.append(("XXZCARDXX", LIVE_INDEX))'),
    ('commands.append(("ZCARD", LIVE_INDEX))', 'commands.append(("zcard", RECENT_INDEX))'),  # code changed too
    # the pipeline sends a script's source or its sha by this name, and routes PUBLISH to any node
    ('("EVALSHA", _CREATE, [call_key(call_id), timeline_key(call_id)],',
     '("evalsha", _CREATE, [call_key(call_id), timeline_key(call_id)],'),
    ('("PUBLISH", EVENTS_CHANNEL, fields[-1])], urgent=False)', '("publish", EVENTS_CHANNEL, fields[-1])], urgent=False)'),
], ids=["field", "value", "command-renamed", "key-changed-too", "script", "publish"])
def test_a_redis_key_field_or_value_in_other_letters_is_not(old, new):
    assert not redis_case_only(old, new)


def test_only_a_codec_names_case_is_equivalent_not_an_error_handlers():
    assert codec_case_only('return value.decode("utf-8", "replace")', 'return value.decode("UTF-8", "replace")')
    assert not codec_case_only('return value.decode("utf-8", "replace")', 'return value.decode("utf-8", "REPLACE")')
    assert not codec_case_only('return value.decode("utf-8", "replace")', 'return value.decode("XXutf-8XX", "replace")')


def test_a_message_is_what_a_line_returns_or_raises_not_data_on_the_wire():
    assert text_only('return "header value must be a string"', 'return "XXheader value must be a stringXX"')
    assert text_only('raise ValueError(f"bad duration {text!r}: use 300ms")',
                     'raise ValueError(f"XXbad duration {text!r}: use 300msXX")')
    assert text_only('return f"{live} live calls for {who}, more than {d.max}" if live > d.max else None',
                     'return f"XX{live} live calls for {who}, more than {d.max}XX" if live > d.max else None')
    # the reason phrase of a SIP answer is data, even in a return line
    assert not text_only('return {"tx": tx, "action": "reject", "code": 503, "reason": "Service Unavailable",',
                         'return {"tx": tx, "action": "reject", "code": 503, "reason": "XXService UnavailableXX",')
    assert not text_only('return "event", name, "ts", ts', 'return "EVENT", name, "ts", ts')  # fields, no prose
    assert not text_only('raise EdgeError(b"bad frame here")', 'raise EdgeError(b"XXbad frame hereXX")')
    assert not text_only('return "header value must be a string"', 'return None')
    assert not text_only('return "all calls" if scope == "global" else x', 'return "all calls" if scope != "global" else x')


def test_a_survivor_without_a_reason_says_so():
    assert reason_for("controller.policy.risk.x__compact__mutmut_3", "return text if len(text) <= limit else t",
                      "return text if len(text) < limit else t") == ("", "")
    kind, why = reason_for("controller.state.calls.xǁCallStoreǁcount__mutmut_1", 'x = ("ZCARD", k)', 'x = ("zcard", k)')
    assert kind == "equivalent" and "case-insensitively" in why


CALLS = "controller.state.calls.xǁCallStoreǁ"


@pytest.mark.parametrize("name, old, new, excused", [
    (CALLS + "_transition__mutmut_40", "replies = await self.batch.run(commands, urgent=False)",
     "replies = await self.batch.run(commands, urgent=None)", True),
    (CALLS + "_transition__mutmut_43", "replies = await self.batch.run(commands, urgent=False)",
     "replies = await self.batch.run(commands, urgent=True)", False),  # a dialog event no longer waits for company
    (CALLS + "_send_create__mutmut_19", 'created = fields.pop("created_at_ms", str(at_ms))',
     'created = fields.pop("XXcreated_at_msXX", str(at_ms))', True),
    (CALLS + "_send_create__mutmut_21", 'created = fields.pop("created_at_ms", str(at_ms))',
     'created = fields.pop("created_at_ms", str(None))', False),  # a record without its time gets "None"
    (CALLS + "send_create__mutmut_10", "return self._hold_create(call_id, *args, failed=not self.outage.available)",
     "return self._hold_create(call_id, *args, failed=None)", True),
    (CALLS + "send_create__mutmut_14", "return self._hold_create(call_id, *args, failed=not self.outage.available)",
     "return self._hold_create(call_id, *args, failed=self.outage.available)", False),  # marks a reachable Redis down
    (CALLS + "_after_create__mutmut_17", "self._live_scopes.pop(call_id, None)", "self._live_scopes.pop(None, None)",
     False),  # the store's memory would grow with every call
    (CALLS + "transition__mutmut_4", 'return await self._write("transition", call_id, self._transition, call_id,',
     'return await self._write("transition", None, self._transition, call_id,', False),  # per-call order lost
    ("controller.state.calls.x__text__mutmut_6", 'return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)',
     'return value.decode("utf-8", ) if isinstance(value, bytes) else str(value)', False),  # garbage bytes would raise
], ids=["urgent-none", "urgent-true", "created-key", "created-none", "failed-none", "failed-inverted", "scopes-leak",
        "order", "strict-decode"])
def test_the_call_stores_judged_reasons_excuse_only_their_own_change(name, old, new, excused):
    assert bool(reason_for(name, old, new)[0]) is excused


def test_judged_reasons_hold_for_their_change_only():
    dialog = "controller.edge.protocol.x_parse_dialog__mutmut_33"
    cut = 'reason = _text(message, "reason", 64)'
    assert reason_for(dialog, cut, 'reason = _text(message, "reason", 65)')[0] == "equivalent"
    assert reason_for(dialog, cut, 'reason = _text(message, "reason", 47)') == ("", "")  # below a token's 48
    assert reason_for(dialog, cut, 'reason = _text(message, "fallback", 65)') == ("", "")  # another field
    bucket = "controller.policy.conditions.x_split_bucket__mutmut_19"
    big = 'return int.from_bytes(digest, "big") % 10000'
    assert reason_for(bucket, big, "return int.from_bytes(digest, ) % 10000")[0] == "equivalent"
    assert reason_for(bucket, big, 'return int.from_bytes(digest, "little") % 10000') == ("", "")
    sanitize = "controller.actions.x_sanitize_header_value__mutmut_11"
    cap = "if len(encoded) > MAX_HEADER_BYTES:"
    assert reason_for(sanitize, cap, "if len(encoded) >= MAX_HEADER_BYTES:")[0] == "equivalent"
    assert reason_for(sanitize, cap, "if len(encoded) > MAX_HEADER_BYTES + 1:") == ("", "")
