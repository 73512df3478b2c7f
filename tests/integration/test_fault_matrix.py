"""Call state under faults (real Redis, the shipped kamailio.cfg with its events in a Redis
Stream, a controller process, SIPp): calls placed at a steady rate while the controller is
frozen or killed, or Redis stops and comes back (with its data, or empty). Afterwards every
call SIPp placed has exactly one decided, closed record; the edge dropped no event; the
controller's fallback count is the edge's. (bench/faults.py runs the same matrix at 50 and
150 calls per second.)"""
from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.support.faults import FaultStack, run_fault

pytestmark = pytest.mark.skipif(shutil.which("kamailio") is None or shutil.which("sipp") is None,
                                reason="needs kamailio and sipp (Debian packages)")

RATE, SECONDS = 20, 4


@pytest.fixture
async def stack(tmp_path, request):
    stack = FaultStack(tmp_path, appendonly=request.param == "redis-restart")
    await asyncio.to_thread(stack.start)
    yield request.param, stack
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        print(f"----- controller log -----\n{stack.controller.log_tail(60)}\n"
              f"----- kamailio log -----\n{stack.kamailio.log_tail(60)}")
    await asyncio.to_thread(stack.stop)


@pytest.mark.parametrize("stack", ["sigstop", "kill9", "redis-restart", "redis-empty"], indirect=True)
async def test_every_placed_call_has_one_complete_closed_record(stack):
    fault, stack = stack
    run = await run_fault(stack, fault, rate=RATE, seconds=SECONDS, fault_s=2.5)
    print(run.line())
    assert len(run.placed) == RATE * SECONDS and run.failed == 0
    assert run.missing == [] and run.unclosed == [] and run.duplicated == [] and run.mislabelled == []
    if fault in ("sigstop", "kill9"):  # calls sent to the stalled or dead controller took the fallback
        assert run.fallbacks > 0
    assert run.events_dropped == 0
    assert run.mismatched == {}
    if fault == "redis-empty":
        # calls over before Redis lost its data cannot come back; every call after it is whole
        assert run.lost_with_redis < len(run.placed) // 2
    else:
        assert run.lost_with_redis == 0
    if fault.startswith("redis"):
        assert run.recovery_s is not None, "the controller never said ok again with the edge's events consumed"
    health = await asyncio.to_thread(stack.health)
    assert health["state"] == "ok" and health["edge_events"] == {"edge": "consuming"}

