"""Playback: a sound (sound:…, recording:…, tone:…) or a URL played into the call's bridge."""
from __future__ import annotations

from typing import Any

from controller.media.feature import Feature
from controller.media.model import CallMedia


class Playback(Feature):
    # -- actions ---------------------------------------------------------------------------------
    async def play(self, call_id: str, media_uri: str) -> dict[str, Any]:
        """Play a sound (sound:…, recording:…, tone:…) or a URL into the call's bridge."""
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            playback_id = await self.start(media, media_uri)
            await plane.save(media, "play", uri=media_uri, playback=playback_id)
            return {"playback_id": playback_id}

    async def start(self, media: CallMedia, media_uri: str) -> str:
        """Start playing into the call's bridge (lock held); the playback's id."""
        playback_id = media.next_id("playback")
        await self.plane.nodes[media.node].request("playBridge", "POST", f"/bridges/{media.bridge}/play/{playback_id}",
                                                   params={"media": media_uri})
        return playback_id

    async def stop(self, media: CallMedia, playback_id: str) -> None:
        """Stop a playback (already finished: nothing to do)."""
        await self.plane.nodes[media.node].request("stopPlayback", "DELETE", f"/playbacks/{playback_id}",
                                                   ok_missing=True)
