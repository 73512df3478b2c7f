"""A controller's life, for rolling upgrades: serving → draining → drained.

Draining (SIGTERM, or `callfabric drain` = POST /v1/admin/drain):
1. no new calls: every edge connection answers the decisions in progress, then closes —
   Kamailio sends the next calls to the other controllers (or applies its fallback if none
   is left) — and dialog events of this controller's calls reach the others;
2. every media node it owns is handed over: actions in progress finish, its events stop,
   its lease is released, and a standby controller takes the node within its poll interval;
3. state changes queued during a Redis outage are written;
then it is drained and the process exits. Each step is bounded by `drain_timeout_s`."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from controller.edge.channel import EdgeChannel
from controller.media.ownership import NodeOwnership
from controller.metrics import Metrics
from controller.state.calls import CallStore

log = logging.getLogger("callfabric")

STATES = ("serving", "draining", "drained")
HANDOVER_WAIT_S = 5.0  # how long actions in progress on a node may take before it is handed over


class Lifecycle:
    def __init__(self, instance_id: str, edges: list[EdgeChannel], ownerships: list[NodeOwnership],
                 store: CallStore, metrics: Metrics, *, timeout_s: float, on_drained: Callable[[], None]):
        self.instance_id = instance_id
        self.edges = edges
        self.ownerships = ownerships
        self.store = store
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.on_drained = on_drained
        self.state = "serving"
        self._task: asyncio.Task | None = None

    def status(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id, "state": self.state,
            "nodes": {o.node: o.state for o in self.ownerships},
            "edges": {e.name: e.connected.is_set() for e in self.edges},
            "redis": {"mode": self.store.target.mode, "available": self.store.available,
                      "queued": self.store.outage.depth},
        }

    def drain(self, reason: str) -> bool:
        """Start draining (once); False if it already is."""
        if self.state != "serving":
            return False
        self.state = "draining"
        self.metrics.draining.set(1)
        owned = [o.node for o in self.ownerships if o.state == "owner"]
        log.warning("controller %s draining (%s): no new calls; handing over media node(s) %s", self.instance_id,
                    reason, ", ".join(owned) or "(none)")
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="drain")
        return True

    async def _drain(self) -> None:
        started = time.monotonic()

        def left() -> float:
            return max(0.1, self.timeout_s - (time.monotonic() - started))

        steps = [("edges", lambda: asyncio.gather(*(edge.stop() for edge in self.edges))),
                 ("media nodes", lambda: asyncio.gather(*(o.hand_over(min(HANDOVER_WAIT_S, left() / 2))
                                                          for o in self.ownerships)))]
        for what, step in steps:
            try:
                await asyncio.wait_for(step(), left())
            except TimeoutError:
                log.error("drain: %s not done within drain_timeout_s (%.0fs): going on", what, self.timeout_s)
        if not await self.store.outage.wait_empty(left()):
            log.error("drain: %d state change(s) still queued for Redis", self.store.outage.depth)
        self.state = "drained"
        log.warning("controller %s drained in %.2fs", self.instance_id, time.monotonic() - started)
        self.on_drained()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
