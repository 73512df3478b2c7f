"""The decision channel's remaining exact edges: the bound on a netstring's length prefix, the
8 KB header block filled to the byte, the 8 relay URIs Kamailio takes, untrusted values echoed
in refusals only up to their cut, addresses read only up to 64 characters, and tokens that may
not end in a newline (a regex `$` accepts one before the end of the text)."""
from __future__ import annotations

import re

import pytest

from controller.edge import protocol
from tests.policy.helpers import call, policy_with


def test_a_length_prefix_of_12_digits_is_refused_even_when_its_colon_follows():
    with pytest.raises(protocol.FramingError, match=re.escape(f"no netstring length in {b'000000000005'!r}")):
        protocol.NetstringDecoder().feed(b" \r\n000000000005:hello,")
    assert protocol.NetstringDecoder().feed(b" \r\n00000000005:hello,") == [b"hello"]  # 11 digits


def test_the_header_block_takes_8192_bytes_exactly():
    fits = [("X-Big", "v" * (8192 - len("X-Big: \r\n")))]
    block, dropped = protocol.header_block(fits)
    assert (len(block.encode()), dropped) == (8192, [])
    block, dropped = protocol.header_block([("X-Big", fits[0][1] + "v"), ("X-Small", "s")])
    assert (block, dropped) == ("X-Small: s\r\n", ["X-Big"])


RELAY = """\
    destinations:
      many: {uri: "sip:a@h0.example.com", failover: [%s]}
    rules:
      - {name: r, actions: [route_sip: many]}
    """ % ", ".join(f'"sip:a@h{i}.example.com"' for i in range(1, 9))


def test_a_relay_answer_carries_the_first_8_uris():
    decision = policy_with(RELAY).decide(call())
    assert len(decision.destination.uris) == 9
    answer, _ = protocol.answer_for("1:2", decision, [])
    assert answer["uris"] == [f"sip:a@h{i}.example.com" for i in range(8)]


def test_a_decision_the_edge_cannot_carry_out_is_an_error_naming_its_outcome():
    decision = policy_with("rules:\n  - {name: h, actions: [ask_webhook: {url: 'http://h', fallback: [reject: 503]}]}\n"
                           ).decide(call())
    with pytest.raises(ValueError, match="^no edge answer for outcome 'webhook'$"):
        protocol.answer_for("1:2", decision, [])


@pytest.mark.parametrize("parse, message, shown", [
    (protocol.parse_auth, {"ip": "192.0.2.1", "reason": "r" * 40}, "auth event with an unknown reason " + repr("r" * 32)),
    (lambda m: protocol.parse_dialog(m, 1), {"state": "s" * 40, "call_id": "c"},
     "dialog event with unknown state " + repr("s" * 20)),
    (lambda m: protocol.parse_fallback(m, 1), {"call_id": "c", "reason": "timeout", "mode": "m" * 40},
     "fallback event with an unknown mode " + repr("m" * 16)),
], ids=["auth-reason", "dialog-state", "fallback-mode"])
def test_a_refusal_shows_the_unusable_value_only_up_to_its_cut(parse, message, shown):
    with pytest.raises(protocol.BadRequest, match=f"^{re.escape(shown)}$"):
        parse(message)


@pytest.mark.parametrize("parse", [protocol.parse_auth, protocol.parse_ban], ids=["auth", "ban"])
def test_an_ip_is_read_up_to_64_characters_only(parse):
    message = {"reason": "bad-password" if parse is protocol.parse_auth else "flood", "seconds": 60}
    scoped = "fe80::1%" + "z" * 57  # 65 characters: a valid address whole, and cut at 64
    assert parse({**message, "ip": scoped}).ip == scoped[:64]
    # valid only as long as its 65th character is left out
    assert parse({**message, "ip": scoped[:64] + "%"}).ip == scoped[:64]


def test_tokens_and_names_may_not_end_in_a_newline():
    with pytest.raises(protocol.BadRequest, match="usable tx"):
        protocol.parse_decide({"tx": "1:2\n", "call_id": "c"})
    with pytest.raises(protocol.BadRequest, match="unusable reason"):
        protocol.parse_ban({"ip": "192.0.2.1", "reason": "flood\n", "seconds": 60})
    with pytest.raises(protocol.BadRequest, match="unusable reason"):
        protocol.parse_fallback({"call_id": "c", "reason": "timeout\n", "mode": "open"}, 1)
    dialog = protocol.parse_dialog({"state": "ended", "call_id": "c", "reason": "bye\n", "fallback": "open\n"}, 1)
    assert (dialog.reason, dialog.fallback) == ("unknown", "")
    auth = protocol.parse_auth({"ip": "192.0.2.1", "reason": "bad-password", "user": "alice\n", "trunk": "t\n"})
    assert (auth.user, auth.trunk) == ("", "")
