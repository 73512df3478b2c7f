"""Which controller handles each Asterisk node's events: the one holding the node's lease.

Every controller runs a NodeOwnership per configured node. A standby tries to take the
lease every `poll_s`; it gets it when the owner died (the lease expired, `lease_ttl_s` after
the owner's last renewal) or handed the node over (drain). The new owner adopts the node's
live calls from Redis, opens the node's events websocket — ARI gives an application's events
to one websocket only — resyncs with ARI (settling whatever the previous owner left half
done), serves the node's command inbox, and renews the lease every third of its TTL.

    standby ──lease taken──▶ owner ──lease lost / replaced──▶ standby
                               └──hand_over (drain)──▶ released (lease deleted: a standby
                                                                 takes it within poll_s)

Redis unreachable while owning: nobody else can take the lease either, so the owner keeps
serving ("in doubt", logged and counted) rather than abandon live calls; should another
controller still take the node (a partition), ARI's single websocket per application
settles it: the old owner gets ApplicationReplaced and stops, and the fence on media
records refuses its late writes."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from controller.media.plane import MediaPlane
from controller.metrics import Metrics
from controller.state.inbox import NodeInbox
from controller.state.leases import Lease, NodeLeases

log = logging.getLogger("callfabric.media")

REPLACED_BACKOFF_S = 5.0
LEASE_EVENTS = ("acquired", "lost", "released", "in_doubt", "replaced")


class NodeOwnership:
    def __init__(self, node: str, plane: MediaPlane, leases: NodeLeases, metrics: Metrics, *, poll_s: float,
                 inbox: NodeInbox | None = None,
                 handle_command: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None):
        self.node = node
        self.plane = plane
        self.leases = leases
        self.metrics = metrics
        self.poll_s = poll_s
        self.renew_every_s = leases.ttl_ms / 3000
        self.inbox = inbox
        self.handle_command = handle_command
        self.state = "standby"  # standby | owner | released
        self.lease: Lease | None = None
        self._hand_over = asyncio.Event()
        self._released = asyncio.Event()
        self._handover_wait_s = 0.0
        for event in LEASE_EVENTS:  # every series exists from the start (alerts on increase())
            metrics.node_lease_events.labels(node, event)

    async def run(self) -> None:
        """Take the node when it is free, serve it while it is ours; until handed over or cancelled."""
        unreachable = False
        try:
            while not self._hand_over.is_set():
                try:
                    lease = await self.leases.acquire(self.node)
                except RedisError as exc:
                    if not unreachable:
                        log.warning("media node %s: cannot reach Redis to take its lease (%s); retrying", self.node,
                                    exc)
                    unreachable, lease = True, None
                else:
                    unreachable = False
                if lease is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hand_over.wait(), self.poll_s)
                    continue
                replaced = await self._own(lease)
                if replaced and not self._hand_over.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hand_over.wait(), REPLACED_BACKOFF_S)
            self.state = "released"
        finally:
            self._released.set()

    async def hand_over(self, wait_s: float) -> None:
        """Drain: stop taking the node; if ours, let actions in progress finish (at most
        `wait_s`), stop its events and release the lease so a standby takes it at once."""
        self._handover_wait_s = wait_s
        self._hand_over.set()
        await self._released.wait()

    async def _own(self, lease: Lease) -> bool:
        """Serve the node while the lease is ours. True if another client took the ARI app."""
        node, metrics = self.node, self.metrics
        acquired = time.monotonic()
        self.lease, self.state = lease, "owner"
        metrics.node_lease_events.labels(node, "acquired").inc()
        metrics.node_owned.labels(node).set(1)
        log.info("media node %s: lease taken (fence %d): taking its live calls over", node, lease.fence)
        tasks: list[asyncio.Task] = []
        inbox: asyncio.Task | None = None
        replaced = handed_over = False
        try:
            taken = await self.plane.adopt_node(node, lease.fence)
            serving = asyncio.create_task(self.plane.serve_node(node), name=f"ari {node}")
            tasks.append(serving)
            tasks.append(asyncio.create_task(self._report_takeover(acquired, taken, lease.fence)))
            if self.inbox is not None and self.handle_command is not None:
                inbox = asyncio.create_task(self.inbox.serve(node, self.handle_command), name=f"inbox {node}")
                tasks.append(inbox)
            stop = asyncio.create_task(self._hand_over.wait())
            tasks.append(stop)
            in_doubt = False
            while True:
                await asyncio.wait({serving, stop}, timeout=self.renew_every_s, return_when=asyncio.FIRST_COMPLETED)
                if stop.done():
                    handed_over = True
                    break
                if serving.done():
                    replaced = True
                    metrics.node_lease_events.labels(node, "replaced").inc()
                    break
                try:
                    renewed = await asyncio.wait_for(self.leases.renew(lease), self.renew_every_s)
                except (RedisError, TimeoutError) as exc:
                    if not in_doubt:
                        in_doubt = True
                        metrics.node_lease_events.labels(node, "in_doubt").inc()
                        log.warning("media node %s: cannot renew its lease (%s): still serving it while Redis is "
                                    "unreachable", node, exc)
                    continue
                if renewed:
                    if in_doubt:
                        in_doubt = False
                        log.warning("media node %s: Redis is back and the lease is still ours", node)
                    continue
                metrics.node_lease_events.labels(node, "lost").inc()
                log.error("media node %s: another controller holds its lease now: this one stops handling the "
                          "node's events", node)
                break
            if handed_over:  # finish what is in progress while the events still come in
                if inbox is not None:
                    inbox.cancel()  # no new commands
                await self.plane.quiesce(node, self._handover_wait_s)
        except RedisError as exc:
            log.error("media node %s: could not take its calls over (%s): letting the lease go", node, exc)
            handed_over = True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.plane.release_node(node)
            metrics.node_owned.labels(node).set(0)
            self.lease, self.state = None, "standby"
        if handed_over or replaced:
            try:
                if await self.leases.release(lease):
                    metrics.node_lease_events.labels(node, "released").inc()
                    log.info("media node %s: handed over (lease released)", node)
            except RedisError as exc:
                log.warning("media node %s: could not release its lease (%s): it expires in %.1fs", node, exc,
                            self.leases.ttl_ms / 1000)
        return replaced

    async def _report_takeover(self, acquired: float, taken: int, fence: int) -> None:
        await self.plane.wait_synced(self.node)
        elapsed = time.monotonic() - acquired
        self.metrics.node_takeover_seconds.observe(elapsed)
        log.info("media node %s: serving (fence %d): %d live call(s) taken over and resynced with ARI in %.3fs",
                 self.node, fence, taken, elapsed)
