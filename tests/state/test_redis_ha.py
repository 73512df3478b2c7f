"""Redis in trouble, with real Redis processes: state changes made while it is unreachable are
queued (bounded, loudly) and written in order when it is back; a Sentinel failover is
followed to the new master; node leases and the owners' command inbox."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from controller.localstack.redis import RedisServer
from controller.localstack.redis_ha import LocalRedisSentinel
from controller.state.calls import CallStore, CounterRequest, now_ms
from controller.state.connect import RedisTarget
from controller.state.inbox import NodeInbox, inbox_key
from controller.state.leases import NodeLeases, lease_key
from controller.state.outage import QueueFull

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is required")


@pytest.fixture
def own_redis(tmp_path):
    """A Redis this test may stop and start (AOF on, like production)."""
    server = RedisServer(tmp_path, appendonly=True, name="own").start()
    yield server
    server.stop()


def decided(call_id: str) -> dict:
    return {"state": "routing", "outcome": "agent", "rule": "r", "created_at_ms": now_ms()}


async def test_changes_made_while_redis_is_down_are_written_in_order_when_it_is_back(own_redis, caplog):
    seen: list[tuple[str, int]] = []
    store = CallStore(own_redis.url, timeout_s=0.5, observe_outage=lambda event, depth: seen.append((event, depth)))
    try:
        await store.create("before@x", decided("before@x"), live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 1})
        await asyncio.to_thread(own_redis.stop)
        counter = CounterRequest("window:source:60", "window", "source", "192.0.2.1", 60)
        written = await store.send_create("during@x", decided("during@x"), live_scopes={}, window_counters=[counter],
                                          at_ms=now_ms(), event={"event": "decided", "ts": 2})
        assert written.done() and written.result() == []  # held, not failed
        assert not store.available
        answered = await store.transition("during@x", "answered", {"answered_at_ms": 3}, {"event": "answered", "ts": 3})
        assert answered.queued and not answered.applied
        await store.transition("before@x", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 4})
        await store.transition("during@x", "ended", {"end_reason": "bye-callee"}, {"event": "ended", "ts": 5})
        with pytest.raises(RedisConnectionError, match="queued"):  # reads fail at once, no timeout per call
            await asyncio.wait_for(store.read_counters([counter], now_ms()), 0.1)
        assert store.outage.depth == 4 and ("down", 0) in seen
        assert "Redis unreachable: state changes are queued" in caplog.text

        await asyncio.to_thread(own_redis.start)
        assert await store.outage.wait_empty(10)
        assert store.available and not store.degraded
        assert ("up", 4) in seen and seen[-1] == ("replayed", 0)  # back with 4 to replay, then replayed
        during = await store.get("during@x")
        assert during["state"] == "ended" and during["end_reason"] == "bye-callee" and during["answered_at_ms"] == 3
        assert [e["event"] for e in await store.timeline("during@x")] == ["decided", "answered", "ended"]
        assert (await store.get("before@x"))["state"] == "ended"
        assert await store.read_counters([counter], now_ms()) == {"window:source:60": 1}  # counted once, later
        assert await store.live_calls() == []
    finally:
        await store.aclose()


async def test_a_create_redis_never_confirmed_is_written_again_when_it_is_back(own_redis, caplog):
    """The create is in Redis's socket when Redis dies (kill -9) before running it: the call
    must not be left without its decision (its dialog events would otherwise create a record
    with no rule, no target and no `decided` entry)."""
    store = CallStore(own_redis.url, timeout_s=2.0)
    try:
        await store.create("warm@x", decided("warm@x"), live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 1})  # connected, scripts loaded

        def pause_redis() -> None:
            with socket.create_connection(("127.0.0.1", own_redis.port), timeout=2) as s:
                s.sendall(b"CLIENT PAUSE 20000 ALL\r\n")
                assert s.recv(16).startswith(b"+OK")
        await asyncio.to_thread(pause_redis)
        written = await store.send_create("unconfirmed@x", decided("unconfirmed@x"), live_scopes={},
                                          window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 2})
        await asyncio.sleep(0.1)
        assert not written.done()  # sent, not run: Redis is paused

        def kill_redis() -> None:
            os.killpg(own_redis.proc.pid, signal.SIGKILL)
            own_redis.proc.wait(5)
        await asyncio.to_thread(kill_redis)
        assert await asyncio.wait_for(written, 5) == []  # held, not failed
        assert not store.available
        await store.transition("unconfirmed@x", "answered", {"answered_at_ms": 3}, {"event": "answered", "ts": 3})
        await asyncio.to_thread(own_redis.start)
        assert await store.outage.wait_empty(10)
        record = await store.get("unconfirmed@x")
        assert record["rule"] == "r" and record["state"] == "answered"
        assert [e["event"] for e in await store.timeline("unconfirmed@x")] == ["decided", "answered"]
        assert "unconfirmed@x: Redis did not confirm its record" in caplog.text
    finally:
        await store.aclose()


async def test_the_outage_queue_is_bounded_and_says_what_it_refused(own_redis, caplog):
    events: list[str] = []
    store = CallStore(own_redis.url, timeout_s=0.5, outage_queue_max=2,
                      observe_outage=lambda event, depth: events.append(event))
    try:
        await asyncio.to_thread(own_redis.stop)
        for n in range(2):
            await store.append_event("q@x", {"event": "note", "ts": n})
        with caplog.at_level(logging.ERROR), pytest.raises(QueueFull):
            await store.append_event("q@x", {"event": "note", "ts": 3})
        assert events.count("dropped") == 1 and "its event is NOT recorded" in caplog.text
        await asyncio.to_thread(own_redis.start)
        assert await store.outage.wait_empty(10)
        assert [e["ts"] for e in await store.timeline("q@x")] == [0, 1]
    finally:
        await store.aclose()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is required")
async def test_a_sentinel_failover_is_followed_to_the_new_master(tmp_path):
    sentinel = await asyncio.to_thread(LocalRedisSentinel(tmp_path).start)
    store = CallStore(RedisTarget("sentinel", nodes=tuple(sentinel.sentinels), master_name=sentinel.master_name),
                      timeout_s=1.0)
    try:
        await store.create("s1@x", decided("s1@x"), live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 1})
        await asyncio.to_thread(sentinel.wait_replicated)
        new_master = await asyncio.to_thread(sentinel.failover)
        assert new_master == sentinel.replica.port
        # The old master is demoted (READONLY) or unreachable for a moment: changes are held,
        # then written to the new master.
        await store.create("s2@x", decided("s2@x"), live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": 2})
        await store.transition("s1@x", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 3})
        assert await store.outage.wait_empty(15)
        for _ in range(50):
            s1, s2 = await store.get_many(["s1@x", "s2@x"])
            if s1 and s2 and s1.get("state") == "ended":
                break
            await asyncio.sleep(0.1)
        assert s1["state"] == "ended" and s2["state"] == "routing"
        assert store.batch.connection.params and store.available
    finally:
        await store.aclose()
        await asyncio.to_thread(sentinel.stop)


async def test_leases_one_owner_fences_grow_and_only_the_owner_renews_or_releases(redis_url):
    store = CallStore(redis_url)
    try:
        a, b = NodeLeases(store.batch, "ctl-a", 0.3), NodeLeases(store.batch, "ctl-b", 0.3)
        first = await a.acquire("media1")
        assert first is not None and await b.acquire("media1") is None
        assert (await b.holder("media1")) == first
        assert await a.renew(first) and not await b.renew(first.__class__("media1", "ctl-b", first.fence))
        await asyncio.sleep(0.45)  # not renewed: expired
        second = await b.acquire("media1")
        assert second is not None and second.fence > first.fence
        assert not await a.renew(first) and not await a.release(first)
        assert await b.release(second) and await b.holder("media1") is None
        await store.redis.set(lease_key("media1"), b"\xff garbage", px=300)
        assert await a.holder("media1") is None  # unreadable: nobody's, but not taken over either
        assert await a.acquire("media1") is None
    finally:
        await store.aclose()


async def test_the_inbox_carries_a_command_to_the_owner_and_back(redis_url):
    store = CallStore(redis_url)
    inbox = NodeInbox(store.batch, store.redis)
    seen = []

    async def handle(request):
        seen.append(request)
        return {"status": 200, "body": {"done": request["what"]}}
    serving = asyncio.create_task(inbox.serve("media1", handle))
    try:
        await store.redis.rpush(inbox_key("media1"), b"garbage", json.dumps({"id": "late", "deadline_ms": 1}))
        answer = await inbox.ask("media1", {"what": "transfer"}, timeout_s=3)
        assert answer == {"status": 200, "body": {"done": "transfer"}}
        assert [r["what"] for r in seen] == ["transfer"]  # garbage ignored, the stale request dropped
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await store.aclose()
