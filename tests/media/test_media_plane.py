"""The media plane against the spec-validating fake ARI, with real Redis: full calls — agent
leg, forks, AI→AI transfer, a human brought in, hang-ups, a dropped websocket with resync,
a controller restart — asserting the exact ARI requests and the Redis state."""
from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from controller.media.ari import AriClient, AriNode
from controller.media.health import MediaHealth
from controller.media.plane import Endpoint, MediaError, MediaPlane
from controller.metrics import Metrics
from controller.state.calls import CallStore, now_ms
from tests.support.fake_ari import FakeAri

APP = "callfabric"
AGENTS = {
    "intake": Endpoint("intake", "127.0.0.1:4000", "rtp", "ulaw"),
    "billing": Endpoint("billing", "127.0.0.1:4001", "audiosocket", "slin16"),
}
TARGETS = {"stt": Endpoint("stt", "127.0.0.1:9100", "rtp", "slin16"),
           "recorder": Endpoint("recorder", "127.0.0.1:9200", "rtp", "ulaw")}


class Harness:
    def __init__(self, fake: FakeAri, store: CallStore):
        self.fake = fake
        self.store = store
        self.metrics = Metrics()
        self.plane: MediaPlane | None = None
        self.task: asyncio.Task | None = None

    async def start_plane(self) -> MediaPlane:
        client = AriClient(AriNode("media1", self.fake.url, "callfabric", "secret"), APP)
        self.plane = MediaPlane({"media1": client}, self.store, self.metrics, resolve_agent=AGENTS.get,
                                resolve_fork_target=TARGETS.get, edge_endpoint="edge", instance_id="test",
                                api_base_url="http://controller.test")
        await self.plane.recover()
        self.task = asyncio.create_task(self.plane.serve_node("media1"))
        await self.fake.wait_for_app(APP)
        return self.plane

    async def stop_plane(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await self.plane.nodes["media1"].close()
            self.task = None

    async def decided_call(self, call_id: str, agent: str = "intake", forks: list[dict] | None = None) -> None:
        decision = {"outcome": "agent", "rule": "r", "agent": {"name": agent}, "forks": forks or []}
        await self.store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "r", "decision": decision},
                                live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})

    async def call_up(self, call_id: str = "call-1@edge", **kw) -> str:
        await self.decided_call(call_id, **kw)
        channel = await self.fake.inbound_call(APP, [call_id, kw.get("agent", "intake")], sip_call_id=call_id)
        await self.until(lambda: (self.plane.calls.get(call_id) or _Missing).state == "active")
        return channel

    async def until(self, predicate, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
            await asyncio.sleep(0.01)

    def calls(self, since: int = 0) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.fake.requests[since:] if not r.path.startswith("/events")]


class _Missing:
    state = None


@pytest.fixture
async def h(redis_url):
    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005, playback_duration=0.02).start()
    store = CallStore(redis_url)
    harness = Harness(fake, store)
    await harness.start_plane()
    yield harness
    await harness.stop_plane()
    await store.aclose()
    assert not fake.rejected, [(r.method, r.path, r.reason) for r in fake.rejected]
    await fake.stop()


def path_kinds(requests: list[tuple[str, str]]) -> list[str]:
    """('POST', '/channels/cf-x-agent-2/answer') → 'POST channels/answer' (ids elided)."""
    out = []
    for method, path in requests:
        parts = [p for p in path.strip("/").split("/") if not (p.startswith("cf-") or re.fullmatch(r"[0-9.]+", p))]
        out.append(f"{method} {'/'.join(parts)}")
    return out


