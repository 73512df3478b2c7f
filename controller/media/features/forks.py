"""Forks (taps): a live one-way copy of the caller's audio, of what the caller hears, or
both, to a fork target (STT, recorder), the call undisturbed. Several per call, started and
stopped at any time; a fork that fails never takes the call down.

Two ways to make one:
- **edge**: the edge's rtpengine, which already carries the call's RTP (media anchored), sends a
  copy of one party's packets to the target itself (NG `subscribe request` / `subscribe answer`):
  no Asterisk channel, no snoop timer, the packets as they arrive. For RTP targets in µ-law or
  A-law, one direction (in: the caller; out: what the caller hears).
- **snoop**: an Asterisk snoop channel and an ExternalMedia channel in their own bridge (any
  transport, codec and direction, also when the call is not anchored at an edge).
The `fork_mode` setting says which one is wanted; a fork that cannot be made at the edge (the
call is not anchored there, both directions, another transport) is made with a snoop."""
from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from typing import Any

from controller.media.ari import AriError
from controller.media.feature import LEG_UP_TIMEOUT_S, Endpoint, Feature, FollowUp, MediaError
from controller.media.model import CallMedia, ForkLeg, session_uuid
from controller.media.rtpengine import RtpengineClient, RtpengineError
from controller.state.calls import now_ms

LIVE = ("starting", "up")
EDGE_CODECS = {"ulaw": (0, "PCMU"), "alaw": (8, "PCMA")}
CALLEE_WAIT_S = 3.0  # an `out` fork at set-up: the edge may not have the answer yet


class EdgeForkUnavailable(Exception):
    """This fork cannot be made at the edge (it is made with a snoop instead)."""


