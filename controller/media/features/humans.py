"""Humans: a person called through the edge with the conversation's context in X- headers;
on answer they join the call's bridge (conference) or replace the AI agent (handoff)."""
from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from controller.media.ari import AriError
from controller.media.feature import Feature, FollowUp, MediaError
from controller.media.headers import context_headers
from controller.media.model import CallMedia, HumanLeg
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media")

LIVE = ("starting", "up")


class Humans(Feature):
    # -- actions ---------------------------------------------------------------------------------
    async def add(self, call_id: str, destination: str, uri: str, *, mode: str = "conference",
                  context: dict[str, str] | None = None, caller_id: str | None = None) -> dict[str, Any]:
        """Call a human through the edge with the conversation's context in X- headers and
        the call's reference (X-Callfabric-Call-Id, which the edge lets through to them),
        showing `caller_id` — by default the caller's own number; on answer they join the
        bridge (conference) or replace the AI agent (handoff)."""
        plane = self.plane
        if mode not in ("conference", "handoff"):
            raise MediaError(f"mode must be conference or handoff, not {mode!r}", 422)
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
                await client.add_channel(media.bridge, channel_id)
            except AriError as exc:
                human.state, human.reason = "failed", str(exc)
                await plane.save(media, "human_failed", leg=human.leg_id, reason=str(exc))
                await plane.quietly(client.hangup(channel_id))
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
            else:
                plane.metrics.transfers.labels("conference", "completed").inc()

    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        for human in media.humans.values():
            if human.channel == channel_id and human.state in LIVE:
                answered = human.state == "up"
                human.state, human.reason = ("gone" if answered else "failed"), str(cause)
                await self.plane.save(media, "human_left" if answered else "human_failed", leg=human.leg_id,
                                      cause=cause)
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
