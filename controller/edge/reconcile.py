"""Live records the edges no longer know: closed. A call is live in Redis until its end is
recorded; when that end can never come (the edge restarted and lost its dialogs, an event
was lost with a Redis that restarted empty, a queue overflowed), its record would stay live
for hours and count in concurrent-call limits. Every edge's dialog list (JSON-RPC dlg.list)
says which calls are really up: a live record of an edge call (it has the edge's `tx`) that
no edge holds, older than a grace period (its dialog may not be set up yet), is closed as
ended, reason `reconciled`. Nothing is closed unless every edge answered."""
from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from controller.edge.rpc import KamailioRpc, RpcError
from controller.metrics import Metrics
from controller.state.calls import CallStore, now_ms

log = logging.getLogger("callfabric.edge")


class DialogReconciler:
    def __init__(self, edges: Sequence[KamailioRpc], store: CallStore, metrics: Metrics, *, grace_ms: int = 30_000,
                 batch: int = 2000):
        self.edges = list(edges)
        self.store = store
        self.metrics = metrics
        self.grace_ms = grace_ms
        self.batch = batch

    async def run_once(self) -> int:
        """Close the live edge records no edge holds; returns how many were closed."""
        if not self.edges:
            return 0
        started = now_ms()
        try:
            lists = await asyncio.gather(*(edge.dialog_call_ids() for edge in self.edges))
        except RpcError as exc:
            log.warning("reconciliation skipped: an edge did not list its dialogs: %s", exc)
            return 0
        held = set().union(*lists)
        stale = [c for c in await self.store.live_edge_calls(started - self.grace_ms, self.batch) if c not in held]
        closed = 0
        for call_id in stale:
            result = await self.store.transition(call_id, "ended", {"ended_at_ms": started, "end_reason": "reconciled"},
                                                 {"event": "ended", "ts": started, "reason": "reconciled"})
            if result.applied:
                closed += 1
        if closed:
            self.metrics.calls_reconciled.inc(closed)
            log.warning("reconciliation: %d live record(s) of calls no edge holds closed (reason reconciled)", closed)
        return closed
