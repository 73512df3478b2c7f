"""JSON Schema of a policy file (structure only; names, regexes, CIDRs, time zones and
header rules are checked semantically in validate.py, which knows the whole policy)."""
from __future__ import annotations

from typing import Any

from controller.actions import CODECS, DURATION_PATTERN, FORK_DIRECTIONS, MEDIA_TRANSPORTS, action_schema

SIP_TRANSPORTS = ("udp", "tcp", "tls", "sctp", "ws", "wss")
COUNTER_SCOPES = ("source", "tenant", "caller", "callee", "global")
NUMBER_FIELDS = ("caller", "callee", "ruri")

_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", "maxLength": 64}
_TEXT = {"type": "string", "maxLength": 512}
_NUMBER = {"type": ["string", "integer"], "description": "a number (normalised to E.164) or a SIP user"}


def _one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [item, {"type": "array", "minItems": 1, "items": item}]}


def _named(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "propertyNames": _NAME, "additionalProperties": item}


_NUMBER_MATCH = {
    "description": "How a number field matches: exact value(s), prefix(es), a regex (searched), or a number list.",
    "anyOf": [
        _NUMBER,
        {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "exact": _one_or_many(_NUMBER),
                "prefix": _one_or_many({"type": "string", "minLength": 1}),
                "regex": {"type": "string", "minLength": 1},
                "in_list": _one_or_many(_NAME),
            },
        },
    ],
}

_CONDITION_PROPERTIES: dict[str, Any] = {
    "all": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/condition"},
            "description": "Every condition holds."},
    "any": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/condition"},
            "description": "At least one condition holds."},
    "not": {"$ref": "#/$defs/condition", "description": "The condition does not hold."},
    "caller": {**_NUMBER_MATCH, "description": "The From user."},
    "callee": {**_NUMBER_MATCH, "description": "The To user."},
    "ruri": {**_NUMBER_MATCH, "description": "The Request-URI user (the dialled destination)."},
    "source_ip": {**_one_or_many({"type": "string"}), "description": "Source address in any of these IPs / CIDRs."},
    "transport": _one_or_many({"enum": list(SIP_TRANSPORTS)}),
    "header": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "description": "A SIP header the caller sent: present (or absent), equal to a value, or matching a regex.",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "present": {"type": "boolean"},
            "equals": _one_or_many({"type": "string"}),
            "regex": {"type": "string", "minLength": 1},
            "ignore_case": {"type": "boolean"},
        },
    },
    "tenant": _one_or_many(_NAME),
    "trunk": {**_one_or_many(_NAME), "description": "The call came in on one of these inbound trunks."},
    "time": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "description": "Local time of the call in a named time zone.",
        "properties": {
            "tz": {"type": "string"},
            "days": _one_or_many({"type": "string"}),
            "hours": _one_or_many({"type": "string"}),
            "dates": _one_or_many({"type": "string"}),
        },
    },
    "split": {
        "type": "object",
        "required": ["percent"],
        "additionalProperties": False,
        "description": "A deterministic share of calls by Call-ID hash (A/B tests).",
        "properties": {
            "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "offset": {"type": "number", "minimum": 0, "maximum": 100},
            "seed": {"type": "string", "maxLength": 128},
        },
    },
    "destination_risk": {**_one_or_many(_NAME), "description": "The R-URI number is in one of these risk lists."},
    "calls_in_window": {
        "type": "object",
        "required": ["scope", "window", "at_least"],
        "additionalProperties": False,
        "description": "Holds when at least N calls were already seen in the window for this call's scope.",
        "properties": {
            "scope": {"enum": list(COUNTER_SCOPES)},
            "window": {"oneOf": [{"type": "integer", "minimum": 1},
                                 {"type": "string", "pattern": DURATION_PATTERN}]},
            "at_least": {"type": "integer", "minimum": 1},
        },
    },
    "concurrent_calls": {
        "type": "object",
        "required": ["scope", "at_least"],
        "additionalProperties": False,
        "description": "Holds when at least N calls are already live for this call's scope.",
        "properties": {
            "scope": {"enum": list(COUNTER_SCOPES)},
            "at_least": {"type": "integer", "minimum": 1},
        },
    },
}

