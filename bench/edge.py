"""Call setup through the real edge: SIPp → Kamailio (kamailio/kamailio.cfg, tlsf) → SIPp
media-node stand-ins, in two modes interleaved in one run:

- static: no controller connected; the same config routes every call at once to the media
  node set (its no-controller path: one counter check, then the dispatcher);
- controller: the controller in the loop with the example policies in policies/ (real Redis
  writes, dialog events followed to the end of each call). With `--decide edge` (default, the
  shipped configuration) the edge decides the common calls itself with the policy the
  controller writes (edge_policy_file) and the controller records them; with `--decide
  controller` every call is asked over evapi.

For each offered rate (bounded count of calls, every process on 127.0.0.1) it prints success,
failures, achieved rate and setup latency p50/p95 per mode (INVITE sent → 200 OK received, in
µs from the message trace of a low-rate probe SIPp placing calls beside the load), then the ratios and the milliseconds the controller adds.

    python bench/edge.py [--rates 600,2000,4000] [--seconds 4] [--rounds 2] [--hold-ms 0] [--controllers 1]
                         [--decide edge|controller]

Last line: RESULT decide=edge|controller at_cps=… p50_ratio=… p95_ratio=… p50_added_ms=…
p95_added_ms=… max_cps_static=… max_cps_controller=… top_offered_cps=… cps_ratio=…
(ratios and added ms at `at_cps`: 2,000 CPS, or the middle offered rate when 2,000 is not
offered — said in the output too; cps_ratio is `unmeasured` when both modes sustain the top
offered rate, since neither limit was reached).
max_cps_* is the highest offered rate at which ≥ 99.5 % of calls succeeded at ≥ 95 % of the
offered rate with a setup p95 ≤ 100 ms (beyond that the calls are being queued). Controller
runs also print the controller's own decision time (from its histogram, bucket bounds).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (ControllerProcess, bench_policies, bucket_quantile, decision_buckets,  # noqa: E402
                           injection_file, metric_sum, percentile, require_tools, run_load, stop_all)
from controller.localstack.kamailio import Kamailio  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from controller.localstack.sipp import SippUAS  # noqa: E402

REFERENCE_RATE = 2000
# A rate counts as sustained only if calls are still set up promptly: past this p95 the load
# is being queued (SIPp's first INVITE retransmission comes at 500 ms), whatever gets through.
SUSTAINED_P95_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="600,2000,4000")
    parser.add_argument("--seconds", type=float, default=4.0, help="load duration per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="static/controller alternations per rate")
    parser.add_argument("--hold-ms", type=int, default=0, help="how long each call stays up before BYE")
    parser.add_argument("--probe-rate", type=int, default=50, help="CPS of the latency probe running beside the load")
    parser.add_argument("--controllers", type=int, default=1, help="controller processes sharing the decides")
    parser.add_argument("--decide", choices=("edge", "controller"), default="edge",
                        help="edge: the edge decides the common calls itself (edge_policy_file, the shipped "
                             "configuration); controller: every call is asked over evapi")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    require_tools()
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-bench-edge-"))
    things: list = []
    try:
        redis = RedisServer(workdir).start()
        things.append(redis)
        media = [SippUAS(workdir, "uas_answer.xml", f"media{i}").start() for i in (1, 2)]
        pbx = SippUAS(workdir, "uas_answer.xml", "pbx").start()
        things += media + [pbx]
        # one Kamailio per mode: the static one has no policy at all; the controller's one
        # decides the common calls itself when --decide edge (the shipped configuration)
        edge_kw = dict(shm_mb=1024, pkg_mb=16, children=4, fr_timeout_ms=2000, fr_inv_timeout_ms=30000, log_level=1)
        static_kamailio = Kamailio(workdir, {1: [u.addr for u in media]}, name="kamailio-static", **edge_kw).start()
        things.append(static_kamailio)
        kamailio = Kamailio(workdir, {1: [u.addr for u in media]}, name="kamailio-controller",
                            edge_policy=workdir / "edge.policy" if args.decide == "edge" else None, **edge_kw).start()
        things.append(kamailio)
        policy_dir = bench_policies(workdir / "policies", pbx.addr)
        controller = ControllerProcess(workdir, policy_dir, redis.url, kamailio, args.controllers)
        things.append(controller)
        rng = random.Random(11)
        results: dict[tuple[int, str], list[dict]] = {}
        print(f"edge bench: decided at the {args.decide}; rates {rates} CPS, {args.seconds:g}s per run, "
              f"{args.rounds} round(s), hold {args.hold_ms} ms; "
              f"work dir {workdir}", flush=True)
        for rate in rates:
            count = int(rate * args.seconds)
            for round_no in range(args.rounds):
                order = ("static", "controller") if round_no % 2 == 0 else ("controller", "static")
                for mode in order:
                    if mode == "controller" and controller.proc is None:
                        controller.start()
                    elif mode == "static" and controller.proc is not None:
                        controller.stop(wait_gone=True)
                    inf = workdir / f"calls-{rate}-{round_no}-{mode}.csv"
                    injection_file(inf, min(count, 20000), rng)
                    probe_inf = workdir / f"probe-{rate}-{round_no}-{mode}.csv"
                    injection_file(probe_inf, 1000, rng)
                    metrics_before = controller.metrics() if mode == "controller" else ""
                    before = decision_buckets(metrics_before) if mode == "controller" else None
                    target = kamailio if mode == "controller" else static_kamailio
                    run = run_load(workdir, target, rate, count, args.hold_ms, inf, probe_inf, args.probe_rate,
                                   cpu_of=[controller.component()] if mode == "controller" else None,
                                   window=(0.0, count / rate))
                    results.setdefault((rate, mode), []).append(run)
                    inside = ""
                    if before is not None:
                        time.sleep(0.5)  # the last calls' records and dialog events
                        metrics_after = controller.metrics()
                        after = decision_buckets(metrics_after)
                        delta = [(le, after.get(le, 0) - before.get(le, 0)) for le in sorted(after)]
                        cpu_us = run["cpu"].seconds("controller") * 1e6 / max(1.0, run["window_calls"])
                        at_edge = (metric_sum(metrics_after, "callfabric_edge_made_decisions_total")
                                   - metric_sum(metrics_before, "callfabric_edge_made_decisions_total"))
                        recorded = (metric_sum(metrics_after, "callfabric_decisions_total")
                                    - metric_sum(metrics_before, "callfabric_decisions_total"))
                        inside = (f"  decided at the edge {at_edge:.0f}/{recorded:.0f} recorded; asked: p50 "
                                  f"≤{bucket_quantile(delta, .5)} ms p99 ≤{bucket_quantile(delta, .99)} ms; "
                                  f"controller {cpu_us:.0f} µs CPU/call")
                    print(f"  {rate:>5} CPS {mode:<10} ok {run['successful']:>6} failed {run['failed']:>5} "
                          f"achieved {run['achieved_cps']:7.0f} CPS  setup p50 {percentile(run['setups'], .5):6.2f} ms "
                          f"p95 {percentile(run['setups'], .95):6.2f} ms{inside}", flush=True)
        if controller.proc is not None:
            decisions = sum(float(line.rsplit(" ", 1)[1]) for line in controller.metrics().splitlines()
                            if line.startswith("callfabric_decisions_total{"))
            print(f"  controller decisions answered in its last session: {decisions:.0f}")
        controller.stop()

        print("\nrate    mode        success   failed   p50 ms   p95 ms")
        summary: dict[tuple[int, str], dict] = {}
        for (rate, mode), runs in sorted(results.items()):
            ok = sum(r["successful"] for r in runs)
            failed = sum(r["failed"] for r in runs)
            offered = int(rate * args.seconds) * len(runs)
            setups = [s for r in runs for s in r["setups"]]
            achieved = min(r["achieved_cps"] for r in runs)
            summary[(rate, mode)] = {"p50": percentile(setups, .5), "p95": percentile(setups, .95),
                                     "sustained": ok >= 0.995 * offered and failed <= 0.005 * offered
                                     and achieved >= 0.95 * rate and percentile(setups, .95) <= SUSTAINED_P95_MS}
            print(f"{rate:>5}   {mode:<10} {ok:>8} {failed:>8}   {summary[(rate, mode)]['p50']:6.2f}   "
                  f"{summary[(rate, mode)]['p95']:6.2f}   {'sustained' if summary[(rate, mode)]['sustained'] else 'NOT sustained'}")
        reference = REFERENCE_RATE if (REFERENCE_RATE, "static") in summary else rates[len(rates) // 2]
        if reference != REFERENCE_RATE:
            print(f"\n{REFERENCE_RATE} CPS was not offered: the ratios below are taken at {reference} CPS")
        s, c = summary[(reference, "static")], summary[(reference, "controller")]
        max_static = max([r for r in rates if summary[(r, "static")]["sustained"]], default=0)
        max_controller = max([r for r in rates if summary[(r, "controller")]["sustained"]], default=0)
        p50_ratio, p95_ratio = c["p50"] / s["p50"], c["p95"] / s["p95"]
        print(f"\nat {reference} CPS: controller adds {c['p50'] - s['p50']:.2f} ms at p50 (x{p50_ratio:.2f}), "
              f"{c['p95'] - s['p95']:.2f} ms at p95 (x{p95_ratio:.2f})")
        top = max(rates)
        # both modes sustaining the top offered rate means neither limit was found: no ratio
        if max_static == top and max_controller == top:
            cps_ratio = "unmeasured"
            print(f"both modes sustained the top offered rate ({top} CPS): their limits (and cps_ratio) are "
                  f"above it; offer higher --rates to measure them")
        else:
            cps_ratio = f"{max_controller / max_static:.2f}" if max_static else "unmeasured"
        ratio_goal = ("unmeasured" if cps_ratio == "unmeasured"
                      else "met" if max_controller / max_static >= 0.9 else "NOT met")
        print(f"goal p95_added_ms <= 1.0: {'met' if c['p95'] - s['p95'] <= 1.0 else 'NOT met'}; "
              f"goal cps_ratio >= 0.9: {ratio_goal}")
        print(f"RESULT decide={args.decide} at_cps={reference} p50_ratio={p50_ratio:.2f} p95_ratio={p95_ratio:.2f} "
              f"p50_added_ms={c['p50'] - s['p50']:.2f} p95_added_ms={c['p95'] - s['p95']:.2f} "
              f"max_cps_static={max_static} max_cps_controller={max_controller} top_offered_cps={top} "
              f"cps_ratio={cps_ratio}")
    finally:
        stop_all(things)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
