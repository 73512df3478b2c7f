"""Humans: a person called through the edge with the conversation's context in X- headers;
on answer they join the call's bridge (conference), replace the AI agent (handoff), or listen
in (listen: a snoop on the caller hears both sides, and the caller and the agent stay a
two-party bridge — a third member would turn it into a mixing one, ~30 ms more for the agent)."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from controller.media.ari import AriError
from controller.media.feature import LEG_UP_TIMEOUT_S, Feature, FollowUp, MediaError
from controller.media.headers import context_headers
from controller.media.model import CallMedia, HumanLeg
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media")

LIVE = ("starting", "up")
MODES = ("conference", "handoff", "listen")


class Humans(Feature):
    # -- actions ---------------------------------------------------------------------------------
    async def add(self, call_id: str, destination: str, uri: str, *, mode: str = "conference",
                  context: dict[str, str] | None = None, caller_id: str | None = None) -> dict[str, Any]:
        """Call a human through the edge with the conversation's context in X- headers and
        the call's reference (X-Callfabric-Call-Id, which the edge lets through to them),
        showing `caller_id` — by default the caller's own number; on answer they join the
        bridge (conference) or replace the AI agent (handoff)."""
        plane = self.plane
        if mode not in MODES:
            raise MediaError(f"mode must be conference, handoff or listen, not {mode!r}", 422)
        async with plane.lock(call_id):
            media = plane.live(call_id)
            client = plane.nodes[media.node]
            headers = await context_headers(plane.store, plane.api_base_url, call_id, context or {})
            caller_id = caller_id or await self._callers_number(call_id)
            leg = HumanLeg(leg_id=f"h{media.sequence + 1}", destination=destination, uri=uri,
                           channel=media.next_id("human"), mode=mode, started_ms=now_ms())
            media.humans[leg.leg_id] = leg
            await plane.save(media, "human_dialing", leg=leg.leg_id, destination=destination, mode=mode,
                             headers=sorted(headers))
            variables = {f"PJSIP_HEADER(add,{name})": value for name, value in headers.items()}
            try:
                await client.originate(leg.channel, f"PJSIP/{plane.edge_endpoint}/{uri}", app_args=f"human,{leg.leg_id}",
                                       caller_id=caller_id, variables=variables)
            except AriError as exc:
                leg.state, leg.reason = "failed", str(exc)
                await plane.save(media, "human_failed", leg=leg.leg_id, reason=str(exc))
                raise MediaError(f"could not call {destination}: {exc}", 502) from None
            return {"leg_id": leg.leg_id, "destination": destination, "mode": mode}

    async def _callers_number(self, call_id: str) -> str | None:
        """The number of the call's caller (its record's `caller`, normalised), shown to the human."""
        try:
            record = await self.plane.store.get(call_id)
        except RedisError as exc:
            log.warning("call %s: no caller number for the human (%s)", call_id, exc)
            return None
        number = record.get("caller") if isinstance(record, dict) else None
        return number if isinstance(number, str) and number and not set(number) & set("\r\n\0\"<>") else None

    # -- ARI events ------------------------------------------------------------------------------
    def owns(self, media: CallMedia, channel_id: str) -> bool:
        return any(h.channel == channel_id for h in media.humans.values())

    async def entered(self, media: CallMedia, channel_id: str, channel: dict[str, Any]) -> None:
        """A human answered: they join the call (and, for a handoff, the agent leaves)."""
        plane = self.plane
        async with plane.lock(media.call_id):
            human = next((h for h in media.humans.values() if h.channel == channel_id), None)
            if human is None or human.state != "starting" or media.state in ("ending", "ended"):
                return
            client = plane.nodes[media.node]
            try:
                if human.mode == "listen":
                    await self._listen(media, human)
                else:
                    await client.add_channel(media.bridge, channel_id)
            except (AriError, MediaError, asyncio.TimeoutError) as exc:
                human.state, human.reason = "failed", str(exc) or type(exc).__name__
                await plane.save(media, "human_failed", leg=human.leg_id, reason=human.reason)
                await self._release(media, human)
                return
            human.state, human.up_ms = "up", now_ms()
            await plane.save(media, "human_joined", leg=human.leg_id, destination=human.destination, mode=human.mode,
                             answer_ms=human.up_ms - human.started_ms)
            if human.mode == "handoff" and media.agent is not None:
                old = media.agent
                media.agent = None
                old.state = "stopping"
                media.old_agents.append(old)
                await plane.quietly(client.remove_channel(media.bridge, old.channel))
                await plane.quietly(client.hangup(old.channel))
                plane.metrics.transfers.labels("handoff", "completed").inc()
                await plane.save(media, "handoff_completed", from_agent=old.name, to=human.destination)
            elif human.mode == "conference":
                plane.metrics.transfers.labels("conference", "completed").inc()

    async def _listen(self, media: CallMedia, human: HumanLeg) -> None:
        """The human hears the call through a snoop on the caller (both directions: the
        caller, and what the caller hears), in a bridge of their own. Lock held."""
        plane = self.plane
        client = plane.nodes[media.node]
        human.snoop, human.bridge = media.next_id("listensnoop"), media.next_id("listenbridge")
        await plane.save(media, "human_listening", leg=human.leg_id)
        up = plane.waiter(human.snoop)
        try:
            await asyncio.gather(
                plane.confirmed(human.snoop, client.snoop(media.caller_channel, human.snoop, spy="both",
                                                          app_args=f"listen,{human.leg_id}")),
                client.create_bridge(human.bridge, f"listen-{media.token}-{human.leg_id}"))
            await asyncio.wait_for(up, LEG_UP_TIMEOUT_S)
            await client.add_channel(human.bridge, f"{human.snoop},{human.channel}")
        finally:
            plane.forget_waiter(human.snoop)

    async def _release(self, media: CallMedia, human: HumanLeg) -> None:
        """Whatever of a human's leg is still there goes (their channel, a listen snoop and bridge)."""
        client = self.plane.nodes[media.node]
        await self.plane.quietly(client.hangup(human.channel))
        if human.snoop:
            await self.plane.quietly(client.hangup(human.snoop))
        if human.bridge:
            await self.plane.quietly(client.destroy_bridge(human.bridge))

    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        for human in media.humans.values():
            if channel_id in (human.channel, human.snoop) and human.state in LIVE:
                answered = human.state == "up"
                human.state, human.reason = ("gone" if answered else "failed"), str(cause)
                await self.plane.save(media, "human_left" if answered else "human_failed", leg=human.leg_id,
                                      cause=cause)
                await self._release(media, human)
                return True
        return False

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        changed = False
        for human in media.humans.values():
            if human.state in LIVE and human.channel not in channels:
                human.state, human.reason = "gone", "gone while disconnected"
                changed = True
        return changed

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """A human who answered while nobody listened joins now."""
        for human in media.humans.values():
            if human.state == "starting" and channels.get(human.channel, {}).get("state") == "Up":
                self.plane.spawn(media.node, self.plane.leg_entered(media.node, human.channel,
                                                                    channels[human.channel]), "resync-human")
        return []
