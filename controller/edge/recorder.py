"""What the edges saw, recorded: calls the edge decided itself, dialog states, fallbacks
taken, bans. Each edge writes its events to its own Redis Stream (cf:edge:{name}:events,
kamailio.cfg route[EVENT_STREAM]) whatever the controllers do; one controller at a time
consumes an edge's stream (a lease, like a media node's), through the consumer group
`callfabric`: it reads up to `batch_max` events, applies them with two pipelines
(state/journal.py), acknowledges and deletes them in the second one. A controller that dies
or freezes loses the lease within its TTL; the next owner claims the entries it had read but
not acknowledged (XAUTOCLAIM) before anything newer, so a call's events stay in order; the
changes this controller held while Redis was down (state/outage.py: decisions) are written
before the events of their calls. Applying is idempotent: an event delivered twice changes
and counts nothing twice.

Edges without a stream (no EVENTS_REDIS) send the same events over evapi: they are queued
here, in order, and applied by the same code in batches."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from redis.exceptions import RedisError, ResponseError

from controller.edge import protocol
from controller.edge.decisions import EdgeDecisions
from controller.metrics import Metrics
from controller.security.guard import SecurityGuard
from controller.state.calls import now_ms
from controller.state.journal import Applied, DialogChange, FallbackTaken, Journal, NewCall, PartlyApplied, StreamBatch
from controller.state.leases import Lease, NodeLeases

log = logging.getLogger("callfabric.edge")

GROUP = "callfabric"
_DIALOG_STATE = {"confirmed": "answered", "ended": "ended", "failed": "failed"}
# fallback mode -> the call's state; "rejected": the edge's policy rejected it instead (route[FALLBACK])
_FALLBACK_OUTCOME = {"open": "routing", "closed": "failed", "rejected": "failed"}
IN_REDIS_BATCH_MAX = 200  # entries per script: Redis serves nobody else meanwhile (~ms)


def stream_key(edge: str) -> str:
    return f"cf:edge:{{{edge}}}:events"


def summaries_key(edge: str) -> str:
    """What Redis applied of the edge's stream, per consumer, until the consumer settled it
    (state/journal.py apply_stream)."""
    return f"cf:edge:{{{edge}}}:applied"


def writer_key(edge: str) -> str:
    """The edge writer's own counters (written, trimmed: events dropped by the stream's bound)."""
    return f"cf:edge:{{{edge}}}:writer"


class _LeaseHold:
    """A consumer's hold on its edge's events lease: renewed every third of the lease's TTL, and
    taken as gone once 80 % of it passed since the last renewal (this controller was frozen or
    too slow: another one may own the stream now)."""

    def __init__(self, recorder: "EdgeRecorder", edge: str, lease: Lease, key: str):
        self.recorder, self.edge, self.lease, self.key = recorder, edge, lease, key
        self.ttl_s = recorder.leases.ttl_ms / 1000
        self.renewed_at = time.monotonic()
        self.valid_until = self.renewed_at + self.ttl_s * 0.8

    def lapsed(self) -> bool:
        return time.monotonic() >= self.valid_until

    async def keep(self) -> bool:
        """Renew when due (and publish the stream's lag); False, logged, once the lease is gone."""
        now = time.monotonic()
        if now >= self.valid_until:
            log.warning("edge %s events: lease lapsed here; letting it go", self.edge)
            return False
        if now - self.renewed_at >= self.ttl_s / 3:
            recorder = self.recorder
            if not await recorder.leases.renew(self.lease):
                log.warning("edge %s events: another controller consumes them now", self.edge)
                return False
            self.renewed_at = time.monotonic()
            self.valid_until = self.renewed_at + self.ttl_s * 0.8
            recorder.metrics.edge_events_lag.labels(self.edge).set(await recorder.store.redis.xlen(self.key))
        return True


class EdgeRecorder:
    def __init__(self, decisions: EdgeDecisions, journal: Journal, metrics: Metrics, *,
                 leases: NodeLeases | None = None, security: SecurityGuard | None = None, batch_max: int = 500,
                 block_ms: int = 250, linger_s: float = 0.05, local_max: int = 20_000):
        """`leases`: needed to consume the edges' streams (run_stream), not for evapi events."""
        self.decisions = decisions
        self.journal = journal
        self.store = journal.store
        self.leases = leases
        self.metrics = metrics
        self.security = security
        self.batch_max = batch_max
        self.block_ms = block_ms
        # after a batch that was not full, wait this long for the next one to grow: the cost of
        # a batch (a read, two pipelines, a task switch) is shared by more calls; records land
        # that much later
        self.linger_s = linger_s
        self.instance = decisions.instance_id
        self._local: deque[dict[str, Any]] = deque()  # events that came over evapi
        self._local_max = local_max
        self._local_ready = asyncio.Event()
        self._mismatch_logged = -60.0
        self.owned: dict[str, bool] = {}  # edge -> this controller consumes its stream now
        # entries of batches whose first pipeline was cut (Redis gone mid-batch): some of their
        # events may have been applied then, and were not counted
        self._uncertain: set[Any] = set()
        self._follow_ups: set[asyncio.Task] = set()
        # when Redis was found to have lost its data (the consumer group vanished): live calls
        # older than that get their records back from the edges' dialogs (edge/reconcile.py)
        self.data_lost_at_ms: int | None = None

    # -- evapi events ---------------------------------------------------------------------
    def submit(self, message: dict[str, Any]) -> None:
        """An event that came over evapi: applied in order with the others (run_local)."""
        if len(self._local) >= self._local_max:
            self.metrics.edge_events.labels("evapi", "dropped").inc()
            log.error("edge events from evapi: %d waiting for Redis already, one is NOT recorded", len(self._local))
            return
        self._local.append(message)
        self._local_ready.set()

    async def run_local(self) -> None:
        """Apply the evapi events in batches until cancelled; while Redis is unreachable they
        wait here (bounded by local_max, beyond counted as dropped)."""
        while True:
            await self._local_ready.wait()
            self._local_ready.clear()
            while self._local:
                batch = [self._local[i] for i in range(min(self.batch_max, len(self._local)))]
                try:
                    await self.apply(batch, source="evapi")
                except RedisError as exc:
                    self.metrics.redis_errors.labels("edge-events").inc()
                    log.warning("edge events from evapi wait for Redis (%d): %s", len(self._local), exc)
                    await asyncio.sleep(0.5)
                    continue
                for _ in batch:
                    self._local.popleft()

    # -- streams --------------------------------------------------------------------------
    async def run_stream(self, edge: str, lease_poll_s: float = 0.2) -> None:
        """Consume `edge`'s stream whenever this controller holds its lease; until cancelled."""
        node = f"edge-events:{edge}"
        if self.leases is None:
            raise RuntimeError("consuming an edge's stream needs the leases")
        while True:
            try:
                lease = await self.leases.acquire(node)
            except (RedisError, OSError) as exc:
                log.debug("edge %s events: lease not acquired: %s", edge, exc)
                lease = None
            if lease is None:
                self.owned[edge] = False
                await asyncio.sleep(lease_poll_s)
                continue
            self.owned[edge] = True
            log.info("edge %s events: consumed by this controller (fence %d)", edge, lease.fence)
            try:
                if self.journal.applies_streams:
                    await self._consume_in_redis(edge, lease)
                else:
                    await self._consume(edge, lease)
            except (RedisError, OSError) as exc:
                log.warning("edge %s events: %s; taking the lease again", edge, exc)
                await asyncio.sleep(lease_poll_s)
            except asyncio.CancelledError:  # stopping: the next controller need not wait for the TTL
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await self.leases.release(lease)
                raise
            except Exception:  # a bug must not stop the recording of this edge for good
                self.metrics.edge_events.labels(edge, "failed").inc()
                log.exception("edge %s events: a batch could not be applied; it is read again", edge)
                await asyncio.sleep(1.0)
            finally:
                self.owned[edge] = False

    async def _consume(self, edge: str, lease: Lease) -> None:
        key = stream_key(edge)
        redis = self.store.redis
        hold = _LeaseHold(self, edge, lease, key)
        ttl_s = hold.ttl_s
        await self._ensure_group(key)
        claiming = True
        start = "0-0"
        while True:
            if not await hold.keep():
                return
            if not await self._replayed(ttl_s):
                continue
            try:
                if claiming:  # first the entries a previous owner read and did not acknowledge
                    reply = await redis.xautoclaim(key, GROUP, self.instance, 0, start_id=start, count=self.batch_max)
                    start, entries = _text(reply[0]), reply[1]
                    if start == "0-0":
                        claiming = False
                else:
                    reply = await redis.xreadgroup(GROUP, self.instance, {key: ">"}, count=self.batch_max,
                                                   block=self.block_ms)
                    entries = reply[0][1] if reply else []
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis restarted empty (or the stream was deleted)
                    log.warning("edge %s events: consumer group gone (Redis restarted without its data?); "
                                "creating it again", edge)
                    self.data_lost_at_ms = self.data_lost_at_ms or now_ms()
                    await self._ensure_group(key)
                    claiming, start = True, "0-0"
                    continue
                raise
            if not entries:
                continue
            if hold.lapsed():
                return  # read, but our lease may be gone: the next owner claims them
            messages, ids = [], []
            for entry_id, fields in entries:
                if fields is None:  # deleted meanwhile
                    continue
                ids.append(entry_id)
                messages.append(_decode(fields.get(b"e")))
            ack = [("XACK", key, GROUP, *ids), ("XDEL", key, *ids)] if ids else []
            try:
                await self.apply(messages, source=edge, ack=ack, ids=ids)
                if len(entries) < self.batch_max and not claiming:
                    await asyncio.sleep(self.linger_s)
            except PartlyApplied:
                raise  # what it applied is counted; the rest of it is completed when delivered again
            except (RedisError, OSError):
                # the first pipeline was cut: some of these may be applied, none counted
                if len(self._uncertain) > 50_000:
                    self._uncertain.clear()
                self._uncertain.update(ids)
                raise

    async def _consume_in_redis(self, edge: str, lease: Lease) -> None:
        """_consume, with Redis applying the events (Journal.apply_stream): a round trip per
        batch, nothing per event here but what the batch's summary asks for (metrics, hot
        scopes, webhooks). After a batch that was not full, the next one is given linger_s to
        gather; after an empty one, the next entry is waited for."""
        key = stream_key(edge)
        redis = self.store.redis
        hold = _LeaseHold(self, edge, lease, key)
        ttl_s = hold.ttl_s
        await self._ensure_group(key)
        claiming, start = True, "0-0"
        count = min(self.batch_max, IN_REDIS_BATCH_MAX)
        while True:
            if not await hold.keep():
                return
            if not await self._replayed(ttl_s):
                continue
            try:
                if claiming:  # a previous owner's unacknowledged entries become ours (applied first)
                    (reply,) = await self.store.batch.run([("XAUTOCLAIM", key, GROUP, self.instance, 0, start,
                                                            "COUNT", count, "JUSTID")])
                    if isinstance(reply, Exception):
                        raise reply
                    start = _text(reply[0])
                    claiming = start != "0-0"
                pending = self.decisions.records_pending()
                if pending:  # decisions of this controller being written come first
                    await asyncio.gather(*(e.wait() for e in pending))
                batch = await self.journal.apply_stream(key, summaries_key(edge), GROUP, self.instance, count,
                                                        **self._apply_params(edge))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("edge %s events: consumer group gone (Redis restarted without its data?); "
                                "creating it again", edge)
                    self.data_lost_at_ms = self.data_lost_at_ms or now_ms()
                    await self._ensure_group(key)
                    claiming, start = True, "0-0"
                    continue
                raise
            await self._settle(batch, edge, key)
            if batch.read >= count or claiming:
                continue
            if batch.read:  # a moment for the next batch to gather
                await asyncio.sleep(self.linger_s)
            else:  # wait for the next entry (it joins this consumer's own: applied next time)
                await redis.xreadgroup(GROUP, self.instance, {key: ">"}, count=1,
                                       block=max(1, min(self.block_ms, int(ttl_s * 250))))

    async def _replayed(self, ttl_s: float) -> bool:
        """Whether the outage queue holds nothing (a decision held while Redis was down comes
        before the edge's events about its call, Journal.apply_stream); waits for its replay
        a part of the lease's time at most, so that the lease is renewed meanwhile."""
        if not self.store.outage.depth:
            return True
        try:
            async with asyncio.timeout(ttl_s / 4):
                await self.store.outage.written()
        except TimeoutError:
            return False
        return True

    def _apply_params(self, edge: str) -> dict[str, Any]:
        policy = self.decisions.serving()
        hot = self.decisions.hot
        security = policy.compiled.security if policy is not None else None
        short = security.ends_short_calls() if security is not None and self.security is not None else ()
        return {"now_ms": now_ms(), "instance": self.instance, "policy_version": policy.version if policy else "",
                "thresholds": hot.thresholds(policy) if hot is not None and hot.edges and policy is not None else {},
                "short_calls": [(d.name, d.shorter_than_ms, d.window_s) for d in short],
                "events": self.store.wants_events(), "edge": edge}

    async def _settle(self, batch: StreamBatch, edge: str, key: str) -> None:
        """What the controller does after Redis applied a batch: metrics, hot scopes,
        webhooks; and the entries Redis left to it, applied and acknowledged here."""
        metrics = self.metrics
        for kind, a, b, n in batch.tallies:
            if kind == "decision":
                metrics.decisions.labels(a, b).inc(n)
            elif kind == "edge":
                metrics.edge_made_decisions.labels(a).inc(n)
            elif kind == "dialog":
                metrics.dialog_events.labels(a, b).inc(n)
            elif kind == "fallback":
                metrics.edge_fallbacks.labels(a).inc(n)
            elif kind == "mismatch":
                policy = self.decisions.serving()
                metrics.edge_policy_mismatch.inc(n - 1)
                self._mismatch(b, a, policy.version if policy else "none")
            elif b:  # apply-error: its message
                metrics.decision_errors.labels(a).inc(n)
                log.error("edge %s events: %d not applied by Redis: %s", edge, n, b)
            else:
                metrics.decision_errors.labels(a).inc(n)
                log.warning("edge %s events: %d ignored (%s)", edge, n, a)
        metrics.edge_events.labels(edge, "applied").inc(batch.read - len(batch.left))
        policy = self.decisions.serving()
        if batch.hot and self.decisions.hot is not None and policy is not None:
            self.decisions.hot.observe(policy, [p for p, _ in batch.hot], [v for _, v in batch.hot])
        for text in batch.events:
            event = _decode(text)
            if isinstance(event, dict):
                self.store._emit(str(event.get("call_id", "")), event)
        if batch.left:
            ids = [entry_id for entry_id, _ in batch.left]
            await self.apply([_decode(raw) for _, raw in batch.left], source=edge,
                             ack=[("XACK", key, GROUP, *ids), ("XDEL", key, *ids)])

    async def _ensure_group(self, key: str) -> None:
        try:
            await self.store.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- applying ---------------------------------------------------------------------------
    async def apply(self, messages: list[Any], *, source: str, ack: list[tuple] | None = None,
                    ids: list[Any] | None = None) -> list[Applied]:
        """Parse and apply a batch of edge events (unusable ones are counted and skipped);
        `ids`: their stream entries (to recognise a batch delivered again after a cut)."""
        at = now_ms()
        changes, others, change_ids = [], [], []
        for n, message in enumerate(messages):
            change = self._change(message, at, source)
            if change is None:
                continue
            if isinstance(change, (protocol.EdgeBan, protocol.AuthFailure)):
                others.append(change)
            else:
                changes.append(change)
                change_ids.append(ids[n] if ids is not None else None)
        for change in changes:  # a decision of this controller still being written comes first
            pending = self.decisions.record_pending(change.call_id)
            if pending is not None:
                await pending.wait()
        try:
            results = await self.journal.apply(changes, ack or ())
        except PartlyApplied as cut:  # applied, not acknowledged: count what was applied (once)
            self._account(cut.results)
            raise
        if self._uncertain:
            for result, entry in zip(results, change_ids):
                if entry in self._uncertain:
                    self._uncertain.discard(entry)
                    result.applied = result.applied or _applied_by_the_cut_attempt(result)
        self.metrics.edge_events.labels(source, "applied").inc(len(messages))
        self._account(results)
        for other in others:
            if isinstance(other, protocol.AuthFailure):
                self.metrics.edge_auth_failures.labels(other.reason).inc()
            if self.security is None:
                continue
            try:
                if isinstance(other, protocol.EdgeBan):
                    await self.security.edge_ban(other.ip, other.seconds, other.reason, other.detail,
                                                 other.ts_ms or None)
                else:  # counted where the brute-force detector (failed authentications) reads
                    await self.security.auth_failed(other.ip, "edge", "failed trunk authentications (last: "
                                                    + other.reason + (f", user {other.user!r})" if other.user else ")"))
            except RedisError as exc:
                self.metrics.redis_errors.labels("security").inc()
                log.error("edge %s event about %s not recorded: %s", type(other).__name__, other.ip, exc)
        return results

    def _change(self, message: Any, at: int, source: str):
        if not isinstance(message, dict):
            self.metrics.decision_errors.labels("bad-json").inc()
            return None
        kind = message.get("event")
        try:
            if kind == "decided":
                decided = protocol.parse_decided(message)
                record, event = decided.record, decided.timeline
                record["controller"] = event["controller"] = self.instance
                return NewCall(decided.call_id, record, event, decided.live_scopes, decided.counters,
                               record["created_at_ms"])
            if kind == "dialog":
                dialog = protocol.parse_dialog(message, at)
                state = _DIALOG_STATE[dialog.state]
                fields: dict[str, Any] = {}
                if state == "answered":
                    fields["answered_at_ms"] = dialog.ts_ms
                else:
                    fields.update(ended_at_ms=dialog.ts_ms, end_reason=dialog.reason, end_code=dialog.code or None)
                event = {"event": state, "ts": dialog.ts_ms, "reason": dialog.reason, "code": dialog.code,
                         "fallback": dialog.fallback or None}
                return DialogChange(dialog.call_id, state, fields, event)
            if kind == "fallback":
                taken = protocol.parse_fallback(message, at)
                fields = {"state": _FALLBACK_OUTCOME[taken.mode], "tx": taken.tx, "from_tag": taken.from_tag,
                          "decided_by": "edge-fallback", "rule": "",
                          "outcome": "reject" if taken.mode == "rejected" else "fallback",
                          "fallback_mode": taken.mode, "edge": source}
                event = {"event": "fallback", "ts": taken.ts_ms, "reason": taken.reason, "mode": taken.mode}
                return FallbackTaken(taken.call_id, taken.reason, fields, event, taken.ts_ms)
            if kind == "ban":
                return protocol.parse_ban(message)
            if kind == "auth":
                return protocol.parse_auth(message)
        except protocol.BadRequest as exc:
            self.metrics.decision_errors.labels(f"bad-{kind}-event").inc()
            log.warning("ignored %s event from %s: %s", kind, source, exc)
            return None
        self.metrics.decision_errors.labels("bad-event").inc()
        log.debug("ignored event %r from %s", str(kind)[:32], source)
        return None

    def _account(self, results: list[Applied]) -> None:
        """Metrics, webhooks' and detectors' follow-ups of what was applied (only: a replay
        counts nothing)."""
        probes: dict[tuple, Any] = {}
        short: list[tuple[str, int, int]] = []  # answered calls that ended: (src, talked ms, ended ms)
        policy = self.decisions.serving()
        for result in results:
            change = result.change
            if result.error is not None:
                self.metrics.redis_errors.labels("edge-events").inc()
                log.error("call %s: Redis refused an edge event: %s", change.call_id, result.error)
                continue
            if not result.applied:
                continue
            if type(change) is DialogChange:
                self.metrics.dialog_events.labels(change.state if change.state != "answered" else "confirmed",
                                                  change.event["reason"]).inc()
                transition = result.transition
                if change.state == "ended" and transition is not None and transition.answered_at_ms is not None \
                        and transition.src:
                    ended = change.event["ts"]
                    short.append((transition.src, ended - transition.answered_at_ms, ended))
            elif type(change) is FallbackTaken:
                self.metrics.edge_fallbacks.labels(change.reason).inc()
            else:
                record = change.record
                outcome = str(record["outcome"])
                self.metrics.decisions.labels(outcome, str(record["rule"])).inc()
                self.metrics.edge_made_decisions.labels(outcome).inc()
                if policy is not None and record["policy_version"] != policy.version:
                    self._mismatch(change.call_id, record["policy_version"], policy.version)
                for c in change.counters:
                    probes[(c.key, c.kind, c.scope, c.value, c.window_s)] = c
        if short and self.security is not None:  # one task and pipeline for the batch's calls
            self.security_task(self.security.short_calls(short))
        hot = self.decisions.hot
        if probes and hot is not None and policy is not None:
            self.security_task(self._check_hot(policy, list(probes.values())))

    async def _check_hot(self, policy: Any, probes: list[Any]) -> None:
        """The counters of the edge-decided calls of a batch, read once, tell the edges which
        scopes are near a limit."""
        hot = self.decisions.hot
        thresholds = hot.thresholds(policy)
        probes = [p for p in probes if thresholds.get(p.key)]
        if not probes:
            return
        try:
            values = await self.store.read_counter_values(probes, now_ms(), urgent=False)
        except RedisError as exc:
            self.metrics.redis_errors.labels("counters").inc()
            log.warning("hot scope check skipped: %s", exc)
            return
        hot.observe(policy, probes, values)

    def security_task(self, coroutine) -> None:
        """A follow-up nobody waits for (detectors, hot scopes), kept until it is over."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._follow_ups.add(task)
        task.add_done_callback(self._follow_ups.discard)

    async def settled(self) -> None:
        """Wait for the follow-ups of what was applied (tests, shutdown)."""
        while self._follow_ups:
            await asyncio.gather(*list(self._follow_ups), return_exceptions=True)

    def _mismatch(self, call_id: str, edge_version: str, version: str) -> None:
        self.metrics.edge_policy_mismatch.inc()
        now = time.monotonic()
        if now - self._mismatch_logged >= 60:
            self._mismatch_logged = now
            log.warning("call %s was decided at the edge with policy %s while this controller serves %s "
                        "(a reload in progress, or an edge whose EDGE_POLICY file no controller writes)",
                        call_id, edge_version, version)

    async def lag(self, edge: str) -> int:
        """Events of `edge` not yet applied (in the stream: unread or unacknowledged)."""
        return int(await self.store.redis.xlen(stream_key(edge)))


def _applied_by_the_cut_attempt(result: Applied) -> bool:
    """An event found already applied when its batch, cut before, is delivered again: was it
    that attempt that applied it (so it is counted now, once)? A dialog state the call is in
    already, a call created but never indexed, a fallback already noted (one per call)."""
    change = result.change
    if type(change) is DialogChange:
        return result.transition is not None and result.transition.previous == change.state
    if type(change) is NewCall:
        return result.indexing
    return result.error is None


def _decode(raw: Any) -> Any:
    try:
        return json.loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError):
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

