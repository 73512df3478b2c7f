"""Live-call control as a service: action documents (the same verbs as policies) carried out
on a call through the media plane, with names resolved against the serving policy, and
idempotency keys so a retried command is not carried out twice."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from jsonschema import Draft202012Validator

from controller.actions import canonical_live_action, live_action_schema
from controller.media.plane import Endpoint, MediaError, MediaPlane
from controller.schema_errors import describe
from controller.state.calls import CallStore

IDEMPOTENCY_TTL_S = 24 * 3600
_LIVE_ACTION = Draft202012Validator(live_action_schema())


class CommandError(Exception):
    """A command that cannot be carried out: HTTP-like status, message, per-path errors."""

    def __init__(self, status: int, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []


def validate_action(document: Any, path: str = "action") -> dict[str, Any]:
    """A live action document, or CommandError 422 listing every problem with its path."""
    errors = []
    for error in _LIVE_ACTION.iter_errors(document):
        for sub_path, message, _ in describe(error):
            errors.append({"path": ".".join([path, *map(str, sub_path)]), "message": message})
    if errors:
        raise CommandError(422, "invalid action", errors)
    return document


@dataclass(frozen=True, slots=True)
class CommandResult:
    status: int
    body: dict[str, Any]


class CallControl:
    def __init__(self, plane: MediaPlane, store: CallStore, current_policy: Callable[[], Any],
                 outbound_trunk: str = ""):
        self.plane = plane
        self.outbound_trunk = outbound_trunk  # host[:port] numbers are dialled at (through the edge)
        self.store = store
        self._policy = current_policy

    async def execute(self, call_id: str, action: dict[str, Any], idempotency_key: str | None = None) -> CommandResult:
        validate_action(action)
        if idempotency_key:
            stored = await self._idempotent(call_id, idempotency_key)
            if stored is not None:
                return stored
        try:
            await self._check_live(call_id)
            result = CommandResult(200, {"call_id": call_id, **await self._run(call_id, action)})
        except MediaError as exc:
            result = CommandResult(exc.status, {"error": {"status": exc.status, "message": str(exc)}})
        except CommandError as exc:
            result = CommandResult(exc.status, {"error": {"status": exc.status, "message": exc.message,
                                                           "errors": exc.errors}})
        if idempotency_key:
            await self.store.remember_command(call_id, idempotency_key,
                                              json.dumps({"status": result.status, "body": result.body}),
                                              IDEMPOTENCY_TTL_S)
        return result

    async def _check_live(self, call_id: str) -> None:
        """404 for a call we never saw, 409 (with why) for one that is over."""
        record = await self.store.get(call_id)
        if record is None:
            raise CommandError(404, f"no call {call_id!r}")
        if record.get("state") in ("ended", "failed"):
            why = record.get("end_reason") or record.get("state")
            raise CommandError(409, f"call {call_id!r} has ended ({why})")

    async def _idempotent(self, call_id: str, key: str) -> CommandResult | None:
        if len(key) > 128 or not key.isprintable():
            raise CommandError(400, "Idempotency-Key must be printable and at most 128 characters")
        claimed, previous = await self.store.claim_command(call_id, key, IDEMPOTENCY_TTL_S)
        if claimed:
            return None
        if previous == "pending":
            raise CommandError(409, "a command with this Idempotency-Key is still being carried out")
        try:
            stored = json.loads(previous)
            return CommandResult(int(stored["status"]), stored["body"])
        except (ValueError, KeyError, TypeError):
            raise CommandError(409, "a command with this Idempotency-Key was already received") from None

    def _names(self, section: str, name: str) -> Any:
        policy = self._policy()
        declared = getattr(policy.source, section).get(name) if policy else None
        if declared is None:
            noun = {"agents": "agent", "destinations": "destination", "fork_targets": "fork target"}[section]
            raise CommandError(422, f"unknown {noun} {name!r} in the serving policy",
                               [{"path": "action", "message": f"unknown {noun} {name!r}"}])
        return declared

    async def _context(self, call_id: str, extra: dict[str, str] | None) -> dict[str, str]:
        """Context for a human: what set_metadata stored on the call, then this command's."""
        return {**await self.store.metadata(call_id), **(extra or {})}

    async def _run(self, call_id: str, action: dict[str, Any]) -> dict[str, Any]:
        verb, arg = canonical_live_action(action)
        plane = self.plane
        if verb == "route_agent":
            self._names("agents", arg["agent"])
            return {"action": verb, "result": await plane.transfer(call_id, arg["agent"])}
        if verb in ("route_sip", "add_human"):
            destination = self._names("destinations", arg["destination"])
            mode = "handoff" if verb == "route_sip" else arg.get("mode", "conference")
            context = await self._context(call_id, arg.get("context"))
            leg = await plane.add_human(call_id, destination.name, destination.uris[0], mode=mode, context=context)
            return {"action": verb, "result": leg}
        if verb == "fork":
            target = self._names("fork_targets", arg["target"])
            endpoint = Endpoint(target.name, target.endpoint, target.transport, target.codec)
            return {"action": verb,
                    "result": await plane.start_fork(call_id, endpoint, arg.get("direction", target.direction))}
        if verb == "stop_fork":
            await plane.stop_fork(call_id, arg["fork_id"])
            return {"action": verb, "result": {"fork_id": arg["fork_id"], "state": "gone"}}
        if verb == "play":
            return {"action": verb, "result": await plane.play(call_id, arg["media"])}
        if verb == "hangup":
            await plane.hangup(call_id)
            return {"action": verb, "result": {"state": "ended"}}
        if verb == "set_metadata":
            await self.store.merge_metadata(call_id, {k: str(v) for k, v in arg.items()})
            return {"action": verb, "result": {"metadata": sorted(arg)}}
        raise CommandError(422, f"unknown action {verb!r}")  # unreachable after validation

    async def originate(self, to: str, agent: str, caller_id: str | None = None,
                        context: dict[str, str] | None = None) -> dict[str, Any]:
        """An outbound call to a number or SIP URI, through the edge, with an AI agent on it."""
        endpoint = self._names("agents", agent)
        call_id = f"{uuid.uuid4()}@callfabric"
        target = to if to.startswith(("sip:", "sips:")) else None
        if target is None:
            if not to.lstrip("+").isdigit() or len(to) > 32:
                raise CommandError(422, "`to` must be a phone number or a sip: URI",
                                   [{"path": "to", "message": "expected a phone number or a sip: URI"}])
            if not self.outbound_trunk:
                raise CommandError(422, "no outbound trunk is configured (setting outbound_trunk): give a sip: URI",
                                   [{"path": "to", "message": "a phone number needs the outbound_trunk setting"}])
            target = f"sip:{to}@{self.outbound_trunk}"
        if any(c in target for c in " <>\"\r\n\x00") or len(target) > 256:
            raise CommandError(422, "`to` is not a valid SIP URI", [{"path": "to", "message": "invalid SIP URI"}])
        return await self.plane.originate(call_id, target, Endpoint(endpoint.name, endpoint.endpoint,
                                                                     endpoint.transport, endpoint.codec),
                                          caller_id=caller_id, context=context or {})
