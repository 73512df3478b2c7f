"""Playback: a sound (sound:…, recording:…, tone:…, digits:…) or a URL played into the
call's bridge, followed until it ends.

Asterisk accepts every playback (201) and reports what became of it only in events: a sound
that is not installed or a tone it has no name for gives PlaybackStarted then PlaybackFinished
`failed` a moment later; a URI of a scheme it does not know gives PlaybackStarted and then
nothing at all (tests/media/ari_conversations/playback.json), and so does a stored recording
that does not exist (res_stasis_playback.c skips it like an unknown scheme). So the action
schema refuses media Asterisk cannot play (controller/actions.py PLAY_MEDIA_PATTERN), a
recording is asked for (GET, nothing changes) before it is played, a bare http(s) URL is sent
as `sound:<url>` (Asterisk's media cache), and the plane waits for the playback to start and a
short moment more: a failure then is the API's answer (422, with the failed playback_id: the
one playback request was all it cost the node). A bridge plays one playback at a time: one
queued behind another answers `queued`, and its failure, like any later one, is recorded as
`play_failed` (webhook `play.failed`), its end as `play_finished`."""
from __future__ import annotations

import asyncio
from typing import Any

from controller.media.ari import AriError
from controller.media.feature import Feature, MediaError
from controller.media.model import CallMedia

SCHEMES = ("sound:", "recording:", "tone:", "digits:", "number:", "characters:")
STARTED_WAIT_S = 0.5  # an idle bridge starts a playback within milliseconds; a busy one queues it
SETTLE_S = 0.25  # a missing file or tone fails right after PlaybackStarted, in the same thread


def asterisk_media(uri: str) -> str:
    """The media URI Asterisk plays for `uri`, or MediaError (422) for one it would drop."""
    if uri.startswith(("http://", "https://")):
        return f"sound:{uri}"
    if not uri.startswith(SCHEMES) or not uri.partition(":")[2]:
        raise MediaError(f"cannot play {uri!r}: use sound:, recording:, tone:, digits:, number:, characters: "
                         f"or an http(s) URL", 422)
    return uri


class Playback(Feature):
    events = ("PlaybackStarted", "PlaybackFinished")

    def __init__(self, plane):
        super().__init__(plane)
        self._started: dict[str, asyncio.Future] = {}  # playback id -> its PlaybackStarted
        self._finished: dict[str, asyncio.Future] = {}  # playback id -> its final state (done | failed)

    # -- actions ---------------------------------------------------------------------------------
    async def play(self, call_id: str, media_uri: str) -> dict[str, Any]:
        """Play into the call's bridge; answers once Asterisk has started it (state `playing`,
        or `done` for a short one) or queued it behind another (`queued`), or MediaError 422
        if it failed to play."""
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            try:
                playback_id = await self.start(media, media_uri)
            except AriError as exc:
                raise MediaError(f"cannot play {media_uri}: {exc}", 502) from None
            await plane.save(media, "play", uri=media_uri, playback=playback_id)
        started, finished = self._started.get(playback_id), self._finished.get(playback_id)
        if started is None or finished is None:  # over already (the call ended meanwhile)
            return {"playback_id": playback_id, "state": "done"}
        try:
            await asyncio.wait_for(asyncio.shield(started), STARTED_WAIT_S)
            state = await asyncio.wait_for(asyncio.shield(finished), SETTLE_S)
        except asyncio.TimeoutError:
            state = "playing" if started.done() else "queued"
        if state == "failed":
            raise MediaError(f"{media_uri} could not be played (Asterisk: playback failed — "
                             f"a sound that is not installed, or a tone it cannot parse)", 422,
                             playback_id=playback_id)
        return {"playback_id": playback_id, "state": state}

    async def start(self, media: CallMedia, media_uri: str) -> str:
        """Start playing into the call's bridge (lock held), followed until it ends; the
        playback's id."""
        media_arg = asterisk_media(media_uri)
        node = self.plane.nodes[media.node]
        if media_arg.startswith("recording:"):
            name = media_arg.partition(":")[2]
            if await node.request("getStoredRecording", "GET", f"/recordings/stored/{name}", ok_missing=True) is None:
                raise MediaError(f"cannot play {media_uri}: media node {media.node} has no stored recording "
                                 f"{name!r}", 422)
        playback_id = media.next_id("playback")
        loop = asyncio.get_running_loop()
        self._started[playback_id], self._finished[playback_id] = loop.create_future(), loop.create_future()
        try:
            await node.request("playBridge", "POST", f"/bridges/{media.bridge}/play/{playback_id}",
                               params={"media": media_arg})
        except AriError:
            self._forget(playback_id)
            raise
        return playback_id

    async def stop(self, media: CallMedia, playback_id: str) -> None:
        """Stop a playback (already finished: nothing to do)."""
        await self.plane.nodes[media.node].request("stopPlayback", "DELETE", f"/playbacks/{playback_id}",
                                                   ok_missing=True)

    # -- ARI events ------------------------------------------------------------------------------
    async def on_event(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        playback = event.get("playback") if isinstance(event.get("playback"), dict) else {}
        playback_id = playback.get("id") if isinstance(playback.get("id"), str) else ""
        if playback_id not in self._started:
            return  # not one of ours (or forgotten)
        if event.get("type") == "PlaybackStarted":
            if not self._started[playback_id].done():
                self._started[playback_id].set_result(True)
            return
        state = playback.get("state") if playback.get("state") in ("done", "failed") else "done"
        if not self._finished[playback_id].done():
            self._finished[playback_id].set_result(state)
        self._forget(playback_id)
        await self.plane.timeline(media, "play_failed" if state == "failed" else "play_finished",
                                  playback=playback_id, uri=playback.get("media_uri", ""))

    def _forget(self, playback_id: str) -> None:
        self._started.pop(playback_id, None)
        self._finished.pop(playback_id, None)

    def ending(self, media: CallMedia) -> None:
        """The call ends: nobody waits for its playbacks any more."""
        prefix = f"cf-{media.token}-playback-"
        for playback_id in [p for p in self._started if p.startswith(prefix)]:
            self._forget(playback_id)
