"""The decision channel's parsers at their exact limits: every field lands where it belongs,
every size cap cuts at its documented length (not one more), every range check includes its
bounds, and every refusal says why. What reaches these parsers is SIP-derived (untrusted);
an off-by-one here is a header or a record a caller controls one byte further than allowed."""
import pytest

from controller.edge import protocol


def decide(**fields) -> dict:
    message = {"event": "decide", "tx": "1:2", "call_id": "c@x"}
    message.update(fields)
    return message


# (field of the decide event, where it lands, its cap)
TEXT_FIELDS = [
    ("call_id", lambda r: r.call.call_id, 512),
    ("from_user", lambda r: r.call.from_user, 256),
    ("to_user", lambda r: r.call.to_user, 256),
    ("ruri_user", lambda r: r.call.ruri_user, 256),
    ("src_ip", lambda r: r.call.src_ip, 64),
    ("trunk", lambda r: r.call.trunk, 64),
    ("from_uri", lambda r: r.from_uri, 1024),
    ("to_uri", lambda r: r.to_uri, 1024),
    ("ruri", lambda r: r.ruri, 1024),
    ("from_tag", lambda r: r.from_tag, 128),
    ("user_agent", lambda r: r.user_agent, 256),
]


@pytest.mark.parametrize("field, read, cap", TEXT_FIELDS, ids=[f[0] for f in TEXT_FIELDS])
def test_each_decide_field_lands_in_its_place_cut_at_its_cap(field, read, cap):
    assert read(protocol.parse_decide(decide(**{field: "a" * cap}))) == "a" * cap
    assert read(protocol.parse_decide(decide(**{field: "b" * (cap + 1)}))) == "b" * cap
    assert read(protocol.parse_decide(decide(**{field: "v-" + field}))) == "v-" + field
    if field != "call_id":
        assert read(protocol.parse_decide(decide(**{field: 7}))) == ""  # not text: empty, never a crash
        assert read(protocol.parse_decide(decide())) == ""  # missing: empty


def test_transport_is_lowercased_cut_at_8_and_defaults_to_udp():
    assert protocol.parse_decide(decide(transport="TLS")).call.transport == "tls"
    assert protocol.parse_decide(decide(transport="abcdefgh")).call.transport == "abcdefgh"
    assert protocol.parse_decide(decide(transport="abcdefghi")).call.transport == "abcdefgh"
    assert protocol.parse_decide(decide()).call.transport == "udp"
    assert protocol.parse_decide(decide(transport="")).call.transport == "udp"


@pytest.mark.parametrize("port, expected", [(0, 0), (1, 1), (65535, 65535), (65536, 0), (-1, 0), (True, 0),
                                            ("5060", 0), (5060.0, 0)])
def test_source_port_range_is_0_to_65535(port, expected):
    assert protocol.parse_decide(decide(src_port=port)).call.src_port == expected


def test_headers_keep_64_names_of_64_chars_16_values_of_1024_chars():
    raw = {f"X-{i:03d}": ["v"] for i in range(65)}
    assert len(protocol.parse_decide(decide(headers=raw)).call.headers) == 64
    name = "N" * 65
    headers = protocol.parse_decide(decide(headers={name: ["x" * 1025] + ["y"] * 16})).call.headers
    assert list(headers) == ["N" * 64]
    assert headers["N" * 64] == ["x" * 1024] + ["y"] * 15
    assert protocol.parse_decide(decide(headers={"X-A": [1, None]})).call.headers == {}  # nothing usable left
    assert protocol.parse_decide(decide(headers={"X-A": "not a list", 5: ["v"]})).call.headers == {}


@pytest.mark.parametrize("tx", ["1:2", "0:0", "1234567890:1234567890"])
def test_usable_transaction_ids(tx):
    assert protocol.parse_decide(decide(tx=tx)).tx == tx


@pytest.mark.parametrize("tx", ["12345678901:1", "1:12345678901", "1:", ":1", "a:1", "1:2 ", 12, None])
def test_unusable_transaction_ids_are_refused_with_a_reason(tx):
    with pytest.raises(protocol.BadRequest, match="usable tx"):
        protocol.parse_decide(decide(tx=tx))


