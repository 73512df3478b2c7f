"""The API's contract: every route with the scope it needs, the request bodies' JSON
Schemas, and the OpenAPI 3.1 document built from them (served at /v1/openapi.json and kept
in the repository as api/openapi.json; a test checks the two agree)."""
from __future__ import annotations

import copy
from typing import Any

from controller.actions import CALLER_ID_SCHEMA, live_action_schema
from controller.api.events import EVENT_TYPES

# method, path (relative to /v1), handler name, scope (None: public)
ROUTES: list[tuple[str, str, str, str | None]] = [
    ("GET", "/openapi.json", "openapi", None),
    ("GET", "/calls", "list_calls", "read"),
    ("POST", "/calls", "post_call", "control"),
    ("GET", "/calls/{call_id}", "get_call", "read"),
    ("GET", "/calls/{call_id}/timeline", "get_timeline", "read"),
    ("GET", "/calls/{call_id}/forks", "get_forks", "read"),
    ("GET", "/calls/{call_id}/context/{name}", "get_context", "read"),
    ("GET", "/calls/{call_id}/recordings", "list_recordings", "read"),
    ("GET", "/calls/{call_id}/recordings/{recording_id}", "get_recording", "read"),
    ("POST", "/calls/{call_id}/actions", "post_action", "control"),
    ("GET", "/policy", "get_policy", "read"),
    ("POST", "/policy/reload", "reload_policy", "admin"),
    ("POST", "/policy/validate", "validate_policy", "admin"),
    ("GET", "/events", "events", "read"),
    ("GET", "/bans", "list_bans", "admin"),
    ("POST", "/bans", "add_ban", "admin"),
    ("GET", "/bans/{ip}", "get_ban", "admin"),
    ("DELETE", "/bans/{ip}", "remove_ban", "admin"),
    ("POST", "/phone/tokens", "create_phone_token", "phone"),
    ("GET", "/admin/status", "admin_status", "admin"),
    ("POST", "/admin/drain", "admin_drain", "admin"),
]
_SCOPES = {(method, path): scope for method, path, _, scope in ROUTES}


def scope_of(method: str, path: str) -> str | None:
    """The scope a request needs; unknown routes need `read` (they answer 404 after auth)."""
    if method == "HEAD":
        method = "GET"
    return _SCOPES.get((method, path), "read")


