"""Call actions as data: one schema for policy YAML, webhook answers and the REST API.

An action is a mapping with exactly one key, the verb (like `route_agent: billing`).
Terminal verbs decide where the call goes; the others add to the decision. Everything that
can reach a SIP message (header names and values, reject reasons) is checked here, once,
so no caller-controlled byte can break a SIP message the edge builds.
"""
from __future__ import annotations

import re
from typing import Any

TERMINAL_VERBS = ("route_agent", "route_sip", "reject", "ask_webhook")
MODIFIER_VERBS = ("add_headers", "fork", "max_duration", "anchor_media", "continue", "record", "gather")
ANCHOR_MODES = ("always", "nat-only", "never")
# Modifiers carried out by the media plane once the call is connected to its agent.
ON_ANSWER_VERBS = ("record", "gather")
SETUP_VERBS = TERMINAL_VERBS + MODIFIER_VERBS
# On a live call the same documents act on the call: route_agent transfers to an agent,
# route_sip hands the call to a SIP destination, fork starts a fork; and a few verbs exist
# only mid-call.
LIVE_VERBS = ("route_agent", "route_sip", "fork", "stop_fork", "add_human", "play", "hangup", "set_metadata",
              "send_dtmf", "gather", "record", "stop_record", "transfer")
CONTEXT_KEYS = ("summary", "intent", "sentiment")

FORK_DIRECTIONS = ("in", "out", "both")
RECORDING_CHANNELS = ("both", "caller", "agent")
MEDIA_TRANSPORTS = ("rtp", "audiosocket", "websocket")
CODECS = ("ulaw", "alaw", "slin", "slin16", "g722", "opus")

MAX_HEADER_BYTES = 1024
MAX_HEADERS = 32
RESERVED_HEADER_PREFIX = "x-callfabric-"
# Header names callfabric sets and its parts trust: its internal namespace (X-Callfabric-*:
# agent, rule, policy, fallback, call id) and the context handed to a human (X-Summary … and
# the X-…-Ref form of a long value). A caller never gets to send them: the edge strips them
# from every caller's request and every reply it relays (kamailio.cfg TRUSTED_HDR_RE, which
# must be trusted_header_regex(): tests/edge/test_trusted_headers.py), and the controller
# drops them from the headers the edge reports.
TRUSTED_HEADER_NAMES = tuple(f"x-{key}{suffix}" for key in CONTEXT_KEYS for suffix in ("", "-ref"))

# Informational standard headers a policy may set besides X- ones.
STANDARD_SETTABLE_HEADERS = {
    "subject", "priority", "organization", "alert-info", "call-info",
    "user-to-user", "diversion", "p-asserted-identity",
}
# Headers that belong to the SIP stack: routing, dialog identity, auth, body framing.
FORBIDDEN_HEADERS = {
    "via", "v", "route", "record-route", "contact", "m", "from", "f", "to", "t",
    "call-id", "i", "cseq", "max-forwards", "authorization", "proxy-authorization",
    "www-authenticate", "proxy-authenticate", "authentication-info", "expires",
    "require", "proxy-require", "supported", "k", "allow", "unsupported", "path",
    "service-route", "rack", "rseq", "event", "o", "refer-to", "r", "referred-by", "b",
    "replaces", "session-expires", "x", "min-se", "security-client", "security-server",
    "security-verify", "l", "c", "e",
}
_TOKEN = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+\Z")  # \Z: $ would let a final newline through
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