def test_a_decide_without_a_call_id_is_refused_with_a_reason():
    with pytest.raises(protocol.BadRequest, match="Call-ID"):
        protocol.parse_decide(decide(call_id=""))


# ---------------------------------------------------------------------------------------------- bans
def ban(**fields) -> dict:
    message = {"event": "ban", "ip": "192.0.2.9", "reason": "flood", "seconds": 60, "detail": "d"}
    message.update(fields)
    return message


def test_a_ban_is_parsed_field_by_field():
    parsed = protocol.parse_ban(ban(ip="2001:db8:0::1", detail="x" * 257))
    assert (parsed.ip, parsed.reason, parsed.seconds, parsed.detail) == ("2001:db8::1", "flood", 60, "x" * 256)


@pytest.mark.parametrize("fields, problem", [
    ({"ip": "192.0.2.256"}, "valid ip"), ({"ip": 5}, "valid ip"), ({"ip": "1" * 65}, "valid ip"),
    ({"reason": "Flood"}, "unusable reason"), ({"reason": ""}, "unusable reason"),
    ({"seconds": 0}, "duration"), ({"seconds": 30 * 86400 + 1}, "duration"), ({"seconds": True}, "duration"),
    ({"seconds": "60"}, "duration"), ({"seconds": None}, "duration"),
])
def test_unusable_bans_are_refused_with_a_reason(fields, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_ban(ban(**fields))


@pytest.mark.parametrize("seconds", [1, 30 * 86400])
def test_ban_durations_include_their_bounds(seconds):
    assert protocol.parse_ban(ban(seconds=seconds)).seconds == seconds


def test_ban_reasons_up_to_32_characters():
    assert protocol.parse_ban(ban(reason="f" * 32)).reason == "f" * 32
    assert protocol.parse_ban(ban(reason="g" * 40)).reason == "g" * 32  # cut, like every text field
    assert protocol.parse_ban(ban(reason="scanner_2-x")).reason == "scanner_2-x"


# ---------------------------------------------------------------------------------------------- dialogs
def dialog(**fields) -> dict:
    message = {"event": "dialog", "state": "ended", "call_id": "c@x", "reason": "bye-caller", "code": 0,
               "ts": 1_700_000_000_000, "fallback": "", "tx": "1:2"}
    message.update(fields)
    return message


def test_a_dialog_event_is_parsed_field_by_field():
    parsed = protocol.parse_dialog(dialog(state="failed", code=486, reason="failed", fallback="timeout"), 5)
    assert (parsed.call_id, parsed.state, parsed.reason, parsed.code, parsed.ts_ms, parsed.fallback, parsed.tx) == (
        "c@x", "failed", "failed", 486, 1_700_000_000_000, "timeout", "1:2")
    assert protocol.parse_dialog(dialog(call_id="c" * 513), 5).call_id == "c" * 512
    assert protocol.parse_dialog(dialog(tx="9" * 40), 5).tx == "9" * 32


@pytest.mark.parametrize("code, expected", [(0, 0), (699, 699), (700, 0), (-1, 0), (True, 0), ("486", 0)])
def test_dialog_codes_range_is_0_to_699(code, expected):
    assert protocol.parse_dialog(dialog(code=code), 5).code == expected


@pytest.mark.parametrize("ts, expected", [(1, 1), (0, 5), (-3, 5), (True, 5), (None, 5), ("1", 5)])
def test_a_dialog_event_without_a_usable_time_takes_now(ts, expected):
    assert protocol.parse_dialog(dialog(ts=ts), 5).ts_ms == expected


@pytest.mark.parametrize("value, expected", [
    ("bye-callee", "bye-callee"), ("a" * 48, "a" * 48), ("a" * 49, "unknown"), ("Bye", "unknown"),
    ("-x", "unknown"), ("", "unknown"), (7, "unknown"), ("0k", "0k"),
])
def test_dialog_reasons_are_tokens_else_unknown(value, expected):
    assert protocol.parse_dialog(dialog(reason=value), 5).reason == expected


@pytest.mark.parametrize("value, expected", [("timeout", "timeout"), ("a" * 48, "a" * 48), ("a" * 49, ""),
                                             ("No-Policy", ""), ("", "")])
def test_dialog_fallbacks_are_tokens_else_empty(value, expected):
    assert protocol.parse_dialog(dialog(fallback=value), 5).fallback == expected


@pytest.mark.parametrize("fields, problem", [({"state": "exploded"}, "unknown state"), ({"state": None}, "unknown state"),
                                             ({"call_id": ""}, "Call-ID"), ({"call_id": 5}, "Call-ID")])
def test_unusable_dialog_events_are_refused_with_a_reason(fields, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_dialog(dialog(**fields), 5)


# ---------------------------------------------------------------------------------------------- decided
def decided(**changes) -> dict:
    message = {"event": "decided", "call_id": "c@x", "tx": "1:2",
               "record": {"state": "routing", "outcome": "agent", "rule": "r", "policy_version": "v",
                          "created_at_ms": 1_700_000_000_000, "src": "192.0.2.1:5060", "secret": "dropped"},
               "timeline": {"event": "decided", "ts": 1}, "live_scopes": {"tenant": "acme"},
               "counters": [["window:source:60", "window", "source", "192.0.2.1", 60, True, ""]]}
    message.update(changes)
    return message


def test_a_decided_event_keeps_only_record_fields_and_its_counters():
    parsed = protocol.parse_decided(decided())
    assert parsed.call_id == "c@x" and parsed.live_scopes == {"tenant": "acme"}
    assert "secret" not in parsed.record and parsed.record["src"] == "192.0.2.1:5060"
    (counter,) = parsed.counters
    assert (counter.key, counter.kind, counter.scope, counter.value, counter.window_s, counter.count,
            counter.member) == ("window:source:60", "window", "source", "192.0.2.1", 60, True, "")


def counter(**changes) -> list:
    fields = {"key": "window:source:60", "kind": "window", "scope": "source", "value": "192.0.2.1",
              "window_s": 60, "count": True, "member": ""}
    fields.update(changes)
    return list(fields.values())


@pytest.mark.parametrize("item", [
    counter(key="k" * 128), counter(scope="s" * 64), counter(value="v" * 512), counter(member="m" * 512),
    counter(window_s=31 * 86400), counter(kind="live", window_s=0), counter(kind="distinct"), counter(count=False),
])
def test_decided_counters_at_their_limits_are_taken(item):
    assert len(protocol.parse_decided(decided(counters=[item])).counters) == 1


@pytest.mark.parametrize("item", [
    counter(key="k" * 129), counter(scope="s" * 65), counter(value="v" * 513), counter(member="m" * 513),
    counter(window_s=31 * 86400 + 1), counter(window_s=0), counter(window_s=-1), counter(window_s=True),
    counter(kind="hourly"), counter(count=1), counter(key=5), counter()[:6], counter() + [1], "not a list",
])
def test_decided_counters_past_their_limits_are_refused(item):
    with pytest.raises(protocol.BadRequest, match="counter"):
        protocol.parse_decided(decided(counters=[item]))


def test_decided_takes_up_to_64_counters_and_8_short_scopes():
    assert len(protocol.parse_decided(decided(counters=[counter()] * 64)).counters) == 64
    with pytest.raises(protocol.BadRequest, match="counters"):
        protocol.parse_decided(decided(counters=[counter()] * 65))
    scopes = {f"s{i}": "v" for i in range(8)}
    assert protocol.parse_decided(decided(live_scopes=scopes)).live_scopes == scopes
    assert protocol.parse_decided(decided(live_scopes={"k" * 32: "v" * 512})).live_scopes == {"k" * 32: "v" * 512}
    for bad in ({f"s{i}": "v" for i in range(9)}, {"k" * 33: "v"}, {"k": "v" * 513}, {"k": 5}, ["k"]):
        with pytest.raises(protocol.BadRequest, match="live_scopes"):
            protocol.parse_decided(decided(live_scopes=bad))


@pytest.mark.parametrize("changes, problem", [
    ({"call_id": ""}, "Call-ID"),
    ({"record": {"state": "ended"}}, "usable record"),
    ({"record": "x"}, "usable record"),
    ({"timeline": {"event": "answered"}}, "timeline"),
    ({"timeline": None}, "timeline"),
])
def test_unusable_decided_events_are_refused_with_a_reason(changes, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_decided(decided(**changes))


@pytest.mark.parametrize("field, value, ok", [
    ("outcome", "o" * 512, True), ("outcome", "o" * 513, False), ("rule", 5, False), ("policy_version", None, False),
    ("created_at_ms", 1, True), ("created_at_ms", 0, False), ("created_at_ms", True, False), ("created_at_ms", "1", False),
    ("state", "failed", True),
])
def test_decided_records_need_outcome_rule_version_and_a_creation_time(field, value, ok):
    record = {**decided()["record"], field: value}
    if ok:
        assert protocol.parse_decided(decided(record=record)).record[field] == value
    else:
        with pytest.raises(protocol.BadRequest, match="decided record"):
            protocol.parse_decided(decided(record=record))


# ---------------------------------------------------------------------------------------------- framing
def test_whitespace_between_frames_is_skipped_and_nothing_else():
    decoder = protocol.NetstringDecoder()
    assert decoder.feed(b" \r\n\t1:a,") == [b"a"]
    with pytest.raises(protocol.FramingError):
        protocol.NetstringDecoder().feed(b"X1:a,")


def test_a_length_of_up_to_11_digits_is_awaited_then_refused():
    decoder = protocol.NetstringDecoder(max_frame=10**12)
    assert decoder.feed(b"12345678901") == []  # 11 digits, the colon may still come
    with pytest.raises(protocol.FramingError, match="no netstring length"):
        protocol.NetstringDecoder().feed(b"123456789012")  # 12 bytes and no colon: not a netstring
    assert protocol.NetstringDecoder().feed(b"5:hello,") == [b"hello"]


def test_a_frame_of_exactly_the_maximum_is_taken_one_more_is_refused():
    assert protocol.NetstringDecoder(max_frame=4).feed(b"4:abcd,") == [b"abcd"]
    with pytest.raises(protocol.FramingError, match="exceeds 4"):
        protocol.NetstringDecoder(max_frame=4).feed(b"5:abcde,")


@pytest.mark.parametrize("data, problem", [(b":a,", "bad netstring length"), (b"1:ab", "not terminated"),
                                           (b"x" * 12, "no netstring length")])
def test_framing_errors_say_what_is_wrong(data, problem):
    with pytest.raises(protocol.FramingError, match=problem):
        protocol.NetstringDecoder().feed(data)


# ---------------------------------------------------------------------------------------------- answers
def test_the_unavailable_answer_is_a_503_with_retry_after():
    assert protocol.unavailable_answer("1:2") == {"tx": "1:2", "action": "reject", "code": 503,
                                                  "reason": "Service Unavailable", "hdrs": "Retry-After: 5\r\n"}
    assert protocol.unavailable_answer("1:2", 30)["hdrs"] == "Retry-After: 30\r\n"


def test_encode_is_a_compact_utf8_netstring():
    assert protocol.encode({"tx": "1:2", "reason": "é"}) == b'26:{"tx":"1:2","reason":"\xc3\xa9"},'


# ---------------------------------------------------------------------------------------------- trunk auth
def test_a_failed_trunk_authentication_is_parsed_field_by_field():
    parsed = protocol.parse_auth({"ip": "192.0.2.7", "reason": "bad-password", "user": "u" * 64, "trunk": "carrier-1"})
    assert (parsed.ip, parsed.reason, parsed.user, parsed.trunk) == ("192.0.2.7", "bad-password", "u" * 64, "carrier-1")
    assert protocol.parse_auth({"ip": "::1", "reason": "unknown-user", "user": "u" * 65}).user == "u" * 64
    odd = protocol.parse_auth({"ip": "192.0.2.7", "reason": "unknown-user", "user": "a b<script>", "trunk": 5})
    assert (odd.user, odd.trunk) == ("", "")  # not a SIP user token: dropped, never logged as given


@pytest.mark.parametrize("message, problem", [
    ({"ip": "nope", "reason": "bad-password"}, "valid ip"), ({"ip": "192.0.2.7", "reason": "other"}, "unknown reason"),
    ({"ip": "192.0.2.7"}, "unknown reason"),
])
def test_unusable_trunk_authentication_events_are_refused_with_a_reason(message, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_auth(message)


@pytest.mark.parametrize("ts, expected", [(1, 1), (1_700_000_000_000, 1_700_000_000_000), (0, 0), (-1, 0),
                                          (True, 0), ("5", 0), (None, 0)])
def test_a_ban_keeps_when_the_edge_made_it_or_0_for_unknown(ts, expected):
    assert protocol.parse_ban(ban(ts=ts)).ts_ms == expected


def test_trunk_names_of_failed_authentications_are_cut_at_64_and_must_be_tokens():
    parsed = protocol.parse_auth({"ip": "192.0.2.7", "reason": "bad-password", "trunk": "t" * 65})
    assert parsed.trunk == "t" * 64
    assert protocol.parse_auth({"ip": "192.0.2.7", "reason": "bad-password", "trunk": "a b"}).trunk == ""


def test_decided_call_ids_are_cut_at_512_and_counters_keep_their_member():
    assert protocol.parse_decided(decided(call_id="c" * 513)).call_id == "c" * 512
    (kept,) = protocol.parse_decided(decided(counters=[counter(kind="distinct", member="+15550001")])).counters
    assert kept.member == "+15550001"
    (one_second,) = protocol.parse_decided(decided(counters=[counter(window_s=1)])).counters
    assert one_second.window_s == 1


# ---------------------------------------------------------------------------------------------- fallbacks
def fallback(**fields) -> dict:
    message = {"event": "fallback", "call_id": "c@x", "reason": "timeout", "mode": "open", "ts": 7, "tx": "1:2",
               "from_tag": "ft"}
    message.update(fields)
    return message


def test_a_fallback_event_is_parsed_field_by_field():
    parsed = protocol.parse_fallback(fallback(), 5)
    assert (parsed.call_id, parsed.reason, parsed.mode, parsed.ts_ms, parsed.tx, parsed.from_tag) == (
        "c@x", "timeout", "open", 7, "1:2", "ft")
    long = protocol.parse_fallback(fallback(call_id="c" * 513, tx="9" * 33, from_tag="f" * 129, reason="r" * 48), 5)
    assert (long.call_id, long.tx, long.from_tag, long.reason) == ("c" * 512, "9" * 32, "f" * 128, "r" * 48)
    for mode in ("open", "closed", "rejected"):
        assert protocol.parse_fallback(fallback(mode=mode), 5).mode == mode


@pytest.mark.parametrize("ts, expected", [(1, 1), (0, 5), (-1, 5), (True, 5), ("7", 5), (None, 5)])
def test_a_fallback_without_a_usable_time_takes_now(ts, expected):
    assert protocol.parse_fallback(fallback(ts=ts), 5).ts_ms == expected


@pytest.mark.parametrize("fields, problem", [
    ({"call_id": ""}, "Call-ID"), ({"call_id": 3}, "Call-ID"),
    ({"reason": "Timeout"}, "unusable reason"), ({"reason": ""}, "unusable reason"), ({"reason": "r" * 49}, "unusable"),
    ({"mode": "half-open"}, "unknown mode"), ({"mode": None}, "unknown mode"),
])
def test_unusable_fallback_events_are_refused_with_a_reason(fields, problem):
    with pytest.raises(protocol.BadRequest, match=problem):
        protocol.parse_fallback(fallback(**fields), 5)
