"""The same suites on a Redis Cluster: the call store's tests (tests/state/test_calls.py), the
media node leases and the command inbox (tests/state/test_redis_ha.py), the media HA tests
(two controllers sharing a node: tests/media/test_ha_media.py) and the edge slice (real
Kamailio, SIPp, the controller: tests/integration/test_edge_slice.py) run here against 3
redis-server masters in cluster mode on loopback ports. A call's keys share a hash tag, so
each call's commands land on one master; pipelines are split per master.

Left out, each for a reason it names in SINGLE_NODE_ONLY: what is about one redis-server
process (its outage, a Sentinel failover) or counts round trips on the single-node
connection object; their cluster counterparts are the tests at the end of this file."""
from __future__ import annotations

import asyncio
import shutil

import pytest
from redis.crc import key_slot

from controller.localstack.redis_ha import LocalRedisCluster
from controller.state.calls import CallStore, call_key, now_ms, timeline_key
from controller.state.connect import RedisTarget
from tests.integration import test_edge_slice as edge_suite
from tests.integration.test_edge_slice import controller, controller_process  # noqa: F401 (fixtures)
from tests.media import test_ha_media as media_ha_suite
from tests.media.test_ha_media import controllers, fake  # noqa: F401 (fixtures)
from tests.state import test_calls as state_suite
from tests.state import test_redis_ha as state_ha_suite

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server and redis-cli are required")

SINGLE_NODE_ONLY = {
    # count pipelines on the single connection (batch.connection) or build a single-node store:
    # their cluster counterparts (per master, a cluster nobody serves) are at the end of this file
    "test_create_is_one_round_trip_and_keys_share_a_hash_tag",
    "test_concurrent_calls_share_pipelines",
    "test_redis_going_away_is_an_error_not_a_hang",
    # one redis-server stopped and restarted under the store (own_redis), or a Sentinel failover:
    "test_changes_made_while_redis_is_down_are_written_in_order_when_it_is_back",
    "test_a_create_redis_never_confirmed_is_written_again_when_it_is_back",
    "test_the_outage_queue_is_bounded_and_says_what_it_refused",
    "test_a_sentinel_failover_is_followed_to_the_new_master",
    "test_redis_down_while_owning_a_node_the_calls_go_on_and_their_records_catch_up",
}
for _suite in (state_suite, state_ha_suite, media_ha_suite, edge_suite):
    for _name in dir(_suite):
        if _name.startswith("test_") and _name not in SINGLE_NODE_ONLY and callable(getattr(_suite, _name)):
            globals()[f"{_name}_on_cluster"] = getattr(_suite, _name)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(redis_cluster) -> RedisTarget:
    """Stands in for the single Redis's URL in the suites: the cluster, emptied for this test."""
    redis_cluster.flush()
    return RedisTarget("cluster", nodes=tuple(redis_cluster.addresses))


class ClusterStack(edge_suite.Stack):
    def settings(self, **overrides):
        target: RedisTarget = self.redis_url
        return super().settings(**{"redis_url": target.url, "redis_mode": "cluster", "redis_nodes": list(target.nodes),
                                   **overrides})


@pytest.fixture
def stack(tmp_path, procs, redis_url, request):
    return ClusterStack(tmp_path, procs, redis_url, getattr(request, "param", "uas_answer.xml"))


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url, timeline_max_events=50, call_retention_s=3600, live_call_ttl_s=600)
    yield store
    await store.aclose()


async def test_a_calls_keys_live_on_one_master_and_pipelines_are_split_per_master(store, redis_cluster):
    await store.create("c@x", {"state": "routing", "rule": "r"}, live_scopes={"tenant": "acme"}, window_counters=[],
                       at_ms=now_ms(), event={"event": "decided", "ts": 1})
    assert key_slot(call_key("c@x").encode()) == key_slot(timeline_key("c@x").encode())
    ids = [f"spread-{i}" for i in range(60)]
    for call_id in ids:
        await store.create(call_id, {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 1})
    masters = {store.batch._slots[key_slot(call_key(c).encode())] for c in ids}
    assert len(masters) == 3  # the calls are spread over every master
    assert all(r and r["state"] == "routing" for r in await store.get_many(ids))  # one flush, three masters


