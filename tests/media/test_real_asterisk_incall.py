"""In-call telephony with a real Asterisk (our asterisk/ config set), a real Kamailio edge, real
Redis and real SIPp: DTMF a SIPp caller presses (RFC 4733) reaches the webhook with the right
digits, in order; a recording of a caller playing known speech has the expected duration and
sound in it, and its `recording.completed` webhook says so; a transfer by SIP REFER toward a
SIPp called party that accepts it (202, NOTIFY 200) completes and the call leaves the node,
and toward one that refuses it (603) fails with that status and falls back to bridging the
target through the edge; a G.722 caller reaches a slin16 agent at 16 kHz; a websocket agent's
FLUSH_MEDIA stops the caller hearing it within 40 ms (measured at the caller) and its marks
come back once the audio before them has been played, and it hears the caller's keys as
DTMF_END messages; answering-machine detection tells a called party playing a long greeting
(machine) from one saying a short hello (human).

Runs when an `asterisk` binary is available (PATH or CALLFABRIC_ASTERISK); skipped with that
reason otherwise."""
from __future__ import annotations

import array
import asyncio
import contextlib
import json
import math
import re
import socket
import struct
import time

from pathlib import Path

import pytest
from aiohttp import web

from controller.api.webhooks import verify
from controller.api import routes as api
from controller.app import MEDIA, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.sip_ua import TONE, SipCaller, ulaw_silent
from controller.localstack.sipp import SIPP_PCAPS, SippUAS, run_uac, write_rtp_pcap
from tests.media.test_real_asterisk import edge_trunks, media_agent, pytestmark, stack  # noqa: F401  (skip marks, fixtures)

SECRET = "incall-secret"
POLICY = """\
settings:
  numbering: {{country_code: "1", national_prefix: "1"}}
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:{intake}", transport: rtp, codec: ulaw}}
  hd: {{node_set: media, endpoint: "127.0.0.1:{hd}", transport: rtp, codec: slin16}}
  talker: {{node_set: media, endpoint: agent_ws, transport: websocket, codec: ulaw}}
rules:
  - name: websocket
    match: {{ruri: "+18005550117"}}
    actions: [route_agent: talker]
  - name: wideband
    match: {{ruri: "+18005550116"}}
    actions: [route_agent: hd]
default:
  actions: [route_agent: intake]
"""


class Capture(media_agent.RtpAgent):
    """An agent that keeps the audio it receives (RTP payloads), sending nothing back."""

    def __init__(self):
        super().__init__(echo=False)
        self.payloads: list[bytes] = []
        self.payload_types: set[int] = set()

    def datagram_received(self, data: bytes, addr) -> None:
        super().datagram_received(data, addr)
        if len(data) > 12 and data[0] >> 6 == 2:
            self.payload_types.add(data[1] & 0x7F)
            self.payloads.append(data[12 + 4 * (data[0] & 0x0F):])


class Receiver:
    """The application's webhook: keeps every signed event it is sent."""

    def __init__(self):
        self.events: list[dict] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> "Receiver":
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            if not verify(SECRET, request.headers.get("Callfabric-Signature", ""), body):
                return web.Response(status=401)
            self.events.append(json.loads(body))
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/events", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def of(self, call_id: str, kind: str) -> list[dict]:
        return [e for e in self.events if e["call_id"] == call_id and e["type"] == kind]


@pytest.fixture
def websocket_port():
    return free_port()


@pytest.fixture
def asterisk_options(websocket_port):
    """The suite's Asterisk connects websocket agents (agent_ws) to this module's agent."""
    return {"websocket_clients": {"agent_ws": f"ws://127.0.0.1:{websocket_port}/media"}}


