"""No call lost: the kill -9 chaos run, repeated. Each run places calls with SIPp through the
real Kamailio config to a media node (a SIP user agent in front of the spec-validating fake
ARI — not a real Asterisk: the RESULT line says `media=fake-ari`), with two controller
processes sharing the work and real Redis; once every call is up with its agent leg and a
fork, the controller that owns the node's events is killed with SIGKILL; the other takes the
node over and the calls run to their end. The node answers SIP only once a controller
answered the channel over ARI, and `answered=` counts those ARI answers.

    python bench/ha.py [--runs 10] [--calls 50] [--hold-ms 6000]

Per run: takeover time (SIGKILL → the new owner's events websocket up and its resync done
looking at ARI), calls lost (SIPp failures, calls whose caller channel vanished before the
caller hung up, calls refused or never answered by a controller, records incomplete in Redis).
Last line:
RESULT calls_lost=… answered=…/… takeover_p50_s=… takeover_max_s=… runs=… media=fake-ari
(goal: 0 lost, every call answered, max ≤ 2 s)
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.localstack.kamailio import Kamailio, free_port  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from tests.support.ha import HaStack, write_policy  # noqa: E402


async def one_run(n: int, args: argparse.Namespace, workdir: Path, kamailio: Kamailio, media_port: int,
                  redis: RedisServer) -> tuple[int, int, float]:
    run_dir = workdir / f"run{n}"
    run_dir.mkdir()
    await asyncio.to_thread(_flush, redis)
    stack = HaStack(run_dir, kamailio, media_port, redis.url, write_policy(run_dir / "policy"))
    try:
        await stack.start(controllers=2)
        owner, _ = await stack.owner_and_standby()
        sipp = asyncio.create_task(stack.calls(args.calls, hold_ms=args.hold_ms))
        await stack.until(lambda: len(stack.node.calls) == args.calls and all(
            stack.media_complete(c) for c in stack.node.calls), 20, f"{args.calls} calls up")
        mark = len(stack.fake.requests)
        killed_at = await asyncio.to_thread(owner.kill9)
        takeover_s = await stack.takeover_after(mark, killed_at)
        result = await sipp
        ids = sorted(stack.node.calls)
        incomplete = len(await stack.incomplete_records(ids))
        lost = max(result.failed, args.calls - result.successful) + len(stack.node.dropped()) + \
            len(stack.node.refused) + len(stack.node.unanswered) + incomplete
        # answered by a controller: the ARI answers of the callers' channels (the caller's
        # 200 OK waits for it), not SIPp's success
        callers = {f"/channels/{c.channel}/answer" for c in stack.node.calls.values()}
        answered = len({r.path for r in stack.fake.requests if r.method == "POST" and r.path in callers})
        print(f"run {n + 1:2d}: takeover {takeover_s:.3f}s  calls {result.successful}/{args.calls} ok  "
              f"answered by a controller {answered}  dropped {len(stack.node.dropped())}  "
              f"unanswered {len(stack.node.unanswered)}  incomplete records {incomplete}  lost {lost}", flush=True)
        return lost, answered, takeover_s
    finally:
        await stack.stop()


def _flush(redis: RedisServer) -> None:
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="callfabric-ha-") as tmp:
        workdir = Path(tmp)
        media_port = free_port(socket.SOCK_DGRAM)
        redis = RedisServer(workdir, appendonly=True).start()
        kamailio = Kamailio(workdir, {1: [f"127.0.0.1:{media_port}"]}).start()
        lost, answered, takeovers = 0, 0, []
        started = time.monotonic()
        try:
            for n in range(args.runs):
                run_lost, run_answered, takeover_s = await one_run(n, args, workdir, kamailio, media_port, redis)
                lost += run_lost
                answered += run_answered
                takeovers.append(takeover_s)
        finally:
            kamailio.stop()
            redis.stop()
    print(f"{args.runs} runs of {args.calls} calls in {time.monotonic() - started:.0f}s; takeover p50 "
          f"{statistics.median(takeovers):.3f}s, max {max(takeovers):.3f}s (lease TTL 1.5 s, standby poll 0.2 s)")
    print(f"RESULT calls_lost={lost} answered={answered}/{args.runs * args.calls} "
          f"takeover_p50_s={statistics.median(takeovers):.3f} takeover_max_s={max(takeovers):.3f} runs={args.runs} "
          f"media=fake-ari")
    return 0 if lost == 0 and answered == args.runs * args.calls else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--hold-ms", type=int, default=6000, help="how long each call lasts once answered")
    sys.exit(asyncio.run(main(parser.parse_args())))