DURATION_PATTERN = r"^[1-9][0-9]*(ms|s|m|h)?$"
# What Asterisk's res_stasis_playback can play (a comma would split ARI's media list): a
# sound by relative name (no absolute path, no ".." segment), a stored recording by name (one
# segment: its existence is asked as /recordings/stored/NAME before it is played); a tone of
# indications.conf by name or a tone string ast_tone_zone_part_parse() reads ("|" between its
# parts), optionally in a zone; digits ast_say_digit_str() says; a number ast_say_number()
# says (English: below a billion); characters; an http(s) URL (Asterisk's media cache). Only a
# name Asterisk does not have is left for its PlaybackFinished `failed` to tell.
_NAME_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}"
_SOUND_NAME = rf"{_NAME_SEGMENT}(/{_NAME_SEGMENT}){{0,7}}"
_TONE_PART = r"!?([0-9]{1,5}([+*][0-9]{1,5})?|M[0-9]{1,3}([+*]M[0-9]{1,3})?)(/[0-9]{1,6})?"
PLAY_MEDIA_PATTERN = (rf"^(sound:{_SOUND_NAME}|recording:{_NAME_SEGMENT}"
                      rf"|tone:([a-z][a-z0-9_-]{{0,31}}|{_TONE_PART}(\|{_TONE_PART}){{0,31}})(;tonezone=[a-z][a-z0-9_-]{{0,31}})?"
                      r"|digits:[0-9*#-]{1,64}|number:-?[0-9]{1,9}|characters:[^\s,]{1,200}"
                      r"|(sound:)?https?://[^\s,]{1,2000})$")
FORK_ID_PATTERN = r"^f[0-9]{1,6}$"
RECORDING_ID_PATTERN = r"^r[0-9]{1,6}$"
TRANSFER_TARGET_PATTERN = r"^(sips?:[^\s<>\"',?]{3,250}|\+?[0-9]{2,31})$"
LEG_PATTERN = r"^(caller|h[0-9]{1,6})$"  # the caller, or a human leg (its leg_id)
SEND_DIGITS_PATTERN = r"^[0-9A-Da-d*#wW]{1,64}$"
DIGITS_PATTERN = r"^[0-9A-D*#]{0,64}$"
WEBHOOK_URL_PATTERN = r"^https?://[^\s]+$"
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}


def parse_duration_ms(value: int | str) -> int:
    """`90`, `90s`, `15m`, `2h`, `250ms` → milliseconds (a bare number means seconds)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"duration must be positive, got {value}")
        return value * 1000
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (examples: 90, 90s, 15m, 2h, 250ms)")
    unit = match.group(1)
    return int(value[: len(value) - len(unit or "")]) * _DURATION_UNITS_MS[unit]


def header_name_problem(name: str) -> str | None:
    """Why `name` may not be set by a policy/webhook/API, or None when it may."""
    if not isinstance(name, str) or not name:
        return "header name must be a non-empty string"
    if len(name) > 64:
        return f"header name {name[:20]!r}… is longer than 64 characters"
    if not _TOKEN.match(name):
        return f"header name {name!r} is not a SIP token (letters, digits and -.!%*_+`'~ only)"
    lower = name.lower()
    if lower.startswith(RESERVED_HEADER_PREFIX):
        return f"header {name!r} uses the reserved X-Callfabric- prefix (set by callfabric itself)"
    if lower in FORBIDDEN_HEADERS or lower.startswith("content-"):
        return f"header {name!r} cannot be set: routing, dialog, auth and Content-* headers belong to the SIP stack"
    if not lower.startswith("x-") and lower not in STANDARD_SETTABLE_HEADERS:
        allowed = ", ".join(sorted(STANDARD_SETTABLE_HEADERS))
        return f"custom header {name!r} must start with 'X-' (standard headers allowed: {allowed})"
    return None


def is_trusted_header(name: str) -> bool:
    """A header name callfabric sets or trusts (any case): never taken from a caller."""
    lower = name.strip().lower()
    return lower.startswith(RESERVED_HEADER_PREFIX) or lower in TRUSTED_HEADER_NAMES


def trusted_header_regex() -> str:
    """The trusted names as the POSIX extended regex kamailio.cfg matches header names with."""
    return f"^({RESERVED_HEADER_PREFIX}.*|{'|'.join(TRUSTED_HEADER_NAMES)})$"


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot go into a SIP header, or None when it can."""
    if not isinstance(value, str):
        return "header value must be a string"
    if _BAD_VALUE_CHARS.search(value):
        return "header value contains a control character (CR, LF, NUL …)"
    if len(value.encode("utf-8")) > MAX_HEADER_BYTES:
        return f"header value is longer than {MAX_HEADER_BYTES} bytes"
    return None


