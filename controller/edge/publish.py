"""Keeps the edges' copy of the policy current: whenever a policy version starts serving here,
it is written to `edge_policy_file` (controller/edge/bundle.py), signed with the key in
`edge_policy_key_file` (read at each write: a rotated key is used from the next version on),
for Kamailio's own decisions. A refused policy writes nothing: the edges keep deciding with the
last good one, like us."""
from __future__ import annotations

import asyncio
import logging

from controller.edge import bundle
from controller.metrics import Metrics
from controller.policy.canonical import DocumentInvalid
from controller.policy.reload import PolicyHolder, ReloadOutcome

log = logging.getLogger("callfabric.edge")


class EdgePolicyPublisher:
    def __init__(self, path: str, key_path: str, holder: PolicyHolder, metrics: Metrics):
        self.path = path
        self.key_path = key_path
        self.holder = holder
        self.metrics = metrics
        self.written: str | None = None  # the version in the file
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def outcome(self, outcome: ReloadOutcome) -> None:
        """PolicyHolder's report of a reload (on the event loop): write the file off the loop."""
        if outcome.accepted and outcome.version != self.written:
            task = asyncio.get_running_loop().create_task(self.publish())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def publish(self) -> None:
        async with self._lock:  # one write at a time, always of the version serving now
            policy = self.holder.policy
            if policy is None or policy.version == self.written:
                return
            try:
                await asyncio.to_thread(self._write, policy.source)
            except (OSError, bundle.BundleError, DocumentInvalid) as exc:
                self.metrics.edge_policy_writes.labels("error").inc()
                log.error("could not write the edge policy %s (the edges keep their last one): %s", self.path, exc)
                return
            self.written = policy.version
            self.metrics.edge_policy_writes.labels("ok").inc()
            log.info("edge policy %s written to %s", policy.version, self.path)

    def _write(self, source) -> None:
        bundle.write(self.path, source, bundle.read_key(self.key_path))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
