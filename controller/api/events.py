"""Call events for people and programs: the timeline events every controller publishes to
Redis, named for the outside world (`call.answered`, `fork.started` …). One Redis
subscription per controller feeds every websocket client of `/v1/events` (and the webhook
sender), so any controller can serve any call's events."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from redis.exceptions import RedisError

from controller.state.calls import EVENTS_CHANNEL

log = logging.getLogger("callfabric.api.events")

# Timeline event → public event type.
PUBLIC_TYPES = {
    "decided": "call.routed", "originating": "call.originating", "answered": "call.answered",
    "ended": "call.ended", "failed": "call.ended", "media_start": "media.started", "media_up": "media.connected",
    "media_failed": "media.failed", "media_end": "media.ended", "fork_started": "fork.started",
    "fork_stopped": "fork.stopped", "fork_failed": "fork.failed", "transfer_started": "transfer.started",
    "transfer_completed": "transfer.completed", "transfer_failed": "transfer.failed",
    "handoff_completed": "transfer.completed", "human_dialing": "human.dialing", "human_joined": "human.joined",
    "human_failed": "human.failed", "human_left": "human.left", "agent_lost": "agent.lost",
    "one_way_audio": "media.one_way_audio", "audio_restored": "media.audio_restored", "play": "media.play",
    "play_finished": "play.finished", "play_failed": "play.failed",
    "dtmf": "call.dtmf", "dtmf_sent": "call.dtmf_sent", "gather_started": "gather.started",
    "gather_completed": "gather.completed", "gather_action_failed": "gather.action_failed",
    "gather_webhook_failed": "gather.webhook_failed", "on_answer_failed": "media.action_failed", "recording_started": "recording.started",
    "recording_completed": "recording.completed", "recording_failed": "recording.failed",
    "amd": "call.amd", "transfer_fallback": "transfer.fallback", "transfer_fallback_failed": "transfer.fallback_failed",
}
EVENT_TYPES = tuple(sorted(set(PUBLIC_TYPES.values())))


def public_event(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A published timeline event in its public form, or None for internal ones."""
    name = raw.get("event")
    kind = PUBLIC_TYPES.get(name) if isinstance(name, str) else None
    if kind is None or not isinstance(raw.get("call_id"), str):
        return None
    data = {k: v for k, v in raw.items() if k not in ("event", "ts", "call_id")}
    if name == "handoff_completed":
        data["kind"] = "handoff"
    return {"type": kind, "call_id": raw["call_id"], "ts": raw.get("ts"), "data": data}


def matches(event: dict[str, Any], call_id: str | None, types: tuple[str, ...]) -> bool:
    if call_id is not None and event["call_id"] != call_id:
        return False
    return not types or any(event["type"] == t or (t.endswith(".*") and event["type"].startswith(t[:-1]))
                            for t in types)


@dataclass(eq=False)
class Subscription:
    call_id: str | None
    types: tuple[str, ...]
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=1000))
    dropped: int = 0


class EventHub:
    def __init__(self, subscriber: Callable[[], Any]):
        self.subscriber = subscriber  # a new redis-py client to SUBSCRIBE with (the store's RedisTarget)
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Called with every public event (the webhook sender); keeps the subscription open."""
        self._listeners.append(listener)
        self._ensure_running()

    def subscribe(self, call_id: str | None, types: tuple[str, ...]) -> Subscription:
        subscription = Subscription(call_id, types)
        self._subscribers.add(subscription)
        self._ensure_running()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            redis = self.subscriber()
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    self.connected.set()
                    delay = 0.2
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._dispatch(message.get("data"))
            except (RedisError, OSError) as exc:
                log.warning("events: Redis subscription lost (%s); retrying in %.1fs", exc, delay)
            finally:
                self.connected.clear()
                await redis.aclose()
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    def _dispatch(self, data: Any) -> None:
        try:
            raw = json.loads(data)
        except (ValueError, TypeError):
            return
        event = public_event(raw) if isinstance(raw, dict) else None
        if event is None:
            return
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the stream
                log.exception("events: listener failed")
        for subscription in list(self._subscribers):
            if matches(event, subscription.call_id, subscription.types):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:  # a slow reader loses events, never slows the others
                    subscription.dropped += 1
