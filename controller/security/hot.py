"""Hot scopes: a source, tenant, destination prefix … whose counter has reached half of the
smallest policy limit reading it. The edges decide the common calls themselves with every
counter read as 0 (controller/edge/local.py); that is exact only while counters are below
their limits, so once a scope is hot its calls go to a controller, which reads the exact
counts. The scope is marked hot at every edge for the counter's window (at least a minute)
and marked again while it stays hot."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

from controller.metrics import Metrics
from controller.policy.hot import hot_key, hot_thresholds
from controller.policy.model import CounterProbe
from controller.security.edges import Edge, EdgeError

log = logging.getLogger("callfabric.security")
MIN_HOT_S = 60
MAX_PUSHES_IN_FLIGHT = 256  # beyond: a scope is marked at its next call (counted as dropped)


class HotScopes:
    def __init__(self, edges: list[Edge], metrics: Metrics):
        self.edges = edges
        self.metrics = metrics
        self._until: dict[str, float] = {}  # hot key -> when the entry pushed to the edges expires (monotonic)
        self._thresholds: tuple[str, dict[str, int]] = ("", {})
        self._tasks: set[asyncio.Task] = set()

    def thresholds(self, policy: Any) -> dict[str, int]:
        version, table = self._thresholds
        if version != policy.version:
            table = hot_thresholds(policy)
            self._thresholds = (policy.version, table)
        return table

    def observe(self, policy: Any, counters: Iterable[CounterProbe], values: Iterable[int]) -> None:
        """Counter values as they stand with the call counted: mark the scopes that are hot."""
        if not self.edges:
            return
        thresholds = self.thresholds(policy)
        now = time.monotonic()
        for probe, value in zip(counters, values):
            at = thresholds.get(probe.key)
            if not at or value < at:  # 0: never decided at the edge anyway
                continue
            key = hot_key(probe)
            ttl = max(MIN_HOT_S, probe.window_s)
            if self._until.get(key, 0.0) > now + ttl / 2:
                continue
            self._push(key, ttl, now)

    def _push(self, key: str, ttl: int, now: float) -> None:
        if len(self._tasks) >= MAX_PUSHES_IN_FLIGHT:
            self.metrics.hot_scopes.labels("dropped").inc()
            return
        self._until[key] = now + ttl
        if len(self._until) > 100_000:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self.metrics.hot_scopes.labels("pushed").inc()
        log.info("scope %s is near a policy limit: its calls are decided with exact counters for %ds", key, ttl)
        task = asyncio.get_running_loop().create_task(self._send(key, ttl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: str, ttl: int) -> None:
        results = await asyncio.gather(*(edge.mark_hot(key, ttl) for edge in self.edges), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._until.pop(key, None)  # pushed again at the scope's next call
            self.metrics.hot_scopes.labels("failed").inc()
            for problem in failed:
                if isinstance(problem, EdgeError):
                    log.warning("could not mark scope %s hot at an edge: %s", key, problem)
                else:
                    log.error("could not mark scope %s hot at an edge", key, exc_info=problem)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
