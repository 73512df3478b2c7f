"""Recording: the conversation (`both`), the caller's voice (`caller`) or what the caller hears
(`agent`: the agent and anyone else in the call), each a snoop on the caller recorded by
Asterisk (ARI channel record, wav) from the moment it is asked until it is stopped, the call
ends or `max_duration` passes; optionally announced (a beep, a consent prompt) to everyone
first. The finished file is fetched from the node into `recording_dir` (or left on the node
and served through ARI's stored recordings), and `recording.completed` says how long and how
big it is. A recording that fails never takes the call down."""
from __future__ import annotations

import asyncio
import logging
import struct
import time
from pathlib import Path
from typing import Any

from controller.media.ari import AriError
from controller.media.feature import LEG_UP_TIMEOUT_S, Feature, FollowUp, MediaError
from controller.media.model import CallMedia, RecordingLeg
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media.recording")

SPY = {"caller": "in", "agent": "out", "both": "both"}
LIVE = ("starting", "recording", "stopping")
STORED_WAIT_S = 5.0  # after its snoop is hung up, a recording is on the node's disk within this


class Recording(Feature):
    events = ("RecordingFinished", "RecordingFailed")

    def __init__(self, plane, directory: str = ""):
        super().__init__(plane)
        self.directory = Path(directory) if directory else None

    # -- actions ---------------------------------------------------------------------------------
    async def start(self, call_id: str, channels: str = "both", *, beep: bool = False, announcement: str = "",
                    max_duration_s: int = 0) -> dict[str, Any]:
        """Start recording; the snoop and the recording are set up outside the call's lock."""
        if channels not in SPY:
            raise MediaError(f"channels must be both, caller or agent, not {channels!r}", 422)
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            rec = RecordingLeg(recording_id=f"r{media.sequence + 1}", name="", channels=channels,
                               snoop=media.next_id("recsnoop"), started_ms=now_ms())
            rec.name = f"cf-{media.token}-rec-{media.sequence}"
            media.recordings[rec.recording_id] = rec
            await plane.save(media, "recording_starting", recording=rec.recording_id, channels=channels)
            if announcement:
                await plane.quietly(plane.playback.start(media, announcement))
        client = plane.nodes[media.node]
        try:
            up = plane.waiter(rec.snoop)
            await plane.confirmed(rec.snoop, client.snoop(media.caller_channel, rec.snoop, spy=SPY[channels],
                                                          app_args=f"record,{rec.recording_id}"))
            await asyncio.wait_for(up, LEG_UP_TIMEOUT_S)
            await client.request("recordChannel", "POST", f"/channels/{rec.snoop}/record", params={
                "name": rec.name, "format": rec.format, "ifExists": "fail", "beep": beep,
                "maxDurationSeconds": max_duration_s, "terminateOn": "none"})
        except (AriError, MediaError, asyncio.TimeoutError) as exc:
            plane.forget_waiter(rec.snoop)
            reason = str(exc) or type(exc).__name__
            async with plane.lock(call_id):
                await self._failed(media, rec, reason)
            raise MediaError(f"recording failed: {reason}", 502) from None
        async with plane.lock(call_id):
            if media.state in ("ending", "ended") or rec.state != "starting":  # the call ended meanwhile
                return {"recording_id": rec.recording_id, "channels": channels, "state": rec.state}
            rec.state = "recording"
            await plane.save(media, "recording_started", recording=rec.recording_id, channels=channels,
                             name=rec.name)
            return {"recording_id": rec.recording_id, "channels": channels, "state": rec.state}

    async def stop(self, call_id: str, recording_id: str | None = None) -> dict[str, Any]:
        """Stop one recording (or every one in progress); `recording.completed` follows."""
        plane = self.plane
        async with plane.lock(call_id):
            media = plane.live(call_id)
            if recording_id is not None and recording_id not in media.recordings:
                raise MediaError(f"call has no recording {recording_id!r}", 404)
            chosen = [media.recordings[recording_id]] if recording_id else list(media.recordings.values())
            live = [r for r in chosen if r.state in ("starting", "recording")]
            if recording_id and not live:
                raise MediaError(f"recording {recording_id} is already {chosen[0].state}")
            for rec in live:
                rec.state = "stopping"
                try:
                    await plane.nodes[media.node].request("stopRecording", "POST",
                                                          f"/recordings/live/{rec.name}/stop")
                except AriError as exc:  # the node lost it: its snoop goes, what was written is fetched
                    log.warning("call %s: stopping recording %s: %s", call_id, rec.recording_id, exc)
                    await plane.quietly(plane.nodes[media.node].hangup(rec.snoop))
                    self._collect_later(media, rec)
            if live:
                await plane.save(media, "recording_stopping", recordings=[r.recording_id for r in live])
            return {"stopped": [r.recording_id for r in live]}

    async def stored(self, node: str, name: str) -> bool:
        client = self.plane.nodes.get(node)
        if client is None:
            return False
        try:
            return await client.request("getStoredRecording", "GET", f"/recordings/stored/{name}",
                                        ok_missing=True) is not None
        except AriError as exc:
            raise MediaError(f"media node {node} did not answer: {exc}", 502) from None

    async def download(self, node: str, name: str, sink) -> int:
        """A recording left on its node, streamed from there to `sink`."""
        client = self.plane.nodes.get(node)
        if client is None:
            raise MediaError(f"media node {node!r} is not configured here", 404)
        try:
            return await client.download("getStoredRecordingFile", f"/recordings/stored/{name}/file", sink)
        except AriError as exc:
            raise MediaError(f"the recording is not available from {node}: {exc}", 404 if exc.status == 404 else 502) \
                from None

    # -- ARI events ------------------------------------------------------------------------------
    async def on_event(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        recording = event.get("recording") if isinstance(event.get("recording"), dict) else {}
        rec = next((r for r in media.recordings.values() if r.name == recording.get("name")), None)
        if rec is None or rec.state not in LIVE:
            return
        if event.get("type") == "RecordingFailed":
            await self._failed(media, rec, str(recording.get("cause") or "failed on the node"))
            return
        await self.plane.quietly(self.plane.nodes[media.node].hangup(rec.snoop))
        rec.state = "saving"
        self._collect_later(media, rec)

    # -- the file --------------------------------------------------------------------------------
    def _collect_later(self, media: CallMedia, rec: RecordingLeg) -> None:
        rec.state = "saving"
        self.plane.spawn(media.node, self._collect(media, rec), "recording")

    async def _collect(self, media: CallMedia, rec: RecordingLeg) -> None:
        """Fetch the finished file from the node (into `recording_dir`, then removed from the
        node; without one it stays there) and record how long and how big it is."""
        plane = self.plane
        client = plane.nodes[media.node]
        deadline = time.monotonic() + STORED_WAIT_S
        try:
            while await client.request("getStoredRecording", "GET", f"/recordings/stored/{rec.name}",
                                       ok_missing=True) is None:
                if time.monotonic() > deadline:
                    raise MediaError("the node has no such stored recording", 404)
                await asyncio.sleep(0.1)
            header = bytearray()
            target = self.directory / f"{rec.name}.{rec.format}" if self.directory else None
            handle = await asyncio.to_thread(_open_new, target) if target else None

            async def sink(chunk: bytes) -> None:
                if len(header) < 4096:
                    header.extend(chunk[:4096 - len(header)])
                if handle is not None:
                    await asyncio.to_thread(handle.write, chunk)
            try:
                size = await client.download("getStoredRecordingFile", f"/recordings/stored/{rec.name}/file", sink)
            finally:
                if handle is not None:
                    await asyncio.to_thread(handle.close)
            if target is not None:
                await plane.quietly(client.request("deleteStoredRecording", "DELETE",
                                                   f"/recordings/stored/{rec.name}", ok_missing=True))
        except (AriError, MediaError, OSError) as exc:
            async with plane.lock(media.call_id):
                await self._failed(media, rec, f"could not fetch it: {exc}")
            return
        async with plane.lock(media.call_id):
            rec.state, rec.ended_ms, rec.size_bytes = "done", now_ms(), size
            rec.duration_ms = wav_duration_ms(bytes(header), size)
            rec.location, rec.path = ("local", str(target)) if target else ("node", "")
            plane.metrics.recordings.labels("completed").inc()
            plane.metrics.recording_bytes.inc(size)
            await plane.save(media, "recording_completed", recording=rec.recording_id, channels=rec.channels,
                             format=rec.format, duration_ms=rec.duration_ms, size_bytes=size, location=rec.location)

    async def _failed(self, media: CallMedia, rec: RecordingLeg, reason: str) -> None:
        """Lock held: the recording is given up (the call goes on)."""
        rec.state, rec.reason, rec.ended_ms = "failed", reason, now_ms()
        self.plane.metrics.recordings.labels("failed").inc()
        await self.plane.quietly(self.plane.nodes[media.node].hangup(rec.snoop))
        await self.plane.save(media, "recording_failed", recording=rec.recording_id, reason=reason)

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        """A recording whose snoop went while nobody listened ended then: its file is fetched."""
        gone = [r for r in media.recordings.values() if r.state in LIVE and r.snoop not in channels]
        for rec in gone:
            self._collect_later(media, rec)
        return bool(gone)

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """Recordings the previous owner was fetching are fetched again."""
        for rec in media.recordings.values():
            if rec.state == "saving":
                self._collect_later(media, rec)
        return []

    def ending(self, media: CallMedia) -> None:
        """The call's channels go, the recordings' snoops with them: their files are fetched."""
        for rec in media.recordings.values():
            if rec.state in LIVE:
                self._collect_later(media, rec)


def prune(directory: Path, max_age_s: float, now: float | None = None) -> int:
    """Delete the recordings in `directory` older than `max_age_s` (blocking: run it in a
    thread); how many were deleted."""
    cutoff = (time.time() if now is None else now) - max_age_s
    deleted = 0
    for path in directory.glob("cf-*-rec-*.*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                deleted += 1
        except OSError as exc:  # another controller sharing the directory got it first
            log.debug("recording retention: %s: %s", path, exc)
    return deleted


def _open_new(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "xb")


def wav_duration_ms(header: bytes, size: int) -> int:
    """Duration of a RIFF/WAVE file from its first bytes (`fmt ` and `data` chunks) and total size."""
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return 0
    offset, byte_rate, data_at, data_size = 12, 0, 0, 0
    while offset + 8 <= len(header):
        kind, length = header[offset:offset + 4], struct.unpack("<I", header[offset + 4:offset + 8])[0]
        if kind == b"fmt " and offset + 16 <= len(header):
            byte_rate = struct.unpack("<I", header[offset + 16:offset + 20])[0]
        elif kind == b"data":
            data_at, data_size = offset + 8, length
            break
        offset += 8 + length + (length & 1)
    if not byte_rate or not data_at:
        return 0
    data_size = min(data_size, size - data_at) if data_size else size - data_at
    return int(data_size * 1000 / byte_rate)
