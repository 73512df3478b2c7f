"""Live records the edges no longer know: closed. A call is live in Redis until its end is
recorded; when that end can never come (the edge restarted and lost its dialogs, an event
was lost with a Redis that restarted empty, a queue overflowed), its record would stay live
for hours and count in concurrent-call limits. Every edge's dialog list (JSON-RPC dlg.list)
says which calls are really up: a live record of an edge call (it has the edge's `tx`) that
no edge holds, older than a grace period (its dialog may not be set up yet), is closed as
ended, reason `reconciled`. Nothing is closed unless every edge answered.

The other way round, after Redis lost its data (restarted empty: the edge's consumer group
was gone), the calls the edges still hold that came through a decision (their dialog has
`cf_ev`) and started before the loss get a live record again, `decided_by: recovered`
(their decision is not known any more; a `decided` event that arrives later replaces it), so
live counts are whole again."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Sequence

from controller.edge.rpc import KamailioRpc, RpcError
from controller.metrics import Metrics
from controller.state.calls import CallStore, call_key, now_ms

log = logging.getLogger("callfabric.edge")


class DialogReconciler:
    def __init__(self, edges: Sequence[KamailioRpc], store: CallStore, metrics: Metrics, *, grace_ms: int = 30_000,
                 batch: int = 2000):
        self.edges = list(edges)
        self.store = store
        self.metrics = metrics
        self.grace_ms = grace_ms
        self.batch = batch

    async def run_once(self, lost_before_ms: int | None = None) -> int:
        """Close the live edge records no edge holds; returns how many were closed. With
        `lost_before_ms` (Redis lost its data then), records are recovered too."""
        if not self.edges:
            return 0
        started = now_ms()
        try:
            lists = await asyncio.gather(*(edge.dialogs() for edge in self.edges))
        except RpcError as exc:
            log.warning("reconciliation skipped: an edge did not list its dialogs: %s", exc)
            return 0
        dialogs = [d for listed in lists for d in listed]
        held = {d["call-id"] for d in dialogs}
        if lost_before_ms is not None:
            await self._recover(dialogs, lost_before_ms, started)
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

    async def _recover(self, dialogs: list[dict], lost_before_ms: int, at_ms: int) -> int:
        decided = [d for d in dialogs if _decided_at_edge(d) and isinstance(d.get("init_ts"), int)
                   and d["init_ts"] * 1000 < lost_before_ms][:self.batch]
        if not decided:
            return 0
        known = await self.store.batch.run([("EXISTS", call_key(d["call-id"])) for d in decided])
        recovered = 0
        for dialog, exists in zip(decided, known):
            if exists:
                continue
            confirmed = dialog.get("state") == 4
            record = {"state": "answered" if confirmed else "routing", "outcome": "unknown", "rule": "",
                      "decided_by": "recovered", "created_at_ms": dialog["init_ts"] * 1000,
                      "from_uri": str(dialog.get("from_uri", ""))[:512], "to_uri": str(dialog.get("to_uri", ""))[:512],
                      "tx": _tx(dialog)}
            if confirmed and isinstance(dialog.get("start_ts"), int):
                record["answered_at_ms"] = dialog["start_ts"] * 1000
            await self.store.create(dialog["call-id"], record, live_scopes={}, window_counters=[],
                                    at_ms=record["created_at_ms"],
                                    event={"event": "recovered", "ts": at_ms,
                                           "reason": "its record was lost with Redis's data"})
            recovered += 1
        if recovered:
            self.metrics.calls_recovered.inc(recovered)
            log.warning("reconciliation: %d live call(s) whose records Redis lost recovered from the edges' dialogs "
                        "(decided_by recovered: their decision is unknown)", recovered)
        return recovered


def _variables(dialog: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in dialog.get("variables") or []:
        if isinstance(item, dict):
            out.update({str(k): str(v) for k, v in item.items()})
    return out


def _decided_at_edge(dialog: dict) -> bool:
    """A caller's call that went through a decision (not a leg a media node originated)."""
    variables = _variables(dialog)
    return "cf_ev" in variables and variables.get("cf_origin") != "media"


def _tx(dialog: dict) -> str:
    try:
        return str(json.loads("{" + _variables(dialog)["cf_ev"] + "}").get("tx", ""))[:32]
    except (ValueError, KeyError, AttributeError):
        return ""
