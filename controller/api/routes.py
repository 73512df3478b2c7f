"""The public REST API, under /v1: calls (list, details, timeline, forks, context), actions on
live calls (the same action documents as policies), originating calls, the serving policy,
and a websocket of call events. JSON everywhere; errors are
{"error": {"status", "message", "errors": [{"path", "message"}]}}."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from controller.api import openapi
from controller.api.auth import auth_middleware, error, parse_tokens
from controller.api.commands import CallControl, CommandError
from controller.api.events import EventHub, matches
from controller.api.phone import make_token
from controller.json_schema import SchemaValidator
from controller.media.plane import MediaError
from controller.policy import PolicyInvalid, policy_from_texts
from controller.actions import json_number, parse_duration_ms
from controller.schema_errors import describe
from controller.security.bans import MAX_BAN_S, normalise_ip
from controller.security.trust import BanRefused
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.api")

CONTROL = web.AppKey("call_control", CallControl)
HUB = web.AppKey("event_hub", EventHub)
STORE = web.AppKey("api_store", object)
POLICIES = web.AppKey("api_policies", object)
BANS = web.AppKey("api_bans", object)
ADMIN = web.AppKey("api_admin", object)  # the controller's lifecycle: status(), drain(), state
PHONE = web.AppKey("api_phone", object)  # (phone_token_secret, phone_token_ttl_s, the /phone page's URL)

_VALIDATORS = {name: SchemaValidator(schema) for name, schema in openapi.REQUEST_SCHEMAS.items()}


def _scope(request: web.Request) -> str | None:
    resource = getattr(request.match_info.route, "resource", None)
    path = resource.canonical if resource is not None else ""
    return openapi.scope_of(request.method, path.removeprefix("/v1"))


def _body_errors(name: str, body: Any) -> list[dict[str, str]]:
    out = []
    for err in _VALIDATORS[name].iter_errors(body):
        for sub_path, message, _ in describe(err):
            out.append({"path": ".".join(map(str, sub_path)) or "(body)", "message": message})
    return out


class _Invalid(Exception):
    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors


class _NotJson(Exception):
    pass


async def _json_body(request: web.Request, schema: str) -> Any:
    try:
        body = json.loads(await request.text(), parse_float=json_number)
    except (ValueError, UnicodeDecodeError):
        raise _NotJson() from None
    errors = _body_errors(schema, body)
    if errors:
        raise _Invalid(errors)
    return body


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure as JSON with a status that says whose fault it is; never a stack trace."""
    try:
        return await handler(request)
    except _Invalid as exc:
        return error(422, "invalid request body", errors=exc.errors)
    except _NotJson:
        return error(400, "the body is not valid JSON")
    except CommandError as exc:
        return error(exc.status, exc.message, errors=exc.errors)
    except MediaError as exc:
        return error(exc.status, str(exc))
    except web.HTTPException as exc:
        return error(exc.status, exc.reason)
    except (RedisError, OSError) as exc:
        log.error("api %s %s: call store unavailable: %s", request.method, request.path, exc)
        return error(503, "the call store is unavailable; retry later")
    except Exception:
        log.exception("api %s %s failed", request.method, request.path)
        return error(500, "internal error")