async def test_agent_leg_is_bridged_with_the_caller(h):
    channel = await h.call_up()
    media = h.plane.calls["call-1@edge"]
    kinds = path_kinds(h.calls())
    assert sorted(kinds[:2]) == ["GET bridges", "GET channels"]  # resync on connect
    assert sorted(kinds[2:4]) == ["POST bridges", "POST channels/externalMedia"]  # together
    # bridge first, then answer: the agent is in the bridge before the caller's first packet
    assert kinds[4:] == ["POST bridges/addChannel", "POST channels/answer"]
    add = next(r for r in h.fake.requests if r.path.endswith("/addChannel"))
    assert add.query["channel"] == f"{channel},{media.agent.channel}"
    external = next(r for r in h.fake.requests if r.path.endswith("/externalMedia"))
    assert external.query["external_host"] == "127.0.0.1:4000" and external.query["format"] == "ulaw"
    assert external.query["encapsulation"] == "rtp" and external.query["transport"] == "udp"
    bridge = h.fake.bridges[media.bridge]
    assert set(bridge["channels"]) == {channel, media.agent.channel}
    assert media.agent.local_rtp  # where the agent must send its audio back
    stored = await h.store.load_media("call-1@edge")
    assert stored["state"] == "active" and stored["agent"]["name"] == "intake" and stored["agent"]["state"] == "up"
    events = [e["event"] for e in await h.store.timeline("call-1@edge")]
    assert events == ["decided", "media_start", "media_up"]


async def test_two_forks_then_stop_one_the_call_undisturbed(h):
    forks = [{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "slin16", "direction": "in"},
             {"target": "recorder", "endpoint": "127.0.0.1:9200", "transport": "rtp", "codec": "ulaw",
              "direction": "both"}]
    caller = await h.call_up(forks=forks)
    media = h.plane.calls["call-1@edge"]
    await h.until(lambda: [f.state for f in media.forks.values()] == ["up", "up"])
    snoops = [r for r in h.fake.requests if "/snoop/" in r.path]
    assert sorted(r.query["spy"] for r in snoops) == ["both", "in"]
    for fork in media.forks.values():
        assert set(h.fake.bridges[fork.bridge]["channels"]) == {fork.snoop, fork.channel}
    assert set(h.fake.bridges[media.bridge]["channels"]) == {caller, media.agent.channel}  # untouched
    assert h.metrics.registry.get_sample_value("callfabric_forks_active") == 2
    assert h.metrics.registry.get_sample_value("callfabric_fork_start_duration_seconds_count") == 2

    first = next(iter(media.forks))
    mark = len(h.fake.requests)
    await h.plane.forks.stop("call-1@edge", first)
    assert sorted(path_kinds(h.calls(mark))) == ["DELETE bridges", "DELETE channels", "DELETE channels"]
    assert media.forks[first].state == "gone" and h.metrics.registry.get_sample_value("callfabric_forks_active") == 1
    assert media.forks[first].bridge not in h.fake.bridges
    assert caller in h.fake.channels and media.agent.channel in h.fake.channels
    with pytest.raises(MediaError, match="already gone"):
        await h.plane.forks.stop("call-1@edge", first)


async def test_a_fork_that_fails_does_not_take_the_call_down(h):
    await h.call_up()
    with pytest.raises(MediaError, match="fork to broken failed"):
        await h.plane.forks.start("call-1@edge", Endpoint("broken", "not a host", "rtp", "slin16"), "in")
    media = h.plane.calls["call-1@edge"]
    (fork,) = media.forks.values()
    assert fork.state == "failed" and media.state == "active" and fork.snoop not in h.fake.channels
    assert h.metrics.registry.get_sample_value("callfabric_forks_failed_total", {"reason": "start"}) == 1
    assert any(e["event"] == "fork_failed" for e in await h.store.timeline("call-1@edge"))
    h.fake.rejected.clear()  # the bad external_host was refused by the (fake) Asterisk, as intended


