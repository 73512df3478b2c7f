"""The wire format of the decision channel with Kamailio (kamailio/PROTOCOL.md): netstring
framing, the `decide` and `dialog` events, and the answers. Everything that arrives here is
SIP-derived and untrusted: parsing never raises on content, it returns a clear reason."""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from controller.actions import is_trusted_header
from controller.policy import Call, Decision
from controller.policy.model import CounterProbe

MAX_FRAME_BYTES = 256 * 1024  # far above anything Kamailio sends; beyond is a broken stream
MAX_ANSWER_BYTES = 16 * 1024  # Kamailio drops answers above 16 KB (32 KB kills the connection)
MAX_HDRS_BYTES = 8192
_TX = re.compile(r"^[0-9]{1,10}:[0-9]{1,10}\Z")


class FramingError(Exception):
    """The byte stream is not netstrings any more: the connection must be reset."""


class NetstringDecoder:
    """Incremental decoder of `<len>:<payload>,` frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES):
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buffer
        buf += data
        frames = []
        start = 0
        while True:
            while start < len(buf) and buf[start] in b" \r\n\t":
                start += 1
            colon = buf.find(b":", start, start + 12)
            if colon < 0:
                if len(buf) - start >= 12:
                    raise FramingError(f"no netstring length in {bytes(buf[start:start + 12])!r}")
                break
            digits = bytes(buf[start:colon])
            if not digits.isdigit():
                raise FramingError(f"bad netstring length {digits!r}")
            size = int(digits)
            if size > self._max:
                raise FramingError(f"netstring of {size} bytes exceeds {self._max}")
            end = colon + 1 + size
            if len(buf) < end + 1:
                break
            if buf[end] != ord(","):
                raise FramingError("netstring not terminated by ','")
            frames.append(bytes(buf[colon + 1:end]))
            start = end + 1
        del buf[:start]
        return frames


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


@dataclass(frozen=True, slots=True)
class DecideRequest:
    tx: str
    call: Call
    from_uri: str
    to_uri: str
    ruri: str
    from_tag: str
    user_agent: str


class BadRequest(ValueError):
    pass


def _text(message: dict[str, Any], key: str, limit: int = 1024) -> str:
    value = message.get(key, "")
    return value[:limit] if isinstance(value, str) else ""


def _headers(raw: Any) -> dict[str, list[str]]:
    """The caller's headers; names callfabric itself sets (is_trusted_header) are never taken
    from a caller, even from an edge that did not strip them."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, list[str]] = {}
    for name, values in list(raw.items())[:64]:
        if isinstance(name, str) and isinstance(values, list) and not is_trusted_header(name):
            kept = [v[:1024] for v in values[:16] if isinstance(v, str)]
            if kept:
                out[name[:64]] = kept
    return out


def parse_decide(message: dict[str, Any]) -> DecideRequest:
    """A decide event → the Call the policy sees. Raises BadRequest when it cannot be answered."""
    tx = message.get("tx")
    if not isinstance(tx, str) or not _TX.match(tx):
        raise BadRequest("decide without a usable tx")
    call_id = _text(message, "call_id", 512)
    if not call_id:
        raise BadRequest("decide without a Call-ID")
    port = message.get("src_port")
    call = Call(
        call_id=call_id, from_user=_text(message, "from_user", 256), to_user=_text(message, "to_user", 256),
        ruri_user=_text(message, "ruri_user", 256), src_ip=_text(message, "src_ip", 64),
        src_port=port if isinstance(port, int) and not isinstance(port, bool) and 0 <= port < 65536 else 0,
        transport=_text(message, "transport", 8).lower() or "udp", headers=_headers(message.get("headers")),
        trunk=_text(message, "trunk", 64),
    )
    return DecideRequest(tx, call, _text(message, "from_uri"), _text(message, "to_uri"), _text(message, "ruri"),
                         _text(message, "from_tag", 128), _text(message, "user_agent", 256))


@dataclass(frozen=True, slots=True)
class EdgeBan:
    ip: str
    reason: str  # flood | scanner | sweep | …
    seconds: int
    detail: str
    ts_ms: int = 0  # when the edge banned (0: unknown)


_BAN_REASON = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")


