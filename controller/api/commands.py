"""Live-call control as a service: action documents (the same verbs as policies) carried out
on a call through the media plane, with names resolved against the serving policy, and
idempotency keys so a retried command is not carried out twice. Any controller takes a
command for any call: one whose media node another controller owns is carried out by that
owner (forwarded through the node's inbox in Redis)."""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from controller.actions import canonical_action, header_name_problem, live_action_schema, parse_duration_ms
from controller.json_schema import SchemaValidator
from controller.media.feature import MediaNodeError
from controller.media.plane import Endpoint, MediaError, MediaPlane
from controller.metrics import Metrics
from controller.policy.gathered import branch_actions, media_action_problems
from controller.schema_errors import describe
from controller.state.calls import CallStore, now_ms
from controller.state.inbox import InboxTimeout, NodeInbox
from controller.state.leases import NodeLeases

log = logging.getLogger("callfabric.api.commands")

IDEMPOTENCY_TTL_S = 24 * 3600
GATHER_WEBHOOK_TIMEOUT_S = 5.0
_LIVE_ACTION = SchemaValidator(live_action_schema())
_WEBHOOK_ANSWER = SchemaValidator({
    "type": "object", "required": ["actions"], "additionalProperties": False,
    "properties": {"actions": {"type": "array", "maxItems": 16, "items": live_action_schema()}},
})


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
    if not errors:
        verb, arg = canonical_action(document)
        errors = [{"path": ".".join([path, verb, *map(str, sub_path)]), "message": message}
                  for sub_path, message in media_action_problems(verb, arg)]
    if errors:
        raise CommandError(422, "invalid action", errors)
    return document


@dataclass(frozen=True, slots=True)
class CommandResult:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Forwarding:
    """How to reach the owner of a media node: who holds its lease, and its inbox."""

    leases: NodeLeases
    inbox: NodeInbox
    metrics: Metrics
    timeout_s: float = 10.0