def sanitize_header_value(value: str) -> str:
    """Make SIP-derived text safe for a header: control characters become spaces, size capped."""
    value = _BAD_VALUE_CHARS.sub(" ", value)
    encoded = value.encode("utf-8")
    if len(encoded) > MAX_HEADER_BYTES:
        value = encoded[:MAX_HEADER_BYTES].decode("utf-8", "ignore")
    return value


def reason_problem(reason: str) -> str | None:
    if _BAD_VALUE_CHARS.search(reason):
        return "reason contains a control character (CR, LF, NUL …)"
    if len(reason.encode("utf-8")) > 128:
        return "reason is longer than 128 bytes"
    return None


_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", "maxLength": 64}

# Who a called human (or callee) sees calling: a number, or "Name" <number> (default: the caller's number)
CALLER_ID_SCHEMA = {"type": "string", "maxLength": 128, "pattern": r"^[^\r\n\x00]*$",
                    "description": "who the called party sees calling: a number or \"Name\" <number> "
                                   "(default: the destination's caller_id, else the caller's number)"}
_DURATION_SCHEMA = {
    "oneOf": [
        {"type": "integer", "minimum": 1, "description": "seconds"},
        {"type": "string", "pattern": DURATION_PATTERN, "description": "e.g. 90s, 15m, 2h"},
    ]
}


def action_schema(ref_prefix: str = "#/$defs/") -> dict[str, Any]:
    """JSON Schema of one call-setup action (a single-key mapping)."""
    return {
        "type": "object",
        "description": "One action: a mapping with exactly one verb as its key.",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "route_agent": {
                "description": "Send the call to an AI agent declared under `agents`.",
                "oneOf": [
                    _NAME,
                    {"type": "object", "required": ["agent"], "additionalProperties": False,
                     "properties": {"agent": _NAME}},
                ],
            },
            "route_sip": {
                "description": "Send the call to a SIP destination declared under `destinations` (with its failover).",
                "oneOf": [
                    _NAME,
                    {"type": "object", "required": ["destination"], "additionalProperties": False,
                     "properties": {"destination": _NAME}},
                ],
            },
            "reject": {
                "description": "Reject the call with a SIP final response.",
                "oneOf": [
                    {"type": "integer", "minimum": 400, "maximum": 699},
                    {"type": "object", "required": ["code"], "additionalProperties": False,
                     "properties": {
                         "code": {"type": "integer", "minimum": 400, "maximum": 699},
                         "reason": {"type": "string", "minLength": 1, "maxLength": 128},
                     }},
                ],
            },
            "add_headers": {
                "description": "Headers added to the INVITE the edge forwards (X- names, or a few standard informational ones).",
                "type": "object",
                "minProperties": 1,
                "maxProperties": MAX_HEADERS,
                "additionalProperties": {"type": "string"},
            },
            "fork": {
                "description": "When the call is up, send a live copy of its audio to a fork target.",
                "oneOf": [
                    _NAME,
                    {"type": "object", "required": ["target"], "additionalProperties": False,
                     "properties": {
                         "target": _NAME,
                         "direction": {"enum": list(FORK_DIRECTIONS)},
                         "transport": {"enum": list(MEDIA_TRANSPORTS)},
                         "codec": {"enum": list(CODECS)},
                     }},
                ],
            },
            "max_duration": {"description": "Hang the call up after this long.", **_DURATION_SCHEMA},
            "anchor_media": {
                "description": "Whether the edge's rtpengine carries this call's media (overrides the trunk's "
                               "`media`): always, only when the caller is behind NAT, or never (an SRTP "
                               "caller is always anchored: its media ends at the edge).",
                "enum": list(ANCHOR_MODES),
            },
            "record": {**record_schema(), "description": "Record the call once it is connected to its agent "
                                                          "(as the live `record` action)."},
            "gather": {**gather_schema(), "description": "Collect digits once the call is connected to its agent "
                                                          "(as the live `gather` action)."},
            "ask_webhook": {
                "description": "Ask a webhook for the actions; fall back when it is slow, down or answers garbage.",
                "type": "object",
                "required": ["url", "fallback"],
                "additionalProperties": False,
                "properties": {
                    "url": {"type": "string", "pattern": r"^https?://[^\s]+$", "maxLength": 2048},
                    "timeout_ms": {"type": "integer", "minimum": 20, "maximum": 10000},
                    "fallback": {"type": "array", "minItems": 1, "items": {"$ref": ref_prefix + "action"}},
                },
            },
            "continue": {
                "description": "Apply this rule's other actions and go on to the next rules.",
                "const": True,
            },
        },
    }


