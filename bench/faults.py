"""Call state under faults, at load: the fault matrix of tests/integration/test_fault_matrix.py
(controller frozen by SIGSTOP, controller killed with SIGKILL and started again, Redis stopped
and started with its AOF, Redis restarted empty) at 50 and 150 calls per second through the
shipped kamailio.cfg (edge events in a Redis Stream), one controller process, real Redis and
SIPp (calls answered, hung up after 1 s). Every placed call (SIPp's own message log) is then
looked up in Redis.

    python bench/faults.py [--rates 50,150] [--seconds 12] [--fault-s 5] [--faults sigstop,kill9,...]

Per fault and rate: calls failed, records missing, records unclosed, events dropped at the
edge, seconds from Redis back to normal (the controller healthy with nothing queued or
replaying, the edge's queue and stream drained). Calls that were over before Redis lost its
data (the restart without persistence) are counted apart: nothing can bring them back.
Last line: RESULT records_lost=… records_unclosed=… redis_recovery_s=… runs=…
(goal: 0, 0, ≤ 2 s after Redis is back at 150 CPS; redis_recovery_s is the worst run).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.faults import FAULTS, FaultStack, run_fault  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        print(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        return 2
    rates = [int(r) for r in args.rates.split(",")]
    lost = unclosed = runs = 0
    recovery: list[float] = []
    never_recovered = 0
    started = time.monotonic()
    for rate in rates:
        for fault in faults:
            with tempfile.TemporaryDirectory(prefix="callfabric-faults-") as tmp:
                stack = FaultStack(Path(tmp), appendonly=fault == "redis-restart")
                await asyncio.to_thread(stack.start)
                try:
                    run = await run_fault(stack, fault, rate=rate, seconds=args.seconds, fault_s=args.fault_s,
                                          fault_at_s=min(2.0, args.seconds / 4), settle_s=60)
                finally:
                    await asyncio.to_thread(stack.stop)
            runs += 1
            print(run.line(), flush=True)
            lost += len(run.missing) + run.failed
            unclosed += len(run.unclosed)
            if fault.startswith("redis"):
                if run.recovery_s is None:
                    never_recovered += 1
                else:
                    recovery.append(run.recovery_s)
    worst = max(recovery) if recovery else 0.0
    print(f"{runs} runs in {time.monotonic() - started:.0f}s (rates {args.rates} cps, {args.seconds}s of calls each, "
          f"faults of {args.fault_s}s); Redis never back to normal in {never_recovered} run(s)")
    print(f"RESULT records_lost={lost} records_unclosed={unclosed} "
          f"redis_recovery_s={f'{worst:.2f}' if not never_recovered else 'inf'} runs={runs}")
    return 0 if lost == 0 and unclosed == 0 and not never_recovered else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,150", help="calls per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds of calls per run")
    parser.add_argument("--fault-s", type=float, default=5.0, help="how long each fault lasts")
    parser.add_argument("--faults", default=",".join(FAULTS))
    sys.exit(asyncio.run(main(parser.parse_args())))
