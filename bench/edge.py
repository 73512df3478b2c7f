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

Last line: RESULT p50_ratio=… p95_ratio=… p50_added_ms=… p95_added_ms=… max_cps_static=…
max_cps_controller=… cps_ratio=… (ratios and added ms at the reference rate, 2,000 CPS).
max_cps_* is the highest offered rate at which ≥ 99.5 % of calls succeeded at ≥ 95 % of the
offered rate with a setup p95 ≤ 100 ms (beyond that the calls are being queued). Controller
runs also print the controller's own decision time (from its histogram, bucket bounds).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.localstack.kamailio import Kamailio, free_port  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from controller.localstack.sipp import SCENARIOS, SIPP_BIN, SippUAS  # noqa: E402

REFERENCE_RATE = 2000
# A rate counts as sustained only if calls are still set up promptly: past this p95 the load
# is being queued (SIPp's first INVITE retransmission comes at 500 ms), whatever gets through.
SUSTAINED_P95_MS = 100.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def injection_file(path: Path, count: int, rng: random.Random) -> None:
    """Dialled number;caller per call: general numbers (intake or its A/B variant), the billing
    and support lines, VIP callers (to the PBX stand-in). No rejected destinations: every call
    of the mix must be answerable."""
    rows = ["RANDOM"]
    for _ in range(count):
        roll = rng.random()
        caller = f"+1202555{rng.randrange(10000):04d}"
        if roll < 0.70:
            dialled = f"1800555{rng.randrange(1000, 9999):04d}"
        elif roll < 0.85:
            dialled = rng.choice(["18005550101", "18005550102"])
        elif roll < 0.95:
            dialled = "18005550201"
        else:
            dialled, caller = "18005550000", rng.choice(["+14155550100", "+14155550101"])
        rows.append(f"{dialled};{caller};")
    path.write_text("\n".join(rows) + "\n")


class ControllerProcess:
    """`count` controller processes sharing the work (Kamailio sends each decide to one of
    them, round robin), like a scaled-out deployment."""

    def __init__(self, workdir: Path, policy_dir: Path, redis_url: str, kamailio: Kamailio, count: int = 1):
        self.configs, self.https = [], []
        for index in range(count):
            config, http = workdir / f"controller-{index}.yaml", f"127.0.0.1:{free_port()}"
            config.write_text(json.dumps({
                "policy_dir": str(policy_dir), "redis_url": redis_url,
                "edge_evapi": [f"127.0.0.1:{kamailio.evapi_port}"],
                "edge_rpc": [f"http://127.0.0.1:{kamailio.http_port}/RPC"],
                "edge_policy_file": str(kamailio.edge_policy or ""),
                "http_listen": http, "log_level": "WARNING", "instance_id": f"bench-{index}"}))
            self.configs.append(config)
            self.https.append(http)
        self.log = workdir / "controller.log"
        self.procs: list[subprocess.Popen] = []

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.procs[0] if self.procs else None

    def start(self, kamailio: Kamailio) -> None:
        with open(self.log, "ab") as log:
            self.procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
                          for config in self.configs]
        wait_clients(kamailio, len(self.procs))
        deadline = time.monotonic() + 20
        while kamailio.edge_policy is not None and not kamailio.edge_policy.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not write {kamailio.edge_policy}")
            time.sleep(0.05)

    def stop(self, kamailio: Kamailio | None = None) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []
        if kamailio:
            wait_clients(kamailio, 0)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the controller processes have used so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for proc in self.procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def metrics(self) -> str:
        """Every controller's /metrics, one after the other."""
        texts = []
        for http in self.https:
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as r:
                texts.append(r.read().decode())
        return "\n".join(texts)