_CONTEXT = {
    "type": "object",
    "description": "Conversation context for a human: becomes X- headers (X-Summary, X-Intent, X-Sentiment …); "
                   "a value over 256 bytes travels as a reference the human's desk fetches from the API.",
    "maxProperties": 16,
    "propertyNames": {"pattern": r"^[A-Za-z][A-Za-z0-9_\-]{0,40}$"},
    "additionalProperties": {"type": "string", "maxLength": 65536},
}


def live_action_schema(with_gather: bool = True) -> dict[str, Any]:
    """JSON Schema of one action on a live call (REST API commands); a gather's branches hold
    live actions without a gather of their own (no $ref: OpenAPI tools want plain schemas)."""
    schema = {
        "type": "object",
        "description": "One action on a live call: a mapping with exactly one verb as its key.",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "route_agent": {
                "description": "Transfer the call to another AI agent (the caller stays connected; forks go on).",
                "oneOf": [_NAME, {"type": "object", "required": ["agent"], "additionalProperties": False,
                                  "properties": {"agent": _NAME}}],
            },
            "route_sip": {
                "description": "Hand the call to a SIP destination (a PBX, a human queue): the destination is "
                               "called through the edge, with context headers; on answer it replaces the AI agent.",
                "oneOf": [_NAME, {"type": "object", "required": ["destination"], "additionalProperties": False,
                                  "properties": {"destination": _NAME, "context": _CONTEXT,
                                                 "caller_id": CALLER_ID_SCHEMA}}],
            },
            "add_human": {
                "description": "Bring a human in (conference: the AI agent stays; handoff: it leaves on answer; "
                               "listen: they hear caller and agent, who stay a two-party call).",
                "type": "object", "required": ["destination"], "additionalProperties": False,
                "properties": {"destination": _NAME, "mode": {"enum": ["conference", "handoff", "listen"]},
                               "context": _CONTEXT,
                               "caller_id": CALLER_ID_SCHEMA},
            },
            "fork": {
                "description": "Start a live copy of the call's audio to a fork target.",
                "oneOf": [_NAME, {"type": "object", "required": ["target"], "additionalProperties": False,
                                  "properties": {"target": _NAME, "direction": {"enum": list(FORK_DIRECTIONS)}}}],
            },
            "stop_fork": {
                "description": "Stop a fork by its id (see the call's forks).",
                "type": "object", "required": ["fork_id"], "additionalProperties": False,
                "properties": {"fork_id": {"type": "string", "pattern": FORK_ID_PATTERN}},
            },
            "play": {
                "description": "Play audio into the call: sound:NAME, recording:NAME, tone:…, digits:…, or an http(s) URL.",
                "oneOf": [{"type": "string", "pattern": PLAY_MEDIA_PATTERN},
                          {"type": "object", "required": ["media"], "additionalProperties": False,
                           "properties": {"media": {"type": "string", "pattern": PLAY_MEDIA_PATTERN}}}],
            },
            "hangup": {"description": "End the call.", "const": True},
            "set_metadata": {
                "description": "Store conversation context on the call (later humans receive it as headers).",
                **_CONTEXT,
                "minProperties": 1,
            },
            "send_dtmf": {
                "description": "Send DTMF (RFC 4733) to the caller or a human leg: 0-9 A-D * #, w / W pause "
                               "half a second / a second.",
                "oneOf": [{"type": "string", "pattern": SEND_DIGITS_PATTERN},
                          {"type": "object", "required": ["digits"], "additionalProperties": False,
                           "properties": {"digits": {"type": "string", "pattern": SEND_DIGITS_PATTERN},
                                          "to": {"type": "string", "pattern": LEG_PATTERN},
                                          "duration_ms": {"type": "integer", "minimum": 40, "maximum": 2000},
                                          "between_ms": {"type": "integer", "minimum": 40, "maximum": 2000}}}],
            },
            "record": record_schema(),
            "transfer": {
                "description": "Cold transfer: the far end is asked (SIP REFER) to call `to` itself — a sip: URI, "
                               "or a number (dialled through an outbound trunk) — and the call leaves callfabric. "
                               "`headers` (X- …) travel in the Refer-To URI, so the far end puts them in its "
                               "INVITE. transfer.completed / transfer.failed carry the NOTIFY's SIP status; a "
                               "refused REFER falls back to bridging the caller with `to` through an outbound "
                               "call (unless `fallback: false`). `method: bridge` goes straight to that.",
                "type": "object", "required": ["to"], "additionalProperties": False,
                "properties": {
                    "to": {"type": "string", "pattern": TRANSFER_TARGET_PATTERN},
                    "method": {"enum": ["refer", "bridge"], "default": "refer"},
                    "headers": {"type": "object", "maxProperties": 16,
                                "additionalProperties": {"type": "string", "maxLength": 256}},
                    "fallback": {"type": "boolean", "default": True},
                    "trunk": {**_NAME, "description": "The outbound trunk a number is dialled through."},
                },
            },
            "stop_record": {
                "description": "Stop a recording (`recording.completed` follows), or every one with `true`.",
                "oneOf": [{"const": True},
                          {"type": "object", "required": ["recording_id"], "additionalProperties": False,
                           "properties": {"recording_id": {"type": "string", "pattern": RECORDING_ID_PATTERN}}}],
            },
        },
    }
    if with_gather:
        schema["properties"]["gather"] = gather_schema()
    return schema


