"""Phantom live records (their call's end was never recorded) are closed against the edge's
own dialog list (JSON-RPC dlg.list of the real Kamailio); records of calls the edge holds,
and records too young to judge, are left alone; nothing is closed when an edge cannot say."""
from __future__ import annotations

import asyncio
import threading
import time

import aiohttp

from controller.edge.reconcile import DialogReconciler
from controller.edge.rpc import KamailioRpc
from controller.localstack.sipp import run_uac
from controller.metrics import Metrics
from controller.state.calls import now_ms


async def record(store, call_id: str, at_ms: int) -> None:
    await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "r", "tx": "1:2",
                                 "created_at_ms": at_ms}, live_scopes={"tenant": "acme"}, window_counters=[],
                       at_ms=at_ms, event={"event": "decided", "ts": at_ms})


async def test_live_records_no_edge_holds_are_closed(procs, store, tmp_path):
    uas = await asyncio.to_thread(procs.uas)
    k = await asyncio.to_thread(procs.kamailio, {1: [uas.addr]})
    placed: dict = {}
    caller = threading.Thread(target=lambda: placed.update(r=run_uac(tmp_path, k.sip_port, calls=1, hold_ms=4000)))
    caller.start()
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(k.jsonrpc, "dlg.list"):
        assert time.monotonic() < deadline, "the call never came up"
        await asyncio.sleep(0.1)
    (up,) = [d["call-id"] for d in await asyncio.to_thread(k.jsonrpc, "dlg.list")]
    old = now_ms() - 120_000
    await record(store, up, old)  # up at the edge: kept
    await record(store, "ghost-1@test", old)  # the edge never heard of it (any more): closed
    await record(store, "young-1@test", now_ms())  # too young to judge
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        edge = KamailioRpc(f"http://127.0.0.1:{k.http_port}/RPC", session)
        assert await DialogReconciler([edge], store, metrics).run_once() == 1
        unreachable = KamailioRpc("http://127.0.0.1:9/RPC", session, timeout_s=0.5)
        await record(store, "ghost-2@test", old)
        assert await DialogReconciler([edge, unreachable], store, metrics).run_once() == 0  # one edge silent
    ghost = await store.get("ghost-1@test")
    assert ghost["state"] == "ended" and ghost["end_reason"] == "reconciled"
    assert [e["event"] for e in await store.timeline("ghost-1@test")] == ["decided", "ended"]
    assert (await store.get(up))["state"] == "routing" and (await store.get("young-1@test"))["state"] == "routing"
    assert (await store.get("ghost-2@test"))["state"] == "routing"
    assert "ghost-1@test" not in await store.live_calls(100)
    assert await store.redis.zscore("cf:live:{tenant:acme}", "ghost-1@test") is None  # out of the scope's count
    assert metrics.registry.get_sample_value("callfabric_calls_reconciled_total") == 1
    await asyncio.to_thread(caller.join, 20)
    assert placed["r"].successful == 1


async def test_live_calls_whose_records_redis_lost_are_recovered_and_a_late_decision_replaces_them(
        procs, store, tmp_path):
    from controller.state.journal import Journal, NewCall

    uas = await asyncio.to_thread(procs.uas)
    k = await asyncio.to_thread(procs.kamailio, {1: [uas.addr]})
    placed: dict = {}
    caller = threading.Thread(target=lambda: placed.update(r=run_uac(tmp_path, k.sip_port, calls=1, hold_ms=4000)))
    caller.start()
    deadline = time.monotonic() + 10
    while not [d for d in await asyncio.to_thread(k.jsonrpc, "dlg.list") if d.get("state") == 4]:
        assert time.monotonic() < deadline, "the call never came up"
        await asyncio.sleep(0.1)
    (up,) = [d["call-id"] for d in await asyncio.to_thread(k.jsonrpc, "dlg.list")]
    await store.redis.flushdb()  # Redis lost its data (restarted without persistence)
    metrics = Metrics()
    async with aiohttp.ClientSession() as session:
        edge = KamailioRpc(f"http://127.0.0.1:{k.http_port}/RPC", session)
        reconciler = DialogReconciler([edge], store, metrics)
        await reconciler.run_once()  # no data loss known: nothing recovered
        assert await store.get(up) is None
        await reconciler.run_once(lost_before_ms=now_ms())
        await reconciler.run_once(lost_before_ms=now_ms())  # twice: recovered once
    record = await store.get(up)
    assert record["decided_by"] == "recovered" and record["state"] == "answered" and record["tx"]
    assert await store.live_calls(10) == [up]
    assert metrics.registry.get_sample_value("callfabric_calls_recovered_total") == 1
    # the call's `decided` event, late (it waited in the edge's queue): the decision replaces it
    decided = NewCall(up, {"state": "routing", "outcome": "agent", "rule": "r", "policy_version": "v",
                           "decided_by": "edge", "created_at_ms": record["created_at_ms"]},
                      {"event": "decided", "ts": record["created_at_ms"]}, {}, [], record["created_at_ms"])
    (result,) = await Journal(store).apply([decided])
    assert result.applied
    record = await store.get(up)
    assert (record["decided_by"], record["rule"], record["state"]) == ("edge", "r", "answered")
    assert [e["event"] for e in await store.timeline(up)] == ["recovered", "decided"]
    await asyncio.to_thread(caller.join, 20)
    assert placed["r"].successful == 1