async def test_ai_to_ai_transfer_keeps_the_caller_in_the_bridge(h):
    forks = [{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "slin16", "direction": "in"}]
    caller = await h.call_up(forks=forks)
    media = h.plane.calls["call-1@edge"]
    await h.until(lambda: [f.state for f in media.forks.values()] == ["up"])
    old_agent = media.agent.channel
    mark = len(h.fake.requests)
    result = await h.plane.call.transfer("call-1@edge", "billing")
    assert path_kinds(h.calls(mark)) == ["POST channels/externalMedia", "POST bridges/addChannel",
                                          "POST bridges/removeChannel", "DELETE channels"]
    removed = next(r for r in h.fake.requests[mark:] if r.path.endswith("/removeChannel"))
    assert removed.query["channel"] == old_agent  # only the old agent leaves; the caller never does
    external = next(r for r in h.fake.requests[mark:] if r.path.endswith("/externalMedia"))
    assert external.query["encapsulation"] == "audiosocket" and external.query["transport"] == "tcp"
    assert external.query["data"] == media.agent.session  # the AudioSocket session UUID
    assert set(h.fake.bridges[media.bridge]["channels"]) == {caller, result["channel"]}
    assert all(f.state == "up" for f in media.forks.values())
    await h.until(lambda: not media.old_agents)
    assert h.metrics.registry.get_sample_value("callfabric_transfers_total", {"kind": "agent", "result": "completed"}) == 1
    events = [e["event"] for e in await h.store.timeline("call-1@edge")]
    assert "transfer_started" in events and "transfer_completed" in events
    with pytest.raises(MediaError, match="unknown agent"):
        await h.plane.call.transfer("call-1@edge", "nobody")


@pytest.mark.parametrize("mode", ["conference", "handoff", "listen"])
async def test_a_human_is_brought_in_with_context_headers(h, mode):
    caller = await h.call_up()
    media = h.plane.calls["call-1@edge"]
    agent_channel = media.agent.channel
    leg = await h.plane.humans.add("call-1@edge", "vip-desk", "sip:desk@pbx.example.com", mode=mode,
                                  context={"summary": "Billing dispute, wants a refund", "intent": "refund",
                                           "sentiment": "negative", "X-Transcript": "x" * 400})
    originate = next(r for r in h.fake.requests if r.method == "POST" and r.path.endswith(media.humans[leg["leg_id"]].channel))
    assert originate.query["endpoint"] == "PJSIP/edge/sip:desk@pbx.example.com" and originate.query["app"] == APP
    variables = originate.body["variables"]
    assert variables["PJSIP_HEADER(add,X-Summary)"] == "Billing dispute, wants a refund"
    assert variables["PJSIP_HEADER(add,X-Intent)"] == "refund" and variables["PJSIP_HEADER(add,X-Sentiment)"] == "negative"
    assert variables["PJSIP_HEADER(add,X-Callfabric-Call-Id)"] == "call-1@edge"
    assert variables["PJSIP_HEADER(add,X-Transcript-Ref)"] == "http://controller.test/v1/calls/call-1@edge/context/transcript"
    assert (await h.store.get("call-1@edge"))["context_transcript"] == "x" * 400
    human = media.humans[leg["leg_id"]].channel
    await h.fake.answer_outbound(human)
    await h.until(lambda: media.humans[leg["leg_id"]].state == "up")
    members = set(h.fake.bridges[media.bridge]["channels"])
    if mode == "conference":
        assert members == {caller, agent_channel, human}
    elif mode == "listen":  # the caller and the agent stay a two-party bridge; the human hears a snoop
        listener = media.humans[leg["leg_id"]]
        assert members == {caller, agent_channel} and h.fake.bridges[media.bridge]["technology"] == "simple_bridge"
        assert set(h.fake.bridges[listener.bridge]["channels"]) == {listener.snoop, human}
        snoop = next(r for r in h.fake.requests if r.path.endswith(f"/snoop/{listener.snoop}"))
        assert snoop.path.startswith(f"/channels/{caller}/") and snoop.query["spy"] == "both"
        await h.fake.caller_hangup(human)  # the human leaves: their snoop and bridge go too
        await h.until(lambda: listener.snoop not in h.fake.channels and listener.bridge not in h.fake.bridges)
        assert media.state == "active" and listener.state == "gone"
    else:
        await h.until(lambda: agent_channel not in h.fake.channels)
        assert set(h.fake.bridges[media.bridge]["channels"]) == {caller, human} and media.agent is None