CONDITION_KINDS = tuple(k for k in _CONDITION_PROPERTIES if k not in ("all", "any", "not"))

# What each kind of risk detector measures; the fields each kind takes are checked in validate.py.
DETECTOR_KINDS = {
    "match": "the `when` condition holds (a risky destination, a call outside a tenant's hours …)",
    "rate_spike": "calls per window from a source / tenant are `factor` times their learned baseline",
    "concurrent_calls": "live calls of the source / tenant / everyone would exceed `max`",
    "destination_rate": "calls to one prefix of the `lists` in the window would exceed `max`",
    "short_calls": "the source's answered calls shorter than `shorter_than` in the window reached `max`",
    "distinct_callees": "distinct numbers called by the source / tenant in the window would exceed `max`",
    "asterisk_security": "failed authentications from the source reached `max`: inbound trunk digest failures at the "
                         "edge and Asterisk security events (failed auth, unknown endpoint)",
}
DETECTOR_SCOPES = ("source", "tenant", "global")
_DURATION = {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": DURATION_PATTERN}]}
_SCORE = {"type": "integer", "minimum": 1, "maximum": 1000}
_SECURITY = {
    "type": "object",
    "additionalProperties": False,
    "description": "Risk scoring of every new call before the rules: detectors add scores, the total picks an "
                   "outcome (allow, challenge, reject, ban).",
    "properties": {
        "exempt": {"$ref": "#/$defs/condition", "description": "Calls that are never scored (trusted trunks)."},
        "detectors": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "kind", "score"],
            "additionalProperties": False,
            "properties": {
                "name": _NAME,
                "kind": {"enum": list(DETECTOR_KINDS)},
                "description": _TEXT,
                "when": {"$ref": "#/$defs/condition", "description": "Only calls matching this are measured."},
                "score": _SCORE,
                "scope": {"enum": list(DETECTOR_SCOPES)},
                "window": _DURATION,
                "baseline": _DURATION,
                "factor": {"type": "number", "exclusiveMinimum": 1, "maximum": 1000},
                "min_calls": {"type": "integer", "minimum": 1},
                "max": {"type": "integer", "minimum": 0},
                "lists": _one_or_many(_NAME),
                "shorter_than": _DURATION,
            },
        }},
        "outcomes": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "challenge": {"type": "object", "required": ["at_least", "actions"], "additionalProperties": False,
                              "properties": {"at_least": _SCORE, "actions": {"$ref": "#/$defs/actions"}}},
                "reject": {"type": "object", "required": ["at_least"], "additionalProperties": False,
                           "properties": {"at_least": _SCORE, "code": {"type": "integer", "minimum": 400, "maximum": 699},
                                          "reason": {"type": "string", "maxLength": 128}}},
                "ban": {"type": "object", "required": ["at_least", "for"], "additionalProperties": False,
                        "properties": {"at_least": _SCORE, "for": _DURATION,
                                       "code": {"type": "integer", "minimum": 400, "maximum": 699}}},
            },
        },
        "max_call_duration": {**_DURATION, "description": "No call lasts longer (the edge ends the dialog)."},
    },
}

TRUNK_MEDIA = ("always", "nat-only", "never")
SRTP_MODES = ("off", "optional", "required")
TRUNK_TRANSPORTS = ("udp", "tcp", "tls")
_SECRET_REF = {
    "type": "object", "required": ["username"], "additionalProperties": False,
    "description": "Digest credentials; the password is read from the environment or a file, never written here.",
    "properties": {
        "username": {"type": "string", "pattern": r"^[A-Za-z0-9_.!~*'()&=+,;?/%-]{1,64}$"},
        "password_env": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"},
        "password_file": {"type": "string", "minLength": 1, "maxLength": 1024},
        "realm": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"},
    },
}
_MEDIA = {"enum": list(TRUNK_MEDIA), "description": "rtpengine anchors the call's media at the edge: always, only "
                                                   "when the caller is behind NAT, or never"}
