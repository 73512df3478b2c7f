"""The media plane: our Stasis application on every Asterisk node.

When a call the edge routed reaches a node, the plane answers it, bridges the caller with
the AI agent's media endpoint (an ExternalMedia channel), starts the forks the decision asks
for (snoop + ExternalMedia in their own bridge: a one-way live copy), and from then on
carries out mid-call actions: transfer to another agent (the caller never leaves the bridge),
bring a human in through the edge with context headers, play audio, start and stop forks,
hang up. Every change is written to Redis (the call's media record and timeline) before the
next step, so another controller can carry on from Redis + ARI.

Each node's events are handled by one controller at a time (its lease owner, see
ownership.py): `adopt_node` takes the node's live calls from Redis, `serve_node` consumes
its events and resyncs with ARI after every (re)connection — settling whatever a previous
owner left half done — and `release_node` lets the node go. Media records are written with
the owner's fence, so a controller that lost a node cannot overwrite its successor's work."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from redis.exceptions import RedisError

from controller.actions import header_name_problem, sanitize_header_value
from controller.media.ari import AriClient, AriError
from controller.media.model import (
    AgentLeg, CallMedia, ForkLeg, HumanLeg, call_token, parse_object_id, session_uuid,
)
from controller.metrics import Metrics
from controller.state.calls import CallStore, FencedOut, now_ms

log = logging.getLogger("callfabric.media")

LEG_UP_TIMEOUT_S = 5.0
MAX_CONTEXT_HEADER_BYTES = 256  # a longer summary travels as a reference to the API


class MediaError(Exception):
    """An action that could not be carried out (unknown call, ended call, ARI refused …)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an agent or fork target's audio goes, and how."""

    name: str
    endpoint: str
    transport: str  # rtp | audiosocket | websocket
    codec: str


def external_media_params(target: Endpoint) -> dict[str, str]:
    """ExternalMedia parameters for an endpoint (see POST /channels/externalMedia)."""
    if target.transport == "audiosocket":
        return {"encapsulation": "audiosocket", "transport": "tcp", "external_host": target.endpoint}
    if target.transport == "websocket":
        return {"encapsulation": "none", "transport": "websocket", "external_host": target.endpoint}
    return {"encapsulation": "rtp", "transport": "udp", "external_host": target.endpoint}