async def test_a_human_who_does_not_answer_is_recorded_and_the_call_goes_on(h):
    await h.call_up()
    media = h.plane.calls["call-1@edge"]
    leg = await h.plane.humans.add("call-1@edge", "desk", "sip:desk@pbx.example.com")
    await h.fake.fail_outbound(media.humans[leg["leg_id"]].channel, cause=17)
    await h.until(lambda: media.humans[leg["leg_id"]].state == "failed")
    assert media.state == "active" and media.agent.state == "up"


@pytest.mark.parametrize("who", ["caller", "api"])
async def test_hang_up_cleans_up_everything_the_call_created(h, who):
    forks = [{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "slin16", "direction": "in"}]
    caller = await h.call_up(forks=forks)
    media = h.plane.calls["call-1@edge"]
    await h.until(lambda: [f.state for f in media.forks.values()] == ["up"])
    if who == "caller":
        await h.fake.caller_hangup(caller)
    else:
        await h.plane.call.hangup("call-1@edge")
    await h.until(lambda: "call-1@edge" not in h.plane.calls)
    await h.fake.settle()
    assert not [c for c in h.fake.channels if c.startswith("cf-")] and caller not in h.fake.channels
    assert not h.fake.bridges
    assert (await h.store.load_media("call-1@edge"))["state"] == "ended"
    assert await h.store.media_calls("media1") == []
    assert h.metrics.registry.get_sample_value("callfabric_forks_active") == 0
    with pytest.raises(MediaError, match="no live call"):
        await h.plane.playback.play("call-1@edge", "sound:hello-world")


async def test_play_into_the_call(h):
    await h.call_up()
    result = await h.plane.playback.play("call-1@edge", "sound:hello-world")
    await h.fake.wait_for_event("PlaybackFinished")
    request = next(r for r in h.fake.requests if "/play/" in r.path)
    assert request.path.endswith(result["playback_id"]) and request.query["media"] == "sound:hello-world"


async def test_websocket_drop_mid_call_resyncs(h):
    caller = await h.call_up(forks=[{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp",
                                     "codec": "slin16", "direction": "in"}])
    media = h.plane.calls["call-1@edge"]
    await h.until(lambda: [f.state for f in media.forks.values()] == ["up"])
    fork = next(iter(media.forks.values()))
    await h.fake.drop_websockets()
    # while we are away: the fork's target channel dies, and a stray channel of ours appears
    await h.fake.caller_hangup(fork.channel)
    stray = await h.fake.inbound_call("other-app", [], channel_id="cf-0123456789abcdef-agent-9", if_app_missing="fail")
    mark = len(h.fake.requests)
    await h.fake.wait_for_app(APP)
    await h.until(lambda: fork.state == "failed")
    assert media.state == "active" and caller in h.fake.channels
    assert ("GET", "/channels") in h.calls(mark) and ("GET", "/bridges") in h.calls(mark)
    assert stray not in h.fake.channels
    events = [e["event"] for e in await h.store.timeline("call-1@edge")]
    assert "resync" in events


async def test_controller_restart_mid_call_resumes_from_redis(h):
    caller = await h.call_up(forks=[{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp",
                                     "codec": "slin16", "direction": "in"}])
    await h.until(lambda: [f.state for f in h.plane.calls["call-1@edge"].forks.values()] == ["up"])
    before = h.plane.calls["call-1@edge"]
    await h.stop_plane()
    await h.start_plane()  # a new controller process: nothing in memory
    media = h.plane.calls["call-1@edge"]
    assert media is not before and media.agent.channel == before.agent.channel and media.state == "active"
    result = await h.plane.call.transfer("call-1@edge", "billing")  # it can act on the call right away
    assert result["agent"] == "billing"
    await h.fake.caller_hangup(caller)
    await h.until(lambda: "call-1@edge" not in h.plane.calls)
    await h.fake.settle()
    assert not [c for c in h.fake.channels if c.startswith("cf-")] and not h.fake.bridges


