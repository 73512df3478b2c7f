"""DTMF: digits the caller (or a human) presses (RFC 4733, ARI `ChannelDtmfReceived`) become
`dtmf` steps of the call's timeline (`call.dtmf` for webhooks and /v1/events); Asterisk's
bridge passes them on to the agent leg itself (a `DTMF_END` text message on websocket agents,
RFC 4733 on RTP ones). Digits are sent to the caller or a human (`send_dtmf`), and gathered
(`gather`: at most `max_digits`, up to a finish key, until a time without a digit) for a
policy branch or a webhook, run by `MediaPlane.on_gathered`."""
from __future__ import annotations

import asyncio
import re
from typing import Any

from controller.media.ari import AriError
from controller.media.feature import Feature, FollowUp, MediaError
from controller.media.model import CallMedia, Gather
from controller.state.calls import now_ms

SEND_DIGITS = re.compile(r"^[0-9A-Da-d*#wW]{1,64}$")  # w / W: half a second / a second of pause
FINISH_KEYS = "0123456789*#"


class Dtmf(Feature):
    events = ("ChannelDtmfReceived", "PlaybackFinished")

    def __init__(self, plane):
        super().__init__(plane)
        self._timers: dict[str, asyncio.Task] = {}  # call id -> the gather's timeout

    # -- actions ---------------------------------------------------------------------------------
    async def send(self, call_id: str, digits: str, *, to: str = "caller", duration_ms: int = 100,
                   between_ms: int = 100) -> dict[str, Any]:
        """Send digits (RFC 4733) to the caller or to a human leg."""
        if not SEND_DIGITS.match(digits):
            raise MediaError("digits must be 1 to 64 of 0-9 A-D * # (w, W: pauses)", 422)
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            channel = self._leg_channel(media, to)
            try:
                await plane.nodes[media.node].request("sendDTMF", "POST", f"/channels/{channel}/dtmf", params={
                    "dtmf": digits, "duration": duration_ms, "between": between_ms})
            except AriError as exc:
                raise MediaError(f"could not send DTMF: {exc}", 502) from None
            plane.metrics.dtmf.labels("sent").inc(sum(1 for d in digits if d not in "wW"))
            await plane.save(media, "dtmf_sent", digits=digits, to=to)
            return {"digits": digits, "to": to}

    async def gather(self, call_id: str, *, leg: str = "caller", max_digits: int = 32, finish_key: str = "#",
                     timeout_ms: int = 5000, prompt: str = "", then: list[dict[str, Any]] | None = None,
                     webhook: str = "") -> dict[str, Any]:
        """Collect digits from a leg; a gather already running on the call ends (`replaced`)."""
        if finish_key and (len(finish_key) != 1 or finish_key not in FINISH_KEYS):
            raise MediaError("finish_key must be one of 0-9 * # (or empty)", 422)
        if not 1 <= max_digits <= 64 or not 100 <= timeout_ms <= 120_000:
            raise MediaError("max_digits must be 1-64 and the timeout 100 ms to 120 s", 422)
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            self._leg_channel(media, leg)
            if media.gather is not None:
                await self._finish(media, "replaced")
            gather = Gather(gather_id=f"g{media.sequence + 1}", leg=leg, max_digits=max_digits, finish_key=finish_key,
                            timeout_ms=timeout_ms, then=list(then or []), webhook=webhook, prompt=prompt,
                            started_ms=now_ms())
            media.sequence += 1
            if prompt:
                try:
                    gather.prompt_playback = await plane.playback.start(media, prompt)
                except AriError as exc:
                    raise MediaError(f"could not play the prompt: {exc}", 502) from None
            else:
                gather.waiting_since_ms = gather.started_ms
            media.gather = gather
            await plane.save(media, "gather_started", gather=gather.gather_id, leg=leg, max_digits=max_digits,
                             finish_key=finish_key or None, timeout_ms=timeout_ms, prompt=prompt or None)
            self._arm(media)
            return {"gather_id": gather.gather_id, "leg": leg}

    def _leg_channel(self, media: CallMedia, leg: str) -> str:
        if leg == "caller":
            return media.caller_channel
        human = media.humans.get(leg)
        if human is None or human.state != "up":
            raise MediaError(f"no answered human leg {leg!r} on the call", 404 if human is None else 409)
        return human.channel

    def _leg_of(self, media: CallMedia, channel_id: str) -> str | None:
        if channel_id == media.caller_channel:
            return "caller"
        return next((h.leg_id for h in media.humans.values() if h.channel == channel_id), None)

    # -- ARI events ------------------------------------------------------------------------------
    async def on_event(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        if event.get("type") == "PlaybackFinished":
            gather = media.gather
            playback = event.get("playback") if isinstance(event.get("playback"), dict) else {}
            if gather is not None and gather.prompt_playback and playback.get("id") == gather.prompt_playback:
                gather.prompt_playback, gather.waiting_since_ms = "", now_ms()
                self._arm(media)
            return
        digit, leg = event.get("digit"), self._leg_of(media, channel_id)
        if leg is None or not isinstance(digit, str) or len(digit) != 1 or media.state in ("ending", "ended"):
            return
        duration = event.get("duration_ms") if isinstance(event.get("duration_ms"), int) else None
        self.plane.metrics.dtmf.labels("received").inc()
        gather = media.gather if media.gather is not None and media.gather.leg == leg else None
        if gather is None:
            await self.plane.save(media, "dtmf", digit=digit, leg=leg, duration_ms=duration)
            return
        if gather.prompt_playback:  # the caller knows what to press: the prompt stops
            await self.plane.quietly(self.plane.playback.stop(media, gather.prompt_playback))
            gather.prompt_playback = ""
        if digit == gather.finish_key:
            await self.plane.save(media, "dtmf", digit=digit, leg=leg, duration_ms=duration, gather=gather.gather_id)
            await self._finish(media, "finish_key")
            return
        gather.digits += digit
        gather.waiting_since_ms = now_ms()
        await self.plane.save(media, "dtmf", digit=digit, leg=leg, duration_ms=duration, gather=gather.gather_id)
        if len(gather.digits) >= gather.max_digits:
            await self._finish(media, "max_digits")
        else:
            self._arm(media)

    # -- the gather's end ------------------------------------------------------------------------
    def _arm(self, media: CallMedia) -> None:
        """(Re)start the gather's timeout, counted from its `waiting_since_ms`."""
        self._disarm(media.call_id)
        gather = media.gather
        if gather is None or not gather.waiting_since_ms:
            return
        delay = max(0.0, (gather.waiting_since_ms + gather.timeout_ms - now_ms()) / 1000)
        self._timers[media.call_id] = self.plane.spawn(media.node, self._expire(media, gather.gather_id, delay),
                                                       "gather timeout")

    def _disarm(self, call_id: str) -> None:
        task = self._timers.pop(call_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _expire(self, media: CallMedia, gather_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self.plane.lock(media.call_id):
            if self._timers.get(media.call_id) is asyncio.current_task():
                del self._timers[media.call_id]
            if media.gather is not None and media.gather.gather_id == gather_id and media.state not in ("ending", "ended") \
                    and self.plane.calls.get(media.call_id) is media:
                await self._finish(media, "timeout")

    async def _finish(self, media: CallMedia, reason: str) -> None:
        """The gather is over (lock held): recorded, and its result handed on."""
        gather, media.gather = media.gather, None
        self._disarm(media.call_id)
        self.plane.metrics.gathers.labels(reason).inc()
        if gather.prompt_playback:
            await self.plane.quietly(self.plane.playback.stop(media, gather.prompt_playback))
        await self.plane.save(media, "gather_completed", gather=gather.gather_id, leg=gather.leg, digits=gather.digits,
                              reason=reason)
        hook = self.plane.on_gathered
        if hook is not None and reason != "replaced" and (gather.then or gather.webhook):
            result = {"gather_id": gather.gather_id, "leg": gather.leg, "digits": gather.digits, "reason": reason,
                      "then": gather.then, "webhook": gather.webhook}
            self.plane.spawn(media.node, hook(media.call_id, result), "gather result")

    # -- record keeping --------------------------------------------------------------------------
    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """A gather in progress goes on: its timeout counts from the last digit (or from now, if
        its prompt was playing: whether it finished meanwhile is not known)."""
        gather = media.gather
        if gather is not None and gather.prompt_playback:
            gather.prompt_playback, gather.waiting_since_ms = "", now_ms()
        return [("gather", self._rearm(media))] if gather is not None else []

    def _rearm(self, media: CallMedia):
        async def rearm() -> None:
            self._arm(media)
        return rearm

    def ending(self, media: CallMedia) -> None:
        self._disarm(media.call_id)

    def released(self, media: CallMedia) -> None:
        self._disarm(media.call_id)
