"""Recording on the media plane against the spec-validating fake ARI, with real Redis: a snoop
on the caller recorded by the node, stopped by the API or by the call's end, fetched into the
recording directory (or left on the node), with its duration, size, events and metrics; a
recording that fails never takes the call down."""
from __future__ import annotations

import asyncio

import pytest

from controller.api.commands import CallControl
from controller.media.features.recording import wav_duration_ms
from controller.media.plane import MediaError
from tests.api.test_api_contract import ari_failing
from tests.media.test_dtmf import SERVING, events
from tests.media.test_media_plane import h  # noqa: F401  (the fixture)
from tests.support.fake_ari import _silent_wav

CALL = "call-1@edge"


async def until_event(h, name: str, timeout: float = 5.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await events(h, name)
        if found:
            return found[-1]
        assert asyncio.get_running_loop().time() < deadline, f"no {name} on the timeline"
        await asyncio.sleep(0.02)


async def test_record_both_sides_stop_and_fetch_into_the_directory(h, tmp_path):
    h.plane.recording.directory = tmp_path / "recordings"
    caller = await h.call_up()
    control = CallControl(h.plane, h.store, lambda: SERVING)
    result = await control.execute(CALL, {"record": {"channels": "both", "beep": True}})
    assert result.status == 200 and result.body["result"] == {"recording_id": "r3", "channels": "both",
                                                               "state": "recording"}
    media = h.plane.calls[CALL]
    rec = media.recordings["r3"]
    (snoop,) = [r for r in h.fake.requests if "/snoop/" in r.path]
    assert snoop.path == f"/channels/{caller}/snoop/{rec.snoop}" and snoop.query["spy"] == "both"
    (record,) = h.fake.requests_to("POST", rf"/channels/{rec.snoop}/record")
    assert record.query == {"name": rec.name, "format": "wav", "ifExists": "fail", "beep": "true",
                            "maxDurationSeconds": "0", "terminateOn": "none"}
    await h.fake.wait_for_event("RecordingStarted")
    await asyncio.sleep(1.1)
    stopped = await control.execute(CALL, {"stop_record": True})
    assert stopped.body["result"] == {"stopped": ["r3"]}
    done = await until_event(h, "recording_completed")
    assert done["recording"] == "r3" and done["location"] == "local" and done["channels"] == "both"
    assert 1000 <= done["duration_ms"] < 3000
    file = tmp_path / "recordings" / f"{rec.name}.wav"
    assert file.stat().st_size == done["size_bytes"]
    assert 0 <= done["size_bytes"] - (44 + done["duration_ms"] * 16) < 16  # 8 kHz 16-bit: 16 bytes a millisecond
    assert rec.name not in h.fake.stored_recordings  # fetched, then removed from the node
    assert rec.snoop not in h.fake.channels and caller in h.fake.channels  # the call goes on
    assert h.metrics.registry.get_sample_value("callfabric_recording_bytes_total") == done["size_bytes"]
    assert h.metrics.registry.get_sample_value("callfabric_recordings_total", {"result": "completed"}) == 1


async def test_a_recording_in_progress_is_completed_when_the_call_ends(h):
    caller = await h.call_up()
    result = await h.plane.recording.start(CALL, "caller", announcement="sound:this-call-is-recorded")
    rec = h.plane.calls[CALL].recordings[result["recording_id"]]
    assert h.fake.requests_to("POST", r".*/play/.*")[0].query["media"] == "sound:this-call-is-recorded"
    assert [r for r in h.fake.requests if "/snoop/" in r.path][0].query["spy"] == "in"
    await h.fake.wait_for_event("RecordingStarted")
    await h.fake.caller_hangup(caller)
    done = await until_event(h, "recording_completed")
    assert done["location"] == "node" and done["size_bytes"] > 0
    assert rec.name in h.fake.stored_recordings  # no recording_dir: it stays on the node
    chunks = []

    async def sink(chunk):
        chunks.append(chunk)
    assert await h.plane.recording.download("media1", rec.name, sink) == done["size_bytes"]
    assert b"".join(chunks)[:4] == b"RIFF"
    stored = await h.store.load_media(CALL)
    assert stored["state"] == "ended" and stored["recordings"][rec.recording_id]["state"] == "done"


async def test_max_duration_ends_a_recording(h):
    await h.call_up()
    await h.plane.recording.start(CALL, "agent", max_duration_s=1)
    assert h.fake.requests_to("POST", r".*/record")[0].query["maxDurationSeconds"] == "1"
    assert [r for r in h.fake.requests if "/snoop/" in r.path][0].query["spy"] == "out"
    done = await until_event(h, "recording_completed", timeout=5)
    assert 900 <= done["duration_ms"] <= 2000


async def test_a_recording_that_fails_leaves_the_call_up(h):
    caller = await h.call_up()
    with ari_failing(h.fake, ("channels", "record")):
        with pytest.raises(MediaError, match="recording failed"):
            await h.plane.recording.start(CALL)
    failed = await until_event(h, "recording_failed")
    media = h.plane.calls[CALL]
    assert media.state == "active" and caller in h.fake.channels
    assert media.recordings[failed["recording"]].snoop not in h.fake.channels  # its snoop went
    assert h.metrics.registry.get_sample_value("callfabric_recordings_total", {"result": "failed"}) == 1
    with pytest.raises(MediaError, match="already failed"):
        await h.plane.recording.stop(CALL, failed["recording"])
    with pytest.raises(MediaError, match="no recording"):
        await h.plane.recording.stop(CALL, "r99")


async def test_the_node_fails_a_recording_in_a_bridge(h):
    """What a real node does when the recorded channel is bridged (res_stasis_recording.c)."""
    await h.call_up()
    result = await h.plane.recording.start(CALL, "both")
    rec = h.plane.calls[CALL].recordings[result["recording_id"]]
    recorded = h.fake._chans[rec.snoop]
    h.fake._enter_bridge(recorded, h.fake._bridges[h.plane.calls[CALL].bridge])
    h.fake.live_recordings[rec.name]["state"] = "queued"
    h.fake._recording_starts(rec.name, rec.snoop, 0)
    failed = await until_event(h, "recording_failed")
    assert failed["reason"] == "Cannot record channel while in bridge"


def test_wav_duration_from_the_header():
    assert wav_duration_ms(_silent_wav(2.5), len(_silent_wav(2.5))) == 2500
    assert wav_duration_ms(b"not a wav", 9) == 0
    truncated = _silent_wav(1.0)[:44]  # a header whose data size is 0: what the file holds counts
    assert wav_duration_ms(truncated[:40] + b"\0\0\0\0", 44 + 16000) == 1000


def test_retention_deletes_only_old_recordings(tmp_path):
    import os
    import time as clock
    from controller.media.features.recording import prune
    old, new, other = tmp_path / "cf-ab-rec-3.wav", tmp_path / "cf-ab-rec-9.wav", tmp_path / "notes.txt"
    for path in (old, new, other):
        path.write_bytes(b"x")
    now = clock.time()
    os.utime(old, (now - 31 * 86400, now - 31 * 86400))
    os.utime(other, (now - 31 * 86400, now - 31 * 86400))
    assert prune(tmp_path, 30 * 86400, now) == 1
    assert not old.exists() and new.exists() and other.exists()


def test_the_cli_builds_record_actions():
    from controller.api.commands import validate_action
    from controller.cli import _call_action, build_parser
    parse = build_parser().parse_args
    record = _call_action(parse(["call", "record", "c1", "--channels", "caller", "--beep", "--max-duration", "1h"]))
    assert record == {"record": {"channels": "caller", "beep": True, "max_duration": "1h"}}
    assert _call_action(parse(["call", "stop-record", "c1"])) == {"stop_record": True}
    assert _call_action(parse(["call", "stop-record", "c1", "r4"])) == {"stop_record": {"recording_id": "r4"}}
    for action in (record, {"stop_record": True}, {"record": "agent"}):
        assert validate_action(action)


async def test_the_decisions_media_actions_run_once_the_agent_is_connected(h):
    from controller.state.calls import now_ms
    CallControl(h.plane, h.store, lambda: SERVING)  # carries out on-answer actions for the plane
    decision = {"outcome": "agent", "rule": "r", "agent": {"name": "intake"},
                "on_answer": [{"record": {"channels": "caller"}}, {"record": {"channels": "sideways"}},
                              {"gather": {"max_digits": 2, "webhook": "http://127.0.0.1:9/none"}}]}
    await h.store.create(CALL, {"state": "routing", "outcome": "agent", "rule": "r", "decision": decision},
                         live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    await h.fake.inbound_call("callfabric", [CALL, "intake"], sip_call_id=CALL)
    started = await until_event(h, "recording_started")
    assert started["channels"] == "caller"
    await until_event(h, "gather_started")
    failed = await until_event(h, "on_answer_failed")
    assert failed["action"] == 1 and "sideways" in failed["reason"]  # an invalid one is refused, the rest runs
    names = [e["event"] for e in await h.store.timeline(CALL)]
    assert names.index("media_up") < names.index("recording_starting")


async def test_a_recording_is_stopped_and_fetched_by_the_next_controller(h, tmp_path):
    await h.call_up()
    started = await h.plane.recording.start(CALL, "both")
    await h.fake.wait_for_event("RecordingStarted")
    old = h.plane
    await h.stop_plane()
    await old.release_node("media1")
    await h.start_plane()
    await asyncio.wait_for(h.plane.wait_synced("media1"), 5)
    h.plane.recording.directory = tmp_path
    assert (await h.plane.recording.stop(CALL))["stopped"] == [started["recording_id"]]
    done = await until_event(h, "recording_completed")
    assert done["recording"] == started["recording_id"] and done["location"] == "local"
    assert (tmp_path / f"{h.plane.calls[CALL].recordings[started['recording_id']].name}.wav").stat().st_size > 44