async def test_one_way_audio_is_flagged_from_the_callers_statistics(h):
    """Asterisk has RTP statistics for the caller's channel only (ExternalMedia: 404): an agent
    that goes silent shows as packets no longer sent to the caller while the caller sends."""
    await h.call_up()
    media = h.plane.calls["call-1@edge"]
    now = [0.0]
    health = MediaHealth(h.plane, interval_s=1, one_way_after_s=5, clock=lambda: now[0])

    async def look(at: float, tx: int, rx: int) -> None:
        now[0] = at
        h.fake.set_rtp(media.caller_channel, txcount=tx, rxcount=rx)
        await health.check_all()

    def flagged(leg: str) -> float | None:
        return h.metrics.registry.get_sample_value("callfabric_one_way_audio_total", {"leg": leg})
    await look(0, 0, 0)
    await look(2, 100, 100)            # both ways: fine
    await look(4, 101, 200)            # the agent falls silent (1 keepalive packet in 2 s)
    await look(6, 102, 300)
    assert flagged("agent") is None    # 4 s of one-way audio: not yet
    await look(8, 103, 400)
    assert flagged("agent") == 1
    await look(10, 104, 500)
    assert flagged("agent") == 1       # once per silent stretch
    await look(12, 204, 600)           # the agent speaks again
    await look(14, 204, 600)           # nothing either way (hold): not one-way
    await look(30, 1004, 600)          # the caller went quiet while the agent speaks
    assert flagged("caller") == 1 and flagged("agent") == 1
    assert h.metrics.registry.get_sample_value("callfabric_media_rtp_packets_total",
                                               {"leg": "caller", "direction": "sent"}) == 1004
    assert h.metrics.registry.get_sample_value("callfabric_media_rtp_packets_total",
                                               {"leg": "caller", "direction": "received"}) == 600
    await asyncio.sleep(0.05)
    events = [e for e in await h.store.timeline("call-1@edge") if e["event"] in ("one_way_audio", "audio_restored")]
    assert [(e["event"], e["leg"]) for e in events] == [("one_way_audio", "agent"), ("audio_restored", "agent"),
                                                        ("one_way_audio", "caller")]
    assert events[0]["silent_s"] >= 5 and events[0]["tx"] == 103
    asked = {r.path for r in h.fake.requests if r.path.endswith("/rtp_statistics")}
    assert asked == {f"/channels/{media.caller_channel}/rtp_statistics"}, "only the caller's channel has statistics"


async def test_unreadable_statistics_are_skipped(h):
    await h.call_up()
    media = h.plane.calls["call-1@edge"]
    health = MediaHealth(h.plane, interval_s=1, one_way_after_s=0)
    h.fake.set_rtp(media.caller_channel, txcount=10, rxcount=10)
    await health.check_all()
    await h.fake.caller_hangup(media.caller_channel)  # statistics of a channel that is gone: 404, skipped
    await health.check_all()
    assert h.metrics.registry.get_sample_value("callfabric_one_way_audio_total", {"leg": "agent"}) is None


async def test_garbage_from_ari_does_not_stop_the_plane(h):
    h.fake.send_raw(APP, "not json at all")
    h.fake.send_raw(APP, '{"no": "type"}')
    h.fake.send_raw(APP, '{"type": "StasisStart", "channel": "not a dict", "args": 5}')
    await h.call_up()  # still serving
    assert h.task is not None and not h.task.done()


async def test_a_call_without_an_agent_is_refused_cleanly(h):
    channel = await h.fake.inbound_call(APP, ["unknown-call@edge", ""], sip_call_id="unknown-call@edge")
    await h.fake.wait_for_event("StasisEnd", channel_id=channel)
    assert "unknown-call@edge" not in h.plane.calls
    assert any(e["event"] == "media_refused" for e in await h.store.timeline("unknown-call@edge"))
