"""Fault-injection harness for call state: Redis, Kamailio (the shipped kamailio.cfg, edge
events to a Redis Stream), one controller process and a SIPp UAS as the media node; SIPp
places calls at a steady rate (answered, hung up by the caller after `hold_ms`) while a
fault hits: the controller frozen (SIGSTOP) or killed (SIGKILL, then started again), Redis
stopped and started (with its AOF), or restarted empty (no persistence). Then every call
SIPp placed (its own message log) is checked in Redis: one record, decided, closed.

Used by tests/integration/test_fault_matrix.py and bench/faults.py."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_sync

from controller.localstack.kamailio import Kamailio
from controller.localstack.redis import RedisServer
from controller.localstack.sipp import SippUAS, run_uac
from tests.support.ha import ControllerProcess
from tests.support.kamailio import wait_clients

FAULTS = ("sigstop", "kill9", "redis-restart", "redis-empty")

POLICY = """\
settings:
  numbering: {country_code: "1", national_prefix: "1"}
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000", transport: rtp, codec: ulaw}
default:
  actions: [route_agent: intake]
"""


@dataclass
class FaultRun:
    fault: str
    rate: int
    calls: int
    placed: list[str] = field(default_factory=list)
    failed: int = 0
    missing: list[str] = field(default_factory=list)  # placed calls without a record
    unclosed: list[str] = field(default_factory=list)  # records not in a final state (or not decided)
    duplicated: list[str] = field(default_factory=list)  # timelines with an end or a decision twice
    mislabelled: list[str] = field(default_factory=list)  # routed by the edge's fallback, recorded otherwise
    fallbacks: int = 0  # calls the edge routed by its fallback (records saying so)
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    lost_with_redis: int = 0  # redis-empty: calls over before Redis lost its data (nothing could keep them)
    recovered: int = 0  # of those, calls live across the loss recorded again from the edge's dialogs
    events_dropped: float = 0.0
    recovery_s: float | None = None  # Redis back → nothing queued or replaying, events consumed
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (edge, controller)

    @property
    def mismatched(self) -> dict[str, tuple[float, float]]:
        return {k: v for k, v in self.metrics.items() if v[0] != v[1]}

    def line(self) -> str:
        recovery = f"{self.recovery_s:.2f}s" if self.recovery_s is not None else "-"
        return (f"{self.fault:14s} {self.rate:4d} cps {len(self.placed):5d} calls: failed {self.failed}, "
                f"records missing {len(self.missing)}, unclosed {len(self.unclosed)}, duplicated "
                f"{len(self.duplicated)}, fallbacks {self.fallbacks} {self.fallback_reasons or ''} (mislabelled "
                f"{len(self.mislabelled)}), events dropped {self.events_dropped:.0f}, lost with Redis's data "
                f"{self.lost_with_redis} ({self.recovered} recovered live), Redis back→normal {recovery}, metrics mismatched {self.mismatched or 'none'}")


class FaultStack:
    def __init__(self, workdir: Path, *, appendonly: bool):
        self.workdir = workdir
        self.redis = RedisServer(workdir, appendonly=appendonly)
        self.uas = SippUAS(workdir)
        self.kamailio: Kamailio | None = None
        self.controller: ControllerProcess | None = None
        self._generation = 0

    def start(self) -> "FaultStack":
        self.redis.start()
        self.uas.start()
        self.kamailio = Kamailio(self.workdir, {1: [self.uas.addr]}, events_redis=self.redis.url,
                                 fr_inv_timeout_ms=10000).start()
        policy_dir = self.workdir / "policy"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "policy.yaml").write_text(POLICY)
        self.policy_dir = policy_dir
        self.start_controller()
        return self

    def start_controller(self) -> ControllerProcess:
        self._generation += 1
        ctl = ControllerProcess(self.workdir, f"ctl{self._generation}", {
            "redis_url": self.redis.url, "edge_evapi": [f"127.0.0.1:{self.kamailio.evapi_port}"],
            "edge_rpc": [f"http://127.0.0.1:{self.kamailio.http_port}/RPC"],
            "policy_dir": str(self.policy_dir), "edge_streams": ["edge"], "redis_outage_decisions": "open"})
        self.controller = ctl.start()
        ctl.wait_ready()
        wait_clients(self.kamailio, 1)
        return ctl

    def stop(self) -> None:
        for part in (self.controller, self.kamailio, self.uas, self.redis):
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:  # noqa: BLE001 - teardown goes on
                    print(f"teardown: {exc}")

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=2)

    def controller_metric(self, name: str) -> float:
        """Sum of a controller metric's samples (0 when unreachable)."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.controller.http}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return _sum_samples(text, name)

    def edge_metric(self, name: str) -> float:
        return _sum_samples(self.kamailio.metrics(), f"kamailio_{name}")

    def health(self) -> dict[str, Any] | None:
        import json
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.controller.http}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"null")
        except OSError:
            return None