async def test_moved_redirections_are_followed_and_fix_the_slot_map(store, redis_cluster):
    await store.create("warm@x", {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    first = store.batch._slots[0]
    store.batch._slots = [first] * len(store.batch._slots)  # a stale map: everything on one master
    ids = [f"moved-{i}" for i in range(30)]
    await asyncio.gather(*(store.create(c, {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=now_ms(),
                                        event={"event": "decided", "ts": 1}) for c in ids))
    assert all(r and r["state"] == "routing" for r in await store.get_many(ids))
    assert len(set(store.batch._slots)) == 3  # MOVED answers put the right masters back


def count_pipelines(monkeypatch) -> list[tuple[int, list[str]]]:
    """(port of the master, the pipeline's command names) for every pipeline written."""
    from controller.state.batch import RespConnection
    sent: list[tuple[int, list[str]]] = []
    execute = RespConnection.execute

    async def counting(self, commands, *args, **kwargs):
        sent.append((int(self.params["port"]), [c[0] for c in commands]))
        return await execute(self, commands, *args, **kwargs)
    monkeypatch.setattr(RespConnection, "execute", counting)
    return sent


async def test_create_is_one_round_trip_to_the_calls_master(store, redis_cluster, monkeypatch):
    from controller.state.calls import CounterRequest
    counters = [CounterRequest("window:source:60", "window", "source", "1.2.3.4", 60)]
    await store.read_counters(counters, now_ms())  # the slot map and the script: loaded before counting
    await store.create("warm", {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    sent = count_pipelines(monkeypatch)
    await store.read_counters(counters, now_ms())
    await store.create("c2", {"state": "routing"}, live_scopes={}, window_counters=counters, at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    masters = dict(zip(range(len(store.batch._slots)), store.batch._slots))
    call_master = masters[key_slot(call_key("c2").encode())][1]
    # one read, then one write round trip before the answer: the call's record on its own
    # master, the indexes on theirs, at once (one pipeline per master); the window counters
    # follow once Redis says this controller created the call
    read, *flush, counted = sent
    assert read[1] == ["GET", "GET"], sent
    assert [port for port, names in flush if "EVALSHA" in names] == [call_master], sent
    assert sum(names.count("EVALSHA") for _, names in flush) == 1 and len({p for p, _ in flush}) == len(flush)
    assert not any("INCR" in names for _, names in flush) and counted[1] == ["INCR", "EXPIRE"], sent


async def test_concurrent_calls_share_one_pipeline_per_master(store, redis_cluster, monkeypatch):
    await store.create("warm", {"state": "routing"}, live_scopes={}, window_counters=[], at_ms=now_ms(),
                       event={"event": "decided", "ts": 1})
    sent = count_pipelines(monkeypatch)
    await asyncio.gather(*(store.create(f"p{i}", {"state": "routing"}, live_scopes={}, window_counters=[],
                                        at_ms=now_ms(), event={"event": "decided", "ts": 1}) for i in range(100)))
    per_master: dict[int, int] = {}
    for port, names in sent:
        per_master[port] = per_master.get(port, 0) + 1
    assert sum(len(names) for _, names in sent) >= 300 and len(per_master) == 3
    assert max(per_master.values()) <= 3, per_master  # 100 calls' commands in a couple of pipelines per master
    assert len(await store.live_calls(limit=1000)) == 100 + 1  # and the warm-up call


async def test_a_cluster_nobody_serves_is_an_error_not_a_hang():
    from redis.exceptions import RedisError
    from controller.localstack.kamailio import free_port
    from controller.state.calls import CounterRequest
    store = CallStore(RedisTarget("cluster", nodes=(f"127.0.0.1:{free_port()}",)), timeout_s=0.5)
    with pytest.raises(RedisError):
        await asyncio.wait_for(store.read_counters([CounterRequest("live:global", "live", "global", "*")], now_ms()), 5)
    await store.aclose()