class MediaPlane:
    def __init__(self, nodes: dict[str, AriClient], store: CallStore, metrics: Metrics, *,
                 resolve_agent: Callable[[str], Endpoint | None],
                 resolve_fork_target: Callable[[str], Endpoint | None],
                 edge_endpoint: str, instance_id: str, api_base_url: str = ""):
        self.nodes = nodes
        self.store = store
        self.metrics = metrics
        self.resolve_agent = resolve_agent
        self.resolve_fork_target = resolve_fork_target
        self.edge_endpoint = edge_endpoint  # PJSIP endpoint of the Kamailio edge on the media nodes
        self.instance_id = instance_id
        self.api_base_url = api_base_url.rstrip("/")
        self.calls: dict[str, CallMedia] = {}  # call id -> media (calls on nodes this controller serves)
        self.fences: dict[str, int] = {}  # node -> the fence of our lease on it (0: no leases)
        self._by_token: dict[str, str] = {}
        self._by_caller: dict[str, str] = {}  # caller channel id -> call id (events name the channel)
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, asyncio.Future] = {}  # channel id -> StasisStart (or failure)
        self._created: dict[str, float] = {}  # waited-for channel id -> when Asterisk confirmed creating it
        self._tasks: dict[str, set[asyncio.Task]] = {}  # node -> event handling in progress
        self._arriving: set[str] = set()  # caller channels being taken in (StasisStart, or found by a resync)
        self._adopted: set[str] = set()  # calls loaded from Redis, settled by the node's next resync
        self._synced: dict[str, asyncio.Event] = {}  # node -> set when a resync has run since adoption
        self._closing: set[str] = set()  # nodes being handed over: no new actions

    # -- node lifecycle ---------------------------------------------------------------------------
    async def serve_node(self, name: str) -> None:
        """Consume a node's events until cancelled, or until another client takes the node's
        application over (ApplicationReplaced: returns); after every (re)connection, resync."""
        client = self.nodes[name]

        async def connected() -> None:
            # Resync runs beside the stream: it takes calls' locks, and an action holding one
            # may be waiting for an event of this very stream.
            self.metrics.ari_connected.labels(name).set(1)
            self._spawn(name, self.resync(name), "resync")

        try:
            async for event in client.events(on_connected=connected):
                if event.get("type") == "ApplicationReplaced":
                    log.error("ARI %s: another client took over application %r: this controller stops handling "
                              "the node's events", name, client.app)
                    return
                self.on_event(name, event)
        finally:
            self.metrics.ari_connected.labels(name).set(0)

    async def recover(self) -> None:
        """After a (re)start without leases: take every node's live calls back from Redis."""
        for name in self.nodes:
            await self.adopt_node(name)
        log.info("media: recovered %d live call(s) from Redis", len(self.calls))

    async def adopt_node(self, node: str, fence: int = 0) -> int:
        """Take `node`'s live calls from Redis (at start, or from a controller that died or
        handed the node over); the node's next resync settles them against ARI. Returns how
        many calls were taken."""
        self.fences[node] = fence
        self._synced.setdefault(node, asyncio.Event()).clear()
        taken = 0
        for call_id in await self.store.media_calls(node):
            if call_id in self.calls:
                continue
            data = await self.store.load_media(call_id)
            try:
                media = CallMedia.from_dict(data) if data is not None else None
            except (TypeError, ValueError, AttributeError) as exc:  # garbage in Redis: say so, skip it
                log.error("call %s: unreadable media record (%s): not taken over", call_id, exc)
                continue
            if media is None or media.state == "ended" or media.node != node:
                await self.store.forget_media(node, call_id)
                continue
            self._track(media)
            self.metrics.forks_active.inc(sum(1 for f in media.forks.values() if f.state in ("starting", "up")))
            self._adopted.add(call_id)
            taken += 1
        return taken

    async def wait_synced(self, node: str) -> None:
        """Until a resync of `node` has run since it was adopted."""
        await self._synced.setdefault(node, asyncio.Event()).wait()

    async def quiesce(self, node: str, wait_s: float) -> None:
        """Before handing `node` over: new actions on its calls are refused (503, retry: the
        next owner answers) and those in progress get at most `wait_s` to finish."""
        self._closing.add(node)
        try:
            async with asyncio.timeout(wait_s):
                tasks = [t for t in self._tasks.get(node, ()) if t is not asyncio.current_task()]
                if tasks:
                    await asyncio.wait(tasks)
                for media in [m for m in self.calls.values() if m.node == node]:
                    async with self._lock(media.call_id):
                        pass
        except TimeoutError:
            log.warning("media node %s: actions still running after %.1fs are abandoned", node, wait_s)

    async def release_node(self, node: str) -> None:
        """Stop acting for `node` (its events are not ours any more) and forget its calls."""
        for task in self._tasks.pop(node, set()):
            if task is not asyncio.current_task():
                task.cancel()
        for media in [m for m in self.calls.values() if m.node == node]:
            self._forget(media)
        self.fences.pop(node, None)
        self._closing.discard(node)

    async def resync(self, node: str) -> None:
        """Compare what Asterisk has with what we think exists: calls whose caller is gone are
        ended, legs that vanished are marked gone, objects of ours nobody owns are removed."""
        client = self.nodes[node]
        # Only calls we knew before looking can be judged by what we saw (a call arriving
        # meanwhile is not in the snapshot, and is not missing from Asterisk).
        before = [m for m in self.calls.values()
                  if m.node == node and (m.state != "setup" or m.call_id in self._adopted)]
        # A call that creates objects after the snapshot (an action waiting for its lock
        # meanwhile) cannot be judged by it: only its caller's absence is meaningful then.
        sequence = {m.call_id: m.sequence for m in before}
        looked = time.monotonic()
        try:
            channels = {c["id"]: c for c in await client.channels()
                        if isinstance(c, dict) and isinstance(c.get("id"), str)}
            bridges = {b["id"] for b in await client.bridges() if isinstance(b, dict) and isinstance(b.get("id"), str)}
        except AriError as exc:
            log.warning("ARI %s: resync failed: %s", node, exc)
            return
        for channel_id, channel in channels.items():  # entered Stasis while we were away: no StasisStart
            if (channel.get("dialplan") or {}).get("app_name") == "Stasis":
                self._resolve(channel_id, channel)
        for channel_id, created in list(self._created.items()):  # created, then gone while we were away
            if created < looked and channel_id not in channels:
                self._fail_waiter(channel_id, "gone while the events websocket was down")
        for media in before:
            async with self._lock(media.call_id):
                if self.calls.get(media.call_id) is not media or media.state == "ended":
                    continue  # ended (or forgotten) while we waited for its lock
                if media.caller_channel not in channels:
                    self._adopted.discard(media.call_id)
                    await self._timeline(media, "resync", detail="caller gone while disconnected")
                    await self._teardown(media, "caller-gone")
                    continue
                if media.sequence != sequence[media.call_id]:
                    self._adopted.discard(media.call_id)
                    continue
                if media.call_id in self._adopted:
                    self._adopted.discard(media.call_id)
                    await self._settle_adopted(media, channels, bridges)
                    if media.state in ("setup", "ending", "ended"):
                        continue
                changed = False
                if media.agent and media.agent.state in ("starting", "up") and media.agent.channel not in channels:
                    media.agent.state = "gone"
                    changed = True
                for fork in media.forks.values():
                    if fork.state in ("starting", "up") and (fork.channel not in channels or fork.snoop not in channels):
                        fork.state, fork.reason = "failed", "gone while disconnected"
                        changed = True
                for human in media.humans.values():
                    if human.state in ("starting", "up") and human.channel not in channels:
                        human.state, human.reason = "gone", "gone while disconnected"
                        changed = True
                if changed:
                    await self._save(media, "resync", detail="legs gone while disconnected")
        callers = {m.caller_channel for m in self.calls.values()}
        for channel_id, channel in channels.items():  # callers whose StasisStart was missed
            args = self._stasis_args(client, channel)
            if args is not None and not parse_object_id(channel_id) and channel_id not in callers \
                    and channel_id not in self._arriving:
                log.warning("ARI %s: caller %s entered the application while nobody listened: taking it in",
                            node, channel_id)
                self._arriving.add(channel_id)
                self._spawn(node, self._caller_arrived(node, channel, args), "resync-caller")
        for channel_id in channels:  # ours, of no live call: left over from a crash or a lost event
            if self._orphan(channel_id):
                log.warning("ARI %s: hanging up orphan channel %s", node, channel_id)
                await self._quietly(client.hangup(channel_id))
        for bridge_id in bridges:
            if self._orphan(bridge_id):
                await self._quietly(client.destroy_bridge(bridge_id))
        self._synced.setdefault(node, asyncio.Event()).set()

    async def _settle_adopted(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> None:
        """A call taken over from another controller (or from before a restart), its caller
        still there: settle what was left half done. Objects of the call its record does not
        name (an action cut short) are removed; an interrupted transfer is recorded as failed;
        old agents are hung up; forks that were starting are started again; a human who
        answered meanwhile joins; a call still being set up is set up again. Lock held."""
        client = self.nodes[media.node]
        named = set(media.our_channels()) | set(media.bridges())
        for object_id_ in [*channels, *bridges]:
            parsed = parse_object_id(object_id_)
            if parsed and parsed[0] == media.token and object_id_ not in named:
                log.warning("call %s: removing %s, left by an action cut short", media.call_id, object_id_)
                await self._quietly(client.hangup(object_id_) if object_id_ in channels
                                    else client.destroy_bridge(object_id_))
        for old in list(media.old_agents):
            if old.channel in channels:
                await self._quietly(client.hangup(old.channel))
            else:
                media.old_agents.remove(old)
        if media.state == "transferring":
            media.state = "active"
            self.metrics.transfers.labels("agent", "failed").inc()
            await self._save(media, "transfer_failed", reason="interrupted: the controller carrying it out stopped")
        restart = []
        for fork in media.forks.values():
            if fork.state == "starting":
                fork.state, fork.reason = "failed", "interrupted: the controller starting it stopped"
                self.metrics.forks_active.dec()
                await self._stop_fork_objects(media, fork)
                restart.append(fork)
        for human in media.humans.values():
            if human.state == "starting" and channels.get(human.channel, {}).get("state") == "Up":
                self._spawn(media.node, self._own_leg_entered(media.node, human.channel, channels[human.channel]),
                            "resync-human")
        if media.state == "setup":
            await self._set_up_again(media, channels.get(media.caller_channel, {}), bridges)
            return
        await self._save(media, "resync", detail="taken over", fence=self.fences.get(media.node, 0))
        for fork in restart:
            target = Endpoint(fork.target, fork.endpoint, fork.transport, fork.codec)
            self._spawn(media.node, self._quietly(self.start_fork(media.call_id, target, fork.direction)), "fork")

    async def _set_up_again(self, media: CallMedia, caller: dict[str, Any], bridges: set[str]) -> None:
        """A call whose set-up was cut short: its partial objects go, then it is set up anew."""
        client = self.nodes[media.node]
        for bridge_id in media.bridges():
            if bridge_id in bridges:
                await self._quietly(client.destroy_bridge(bridge_id))
        for fork in media.forks.values():
            if fork.state in ("starting", "up"):
                fork.state = "failed"
                self.metrics.forks_active.dec()
        media.bridge = media.next_id("bridge")
        args = self._stasis_args(client, caller) or []
        agent, forks = await self._agent_for(media.call_id, str(args[1]) if len(args) > 1 and args[1] else "")
        if agent is None:
            await self._timeline(media, "media_refused", node=media.node, reason="no agent")
            await self._teardown(media, "no-agent", hang_up_caller=True)
            return
        await self._save(media, "media_start", node=media.node, channel=media.caller_channel, agent=agent.name,
                         detail="set up again after a controller change")
        self._spawn(media.node, self._connect_agent(media, agent, forks, time.perf_counter(), answer=True), "setup")

    def _stasis_args(self, client: AriClient, channel: dict[str, Any]) -> list[str] | None:
        """The arguments of a caller waiting in our Stasis application (from its dialplan
        position), else None."""
        dialplan = channel.get("dialplan") if isinstance(channel.get("dialplan"), dict) else {}
        if dialplan.get("app_name") != "Stasis" or not isinstance(dialplan.get("app_data"), str):
            return None
        app, *args = dialplan["app_data"].split(",")
        return args if app == client.app else None

    def _orphan(self, object_id_: str) -> bool:
        parsed = parse_object_id(object_id_)
        return parsed is not None and parsed[0] not in self._by_token

    # -- events -------------------------------------------------------------------------------------
    def on_event(self, node: str, event: dict[str, Any]) -> None:
        """Handle one event. Whoever waits for a channel to enter or leave hears it at once;
        the rest runs in its own task (it may itself wait for later events of the stream),
        serialised per call by the call's lock, taken in event order."""
        kind = event.get("type")
        channel = event.get("channel") if isinstance(event.get("channel"), dict) else {}
        channel_id = channel.get("id", "") if isinstance(channel.get("id", ""), str) else ""
        if not channel_id:
            return
        if kind == "StasisStart":
            if parse_object_id(channel_id):
                self._resolve(channel_id, channel)
                self._spawn(node, self._own_leg_entered(node, channel_id, channel), kind)
            elif channel_id not in self._arriving and self._media_of_channel(channel_id) is None:
                args = event.get("args") if isinstance(event.get("args"), list) else []
                self._arriving.add(channel_id)
                self._spawn(node, self._caller_arrived(node, channel, args), kind)
        elif kind in ("StasisEnd", "ChannelDestroyed"):
            self._fail_waiter(channel_id, f"{kind}: {event.get('cause_txt', 'gone')}")
            media = self._media_of_channel(channel_id)
            if media is not None:
                self._spawn(node, self._gone_locked(media, channel_id, event), kind)

    async def _gone_locked(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        async with self._lock(media.call_id):
            await self._channel_gone(media, channel_id, event)

    def _spawn(self, node: str, coroutine, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.setdefault(node, set()).add(task)
        task.add_done_callback(lambda t: self._task_done(t, node, what))

    def _task_done(self, task: asyncio.Task, node: str, what: str) -> None:
        self._tasks.get(node, set()).discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), MediaError):
            log.warning("media: %s: %s", what, task.exception())
        else:  # one bad event never stops the plane
            log.error("media: handling %s failed", what, exc_info=task.exception())

    async def _caller_arrived(self, node: str, channel: dict[str, Any], args: list[Any]) -> None:
        channel_id = channel.get("id", "")
        try:
            call_id = str(args[0]) if args and args[0] else str(channel.get("protocol_id") or channel_id)
            requested_agent = str(args[1]) if len(args) > 1 and args[1] else ""
            started = time.perf_counter()
            client = self.nodes[node]
            agent, forks, decision = await self._agent_for(call_id, requested_agent, with_decision=True)
            if agent is None:
                log.error("call %s: no agent for this call (decision %r, requested %r): hanging up",
                          call_id, decision.get("outcome"), requested_agent)
                named = (decision.get("agent") or {}).get("name") or requested_agent
                await self.store.append_event(call_id, {"event": "media_refused", "ts": now_ms(), "node": node,
                                                        "reason": f"no agent ({named or 'none'})"})
                await self._quietly(client.hangup(channel_id, "unallocated"))
                return
            media = CallMedia(call_id=call_id, token=call_token(call_id), node=node, caller_channel=channel_id,
                              bridge="", started_ms=now_ms(), max_duration_s=decision.get("max_duration_s"))
            media.bridge = media.next_id("bridge")
            self._track(media)
        finally:
            self._arriving.discard(channel_id)
        async with self._lock(call_id):
            await self.store.add_media_call(node, call_id)
            await self._save(media, "media_start", node=node, channel=channel_id, agent=agent.name)
        await self._connect_agent(media, agent, forks, started, answer=True)

    async def _agent_for(self, call_id: str, requested_agent: str, with_decision: bool = False):
        """The agent (and forks) the call's decision names, else the one the edge asked for."""
        record = await self._record(call_id)
        decision = record.get("decision") if isinstance(record, dict) and isinstance(record.get("decision"), dict) else {}
        agent_name = (decision.get("agent") or {}).get("name") or requested_agent
        agent = self.resolve_agent(agent_name) if agent_name else None
        forks = decision.get("forks") if isinstance(decision.get("forks"), list) else []
        return (agent, forks, decision) if with_decision else (agent, forks)

    async def _connect_agent(self, media: CallMedia, agent: Endpoint, forks: list[Any], started: float, *,
                             answer: bool) -> None:
        """Bridge the caller (inbound: answered here; outbound: already up) with the agent, and
        start the forks beside the agent leg.

        Asterisk work happens outside the call's lock (events about the call, forks starting
        beside the agent leg, must not wait for it); the lock guards the record only."""
        client = self.nodes[media.node]
        call_id, channel_id = media.call_id, media.caller_channel
        try:
            first = [client.create_bridge(media.bridge, f"call-{media.token}")]
            if answer:
                first.append(client.answer(channel_id))
            await asyncio.gather(*first)
            await client.add_channel(media.bridge, channel_id)
            for fork in forks:
                if isinstance(fork, dict) and fork.get("target"):
                    target = Endpoint(fork["target"], fork.get("endpoint", ""), fork.get("transport", "rtp"),
                                      fork.get("codec", "slin16"))
                    self._spawn(media.node, self._quietly(self.start_fork(call_id, target, fork.get("direction", "in"),
                                                                          started=started, during_setup=True)),
                                "fork")
            leg = await self._start_agent(media, agent)
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            log.error("call %s: media setup failed: %s", call_id, exc)
            async with self._lock(call_id):
                await self._timeline(media, "media_failed", reason=str(exc) or type(exc).__name__)
                await self._teardown(media, "setup-failed", hang_up_caller=True)
            return
        async with self._lock(call_id):
            if media.state in ("ending", "ended"):  # the caller left during set-up
                await self._quietly(client.hangup(leg.channel))
                return
            media.agent = leg
            media.state = "active"
            await self._save(media, "media_up", setup_ms=round((time.perf_counter() - started) * 1000, 1),
                             agent=agent.name)

    async def originate(self, call_id: str, uri: str, agent: Endpoint, *, caller_id: str | None = None,
                        context: dict[str, str] | None = None) -> dict[str, Any]:
        """An outbound call through the edge; when it is answered, the agent joins it."""
        node = next((name for name in self.nodes
                     if self.metrics.registry.get_sample_value("callfabric_ari_connected", {"node": name})), None)
        if node is None:
            raise MediaError("no media node is connected", 503)
        token = call_token(call_id)
        media = CallMedia(call_id=call_id, token=token, node=node, caller_channel="", bridge="", started_ms=now_ms(),
                          direction="outbound", pending_agent=agent.name)
        media.caller_channel = media.next_id("out")
        media.bridge = media.next_id("bridge")
        headers = await self._context_headers(call_id, context or {})
        record = {"state": "routing", "outcome": "agent", "rule": "api-originate", "target": agent.name,
                  "direction": "outbound", "dialled": uri, "created_at_ms": media.started_ms,
                  "controller": self.instance_id,
                  "decision": {"outcome": "agent", "rule": "api-originate", "agent": {"name": agent.name}}}
        await self.store.create(call_id, record, live_scopes={}, window_counters=[], at_ms=media.started_ms,
                                event={"event": "originating", "ts": media.started_ms, "to": uri, "agent": agent.name})
        self._track(media)
        async with self._lock(call_id):
            await self.store.add_media_call(node, call_id)
            await self._save(media, "media_start", node=node, channel=media.caller_channel, agent=agent.name)
            try:
                await self.nodes[node].originate(
                    media.caller_channel, f"PJSIP/{self.edge_endpoint}/{uri}", app_args=f"outbound,{call_id}",
                    caller_id=caller_id, variables={f"PJSIP_HEADER(add,{n})": v for n, v in headers.items()})
            except AriError as exc:
                await self._timeline(media, "originate_failed", reason=str(exc))
                await self._teardown(media, "originate-failed")
                raise MediaError(f"could not call {uri}: {exc}", 502) from None
        return {"call_id": call_id, "node": node, "channel": media.caller_channel, "agent": agent.name}

    async def _own_leg_entered(self, node: str, channel_id: str, channel: dict[str, Any]) -> None:
        """A channel we created entered Stasis: an outbound call was answered (its agent joins),
        or a human who answered joins the call."""
        media = self._media_of_channel(channel_id)
        if media is None:
            return
        if media.direction == "outbound" and channel_id == media.caller_channel and media.state == "setup":
            agent = self.resolve_agent(media.pending_agent)
            if agent is None:
                async with self._lock(media.call_id):
                    await self._timeline(media, "media_failed", reason=f"unknown agent {media.pending_agent!r}")
                    await self._teardown(media, "no-agent", hang_up_caller=True)
                return
            await self._timeline(media, "answered", channel=channel_id)
            await self.store.transition(media.call_id, "answered", {"answered_at_ms": now_ms()},
                                        {"event": "answered", "ts": now_ms(), "by": "media"})
            await self._connect_agent(media, agent, [], time.perf_counter(), answer=False)
            return
        async with self._lock(media.call_id):
            human = next((h for h in media.humans.values() if h.channel == channel_id), None)
            if human is None or human.state != "starting" or media.state in ("ending", "ended"):
                return
            client = self.nodes[media.node]
            try:
                await client.add_channel(media.bridge, channel_id)
            except AriError as exc:
                human.state, human.reason = "failed", str(exc)
                await self._save(media, "human_failed", leg=human.leg_id, reason=str(exc))
                await self._quietly(client.hangup(channel_id))
                return
            human.state, human.up_ms = "up", now_ms()
            await self._save(media, "human_joined", leg=human.leg_id, destination=human.destination, mode=human.mode,
                             answer_ms=human.up_ms - human.started_ms)
            if human.mode == "handoff" and media.agent is not None:
                old = media.agent
                media.agent = None
                old.state = "stopping"
                media.old_agents.append(old)
                await self._quietly(client.remove_channel(media.bridge, old.channel))
                await self._quietly(client.hangup(old.channel))
                self.metrics.transfers.labels("handoff", "completed").inc()
                await self._save(media, "handoff_completed", from_agent=old.name, to=human.destination)
            else:
                self.metrics.transfers.labels("conference", "completed").inc()

    async def _channel_gone(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        cause = event.get("cause_txt") or event.get("type")
        if channel_id == media.caller_channel:
            if media.state not in ("ending", "ended"):
                await self._timeline(media, "caller_left", cause=cause)
                await self._teardown(media, "caller-hangup")
            return
        if media.agent and media.agent.channel == channel_id:
            if media.agent.state in ("starting", "up"):
                media.agent.state = "gone"
                await self._save(media, "agent_lost", agent=media.agent.name, cause=cause)
            return
        for old in list(media.old_agents):
            if old.channel == channel_id:
                media.old_agents.remove(old)
                await self._save(media, "agent_released", agent=old.name)
                return
        for fork in media.forks.values():
            if channel_id in (fork.channel, fork.snoop) and fork.state in ("starting", "up"):
                fork.state, fork.reason = "failed", f"{'target' if channel_id == fork.channel else 'snoop'} channel gone"
                self.metrics.forks_failed.labels("leg-gone").inc()
                self.metrics.forks_active.dec()
                await self._save(media, "fork_failed", fork=fork.fork_id, reason=fork.reason)
                await self._stop_fork_objects(media, fork)
                return
        for human in media.humans.values():
            if human.channel == channel_id and human.state in ("starting", "up"):
                answered = human.state == "up"
                human.state, human.reason = ("gone" if answered else "failed"), str(cause)
                await self._save(media, "human_left" if answered else "human_failed", leg=human.leg_id, cause=cause)
                return

    # -- actions ------------------------------------------------------------------------------------
    async def transfer(self, call_id: str, agent_name: str) -> dict[str, Any]:
        """Move the call to another AI agent: the new leg joins the bridge, then the old one
        leaves. The caller never leaves the bridge; forks keep running."""
        agent = self.resolve_agent(agent_name)
        if agent is None:
            raise MediaError(f"unknown agent {agent_name!r}", 422)
        media = self._live(call_id)
        async with self._lock(call_id):
            media = self._live(call_id)
            previous = media.agent
            media.state = "transferring"
            await self._save(media, "transfer_started", to_agent=agent.name,
                             from_agent=previous.name if previous else None)
            started = time.perf_counter()
            try:
                media.agent = await self._start_agent(media, agent)
            except (AriError, MediaError, asyncio.TimeoutError) as exc:
                media.agent = previous
                media.state = "active"
                self.metrics.transfers.labels("agent", "failed").inc()
                await self._save(media, "transfer_failed", to_agent=agent.name, reason=str(exc))
                raise MediaError(f"transfer to {agent.name} failed: {exc or type(exc).__name__}", 502) from None
            if previous is not None:
                previous.state = "stopping"
                media.old_agents.append(previous)
                client = self.nodes[media.node]
                await self._quietly(client.remove_channel(media.bridge, previous.channel))
                await self._quietly(client.hangup(previous.channel))
            media.state = "active"
            self.metrics.transfers.labels("agent", "completed").inc()
            await self._save(media, "transfer_completed", to_agent=agent.name,
                             from_agent=previous.name if previous else None,
                             transfer_ms=round((time.perf_counter() - started) * 1000, 1))
            return {"agent": agent.name, "channel": media.agent.channel}

    async def start_fork(self, call_id: str, target: Endpoint, direction: str = "in", *,
                         started: float | None = None, during_setup: bool = False) -> dict[str, Any]:
        """A live one-way copy of the caller's audio (spy in), of what the caller hears (out)
        or both, to a fork target. A fork that fails never takes the call down.

        The call's lock is held only to change its record: the snoop, the ExternalMedia
        channel and the fork's bridge are created together, outside it, so forks start in
        parallel with each other and with the agent leg."""
        if direction not in ("in", "out", "both"):
            raise MediaError(f"fork direction must be in, out or both, not {direction!r}", 422)
        t0 = started if started is not None else time.perf_counter()
        async with self._lock(call_id):
            media = self.calls.get(call_id) if during_setup else self._live(call_id)
            if media is None or media.state in ("ending", "ended"):
                raise MediaError(f"call {call_id!r} has ended", 409)
            fork_id = f"f{media.sequence + 1}"
            fork = ForkLeg(fork_id=fork_id, target=target.name, endpoint=target.endpoint, transport=target.transport,
                           codec=target.codec, direction=direction, snoop=media.next_id("snoop"),
                           channel=media.next_id("fork"), bridge=media.next_id("forkbridge"), started_ms=now_ms())
            if target.transport == "audiosocket":
                fork.session = session_uuid(fork.channel)
            media.forks[fork_id] = fork
            await self._save(media, "fork_starting", fork=fork_id, target=target.name, direction=direction)
        client = self.nodes[media.node]
        try:
            snoop_up = self._waiter(fork.snoop)
            await asyncio.gather(
                self._confirmed(fork.snoop, client.snoop(media.caller_channel, fork.snoop, spy=direction,
                                                         app_args=f"fork,{fork_id}")),
                self._external_media(media, fork.channel, target),
                client.create_bridge(fork.bridge, f"fork-{media.token}-{fork_id}"))
            await asyncio.wait_for(snoop_up, LEG_UP_TIMEOUT_S)
            await asyncio.gather(client.add_channel(fork.bridge, fork.snoop), client.add_channel(fork.bridge, fork.channel))
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            self._waiters.pop(fork.snoop, None)
            self._created.pop(fork.snoop, None)
            async with self._lock(call_id):
                fork.state, fork.reason = "failed", str(exc) or type(exc).__name__
                self.metrics.forks_failed.labels("start").inc()
                await self._save(media, "fork_failed", fork=fork_id, reason=fork.reason)
            await self._stop_fork_objects(media, fork)
            raise MediaError(f"fork to {target.name} failed: {fork.reason}", 502) from None
        async with self._lock(call_id):
            if media.state in ("ending", "ended") or fork.state != "starting":  # the call ended meanwhile
                await self._stop_fork_objects(media, fork)
                raise MediaError(f"call {call_id!r} ended while its fork started", 409)
            fork.state, fork.up_ms = "up", now_ms()
            elapsed = time.perf_counter() - t0
            self.metrics.fork_start_seconds.observe(elapsed)
            self.metrics.forks_started.inc()
            self.metrics.forks_active.inc()
            await self._save(media, "fork_started", fork=fork_id, target=target.name, start_ms=round(elapsed * 1000, 1))
            return {"fork_id": fork_id, "target": target.name, "direction": direction}

    async def stop_fork(self, call_id: str, fork_id: str) -> None:
        async with self._lock(call_id):
            media = self._live(call_id)
            fork = media.forks.get(fork_id)
            if fork is None:
                raise MediaError(f"call has no fork {fork_id!r}", 404)
            if fork.state not in ("starting", "up"):
                raise MediaError(f"fork {fork_id} is already {fork.state}")
            fork.state = "stopping"
            await self._stop_fork_objects(media, fork)
            fork.state = "gone"
            self.metrics.forks_active.dec()
            await self._save(media, "fork_stopped", fork=fork_id)

    async def add_human(self, call_id: str, destination: str, uri: str, *, mode: str = "conference",
                        context: dict[str, str] | None = None, caller_id: str | None = None) -> dict[str, Any]:
        """Call a human through the edge with the conversation's context in X- headers; on
        answer they join the bridge (conference) or replace the AI agent (handoff)."""
        if mode not in ("conference", "handoff"):
            raise MediaError(f"mode must be conference or handoff, not {mode!r}", 422)
        async with self._lock(call_id):
            media = self._live(call_id)
            client = self.nodes[media.node]
            headers = await self._context_headers(call_id, context or {})
            leg = HumanLeg(leg_id=f"h{media.sequence + 1}", destination=destination, uri=uri,
                           channel=media.next_id("human"), mode=mode, started_ms=now_ms())
            media.humans[leg.leg_id] = leg
            await self._save(media, "human_dialing", leg=leg.leg_id, destination=destination, mode=mode,
                             headers=sorted(headers))
            variables = {f"PJSIP_HEADER(add,{name})": value for name, value in headers.items()}
            try:
                await client.originate(leg.channel, f"PJSIP/{self.edge_endpoint}/{uri}", app_args=f"human,{leg.leg_id}",
                                       caller_id=caller_id, variables=variables)
            except AriError as exc:
                leg.state, leg.reason = "failed", str(exc)
                await self._save(media, "human_failed", leg=leg.leg_id, reason=str(exc))
                raise MediaError(f"could not call {destination}: {exc}", 502) from None
            return {"leg_id": leg.leg_id, "destination": destination, "mode": mode}

    async def play(self, call_id: str, media_uri: str) -> dict[str, Any]:
        """Play a sound (sound:…, recording:…, tone:…) or a URL into the call's bridge."""
        async with self._lock(call_id):
            media = self._live(call_id)
            playback_id = media.next_id("playback")
            await self.nodes[media.node].request("playBridge", "POST", f"/bridges/{media.bridge}/play/{playback_id}",
                                                 params={"media": media_uri})
            await self._save(media, "play", uri=media_uri, playback=playback_id)
            return {"playback_id": playback_id}

    async def hangup(self, call_id: str) -> None:
        async with self._lock(call_id):
            media = self._live(call_id)
            await self._timeline(media, "hangup_requested")
            await self._teardown(media, "hangup", hang_up_caller=True)

    # -- internals ------------------------------------------------------------------------------------
    async def _start_agent(self, media: CallMedia, agent: Endpoint) -> AgentLeg:
        """A new agent leg, up and in the call's bridge (the caller decides when it becomes
        `media.agent`)."""
        channel_id = media.next_id("agent")
        leg = AgentLeg(name=agent.name, channel=channel_id, endpoint=agent.endpoint, transport=agent.transport,
                       codec=agent.codec, started_ms=now_ms(),
                       session=session_uuid(channel_id) if agent.transport == "audiosocket" else "")
        channel = await self._external_media(media, leg.channel, agent)
        variables = channel.get("channelvars") or {}
        if variables.get("UNICASTRTP_LOCAL_ADDRESS"):
            leg.local_rtp = f"{variables['UNICASTRTP_LOCAL_ADDRESS']}:{variables.get('UNICASTRTP_LOCAL_PORT', '')}"
        await self.nodes[media.node].add_channel(media.bridge, leg.channel)
        leg.state, leg.up_ms = "up", now_ms()
        return leg

    async def _external_media(self, media: CallMedia, channel_id: str, target: Endpoint) -> dict[str, Any]:
        """Create an ExternalMedia channel and wait until it is in our application."""
        up = self._waiter(channel_id)
        params = external_media_params(target)
        try:
            created = await self._confirmed(channel_id, self.nodes[media.node].external_media(
                channel_id, params["external_host"], target.codec, encapsulation=params["encapsulation"],
                transport=params["transport"],
                data=session_uuid(channel_id) if target.transport == "audiosocket" else None))
            entered = await asyncio.wait_for(up, LEG_UP_TIMEOUT_S)
        finally:
            self._waiters.pop(channel_id, None)
            self._created.pop(channel_id, None)
        return {**(created or {}), **(entered or {})}

    def _waiter(self, channel_id: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiters[channel_id] = future
        return future

    async def _confirmed(self, channel_id: str, creation) -> Any:
        """Await a channel's creation; from then on a resync that does not see it fails its waiter."""
        result = await creation
        if channel_id in self._waiters:
            self._created[channel_id] = time.monotonic()
        return result

    def _resolve(self, channel_id: str, channel: dict[str, Any]) -> None:
        self._created.pop(channel_id, None)
        future = self._waiters.pop(channel_id, None)
        if future is not None and not future.done():
            future.set_result(channel)

    def _fail_waiter(self, channel_id: str, reason: str) -> None:
        self._created.pop(channel_id, None)
        future = self._waiters.pop(channel_id, None)
        if future is not None and not future.done():
            future.set_exception(MediaError(reason, 502))

    async def _stop_fork_objects(self, media: CallMedia, fork: ForkLeg) -> None:
        client = self.nodes[media.node]
        await self._quietly(client.hangup(fork.snoop))
        await self._quietly(client.hangup(fork.channel))
        await self._quietly(client.destroy_bridge(fork.bridge))

    async def _teardown(self, media: CallMedia, reason: str, hang_up_caller: bool = False) -> None:
        """End of the call: every channel and bridge this call created is removed (no leaks)."""
        if media.state == "ended":
            return
        media.state = "ending"
        client = self.nodes[media.node]
        active_forks = [f for f in media.forks.values() if f.state in ("starting", "up")]
        for fork in active_forks:
            fork.state = "gone"
            self.metrics.forks_active.dec()
        removals = [client.hangup(c) for c in media.our_channels()]
        if hang_up_caller:
            removals.append(client.hangup(media.caller_channel))
        removals += [client.destroy_bridge(b) for b in media.bridges()]
        await asyncio.gather(*(self._quietly(r) for r in removals))
        if media.agent:
            media.agent.state = "gone"
        media.state = "ended"
        await self._save(media, "media_end", reason=reason)
        if media.direction == "outbound":  # no dialog events from the edge for these
            try:
                await self.store.transition(media.call_id, "ended" if media.agent or reason == "caller-hangup" else "failed",
                                            {"ended_at_ms": now_ms(), "end_reason": reason},
                                            {"event": "ended", "ts": now_ms(), "reason": reason})
            except RedisError as exc:
                log.error("call %s: could not record its end: %s", media.call_id, exc)
        await self.store.forget_media(media.node, media.call_id)
        self._forget(media)

    async def _context_headers(self, call_id: str, context: dict[str, str]) -> dict[str, str]:
        """Validated, size-capped X- headers; a long value travels as a reference to the API."""
        headers: dict[str, str] = {"X-Callfabric-Call-Id": call_id}
        for key, value in context.items():
            name = key if key.lower().startswith("x-") else f"X-{key.replace('_', '-').title()}"
            problem = header_name_problem(name)
            if problem:
                raise MediaError(problem, 422)
            text = sanitize_header_value(str(value))
            if len(text.encode()) > MAX_CONTEXT_HEADER_BYTES:
                await self.store.set_fields(call_id, {f"context_{name[2:].lower()}": text})
                text = f"{self.api_base_url}/v1/calls/{call_id}/context/{name[2:].lower()}"
                name = f"{name}-Ref"
            headers[name] = text
        return headers

    def _track(self, media: CallMedia) -> None:
        self.calls[media.call_id] = media
        self._by_token[media.token] = media.call_id
        self._by_caller[media.caller_channel] = media.call_id

    def _forget(self, media: CallMedia) -> None:
        """Not ours any more (ended, or its node went to another controller)."""
        if self.calls.get(media.call_id) is media:
            del self.calls[media.call_id]
            self._by_token.pop(media.token, None)
            if self._by_caller.get(media.caller_channel) == media.call_id:
                del self._by_caller[media.caller_channel]
            self._locks.pop(media.call_id, None)
            self._adopted.discard(media.call_id)
            if media.state != "ended":  # its running forks are the next owner's to count
                self.metrics.forks_active.dec(sum(1 for f in media.forks.values() if f.state in ("starting", "up")))

    def _media_of_channel(self, channel_id: str) -> CallMedia | None:
        parsed = parse_object_id(channel_id)
        if parsed:
            call_id = self._by_token.get(parsed[0])
            return self.calls.get(call_id) if call_id else None
        call_id = self._by_caller.get(channel_id)
        return self.calls.get(call_id) if call_id else None

    def _live(self, call_id: str) -> CallMedia:
        media = self.calls.get(call_id)
        if media is None:
            raise MediaError(f"no live call {call_id!r} on this controller's media nodes", 404)
        if media.state in ("ending", "ended"):
            raise MediaError(f"call {call_id!r} has ended", 409)
        if media.state == "setup":
            raise MediaError(f"call {call_id!r} is still being set up", 409)
        if media.node in self._closing:
            raise MediaError(f"media node {media.node} is being handed over to another controller; retry", 503)
        return media

    def _lock(self, call_id: str) -> asyncio.Lock:
        return self._locks.setdefault(call_id, asyncio.Lock())

    async def _record(self, call_id: str) -> dict[str, Any] | None:
        try:
            return await self.store.get(call_id)
        except RedisError as exc:
            log.error("call %s: cannot read its record: %s", call_id, exc)
            return None

    async def _save(self, media: CallMedia, event: str, **detail: Any) -> None:
        """Record the call's media and a timeline event. Raises MediaError (503: retry, the
        new owner will answer) when another controller took the call's node over."""
        entry = {"event": event, "ts": now_ms(), "node": media.node, **{k: v for k, v in detail.items() if v is not None}}
        try:
            await self.store.save_media(media.call_id, media.to_dict(), entry, fence=self.fences.get(media.node, 0))
        except FencedOut:
            self.metrics.media_fenced.inc()
            log.error("call %s: media node %s has a newer owner: this controller stops acting on the call",
                      media.call_id, media.node)
            self._forget(media)
            raise MediaError(f"call {media.call_id!r} is handled by another controller now; retry", 503) from None
        except RedisError as exc:
            self.metrics.redis_errors.labels("media").inc()
            log.error("call %s: could not record %s: %s", media.call_id, event, exc)

    async def _timeline(self, media: CallMedia, event: str, **detail: Any) -> None:
        try:
            await self.store.append_event(media.call_id, {"event": event, "ts": now_ms(), **detail})
        except RedisError as exc:
            self.metrics.redis_errors.labels("media").inc()
            log.error("call %s: could not record %s: %s", media.call_id, event, exc)

    @staticmethod
    async def _quietly(awaitable) -> Any:
        """Best-effort clean-up step: a 404 (already gone) or a failure is logged, not raised."""
        try:
            return await awaitable
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            log.warning("media: %s", exc)
            return None
