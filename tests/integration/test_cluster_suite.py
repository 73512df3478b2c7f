"""The same suites on a Redis Cluster: the call store's tests (tests/state/test_calls.py) and
the edge slice (real Kamailio, SIPp, the controller: tests/integration/test_edge_slice.py)
run here against 3 redis-server masters in cluster mode on loopback ports. A call's keys
share a hash tag, so each call's commands land on one master; pipelines are split per master.

Left out: the tests that count round trips on the single-node connection object (a cluster
has one per master) and the one that runs the controller as a process configured for a
single Redis."""
from __future__ import annotations

import asyncio
import shutil

import pytest
from redis.crc import key_slot

from controller.localstack.redis_ha import LocalRedisCluster
from controller.state.calls import CallStore, call_key, now_ms, timeline_key
from controller.state.connect import RedisTarget
from tests.integration import test_edge_slice as edge_suite
from tests.integration.test_edge_slice import controller  # noqa: F401 (fixture)
from tests.state import test_calls as state_suite

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server and redis-cli are required")

SINGLE_NODE_ONLY = {
    "test_create_is_one_round_trip_and_keys_share_a_hash_tag",  # counts pipelines on batch.connection
    "test_concurrent_calls_share_pipelines",  # idem
    "test_redis_going_away_is_an_error_not_a_hang",  # builds its own single-node store
    "test_frozen_controller_falls_back_within_budget_then_recovers",  # a controller process on redis_url
}
for _suite in (state_suite, edge_suite):
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
