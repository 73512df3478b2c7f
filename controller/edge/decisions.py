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
from controller.edge.verdict import call_counters, verdict
from controller.metrics import Metrics
from controller.policy import Decision
from controller.policy.answers import AnswerInvalid, decision_from_answer
from controller.policy.model import CounterProbe
from controller.security.guard import SecurityGuard
from controller.security.hot import HotScopes
from controller.state.batch import raise_errors
from controller.state.calls import CallStore, now_ms

log = logging.getLogger("callfabric.edge")

_DIALOG_STATE = {"confirmed": "answered", "ended": "ended", "failed": "failed"}
# Redis unreachable: `open` decides with the policy (counters read as 0, the record queued),
# `closed` answers 503 + Retry-After, `edge` asks the edge for its own fallback.
STATE_UNAVAILABLE_MODES = ("open", "closed", "edge")


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
        # counters of calls the edge decided, read once per batch to find hot scopes
        self._unchecked: dict[tuple, CounterProbe] = {}
        self._uncounted: list[asyncio.Future] = []  # their records (and counters) being written
        self._check_task: asyncio.Task | None = None  # the next check (not yet started)
        self._checks: set[asyncio.Task] = set()
        self._mismatch_logged = -60.0

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
                if self.hot is not None:  # as they stand once this call is counted
                    self.hot.observe(policy, counters, [v + c.count for c, v in zip(counters, values)])
        if timeline_extra:  # fail-open: the policy decides without counters; the record waits for Redis
            self.metrics.decisions_without_state.labels("open").inc()
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

    async def recorded(self, message: dict[str, Any]) -> None:
        """Record a call the edge decided itself (its answer is already carried out): the same
        record, timeline and counters as a decision made here."""
        decided = self._parsed("decided", protocol.parse_decided, message)
        if decided is None:
            return
        call_id = decided.call_id
        written = self._deciding.setdefault(call_id, asyncio.Event())  # its dialog events wait for it
        record, event = decided.record, decided.timeline
        record["controller"] = event["controller"] = self.instance_id
        try:
            sent = await self.store.send_create(
                call_id, record, live_scopes=decided.live_scopes,
                window_counters=[c for c in decided.counters if c.kind != "live"], at_ms=record["created_at_ms"],
                event=event, urgent=False)  # the call is routed already: it may share a pipeline
        except RedisError as exc:
            self.metrics.redis_errors.labels("create").inc()
            log.error("call %s (decided by the edge): could not record it: %s", call_id, exc)
            return
        finally:
            written.set()
            self._deciding.pop(call_id, None)
        sent.add_done_callback(functools.partial(self._record_written, call_id))
        outcome = str(record["outcome"])
        self.metrics.decisions.labels(outcome, str(record["rule"])).inc()
        self.metrics.edge_made_decisions.labels(outcome).inc()
        policy = self._policy()
        if policy is not None and record["policy_version"] != policy.version:
            self.metrics.edge_policy_mismatch.inc()
            now = time.monotonic()
            if now - self._mismatch_logged >= 60:
                self._mismatch_logged = now
                log.warning("call %s was decided at the edge with policy %s while this controller serves %s "
                            "(a reload in progress, or an edge whose EDGE_POLICY file no controller writes)",
                            call_id, record["policy_version"], policy.version)
        if self.hot is not None and decided.counters:
            for c in decided.counters:
                self._unchecked[(c.key, c.kind, c.scope, c.value, c.window_s)] = c
            self._uncounted.append(sent)
            if self._check_task is None:
                self._check_task = asyncio.get_running_loop().create_task(self._check_hot())
                self._checks.add(self._check_task)
                self._check_task.add_done_callback(self._checks.discard)

    async def _check_hot(self) -> None:
        """Read the counters of the edge-decided calls recorded since the last check (once per
        distinct counter) and tell the edges which scopes are hot."""
        await asyncio.sleep(0)  # let the rest of this read's events join the batch
        probes, self._unchecked, self._check_task = list(self._unchecked.values()), {}, None
        counted, self._uncounted = self._uncounted, []
        await asyncio.gather(*counted, return_exceptions=True)  # the calls are in their counters
        policy = self._policy()
        if policy is None or self.hot is None:
            return
        thresholds = self.hot.thresholds(policy)
        probes = [p for p in probes if thresholds.get(p.key)]  # the others can never make a scope hot
        if not probes:
            return
        try:
            values = await self.store.read_counter_values(probes, now_ms(), urgent=False)
        except RedisError as exc:
            self.metrics.redis_errors.labels("counters").inc()
            log.warning("hot scope check skipped: %s", exc)
            return
        self.hot.observe(policy, probes, values)

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

    def _parsed(self, kind: str, parse: Callable[[dict[str, Any]], Any], message: dict[str, Any]) -> Any:
        """An event from the edge parsed, or None when it is unusable (counted and logged)."""
        try:
            return parse(message)
        except protocol.BadRequest as exc:
            self.metrics.decision_errors.labels(f"bad-{kind}-event").inc()
            log.warning("ignored %s event: %s", kind, exc)
            return None

    async def edge_ban(self, message: dict[str, Any]) -> None:
        """Kamailio banned a source by itself (flood, scanner, sweep): record it with the
        controller's bans so operators see and manage every ban in one place."""
        ban = self._parsed("ban", protocol.parse_ban, message)
        if ban is not None and self.security is not None:
            await self.security.edge_ban(ban.ip, ban.seconds, ban.reason, ban.detail)

    async def edge_auth_failed(self, message: dict[str, Any]) -> None:
        """An inbound trunk's digest failed at the edge: counted where the brute-force detector
        (`asterisk_security`: failed authentications from a source) reads."""
        failure = self._parsed("auth", protocol.parse_auth, message)
        if failure is None:
            return
        self.metrics.edge_auth_failures.labels(failure.reason).inc()
        if self.security is not None:
            await self.security.auth_failed(failure.ip, "edge", "failed trunk authentications (last: "
                                            + failure.reason + (f", user {failure.user!r})" if failure.user else ")"))

    async def dialog(self, message: dict[str, Any]) -> None:
        """Follow a call's dialog: answered, ended, failed (a call the controller never
        decided, e.g. one the edge routed by fallback, is recorded by its first event)."""
        event = self._parsed("dialog", lambda m: protocol.parse_dialog(m, now_ms()), message)
        if event is None:
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
