"""Media plane setup cost: how long until a call's forks are live, and how many ARI requests a
call costs, with the controller's real MediaPlane and real Redis.

    python bench/media.py [--calls 200] [--concurrency 10] [--forks 2]

Target `fake` (always): the spec-validating fake ARI from the test suite (its StasisStart
delay 5 ms stands in for Asterisk's channel setup); the figures show the controller's own
cost and request count. Target `real` needs an Asterisk (`asterisk` on PATH or
CALLFABRIC_ASTERISK) and runs through tests/media/test_real_asterisk.py's stack; it is not
available in this script yet (the real-Asterisk suite measures it).

Fork start latency: from the caller's StasisStart reaching the controller to the fork's
snoop + ExternalMedia channels bridged. Last line:
RESULT fork_start_p50_ms=… fork_start_p95_ms=… ari_requests_per_call=… target=fake
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.localstack.redis import RedisServer  # noqa: E402
from controller.media.ari import AriClient, AriNode  # noqa: E402
from controller.media.plane import Endpoint, MediaPlane  # noqa: E402
from controller.metrics import Metrics  # noqa: E402
from controller.state.calls import CallStore, now_ms  # noqa: E402
from tests.support.fake_ari import FakeAri  # noqa: E402

APP = "callfabric"
AGENTS = {"intake": Endpoint("intake", "127.0.0.1:4000", "rtp", "ulaw")}
FORK_TARGETS = [Endpoint("stt", "127.0.0.1:9100", "rtp", "slin16"), Endpoint("recorder", "127.0.0.1:9200", "rtp", "ulaw")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


async def run(args: argparse.Namespace, redis_url: str) -> None:
    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005, playback_duration=0.02).start()
    store = CallStore(redis_url)
    plane = MediaPlane({"media1": AriClient(AriNode("media1", fake.url, "callfabric", "secret"), APP)}, store,
                       Metrics(), resolve_agent=AGENTS.get, resolve_fork_target=lambda n: None, edge_endpoint="edge",
                       instance_id="bench")
    serving = asyncio.create_task(plane.serve_node("media1"))
    await fake.wait_for_app(APP)
    forks = [{"target": t.name, "endpoint": t.endpoint, "transport": t.transport, "codec": t.codec, "direction": "in"}
             for t in FORK_TARGETS[: args.forks]]
    requests_before = sum(1 for r in fake.requests if not r.path.startswith("/events"))
    semaphore = asyncio.Semaphore(args.concurrency)
    fork_ms: list[float] = []

    async def one(n: int) -> None:
        call_id = f"bench-{n}@edge"
        async with semaphore:
            decision = {"outcome": "agent", "rule": "bench", "agent": {"name": "intake"}, "forks": forks}
            await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "bench", "decision": decision},
                               live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
            caller = await fake.inbound_call(APP, [call_id, "intake"], sip_call_id=call_id)
            for _ in range(500):
                media = plane.calls.get(call_id)
                if media and len([f for f in media.forks.values() if f.state == "up"]) == len(forks):
                    break
                await asyncio.sleep(0.002)
            else:
                raise RuntimeError(f"{call_id}: forks did not come up")
            await fake.caller_hangup(caller)
            for _ in range(500):
                if call_id not in plane.calls:
                    break
                await asyncio.sleep(0.002)

    await asyncio.gather(*(one(n) for n in range(args.calls)))
    await fake.settle()
    for n in range(args.calls):
        timeline = await store.timeline(f"bench-{n}@edge")
        fork_ms.extend(e["start_ms"] for e in timeline if e.get("event") == "fork_started")
    requests = sum(1 for r in fake.requests if not r.path.startswith("/events")) - requests_before
    leaks = [c for c in fake.channels if c.startswith("cf-")] + list(fake.bridges)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await plane.nodes["media1"].close()
    await store.aclose()
    await fake.stop()
    print(f"fake ARI: {args.calls} calls, {args.concurrency} at a time, agent leg + {args.forks} fork(s) each")
    print(f"fork start: p50 {percentile(fork_ms, .5):.1f} ms  p95 {percentile(fork_ms, .95):.1f} ms  "
          f"mean {statistics.fmean(fork_ms):.1f} ms over {len(fork_ms)} forks")
    print(f"ARI requests: {requests} ({requests / args.calls:.1f} per call, set-up and clean-up); "
          f"leaked objects: {len(leaks)}; rejected requests: {len(fake.rejected)}")
    print(f"RESULT fork_start_p50_ms={percentile(fork_ms, .5):.1f} fork_start_p95_ms={percentile(fork_ms, .95):.1f} "
          f"ari_requests_per_call={requests / args.calls:.1f} target=fake")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1, help="calls set up at once (1: the latency of one call)")
    parser.add_argument("--forks", type=int, default=2, choices=(0, 1, 2))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-bench-media-"))
    redis = RedisServer(workdir).start()
    try:
        asyncio.run(run(args, redis.url))
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