def record_schema() -> dict[str, Any]:
    """Record the call: `both` (the conversation), `caller` (their voice) or `agent` (what the
    caller hears: the agent and anyone else)."""
    return {
        "description": "Record the call (wav) until stop_record, the call's end or `max_duration`: `both` sides, "
                       "the `caller`'s voice or what the caller hears (`agent`). `beep` / `announcement` (played "
                       "to everyone first) for consent. The file is listed by GET /v1/calls/{id}/recordings; "
                       "`recording.completed` gives its duration and size.",
        "oneOf": [{"enum": list(RECORDING_CHANNELS)},
                  {"type": "object", "additionalProperties": False, "properties": {
                      "channels": {"enum": list(RECORDING_CHANNELS), "default": "both"},
                      "beep": {"type": "boolean", "default": False},
                      "announcement": {"type": "string", "pattern": PLAY_MEDIA_PATTERN},
                      "max_duration": {**_DURATION_SCHEMA, "description": "At most this long (default: the call's)."},
                  }}],
    }


def gather_schema() -> dict[str, Any]:
    """Collect digits from the caller; the result goes to a policy branch (`then`) or a webhook."""
    return {
        "description": "Collect DTMF digits from the caller (or a human leg): at most `max_digits`, up to "
                       "`finish_key`, until `timeout` passes without a digit (counted from the prompt's end). "
                       "The result (`gather.completed`: digits, reason) goes to the first `then` branch whose "
                       "`match` holds, or to `webhook`, whose answer `{\"actions\": [...]}` is carried out.",
        "type": "object", "additionalProperties": False,
        "properties": {
            "max_digits": {"type": "integer", "minimum": 1, "maximum": 64, "default": 32},
            "finish_key": {"enum": list("0123456789*#") + [""], "default": "#"},
            "timeout": {**_DURATION_SCHEMA, "description": "Without a digit (90, 5s, 1500ms); default 5s."},
            "prompt": {"type": "string", "pattern": PLAY_MEDIA_PATTERN,
                       "description": "Played first; the first digit stops it."},
            "leg": {"type": "string", "pattern": LEG_PATTERN, "default": "caller"},
            "then": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                "type": "object", "required": ["actions"], "additionalProperties": False,
                "properties": {
                    "match": gathered_condition_schema(),
                    "actions": {"type": "array", "minItems": 1, "maxItems": 16,
                                "items": live_action_schema(with_gather=False)},
                }}},
            "webhook": {"type": "string", "pattern": WEBHOOK_URL_PATTERN, "maxLength": 2048},
        },
        "not": {"required": ["then", "webhook"]},
    }


