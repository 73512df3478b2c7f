"""The call itself: the caller, the call's bridge and its AI agent leg. An inbound caller is
answered and bridged with its agent (and the forks its decision names); an outbound call is
originated through the edge and its agent joins on answer; the call moves between agents
(the caller never leaves the bridge) and is hung up."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from controller.media.ari import AriError
from controller.media.feature import Endpoint, Feature, FollowUp, MediaError
from controller.media.headers import context_headers
from controller.media.model import AgentLeg, CallMedia, call_token, session_uuid
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media")


class Call(Feature):
    # -- actions ---------------------------------------------------------------------------------
    async def originate(self, call_id: str, uri: str, agent: Endpoint, *, caller_id: str | None = None,
                        context: dict[str, str] | None = None, amd_ms: int = 0) -> dict[str, Any]:
        """An outbound call through the edge; when it is answered, the agent joins it. With
        `amd_ms`, answering-machine detection runs first, for at most that long (plane.amd)."""
        plane = self.plane
        node = next((name for name in plane.nodes
                     if plane.metrics.registry.get_sample_value("callfabric_ari_connected", {"node": name})), None)
        if node is None:
            raise MediaError("no media node is connected", 503)
        token = call_token(call_id)
        media = CallMedia(call_id=call_id, token=token, node=node, caller_channel="", bridge="", started_ms=now_ms(),
                          direction="outbound", pending_agent=agent.name)
        media.caller_channel = media.next_id("out")
        media.bridge = media.next_id("bridge")
        headers = await context_headers(plane.store, plane.api_base_url, call_id, context or {})
        record = {"state": "routing", "outcome": "agent", "rule": "api-originate", "target": agent.name,
                  "direction": "outbound", "dialled": uri, "created_at_ms": media.started_ms,
                  "controller": plane.instance_id,
                  "decision": {"outcome": "agent", "rule": "api-originate", "agent": {"name": agent.name}}}
        await plane.store.create(call_id, record, live_scopes={}, window_counters=[], at_ms=media.started_ms,
                                 event={"event": "originating", "ts": media.started_ms, "to": uri, "agent": agent.name})
        plane.track(media)
        async with plane.lock(call_id):
            await plane.store.add_media_call(node, call_id)
            await plane.save(media, "media_start", node=node, channel=media.caller_channel, agent=agent.name)
            client = plane.nodes[node]
            variables = {f"PJSIP_HEADER(add,{n})": v for n, v in headers.items()}
            try:
                if amd_ms:
                    where, amd_variables = plane.amd.dialplan(call_id, amd_ms)
                    await client.originate(media.caller_channel, f"PJSIP/{plane.edge_endpoint}/{uri}",
                                           caller_id=caller_id, variables={**variables, **amd_variables},
                                           dialplan=where)
                    # in the dialplan until AMD() is done: its events reach us only when subscribed
                    await client.request("subscribe", "POST", f"/applications/{client.app}/subscription",
                                         params={"eventSource": f"channel:{media.caller_channel}"})
                    if await client.request("getChannel", "GET", f"/channels/{media.caller_channel}",
                                            ok_missing=True) is None:
                        raise AriError("originate", 404, "the call failed before it could be followed")
                else:
                    await client.originate(media.caller_channel, f"PJSIP/{plane.edge_endpoint}/{uri}",
                                           app_args=f"outbound,{call_id}", caller_id=caller_id, variables=variables)
            except AriError as exc:
                await plane.timeline(media, "originate_failed", reason=str(exc))
                await plane.teardown(media, "originate-failed")
                raise MediaError(f"could not call {uri}: {exc}", 502) from None
        return {"call_id": call_id, "node": node, "channel": media.caller_channel, "agent": agent.name}

    async def transfer(self, call_id: str, agent_name: str) -> dict[str, Any]:
        """Move the call to another AI agent: the new leg joins the bridge, then the old one
        leaves. The caller never leaves the bridge; forks keep running."""
        plane = self.plane
        agent = plane.resolve_agent(agent_name)
        if agent is None:
            raise MediaError(f"unknown agent {agent_name!r}", 422)
        media = plane.live(call_id)
        async with plane.lock(call_id):
            media = plane.live(call_id)
            previous = media.agent
            media.state = "transferring"
            await plane.save(media, "transfer_started", to_agent=agent.name,
                             from_agent=previous.name if previous else None)
            started = time.perf_counter()
            try:
                media.agent = await self.start_agent(media, agent)
            except (AriError, MediaError, asyncio.TimeoutError) as exc:
                media.agent = previous
                media.state = "active"
                plane.metrics.transfers.labels("agent", "failed").inc()
                await plane.save(media, "transfer_failed", to_agent=agent.name, reason=str(exc))
                raise MediaError(f"transfer to {agent.name} failed: {exc or type(exc).__name__}", 502) from None
            if previous is not None:
                previous.state = "stopping"
                media.old_agents.append(previous)
                client = plane.nodes[media.node]
                await plane.quietly(client.remove_channel(media.bridge, previous.channel))
                await plane.quietly(client.hangup(previous.channel))
            media.state = "active"
            plane.metrics.transfers.labels("agent", "completed").inc()
            await plane.save(media, "transfer_completed", to_agent=agent.name,
                             from_agent=previous.name if previous else None,
                             transfer_ms=round((time.perf_counter() - started) * 1000, 1))
            return {"agent": agent.name, "channel": media.agent.channel}

    async def hangup(self, call_id: str) -> None:
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            await plane.timeline(media, "hangup_requested")
            await plane.teardown(media, "hangup", hang_up_caller=True)

    # -- set-up ----------------------------------------------------------------------------------
    async def arrived(self, node: str, channel: dict[str, Any], args: list[Any]) -> None:
        """A caller entered our application (or a resync found it there): bridge it with its agent."""
        plane = self.plane
        channel_id = channel.get("id", "")
        try:
            call_id = str(args[0]) if args and args[0] else str(channel.get("protocol_id") or channel_id)
            requested_agent = str(args[1]) if len(args) > 1 and args[1] else ""
            started = time.perf_counter()
            client = plane.nodes[node]
            agent, forks, decision = await self._agent_for(call_id, requested_agent, with_decision=True)
            if agent is None:
                log.error("call %s: no agent for this call (decision %r, requested %r): hanging up",
                          call_id, decision.get("outcome"), requested_agent)
                named = (decision.get("agent") or {}).get("name") or requested_agent
                await plane.store.append_event(call_id, {"event": "media_refused", "ts": now_ms(), "node": node,
                                                         "reason": f"no agent ({named or 'none'})"})
                await plane.quietly(client.hangup(channel_id, "unallocated"))
                return
            media = CallMedia(call_id=call_id, token=call_token(call_id), node=node, caller_channel=channel_id,
                              bridge="", started_ms=now_ms(), max_duration_s=decision.get("max_duration_s"))
            media.bridge = media.next_id("bridge")
            plane.track(media)
        finally:
            plane.arriving.discard(channel_id)
        async with plane.lock(call_id):
            await plane.store.add_media_call(node, call_id)
            await plane.save(media, "media_start", node=node, channel=channel_id, agent=agent.name)
        await self._connect_agent(media, agent, forks, started, answer=True, on_answer=_on_answer(decision))

    async def set_up_again(self, media: CallMedia, caller: dict[str, Any], bridges: set[str]) -> None:
        """A call whose set-up was cut short: its partial objects go, then it is set up anew."""
        plane = self.plane
        client = plane.nodes[media.node]
        for bridge_id in media.bridges():
            if bridge_id in bridges:
                await plane.quietly(client.destroy_bridge(bridge_id))
        plane.forks.abandon(media)
        media.bridge = media.next_id("bridge")
        args = plane.stasis_args(client, caller) or []
        agent, forks, decision = await self._agent_for(media.call_id, str(args[1]) if len(args) > 1 and args[1] else "",
                                                       with_decision=True)
        if agent is None:
            await plane.timeline(media, "media_refused", node=media.node, reason="no agent")
            await plane.teardown(media, "no-agent", hang_up_caller=True)
            return
        await plane.save(media, "media_start", node=media.node, channel=media.caller_channel, agent=agent.name,
                         detail="set up again after a controller change")
        plane.spawn(media.node, self._connect_agent(media, agent, forks, time.perf_counter(), answer=True,
                                                    on_answer=_on_answer(decision)), "setup")

    async def _agent_for(self, call_id: str, requested_agent: str, with_decision: bool = False):
        """The agent (and forks) the call's decision names, else the one the edge asked for."""
        record = await self._record(call_id)
        decision = record.get("decision") if isinstance(record, dict) and isinstance(record.get("decision"), dict) else {}
        agent_name = (decision.get("agent") or {}).get("name") or requested_agent
        agent = self.plane.resolve_agent(agent_name) if agent_name else None
        forks = decision.get("forks") if isinstance(decision.get("forks"), list) else []
        return (agent, forks, decision) if with_decision else (agent, forks)

    async def _record(self, call_id: str) -> dict[str, Any] | None:
        try:
            return await self.plane.store.get(call_id)
        except RedisError as exc:
            log.error("call %s: cannot read its record: %s", call_id, exc)
            return None

    async def _connect_agent(self, media: CallMedia, agent: Endpoint, forks: list[Any], started: float, *,
                             answer: bool, on_answer: list[dict[str, Any]] | None = None) -> None:
        """Bridge the caller with the agent, then (inbound) answer: the agent leg is in the
        bridge before the caller's first packet, so none of the caller's audio is lost. The
        forks start beside it; once connected, the decision's media actions (record, gather)
        are carried out (`MediaPlane.on_connected`).

        Asterisk work happens outside the call's lock (events about the call, forks starting
        beside the agent leg, must not wait for it); the lock guards the record only."""
        plane = self.plane
        client = plane.nodes[media.node]
        call_id, channel_id = media.call_id, media.caller_channel
        for fork in forks:
            if isinstance(fork, dict) and fork.get("target"):
                target = Endpoint(fork["target"], fork.get("endpoint", ""), fork.get("transport", "rtp"),
                                  fork.get("codec", "slin16"))
                plane.spawn(media.node, plane.quietly(plane.forks.start(call_id, target, fork.get("direction", "in"),
                                                                        started=started, during_setup=True)),
                            "fork")
        leg = self._agent_leg(media, agent)
        try:
            await asyncio.gather(client.create_bridge(media.bridge, f"call-{media.token}"),
                                 self._bring_up(media, leg, agent))
            await client.add_channel(media.bridge, f"{channel_id},{leg.channel}")
            if answer:
                await client.answer(channel_id)
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            log.error("call %s: media setup failed: %s", call_id, exc)
            await plane.quietly(client.hangup(leg.channel))
            async with plane.lock(call_id):
                await plane.timeline(media, "media_failed", reason=str(exc) or type(exc).__name__)
                await plane.teardown(media, "setup-failed", hang_up_caller=True)
            return
        leg.state, leg.up_ms = "up", now_ms()
        async with plane.lock(call_id):
            if media.state in ("ending", "ended"):  # the caller left during set-up
                await plane.quietly(client.hangup(leg.channel))
                return
            media.agent = leg
            media.state = "active"
            await plane.save(media, "media_up", setup_ms=round((time.perf_counter() - started) * 1000, 1),
                             agent=agent.name)
        if on_answer and plane.on_connected is not None:
            plane.spawn(media.node, plane.on_connected(call_id, on_answer), "on-answer actions")

    async def start_agent(self, media: CallMedia, agent: Endpoint) -> AgentLeg:
        """A new agent leg, up and in the call's bridge (the caller decides when it becomes
        `media.agent`)."""
        leg = self._agent_leg(media, agent)
        await self._bring_up(media, leg, agent)
        await self.plane.nodes[media.node].add_channel(media.bridge, leg.channel)
        leg.state, leg.up_ms = "up", now_ms()
        return leg

    @staticmethod
    def _agent_leg(media: CallMedia, agent: Endpoint) -> AgentLeg:
        channel_id = media.next_id("agent")
        return AgentLeg(name=agent.name, channel=channel_id, endpoint=agent.endpoint, transport=agent.transport,
                        codec=agent.codec, started_ms=now_ms(),
                        session=session_uuid(channel_id) if agent.transport == "audiosocket" else "")

    async def _bring_up(self, media: CallMedia, leg: AgentLeg, agent: Endpoint) -> None:
        """The agent leg's ExternalMedia channel, in our application (not yet bridged)."""
        channel = await self.plane.external_media(media, leg.channel, agent)
        variables = channel.get("channelvars") or {}
        if variables.get("UNICASTRTP_LOCAL_ADDRESS"):
            leg.local_rtp = f"{variables['UNICASTRTP_LOCAL_ADDRESS']}:{variables.get('UNICASTRTP_LOCAL_PORT', '')}"

    # -- ARI events ------------------------------------------------------------------------------
    def owns(self, media: CallMedia, channel_id: str) -> bool:
        return media.direction == "outbound" and channel_id == media.caller_channel

    async def entered(self, media: CallMedia, channel_id: str, channel: dict[str, Any]) -> None:
        """An outbound call was answered: its agent joins."""
        plane = self.plane
        if media.state != "setup":
            return
        agent = plane.resolve_agent(media.pending_agent)
        if agent is None:
            async with plane.lock(media.call_id):
                await plane.timeline(media, "media_failed", reason=f"unknown agent {media.pending_agent!r}")
                await plane.teardown(media, "no-agent", hang_up_caller=True)
            return
        await plane.timeline(media, "answered", channel=channel_id)
        await plane.store.transition(media.call_id, "answered", {"answered_at_ms": now_ms()},
                                     {"event": "answered", "ts": now_ms(), "by": "media"})
        await plane.amd.detected(media, plane.stasis_args(plane.nodes[media.node], channel) or [])
        await self._connect_agent(media, agent, [], time.perf_counter(), answer=False)

    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        plane = self.plane
        if channel_id == media.caller_channel:
            if media.state not in ("ending", "ended"):
                await plane.timeline(media, "caller_left", cause=cause)
                await plane.teardown(media, "caller-hangup")
            return True
        if media.agent and media.agent.channel == channel_id:
            if media.agent.state in ("starting", "up"):
                media.agent.state = "gone"
                await plane.save(media, "agent_lost", agent=media.agent.name, cause=cause)
            return True
        for old in list(media.old_agents):
            if old.channel == channel_id:
                media.old_agents.remove(old)
                await plane.save(media, "agent_released", agent=old.name)
                return True
        return False

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        if media.agent and media.agent.state in ("starting", "up") and media.agent.channel not in channels:
            media.agent.state = "gone"
            return True
        return False

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """Old agents still there are hung up; an interrupted transfer is recorded as failed."""
        plane = self.plane
        client = plane.nodes[media.node]
        for old in list(media.old_agents):
            if old.channel in channels:
                await plane.quietly(client.hangup(old.channel))
            else:
                media.old_agents.remove(old)
        if media.state == "transferring":
            media.state = "active"
            plane.metrics.transfers.labels("agent", "failed").inc()
            await plane.save(media, "transfer_failed", reason="interrupted: the controller carrying it out stopped")
        return []

    def ending(self, media: CallMedia) -> None:
        if media.agent:
            media.agent.state = "gone"


def _on_answer(decision: dict[str, Any]) -> list[dict[str, Any]]:
    """The decision's media actions (record, gather), as recorded."""
    actions = decision.get("on_answer")
    return [a for a in actions if isinstance(a, dict)] if isinstance(actions, list) else []
