"""Forks made at the edge: the call's media is anchored by the edge's rtpengine, and a fork is a
copy of one party's RTP that rtpengine sends to the fork target itself (NG subscribe), with no
Asterisk channel. Runs with callfabric's stand-in media node (ARI emulator + an echoing SIP side),
real Kamailio, real rtpengine, real Redis: the fork target gets the caller's own packets (in) or
what the caller hears (out), a fork stopped stops, and a fork the edge cannot make (both
directions) is made with a snoop as before."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from aiohttp import web

from controller.app import MEDIA, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.rtpengine import Rtpengine
from controller.localstack.sip_ua import TONE, SipCaller
from controller.localstack.standin import StandInMediaNode
from controller.state.calls import CallStore
from tests.support import fake_ari  # noqa: F401 - the stand-in's ARI emulator reads its files when imported

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("kamailio", "rtpengine", "redis-server")),
    reason="kamailio, rtpengine (Debian: rtpengine-daemon) and redis-server are required")

POLICY = """\
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:{agent}", transport: rtp, codec: ulaw}}
fork_targets:
  stt: {{endpoint: "127.0.0.1:{stt}", transport: rtp, codec: ulaw, direction: in}}
  hears: {{endpoint: "127.0.0.1:{hears}", transport: rtp, codec: ulaw, direction: out}}
  mixed: {{endpoint: "127.0.0.1:{mixed}", transport: rtp, codec: ulaw, direction: both}}
rules:
  - name: forked
    match: {{ruri: "+18005550100"}}
    actions: [route_agent: intake, fork: stt, fork: hears, fork: mixed]
default:
  actions: [route_agent: intake]
"""


class Sink(asyncio.DatagramProtocol):
    def __init__(self):
        self.packets: list[bytes] = []
        self.times: list[float] = []

    def datagram_received(self, data, addr):
        if len(data) > 12 and data[0] >> 6 == 2:
            self.packets.append(data)
            self.times.append(time.monotonic())


@pytest.fixture
async def edge_fork_stack(tmp_path, procs, redis_url):
    loop = asyncio.get_running_loop()
    sinks = {name: Sink() for name in ("agent", "stt", "hears", "mixed")}
    transports, ports = [], {}
    for name, sink in sinks.items():
        transport, _ = await loop.create_datagram_endpoint(lambda s=sink: s, local_addr=("127.0.0.1", 0))
        transports.append(transport)
        ports[name] = transport.get_extra_info("sockname")[1]
    node = await StandInMediaNode().start()
    rtp = await asyncio.to_thread(lambda: procs.add(Rtpengine(tmp_path).start()))

    def start():
        kamailio = procs.kamailio({1: [node.sip_addr]}, extra_defines={"RTPENGINE_SOCK": rtp.sock})
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "p.yaml").write_text(POLICY.format(**ports))
        return kamailio, policy_dir
    kamailio, policy_dir = await asyncio.to_thread(start)
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_url, instance_id="edge-forks",
                        edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                        ari_nodes=[node.ari_node()], rtpengine_ng=[f"127.0.0.1:{rtp.ng_port}"], fork_mode="edge")
    app = await asyncio.to_thread(build_app, settings)
    runner = web.AppRunner(app)
    await runner.setup()
    store = CallStore(redis_url)
    try:
        deadline = time.monotonic() + 20
        while not app[MEDIA].metrics.registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
            assert time.monotonic() < deadline, "the controller did not connect to the stand-in's ARI"
            await asyncio.sleep(0.05)
        yield {"kamailio": kamailio, "app": app, "sinks": sinks, "store": store, "rtp": rtp}
    finally:
        await store.aclose()
        await runner.cleanup()
        await node.stop()
        for transport in transports:
            transport.close()


async def test_edge_forks_copy_the_callers_packets_and_what_the_caller_hears(edge_fork_stack):
    stack = edge_fork_stack
    plane, sinks = stack["app"][MEDIA], stack["sinks"]
    forks = {}

    async def while_up(result):
        deadline = time.monotonic() + 10
        while len(forks) < 3 and time.monotonic() < deadline:
            media = plane.calls.get(result.call_id)
            if media:
                forks.update({f.target: f for f in media.forks.values() if f.state == "up"})
            await asyncio.sleep(0.05)

    # a From tag of digits only, as many phones send (read back as a number, it matched no party)
    result = await SipCaller(stack["kamailio"].sip_port).call("+18005550100", 2.0, while_up=while_up,
                                                              from_tag="80012345")
    assert result.status == 200 and result.rtp_received > 50, result
    assert {t: f.mode for t, f in forks.items()} == {"stt": "edge", "hears": "edge", "mixed": "snoop"}
    assert not forks["stt"].snoop and not forks["stt"].channel  # no Asterisk channel for an edge fork
    # in: the caller's own packets, byte for byte (the tone it sends); out: what it hears (the echo)
    assert len(sinks["stt"].packets) >= 50 and all(p[12:] == TONE for p in sinks["stt"].packets)
    assert len(sinks["hears"].packets) >= 50 and all(p[12:] == TONE for p in sinks["hears"].packets[5:])
    # both directions mixed: an Asterisk snoop (here the stand-in's, which moves no audio)
    assert not sinks["mixed"].packets
    events = [e["event"] for e in await stack["store"].timeline(result.call_id)]
    assert "fork_at_edge_unavailable" in events and events.count("fork_started") == 3


async def test_a_stopped_edge_fork_stops_and_a_call_not_anchored_falls_back_to_snoop(edge_fork_stack):
    stack = edge_fork_stack
    plane, sinks = stack["app"][MEDIA], stack["sinks"]
    stopped_at = {}

    async def while_up(result):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            media = plane.calls.get(result.call_id)
            up = [f for f in media.forks.values() if f.state == "up" and f.target == "stt"] if media else []
            if up and len(sinks["stt"].packets) >= 10:
                await plane.forks.stop(result.call_id, up[0].fork_id)
                stopped_at["t"] = time.monotonic()
                return
            await asyncio.sleep(0.05)

    result = await SipCaller(stack["kamailio"].sip_port).call("+18005550100", 1.5, while_up=while_up)
    assert result.status == 200 and "t" in stopped_at
    await asyncio.sleep(0.2)
    late = [t for t in sinks["stt"].times if t > stopped_at["t"] + 0.1]
    assert not late, f"{len(late)} packets after the fork stopped"