def parse_ban(message: dict[str, Any]) -> EdgeBan:
    """A ban the edge made by itself → EdgeBan (BadRequest when unusable)."""
    try:
        ip = str(ipaddress.ip_address(_text(message, "ip", 64)))
    except ValueError:
        raise BadRequest("ban without a valid ip") from None
    reason = _text(message, "reason", 32)
    if not _BAN_REASON.match(reason):
        raise BadRequest(f"ban with an unusable reason {reason[:32]!r}")
    seconds = message.get("seconds")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 < seconds <= 30 * 86400:
        raise BadRequest("ban without a duration (seconds)")
    ts = message.get("ts")
    return EdgeBan(ip, reason, seconds, _text(message, "detail", 256),
                   ts if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0 else 0)


@dataclass(frozen=True, slots=True)
class AuthFailure:
    ip: str
    reason: str  # unknown-user | bad-password
    user: str
    trunk: str


_AUTH_REASONS = ("unknown-user", "bad-password")
_AUTH_NAME = re.compile(r"^[A-Za-z0-9_.!~*'()&=+,;?/%-]{0,64}\Z")


def parse_auth(message: dict[str, Any]) -> AuthFailure:
    """A failed trunk authentication at the edge → AuthFailure (BadRequest when unusable)."""
    try:
        ip = str(ipaddress.ip_address(_text(message, "ip", 64)))
    except ValueError:
        raise BadRequest("auth event without a valid ip") from None
    reason = message.get("reason")
    if reason not in _AUTH_REASONS:
        raise BadRequest(f"auth event with an unknown reason {str(reason)[:32]!r}")
    user, trunk = _text(message, "user", 64), _text(message, "trunk", 64)
    return AuthFailure(ip, reason, user if _AUTH_NAME.match(user) else "", trunk if _AUTH_NAME.match(trunk) else "")


@dataclass(frozen=True, slots=True)
class DialogEvent:
    call_id: str
    state: str  # confirmed | ended | failed
    reason: str
    code: int
    ts_ms: int
    fallback: str
    tx: str


_DIALOG_STATES = ("confirmed", "ended", "failed")
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}\Z")


def parse_dialog(message: dict[str, Any], now_ms: int) -> DialogEvent:
    state = message.get("state")
    if state not in _DIALOG_STATES:
        raise BadRequest(f"dialog event with unknown state {str(state)[:20]!r}")
    call_id = _text(message, "call_id", 512)
    if not call_id:
        raise BadRequest("dialog event without a Call-ID")
    reason = _text(message, "reason", 64)
    fallback = _text(message, "fallback", 64)
    code, ts = message.get("code"), message.get("ts")
    return DialogEvent(
        call_id=call_id, state=state, reason=reason if _TOKEN.match(reason) else "unknown",
        code=code if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < 700 else 0,
        ts_ms=ts if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0 else now_ms,
        fallback=fallback if _TOKEN.match(fallback) else "", tx=_text(message, "tx", 32),
    )


@dataclass(frozen=True, slots=True)
class FallbackEvent:
    """The edge routed a call by its fallback (FALLBACK=open: its fallback set; closed: 503)."""

    call_id: str
    reason: str
    mode: str  # open | closed | rejected (the edge's policy rejected it: route[FALLBACK])
    ts_ms: int
    tx: str
    from_tag: str


def parse_fallback(message: dict[str, Any], now_ms: int) -> FallbackEvent:
    call_id = _text(message, "call_id", 512)
    if not call_id:
        raise BadRequest("fallback event without a Call-ID")
    reason = _text(message, "reason", 64)
    if not _TOKEN.match(reason):
        raise BadRequest(f"fallback event with an unusable reason {reason[:64]!r}")
    mode = message.get("mode")
    if mode not in ("open", "closed", "rejected"):
        raise BadRequest(f"fallback event with an unknown mode {str(mode)[:16]!r}")
    ts = message.get("ts")
    return FallbackEvent(call_id, reason, mode,
                         ts if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0 else now_ms,
                         _text(message, "tx", 32), _text(message, "from_tag", 128))


@dataclass(frozen=True, slots=True)
class EdgeDecided:
    """A call the edge decided itself (controller/edge/local.py), for the controller to record."""

    call_id: str
    record: dict[str, Any]
    timeline: dict[str, Any]
    live_scopes: dict[str, str]
    counters: list[CounterProbe]


_RECORD_FIELDS = frozenset((
    "state", "outcome", "rule", "applied_rules", "target", "policy_version", "decision", "from_uri", "from_tag",
    "to_uri", "ruri",
    "caller", "callee", "dialled", "src", "transport", "tenant", "trunk", "user_agent", "tx", "created_at_ms",
    "decided_by", "end_reason", "end_code", "ended_at_ms"))