async def list_calls(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    state = request.query.get("state", "live")
    if state not in ("live", "recent"):
        return error(400, "state must be live or recent")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return error(400, "limit must be an integer")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    ids = await (store.live_calls(limit) if state == "live" else store.recent_calls(limit))
    records = await store.get_many(ids)
    return web.json_response({"calls": [_summary(r) for r in records if r]})


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("call_id", "state", "outcome", "rule", "target", "caller", "dialled", "tenant", "direction",
            "created_at_ms", "answered_at_ms", "ended_at_ms", "end_reason", "fallback", "policy_version")
    return {k: record[k] for k in keep if k in record}


async def get_call(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    call_id = request.match_info["call_id"]
    record = await store.get(call_id)
    if record is None:
        return error(404, f"no call {call_id!r}")
    media = record.pop("media", None)
    record.pop("live_scopes", None)
    context_names = sorted(k.removeprefix("context_") for k in record if k.startswith("context_"))
    for name in context_names:  # long values: fetched one by one from /context/{name}
        record.pop(f"context_{name}")
    return web.json_response({"call": record, "media": media if isinstance(media, dict) else None,
                              "metadata": await store.metadata(call_id), "context": context_names})


async def get_timeline(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    call_id = request.match_info["call_id"]
    if await store.get(call_id) is None:
        return error(404, f"no call {call_id!r}")
    return web.json_response({"call_id": call_id, "events": await store.timeline(call_id)})


async def get_forks(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    call_id = request.match_info["call_id"]
    record = await store.get(call_id)
    if record is None:
        return error(404, f"no call {call_id!r}")
    media = record.get("media") if isinstance(record.get("media"), dict) else {}
    forks = list((media.get("forks") or {}).values()) if isinstance(media.get("forks"), dict) else []
    return web.json_response({"call_id": call_id, "forks": [
        {k: f.get(k) for k in ("fork_id", "target", "direction", "state", "reason", "started_ms", "up_ms")}
        for f in forks if isinstance(f, dict)]})


async def list_recordings(request: web.Request) -> web.Response:
    store = request.config_dict[STORE]
    call_id = request.match_info["call_id"]
    record = await store.get(call_id)
    if record is None:
        return error(404, f"no call {call_id!r}")
    route = request.app.router["get_recording"]
    keep = ("recording_id", "channels", "format", "state", "started_ms", "ended_ms", "duration_ms", "size_bytes",
            "reason")
    out = []
    for rec in _recordings(record).values():
        item = {k: rec[k] for k in keep if rec.get(k) not in (None, "", 0) or k in ("recording_id", "state")}
        item["url"] = str(route.url_for(call_id=call_id, recording_id=rec["recording_id"])) \
            if rec.get("state") == "done" else None
        out.append(item)
    return web.json_response({"call_id": call_id, "recordings": out})


def _recordings(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    media = record.get("media") if isinstance(record.get("media"), dict) else {}
    recordings = media.get("recordings") if isinstance(media.get("recordings"), dict) else {}
    return {k: v for k, v in recordings.items() if isinstance(v, dict) and isinstance(v.get("recording_id"), str)}


async def get_recording(request: web.Request) -> web.StreamResponse:
    """The file: from this controller's recording_dir, or streamed from the node that has it."""
    store = request.config_dict[STORE]
    call_id, recording_id = request.match_info["call_id"], request.match_info["recording_id"]
    record = await store.get(call_id)
    rec = _recordings(record).get(recording_id) if record is not None else None
    if rec is None:
        return error(404, f"no recording {recording_id!r} of call {call_id!r}")
    if rec.get("state") != "done":
        return error(409, f"recording {recording_id} is {rec.get('state')}, not done")
    headers = {"Content-Type": "audio/wav",
               "Content-Disposition": f'attachment; filename="{recording_id}.{rec.get("format", "wav")}"'}
    media = record.get("media") or {}
    if rec.get("location") == "local":
        path = rec.get("path") or ""
        if not await asyncio.to_thread(os.path.isfile, path):
            return error(404, f"recording {recording_id} is not in this controller's recording_dir (share the "
                              "directory between controllers)")
        return web.FileResponse(path, headers=headers)
    control = request.config_dict[CONTROL]
    if not await control.recording_stored(str(media.get("node")), str(rec.get("name"))):
        return error(404, f"recording {recording_id} is no longer on media node {media.get('node')}")
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    await control.recording_file(str(media.get("node")), str(rec.get("name")), response.write)
    await response.write_eof()
    return response


async def get_context(request: web.Request) -> web.Response:
    """A long context value (summary, transcript …) a human's desk fetches by reference."""
    store = request.config_dict[STORE]
    call_id, name = request.match_info["call_id"], request.match_info["name"].lower()
    record = await store.get(call_id)
    value = record.get(f"context_{name}") if record else None
    if value is None:
        return error(404, f"no context {name!r} on call {call_id!r}")
    return web.json_response({"call_id": call_id, "name": name, "value": str(value)})


async def post_action(request: web.Request) -> web.Response:
    body = await _json_body(request, "action_request")
    result = await request.config_dict[CONTROL].execute(request.match_info["call_id"], body["action"],
                                                         request.headers.get("Idempotency-Key"))
    return web.json_response(result.body, status=result.status)


async def post_call(request: web.Request) -> web.Response:
    body = await _json_body(request, "originate_request")
    amd = body.get("amd", False)
    amd_ms = (parse_duration_ms(amd.get("timeout", 5)) if isinstance(amd, dict) else 5000) if amd else 0
    if amd_ms and not 1000 <= amd_ms <= 30_000:
        raise _Invalid([{"path": "amd.timeout", "message": "1 to 30 seconds"}])
    result = await request.config_dict[CONTROL].originate(body["to"], body["agent"], body.get("caller_id"),
                                                           body.get("context"), body.get("trunk"), amd_ms=amd_ms)
    return web.json_response(result, status=201)


async def get_policy(request: web.Request) -> web.Response:
    policy = request.config_dict[POLICIES].policy
    if policy is None:
        return error(503, "no valid policy is loaded")
    source = policy.source
    return web.json_response({
        "version": policy.version, "files": list(source.files), "rules": [r.name for r in source.rules],
        "agents": sorted(source.agents), "destinations": sorted(source.destinations),
        "fork_targets": sorted(source.fork_targets), "warnings": [str(w) for w in policy.warnings]})


async def reload_policy(request: web.Request) -> web.Response:
    outcome = await request.config_dict[POLICIES].reload("api")
    body = {"accepted": outcome.accepted, "version": outcome.version or None, "previous": outcome.previous,
            "issues": [str(i) for i in outcome.issues]}
    if not outcome.accepted:
        return error(422, "the policy on disk is invalid; the last good version keeps serving",
                     errors=[{"path": i.split(": ", 1)[0], "message": i.split(": ", 1)[-1]} for i in body["issues"]],
                     serving=outcome.version or None)
    return web.json_response(body)


async def validate_policy(request: web.Request) -> web.Response:
    body = await _json_body(request, "policy_candidate")
    try:
        candidate = await asyncio.to_thread(policy_from_texts, body["files"])
    except PolicyInvalid as exc:
        return error(422, "the candidate policy is invalid",
                     errors=[{"path": str(i.position), "message": f"{i.path}: {i.message}" if i.path else i.message}
                             for i in exc.issues if i.severity == "error"])
    return web.json_response({"valid": True, "version": candidate.version,
                              "warnings": [str(w) for w in candidate.warnings]})


async def events_socket(request: web.Request) -> web.StreamResponse:
    call_id = request.query.get("call_id") or None
    types = tuple(t.strip() for t in request.query.get("types", "").split(",") if t.strip())
    hub = request.config_dict[HUB]
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    subscription = hub.subscribe(call_id, types)
    try:
        await asyncio.wait_for(hub.connected.wait(), 5)
        await ws.send_json({"type": "subscribed", "call_id": call_id, "types": list(types)})
        reader = asyncio.create_task(ws.receive())
        while not ws.closed:
            getter = asyncio.create_task(subscription.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                getter.cancel()
                message = reader.result()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                reader = asyncio.create_task(ws.receive())  # clients have nothing to say; ignore it
                continue
            event = getter.result()
            if matches(event, call_id, types):
                await ws.send_json(event)
        reader.cancel()
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        hub.unsubscribe(subscription)
        await ws.close()
    return ws


async def list_bans(request: web.Request) -> web.Response:
    bans = await request.config_dict[BANS].active(now_ms())
    return web.json_response({"bans": [b.to_dict() for b in bans]})


def _ban_ip(request: web.Request) -> str:
    try:
        return normalise_ip(request.match_info["ip"])
    except ValueError as exc:
        raise _Invalid([{"path": "ip", "message": str(exc)}]) from None


async def add_ban(request: web.Request) -> web.Response:
    body = await _json_body(request, "ban_request")
    try:
        ip = normalise_ip(body["ip"])
    except ValueError as exc:
        raise _Invalid([{"path": "ip", "message": str(exc)}]) from None
    seconds = parse_duration_ms(body["for"]) // 1000
    if seconds > MAX_BAN_S:
        raise _Invalid([{"path": "for", "message": f"at most {MAX_BAN_S // 86400} days ({MAX_BAN_S} s)"}])
    try:
        ban = await request.config_dict[BANS].add(ip, seconds, body.get("reason") or "banned through the API",
                                                  origin="api", detector="manual", now_ms=now_ms(),
                                                  by=request.get("token"))
    except BanRefused as exc:
        return error(422, str(exc))
    return web.json_response({"ban": ban.to_dict()}, status=201)


async def get_ban(request: web.Request) -> web.Response:
    ip = _ban_ip(request)
    ban = await request.config_dict[BANS].get(ip)
    if ban is None or ban.expires_ms <= now_ms():
        return error(404, f"{ip} is not banned")
    return web.json_response({"ban": ban.to_dict()})


async def remove_ban(request: web.Request) -> web.Response:
    ip = _ban_ip(request)
    removed = await request.config_dict[BANS].remove(ip)
    return web.json_response({"ip": ip, "removed": removed})


async def admin_status(request: web.Request) -> web.Response:
    return web.json_response(request.config_dict[ADMIN].status())


async def admin_drain(request: web.Request) -> web.Response:
    body = await _json_body(request, "drain_request")
    lifecycle = request.config_dict[ADMIN]
    instance = lifecycle.status()["instance"]
    if body["instance"] != instance:
        return error(409, f"this is controller {instance!r}, not {body['instance']!r}: nothing drained")
    lifecycle.drain("api")
    return web.json_response({"instance": instance, "state": lifecycle.state}, status=202)


async def create_phone_token(request: web.Request) -> web.Response:
    body = await _json_body(request, "phone_token_request")
    secret, max_ttl_s, page_url = request.config_dict[PHONE]
    if not secret:
        return error(503, "phone tokens are not set up: set phone_token_secret (and the edge's PHONE_SECRET)")
    token, expires = make_token(secret, body["to"], min(body.get("ttl_s", max_ttl_s), max_ttl_s))
    url = page_url or f"{request.scheme}://{request.host}/phone"
    return web.json_response({"token": token, "to": body["to"], "expires_at": expires, "url": f"{url}#token={token}"},
                             status=201)


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


def api_app(tokens: list[str]) -> web.Application:
    """The /v1 sub-application. Its services (CONTROL, HUB, STORE, POLICIES, BANS) are set on the
    parent application when it starts; handlers find them through `config_dict`."""
    app = web.Application(middlewares=[_errors, auth_middleware(parse_tokens(tokens), _scope)])
    handlers = {
        "list_calls": list_calls, "get_call": get_call, "get_timeline": get_timeline, "get_forks": get_forks,
        "get_context": get_context, "list_recordings": list_recordings, "get_recording": get_recording,
        "post_action": post_action, "post_call": post_call, "get_policy": get_policy,
        "reload_policy": reload_policy, "validate_policy": validate_policy, "events": events_socket,
        "openapi": get_openapi, "list_bans": list_bans, "add_ban": add_ban, "get_ban": get_ban,
        "remove_ban": remove_ban, "admin_status": admin_status, "admin_drain": admin_drain,
        "create_phone_token": create_phone_token,
    }
    for method, path, name, _scope_name in openapi.ROUTES:
        app.router.add_route(method, path, handlers[name], name=name)
    return app