_SRTP = {"enum": list(SRTP_MODES), "description": "SRTP (SDES) toward this trunk: off, optional or required"}
_TRUNK = {
    "type": "object", "minProperties": 1, "additionalProperties": False,
    "properties": {
        "description": _TEXT,
        "inbound": {
            "type": "object", "additionalProperties": False,
            "description": "Calls this trunk sends us: recognised by source address and/or digest credentials.",
            "properties": {
                "sources": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                "digest": _SECRET_REF,
                "numbers": {"anyOf": [*_NUMBER_MATCH["anyOf"], {"type": "array", "minItems": 1, "items": _NUMBER}],
                            "description": "The dialled numbers this trunk may call (else 404): numbers, or a "
                                           "match like `ruri:` ({prefix: …}, {in_list: …})."},
                "tenant": _NAME,
                "transports": _one_or_many({"enum": list(TRUNK_TRANSPORTS)}),
                "media": _MEDIA,
                "srtp": _SRTP,
            },
        },
        "outbound": {
            "type": "object", "required": ["address"], "additionalProperties": False,
            "description": "Where calls to phone numbers leave through this trunk.",
            "properties": {
                "address": {"type": "string", "minLength": 1, "maxLength": 256},
                "transport": {"enum": list(TRUNK_TRANSPORTS)},
                "digest": _SECRET_REF,
                "from_host": {"type": "string", "pattern": r"^[A-Za-z0-9.\-]{1,253}$"},
                "tls_name": {"type": "string", "pattern": r"^[A-Za-z0-9]([A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?$",
                             "description": "`transport: tls`: the host name the carrier's certificate must carry "
                                            "(default: the address's host); sent as SNI."},
                "caller_ids": {"type": "array", "items": _NUMBER},
                "failover": {"type": "array", "items": _NAME},
                "media": _MEDIA,
                "srtp": _SRTP,
            },
        },
    },
}

_NUMBER_LIST = {
    "anyOf": [
        {"type": "array", "items": _NUMBER},
        {"type": "object", "required": ["file"], "additionalProperties": False,
         "properties": {"file": {"type": "string", "minLength": 1}, "description": _TEXT}},
    ]
}
_RISK_LIST = {
    "anyOf": [
        {"type": "array", "items": {"type": "string"}},
        {"type": "object", "additionalProperties": False,
         "properties": {"prefixes": {"type": "array", "items": {"type": "string"}},
                        "file": {"type": "string", "minLength": 1},
                        "category": _TEXT, "description": _TEXT}},
    ]
}