class Forks(Feature):
    # -- actions ---------------------------------------------------------------------------------
    async def start(self, call_id: str, target: Endpoint, direction: str = "in", *,
                    started: float | None = None, during_setup: bool = False) -> dict[str, Any]:
        """A live one-way copy of the caller's audio (spy in), of what the caller hears (out)
        or both, to a fork target.

        The call's lock is held only to change its record: the snoop, the ExternalMedia
        channel and the fork's bridge are created together, outside it, so forks start in
        parallel with each other and with the agent leg."""
        plane = self.plane
        if direction not in ("in", "out", "both"):
            raise MediaError(f"fork direction must be in, out or both, not {direction!r}", 422)
        t0 = started if started is not None else time.perf_counter()
        if plane.fork_mode == "edge" and plane.rtpengines:
            try:
                return await self._start_edge(call_id, target, direction, t0, during_setup)
            except EdgeForkUnavailable as exc:
                await plane.store.append_event(call_id, {"event": "fork_at_edge_unavailable", "ts": now_ms(),
                                                         "target": target.name, "reason": str(exc)})
        async with plane.lock(call_id):
            media = plane.calls.get(call_id) if during_setup else plane.live(call_id)
            if media is None or media.state in ("ending", "ended"):
                raise MediaError(f"call {call_id!r} has ended", 409)
            fork_id = f"f{media.sequence + 1}"
            fork = ForkLeg(fork_id=fork_id, target=target.name, endpoint=target.endpoint, transport=target.transport,
                           codec=target.codec, direction=direction, snoop=media.next_id("snoop"),
                           channel=media.next_id("fork"), bridge=media.next_id("forkbridge"), started_ms=now_ms())
            if target.transport == "audiosocket":
                fork.session = session_uuid(fork.channel)
            media.forks[fork_id] = fork
            await plane.save(media, "fork_starting", fork=fork_id, target=target.name, direction=direction)
        client = plane.nodes[media.node]
        try:
            snoop_up = plane.waiter(fork.snoop)
            await asyncio.gather(
                plane.confirmed(fork.snoop, client.snoop(media.caller_channel, fork.snoop, spy=direction,
                                                         app_args=f"fork,{fork_id}")),
                plane.external_media(media, fork.channel, target),
                client.create_bridge(fork.bridge, f"fork-{media.token}-{fork_id}"))
            await asyncio.wait_for(snoop_up, LEG_UP_TIMEOUT_S)
            await asyncio.gather(client.add_channel(fork.bridge, fork.snoop), client.add_channel(fork.bridge, fork.channel))
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            plane.forget_waiter(fork.snoop)
            async with plane.lock(call_id):
                fork.state, fork.reason = "failed", str(exc) or type(exc).__name__
                plane.metrics.forks_failed.labels("start").inc()
                await plane.save(media, "fork_failed", fork=fork_id, reason=fork.reason)
            await self._remove(media, fork)
            raise MediaError(f"fork to {target.name} failed: {fork.reason}", 502) from None
        async with plane.lock(call_id):
            if media.state in ("ending", "ended") or fork.state != "starting":  # the call ended meanwhile
                await self._remove(media, fork)
                raise MediaError(f"call {call_id!r} ended while its fork started", 409)
            fork.state, fork.up_ms = "up", now_ms()
            elapsed = time.perf_counter() - t0
            plane.metrics.fork_start_seconds.observe(elapsed)
            plane.metrics.forks_started.inc()
            plane.metrics.forks_active.inc()
            await plane.save(media, "fork_started", fork=fork_id, target=target.name, mode="snoop",
                             start_ms=round(elapsed * 1000, 1))
            return {"fork_id": fork_id, "target": target.name, "direction": direction}

    async def _start_edge(self, call_id: str, target: Endpoint, direction: str, t0: float,
                          during_setup: bool) -> dict[str, Any]:
        """A copy of one party's RTP made by the edge's rtpengine (see the module's docstring)."""
        plane = self.plane
        if target.transport != "rtp" or target.codec not in EDGE_CODECS:
            raise EdgeForkUnavailable(f"{target.transport}/{target.codec} target (the edge sends RTP in ulaw or alaw)")
        if direction == "both":
            raise EdgeForkUnavailable("both directions (the edge copies one party's packets, it does not mix)")
        host, _, port = target.endpoint.rpartition(":")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise EdgeForkUnavailable(f"target {target.endpoint!r} is not ip:port") from None
        record = await plane.store.get(call_id) or {}
        caller_tag = record.get("from_tag")
        if not caller_tag:
            raise EdgeForkUnavailable("the call's record has no from-tag")
        client, tags = await self._anchoring(call_id)
        party = caller_tag if direction == "in" else await self._callee_tag(client, call_id, caller_tag, tags)
        async with plane.lock(call_id):
            media = plane.calls.get(call_id) if during_setup else plane.live(call_id)
            if media is None or media.state in ("ending", "ended"):
                raise MediaError(f"call {call_id!r} has ended", 409)
            fork_id = f"f{media.sequence + 1}"
            media.sequence += 1
            fork = ForkLeg(fork_id=fork_id, target=target.name, endpoint=target.endpoint, transport=target.transport,
                           codec=target.codec, direction=direction, snoop="", channel="", bridge="",
                           started_ms=now_ms(), mode="edge", rtpengine=client.name)
            media.forks[fork_id] = fork
            await plane.save(media, "fork_starting", fork=fork_id, target=target.name, direction=direction,
                             mode="edge")
        try:
            offer = await client.request("subscribe request", **{"call-id": call_id, "from-tag": party})
            fork.edge_tag = str(offer["to-tag"])
            await client.request("subscribe answer", **{
                "call-id": call_id, "to-tag": fork.edge_tag, "flags": ["allow transcoding"],
                "sdp": _target_sdp(str(offer.get("sdp", "")), host, int(port), target.codec)})
        except (RtpengineError, KeyError, ValueError) as exc:
            async with plane.lock(call_id):
                fork.state, fork.reason = "failed", str(exc) or type(exc).__name__
                plane.metrics.forks_failed.labels("start").inc()
                await plane.save(media, "fork_failed", fork=fork_id, reason=fork.reason)
            await self._remove(media, fork)
            raise MediaError(f"fork to {target.name} failed: {fork.reason}", 502) from None
        async with plane.lock(call_id):
            if media.state in ("ending", "ended") or fork.state != "starting":
                await self._remove(media, fork)
                raise MediaError(f"call {call_id!r} ended while its fork started", 409)
            fork.state, fork.up_ms = "up", now_ms()
            elapsed = time.perf_counter() - t0
            plane.metrics.fork_start_seconds.observe(elapsed)
            plane.metrics.forks_started.inc()
            plane.metrics.forks_active.inc()
            await plane.save(media, "fork_started", fork=fork_id, target=target.name, mode="edge",
                             start_ms=round(elapsed * 1000, 1))
            return {"fork_id": fork_id, "target": target.name, "direction": direction, "mode": "edge"}

    async def _anchoring(self, call_id: str) -> tuple[RtpengineClient, dict[str, Any]]:
        """The rtpengine carrying the call's media, and its parties (tags)."""
        for client in self.plane.rtpengines:
            try:
                reply = await client.request("query", **{"call-id": call_id})
            except RtpengineError:
                continue
            tags = reply.get("tags")
            if isinstance(tags, dict) and tags:
                return client, tags
        raise EdgeForkUnavailable("the call's media is not anchored at an edge this controller knows")

    async def _callee_tag(self, client: RtpengineClient, call_id: str, caller_tag: str,
                          tags: dict[str, Any]) -> str:
        """The party the caller talks with (its offer/answer peer), once the edge has the answer."""
        deadline = time.monotonic() + CALLEE_WAIT_S
        while True:
            entry = tags.get(caller_tag)
            peers = [s.get("tag") for s in (entry or {}).get("subscriptions", [])
                     if isinstance(s, dict) and s.get("type") == "offer/answer" and s.get("tag")]
            if peers:
                return str(peers[0])
            if time.monotonic() >= deadline:
                raise EdgeForkUnavailable("the edge has no answer for the call yet")
            await asyncio.sleep(0.05)
            _, tags = await self._anchoring(call_id)

    async def stop(self, call_id: str, fork_id: str) -> None:
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            fork = media.forks.get(fork_id)
            if fork is None:
                raise MediaError(f"call has no fork {fork_id!r}", 404)
            if fork.state not in LIVE:
                raise MediaError(f"fork {fork_id} is already {fork.state}")
            fork.state = "stopping"
            await self._remove(media, fork)
            fork.state = "gone"
            plane.metrics.forks_active.dec()
            await plane.save(media, "fork_stopped", fork=fork_id)

    def abandon(self, media: CallMedia) -> None:
        """The call is set up anew (its forks with it): its running forks are failed."""
        for fork in media.forks.values():
            if fork.state in LIVE:
                fork.state = "failed"
                self.plane.metrics.forks_active.dec()

    async def _remove(self, media: CallMedia, fork: ForkLeg) -> None:
        if fork.mode == "edge":
            client = next((c for c in self.plane.rtpengines if c.name == fork.rtpengine), None)
            if client is not None and fork.edge_tag:
                try:
                    await client.request("unsubscribe", **{"call-id": media.call_id, "to-tag": fork.edge_tag})
                except RtpengineError:
                    pass  # gone with the call already
            return
        client = self.plane.nodes[media.node]
        await self.plane.quietly(client.hangup(fork.snoop))
        await self.plane.quietly(client.hangup(fork.channel))
        await self.plane.quietly(client.destroy_bridge(fork.bridge))

    # -- ARI events ------------------------------------------------------------------------------
    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        plane = self.plane
        for fork in media.forks.values():
            if channel_id in (fork.channel, fork.snoop) and fork.state in LIVE:
                fork.state, fork.reason = "failed", f"{'target' if channel_id == fork.channel else 'snoop'} channel gone"
                plane.metrics.forks_failed.labels("leg-gone").inc()
                plane.metrics.forks_active.dec()
                await plane.save(media, "fork_failed", fork=fork.fork_id, reason=fork.reason)
                await self._remove(media, fork)
                return True
        return False

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        changed = False
        for fork in media.forks.values():
            if fork.state in LIVE and fork.mode != "edge" and (fork.channel not in channels or fork.snoop not in channels):
                fork.state, fork.reason = "failed", "gone while disconnected"
                changed = True
        return changed

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """Forks that were starting are started again (once the call's record is saved)."""
        restart: list[FollowUp] = []
        for fork in media.forks.values():
            if fork.state == "starting":
                fork.state, fork.reason = "failed", "interrupted: the controller starting it stopped"
                self.plane.metrics.forks_active.dec()
                await self._remove(media, fork)
                target = Endpoint(fork.target, fork.endpoint, fork.transport, fork.codec)
                restart.append(("fork", lambda target=target, direction=fork.direction:
                                self.plane.quietly(self.start(media.call_id, target, direction))))
        return restart

    def ending(self, media: CallMedia) -> None:
        for fork in media.forks.values():
            if fork.state in LIVE:
                fork.state = "gone"
                self.plane.metrics.forks_active.dec()

    def adopted(self, media: CallMedia) -> None:
        self.plane.metrics.forks_active.inc(sum(1 for f in media.forks.values() if f.state in LIVE))

    def released(self, media: CallMedia) -> None:
        self.plane.metrics.forks_active.dec(sum(1 for f in media.forks.values() if f.state in LIVE))


def _target_sdp(offer: str, host: str, port: int, codec: str) -> str:
    """The fork target's answer to rtpengine's subscription offer: receive-only RTP at host:port in
    the target's codec (rtpengine transcodes if the party speaks another)."""
    payload, name = EDGE_CODECS[codec]
    if not re.search(r"^m=audio \d+ ", offer, re.M):
        raise ValueError("rtpengine offered no audio")
    return (f"v=0\r\no=callfabric 1 1 IN IP4 {host}\r\ns=fork\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {payload}\r\na=rtpmap:{payload} {name}/8000\r\na=recvonly\r\n")