@pytest.fixture
async def talker(websocket_port):
    """The websocket agent Asterisk connects to (examples/media_agent.py)."""
    agent = media_agent.WebSocketAgent()
    app = web.Application()
    app.router.add_get("/media", agent.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", websocket_port).start()
    try:
        yield agent
    finally:
        await runner.cleanup()


@pytest.fixture
async def controller(stack):  # noqa: F811
    loop = asyncio.get_running_loop()
    agent, hd = media_agent.RtpAgent(echo=True), Capture()
    port, hd_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    transport, _ = await loop.create_datagram_endpoint(lambda: agent, local_addr=("127.0.0.1", port))
    hd_transport, _ = await loop.create_datagram_endpoint(lambda: hd, local_addr=("127.0.0.1", hd_port))
    receiver = await Receiver().start()
    policy_dir = stack["tmp"] / "policy"
    await asyncio.to_thread(policy_dir.mkdir)
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, POLICY.format(intake=port, hd=hd_port))
    settings = Settings(policy_dir=str(policy_dir), redis_url=stack["redis_url"],
                        edge_evapi=[f"127.0.0.1:{stack['kamailio'].evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                        ari_nodes=[stack["asterisk"].ari_node()], instance_id="incall-suite",
                        webhook_url=receiver.url, webhook_secret=SECRET,
                        recording_dir=str(stack["tmp"] / "recordings"))
    app = build_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    deadline = time.monotonic() + 20
    while not app[MEDIA].metrics.registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
        assert time.monotonic() < deadline, "the controller did not connect to Asterisk's ARI"
        await asyncio.sleep(0.1)
    try:
        yield {"app": app, "plane": app[MEDIA], "agent": agent, "hd": hd, "receiver": receiver, **stack}
    finally:
        await runner.cleanup()
        await receiver.runner.cleanup()
        transport.close()
        hd_transport.close()


async def until(predicate, timeout: float, what: str) -> None:
    """Until `predicate()` holds; a predicate that reads files runs in a thread."""
    deadline = time.monotonic() + timeout
    while not (await asyncio.to_thread(predicate) if getattr(predicate, "blocking", False) else predicate()):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def reading(predicate):
    """Mark a predicate that reads files (run in a thread by `until`)."""
    predicate.blocking = True
    return predicate


async def test_dtmf_a_sipp_caller_presses_reaches_the_webhook_in_order(controller):
    result = await asyncio.to_thread(run_uac, controller["tmp"], controller["kamailio"].sip_port, "uac_media.xml",
                                     service="18005550199", hold_ms=1500, dtmf="1479", timeout_s=20)
    assert result.successful == 1, result.output
    call_id = next(m.header("Call-ID")[0] for m in result.messages if m.direction == "out")
    receiver = controller["receiver"]
    with contextlib.suppress(AssertionError):
        await until(lambda: len(receiver.of(call_id, "call.dtmf")) >= 4, 10, "")
    pressed = receiver.of(call_id, "call.dtmf")
    assert [e["data"]["digit"] for e in pressed] == list("1479"), pressed
    assert all(e["data"]["leg"] == "caller" and e["data"]["duration_ms"] > 0 for e in pressed)


async def the_call(plane, timeout: float = 10.0):
    """The one call on the plane, once it is active."""
    deadline = time.monotonic() + timeout
    while True:
        active = [m for m in plane.calls.values() if m.state == "active"]
        if active:
            return active[0]
        assert time.monotonic() < deadline, "no call became active"
        await asyncio.sleep(0.05)


def wav_samples(data: bytes) -> tuple[int, list[int]]:
    """(sample rate, 16-bit samples) of Asterisk's wav (RIFF, PCM 16-bit mono)."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    rate = struct.unpack("<I", data[24:28])[0]
    at = data.index(b"data") + 8
    pcm = data[at:]
    return rate, list(struct.unpack(f"<{len(pcm) // 2}h", pcm[:len(pcm) // 2 * 2]))


async def test_a_recording_of_known_speech_has_its_duration_and_sound(controller):
    plane, receiver = controller["plane"], controller["receiver"]
    uac = asyncio.create_task(asyncio.to_thread(
        run_uac, controller["tmp"], controller["kamailio"].sip_port, "uac_media.xml", service="18005550199",
        hold_ms=6000, audio=str(SIPP_PCAPS / "g711a.pcap"), timeout_s=30))
    media = await the_call(plane)
    started = await plane.recording.start(media.call_id, "caller")
    await asyncio.sleep(3.0)
    await plane.recording.stop(media.call_id, started["recording_id"])
    result = await uac
    assert result.successful == 1, result.output
    await until(lambda: receiver.of(media.call_id, "recording.completed"), 10, "no recording.completed webhook")
    (done,) = receiver.of(media.call_id, "recording.completed")
    assert 2500 <= done["data"]["duration_ms"] <= 3600, done
    rec = media.recordings[started["recording_id"]]
    data = await asyncio.to_thread(Path(rec.path).read_bytes)
    assert len(data) == done["data"]["size_bytes"]
    rate, samples = wav_samples(data)
    assert rate == 8000 and abs(len(samples) / rate * 1000 - done["data"]["duration_ms"]) < 50
    rms = math.sqrt(sum(s * s for s in samples) / len(samples))
    assert rms > 300, f"the recording is (nearly) silent: RMS {rms:.0f}"


async def outbound_call(plane, far_end: SippUAS, call_id: str):
    """A call from the agent `intake` to a SIPp called party, through the edge, once answered."""
    await plane.call.originate(call_id, f"sip:far@{far_end.addr}", plane.resolve_agent("intake"))
    deadline = time.monotonic() + 10
    while (plane.calls.get(call_id) is None or plane.calls[call_id].state != "active"):
        assert time.monotonic() < deadline, "the outbound call was not answered"
        await asyncio.sleep(0.05)
    return plane.calls[call_id]


async def test_a_refer_the_far_end_accepts_completes_and_the_call_leaves(controller):
    plane, receiver = controller["plane"], controller["receiver"]
    far_end = await asyncio.to_thread(SippUAS(controller["tmp"], "uas_refer_accept.xml", "accepts").start)
    try:
        await outbound_call(plane, far_end, "refer-ok@test")
        await plane.refer.start("refer-ok@test", "sip:+15550009999@carrier.example.com", headers={"X-Case": "42"})
        await until(lambda: receiver.of("refer-ok@test", "transfer.completed"), 15, "no transfer.completed")
        (done,) = receiver.of("refer-ok@test", "transfer.completed")
        assert (done["data"]["method"], done["data"]["status"], done["data"]["confirmed"]) == ("refer", 200, True)
        await until(lambda: "refer-ok@test" not in plane.calls, 10, "the call did not leave the node")
        (refer,) = await asyncio.to_thread(far_end.requests, "REFER")
        assert refer.header("Refer-To") == ["<sip:+15550009999@carrier.example.com?X-Case=42>"]
        await until(reading(lambda: far_end.requests("BYE")), 10, "the transferor did not hang up")
    finally:
        await asyncio.to_thread(far_end.stop)


async def test_a_refused_refer_reports_603_and_bridges_the_target_instead(controller):
    plane, receiver = controller["plane"], controller["receiver"]
    far_end = await asyncio.to_thread(SippUAS(controller["tmp"], "uas_refer_refuse.xml", "refuses").start)
    desk = await asyncio.to_thread(SippUAS(controller["tmp"], "uas_answer.xml", "desk").start)
    try:
        media = await outbound_call(plane, far_end, "refer-no@test")
        await plane.refer.start("refer-no@test", f"sip:desk@{desk.addr}", headers={"X-Case": "43"})
        await until(lambda: receiver.of("refer-no@test", "transfer.failed"), 15, "no transfer.failed")
        (failed,) = receiver.of("refer-no@test", "transfer.failed")
        assert (failed["data"]["status"], failed["data"]["fallback"]) == (603, True), failed
        await until(reading(lambda: desk.invites()), 10, "the fallback never called the target")
        assert (await asyncio.to_thread(desk.invites))[0].header("X-Case") == ["43"]
        await until(lambda: receiver.of("refer-no@test", "transfer.completed"), 10, "no handoff to the target")
        assert media.agent is None and media.state == "active"
        await plane.call.hangup("refer-no@test")
        await until(reading(lambda: far_end.requests("BYE")), 10, "the called party was not hung up")
    finally:
        await asyncio.to_thread(far_end.stop)
        await asyncio.to_thread(desk.stop)


def tone_power_share(samples: list[int], frequency: float, rate: int) -> float:
    """The share of the signal's power at `frequency` (Goertzel over the whole block)."""
    k = 2 * math.cos(2 * math.pi * frequency / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + k * s1 - s2, s1
    at_frequency = (s1 * s1 + s2 * s2 - k * s1 * s2) * 2 / len(samples)
    total = sum(x * x for x in samples)
    return at_frequency / total if total else 0.0


async def test_g722_from_the_caller_reaches_a_slin16_agent_as_16_khz(controller):
    """A 6 kHz tone only exists in wideband audio: a path through 8 kHz anywhere (G.711, a
    resampled bridge) would remove it before the agent."""
    G722 = pytest.importorskip("G722", reason="the g722 package (test extra) encodes the caller's wideband audio")
    rate, frequency = 16000, 6000
    pcm = array.array("h", (round(8000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(rate)))
    encoded = G722.G722(rate, 64000).encode(pcm)
    frames = [encoded[i:i + 160] for i in range(0, len(encoded), 160)]  # 20 ms each (64 kbit/s)
    caller = SipCaller(controller["kamailio"].sip_port, codec=(9, "G722/8000"))
    result = await caller.call("18005550116", hold_s=3.0, payload=lambda n: frames[n % len(frames)])
    assert result.status == 200, result
    assert re.search(r"(?m)^m=audio \d+ RTP/AVP 9\b", result.sdp), result.sdp  # G.722 answered
    hd = controller["hd"]
    assert len(hd.payloads) >= 100 and {len(p) for p in hd.payloads[10:-10]} == {640}, \
        "the agent gets 20 ms frames of 16 kHz 16-bit audio"
    samples = list(struct.unpack(f">{len(b''.join(hd.payloads[25:125])) // 2}h", b"".join(hd.payloads[25:125])))
    share = tone_power_share(samples, frequency, rate)
    assert share > 0.5, f"only {share:.2f} of the agent's audio is the caller's 6 kHz tone: resampled through 8 kHz"

SILENCE = b"\xff" * 160  # 20 ms of µ-law silence


def voiced(packet: bytes) -> bool:
    """A received RTP packet that carries sound (not the silence Asterisk fills gaps with)."""
    header = 12 + 4 * (packet[0] & 0x0F)
    return not ulaw_silent(packet[header:])


async def media_socket(agent, timeout: float = 10.0):
    """The agent's websocket once Asterisk said MEDIA_START on it."""
    deadline = time.monotonic() + timeout
    while not (agent.sockets and any(text.startswith("MEDIA_START") for _, text in agent.texts)):
        assert time.monotonic() < deadline, "Asterisk never connected to the websocket agent"
        await asyncio.sleep(0.02)
    return agent.sockets[-1]


async def test_flush_media_stops_the_caller_hearing_the_agent_within_40_ms(controller, talker):
    heard: list[tuple[float, bool]] = []
    moments = {}

    async def talk_then_flush(result):
        ws = await media_socket(talker)
        await talker.say(ws, TONE * 250, mark="greeting")  # 5 s queued toward the caller
        deadline = time.monotonic() + 10
        while sum(v for _, v in heard) < 50:  # the caller has heard a second of it
            assert time.monotonic() < deadline, "the caller never heard the agent"
            await asyncio.sleep(0.005)
        moments["flush"] = time.monotonic()
        await talker.barge_in(ws)
        await asyncio.sleep(1.5)

    caller = SipCaller(controller["kamailio"].sip_port)
    result = await caller.call("18005550117", hold_s=4.0, while_up=talk_then_flush, payload=lambda n: SILENCE,
                               listen=lambda packet, when: heard.append((when, voiced(packet))))
    assert result.status == 200, result
    flush = moments["flush"]
    before = [t for t, v in heard if v and flush - 0.2 <= t < flush]
    assert len(before) >= 8, "the agent was not being heard right before the flush"
    after = [t for t, v in heard if v and t >= flush]
    stopped_ms = (max(after) - flush) * 1000 if after else 0.0
    lead_ms = (flush - max(before)) * 1000
    print(f"barge-in: {len(after)} packet(s) of the agent reached the caller after FLUSH_MEDIA (the last "
          f"{stopped_ms:.1f} ms after it); the last one before it arrived {lead_ms:.1f} ms before")
    assert stopped_ms <= 40, f"the caller still heard the agent {stopped_ms:.1f} ms after the flush"
    assert not [t for t, v in heard if v and flush + 0.1 <= t <= flush + 1.5], "flushed audio played after all"
    assert talker.marks("greeting") == [], "a mark behind flushed audio is never reported played"


async def test_a_mark_comes_back_once_the_audio_before_it_was_played(controller, talker):
    heard: list[tuple[float, bool]] = []
    moments = {}

    async def talk(result):
        ws = await media_socket(talker)
        moments["said"] = time.monotonic()
        await talker.say(ws, TONE * 50, mark="one-second")  # 1 s, then the mark
        deadline = time.monotonic() + 5
        while not talker.marks("one-second"):
            assert time.monotonic() < deadline, "no MEDIA_MARK_PROCESSED"
            await asyncio.sleep(0.01)

    caller = SipCaller(controller["kamailio"].sip_port)
    result = await caller.call("18005550117", hold_s=3.0, while_up=talk, payload=lambda n: SILENCE,
                               listen=lambda packet, when: heard.append((when, voiced(packet))))
    assert result.status == 200, result
    (marked,) = talker.marks("one-second")
    assert 0.9 <= marked - moments["said"] <= 1.5, marked - moments["said"]
    last_voiced = max(t for t, v in heard if v)
    assert abs(last_voiced - marked) <= 0.1, (last_voiced - marked)


async def test_amd_tells_a_machines_greeting_from_a_humans_hello(controller):
    receiver, control = controller["receiver"], controller["app"][api.CONTROL]
    called = {"machine": [TONE] * 200,                # 4 s of voice: a voicemail greeting
              "human": [TONE] * 30 + [SILENCE] * 150}  # "hello?" (0.6 s), then listening
    parties = []
    try:
        for name, payloads in called.items():
            pcap = await asyncio.to_thread(write_rtp_pcap, controller["tmp"] / f"{name}.pcap", payloads)
            parties.append(await asyncio.to_thread(
                lambda: SippUAS(controller["tmp"], "uas_answer_play.xml", name, values={"PCAP": str(pcap)}).start()))
        for party, expected in zip(parties, called):
            answer = await control.originate(f"sip:{expected}@{party.addr}", "intake", amd_ms=5000)
            call_id = answer["call_id"]
            await until(lambda: receiver.of(call_id, "call.amd"), 15, f"no call.amd for the {expected}")
            (amd,) = receiver.of(call_id, "call.amd")
            assert amd["data"]["result"] == expected, amd
            await until(lambda: receiver.of(call_id, "media.connected"), 10, "the agent never joined")
            await controller["plane"].call.hangup(call_id)
    finally:
        for party in parties:
            await asyncio.to_thread(party.stop)


async def test_a_websocket_agent_hears_the_callers_keys_as_dtmf_end_messages(controller, talker):
    result = await asyncio.to_thread(run_uac, controller["tmp"], controller["kamailio"].sip_port, "uac_media.xml",
                                     service="18005550117", hold_ms=1500, dtmf="25", timeout_s=20)
    assert result.successful == 1, result.output
    keys = [text.split()[1] for _, text in talker.texts if text.startswith("DTMF_END")]
    assert keys == ["digit:2", "digit:5"], talker.texts
