"""Media plane setup cost: how long until a call's forks are live, and how many ARI requests a
call costs, with the controller's real MediaPlane and real Redis.

    python bench/media.py [--calls 200] [--concurrency 10] [--forks 2]

Target `fake` (always): the spec-validating fake ARI from the test suite (its StasisStart
delay 5 ms stands in for Asterisk's channel setup); the figures show the controller's own
cost and request count. Target `real` (when an Asterisk binary is on PATH or named by
CALLFABRIC_ASTERISK): real calls — a caller with RTP → real Kamailio → real Asterisk (our
asterisk/ config) → the controller — each with an agent leg and the forks, agent and fork
targets receiving the audio. The RESULT line reports `real` when it ran.

Fork start latency: from the caller's StasisStart reaching the controller to the fork's
snoop + ExternalMedia channels bridged. Last line:
RESULT fork_start_p50_ms=… fork_start_p95_ms=… ari_requests_per_call=… target=real|fake
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


async def run(args: argparse.Namespace, redis_url: str) -> dict:
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
    print(f"  fork start: p50 {percentile(fork_ms, .5):.1f} ms  p95 {percentile(fork_ms, .95):.1f} ms  "
          f"mean {statistics.fmean(fork_ms):.1f} ms over {len(fork_ms)} forks")
    print(f"  ARI requests: {requests} ({requests / args.calls:.1f} per call, set-up and clean-up); "
          f"leaked objects: {len(leaks)}; rejected requests: {len(fake.rejected)}")
    return {"p50": percentile(fork_ms, .5), "p95": percentile(fork_ms, .95), "per_call": requests / args.calls}


async def run_real(args: argparse.Namespace, redis_url: str, workdir: Path, binary: str) -> dict:
    """Real calls through Kamailio and Asterisk; the controller in this process."""
    import socket

    from aiohttp import web

    from controller.app import MEDIA, build_app
    from controller.config import Settings
    from controller.localstack.asterisk import Asterisk
    from controller.localstack.kamailio import Kamailio, free_port
    from controller.localstack.sip_ua import SipCaller

    spec_ = __import__("importlib.util").util.spec_from_file_location("media_agent", ROOT / "examples" / "media_agent.py")
    media_agent = __import__("importlib.util").util.module_from_spec(spec_)
    spec_.loader.exec_module(media_agent)
    kamailio = Kamailio(workdir, {})
    asterisk = Asterisk(workdir, edge_port=kamailio.sip_port, binary=binary)
    kamailio.write_dispatcher_list({1: [f"127.0.0.1:{asterisk.sip_port}"]})
    await asyncio.to_thread(kamailio.start)
    await asyncio.to_thread(asterisk.start)
    loop = asyncio.get_running_loop()
    ports, transports = {}, []
    for name in ("agent", *[t.name for t in FORK_TARGETS[: args.forks]]):
        ports[name] = free_port(socket.SOCK_DGRAM)
        transport, _ = await loop.create_datagram_endpoint(lambda n=name: media_agent.RtpAgent(echo=n == "agent"),
                                                           local_addr=("127.0.0.1", ports[name]))
        transports.append(transport)
    forks_yaml = "".join(f"  {t.name}: {{endpoint: '127.0.0.1:{ports[t.name]}', transport: rtp, codec: ulaw}}\n"
                         for t in FORK_TARGETS[: args.forks])
    policy_dir = workdir / "policy"
    policy_dir.mkdir()
    (policy_dir / "p.yaml").write_text(
        "node_sets: {media: {dispatcher_set: 1}}\n"
        f"agents: {{intake: {{node_set: media, endpoint: '127.0.0.1:{ports['agent']}', codec: ulaw}}}}\n"
        + (f"fork_targets:\n{forks_yaml}" if forks_yaml else "")
        + "default:\n  actions: [route_agent: intake"
        + "".join(f", fork: {t.name}" for t in FORK_TARGETS[: args.forks]) + "]\n")
    app = build_app(Settings(policy_dir=str(policy_dir), redis_url=redis_url, instance_id="bench",
                             edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                             ari_nodes=[asterisk.ari_node()]))
    runner = web.AppRunner(app)
    await runner.setup()
    plane = app[MEDIA]
    try:
        while not plane.metrics.registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
            await asyncio.sleep(0.1)
        caller = SipCaller(kamailio.sip_port)
        semaphore = asyncio.Semaphore(args.concurrency)
        call_ids = []

        async def one(n: int) -> None:
            async with semaphore:
                result = await caller.call(f"1800555{n:04d}", hold_s=1.0)
                if result.status == 200:
                    call_ids.append(result.call_id)

        calls = min(args.calls, args.real_calls)
        await asyncio.gather(*(one(n) for n in range(calls)))
        await asyncio.sleep(1.0)
        store = CallStore(redis_url)
        fork_ms = []
        for call_id in call_ids:
            fork_ms += [e["start_ms"] for e in await store.timeline(call_id) if e.get("event") == "fork_started"]
        await store.aclose()
        requests = sum(s.value for metric in plane.metrics.registry.collect() if metric.name ==
                       "callfabric_ari_request_duration_seconds" for s in metric.samples if s.name.endswith("_count"))
    finally:
        await runner.cleanup()
        for transport in transports:
            transport.close()
        await asyncio.to_thread(asterisk.stop)
        await asyncio.to_thread(kamailio.stop)
    print(f"real Asterisk: {len(call_ids)}/{calls} calls answered, {args.concurrency} at a time, "
          f"agent leg + {args.forks} fork(s) each")
    print(f"  fork start: p50 {percentile(fork_ms, .5):.1f} ms  p95 {percentile(fork_ms, .95):.1f} ms over "
          f"{len(fork_ms)} forks")
    print(f"  ARI requests: {requests:.0f} ({requests / max(1, len(call_ids)):.1f} per call, set-up and clean-up)")
    return {"p50": percentile(fork_ms, .5), "p95": percentile(fork_ms, .95),
            "per_call": requests / max(1, len(call_ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1, help="calls set up at once (1: the latency of one call)")
    parser.add_argument("--forks", type=int, default=2, choices=(1, 2))
    parser.add_argument("--real-calls", type=int, default=40, help="calls placed on a real Asterisk (each lasts ~1 s)")
    parser.add_argument("--fake-only", action="store_true", help="skip the real Asterisk even when available")
    args = parser.parse_args()
    from controller.localstack.asterisk import asterisk_binary

    workdir = Path(tempfile.mkdtemp(prefix="callfabric-bench-media-"))
    redis = RedisServer(workdir).start()
    try:
        result, target = asyncio.run(run(args, redis.url)), "fake"
        binary = asterisk_binary()
        if binary and not args.fake_only:
            result, target = asyncio.run(run_real(args, redis.url, workdir, binary)), "real"
        elif not binary:
            print("real Asterisk: skipped (no asterisk binary on PATH or CALLFABRIC_ASTERISK)")
        print(f"RESULT fork_start_p50_ms={result['p50']:.1f} fork_start_p95_ms={result['p95']:.1f} "
              f"ari_requests_per_call={result['per_call']:.1f} target={target}")
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
