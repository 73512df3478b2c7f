"""The security side of the call path: what a risk outcome sets in motion (a ban pushed to
the edge), and the signals that arrive after a decision — calls ending very short, Asterisk
security events — counted where the detectors read them."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Protocol

from redis.exceptions import RedisError

from controller.metrics import Metrics
from controller.policy import Decision
from controller.policy.facts import Facts
from controller.policy.risk import ASTERISK_SECURITY_SCOPE, SHORT_CALLS_SCOPE
from controller.security.bans import BanList, normalise_ip
from controller.security.hot import HotScopes
from controller.security.trust import BanRefused
from controller.state.calls import CallStore, CounterRequest, Transition, now_ms, window_key

log = logging.getLogger("callfabric.security")


class AsteriskSecurityEvent(Protocol):
    """What the guard reads of an Asterisk security event (failed authentication, unknown
    endpoint …): media/ami.py's watchers report them, app.py hands them to `asterisk_event`."""

    @property
    def node(self) -> str: ...  # the media node that saw it

    @property
    def event(self) -> str: ...  # e.g. InvalidAccountID

    @property
    def remote_ip(self) -> str: ...  # as reported: not yet checked to be an address


class SecurityGuard:
    def __init__(self, store: CallStore, bans: BanList, metrics: Metrics, current_policy: Callable[[], Any],
                 instance_id: str, hot: HotScopes | None = None):
        self.store = store
        self.bans = bans
        self.metrics = metrics
        self._policy = current_policy
        self.instance_id = instance_id
        self.hot = hot
        self._tasks: set[asyncio.Task] = set()
        self._auth_bans = asyncio.Lock()  # failures arriving together ban their source once

    # -- at decision time --------------------------------------------------------------------
    def decided(self, decision: Decision, facts: Facts, call_id: str) -> None:
        """Count what the detectors found; a ban outcome bans the call's source (in the
        background: the call's answer, a reject, does not wait for it)."""
        risk = decision.risk
        if risk is None:
            return
        self.metrics.risk_outcomes.labels(risk.outcome).inc()
        for finding in risk.findings:
            self.metrics.risk_findings.labels(finding.detector).inc()
        if risk.outcome == "ban" and facts.src_ip is not None:
            top = max(risk.findings, key=lambda x: x.score)
            reason = "; ".join(f"{x.detector}: {x.why}" for x in risk.findings)
            self._background(self.bans.add(str(facts.src_ip), risk.ban_s or 900, f"risk score {risk.score}: {reason}",
                                           origin="policy", detector=top.detector, now_ms=now_ms(), call_id=call_id,
                                           by=self.instance_id))

    # -- after the decision ------------------------------------------------------------------
    async def call_ended(self, transition: Transition, ended_ms: int) -> None:
        """A call answered and ended sooner than a short_calls detector's limit counts for its source."""
        if transition.answered_at_ms is not None and transition.src:
            await self.short_calls([(transition.src, ended_ms - transition.answered_at_ms, ended_ms)])

    async def short_calls(self, calls: list[tuple[str, int, int]]) -> None:
        """Answered calls that ended (source ip:port, talked ms, ended ms): those shorter than a
        short_calls detector's limit count for their source, all in one pipeline, then the
        sources are checked for hot scopes in one read."""
        policy = self._policy()
        security = policy.compiled.security if policy is not None else None
        detectors = security.ends_short_calls() if security is not None else ()
        if not detectors:
            return
        commands: list[tuple] = []
        observed: list[tuple[CounterRequest, int]] = []
        for src, talked_ms, ended_ms in calls:
            counted = [d for d in detectors if 0 <= talked_ms < d.shorter_than_ms]
            if not counted:
                continue
            ip = src.rsplit(":", 1)[0].strip("[]")
            for window_s in {d.window_s for d in counted}:
                key = window_key(SHORT_CALLS_SCOPE, ip, window_s, ended_ms // (window_s * 1000))
                commands += [("INCR", key), ("EXPIRE", key, 2 * window_s + 1)]
            observed += [(CounterRequest(f"risk:{d.name}", "window", SHORT_CALLS_SCOPE, ip, d.window_s, count=False),
                          ended_ms) for d in counted]
        if not commands:
            return
        try:
            await self.store.batch.run(commands, urgent=False)
        except RedisError as exc:
            self.metrics.redis_errors.labels("security").inc()
            log.error("could not count %d short calls: %s", len(calls), exc)
            return
        if self.hot is None:
            return
        probes = list({(p.key, p.value, p.window_s): p for p, _ in observed}.values())
        try:
            values = await self.store.read_counter_values(probes, max(at for _, at in observed))
        except RedisError as exc:
            self.metrics.redis_errors.labels("security").inc()
            log.warning("hot scope check of %d short-call sources skipped: %s", len(probes), exc)
            return
        self.hot.observe(policy, probes, values)

    def asterisk_event(self, event: AsteriskSecurityEvent) -> None:
        """Asterisk saw a failed authentication / unknown endpoint … from an address."""
        try:
            ip = normalise_ip(event.remote_ip)
        except ValueError:
            return
        self._background(self.auth_failed(ip, "asterisk", f"Asterisk security events ({event.event} on {event.node})"))

    async def auth_failed(self, ip: str, origin: str, what: str) -> None:
        """A failed authentication from `ip` (a trunk's digest at the edge, an Asterisk security
        event): counted for the `asterisk_security` detectors; one that alone reaches the ban
        score bans the source now (it may never get a call through to be scored)."""
        policy = self._policy()
        security = policy.compiled.security if policy is not None else None
        detectors = security.watches_asterisk() if security is not None else ()
        if not detectors:
            return
        at = now_ms()
        await self._bump(ASTERISK_SECURITY_SCOPE, ip, {d.window_s for d in detectors}, at)
        await self._observe_hot(policy, ASTERISK_SECURITY_SCOPE, ip, detectors, at)
        ban_at = security.policy.ban_at
        for d in detectors:
            if ban_at is None or d.score < ban_at:
                continue
            async with self._auth_bans:
                current = await self.store.read_counters(
                    [CounterRequest(d.name, "window", ASTERISK_SECURITY_SCOPE, ip, d.window_s, count=False)], at)
                if current.get(d.name, 0) < d.max or await self.bans.get(ip) is not None:
                    continue
                await self.bans.add(ip, security.policy.ban_s,
                                    f"{current[d.name]} {what} in {d.window_s}s",
                                    origin=origin, detector=d.name, now_ms=at, by=self.instance_id)
                return

    async def edge_ban(self, ip: str, seconds: int, reason: str, detail: str, at_ms: int | None = None) -> None:
        """A ban the edge made by itself (flood, scanner, sweep): recorded, and pushed to the
        other edges too (a scanner seen at one edge is banned at all of them). One on a trusted
        peer (an edge whose TRUSTED_NET misses it) is lifted at every edge instead. Its expiry
        runs from when the edge made it (`at_ms`), so the same event delivered again is the
        same ban, neither extended nor counted twice."""
        text = f"banned by the edge ({reason})" + (f": {detail}" if detail else "")
        try:
            await self.bans.add(ip, seconds, text, origin="edge", detector=reason, now_ms=at_ms or now_ms(),
                                by=self.instance_id)
        except BanRefused:
            await self.bans.remove(ip)

    async def _bump(self, scope: str, value: str, windows: set[int], at_ms: int) -> None:
        commands: list[tuple] = []
        for window_s in windows:
            key = window_key(scope, value, window_s, at_ms // (window_s * 1000))
            commands += [("INCR", key), ("EXPIRE", key, 2 * window_s + 1)]
        try:
            await self.store.batch.run(commands, urgent=False)
        except RedisError as exc:
            self.metrics.redis_errors.labels("security").inc()
            log.error("could not count a %s signal for %s: %s", scope, value, exc)

    async def _observe_hot(self, policy: Any, scope: str, value: str, detectors, at_ms: int) -> None:
        """After counting a signal: its source may now be hot for the edges (security/hot.py)."""
        if self.hot is None:
            return
        probes = [CounterRequest(f"risk:{d.name}", "window", scope, value, d.window_s, count=False) for d in detectors]
        try:
            values = await self.store.read_counter_values(probes, at_ms)
        except RedisError as exc:
            self.metrics.redis_errors.labels("security").inc()
            log.warning("hot scope check of %s %s skipped: %s", scope, value, exc)
            return
        self.hot.observe(policy, probes, values)

    def _background(self, work) -> None:
        task = asyncio.create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work) -> None:
        try:
            await work
        except BanRefused:  # logged and counted by BanList.add
            pass
        except RedisError as exc:
            self.metrics.redis_errors.labels("security").inc()
            log.error("security: Redis: %s", exc)
        except Exception:  # never let a signal's bug reach the loop's exception handler unseen
            log.exception("security: background work failed")

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