def policy_file_schema() -> dict[str, Any]:
    """Schema of one policy file; a policy is the union of the files in a directory."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:callfabric:policy-file",
        "title": "callfabric routing policy file",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "settings": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "numbering": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "country_code": {"type": "string", "pattern": r"^[1-9][0-9]{0,2}$"},
                            "international_prefix": _one_or_many({"type": "string", "pattern": r"^[0-9]{1,4}$"}),
                            "national_prefix": {"type": "string", "pattern": r"^[0-9]{1,3}$"},
                            "min_national_length": {"type": "integer", "minimum": 1, "maximum": 15},
                        },
                    },
                    "timezone": {"type": "string", "description": "Default time zone of `time` conditions."},
                    "limits_without_counters": {
                        "enum": ["open", "closed"],
                        "description": "When the counters a call's limits read are unknown (Redis unreachable, "
                                       "or the state changes queued during an outage still being replayed): "
                                       "open (default) decides as if they were 0; closed refuses the call "
                                       "(503 + Retry-After, rule limits-without-counters). Calls whose rules "
                                       "read no counter are decided either way."},
                },
            },
            "node_sets": _named({
                "type": "object", "required": ["dispatcher_set"], "additionalProperties": False,
                "properties": {"dispatcher_set": {"type": "integer", "minimum": 1, "maximum": 65535},
                               "description": _TEXT},
            }),
            "agents": _named({
                "type": "object", "required": ["node_set", "endpoint"], "additionalProperties": False,
                "properties": {
                    "node_set": _NAME,
                    "endpoint": {"type": "string", "minLength": 1,
                                 "description": "host:port of the agent's media endpoint (rtp, audiosocket) "
                                                "or an Asterisk websocket_client connection id (websocket)"},
                    "transport": {"enum": list(MEDIA_TRANSPORTS)},
                    "codec": {"enum": list(CODECS)},
                    "webhook": {"type": "string", "pattern": r"^https?://[^\s]+$", "maxLength": 2048,
                                "description": "where this agent's calls' events are POSTed (else the "
                                               "controller's webhook_url)"},
                    "description": _TEXT,
                },
            }),
            "destinations": _named({
                "type": "object", "additionalProperties": False,
                "properties": {
                    "uri": {"type": "string"},
                    "trunk": {**_NAME, "description": "an outbound trunk (the number is called through it)"},
                    "number": {**_NUMBER, "description": "the phone number called through `trunk`"},
                    "failover": {"type": "array", "items": {"type": "string"}},
                    "attempt_timeout_ms": {"type": "integer", "minimum": 1000, "maximum": 600000,
                                           "description": "how long each target may ring before the next is tried"},
                    "caller_id": {"type": "string", "maxLength": 128, "pattern": r"^[^\r\n\x00]*$",
                                  "description": "who a human called there by add_human / route_sip sees calling "
                                                 "(a number or \"Name\" <number>; default: the caller's number)"},
                    "description": _TEXT,
                },
            }),
            "fork_targets": _named({
                "type": "object", "required": ["endpoint"], "additionalProperties": False,
                "properties": {
                    "endpoint": {"type": "string", "minLength": 1},
                    "transport": {"enum": list(MEDIA_TRANSPORTS)},
                    "codec": {"enum": list(CODECS)},
                    "direction": {"enum": list(FORK_DIRECTIONS)},
                    "description": _TEXT,
                },
            }),
            "number_lists": _named(_NUMBER_LIST),
            "risk_lists": _named(_RISK_LIST),
            "tenants": _named({
                "type": "object", "minProperties": 1, "additionalProperties": False,
                "description": "A tenant is recognised by its trunks' source addresses or by a header a trusted upstream sets.",
                "properties": {
                    "trunks": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    "header": {"type": "object", "required": ["name", "equals"], "additionalProperties": False,
                               "properties": {"name": {"type": "string", "minLength": 1},
                                              "equals": {"type": "string"}}},
                    "description": _TEXT,
                },
            }),
            "trunks": _named(_TRUNK),
            "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
            "security": _SECURITY,
            "default": {
                "type": "object", "required": ["actions"], "additionalProperties": False,
                "properties": {"actions": {"$ref": "#/$defs/actions"}, "description": _TEXT},
            },
        },
        "$defs": {
            "rule": {
                "type": "object",
                "required": ["name", "actions"],
                "additionalProperties": False,
                "properties": {
                    "name": _NAME,
                    "description": _TEXT,
                    "enabled": {"type": "boolean"},
                    "match": {"$ref": "#/$defs/condition"},
                    "actions": {"$ref": "#/$defs/actions"},
                },
            },
            "actions": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/action"}},
            "action": action_schema(),
            "condition": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "description": "Several keys in one mapping must all hold.",
                "properties": _CONDITION_PROPERTIES,
            },
        },
    }