_CONTEXT = live_action_schema()["properties"]["add_human"]["properties"]["context"]
REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "action_request": {
        "type": "object", "required": ["action"], "additionalProperties": False,
        "properties": {"action": live_action_schema()},
    },
    "originate_request": {
        "type": "object", "required": ["to", "agent"], "additionalProperties": False,
        "properties": {
            "to": {"type": "string", "minLength": 2, "maxLength": 256,
                   "description": "A phone number (called through an outbound trunk of the policy) or a sip: URI."},
            "trunk": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", "maxLength": 64,
                      "description": "The outbound trunk a phone number is called through (default: the "
                                     "outbound_trunk setting, else the policy's only outbound trunk)."},
            "agent": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", "maxLength": 64},
            "caller_id": CALLER_ID_SCHEMA,
            "context": _CONTEXT,
            "amd": {"description": "Answering-machine detection once answered: `call.amd` says human, machine or "
                                   "unknown within `timeout` (1-30 s, default 5 s), before the agent joins.",
                    "oneOf": [{"type": "boolean"},
                              {"type": "object", "additionalProperties": False, "properties": {
                                  "timeout": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 30},
                                                        {"type": "string",
                                                         "pattern": r"^([1-9][0-9]{3,4}ms|[1-9][0-9]?s?)$"}]}}}]},
        },
    },
    "phone_token_request": {
        "type": "object", "required": ["to"], "additionalProperties": False,
        "properties": {
            "to": {"type": "string", "pattern": r"^(\*|[A-Za-z0-9+_-]{1,64})$",
                   "description": "Who the browser may call (the dialled user its INVITE carries; the policy routes "
                                  "it, e.g. `match: {ruri: intake, transport: wss}`); * for anyone."},
            "ttl_s": {"type": "integer", "minimum": 10, "maximum": 86400,
                      "description": "Life of the token (capped by phone_token_ttl_s; default: that)."},
        },
    },
    "ban_request": {
        "type": "object", "required": ["ip", "for"], "additionalProperties": False,
        "properties": {
            "ip": {"type": "string", "minLength": 2, "maxLength": 64, "description": "An IPv4 or IPv6 address."},
            "for": {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 30 * 86400},
                              {"type": "string", "pattern": r"^[1-9][0-9]{0,6}(s|m|h)?$"}],
                    "description": "How long: seconds, or 90s / 15m / 2h (at most 30 days)."},
            "reason": {"type": "string", "maxLength": 512, "pattern": r"^[^\r\n\x00]*$"},
        },
    },
    "drain_request": {
        "type": "object", "required": ["instance"], "additionalProperties": False,
        "properties": {"instance": {"type": "string", "minLength": 1, "maxLength": 256,
                                    "description": "The instance_id of the controller to drain (GET /admin/status "
                                                   "says which one answers): a drain that reached another "
                                                   "controller, e.g. through a load balancer, is refused."}},
    },
    "policy_candidate": {
        "type": "object", "required": ["files"], "additionalProperties": False,
        "properties": {"files": {"type": "object", "minProperties": 1, "maxProperties": 200,
                                 "propertyNames": {"pattern": r"^[A-Za-z0-9_.\-]+\.ya?ml$"},
                                 "additionalProperties": {"type": "string", "maxLength": 1_000_000},
                                 "description": "File name → YAML text; the whole request body is at most "
                                                "1 MiB (413 past it)."}},
    },
}

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["status", "message"],
        "properties": {"status": {"type": "integer"}, "message": {"type": "string"},
                       "playback_id": {"type": "string", "description": "A play that Asterisk failed "
                                       "(422: a sound it does not have): the playback it tried"},
                       "errors": {"type": "array", "items": {
                           "type": "object", "required": ["path", "message"],
                           "properties": {"path": {"type": "string"}, "message": {"type": "string"}}}}},
    }},
}
_OBJECT = {"type": "object"}
_RESPONSES: dict[str, dict[str, Any]] = {
    "openapi": {"200": _OBJECT},
    "list_calls": {"200": {"type": "object", "required": ["calls"],
                           "properties": {"calls": {"type": "array", "items": _OBJECT}}}},
    "post_call": {"201": {"type": "object", "required": ["call_id"],
                          "properties": {"call_id": {"type": "string"}, "node": {"type": "string"},
                                         "channel": {"type": "string"}, "agent": {"type": "string"}}}},
    "get_call": {"200": {"type": "object", "required": ["call"],
                         "properties": {"call": _OBJECT, "media": {"type": ["object", "null"]}, "metadata": _OBJECT,
                                        "context": {"type": "array", "items": {"type": "string"}}}}},
    "get_timeline": {"200": {"type": "object", "required": ["events"],
                             "properties": {"call_id": {"type": "string"},
                                            "events": {"type": "array", "items": _OBJECT}}}},
    "get_forks": {"200": {"type": "object", "required": ["forks"],
                          "properties": {"call_id": {"type": "string"}, "forks": {"type": "array", "items": _OBJECT}}}},
    "list_recordings": {"200": {"type": "object", "required": ["call_id", "recordings"], "properties": {
        "call_id": {"type": "string"},
        "recordings": {"type": "array", "items": {
            "type": "object", "required": ["recording_id", "channels", "state"],
            "properties": {"recording_id": {"type": "string"}, "channels": {"enum": ["both", "caller", "agent"]},
                           "format": {"type": "string"},
                           "state": {"enum": ["starting", "recording", "stopping", "saving", "done", "failed"]},
                           "started_ms": {"type": "integer"}, "ended_ms": {"type": "integer"},
                           "duration_ms": {"type": "integer"}, "size_bytes": {"type": "integer"},
                           "reason": {"type": "string"},
                           "url": {"type": ["string", "null"], "description": "Where to download it (done ones)."}}}},
    }}},
    "get_recording": {"200": "audio/wav"},
    "get_context": {"200": {"type": "object", "required": ["value"],
                            "properties": {"call_id": {"type": "string"}, "name": {"type": "string"},
                                           "value": {"type": "string"}}}},
    "post_action": {"200": {"type": "object", "required": ["call_id", "action"],
                            "properties": {"call_id": {"type": "string"}, "action": {"type": "string"},
                                           "result": _OBJECT}}},
    "get_policy": {"200": {"type": "object", "required": ["version"],
                           "properties": {"version": {"type": "string"}, "files": {"type": "array"},
                                          "rules": {"type": "array"}, "agents": {"type": "array"},
                                          "destinations": {"type": "array"}, "fork_targets": {"type": "array"},
                                          "warnings": {"type": "array"}}}},
    "reload_policy": {"200": {"type": "object", "required": ["accepted", "version"],
                              "properties": {"accepted": {"type": "boolean"}, "version": {"type": "string"},
                                             "previous": {"type": ["string", "null"]},
                                             "issues": {"type": "array", "items": {"type": "string"}}}}},
    "validate_policy": {"200": {"type": "object", "required": ["valid", "version"],
                                "properties": {"valid": {"const": True}, "version": {"type": "string"},
                                               "warnings": {"type": "array", "items": {"type": "string"}}}}},
    "events": {"101": None},
    "list_bans": {"200": {"type": "object", "required": ["bans"],
                          "properties": {"bans": {"type": "array", "items": _OBJECT}}}},
    "add_ban": {"201": {"type": "object", "required": ["ban"], "properties": {"ban": _OBJECT}}},
    "get_ban": {"200": {"type": "object", "required": ["ban"], "properties": {"ban": _OBJECT}}},
    "remove_ban": {"200": {"type": "object", "required": ["ip", "removed"],
                           "properties": {"ip": {"type": "string"}, "removed": {"type": "boolean"}}}},
    "create_phone_token": {"201": {"type": "object", "required": ["token", "to", "expires_at", "url"],
                                   "properties": {"token": {"type": "string"}, "to": {"type": "string"},
                                                  "expires_at": {"type": "integer",
                                                                 "description": "unix seconds"},
                                                  "url": {"type": "string",
                                                          "description": "the /phone page with the token"}}}},
    "admin_status": {"200": {"type": "object", "required": ["instance", "state"],
                             "properties": {"instance": {"type": "string"},
                                            "state": {"enum": ["serving", "draining", "drained"]},
                                            "nodes": _OBJECT, "edges": _OBJECT, "redis": _OBJECT}}},
    "admin_drain": {"202": {"type": "object", "required": ["instance", "state"],
                            "properties": {"instance": {"type": "string"},
                                           "state": {"enum": ["draining", "drained"]}}}},
}
_ERRORS = {  # which error statuses each route can answer, besides 401/403 for protected routes
    "list_calls": ["400", "503"], "post_call": ["400", "413", "422", "502", "503"], "get_call": ["404", "503"],
    "get_timeline": ["404", "503"], "get_forks": ["404", "503"], "get_context": ["404", "503"],
    "list_recordings": ["404", "503"], "get_recording": ["404", "409", "502", "503"],
    "post_action": ["400", "404", "409", "413", "422", "502", "503"], "get_policy": ["503"],
    "reload_policy": ["422"], "validate_policy": ["400", "413", "422"], "events": ["400"], "openapi": [],
    "list_bans": ["503"], "add_ban": ["400", "413", "422", "503"], "get_ban": ["404", "422", "503"],
    "remove_ban": ["422", "503"], "create_phone_token": ["400", "413", "422", "503"], "admin_status": [], "admin_drain": ["400", "409", "413", "422"],
}
_BODIES = {"post_action": "action_request", "post_call": "originate_request", "validate_policy": "policy_candidate",
           "add_ban": "ban_request", "admin_drain": "drain_request", "create_phone_token": "phone_token_request"}
