"""What the controller does for each edge event: decide a new call (policy → call store →
answer), and follow the call's dialog to its end. Never raises on input: a request it cannot
decide gets the edge's fallback, and the reason is counted."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from controller.edge import protocol
from controller.metrics import Metrics
from controller.policy import Decision
from controller.policy.answers import AnswerInvalid, decision_from_answer
from controller.security.guard import SecurityGuard
from controller.state.batch import raise_errors
from controller.state.calls import CallStore, CounterRequest, now_ms

log = logging.getLogger("callfabric.edge")

_DIALOG_STATE = {"confirmed": "answered", "ended": "ended", "failed": "failed"}
# Redis unreachable: `open` decides with the policy (counters read as 0, the record queued),
# `closed` answers 503 + Retry-After, `edge` asks the edge for its own fallback.
STATE_UNAVAILABLE_MODES = ("open", "closed", "edge")


def _target(decision: Decision) -> str:
    if decision.outcome == "agent":
        return decision.agent.name
    if decision.outcome == "sip":
        return decision.destination.name
    if decision.outcome == "reject":
        return str(decision.reject_code)
    return decision.webhook.url if decision.webhook else ""


class EdgeDecisions:
    def __init__(self, current_policy: Callable[[], Any], store: CallStore, metrics: Metrics, instance_id: str, *,
                 ask_webhook: Callable[[str, dict, float], Awaitable[tuple[str, Any]]] | None = None,
                 decision_budget_ms: int = 200, security: SecurityGuard | None = None,
                 state_unavailable: str = "edge"):
        if state_unavailable not in STATE_UNAVAILABLE_MODES:
            raise ValueError(f"state_unavailable must be one of {', '.join(STATE_UNAVAILABLE_MODES)}")
        self.state_unavailable = state_unavailable
        self._policy = current_policy
        self.store = store
        self.metrics = metrics
        self.instance_id = instance_id
        self._ask_webhook = ask_webhook
        self.security = security
        # The edge falls back when its budget runs out: a decision webhook must answer before.
        self.webhook_budget_s = max(0.02, (decision_budget_ms - 40) / 1000)
        self._deciding: dict[str, asyncio.Event] = {}  # call id -> set when its record is written

    async def decide(self, message: dict[str, Any], received: float) -> dict[str, Any] | None:
        """The answer to a decide event (None when it cannot be matched to a transaction)."""
        try:
            request = protocol.parse_decide(message)
        except protocol.BadRequest as exc:
            self.metrics.decision_errors.labels("bad-request").inc()
            log.warning("unanswerable decide request: %s", exc)
            tx = message.get("tx")
            return protocol.fallback_answer(tx, "bad-request") if isinstance(tx, str) and protocol._TX.match(tx) else None
        policy = self._policy()
        if policy is None:
            self.metrics.decision_errors.labels("no-policy").inc()
            return protocol.fallback_answer(request.tx, "no-policy")
        call_id = request.call.call_id
        if not self.store.available and self.state_unavailable != "open":
            return self._without_state(request.tx)
        written = self._deciding.setdefault(call_id, asyncio.Event())
        try:
            return await self._decide(request, policy, received)
        except RedisError as exc:
            self.metrics.redis_errors.labels("create").inc()
            self.metrics.decision_errors.labels("redis").inc()
            log.error("call %s: call store unavailable (%s): %s", call_id, exc,
                      "503" if self.state_unavailable == "closed" else "edge fallback")
            return self._without_state(request.tx)
        except Exception:  # a bug must cost one call its decision, never the controller
            self.metrics.decision_errors.labels("internal").inc()
            log.exception("call %s: decision failed", call_id)
            return protocol.fallback_answer(request.tx, "internal")
        finally:
            written.set()
            self._deciding.pop(call_id, None)

    async def _decide(self, request: protocol.DecideRequest, policy: Any, received: float) -> dict[str, Any]:
        call = request.call
        at_ms = now_ms()
        facts = policy.compiled.facts(call)
        specs = policy.counter_specs
        counters = [CounterRequest(s.key, s.kind, s.scope, facts.scope_value(s.scope), s.window_s) for s in specs]
        security = policy.compiled.security
        if security is not None:
            counters += SecurityGuard.counters(policy, facts)
        timeline_extra: dict[str, Any] = {}
        if not self.store.available:
            timeline_extra["state"] = "unavailable"
        elif counters:
            try:
                facts.counters = await self.store.read_counters(counters, at_ms)
            except RedisConnectionError:
                if self.state_unavailable != "open":
                    raise
                timeline_extra["state"] = "unavailable"
        if timeline_extra:  # fail-open: the policy decides without counters; the record waits for Redis
            self.metrics.decisions_without_state.labels("open").inc()
        decision = policy.compiled.decide_facts(facts)
        carried = decision
        if decision.outcome == "webhook":
            carried, timeline_extra["webhook"] = await self._webhook_decision(policy, decision, request, facts)
            if security is not None:
                carried = security.cap(carried if carried.risk else replace(carried, risk=decision.risk))
        internal = [("X-Callfabric-Policy", policy.version), ("X-Callfabric-Rule", carried.rule)]
        if carried.outcome == "agent":
            internal.insert(0, ("X-Callfabric-Agent", carried.agent.name))
        answer, dropped = protocol.answer_for(request.tx, carried, internal)
        if dropped:
            timeline_extra["headers_dropped"] = dropped
        decide_ms = round((time.perf_counter() - received) * 1000, 3)
        rejected = carried.outcome == "reject"
        record = {
            "state": "failed" if rejected else "routing",
            "outcome": carried.outcome, "rule": carried.rule, "applied_rules": list(carried.applied_rules),
            "target": _target(carried), "policy_version": policy.version, "decision": carried.to_dict(),
            "from_uri": request.from_uri, "to_uri": request.to_uri, "ruri": request.ruri,
            "caller": facts.caller, "callee": facts.callee, "dialled": facts.ruri,
            "src": f"{call.src_ip}:{call.src_port}", "transport": call.transport, "tenant": facts.tenant,
            "user_agent": request.user_agent, "tx": request.tx, "created_at_ms": at_ms,
            "controller": self.instance_id,
            "end_reason": "rejected" if rejected else None, "end_code": carried.reject_code if rejected else None,
            "ended_at_ms": at_ms if rejected else None,
        }
        live_scopes = {c.scope: c.value for c in counters if c.kind == "live" and c.scope != "global" and c.value}
        if facts.tenant:
            live_scopes["tenant"] = facts.tenant
        event = {"event": "decided", "ts": at_ms, "outcome": carried.outcome, "rule": carried.rule,
                 "target": record["target"], "policy_version": policy.version, "decide_ms": decide_ms,
                 "counters": dict(facts.counters) if counters else None, "controller": self.instance_id,
                 **timeline_extra}
        if carried.risk is not None:
            event["risk"] = carried.risk.to_dict()
        # The record is in Redis's socket before the answer leaves (and ahead of anything
        # later about this call); its acknowledgement is checked without holding the call.
        written = await self.store.send_create(call.call_id, record, live_scopes=live_scopes,
                                               window_counters=[c for c in counters if c.kind != "live"],
                                               at_ms=at_ms, event=event, hold=self.state_unavailable == "open")
        written.add_done_callback(functools.partial(self._record_written, call.call_id))
        self.metrics.decisions.labels(carried.outcome, carried.rule).inc()
        if carried.risk is not None and self.security is not None:
            self.security.decided(carried, facts, call.call_id)
        return answer

    async def _webhook_decision(self, policy: Any, asked: Decision, request: protocol.DecideRequest,
                                facts: Any) -> tuple[Decision, dict[str, Any]]:
        """Ask the application (call.initiated); its answer decides, or the rule's fallback
        does when it is slow, down, or answers something invalid."""
        webhook = asked.webhook
        timeout_s = min(webhook.timeout_ms / 1000, self.webhook_budget_s)
        call = request.call
        payload = {"type": "call.initiated", "call_id": call.call_id, "ts": now_ms(), "data": {
            "from": facts.caller, "to": facts.callee, "dialled": facts.ruri, "from_uri": request.from_uri,
            "source": f"{call.src_ip}:{call.src_port}", "transport": call.transport, "tenant": facts.tenant,
            "headers": dict(call.headers), "rule": asked.rule, "policy_version": policy.version,
            "answer": "reply with {\"actions\": [...]}: the same actions as policy rules"}}
        if self._ask_webhook is None:
            result, answer = "error", None
        else:
            result, answer = await self._ask_webhook(webhook.url, payload, timeout_s)
        detail: dict[str, Any] = {"url": webhook.url, "result": result, "timeout_ms": round(timeout_s * 1000)}
        if result == "ok":
            try:
                decision = decision_from_answer(policy.source, asked, answer)
            except AnswerInvalid as exc:
                result = "invalid"
                detail.update(result=result, errors=[f"{path}: {message}" for path, message in exc.errors][:10])
            else:
                self.metrics.webhook_decisions.labels("answered").inc()
                return decision, {**detail, "result": "answered", "applied": "answer"}
        self.metrics.webhook_decisions.labels(result).inc()
        log.warning("call %s: decision webhook %s (%s): fallback applies", call.call_id, webhook.url, result)
        return webhook.fallback, {**detail, "applied": "fallback"}

    def _without_state(self, tx: str) -> dict[str, Any]:
        """The answer when Redis cannot take the call (closed: 503 here; else the edge's fallback)."""
        mode = "closed" if self.state_unavailable == "closed" else "edge"
        self.metrics.decisions_without_state.labels(mode).inc()
        return protocol.unavailable_answer(tx) if mode == "closed" else protocol.fallback_answer(tx, "state-unavailable")

    def _record_written(self, call_id: str, replies: asyncio.Future) -> None:
        try:
            raise_errors(replies.result())
        except RedisError as exc:
            self.metrics.redis_errors.labels("create").inc()
            log.error("call %s: Redis did not store its record (its dialog events will): %s", call_id, exc)

    async def edge_ban(self, message: dict[str, Any]) -> None:
        """Kamailio banned a source by itself (flood, scanner, sweep): record it with the
        controller's bans so operators see and manage every ban in one place."""
        try:
            ban = protocol.parse_ban(message)
        except protocol.BadRequest as exc:
            self.metrics.decision_errors.labels("bad-ban-event").inc()
            log.warning("ignored ban event: %s", exc)
            return
        if self.security is not None:
            await self.security.edge_ban(ban.ip, ban.seconds, ban.reason, ban.detail)

    async def dialog(self, message: dict[str, Any]) -> None:
        """Follow a call's dialog: answered, ended, failed (a call the controller never
        decided, e.g. one the edge routed by fallback, is recorded by its first event)."""
        try:
            event = protocol.parse_dialog(message, now_ms())
        except protocol.BadRequest as exc:
            self.metrics.decision_errors.labels("bad-dialog-event").inc()
            log.warning("ignored dialog event: %s", exc)
            return
        pending = self._deciding.get(event.call_id)
        if pending is not None:  # its decision is still being written: keep the order
            await pending.wait()
        self.metrics.dialog_events.labels(event.state, event.reason).inc()
        if event.fallback:
            self.metrics.edge_fallbacks.labels(event.fallback).inc()
        state = _DIALOG_STATE[event.state]
        fields: dict[str, Any] = {}
        if state == "answered":
            fields["answered_at_ms"] = event.ts_ms
        else:
            fields.update(ended_at_ms=event.ts_ms, end_reason=event.reason, end_code=event.code or None)
        if event.fallback:
            fields["fallback"] = event.fallback
        timeline = {"event": {"answered": "answered", "ended": "ended", "failed": "failed"}[state],
                    "ts": event.ts_ms, "reason": event.reason, "code": event.code, "fallback": event.fallback or None}
        try:
            result = await self.store.transition(event.call_id, state, fields, timeline)
        except RedisError as exc:
            self.metrics.redis_errors.labels("transition").inc()
            log.error("call %s: could not record %s: %s", event.call_id, state, exc)
            return
        if not result.applied:
            log.debug("call %s: %s after %s ignored", event.call_id, state, result.previous)
        elif state == "ended" and self.security is not None:
            await self.security.call_ended(result, event.ts_ms)
