"""The media plane with a real Asterisk (our asterisk/ config set), a real Kamailio edge, real
Redis, and real RTP: a caller's audio reaches the AI agent and the agent's comes back, a fork
delivers the caller's audio live, an AI→AI transfer keeps the caller's audio flowing, a human
brought in through the edge receives the context headers.

Runs when an `asterisk` binary is available (PATH or CALLFABRIC_ASTERISK); skipped with that
reason otherwise."""
from __future__ import annotations

import asyncio
import importlib.util
import shutil
import time
from pathlib import Path

import pytest

from controller.app import MEDIA, build_app
from controller.config import Settings
from controller.localstack.asterisk import Asterisk, asterisk_binary
from controller.localstack.kamailio import Kamailio, free_port
from controller.localstack.sipp import SippUAS
from controller.state.calls import CallStore
from controller.localstack.sip_ua import SipCaller

BINARY = asterisk_binary()
REQUIRES_ASTERISK = pytest.mark.skipif(
    BINARY is None, reason="no asterisk binary: install Asterisk or set CALLFABRIC_ASTERISK to run the real-Asterisk suite")
pytestmark = [
    REQUIRES_ASTERISK,
    pytest.mark.skipif(any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
                       reason="kamailio, sipp and redis-server are required"),
]

_spec = importlib.util.spec_from_file_location("media_agent", Path(__file__).resolve().parents[2] / "examples" / "media_agent.py")
media_agent = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(media_agent)

POLICY = """\
settings:
  numbering: {{country_code: "1", national_prefix: "1"}}
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:{intake}", transport: rtp, codec: ulaw}}
  billing: {{node_set: media, endpoint: "127.0.0.1:{billing}", transport: rtp, codec: ulaw}}
fork_targets:
  stt: {{endpoint: "127.0.0.1:{stt}", transport: rtp, codec: ulaw, direction: in}}
rules:
  - name: with-fork
    match: {{ruri: "+18005550100"}}
    actions: [route_agent: intake, fork: stt]
default:
  actions: [route_agent: intake]
"""


@pytest.fixture
def asterisk_options():
    """Extra arguments of the suite's Asterisk (a module that needs more overrides this)."""
    return {}


@pytest.fixture
def edge_trunks():
    """The trunk table directory of the suite's edge (None: no trunk checks); a module that
    calls carriers overrides this."""
    return None


@pytest.fixture
def stack(tmp_path, redis_url, asterisk_options, edge_trunks):
    # the human desk's PBX (127.0.0.1) is a trusted destination: it gets the context headers
    kamailio = Kamailio(tmp_path, {}, trunks_dir=edge_trunks, extra_defines={"TRUSTED_DEST_NET": '"127.0.0.1/32"'})
    asterisk = Asterisk(tmp_path, edge_port=kamailio.sip_port, **asterisk_options)
    kamailio.write_dispatcher_list({1: [f"127.0.0.1:{asterisk.sip_port}"]})
    human = SippUAS(tmp_path, "uas_answer.xml", "human")
    started = []
    try:
        for thing in (kamailio, asterisk, human):
            thing.start()
            started.append(thing)
        yield {"kamailio": kamailio, "asterisk": asterisk, "human": human, "tmp": tmp_path, "redis_url": redis_url}
    finally:
        for thing in reversed(started):
            thing.stop()
        if asterisk.proc and asterisk.proc.returncode not in (None, 0, -15):
            print(asterisk.log_tail())