_COUNTER_KINDS = ("window", "live", "distinct")


def _short_text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def parse_decided(message: dict[str, Any]) -> EdgeDecided:
    """A `decided` event → EdgeDecided (BadRequest when unusable: nothing is recorded)."""
    call_id = _text(message, "call_id", 512)
    if not call_id:
        raise BadRequest("decided without a Call-ID")
    record, timeline = message.get("record"), message.get("timeline")
    if not isinstance(record, dict) or record.get("state") not in ("routing", "failed"):
        raise BadRequest("decided without a usable record")
    if not isinstance(timeline, dict) or timeline.get("event") != "decided":
        raise BadRequest("decided without its timeline event")
    if not all(_short_text(record.get(k), 512) for k in ("outcome", "rule", "policy_version")):
        raise BadRequest("decided record without outcome, rule or policy version")
    created = record.get("created_at_ms")
    if not isinstance(created, int) or isinstance(created, bool) or created <= 0:
        raise BadRequest("decided record without created_at_ms")
    scopes = message.get("live_scopes")
    if not isinstance(scopes, dict) or len(scopes) > 8 or not all(
            _short_text(k, 32) and _short_text(v, 512) for k, v in scopes.items()):
        raise BadRequest("decided with unusable live_scopes")
    raw = message.get("counters")
    if not isinstance(raw, list) or len(raw) > 64:
        raise BadRequest("decided with unusable counters")
    counters = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 7):
            raise BadRequest("decided with an unusable counter")
        key, kind, scope, value, window_s, count, member = item
        if not (_short_text(key, 128) and kind in _COUNTER_KINDS and _short_text(scope, 64)
                and _short_text(value, 512) and isinstance(window_s, int) and not isinstance(window_s, bool)
                and 0 <= window_s <= 31 * 86400 and (window_s > 0 or kind == "live") and isinstance(count, bool)
                and _short_text(member, 512)):
            raise BadRequest("decided with an unusable counter")
        counters.append(CounterProbe(key, kind, scope, value, window_s, count, member))
    return EdgeDecided(call_id, {k: v for k, v in record.items() if k in _RECORD_FIELDS}, timeline,
                       dict(scopes), counters)


def header_block(headers: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """CRLF lines for Kamailio, within its size limit; returns the block and names left out."""
    lines, size, dropped = [], 0, []
    for name, value in headers:
        line = f"{name}: {value}\r\n"
        length = len(line.encode("utf-8"))
        if size + length > MAX_HDRS_BYTES:
            dropped.append(name)
            continue
        lines.append(line)
        size += length
    return "".join(lines), dropped


def answer_for(tx: str, decision: Decision, internal_headers: list[tuple[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """The answer that makes Kamailio carry out `decision` (not a webhook decision)."""
    hdrs, dropped = header_block(internal_headers + list(decision.headers))
    if decision.outcome == "reject":
        return {"tx": tx, "action": "reject", "code": decision.reject_code, "reason": decision.reject_reason,
                "hdrs": hdrs}, dropped
    if decision.outcome == "agent":
        answer = {"tx": tx, "action": "dispatch", "set": decision.agent.node_set.dispatcher_set, "hdrs": hdrs}
    elif decision.outcome == "sip":
        answer = {"tx": tx, "action": "relay", "uris": list(decision.destination.uris)[:8], "hdrs": hdrs}
        if decision.destination.attempt_timeout_ms:
            answer["ring_timeout_ms"] = decision.destination.attempt_timeout_ms
    else:
        raise ValueError(f"no edge answer for outcome {decision.outcome!r}")
    if decision.max_duration_s:
        answer["max_duration_s"] = decision.max_duration_s
    if decision.anchor_media:
        answer["media"] = decision.anchor_media
    return answer, dropped


def unavailable_answer(tx: str, retry_after_s: int = 5) -> dict[str, Any]:
    """503 with Retry-After: the controller's own fail-closed answer."""
    return {"tx": tx, "action": "reject", "code": 503, "reason": "Service Unavailable",
            "hdrs": f"Retry-After: {retry_after_s}\r\n"}


def fallback_answer(tx: str, reason: str) -> dict[str, Any]:
    """Ask the edge to apply its configured fallback now (fail-open or fail-closed)."""
    return {"tx": tx, "action": "fallback", "reason": reason}


def encode(answer: dict[str, Any]) -> bytes:
    return netstring(json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
