"""The fake ARI against real Asterisk 22.10.1 conversations (tests/media/ari_conversations/,
recorded by tests/support/ari_conversations.py): every recorded request is replayed against
the fake, which must answer with Asterisk's status and error message (and a body of the same
shape), and emit the same events after each step — including what Asterisk refuses:
rtp_statistics of ExternalMedia channels, playbacks of sounds that are not installed or of
unknown schemes, dialplan functions that cannot be read."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from controller.media.ari import basic_authorization
from tests.support.ari_conversations import APP, IGNORED_EVENTS, RECORDINGS, SCENARIOS, normalise, substitute
from tests.support.fake_ari import FakeAri

RECORDED = sorted(p.stem for p in RECORDINGS.glob("*.json"))


def test_every_scenario_has_a_recording():
    assert sorted(SCENARIOS) == RECORDED, "record the missing ones: python3 -m tests.support.ari_conversations NAME"


def _event_key(event: dict) -> tuple:
    """What must match in an event: its type, whose it is, and what a playback became."""
    playback = event.get("playback") or {}
    return (event["type"], (event.get("channel") or {}).get("id", ""), playback.get("id", ""),
            playback.get("state", ""), playback.get("media_uri", ""))


def _shape(body):
    if isinstance(body, dict):
        if set(body) == {"value"} or set(body) == {"message"}:
            return body
        return sorted(body)
    if isinstance(body, list):
        return [_shape(b) for b in body[:1]]
    return body


@pytest.mark.parametrize("name", RECORDED)
async def test_the_fake_answers_like_the_recorded_asterisk(name):
    recording = json.loads((RECORDINGS / f"{name}.json").read_text())
    fake = await FakeAri(stasis_delay=0.005, playback_duration=0.05, channelvars=()).start()
    events: list[tuple[int, dict]] = []
    step_now = [-1]
    try:
        async with aiohttp.ClientSession(headers={"Authorization": basic_authorization(fake.username,
                                                                                       fake.password)}) as http:
            ws = await http.ws_connect(fake.ws_url, params={"app": APP, "subscribeAll": "false"})

            async def read():
                async for message in ws:
                    events.append((step_now[0], json.loads(message.data)))
            reader = asyncio.create_task(read())
            await fake.wait_for_app(APP)
            caller = await fake.inbound_call(APP, ["rec@edge", "intake"], caller_number="+12025550123",
                                             sip_headers={"X-Callfabric-Agent": "intake"})
            names = {"$caller": caller, "$agent_port": "40000"}
            fake.set_audio(caller, "talking")            # the recorder's caller sends a tone all along
            agent_audio = "talking"                      # and its echo agent echoes it
            await fake.wait_for_event("StasisStart", channel_id=caller)
            await asyncio.sleep(0.02)
            answers = []
            for index, step in enumerate(recording["steps"]):
                step_now[0] = index
                if "request" in step:
                    async with http.request(step["request"], fake.url + substitute(step["path"], names),
                                            params=substitute(step.get("params"), names), json=step.get("body")) as r:
                        text = await r.text()
                    answers.append((index, r.status, json.loads(text) if text and text[0] in "{[" else text))
                    await asyncio.sleep(0.02)
                elif "wait" in step:
                    await asyncio.sleep(min(step["wait"], 0.1))
                elif "agent" in step:
                    agent_audio = "talking" if step["agent"] == "echo" else "none"
                if "rec-agent" in fake.channels and fake.channel("rec-agent").audio != agent_audio:
                    fake.set_audio("rec-agent", agent_audio)
                await fake.settle()
                await asyncio.sleep(0.01)
            step_now[0] = len(recording["steps"])
            await asyncio.sleep(0.05)
            reader.cancel()
            await ws.close()
    finally:
        await fake.stop()

    real_answers = [(e["step"], e["status"], e["body"]) for e in recording["log"] if "request" in e]
    for (step, real_status, real_body), (_, status, body) in zip(real_answers, answers):
        request = recording["steps"][step]
        where = f"step {step}: {request['request']} {request['path']} {request.get('params', '')}"
        assert status == real_status, f"{where}: the fake answered {status} {body}, Asterisk {real_status} {real_body}"
        body = normalise(body, {"$caller": caller})
        assert _shape(body) == _shape(real_body), f"{where}: the fake's body {body} is not shaped like {real_body}"
    assert len(answers) == len(real_answers)

    def by_step(pairs) -> dict[int, list[tuple]]:
        out: dict[int, list[tuple]] = {}
        for step, event in pairs:
            if event["type"] in IGNORED_EVENTS:
                continue
            event = normalise(event, {"$caller": caller})
            out.setdefault(max(step, -1), []).append(_event_key(event))
        return out
    real = by_step((e["step"], e["event"]) for e in recording["log"] if "event" in e)
    got = by_step(events)
    # The recorder saw the first StasisStart before its first step; so does the replay.
    assert got == real, "\n".join(f"step {s}: fake {got.get(s)}\n        real {real.get(s)}"
                                  for s in sorted(set(real) | set(got)) if got.get(s) != real.get(s))
