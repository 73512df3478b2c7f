"""Audio health, measured where Asterisk really measures it: the caller's own channel.

Asterisk keeps RTP statistics for the caller's PJSIP channel (packets from the caller, packets
to the caller) but not for ExternalMedia channels (`rtp_statistics` answers 404 "RTP info not
found": chan_rtp lends its RTP instance only to channels made with an option externalMedia
never sets) nor for snoops (403). So every `interval_s` the caller's statistics are read;
their packet counts are exported, and a call whose audio flows one way only for
`one_way_after_s` — the caller hears nothing (no audio from the agent, or the human, reaches
them: only the edge's comfort-noise keepalive, about one packet a second) or the caller sends
nothing (a muted phone, a NAT that eats their RTP) — is flagged once per silent stretch, as a
metric and a timeline event (`media.one_way_audio`); `audio_restored` follows when audio flows
both ways again."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from controller.media.ari import AriError
from controller.media.plane import MediaPlane

log = logging.getLogger("callfabric.media.health")

AUDIO_PPS = 5.0  # below this a direction carries no audio: 20-60 ms frames are 16-50 packets/s,
#                  the edge endpoint's rtp_keepalive comfort noise about 1 packet/s


@dataclass(slots=True)
class _Direction:
    silent_s: float = 0.0  # how long this direction has carried no audio while the other did
    flagged: bool = False


@dataclass(slots=True)
class _Caller:
    channel: str
    tx: int = -1  # packets Asterisk sent to the caller, at the last look (-1: not looked yet)
    rx: int = -1  # packets Asterisk received from the caller
    at: float = 0.0
    to_caller: _Direction = field(default_factory=_Direction)
    from_caller: _Direction = field(default_factory=_Direction)


class MediaHealth:
    def __init__(self, plane: MediaPlane, interval_s: float = 5.0, one_way_after_s: float = 10.0,
                 clock=time.monotonic):
        self.plane = plane
        self.clock = clock
        self.interval_s = interval_s
        self.one_way_after_s = one_way_after_s
        self._callers: dict[str, _Caller] = {}  # call id -> what we saw of its caller's channel

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        live = [m for m in list(self.plane.calls.values())
                if m.state in ("active", "transferring") and m.caller_channel]
        for call_id in set(self._callers) - {m.call_id for m in live}:
            del self._callers[call_id]
        await asyncio.gather(*(self._check(media) for media in live))

    async def _check(self, media) -> None:
        seen = self._callers.get(media.call_id)
        if seen is None or seen.channel != media.caller_channel:
            seen = self._callers[media.call_id] = _Caller(media.caller_channel)
        try:
            stats = await self.plane.nodes[media.node].rtp_statistics(media.caller_channel)
        except AriError as exc:
            log.debug("call %s: caller's rtp statistics: %s", media.call_id, exc)
            return
        if not isinstance(stats, dict):
            return
        try:
            tx, rx = int(stats.get("txcount") or 0), int(stats.get("rxcount") or 0)
        except (TypeError, ValueError):
            log.warning("call %s: unreadable rtp statistics: %r", media.call_id, stats)
            return
        now = self.clock()
        metrics = self.plane.metrics
        if seen.tx < 0:
            metrics.rtp_packets.labels("caller", "sent").inc(tx)
            metrics.rtp_packets.labels("caller", "received").inc(rx)
            seen.tx, seen.rx, seen.at = tx, rx, now
            return
        elapsed = max(now - seen.at, 1e-3)
        sent, received = max(0, tx - seen.tx), max(0, rx - seen.rx)
        metrics.rtp_packets.labels("caller", "sent").inc(sent)
        metrics.rtp_packets.labels("caller", "received").inc(received)
        seen.tx, seen.rx, seen.at = tx, rx, now
        to_audio, from_audio = sent / elapsed >= AUDIO_PPS, received / elapsed >= AUDIO_PPS
        await self._judge(media, seen.to_caller, "agent", to_audio, from_audio, elapsed, tx, rx,
                          "the caller hears nothing: no audio from the agent reaches them")
        await self._judge(media, seen.from_caller, "caller", from_audio, to_audio, elapsed, tx, rx,
                          "no audio from the caller reaches the call")

    async def _judge(self, media, direction: _Direction, leg: str, audio: bool, other: bool, elapsed: float,
                     tx: int, rx: int, problem: str) -> None:
        if audio:
            if direction.flagged:
                await self.plane.timeline(media, "audio_restored", leg=leg, after_s=round(direction.silent_s, 1))
            direction.silent_s, direction.flagged = 0.0, False
            return
        if not other:  # nothing either way (on hold, both silent): not one-way
            return
        direction.silent_s += elapsed
        if direction.flagged or direction.silent_s < self.one_way_after_s:
            return
        direction.flagged = True
        self.plane.metrics.one_way_audio.labels(leg).inc()
        log.warning("call %s: %s for %.0f s", media.call_id, problem, direction.silent_s)
        await self.plane.timeline(media, "one_way_audio", leg=leg, channel=media.caller_channel,
                                  silent_s=round(direction.silent_s, 1), tx=tx, rx=rx, problem=problem)