class CallControl:
    def __init__(self, plane: MediaPlane, store: CallStore, current_policy: Callable[[], Any],
                 outbound_trunk: str = "", forwarding: Forwarding | None = None,
                 ask_webhook: Callable[[str, dict[str, Any], float], Awaitable[tuple[str, Any]]] | None = None):
        self.plane = plane
        self.outbound_trunk = outbound_trunk  # the policy's trunk numbers are called through by default
        self.store = store
        self._policy = current_policy
        self.forwarding = forwarding
        self._ask_webhook = ask_webhook
        plane.on_gathered = self.gathered
        plane.on_connected = self.connected

    async def execute(self, call_id: str, action: dict[str, Any], idempotency_key: str | None = None) -> CommandResult:
        validate_action(action)
        if idempotency_key:
            stored = await self._idempotent(call_id, idempotency_key)
            if stored is not None:
                return stored
        try:
            record = await self._check_live(call_id)
            forwarded = await self._forward(_media_node(record), {"kind": "action", "call_id": call_id,
                                                                  "action": action}) \
                if call_id not in self.plane.calls else None
            result = forwarded or CommandResult(200, {"call_id": call_id, **await self._run(call_id, action)})
        except MediaError as exc:
            result = CommandResult(exc.status, {"error": {"status": exc.status, "message": str(exc), **exc.detail}})
        except MediaNodeError as exc:  # a media node's refusal the media plane passed on as is (e.g. play)
            result = CommandResult(502, {"error": {"status": 502, "message": str(exc)}})
        except CommandError as exc:
            result = CommandResult(exc.status, {"error": {"status": exc.status, "message": exc.message,
                                                           "errors": exc.errors}})
        if idempotency_key:
            await self.store.remember_command(call_id, idempotency_key,
                                              json.dumps({"status": result.status, "body": result.body}),
                                              IDEMPOTENCY_TTL_S)
        return result

    async def _check_live(self, call_id: str) -> dict[str, Any]:
        """The call's record; 404 for a call we never saw, 409 (with why) for one that is over."""
        record = await self.store.get(call_id)
        if record is None:
            raise CommandError(404, f"no call {call_id!r}")
        if record.get("state") in ("ended", "failed"):
            why = record.get("end_reason") or record.get("state")
            raise CommandError(409, f"call {call_id!r} has ended ({why})")
        return record

    async def _forward(self, node: str | None, request: dict[str, Any]) -> CommandResult | None:
        """Have the owner of `node` carry out `request`; None when this controller is the owner
        (or there is no media node yet): then it is carried out here."""
        forwarding = self.forwarding
        if forwarding is None or node is None:
            return None
        holder = await forwarding.leases.holder(node)
        if holder is None:
            forwarding.metrics.commands_forwarded.labels("no-owner").inc()
            raise MediaError(f"media node {node} has no controller right now; retry", 503)
        if holder.instance == forwarding.leases.instance:
            return None
        try:
            answer = await forwarding.inbox.ask(node, request, forwarding.timeout_s)
        except InboxTimeout as exc:
            forwarding.metrics.commands_forwarded.labels("timeout").inc()
            raise MediaError(f"{exc}; retry", 503) from None
        forwarding.metrics.commands_forwarded.labels("answered").inc()
        status, body = answer.get("status"), answer.get("body")
        if not isinstance(status, int) or not isinstance(body, dict):
            raise MediaError(f"the owner of media node {node} answered garbage", 502)
        return CommandResult(status, body)

    async def run_forwarded(self, request: dict[str, Any]) -> dict[str, Any]:
        """A command another controller took for a call on a media node this one owns (a
        message from Redis: checked like any input)."""
        try:
            if request.get("kind") == "originate":
                agent = self._names("agents", str(request.get("agent")))
                body = await self.plane.call.originate(
                    str(request.get("call_id")), str(request.get("uri")),
                    Endpoint(agent.name, agent.endpoint, agent.transport, agent.codec),
                    caller_id=request.get("caller_id") if isinstance(request.get("caller_id"), str) else None,
                    context=request.get("context") if isinstance(request.get("context"), dict) else {},
                    amd_ms=request["amd_ms"] if isinstance(request.get("amd_ms"), int) else 0)
                return {"status": 201, "body": body}
            call_id = request.get("call_id")
            if not isinstance(call_id, str):
                raise CommandError(400, "a forwarded command without a call id")
            validate_action(request.get("action"))
            if call_id not in self.plane.calls:
                raise MediaError(f"call {call_id!r} is not handled by this controller (any more); retry", 503)
            return {"status": 200, "body": {"call_id": call_id, **await self._run(call_id, request["action"])}}
        except MediaError as exc:
            return {"status": exc.status, "body": {"error": {"status": exc.status, "message": str(exc), **exc.detail}}}
        except MediaNodeError as exc:
            return {"status": 502, "body": {"error": {"status": 502, "message": str(exc)}}}
        except CommandError as exc:
            return {"status": exc.status, "body": {"error": {"status": exc.status, "message": exc.message,
                                                             "errors": exc.errors}}}

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

    def _outbound_trunk(self, name: str | None) -> Any:
        """The trunk a number is called through: the request's, else the outbound_trunk
        setting, else the policy's only outbound trunk."""
        policy = self._policy()
        declared = {n: t for n, t in policy.source.trunks.items() if t.outbound is not None} if policy else {}
        where = "trunk" if name else "to"
        name = name or self.outbound_trunk or (next(iter(declared)) if len(declared) == 1 else None)
        if name is None:
            why = ("the serving policy declares no outbound trunk" if not declared else
                   f"the serving policy has several outbound trunks ({', '.join(sorted(declared))}): name one in "
                   "`trunk` (or the outbound_trunk setting)")
            raise CommandError(422, f"cannot call a phone number: {why}", [{"path": where, "message": why}])
        if name not in declared:
            raise CommandError(422, f"unknown outbound trunk {name!r} in the serving policy",
                               [{"path": where, "message": f"unknown outbound trunk {name!r}"}])
        return declared[name]

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
        verb, arg = canonical_action(action)
        plane = self.plane
        if verb == "route_agent":
            self._names("agents", arg["agent"])
            return {"action": verb, "result": await plane.call.transfer(call_id, arg["agent"])}
        if verb in ("route_sip", "add_human"):
            destination = self._names("destinations", arg["destination"])
            mode = "handoff" if verb == "route_sip" else arg.get("mode", "conference")
            context = await self._context(call_id, arg.get("context"))
            leg = await plane.humans.add(call_id, destination.name, destination.dial_uri(), mode=mode, context=context,
                                         caller_id=arg.get("caller_id") or destination.caller_id)
            return {"action": verb, "result": leg}
        if verb == "fork":
            target = self._names("fork_targets", arg["target"])
            endpoint = Endpoint(target.name, target.endpoint, target.transport, target.codec)
            return {"action": verb,
                    "result": await plane.forks.start(call_id, endpoint, arg.get("direction", target.direction))}
        if verb == "stop_fork":
            await plane.forks.stop(call_id, arg["fork_id"])
            return {"action": verb, "result": {"fork_id": arg["fork_id"], "state": "gone"}}
        if verb == "play":
            return {"action": verb, "result": await plane.playback.play(call_id, arg["media"])}
        if verb == "hangup":
            await plane.call.hangup(call_id)
            return {"action": verb, "result": {"state": "ended"}}
        if verb == "set_metadata":
            await self.store.merge_metadata(call_id, {k: str(v) for k, v in arg.items()})
            return {"action": verb, "result": {"metadata": sorted(arg)}}
        if verb == "send_dtmf":
            return {"action": verb, "result": await plane.dtmf.send(
                call_id, arg["digits"], to=arg.get("to", "caller"), duration_ms=arg.get("duration_ms", 100),
                between_ms=arg.get("between_ms", 100))}
        if verb in ("gather", "record"):
            self._check_declared(verb, arg)
        if verb == "gather":
            return {"action": verb, "result": await plane.dtmf.gather(
                call_id, leg=arg.get("leg", "caller"), max_digits=arg.get("max_digits", 32),
                finish_key=arg.get("finish_key", "#"), timeout_ms=parse_duration_ms(arg.get("timeout", "5s")),
                prompt=arg.get("prompt", ""), then=arg.get("then"), webhook=arg.get("webhook", ""))}
        if verb == "record":
            max_s = parse_duration_ms(arg["max_duration"]) // 1000 if "max_duration" in arg else 0
            return {"action": verb, "result": await plane.recording.start(
                call_id, arg.get("channels", "both"), beep=arg.get("beep", False),
                announcement=arg.get("announcement", ""), max_duration_s=max_s)}
        if verb == "transfer":
            uri = self._target_uri(arg["to"], arg.get("trunk"), "action.transfer.to")
            headers = arg.get("headers") or {}
            problems = [{"path": f"action.transfer.headers.{name}", "message": problem}
                        for name in headers if (problem := header_name_problem(name))]
            if problems:
                raise CommandError(422, "invalid action", problems)
            if arg.get("method", "refer") == "bridge":
                leg = await plane.humans.add(call_id, uri, uri, mode="handoff", context=headers)
                return {"action": verb, "result": {"method": "bridge", "to": uri, **leg}}
            return {"action": verb, "result": await plane.refer.start(call_id, uri, headers=headers,
                                                                     fallback=arg.get("fallback", True))}
        if verb == "stop_record":
            return {"action": verb, "result": await plane.recording.stop(call_id, arg.get("recording_id"))}
        raise CommandError(422, f"unknown action {verb!r}")  # unreachable after validation

    async def recording_stored(self, node: str, name: str) -> bool:
        """Whether the media node still has this stored recording."""
        return await self.plane.recording.stored(node, name)

    async def recording_file(self, node: str, name: str, sink: Callable[[bytes], Awaitable[None]]) -> int:
        """A recording kept on its media node, streamed to `sink`."""
        return await self.plane.recording.download(node, name, sink)

    def _target_uri(self, to: str, trunk: str | None, path: str) -> str:
        """The SIP URI a call or a transfer goes to: a sip: URI as it is, a phone number
        through an outbound trunk."""
        target = to if to.startswith(("sip:", "sips:")) else None
        if target is None:
            if not to.lstrip("+").isdigit() or len(to) > 32:
                raise CommandError(422, f"`{path}` must be a phone number or a sip: URI",
                                   [{"path": path, "message": "expected a phone number or a sip: URI"}])
            policy = self._policy()
            target = self._outbound_trunk(trunk).dial_uri(policy.source.settings.numbering.normalise(to))
        elif trunk is not None:
            raise CommandError(422, "`trunk` is for phone numbers: a sip: URI is called as it is",
                               [{"path": "trunk", "message": f"only with a phone number in `{path}`"}])
        if any(c in target for c in " <>\"\r\n\x00") or len(target) > 256:
            raise CommandError(422, f"`{path}` is not a valid SIP URI", [{"path": path, "message": "invalid SIP URI"}])
        return target

    def _check_declared(self, verb: str, arg: dict[str, Any]) -> None:
        """A gather's branches name what the serving policy declares."""
        policy = self._policy()
        names = {section: getattr(policy.source, section) if policy else {}
                 for section in ("agents", "destinations", "fork_targets")}
        problems = media_action_problems(verb, arg, names)
        if problems:
            raise CommandError(422, "invalid action", [{"path": ".".join(["action", verb, *map(str, p)]),
                                                        "message": m} for p, m in problems])

    async def connected(self, call_id: str, actions: list[dict[str, Any]]) -> None:
        """The call is connected to its agent: its decision's media actions (record, gather)."""
        await self._run_all(call_id, actions, "on_answer_failed", {})

    async def _run_all(self, call_id: str, actions: list[dict[str, Any]], failed: str, detail: dict[str, Any]) -> None:
        """Carry out actions in order; each one's failure is recorded on the call's timeline
        (event `failed`) and does not stop the next one."""
        for i, action in enumerate(actions):
            try:
                await self._run(call_id, validate_action(action, f"actions.{i}"))
            except (MediaError, CommandError, MediaNodeError) as exc:
                why = str(exc)
                if isinstance(exc, CommandError) and exc.errors:
                    why += "".join(f"; {e['path']}: {e['message']}" for e in exc.errors)
                log.warning("call %s: action %d (%s) failed: %s", call_id, i, failed, why)
                await self.store.append_event(call_id, {"event": failed, "ts": now_ms(), **detail, "action": i,
                                                        "reason": why})

    async def gathered(self, call_id: str, result: dict[str, Any]) -> None:
        """A gather ended: carry out its branch's actions, or ask its webhook for them. Each
        action's failure is recorded on the call's timeline and does not stop the next one."""
        if result.get("webhook"):
            actions = await self._ask_gather_webhook(call_id, result)
        else:
            actions = branch_actions(result.get("then") or [], result.get("digits", ""), result.get("reason", ""))
        await self._run_all(call_id, actions or [], "gather_action_failed", {"gather": result.get("gather_id")})

    async def _ask_gather_webhook(self, call_id: str, result: dict[str, Any]) -> list[dict[str, Any]]:
        if self._ask_webhook is None:
            return []
        payload = {"type": "gather.completed", "call_id": call_id, "ts": now_ms(),
                   "data": {k: result[k] for k in ("gather_id", "leg", "digits", "reason")}}
        outcome, answer = await self._ask_webhook(result["webhook"], payload, GATHER_WEBHOOK_TIMEOUT_S)
        problems = [] if outcome != "ok" else [m for e in _WEBHOOK_ANSWER.iter_errors(answer) for _, m, _ in describe(e)]
        if outcome != "ok" or problems:
            why = outcome if outcome != "ok" else f"invalid answer: {problems[0]}"
            await self.store.append_event(call_id, {"event": "gather_webhook_failed", "ts": now_ms(),
                                                    "gather": result.get("gather_id"), "reason": why})
            return []
        return answer["actions"]

    async def originate(self, to: str, agent: str, caller_id: str | None = None,
                        context: dict[str, str] | None = None, trunk: str | None = None,
                        amd_ms: int = 0) -> dict[str, Any]:
        """An outbound call to a number (through an outbound trunk) or a SIP URI, through the
        edge, with an AI agent on it (after answering-machine detection, with `amd_ms`)."""
        endpoint = self._names("agents", agent)
        call_id = f"{uuid.uuid4()}@callfabric"
        target = self._target_uri(to, trunk, "to")
        try:
            return await self.plane.call.originate(call_id, target, Endpoint(endpoint.name, endpoint.endpoint,
                                                                         endpoint.transport, endpoint.codec),
                                              caller_id=caller_id, context=context or {}, amd_ms=amd_ms)
        except MediaError as exc:
            if exc.status != 503:  # 503: no media node here; another controller may own one
                raise
        request = {"kind": "originate", "call_id": call_id, "uri": target, "agent": agent, "caller_id": caller_id,
                   "context": context or {}, "amd_ms": amd_ms}
        for node in self.plane.nodes:
            try:
                forwarded = await self._forward(node, request)
            except MediaError:  # this node has no owner right now: try the next
                continue
            if forwarded is not None:
                if forwarded.status != 201:
                    raise CommandError(forwarded.status, str(forwarded.body.get("error", {}).get("message", "failed")))
                return forwarded.body
        raise MediaError("no media node is connected to any controller", 503)


def _media_node(record: dict[str, Any]) -> str | None:
    media = record.get("media")
    node = media.get("node") if isinstance(media, dict) else None
    return node if isinstance(node, str) and node else None