_SUMMARIES = {
    "openapi": "This document.",
    "list_calls": "Live calls (state=live) or the latest calls (state=recent).",
    "post_call": "Originate an outbound call through the edge with an AI agent on it.",
    "get_call": "A call's record, media (legs, forks, humans) and metadata.",
    "get_timeline": "A call's timeline: every step, with timings.",
    "get_forks": "A call's forks.",
    "list_recordings": "A call's recordings: state, duration, size, and where to download each.",
    "get_recording": "A finished recording's file (audio/wav): from this controller's recording_dir, or streamed "
                     "from the media node that recorded it. 409 while it is still being recorded or fetched.",
    "get_context": "A long context value (a summary, a transcript …) sent to a human by reference.",
    "post_action": "Carry out an action on a live call: route_agent (transfer), route_sip (hand off), add_human, "
                   "fork, stop_fork, play, hangup, set_metadata, send_dtmf, gather, record, stop_record, transfer "
                   "(cold, SIP REFER). An "
                   "Idempotency-Key header makes retries safe.",
    "get_policy": "The serving policy's version and declarations.",
    "reload_policy": "Reload the policy from disk (the last good version keeps serving if it is invalid).",
    "validate_policy": "Validate a candidate policy (files as text) without loading it.",
    "events": "Websocket of call events (JSON), filtered by call_id and types (e.g. fork.*).",
    "list_bans": "Sources banned at the edge, with why and until when.",
    "add_ban": "Ban a source address at every edge for a while (a trusted peer, never: 422).",
    "get_ban": "One ban.",
    "remove_ban": "Lift a ban (at every edge).",
    "create_phone_token": "A short-lived phone token: a browser on /phone may call `to` with it until it expires "
                          "(the edge checks it at the WebSocket handshake). 503 when phone_token_secret is not set.",
    "admin_status": "This controller: instance, state (serving, draining, drained), media nodes it owns, edges, "
                    "Redis (mode, reachable, state changes queued).",
    "admin_drain": "Drain this controller (rolling upgrades): it takes no new calls, hands its media nodes over to "
                   "the other controllers, writes what it queued, then exits. Name the instance: 409 if this is "
                   "another one.",
}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, name, scope in ROUTES:
        operation: dict[str, Any] = {"operationId": name, "summary": _SUMMARIES[name], "responses": {}}
        if scope is not None:
            operation["security"] = [{"bearer": []}]
            operation["x-scope"] = scope
        for param in [p[1:-1] for p in path.split("/") if p.startswith("{")]:
            operation.setdefault("parameters", []).append(
                {"name": param, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}})
        if name == "list_calls":
            operation["parameters"] = [
                {"name": "state", "in": "query", "schema": {"enum": ["live", "recent"], "default": "live"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500,
                                                            "default": 50}}]
        if name == "post_action":
            operation["parameters"].append({"name": "Idempotency-Key", "in": "header",
                                            "schema": {"type": "string", "maxLength": 128}})
        if name == "events":
            operation["parameters"] = [
                {"name": "call_id", "in": "query", "schema": {"type": "string"}},
                {"name": "types", "in": "query", "description": "comma-separated; `fork.*` matches a family; "
                                                                "types: " + ", ".join(EVENT_TYPES),
                 "schema": {"type": "string"}}]
        if name in _BODIES:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": copy.deepcopy(REQUEST_SCHEMAS[_BODIES[name]])}}}
        for status, schema in _RESPONSES[name].items():
            if schema is None:
                operation["responses"][status] = {"description": "Switching to the websocket protocol."}
            elif schema == "audio/wav":
                operation["responses"][status] = {"description": "The file", "content": {"audio/wav": {
                    "schema": {"type": "string", "contentMediaType": "audio/wav"}}}}
            else:
                operation["responses"][status] = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        for status in _ERRORS[name] + (["401", "403"] if scope else []):
            operation["responses"][status] = {"description": "Error", "content": {"application/json": {"schema": _ERROR}}}
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "callfabric API", "version": "1",
                 "description": "Control live calls of AI voice agents; actions are the same documents as in "
                                "routing policies."},
        "servers": [{"url": "/v1"}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
