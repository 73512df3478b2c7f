"""The media plane: our Stasis application on every Asterisk node.

When a call the edge routed reaches a node, the plane answers it, bridges the caller with
the AI agent's media endpoint (an ExternalMedia channel), starts the forks the decision asks
for, and from then on carries out mid-call actions. Every change is written to Redis (the
call's media record and timeline) before the next step, so another controller can carry on
from Redis + ARI.

The plane itself keeps what all features share: node sync, event dispatch and the per-call
lock. Each feature is a module of the same anatomy (media/feature.py, media/features/): the
call's bridge and agent leg (`plane.call`), forks (`plane.forks`), humans (`plane.humans`),
playback (`plane.playback`), DTMF (`plane.dtmf`), recording (`plane.recording`), cold
transfer by SIP REFER (`plane.refer`), answering-machine detection (`plane.amd`).

Each node's events are handled by one controller at a time (its lease owner, see
ownership.py): `adopt_node` takes the node's live calls from Redis, `serve_node` consumes
its events and resyncs with ARI after every (re)connection — settling whatever a previous
owner left half done — and `release_node` lets the node go. Media records are written with
the owner's fence, so a controller that lost a node cannot overwrite its successor's work."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from controller.media.ari import AriClient, AriError
from controller.media.feature import LEG_UP_TIMEOUT_S, Endpoint, Feature, MediaError, external_media_params
from controller.media.features.amd import Amd
from controller.media.features.call import Call
from controller.media.features.dtmf import Dtmf
from controller.media.features.forks import Forks
from controller.media.rtpengine import RtpengineClient
from controller.media.features.humans import Humans
from controller.media.features.playback import Playback
from controller.media.features.recording import Recording
from controller.media.features.refer import Refer
from controller.media.model import CallMedia, parse_object_id, session_uuid
from controller.metrics import Metrics
from controller.state.calls import CallStore, FencedOut, now_ms

__all__ = ["Endpoint", "MediaError", "MediaPlane"]

log = logging.getLogger("callfabric.media")


class MediaPlane:
    def __init__(self, nodes: dict[str, AriClient], store: CallStore, metrics: Metrics, *,
                 resolve_agent: Callable[[str], Endpoint | None],
                 resolve_fork_target: Callable[[str], Endpoint | None],
                 edge_endpoint: str, instance_id: str, api_base_url: str = "", recording_dir: str = "",
                 rtpengines: list[RtpengineClient] | None = None, fork_mode: str = "snoop"):
        self.nodes = nodes
        self.store = store
        self.metrics = metrics
        self.resolve_agent = resolve_agent
        self.resolve_fork_target = resolve_fork_target
        self.edge_endpoint = edge_endpoint  # PJSIP endpoint of the Kamailio edge on the media nodes
        self.rtpengines = rtpengines or []  # the edges' rtpengines (NG): forks copied at the edge
        self.fork_mode = fork_mode  # edge | snoop: how a fork is made when both can
        self.instance_id = instance_id
        self.api_base_url = api_base_url.rstrip("/")
        self.calls: dict[str, CallMedia] = {}  # call id -> media (calls on nodes this controller serves)
        self.fences: dict[str, int] = {}  # node -> the fence of our lease on it (0: no leases)
        self.arriving: set[str] = set()  # caller channels being taken in (StasisStart, or found by a resync)
        self._by_token: dict[str, str] = {}
        self._by_caller: dict[str, str] = {}  # caller channel id -> call id (events name the channel)
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiters: dict[str, asyncio.Future] = {}  # channel id -> StasisStart (or failure)
        self._created: dict[str, float] = {}  # waited-for channel id -> when Asterisk confirmed creating it
        self._tasks: dict[str, set[asyncio.Task]] = {}  # node -> event handling in progress
        self._adopted: set[str] = set()  # calls loaded from Redis, settled by the node's next resync
        self._synced: dict[str, asyncio.Event] = {}  # node -> set when a resync has run since adoption
        self._closing: set[str] = set()  # nodes being handed over: no new actions
        # The features, in the order they hear about a call's channels.
        self.call = Call(self)
        self.forks = Forks(self)
        self.humans = Humans(self)
        self.playback = Playback(self)
        self.dtmf = Dtmf(self)
        self.recording = Recording(self, recording_dir)
        self.refer = Refer(self)
        self.amd = Amd(self)
        # The order they hear about a call's channels in (refer first: while it transfers the
        # caller, the caller's end is its outcome, not a hang-up).
        self.features: tuple[Feature, ...] = (self.refer, self.call, self.forks, self.humans, self.playback,
                                              self.dtmf, self.recording, self.amd)
        # Carries out what a finished gather leads to (its policy branch, its webhook's answer):
        # set by whoever runs actions on calls (the API's call control).
        self.on_gathered: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
        # Carries out the decision's media actions (record, gather) once a call is connected.
        self.on_connected: Callable[[str, list[dict[str, Any]]], Awaitable[None]] | None = None
        self._handlers: dict[str, list[Feature]] = {}  # ARI event type -> the features that handle it
        for feature in self.features:
            for kind in feature.events:
                self._handlers.setdefault(kind, []).append(feature)

    # -- node lifecycle ---------------------------------------------------------------------------
    async def serve_node(self, name: str) -> None:
        """Consume a node's events until cancelled, or until another client takes the node's
        application over (ApplicationReplaced: returns); after every (re)connection, resync."""
        client = self.nodes[name]

        async def connected() -> None:
            # Resync runs beside the stream: it takes calls' locks, and an action holding one
            # may be waiting for an event of this very stream.
            self.metrics.ari_connected.labels(name).set(1)
            self.spawn(name, self.resync(name), "resync")

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
            self.track(media)
            for feature in self.features:
                feature.adopted(media)
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
                    async with self.lock(media.call_id):
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
            async with self.lock(media.call_id):
                if self.calls.get(media.call_id) is not media or media.state == "ended":
                    continue  # ended (or forgotten) while we waited for its lock
                if media.caller_channel not in channels:
                    self._adopted.discard(media.call_id)
                    await self.timeline(media, "resync", detail="caller gone while disconnected")
                    await self.teardown(media, "caller-gone")
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
                for feature in self.features:
                    changed = feature.missing(media, channels) or changed
                if changed:
                    await self.save(media, "resync", detail="legs gone while disconnected")
        callers = {m.caller_channel for m in self.calls.values()}
        for channel_id, channel in channels.items():  # callers whose StasisStart was missed
            args = self.stasis_args(client, channel)
            if args is not None and not parse_object_id(channel_id) and channel_id not in callers \
                    and channel_id not in self.arriving:
                log.warning("ARI %s: caller %s entered the application while nobody listened: taking it in",
                            node, channel_id)
                self.arriving.add(channel_id)
                self.spawn(node, self.call.arrived(node, channel, args), "resync-caller")
        for channel_id in channels:  # ours, of no live call: left over from a crash or a lost event
            if self._orphan(channel_id):
                log.warning("ARI %s: hanging up orphan channel %s", node, channel_id)
                await self.quietly(client.hangup(channel_id))
        for bridge_id in bridges:
            if self._orphan(bridge_id):
                await self.quietly(client.destroy_bridge(bridge_id))
        self._synced.setdefault(node, asyncio.Event()).set()

    async def _settle_adopted(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> None:
        """A call taken over from another controller (or from before a restart), its caller
        still there: settle what was left half done. Objects of the call its record does not
        name (an action cut short) are removed; then each feature settles its legs (see
        Feature.take_over); a call still being set up is set up again. Lock held."""
        client = self.nodes[media.node]
        named = set(media.our_channels()) | set(media.bridges())
        for object_id_ in [*channels, *bridges]:
            parsed = parse_object_id(object_id_)
            if parsed and parsed[0] == media.token and object_id_ not in named:
                log.warning("call %s: removing %s, left by an action cut short", media.call_id, object_id_)
                await self.quietly(client.hangup(object_id_) if object_id_ in channels
                                   else client.destroy_bridge(object_id_))
        follow_ups = []
        for feature in self.features:
            follow_ups += await feature.take_over(media, channels, bridges)
        if media.state == "setup":
            await self.call.set_up_again(media, channels.get(media.caller_channel, {}), bridges)
            return
        await self.save(media, "resync", detail="taken over", fence=self.fences.get(media.node, 0))
        for what, step in follow_ups:
            self.spawn(media.node, step(), what)

    def stasis_args(self, client: AriClient, channel: dict[str, Any]) -> list[str] | None:
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
        if kind in self._handlers:
            subject = channel_id or _subject(event)
            media = self._media_of_channel(subject) if subject else None
            if media is not None:
                self.spawn(node, self._feature_event(self._handlers[kind], media, subject, event), kind)
            return
        if not channel_id:
            return
        if kind == "StasisStart":
            media = self._media_of_channel(channel_id)
            if media is not None and channel_id == media.caller_channel and media.state == "referring":
                args = event.get("args") if isinstance(event.get("args"), list) else []  # back from the dialplan
                self.spawn(node, self._caller_returned(media, [str(a) for a in args]), kind)
            elif parse_object_id(channel_id):
                self._resolve(channel_id, channel)
                self.spawn(node, self.leg_entered(node, channel_id, channel), kind)
            elif channel_id not in self.arriving and media is None:
                args = event.get("args") if isinstance(event.get("args"), list) else []
                self.arriving.add(channel_id)
                self.spawn(node, self.call.arrived(node, channel, args), kind)
        elif kind in ("StasisEnd", "ChannelDestroyed"):
            self._fail_waiter(channel_id, f"{kind}: {event.get('cause_txt', 'gone')}")
            media = self._media_of_channel(channel_id)
            if media is not None:
                self.spawn(node, self._leg_gone(media, channel_id, event), kind)

    async def leg_entered(self, node: str, channel_id: str, channel: dict[str, Any]) -> None:
        """A channel we created entered Stasis: the feature it belongs to takes it from there."""
        media = self._media_of_channel(channel_id)
        if media is None:
            return
        for feature in self.features:
            if feature.owns(media, channel_id):
                await feature.entered(media, channel_id, channel)
                return

    async def _caller_returned(self, media: CallMedia, args: list[str]) -> None:
        async with self.lock(media.call_id):
            for feature in self.features:
                if await feature.returned(media, args):
                    return
            log.warning("call %s: the caller came back into the application unasked (%s)", media.call_id, args)

    async def _leg_gone(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        cause = event.get("cause_txt") or event.get("type")
        if event.get("type") == "StasisEnd" and channel_id == media.caller_channel and media.state == "referring":
            return  # sent to the dialplan to be transferred (features/refer.py): not a hang-up
        async with self.lock(media.call_id):
            for feature in self.features:
                if await feature.gone(media, channel_id, cause):
                    return

    async def _feature_event(self, features: list[Feature], media: CallMedia, subject: str,
                             event: dict[str, Any]) -> None:
        async with self.lock(media.call_id):
            if media.state == "ended":
                return
            for feature in features:
                await feature.on_event(media, subject, event)

    def spawn(self, node: str, coroutine, what: str) -> asyncio.Task:
        """Run `coroutine` as part of serving `node` (cancelled when the node is released)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.setdefault(node, set()).add(task)
        task.add_done_callback(lambda t: self._task_done(t, node, what))
        return task

    def _task_done(self, task: asyncio.Task, node: str, what: str) -> None:
        self._tasks.get(node, set()).discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), MediaError):
            log.warning("media: %s: %s", what, task.exception())
        else:  # one bad event never stops the plane
            log.error("media: handling %s failed", what, exc_info=task.exception())

    # -- channels we create ---------------------------------------------------------------------------
    async def external_media(self, media: CallMedia, channel_id: str, target: Endpoint) -> dict[str, Any]:
        """Create an ExternalMedia channel and wait until it is in our application."""
        up = self.waiter(channel_id)
        params = external_media_params(target)
        try:
            created = await self.confirmed(channel_id, self.nodes[media.node].external_media(
                channel_id, params["external_host"], target.codec, encapsulation=params["encapsulation"],
                transport=params["transport"],
                data=session_uuid(channel_id) if target.transport == "audiosocket" else None))
            entered = await asyncio.wait_for(up, LEG_UP_TIMEOUT_S)
        finally:
            self.forget_waiter(channel_id)
        return {**(created or {}), **(entered or {})}

    def waiter(self, channel_id: str) -> asyncio.Future:
        """A future set when the channel enters our application (failed if it goes first)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[channel_id] = future
        return future

    def forget_waiter(self, channel_id: str) -> None:
        self._waiters.pop(channel_id, None)
        self._created.pop(channel_id, None)

    async def confirmed(self, channel_id: str, creation) -> Any:
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

    # -- the call's record and lock -------------------------------------------------------------------
    async def teardown(self, media: CallMedia, reason: str, hang_up_caller: bool = False) -> None:
        """End of the call: every channel and bridge this call created is removed (no leaks)."""
        if media.state == "ended":
            return
        media.state = "ending"
        client = self.nodes[media.node]
        for feature in self.features:
            feature.ending(media)
        removals = [(client.hangup, c) for c in media.our_channels()]
        if hang_up_caller:
            removals.append((client.hangup, media.caller_channel))
        removals += [(client.destroy_bridge, b) for b in media.bridges()]
        await asyncio.gather(*(self._remove(remove, object_id) for remove, object_id in removals))
        media.state = "ended"
        await self.save(media, "media_end", reason=reason)
        if media.direction == "outbound":  # no dialog events from the edge for these
            try:
                await self.store.transition(media.call_id, "ended" if media.agent or reason == "caller-hangup" else "failed",
                                            {"ended_at_ms": now_ms(), "end_reason": reason},
                                            {"event": "ended", "ts": now_ms(), "reason": reason})
            except RedisError as exc:
                log.error("call %s: could not record its end: %s", media.call_id, exc)
        await self.store.forget_media(media.node, media.call_id)
        self._forget(media)

    def track(self, media: CallMedia) -> None:
        """The call is ours from now on: its events lead to it."""
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
            if media.state != "ended":  # its running legs are the next owner's to count
                for feature in self.features:
                    feature.released(media)

    def _media_of_channel(self, channel_id: str) -> CallMedia | None:
        parsed = parse_object_id(channel_id)
        if parsed:
            call_id = self._by_token.get(parsed[0])
            return self.calls.get(call_id) if call_id else None
        call_id = self._by_caller.get(channel_id)
        return self.calls.get(call_id) if call_id else None

    def live(self, call_id: str) -> CallMedia:
        """The call an action is for, if actions can be carried out on it now (else MediaError)."""
        media = self.calls.get(call_id)
        if media is None:
            if not self.nodes:   # the usual surprise: live-call actions need a media node
                raise MediaError(f"no live call {call_id!r}: this controller has no media nodes (ari_nodes); "
                                 f"live-call actions act on calls an Asterisk media node holds", 404)
            raise MediaError(f"no live call {call_id!r} on this controller's media nodes", 404)
        if media.state in ("ending", "ended"):
            raise MediaError(f"call {call_id!r} has ended", 409)
        if media.state == "setup":
            raise MediaError(f"call {call_id!r} is still being set up", 409)
        if media.node in self._closing:
            raise MediaError(f"media node {media.node} is being handed over to another controller; retry", 503)
        return media

    def lock(self, call_id: str) -> asyncio.Lock:
        """The call's lock: actions and event handling of one call run one at a time."""
        return self._locks.setdefault(call_id, asyncio.Lock())

    async def save(self, media: CallMedia, event: str, **detail: Any) -> None:
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

    async def timeline(self, media: CallMedia, event: str, **detail: Any) -> None:
        """A timeline event only (the media record is unchanged)."""
        try:
            await self.store.append_event(media.call_id, {"event": event, "ts": now_ms(), **detail})
        except RedisError as exc:
            self.metrics.redis_errors.labels("media").inc()
            log.error("call %s: could not record %s: %s", media.call_id, event, exc)

    async def _remove(self, remove: Callable[[str], Awaitable[Any]], object_id: str) -> None:
        """One clean-up request, made only once its task runs (a teardown cancelled before then
        leaves no request coroutine never awaited)."""
        await self.quietly(remove(object_id))

    @staticmethod
    async def quietly(awaitable) -> Any:
        """Best-effort clean-up step: a 404 (already gone) or a failure is logged, not raised."""
        try:
            return await awaitable
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            log.warning("media: %s", exc)
            return None


def _subject(event: dict[str, Any]) -> str:
    """The id of the channel or bridge an event without a `channel` is about: a playback's or
    a recording's target (`channel:<id>`, `bridge:<id>`), or the event's bridge."""
    for key in ("playback", "recording"):
        target = (event.get(key) or {}).get("target_uri") if isinstance(event.get(key), dict) else None
        if isinstance(target, str) and ":" in target:
            return target.split(":", 1)[1]
    bridge = event.get("bridge")
    if isinstance(bridge, dict) and isinstance(bridge.get("id"), str):
        return bridge["id"]
    return ""
