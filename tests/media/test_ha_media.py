"""Media nodes under failure, in process (fake ARI validated against the spec, real Redis): one
controller at a time owns a node's events through a Redis lease; when it dies another takes
the node over and the calls keep their media; a controller that lost its node cannot
overwrite the new owner's records; a websocket cut mid-action is resynced without doing
anything twice; a caller whose StasisStart nobody handled is taken in by the next resync."""
from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from controller.api.commands import CallControl, Forwarding
from controller.localstack.redis import RedisServer
from controller.media.ari import AriClient, AriNode, basic_authorization
from controller.media.feature import LEG_UP_TIMEOUT_S
from controller.media.ownership import NodeOwnership
from controller.media.plane import MediaError, MediaPlane
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from controller.state.calls import CallStore, FencedOut, now_ms
from controller.state.inbox import NodeInbox
from controller.state.leases import NodeLeases, lease_key
from tests.api.test_api import POLICY
from tests.media.test_media_plane import AGENTS, APP, TARGETS, path_kinds
from tests.support.fake_ari import FakeAri
from tests.support.metrics import sample

FORK = [{"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "slin16", "direction": "in"}]
TTL_S = 0.6
SERVING_POLICY = policy_from_texts({"p.yaml": POLICY})  # names for API commands (agents, fork targets)


class Controller:
    """The media side of one controller: its plane and its ownership of node media1."""

    def __init__(self, name: str, fake: FakeAri, redis_url: str, *, leases: bool = True):
        self.name = name
        self.store = CallStore(redis_url)
        self.metrics = Metrics()
        client = AriClient(AriNode("media1", fake.url, "callfabric", "secret"), APP)
        self.plane = MediaPlane({"media1": client}, self.store, self.metrics, resolve_agent=AGENTS.get,
                                resolve_fork_target=TARGETS.get, edge_endpoint="edge", instance_id=name)
        self.leases = NodeLeases(self.store.batch, name, TTL_S) if leases else None
        inbox = NodeInbox(self.store.batch, self.store.redis)
        self.control = CallControl(self.plane, self.store, lambda: SERVING_POLICY,
                                   forwarding=Forwarding(self.leases, inbox, self.metrics, 5.0) if leases else None)
        self.ownership = NodeOwnership("media1", self.plane, self.leases, self.metrics, poll_s=0.05, inbox=inbox,
                                       handle_command=self.control.run_forwarded) if leases else None
        self.task: asyncio.Task | None = None

    async def start(self) -> "Controller":
        if self.ownership is not None:
            self.task = asyncio.create_task(self.ownership.run())
        else:
            await self.plane.recover()
            self.task = asyncio.create_task(self.plane.serve_node("media1"))
        return self

    @property
    def owns(self) -> bool:
        return self.metrics.registry.get_sample_value("callfabric_node_owned", {"node": "media1"}) == 1

    async def crash(self) -> None:
        """Gone like a killed process: no hand-over, the lease left to expire."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.plane.nodes["media1"].close()

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            await self.crash()
        await self.plane.nodes["media1"].close()
        await self.store.aclose()


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture
async def fake():
    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005).start()
    yield fake
    assert not fake.rejected, [(r.method, r.path, r.reason) for r in fake.rejected]
    await fake.stop()


@pytest.fixture
async def controllers(fake, redis_url):
    made: list[Controller] = []

    async def make(name: str, leases: bool = True) -> Controller:
        made.append(await Controller(name, fake, redis_url, leases=leases).start())
        return made[-1]
    yield make
    for c in made:
        await c.close()


async def call_up(fake: FakeAri, store: CallStore, plane_of, call_id: str, forks=FORK) -> str:
    decision = {"outcome": "agent", "rule": "r", "agent": {"name": "intake"}, "forks": forks}
    await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "r", "decision": decision},
                       live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    channel = await fake.inbound_call(APP, [call_id, "intake"], sip_call_id=call_id)

    def up() -> bool:
        media = plane_of().calls.get(call_id)
        return bool(media and media.state == "active" and all(f.state == "up" for f in media.forks.values())
                    and len(media.forks) == len(forks))
    await until(up, what=f"{call_id} active")
    return channel


def counts(fake: FakeAri, since: int = 0) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in path_kinds([(r.method, r.path) for r in fake.requests[since:] if not r.path.startswith("/events")]):
        out[kind] = out.get(kind, 0) + 1
    return out


async def test_a_dead_owners_node_is_taken_over_and_its_calls_keep_their_media(fake, controllers):
    a = await controllers("ctl-a")
    await until(lambda: a.owns and fake.app_connected(APP), what="a owns media1")
    b = await controllers("ctl-b")
    callers = {f"ha-{i}@edge": await call_up(fake, a.store, lambda: a.plane, f"ha-{i}@edge") for i in range(5)}
    await a.plane.call.transfer("ha-0@edge", "billing")
    assert not b.owns and not b.plane.calls
    before = {c: (m.agent.channel, {f.snoop for f in m.forks.values()}) for c, m in a.plane.calls.items()}
    mark = len(fake.requests)

    await a.crash()
    took = await until(lambda: b.owns and b.plane.calls and fake.app_connected(APP), timeout=TTL_S + 2,
                       what="b owns media1")
    await b.plane.wait_synced("media1")
    assert took < TTL_S + 1.0
    for call_id, channel in callers.items():  # every call kept its caller, agent and forks, untouched
        media = b.plane.calls[call_id]
        assert media.state == "active" and channel in fake.channels
        assert set(fake.bridges[media.bridge]["channels"]) == {channel, before[call_id][0]}
        assert {f.snoop for f in media.forks.values() if f.state == "up"} == before[call_id][1]
    assert b.plane.calls["ha-0@edge"].agent.name == "billing"  # the transfer done before survives
    assert counts(fake, mark) == {"GET channels": 1, "GET bridges": 1}  # looked, changed nothing
    assert b.metrics.registry.get_sample_value("callfabric_node_takeover_duration_seconds_count") == 1
    assert b.metrics.registry.get_sample_value("callfabric_forks_active") == 5

    result = await b.plane.call.transfer("ha-1@edge", "billing")  # the new owner acts on the calls at once
    assert result["agent"] == "billing"
    for channel in callers.values():
        await fake.caller_hangup(channel)
    await until(lambda: not b.plane.calls, what="calls ended")
    await fake.settle()
    assert not fake.channels and not fake.bridges  # the new owner cleaned up everything
    events = [e["event"] for e in await b.store.timeline("ha-1@edge")]
    assert events.count("media_start") == 1 and events.count("media_end") == 1 and "resync" in events


async def test_a_controller_that_lost_its_node_is_fenced_out(fake, controllers, redis_url):
    a = await controllers("ctl-a")
    await until(lambda: a.owns and fake.app_connected(APP), what="a owns media1")
    await call_up(fake, a.store, lambda: a.plane, "fenced@edge", forks=[])
    stale = a.plane.calls["fenced@edge"]
    old_fence = a.plane.fences["media1"]
    async def partitioned(lease):
        raise RedisConnectionError("partitioned from Redis")
    a.leases.renew = partitioned  # a cannot reach Redis any more; its lease expires there
    await a.store.redis.delete(lease_key("media1"))
    b = await controllers("ctl-b")
    await until(lambda: b.owns and "fenced@edge" in b.plane.calls, what="b took media1")
    await b.plane.wait_synced("media1")
    # ARI gives the application's events to one websocket: a hears ApplicationReplaced and stops
    await until(lambda: not a.owns, what="a stepped down")
    assert a.metrics.registry.get_sample_value("callfabric_node_lease_events_total",
                                               {"node": "media1", "event": "replaced"}) == 1
    with pytest.raises(FencedOut):  # and its late writes are refused
        await a.store.save_media("fenced@edge", stale.to_dict(), {"event": "late", "ts": 1}, fence=old_fence)
    assert b.plane.fences["media1"] > old_fence
    assert "late" not in [e["event"] for e in await b.store.timeline("fenced@edge")]


async def test_a_drained_owner_hands_its_node_over_at_once(fake, controllers):
    a = await controllers("ctl-a")
    await until(lambda: a.owns and fake.app_connected(APP), what="a owns media1")
    b = await controllers("ctl-b")
    channel = await call_up(fake, a.store, lambda: a.plane, "drain@edge")
    await a.ownership.hand_over(wait_s=2.0)
    await until(lambda: b.owns and "drain@edge" in b.plane.calls, timeout=10, what="b took media1")
    await b.plane.wait_synced("media1")
    # released, not left to expire: a counted its release (how fast is bench/ha.py's to measure)
    assert sample(a.metrics.registry, "callfabric_node_lease_events_total", node="media1", event="released") == 1
    assert a.ownership.state == "released" and not a.plane.calls
    assert b.plane.calls["drain@edge"].state == "active" and channel in fake.channels


async def test_an_ari_websocket_cut_mid_transfer_is_resynced_without_doing_anything_twice(fake, controllers):
    c = await controllers("solo", leases=False)
    await fake.wait_for_app(APP)
    channel = await call_up(fake, c.store, lambda: c.plane, "cut@edge")
    media = c.plane.calls["cut@edge"]
    old_agent = media.agent.channel
    mark = len(fake.requests)
    # The websocket drops; the controller reconnects ~0.1 s later. Meanwhile the transfer's new
    # leg is created and, its application having no websocket, hung up by Asterisk: the events
    # saying so are lost. The resync must settle the transfer (failed, the old agent kept) at
    # once — not after a timeout, not by trying again.
    await fake.drop_websockets(abrupt=True)
    started = time.monotonic()
    with pytest.raises(MediaError, match="gone while the events websocket was down"):  # the resync's verdict
        await c.plane.call.transfer("cut@edge", "billing")
    assert time.monotonic() - started < LEG_UP_TIMEOUT_S  # not the leg's timeout
    assert media.state == "active" and media.agent.channel == old_agent
    assert set(fake.bridges[media.bridge]["channels"]) == {channel, old_agent}
    done = counts(fake, mark)
    assert done["POST channels/externalMedia"] == 1 and done.get("POST bridges/addChannel", 0) == 0
    assert done.get("POST channels/answer", 0) == 0 and done.get("POST bridges", 0) == 0
    assert done["GET channels"] == 1  # the resync after the reconnection
    events = [e["event"] for e in await c.store.timeline("cut@edge")]
    assert events.count("transfer_failed") == 1 and events.count("media_start") == 1
    assert (await c.plane.call.transfer("cut@edge", "billing"))["agent"] == "billing"  # connected again: it works


async def test_a_caller_whose_stasis_start_nobody_handled_is_taken_in_by_the_resync(fake, controllers, redis_url):
    # A controller that dies after Asterisk handed it the StasisStart, before it did anything.
    async with aiohttp.ClientSession(headers={"Authorization": basic_authorization("callfabric", "secret")}) as http:
        ws = await http.ws_connect(f"{fake.ws_url}?app={APP}")
        store = CallStore(redis_url)
        decision = {"outcome": "agent", "rule": "r", "agent": {"name": "intake"}, "forks": []}
        await store.create("orphan@edge", {"state": "routing", "decision": decision}, live_scopes={},
                           window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
        await store.aclose()
        channel = await fake.inbound_call(APP, ["orphan@edge", "intake"], sip_call_id="orphan@edge")
        await fake.wait_for_event("StasisStart", channel_id=channel)
        await ws.close()
    c = await controllers("next", leases=False)
    await until(lambda: (c.plane.calls.get("orphan@edge") and c.plane.calls["orphan@edge"].state == "active"),
                what="the orphan caller is served")
    assert counts(fake)["POST channels/answer"] == 1
    assert set(fake.bridges[c.plane.calls["orphan@edge"].bridge]["channels"]) == {
        channel, c.plane.calls["orphan@edge"].agent.channel}


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path, appendonly=True, name="own").start()
    yield server
    server.stop()


async def test_redis_down_while_owning_a_node_the_calls_go_on_and_their_records_catch_up(fake, own_redis):
    a = await Controller("ctl-a", fake, own_redis.url).start()
    try:
        await until(lambda: a.owns and fake.app_connected(APP), what="a owns media1")
        caller = await call_up(fake, a.store, lambda: a.plane, "outage@edge")
        await asyncio.to_thread(own_redis.stop)
        await fake.caller_hangup(caller)  # the call ends while Redis is down: ARI work goes on
        await until(lambda: "outage@edge" not in a.plane.calls, what="the call torn down")
        await fake.settle()
        assert not fake.channels and not fake.bridges
        await asyncio.sleep(TTL_S * 1.5)  # past the lease's TTL: nobody can take the node, a keeps it
        assert a.owns and a.store.outage.depth > 0
        assert a.metrics.registry.get_sample_value("callfabric_node_lease_events_total",
                                                   {"node": "media1", "event": "in_doubt"}) == 1
        await asyncio.to_thread(own_redis.start)
        assert await a.store.outage.wait_empty(10)
        assert (await a.store.load_media("outage@edge"))["state"] == "ended"
        events = [e["event"] for e in await a.store.timeline("outage@edge")]
        assert events[-2:] == ["caller_left", "media_end"] and await a.store.media_calls("media1") == []
        await asyncio.sleep(TTL_S)  # renewed (the expired lease taken back), not lost
        assert a.owns and sample(a.metrics.registry, "callfabric_node_lease_events_total", node="media1",
                                 event="lost") == 0
    finally:
        await a.close()



async def test_commands_taken_by_any_controller_are_carried_out_by_the_owner(fake, controllers):
    a = await controllers("ctl-a")
    await until(lambda: a.owns and fake.app_connected(APP), what="a owns media1")
    b = await controllers("ctl-b")
    await call_up(fake, a.store, lambda: a.plane, "fwd@edge", forks=[])
    mark = len(fake.requests)
    result = await b.control.execute("fwd@edge", {"play": "sound:hello-world"})
    assert result.status == 200 and result.body["action"] == "play", result.body
    assert [r.path for r in fake.requests[mark:] if "/play/" in r.path]  # a played it: b has no such call
    assert "fwd@edge" not in b.plane.calls
    refused = await b.control.execute("fwd@edge", {"stop_fork": {"fork_id": "f9"}})
    assert refused.status == 404 and "no fork" in refused.body["error"]["message"]  # the owner's answer
    originated = await b.control.originate("sip:someone@127.0.0.1:5999", "intake")
    assert originated["node"] == "media1" and originated["call_id"] in a.plane.calls
    assert b.metrics.registry.get_sample_value("callfabric_commands_forwarded_total", {"result": "answered"}) == 3
