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
