"""The decision channel's wire format: framing, parsing untrusted events, answers."""
import json

import pytest

from controller.edge import protocol
from tests.policy.helpers import call, policy_with


def test_netstring_decoder_handles_partial_and_many_frames():
    decoder = protocol.NetstringDecoder()
    data = protocol.netstring(b'{"a":1}') + protocol.netstring(b"") + protocol.netstring("é".encode())
    frames = []
    for i in range(len(data)):  # byte by byte
        frames += decoder.feed(data[i:i + 1])
    assert frames == [b'{"a":1}', b"", "é".encode()]
    assert decoder.feed(b"\r\n 3:abc,") == [b"abc"]


@pytest.mark.parametrize("data", [b"abc:xyz,", b"3:abcX", b"999999999:", b"-1:a,", b"12345678901234567"])
def test_netstring_decoder_rejects_broken_streams(data):
    with pytest.raises(protocol.FramingError):
        protocol.NetstringDecoder(max_frame=1024).feed(data)


DECIDE = {"event": "decide", "tx": "12:345", "call_id": "abc@host", "from_user": "+15551230000",
          "to_user": "18005550200", "ruri_user": "18005550200", "src_ip": "127.0.0.1", "src_port": 5060,
          "transport": "UDP", "headers": {"X-Lang": ["fr"], "Subject": ["hi"]}, "user_agent": "SIPp"}


def test_parse_decide():
    request = protocol.parse_decide(DECIDE)
    assert request.tx == "12:345" and request.user_agent == "SIPp"
    c = request.call
    assert (c.call_id, c.from_user, c.ruri_user, c.src_port, c.transport) == ("abc@host", "+15551230000", "18005550200", 5060, "udp")
    assert c.headers == {"X-Lang": ["fr"], "Subject": ["hi"]}


@pytest.mark.parametrize("change, problem", [
    ({"tx": None}, "tx"), ({"tx": "12"}, "tx"), ({"tx": "a:b"}, "tx"), ({"tx": 5}, "tx"),
    ({"call_id": ""}, "Call-ID"), ({"call_id": None}, "Call-ID"),
])
def test_unanswerable_decides(change, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_decide({**DECIDE, **change})


def test_garbage_fields_become_harmless_defaults():
    request = protocol.parse_decide({**DECIDE, "from_user": 5, "src_port": "5060", "transport": ["x"],
                                     "headers": {"X-A": "not-a-list", "X-B": [1, None, "ok"], 7: ["x"]},
                                     "to_user": "9" * 10_000})
    c = request.call
    assert c.from_user == "" and c.src_port == 0 and c.transport == "udp"
    assert c.headers == {"X-B": ["ok"]} and len(c.to_user) == 256


def test_parse_dialog():
    event = protocol.parse_dialog({"event": "dialog", "state": "failed", "call_id": "a", "code": 487,
                                   "reason": "cancel", "ts": 17, "fallback": "", "tx": "1:2"}, now_ms=99)
    assert (event.state, event.reason, event.code, event.ts_ms, event.fallback) == ("failed", "cancel", 487, 17, "")
    odd = protocol.parse_dialog({"state": "ended", "call_id": "a", "code": "x", "reason": "BYE!\r\n",
                                 "ts": -5, "fallback": "time out"}, now_ms=99)
    assert (odd.reason, odd.code, odd.ts_ms, odd.fallback) == ("unknown", 0, 99, "")
    with pytest.raises(protocol.BadRequest):
        protocol.parse_dialog({"state": "exploded", "call_id": "a"}, now_ms=1)


POLICY = """\
rules:
  - {name: a, match: {caller: '+441'}, actions: [route_agent: billing, add_headers: {X-A: "1"}, max_duration: 90]}
  - {name: s, match: {caller: '+442'}, actions: [route_sip: pbx]}
  - {name: r, match: {caller: '+443'}, actions: [reject: {code: 486, reason: Busy Here}, add_headers: {X-Why: busy}]}
"""


def test_answers_for_each_outcome():
    policy = policy_with(POLICY)
    agent, _ = protocol.answer_for("1:2", policy.decide(call(from_user="+441")), [("X-Callfabric-Agent", "billing")])
    assert agent == {"tx": "1:2", "action": "dispatch", "set": 1, "max_duration_s": 90,
                     "hdrs": "X-Callfabric-Agent: billing\r\nX-A: 1\r\n"}
    sip, _ = protocol.answer_for("1:2", policy.decide(call(from_user="+442")), [])
    assert sip == {"tx": "1:2", "action": "relay", "uris": ["sip:desk@pbx.example.com", "sip:desk@pbx2.example.com:5062"],
                   "ring_timeout_ms": 2000, "hdrs": ""}
    reject, _ = protocol.answer_for("1:2", policy.decide(call(from_user="+443")), [])
    assert reject == {"tx": "1:2", "action": "reject", "code": 486, "reason": "Busy Here", "hdrs": "X-Why: busy\r\n"}
    assert json.loads(protocol.encode(reject).split(b":", 1)[1][:-1]) == reject


def test_header_block_stays_within_the_edge_limit():
    headers = [(f"X-H{i}", "v" * 1000) for i in range(12)]
    block, dropped = protocol.header_block(headers)
    assert len(block.encode()) <= protocol.MAX_HDRS_BYTES and dropped == ["X-H8", "X-H9", "X-H10", "X-H11"]