def _sum_samples(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name):len(name) + 1] in ("{", " ")):
            rest = line.rsplit("}", 1)[1] if "{" in line else line[len(name):]
            total += float(rest.split()[0])  # (Kamailio's lines end with a timestamp)
    return total


async def run_fault(stack: FaultStack, fault: str, *, rate: int, seconds: float, hold_ms: int = 1000,
                    fault_at_s: float = 1.0, fault_s: float = 3.0, settle_s: float = 30.0) -> FaultRun:
    """Place `rate` × `seconds` calls, inflict `fault` `fault_at_s` into the run for about
    `fault_s`, wait until the state settles, and check every placed call's record."""
    calls = max(1, int(rate * seconds))
    run = FaultRun(fault, rate, calls)
    dropped_before = await asyncio.to_thread(stack.edge_metric, "callfabric_events_dropped_total")
    placing = asyncio.create_task(asyncio.to_thread(
        run_uac, stack.workdir, stack.kamailio.sip_port, calls=calls, rate=rate, limit=rate * 4,
        timeout_s=int(seconds + hold_ms / 1000 + 40), hold_ms=hold_ms))
    await asyncio.sleep(fault_at_s)
    redis_back = None
    restarted_at = None
    if fault == "sigstop":
        os.killpg(stack.controller.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(fault_s)
        os.killpg(stack.controller.proc.pid, signal.SIGCONT)
    elif fault == "kill9":
        await asyncio.to_thread(stack.controller.kill9)
        await asyncio.sleep(fault_s)
        await asyncio.to_thread(stack.start_controller)
    elif fault in ("redis-restart", "redis-empty"):
        await asyncio.to_thread(stack.redis.stop)
        await asyncio.sleep(fault_s)
        await asyncio.to_thread(stack.redis.start)
        redis_back = time.monotonic()
        restarted_at = time.time() * 1000
    else:
        raise ValueError(f"unknown fault {fault}")
    if redis_back is not None:  # Redis back → the controller says ok and the edge's events are consumed
        run.recovery_s = await asyncio.to_thread(_until_normal, stack, redis_back, settle_s)
    result = await placing
    run.failed = result.failed + max(0, calls - result.successful - result.failed)
    run.placed = sorted({m.header("Call-ID")[0] for m in result.messages
                         if m.direction == "out" and m.first_line.startswith("INVITE ") and m.header("Call-ID")})
    await asyncio.to_thread(_settle_and_check, stack, run, settle_s, restarted_at if fault == "redis-empty" else None)
    run.events_dropped = await asyncio.to_thread(stack.edge_metric, "callfabric_events_dropped_total") - dropped_before
    return run


def _settle_and_check(stack: FaultStack, run: FaultRun, settle_s: float, lost_before_ms: float | None) -> None:
    _settled(stack, run.placed, settle_s)
    _check_records(stack, run, lost_before_ms)
    # not compared: after kill -9 the new controller's counters start again (Prometheus sees a
    # reset); after Redis restarted empty, events Redis held unread when it lost its data
    # reached nobody (the edge counted them when they happened)
    if run.fault not in ("kill9", "redis-empty"):
        for edge_name, ctl_name in (("callfabric_fallback_total", "callfabric_edge_fallbacks_total"),
                                    ("callfabric_events_total", "callfabric_dialog_events_total")):
            run.metrics[ctl_name] = (stack.edge_metric(edge_name), stack.controller_metric(ctl_name))


def _until_normal(stack: FaultStack, since: float, deadline_s: float) -> float | None:
    """Seconds from `since` until the controller is healthy again with nothing queued and the
    edge's stream consumed (None: not within the deadline)."""
    deadline = since + deadline_s
    while time.monotonic() < deadline:
        health = stack.health()
        if health and health.get("state") == "ok" and health.get("redis"):
            try:
                lag = stack.client().xlen("cf:edge:{edge}:events")
            except redis_sync.RedisError:
                lag = None
            queued = stack.edge_metric("callfabric_events_queued")
            if lag is not None and lag < 50 and queued < 50:
                return time.monotonic() - since
        time.sleep(0.05)
    return None


def _settled(stack: FaultStack, call_ids: list[str], timeout_s: float) -> None:
    """Wait until the edge's stream is consumed and every placed call's record is final (or
    the timeout passes: what is not is then reported)."""
    deadline = time.monotonic() + timeout_s
    client = stack.client()
    while time.monotonic() < deadline:
        try:
            lag = client.xlen("cf:edge:{edge}:events")
            states = _states(client, call_ids)
        except redis_sync.RedisError:
            time.sleep(0.2)
            continue
        if lag == 0 and stack.edge_metric("callfabric_events_queued") == 0 and \
                all(s in (b"ended", b"failed") for s in states):
            return
        time.sleep(0.2)


def _states(client: redis_sync.Redis, call_ids: list[str]) -> list[Any]:
    from controller.state.calls import call_key
    pipe = client.pipeline(transaction=False)
    for call_id in call_ids:
        pipe.hget(call_key(call_id), "state")
    return pipe.execute()


def _check_records(stack: FaultStack, run: FaultRun, lost_before_ms: float | None) -> None:
    from controller.state.calls import call_key, timeline_key
    client = stack.client()
    pipe = client.pipeline(transaction=False)
    for call_id in run.placed:
        pipe.hgetall(call_key(call_id))
        pipe.xrange(timeline_key(call_id))
    replies = pipe.execute()
    for n, call_id in enumerate(run.placed):
        record = {k.decode(): v.decode() for k, v in replies[2 * n].items()}
        timeline = [fields.get(b"event", b"").decode() for _, fields in replies[2 * n + 1]]
        ended_ms = int(record.get("ended_at_ms") or 0)
        if lost_before_ms is not None and (not record or "created_at_ms" not in record) and \
                (not ended_ms or ended_ms >= lost_before_ms):
            # the call was up when Redis lost its data: only what came after is known
            if not record:
                run.lost_with_redis += 1
                continue
        if not record:
            if lost_before_ms is not None:
                run.lost_with_redis += 1
            else:
                run.missing.append(call_id)
            continue
        if record.get("decided_by") == "recovered":  # live across the loss: its decision was lost with Redis
            run.recovered += 1
            if lost_before_ms is None:
                run.unclosed.append(call_id)  # (only Redis losing its data recovers records)
            else:
                run.lost_with_redis += 1
            continue
        complete = record.get("state") in ("ended", "failed") and record.get("decided_by") and \
            record.get("outcome") and record.get("created_at_ms") and record.get("ended_at_ms")
        if not complete:
            if lost_before_ms is not None and "created_at_ms" not in record:
                run.lost_with_redis += 1  # its decision was in the data Redis lost
            else:
                run.unclosed.append(call_id)
        if record.get("fallback"):
            run.fallbacks += 1
            run.fallback_reasons[record["fallback"]] = run.fallback_reasons.get(record["fallback"], 0) + 1
            if record.get("decided_by") != "edge-fallback" or record.get("outcome") != "fallback":
                run.mislabelled.append(call_id)
        elif record.get("decided_by") == "edge-fallback":
            run.mislabelled.append(call_id)
        ends = sum(1 for e in timeline if e in ("ended", "failed"))
        starts = sum(1 for e in timeline if e in ("decided", "fallback"))
        if ends > 1 or starts > 2 or timeline.count("decided") > 1:
            run.duplicated.append(call_id)
