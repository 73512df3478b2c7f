"""Audio health of the legs we created: reads `rtp_statistics` of every ExternalMedia leg
periodically, exports packet counts, and flags one-way audio — an agent leg that receives
nothing back while Asterisk sends to it, a fork that gets no packets — once per leg, as a
metric and a timeline event."""
from __future__ import annotations

import asyncio
import logging

from controller.media.ari import AriError
from controller.media.plane import MediaPlane
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media.health")


class MediaHealth:
    def __init__(self, plane: MediaPlane, interval_s: float = 5.0, grace_s: float = 3.0):
        self.plane = plane
        self.interval_s = interval_s
        self.grace_s = grace_s  # a leg this young may not have audio yet
        self._seen: dict[str, tuple[int, int]] = {}  # channel -> (tx, rx) at the last check
        self._flagged: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        live: set[str] = set()
        for media in list(self.plane.calls.values()):
            if media.state not in ("active", "transferring"):
                continue
            legs = []
            if media.agent and media.agent.state == "up" and media.agent.transport == "rtp":
                legs.append(("agent", media.agent.channel, media.agent.up_ms, media.agent.name))
            legs += [("fork", f.channel, f.up_ms, f.fork_id) for f in media.forks.values()
                     if f.state == "up" and f.transport == "rtp"]
            for kind, channel, up_ms, label in legs:
                live.add(channel)
                await self._check(media, kind, channel, up_ms, label)
        for channel in list(self._seen):
            if channel not in live:
                self._seen.pop(channel, None)
                self._flagged.discard(channel)

    async def _check(self, media, kind: str, channel: str, up_ms: int, label: str) -> None:
        try:
            stats = await self.plane.nodes[media.node].rtp_statistics(channel)
        except AriError as exc:
            log.debug("rtp statistics of %s: %s", channel, exc)
            return
        if not isinstance(stats, dict):
            return
        tx, rx = int(stats.get("txcount") or 0), int(stats.get("rxcount") or 0)
        last_tx, last_rx = self._seen.get(channel, (0, 0))
        self.plane.metrics.rtp_packets.labels(kind, "sent").inc(max(0, tx - last_tx))
        self.plane.metrics.rtp_packets.labels(kind, "received").inc(max(0, rx - last_rx))
        self._seen[channel] = (tx, rx)
        if channel in self._flagged or now_ms() - up_ms < self.grace_s * 1000:
            return
        problem = None
        if kind == "agent" and tx > 0 and rx == 0:
            problem = "the agent sends no audio back (one-way audio)"
        elif kind == "fork" and tx == last_tx:
            problem = "no audio reaches the fork target"
        if problem:
            self._flagged.add(channel)
            self.plane.metrics.one_way_audio.labels(kind).inc()
            await self.plane.timeline(media, "one_way_audio", leg=kind, name=label, channel=channel, tx=tx, rx=rx,
                                       problem=problem)