def gathered_condition_schema(depth: int = 2) -> dict[str, Any]:
    """A condition on a gather's result: the digits, and why it ended (all / any / not nest
    `depth` levels deep)."""
    digits = {"type": "string", "pattern": DIGITS_PATTERN}
    schema = {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "description": "Holds when every key holds: `digits` (exact value(s), or {exact, prefix, regex, "
                       "min_length, max_length}), `reason` (max_digits, finish_key, timeout), all / any / not.",
        "properties": {
            "digits": {"oneOf": [digits, {"type": "array", "minItems": 1, "items": digits},
                                 {"type": "object", "minProperties": 1, "additionalProperties": False,
                                  "properties": {
                                      "exact": {"oneOf": [digits, {"type": "array", "minItems": 1, "items": digits}]},
                                      "prefix": {"oneOf": [digits, {"type": "array", "minItems": 1, "items": digits}]},
                                      "regex": {"type": "string", "minLength": 1, "maxLength": 256},
                                      "min_length": {"type": "integer", "minimum": 0, "maximum": 64},
                                      "max_length": {"type": "integer", "minimum": 0, "maximum": 64}}}]},
            "reason": {"oneOf": [{"enum": list(GATHER_REASONS)},
                                 {"type": "array", "minItems": 1, "items": {"enum": list(GATHER_REASONS)}}]},
        },
    }
    if depth > 1:
        inner = gathered_condition_schema(depth - 1)
        schema["properties"].update({"all": {"type": "array", "minItems": 1, "items": inner},
                                     "any": {"type": "array", "minItems": 1, "items": inner}, "not": inner})
    return schema


GATHER_REASONS = ("max_digits", "finish_key", "timeout")


def json_number(text: str) -> int | float:
    """A JSON number (json.loads' parse_float) as the schemas read it: a whole one (362.0,
    1e3) is an integer to JSON Schema, so it is an int here too and never reaches Asterisk
    as "362.0" where ARI wants an int."""
    value = float(text)
    return int(value) if value.is_integer() else value


def canonical_action(action: dict[str, Any]) -> tuple[str, Any]:
    """(verb, argument) with shorthand forms expanded; `action` must be schema-valid (a policy
    action or a live one: the shorthands are the same)."""
    ((verb, arg),) = action.items()
    if verb == "route_agent" and isinstance(arg, str):
        arg = {"agent": arg}
    elif verb == "route_sip" and isinstance(arg, str):
        arg = {"destination": arg}
    elif verb == "reject" and isinstance(arg, int):
        arg = {"code": arg}
    elif verb == "fork" and isinstance(arg, str):
        arg = {"target": arg}
    elif verb == "play" and isinstance(arg, str):
        arg = {"media": arg}
    elif verb == "send_dtmf" and isinstance(arg, str):
        arg = {"digits": arg}
    elif verb == "record" and isinstance(arg, str):
        arg = {"channels": arg}
    elif verb == "stop_record" and arg is True:
        arg = {}
    return verb, arg