@pytest.fixture
async def running(stack):
    loop = asyncio.get_running_loop()
    agents = {name: media_agent.RtpAgent(echo=True) for name in ("intake", "billing")}
    sink = media_agent.RtpAgent(echo=False)
    ports = {}
    transports = []
    for name, protocol in [*agents.items(), ("stt", sink)]:
        port = free_port(__import__("socket").SOCK_DGRAM)
        transport, _ = await loop.create_datagram_endpoint(lambda p=protocol: p, local_addr=("127.0.0.1", port))
        transports.append(transport)
        ports[name] = port
    policy_dir = stack["tmp"] / "policy"
    await asyncio.to_thread(policy_dir.mkdir)
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, POLICY.format(**ports))
    settings = Settings(policy_dir=str(policy_dir), redis_url=stack["redis_url"],
                        edge_evapi=[f"127.0.0.1:{stack['kamailio'].evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                        ari_nodes=[stack["asterisk"].ari_node()], ami_nodes=[stack["asterisk"].ami_node()],
                        instance_id="real-suite", media_health_interval_s=1.0, one_way_audio_after_s=2.0)
    app = build_app(settings)
    from aiohttp import web
    runner = web.AppRunner(app)
    await runner.setup()
    store = CallStore(stack["redis_url"])
    deadline = time.monotonic() + 20
    while not app[MEDIA].metrics.registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
        assert time.monotonic() < deadline, "the controller did not connect to Asterisk's ARI"
        await asyncio.sleep(0.1)
    try:
        yield {"app": app, "plane": app[MEDIA], "agents": agents, "sink": sink, "store": store,
               "caller": SipCaller(stack["kamailio"].sip_port), **stack}
    finally:
        await store.aclose()
        await runner.cleanup()
        for transport in transports:
            transport.close()


async def wait_active(plane, call_id: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        media = plane.calls.get(call_id)
        if media and media.state == "active":
            return media
        assert time.monotonic() < deadline, f"call {call_id} never became active"
        await asyncio.sleep(0.05)


async def test_the_agent_hears_the_caller_and_the_caller_hears_the_agent(running):
    result = await running["caller"].call("18005550199", hold_s=3.0)
    assert result.status == 200, result
    agent = running["agents"]["intake"]
    assert agent.received >= 100, f"the agent got {agent.received} packets of the caller's audio in 3 s"
    assert result.rtp_received >= 100, f"the caller got {result.rtp_received} packets back from the agent"


async def test_a_fork_delivers_the_callers_audio_live(running):
    result = await running["caller"].call("18005550100", hold_s=4.0)
    assert result.status == 200, result
    sink = running["sink"]
    assert sink.received >= 100, f"the fork target got {sink.received} packets"
    assert 40 <= sink.rate() <= 60, f"fork packet rate {sink.rate():.1f}/s, expected about 50/s"
    timeline = [e["event"] for e in await running["store"].timeline(result.call_id)]
    assert "fork_started" in timeline


async def test_ai_to_ai_transfer_keeps_the_callers_audio_flowing(running):
    plane = running["plane"]
    agents = running["agents"]
    moments = {}

    async def transfer_midway(result):
        media = await wait_active(plane, result.call_id)
        await asyncio.sleep(1.0)
        moments["before"] = (result.rtp_received, agents["billing"].received)
        await plane.call.transfer(result.call_id, "billing")
        moments["intake_after"] = agents["intake"].received
        await asyncio.sleep(2.0)
        moments["after"] = (result.rtp_received, agents["billing"].received)
        assert media.agent.name == "billing"

    result = await running["caller"].call("18005550199", hold_s=4.5, while_up=transfer_midway)
    assert result.status == 200
    caller_before, billing_before = moments["before"]
    caller_after, billing_after = moments["after"]
    assert billing_before == 0 and billing_after >= 60, "the new agent must hear the caller after the transfer"
    assert caller_after - caller_before >= 60, "the caller must keep hearing an agent across the transfer"
    assert agents["intake"].received - moments["intake_after"] <= 5, "the old agent must stop hearing the caller"


async def test_a_human_brought_in_receives_the_context_headers(running):
    plane = running["plane"]
    human = running["human"]

    async def bring_human(result):
        await wait_active(plane, result.call_id)
        await plane.humans.add(result.call_id, "desk", f"sip:desk@{human.addr}", mode="conference",
                              context={"summary": "Wants a refund", "intent": "refund", "sentiment": "negative"})
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(human.invites):
            assert time.monotonic() < deadline, "the human never got the INVITE"
            await asyncio.sleep(0.1)

    result = await running["caller"].call("18005550199", hold_s=4.0, while_up=bring_human)
    assert result.status == 200
    (invite,) = (await asyncio.to_thread(human.invites))[:1]
    assert invite.header("X-Summary") == ["Wants a refund"]
    assert invite.header("X-Intent") == ["refund"] and invite.header("X-Sentiment") == ["negative"]


async def test_an_agent_that_goes_silent_is_flagged_as_one_way_audio(running):
    """Measured on the caller's channel (the only one Asterisk keeps RTP statistics for)."""
    plane, agent = running["plane"], running["agents"]["intake"]
    store = running["store"]
    metrics = plane.metrics.registry

    async def go_silent(result):
        await wait_active(plane, result.call_id)
        await asyncio.sleep(1.5)
        agent.echo = False
        deadline = time.monotonic() + 8
        while not [e for e in await store.timeline(result.call_id) if e["event"] == "one_way_audio"]:
            assert time.monotonic() < deadline, "no one_way_audio for an agent silent for 8 s"
            await asyncio.sleep(0.2)
        agent.echo = True

    try:
        result = await running["caller"].call("18005550199", hold_s=11.0, while_up=go_silent)
    finally:
        agent.echo = True
    assert result.status == 200
    (event,) = [e for e in await store.timeline(result.call_id) if e["event"] == "one_way_audio"]
    assert event["leg"] == "agent" and event["silent_s"] >= 2
    assert metrics.get_sample_value("callfabric_one_way_audio_total", {"leg": "agent"}) >= 1
    assert metrics.get_sample_value("callfabric_media_rtp_packets_total", {"leg": "caller", "direction": "received"}) > 100
    assert not metrics.get_sample_value("callfabric_ari_request_errors_total", {"operation": "rtpStatistics"})


async def test_rtp_keeps_reaching_the_caller_while_the_agent_is_silent(running):
    plane, agent = running["plane"], running["agents"]["intake"]
    window = {}

    async def silence(result):
        await wait_active(plane, result.call_id)
        agent.echo = False
        await asyncio.sleep(0.5)
        before = len(result.received_at)
        await asyncio.sleep(4.0)
        window["packets"] = len(result.received_at) - before
        window["gaps"] = [b - a for a, b in zip(result.received_at[before:], result.received_at[before + 1:])]
        agent.echo = True

    try:
        result = await running["caller"].call("18005550199", hold_s=6.0, while_up=silence)
    finally:
        agent.echo = True
    assert result.status == 200
    assert window["packets"] >= 3, f"{window['packets']} RTP packets reached the caller in 4 s of agent silence"
    assert max(window["gaps"]) < 2.5, "the caller went more than 2.5 s without a packet"
    assert result.payload_types[13] >= 3  # comfort noise (the edge endpoint's rtp_keepalive)


async def test_playbacks_report_what_asterisk_did(running):
    plane = running["plane"]
    from controller.media.feature import MediaError
    outcomes = {}

    async def play(result):
        await wait_active(plane, result.call_id)
        with pytest.raises(MediaError) as missing:
            await plane.playback.play(result.call_id, "sound:no-such-sound")
        outcomes["missing"] = missing.value
        with pytest.raises(MediaError) as tone:
            await plane.playback.play(result.call_id, "tone:no-such-tone")
        outcomes["tone"] = tone.value
        outcomes["hello"] = await plane.playback.play(result.call_id, "sound:hello-world")
        outcomes["ring"] = await plane.playback.play(result.call_id, "tone:ring")  # behind hello-world
        await asyncio.sleep(2.5)  # hello-world (~1.5 s) finishes, the ring starts

    result = await running["caller"].call("18005550199", hold_s=4.0, while_up=play)
    assert result.status == 200
    assert outcomes["hello"]["state"] == "playing" and outcomes["ring"]["state"] == "queued"
    assert outcomes["missing"].status == 422 and "could not be played" in str(outcomes["missing"])
    assert outcomes["tone"].status == 422
    timeline = [e for e in await running["store"].timeline(result.call_id) if e["event"].startswith("play")]
    assert [e["uri"] for e in timeline if e["event"] == "play_failed"] == ["sound:no-such-sound", "tone:no-such-tone"]
    assert [e["uri"] for e in timeline if e["event"] == "play_finished"][:1] == ["sound:hello-world"]


async def test_the_human_receives_a_call_reference_and_the_callers_number(running):
    plane, human = running["plane"], running["human"]

    async def bring_human(result):
        await wait_active(plane, result.call_id)
        await plane.humans.add(result.call_id, "desk", f"sip:desk@{human.addr}", mode="handoff",
                               context={"summary": "Wants a refund"})
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(human.invites):
            assert time.monotonic() < deadline, "the human never got the INVITE"
            await asyncio.sleep(0.1)

    result = await running["caller"].call("18005550199", hold_s=3.0, while_up=bring_human)
    assert result.status == 200
    (invite,) = (await asyncio.to_thread(human.invites))[:1]
    assert invite.header("X-Callfabric-Call-Id") == [result.call_id]
    assert "+12025550123" in invite.header("From")[0] and "anonymous" not in invite.header("From")[0].lower()


@pytest.mark.parametrize("mode, technology", [("listen", "simple_bridge"), ("conference", "softmix")])
async def test_a_listening_human_keeps_the_agents_path_two_party(running, mode, technology):
    """A third member turns the call's bridge into a mixing one (softmix, a 20 ms clock: ~30 ms
    more for the agent, see bench/media.py --conference); a human who listens hears the call
    through a snoop instead, and the call's bridge stays caller + agent."""
    plane, human = running["plane"], running["human"]
    seen = {}

    async def bring_human(result):
        media = await wait_active(plane, result.call_id)
        await plane.humans.add(result.call_id, "desk", f"sip:desk@{human.addr}", mode=mode)
        deadline = time.monotonic() + 10
        while not any(h.state == "up" for h in media.humans.values()):
            assert time.monotonic() < deadline, "the human never joined"
            await asyncio.sleep(0.1)
        bridges = {b["id"]: b for b in await plane.nodes["media1"].bridges()}
        seen["call"] = bridges[media.bridge]
        leg = next(iter(media.humans.values()))
        seen["human"] = bridges.get(leg.bridge) if leg.bridge else None
        seen["agent_rx"] = running["agents"]["intake"].received

    result = await running["caller"].call("18005550199", hold_s=4.0, while_up=bring_human)
    assert result.status == 200
    assert seen["call"]["technology"] == technology
    if mode == "listen":
        assert len(seen["call"]["channels"]) == 2 and len(seen["human"]["channels"]) == 2
    assert running["agents"]["intake"].received > seen["agent_rx"], "the agent kept hearing the caller"
