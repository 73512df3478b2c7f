"""Answering-machine detection for outbound calls against the spec-validating fake ARI, with
real Redis: the call is originated into the node's [callfabric-amd] dialplan and followed by
subscription until AMD() is done; the verdict it enters the application with becomes the call's
`call.amd` event before the agent joins (what AMD() does is played by the test)."""
from __future__ import annotations

from controller.api.commands import CallControl
from controller.api.events import public_event
from tests.media.test_dtmf import SERVING
from tests.media.test_media_plane import APP, h  # noqa: F401  (the fixture)


async def originate(h, amd_ms: int = 4000) -> tuple[str, str]:
    control = CallControl(h.plane, h.store, lambda: SERVING)
    answer = await control.originate("sip:+15550001234@carrier.example.com", "intake", amd_ms=amd_ms)
    return answer["call_id"], answer["channel"]


async def timeline(h, call_id: str) -> list[dict]:
    return await h.store.timeline(call_id)


async def test_the_verdict_of_amd_is_a_call_event_before_the_agent_joins(h):
    call_id, channel = await originate(h)
    (request,) = [o for o in h.fake.originations if o["channelId"] == channel]
    assert (request.get("context"), request.get("extension"), request.get("priority")) == ("callfabric-amd", "amd", 1)
    assert "app" not in request
    assert request["variables"]["CALLFABRIC_CALL"] == call_id and request["variables"]["CALLFABRIC_AMD_MS"] == "4000"
    subscribe = h.fake.requests_to("POST", rf"/applications/{APP}/subscription")[-1]
    assert subscribe.query == {"eventSource": f"channel:{channel}"}
    await h.fake.answer_outbound(channel)
    await h.fake.dialplan_set(channel, "AMDSTATUS", "MACHINE")
    await h.fake.dialplan_stasis(channel, APP, ["outbound", call_id, "amd", "MACHINE", "LONGGREETING-1600-1500"])
    amd = await until_event_of(h, call_id, "amd")
    assert (amd["result"], amd["status"], amd["cause"]) == ("machine", "MACHINE", "LONGGREETING-1600-1500")
    up = await until_event_of(h, call_id, "media_up")
    assert amd["ts"] <= up["ts"]
    assert public_event({**amd, "call_id": call_id})["type"] == "call.amd"


async def test_notsure_and_a_hangup_during_detection_are_unknown(h):
    call_id, channel = await originate(h)
    await h.fake.answer_outbound(channel)
    await h.fake.dialplan_stasis(channel, APP, ["outbound", call_id, "amd", "NOTSURE", "TOOLONG-4000"])
    assert (await until_event_of(h, call_id, "amd"))["result"] == "unknown"


async def test_a_call_that_fails_before_detection_is_followed_to_its_end(h):
    call_id, channel = await originate(h)
    await h.fake.fail_outbound(channel, 17)  # busy: only a subscriber hears of it
    left = await until_event_of(h, call_id, "caller_left")
    assert left["cause"] == "User busy"
    await h.until(lambda: call_id not in h.plane.calls)
    assert not [e for e in await timeline(h, call_id) if e["event"] == "amd"]


async def until_event_of(h, call_id: str, name: str) -> dict:
    import asyncio
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        found = [e for e in await timeline(h, call_id) if e["event"] == name]
        if found:
            return found[-1]
        assert asyncio.get_running_loop().time() < deadline, f"no {name} on the timeline of {call_id}"
        await asyncio.sleep(0.02)