def metric_sum(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


def decision_buckets(metrics: str) -> dict[float, float]:
    """The controllers' decision-duration histogram: cumulative count per bucket bound (ms)."""
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("callfabric_decision_duration_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            bound_ms = float("inf") if bound == "+Inf" else float(bound) * 1000
            buckets[bound_ms] = buckets.get(bound_ms, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(cumulative: list[tuple[float, float]], q: float) -> str:
    """The bound of the first bucket holding the q-quantile (an upper bound, in ms)."""
    total = cumulative[-1][1] if cumulative else 0
    for bound, count in cumulative:
        if total and count >= q * total:
            return f"{bound:g}"
    return "?"


def wait_clients(kamailio: Kamailio, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(kamailio.http_get("/health")[1]).get("evapi_clients") == n:
                return
        except (ValueError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"kamailio did not reach {n} evapi client(s)")


def _sipp(kamailio: Kamailio, run_dir: Path, name: str, rate: int, count: int, hold_ms: int, inf: Path,
          budget_s: float, trace: bool) -> tuple[list[str], Path]:
    scenario = run_dir / f"{name}.xml"
    scenario.write_text((SCENARIOS / "uac_bench.xml").read_text().replace("@@HOLD_MS@@", str(hold_ms)))
    cmd = [SIPP_BIN, f"127.0.0.1:{kamailio.sip_port}", "-sf", str(scenario), "-inf", str(inf),
           "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-t", "u1",
           "-r", str(rate), "-rp", "1000", "-m", str(count), "-l", str(max(200, rate)),
           "-timeout", f"{int(budget_s)}s", "-timeout_error", "-nostdin", "-recv_timeout", "5000",
           "-trace_stat", "-stf", str(run_dir / f"{name}-stat.csv"), "-fd", "1",
           "-trace_err", "-error_file", str(run_dir / f"{name}-errors.log")]
    if trace:
        cmd += ["-trace_msg", "-message_file", str(run_dir / f"{name}-messages.log")]
    return cmd, run_dir / f"{name}-stat.csv"


def _counts(stat: Path) -> tuple[int, int]:
    rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
    col = {name: i for i, name in enumerate(rows[0])}
    return int(rows[-1][col["SuccessfulCall(C)"]]), int(rows[-1][col["FailedCall(C)"]])


_TRACE_HEAD = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d) (\d\d):(\d\d):(\d\d\.\d+)\n(UDP message (sent|received))", re.M)


def setup_times_ms(messages: Path) -> list[float]:
    """INVITE sent → 200 OK (INVITE) received, per call, from SIPp's µs-stamped message trace."""
    text = messages.read_text(errors="replace")
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    heads = list(_TRACE_HEAD.finditer(text))
    for i, head in enumerate(heads):
        body = text[head.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        stamp = int(head.group(2)) * 3600 + int(head.group(3)) * 60 + float(head.group(4))
        call_id = re.search(r"^Call-ID:\s*(\S+)", body, re.M)
        if not call_id:
            continue
        call_id = call_id.group(1)
        first = body.split("\n", 1)[-1].lstrip("\r\n").split("\n", 1)[0]
        if head.group(6) == "sent" and first.startswith("INVITE "):
            sent.setdefault(call_id, stamp)
        elif head.group(6) == "received" and first.startswith("SIP/2.0 200") and re.search(r"^CSeq:\s*\d+ INVITE", body, re.M):
            answered.setdefault(call_id, stamp)
    return [(answered[c] - sent[c]) * 1000 for c in answered if c in sent and answered[c] >= sent[c]]


def run_load(workdir: Path, kamailio: Kamailio, rate: int, count: int, hold_ms: int, inf: Path, probe_inf: Path,
             probe_rate: int) -> dict:
    """The load (SIPp at `rate`, counted) plus, at the same time, a low-rate probe SIPp whose
    µs-stamped message trace gives the setup latency of calls placed under that load."""
    run_dir = workdir / f"load-{time.monotonic_ns()}"
    run_dir.mkdir()
    budget_s = count / rate * 3 + 15
    load_cmd, load_stat = _sipp(kamailio, run_dir, "load", rate, count, hold_ms, inf, budget_s, trace=False)
    probe_count = max(20, int(probe_rate * count / rate))
    probe_cmd, _ = _sipp(kamailio, run_dir, "probe", probe_rate, probe_count, hold_ms, probe_inf, budget_s, trace=True)
    started = time.monotonic()
    load = subprocess.Popen(load_cmd, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = subprocess.Popen(probe_cmd, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load.wait(timeout=budget_s + 30)
    elapsed = time.monotonic() - started
    probe.wait(timeout=budget_s + 30)
    successful, failed = _counts(load_stat)
    call_time = elapsed - hold_ms / 1000
    return {"rc": load.returncode, "successful": successful, "failed": failed, "elapsed": elapsed,
            "achieved_cps": successful / call_time if call_time > 0 else 0.0,
            "setups": setup_times_ms(run_dir / "probe-messages.log")}


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
    for name in ("kamailio", "sipp", "redis-server"):
        if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists()):
            sys.exit(f"bench/edge.py needs {name} (bash .ci/install-system-packages)")
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
        policy_dir = workdir / "policies"
        shutil.copytree(ROOT / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
        for path in policy_dir.glob("*.yaml"):
            text = path.read_text()
            for port in ("5080", "5081", "5090"):
                text = text.replace(f"127.0.0.1:{port}", pbx.addr)
            # every bench call comes from 127.0.0.1: keep the per-source rate cap rule (its
            # counters are read and written on every call) but out of the way of the load
            text = text.replace("at_least: 30}", "at_least: 1000000000}")
            # likewise the risk detectors (05-security.yaml): every call is scored (counters
            # read, spikes / distinct callees counted) but one busy source is not an attack here
            text = re.sub(r"\b(max|min_calls): [0-9]+", r"\1: 1000000000", text)
            path.write_text(text)
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
                        controller.start(kamailio)
                    elif mode == "static" and controller.proc is not None:
                        controller.stop(kamailio)
                    inf = workdir / f"calls-{rate}-{round_no}-{mode}.csv"
                    injection_file(inf, min(count, 20000), rng)
                    probe_inf = workdir / f"probe-{rate}-{round_no}-{mode}.csv"
                    injection_file(probe_inf, 1000, rng)
                    metrics_before = controller.metrics() if mode == "controller" else ""
                    before = decision_buckets(metrics_before) if mode == "controller" else None
                    cpu_before = controller.cpu_seconds() if mode == "controller" else 0.0
                    target = kamailio if mode == "controller" else static_kamailio
                    run = run_load(workdir, target, rate, count, args.hold_ms, inf, probe_inf, args.probe_rate)
                    results.setdefault((rate, mode), []).append(run)
                    inside = ""
                    if before is not None:
                        time.sleep(0.5)  # the last calls' records and dialog events
                        metrics_after = controller.metrics()
                        after = decision_buckets(metrics_after)
                        delta = [(le, after.get(le, 0) - before.get(le, 0)) for le in sorted(after)]
                        cpu_us = (controller.cpu_seconds() - cpu_before) * 1e6 / max(1, run["successful"])
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
        s, c = summary[(reference, "static")], summary[(reference, "controller")]
        max_static = max([r for r in rates if summary[(r, "static")]["sustained"]], default=0)
        max_controller = max([r for r in rates if summary[(r, "controller")]["sustained"]], default=0)
        p50_ratio, p95_ratio = c["p50"] / s["p50"], c["p95"] / s["p95"]
        print(f"\nat {reference} CPS: controller adds {c['p50'] - s['p50']:.2f} ms at p50 (x{p50_ratio:.2f}), "
              f"{c['p95'] - s['p95']:.2f} ms at p95 (x{p95_ratio:.2f})")
        print(f"goal p95_added_ms <= 1.0: {'met' if c['p95'] - s['p95'] <= 1.0 else 'NOT met'}; "
              f"goal cps_ratio >= 0.9: {'met' if max_static and max_controller / max_static >= 0.9 else 'NOT met'}")
        print(f"RESULT p50_ratio={p50_ratio:.2f} p95_ratio={p95_ratio:.2f} p50_added_ms={c['p50'] - s['p50']:.2f} "
              f"p95_added_ms={c['p95'] - s['p95']:.2f} max_cps_static={max_static} max_cps_controller={max_controller} "
              f"cps_ratio={(max_controller / max_static) if max_static else 0:.2f}")
    finally:
        for thing in reversed(things):
            try:
                thing.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"could not stop {thing!r}: {exc}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
