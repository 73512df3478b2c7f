"""kill -9 of the controller that owns a real Asterisk's events, mid-call, with real media: the
caller's audio keeps reaching the fork sink and the agent across the takeover, and the
controller that took over acts on the call (an AI→AI transfer the caller keeps hearing).

Runs when an `asterisk` binary is available (PATH or CALLFABRIC_ASTERISK); skipped with that
reason otherwise."""
from __future__ import annotations

import asyncio
import shutil
import socket
import time

import pytest

from controller.localstack.asterisk import Asterisk
from controller.localstack.kamailio import Kamailio, free_port
from controller.localstack.sip_ua import SipCaller
from controller.state.calls import CallStore
from tests.media.test_real_asterisk import POLICY, REQUIRES_ASTERISK, media_agent
from tests.support.ha import ControllerProcess

pytestmark = [
    REQUIRES_ASTERISK,
    pytest.mark.skipif(any(shutil.which(b) is None for b in ("kamailio", "redis-server")),
                       reason="kamailio and redis-server are required"),
]


@pytest.fixture
def stack(tmp_path):
    kamailio = Kamailio(tmp_path, {})
    asterisk = Asterisk(tmp_path, edge_port=kamailio.sip_port)
    kamailio.write_dispatcher_list({1: [f"127.0.0.1:{asterisk.sip_port}"]})
    started = []
    try:
        for thing in (kamailio, asterisk):
            thing.start()
            started.append(thing)
        yield kamailio, asterisk
    finally:
        for thing in reversed(started):
            thing.stop()


async def test_kill_minus_nine_of_the_owner_keeps_real_media_flowing(stack, tmp_path, redis_url, capsys):
    kamailio, asterisk = stack
    loop = asyncio.get_running_loop()
    agents = {name: media_agent.RtpAgent(echo=True) for name in ("intake", "billing")}
    sink = media_agent.RtpAgent(echo=False)
    ports, transports = {}, []
    for name, protocol in [*agents.items(), ("stt", sink)]:
        ports[name] = free_port(socket.SOCK_DGRAM)
        transport, _ = await loop.create_datagram_endpoint(lambda p=protocol: p, local_addr=("127.0.0.1", ports[name]))
        transports.append(transport)
    policy_dir = tmp_path / "policy"
    await asyncio.to_thread(policy_dir.mkdir)
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, POLICY.format(**ports))
    controllers = [ControllerProcess(tmp_path, name, {
        "policy_dir": str(policy_dir), "redis_url": redis_url, "edge_evapi": [f"127.0.0.1:{kamailio.evapi_port}"],
        "ari_nodes": [asterisk.ari_node()], "media_health_interval_s": 60.0}) for name in ("ctl-a", "ctl-b")]
    try:
        for controller in controllers:
            await asyncio.to_thread(controller.start)
            await asyncio.to_thread(controller.wait_ready)

        async def roles() -> dict[str, str]:
            statuses = [await asyncio.to_thread(c.status) for c in controllers]
            return {c.name: s["nodes"]["media1"] for c, s in zip(controllers, statuses) if s}
        deadline = time.monotonic() + 10
        while "owner" not in (await roles()).values():
            assert time.monotonic() < deadline, "no controller took media1"
            await asyncio.sleep(0.1)
        moments: dict[str, float] = {}

        async def chaos(call) -> None:
            deadline = time.monotonic() + 10
            while sink.received < 50:
                assert time.monotonic() < deadline, "the fork never delivered audio"
                await asyncio.sleep(0.05)
            current = await roles()
            owner = next(c for c in controllers if current[c.name] == "owner")
            survivor = next(c for c in controllers if c is not owner)
            moments["before"] = sink.received
            killed = await asyncio.to_thread(owner.kill9)
            while (await asyncio.to_thread(survivor.status) or {}).get("nodes", {}).get("media1") != "owner":
                assert time.monotonic() - killed < 10, "the survivor never took media1 over"
                await asyncio.sleep(0.02)
            moments["takeover_s"] = time.monotonic() - killed
            moments["killed_to_takeover"] = sink.received - moments["before"]
            await asyncio.sleep(1.0)
            moments["after"] = sink.received
            moments["window_s"] = time.monotonic() - killed
            heard = call.rtp_received
            status, body = await asyncio.to_thread(survivor.request, "POST", f"/calls/{call.call_id}/actions",
                                                   {"action": {"route_agent": "billing"}}, 15)
            assert status == 200, body
            await asyncio.sleep(1.5)
            moments["billing"] = agents["billing"].received
            moments["caller_heard_after_transfer"] = call.rtp_received - heard

        result = await SipCaller(kamailio.sip_port).call("18005550100", hold_s=9.0, while_up=chaos)
        assert result.status == 200, result
        rate = (moments["after"] - moments["before"]) / moments["window_s"]
        with capsys.disabled():
            print(f"\n[ha] real Asterisk, kill -9 of the owner: media1 taken over in {moments['takeover_s']:.3f}s; "
                  f"fork sink got {moments['after'] - moments['before']:.0f} packets in the "
                  f"{moments['window_s']:.2f}s after the kill ({rate:.0f}/s)")
        assert rate >= 40, "the fork's audio must keep arriving (50 packets/s) through the takeover"
        assert moments["billing"] >= 40, "the new owner's transfer must reach the new agent"
        assert moments["caller_heard_after_transfer"] >= 40, "the caller keeps hearing an agent"
        store = CallStore(redis_url)
        try:
            # The record is `ended` by the edge's dialog event; the media side writes `media_end`
            # a little later (its StasisEnd / cleanup): wait for what is asserted, not for `ended`.
            deadline = time.monotonic() + 10
            while True:
                record = await store.get(result.call_id) or {}
                events = [e["event"] for e in await store.timeline(result.call_id)]
                if record.get("state") == "ended" and "media_end" in events:
                    break
                assert time.monotonic() < deadline, (record, events)
                await asyncio.sleep(0.1)
        finally:
            await store.aclose()
        for event in ("decided", "answered", "media_up", "fork_started", "resync", "transfer_completed", "ended",
                      "media_end"):
            assert event in events, (event, events)
    finally:
        for controller in controllers:
            await asyncio.to_thread(controller.stop)
        for transport in transports:
            transport.close()
