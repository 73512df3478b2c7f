"""What the controller does for a decide event: policy → call store → answer (what the edge
saw afterwards is recorded by edge/recorder.py). Never raises on input: a request it cannot
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
from controller.edge.verdict import call_counters, reject_floor, verdict
from controller.metrics import Metrics
from controller.policy import Decision
from controller.policy.answers import AnswerInvalid, decision_from_answer
from controller.security.guard import SecurityGuard
from controller.security.hot import HotScopes
from controller.state.batch import raise_errors
from controller.state.calls import CallStore, now_ms

log = logging.getLogger("callfabric.edge")

# Redis unreachable: `open` decides with the policy (counters read as 0, the record queued),
# `closed` answers 503 + Retry-After, `edge` asks the edge for its own fallback.
STATE_UNAVAILABLE_MODES = ("open", "closed", "edge")
# the rule name in records of calls refused because the counters their limits need are unknown
# (settings.limits_without_counters: closed)
LIMITS_UNCHECKED_RULE = "limits-without-counters"


class EdgeDecisions:
    def __init__(self, current_policy: Callable[[], Any], store: CallStore, metrics: Metrics, instance_id: str, *,
                 ask_webhook: Callable[[str, dict, float], Awaitable[tuple[str, Any]]] | None = None,
                 decision_budget_ms: int = 200, security: SecurityGuard | None = None,
                 state_unavailable: str = "edge", hot: HotScopes | None = None):
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
        self.hot = hot

    def serving(self) -> Any:
        """The policy decisions are made with now (None while none loaded)."""
        return self._policy()

    def records_pending(self) -> list[asyncio.Event]:
        """record_pending of every call this controller is deciding now."""
        return list(self._deciding.values())

    def record_pending(self, call_id: str) -> asyncio.Event | None:
        """Set once this controller's record of a call it is deciding is written (None: none
        is being written): what the edge saw next about the call is applied after it."""
        return self._deciding.get(call_id)

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
            return self._without_state(request, policy)
        written = self._deciding.setdefault(call_id, asyncio.Event())
        try:
            return await self._decide(request, policy, received)
        except RedisError as exc:
            self.metrics.redis_errors.labels("create").inc()
            self.metrics.decision_errors.labels("redis").inc()
            log.error("call %s: call store unavailable (%s): %s", call_id, exc,
                      "503" if self.state_unavailable == "closed" else "edge fallback")
            return self._without_state(request, policy)
        except Exception:  # a bug must cost one call its decision, never the controller
            self.metrics.decision_errors.labels("internal").inc()
            log.exception("call %s: decision failed", call_id)
            return self._fallback(request, policy, "internal")
        finally:
            written.set()
            self._deciding.pop(call_id, None)

    async def _decide(self, request: protocol.DecideRequest, policy: Any, received: float) -> dict[str, Any]:
        call = request.call
        at_ms = now_ms()
        facts = policy.compiled.facts(call)
        counters = call_counters(policy, facts)
        timeline_extra: dict[str, Any] = {}
        if not self.store.available:
            timeline_extra["state"] = "unavailable"
        elif counters:
            try:
                values = await self.store.read_counter_values(counters, at_ms)
            except RedisConnectionError:
                if self.state_unavailable != "open":
                    raise
                timeline_extra["state"] = "unavailable"
            else:
                facts.counters = {c.key: v for c, v in zip(counters, values)}
                if self.store.degraded:  # read, but the calls held during the outage are not in them yet
                    timeline_extra["state"] = "replaying"
                if self.hot is not None:  # as they stand once this call is counted
                    self.hot.observe(policy, counters, [v + c.count for c, v in zip(counters, values)])
        if timeline_extra:  # the policy decides without (complete) counters; the record waits for Redis
            self.metrics.decisions_without_state.labels("open" if timeline_extra["state"] == "unavailable"
                                                        else "replaying").inc()
        if counters and timeline_extra and policy.source.settings.limits_without_counters == "closed":
            # the policy's limits cannot be checked: refused, as its settings ask
            self.metrics.decisions_without_state.labels("refused").inc()
            decision = Decision("reject", LIMITS_UNCHECKED_RULE, (LIMITS_UNCHECKED_RULE,), policy.version,
                                reject_code=503, reject_reason="Service Unavailable",
                                headers=(("Retry-After", "5"),))
        else:
            decision = policy.compiled.decide_facts(facts)
        carried = decision
        if decision.outcome == "webhook":
            carried, timeline_extra["webhook"] = await self._webhook_decision(policy, decision, request, facts)
            security = policy.compiled.security
            if security is not None:
                carried = security.cap(carried if carried.risk else replace(carried, risk=decision.risk))
        decide_ms = round((time.perf_counter() - received) * 1000, 3)
        result = verdict(policy, request, facts, carried, counters, at_ms=at_ms, decide_ms=decide_ms,
                         decided_by="controller", timeline_extra=timeline_extra)
        result.record["controller"] = result.event["controller"] = self.instance_id
        # The record is in Redis's socket before the answer leaves (and ahead of anything
        # later about this call); its acknowledgement is checked without holding the call.
        written = await self.store.send_create(call.call_id, result.record, live_scopes=result.live_scopes,
                                               window_counters=result.window_counters, at_ms=at_ms,
                                               event=result.event, hold=self.state_unavailable == "open")
        written.add_done_callback(functools.partial(self._record_written, call.call_id))
        self.metrics.decisions.labels(carried.outcome, carried.rule).inc()
        if carried.risk is not None and self.security is not None:
            self.security.decided(carried, facts, call.call_id)
        return result.answer

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
            "trunk": facts.trunk, "headers": dict(call.headers), "rule": asked.rule, "policy_version": policy.version,
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

    def _without_state(self, request: protocol.DecideRequest, policy: Any) -> dict[str, Any]:
        """The answer when Redis cannot take the call (closed: 503 here; else the edge's fallback,
        unless the policy rejects the call anyway)."""
        mode = "closed" if self.state_unavailable == "closed" else "edge"
        self.metrics.decisions_without_state.labels(mode).inc()
        if mode == "closed":
            return protocol.unavailable_answer(request.tx)
        return self._fallback(request, policy, "state-unavailable")

    def _fallback(self, request: protocol.DecideRequest, policy: Any, reason: str) -> dict[str, Any]:
        """The edge's fallback for a call this controller cannot decide, unless the policy rejects
        it whatever the counters and webhooks would say (verdict.reject_floor): then that reject,
        so no fallback routes a call the policy blocks."""
        try:
            floor = reject_floor(policy, policy.compiled.facts(request.call))
        except Exception:  # the fallback stays the answer
            log.exception("call %s: reject check for the fallback failed", request.call.call_id)
            floor = None
        if floor is None:
            return protocol.fallback_answer(request.tx, reason)
        self.metrics.fallback_rejects.labels(reason).inc()
        log.info("call %s: %s, rejected by policy %s (rule %s) instead of the fallback", request.call.call_id,
                 reason, policy.version, floor.rule)
        answer, _ = protocol.answer_for(request.tx, floor, [])
        return answer

    def without_decision(self, message: dict[str, Any], reason: str) -> dict[str, Any] | None:
        """The answer to a decide this controller will not decide (overload): the edge's fallback,
        or the policy's reject (see _fallback). None when it cannot be matched to a transaction."""
        tx = message.get("tx")
        if not isinstance(tx, str) or not protocol._TX.match(tx):
            return None
        policy = self._policy()
        try:
            request = protocol.parse_decide(message)
        except protocol.BadRequest:
            return protocol.fallback_answer(tx, reason)
        return protocol.fallback_answer(tx, reason) if policy is None else self._fallback(request, policy, reason)

    def _record_written(self, call_id: str, replies: asyncio.Future) -> None:
        try:
            raise_errors(replies.result())
        except RedisError as exc:
            self.metrics.redis_errors.labels("create").inc()
            log.error("call %s: Redis did not store its record (its dialog events will): %s", call_id, exc)
