"""Instructions per call in each Kamailio process (and redis-server), static routing against
the edge's own decisions: a deterministic companion to bench/cost.py, whose CPU times move
±30 % with whatever else runs on the machine.

Kamailio (and, with --redis, redis-server) runs under valgrind's callgrind, twice per mode:
a warm-up, then a bounded number of calls at a low rate (the same SIPp load and call mix as
bench/cost.py, calls held, then BYE) or none, then idle until the same wall time; each
process's instructions at exit, the run with calls minus the run without, divided by the
calls. (callgrind_control cannot reach Kamailio's forked children: valgrind's gdbserver is
not active after fork.) The same request mix gives nearly the same counts run after run: a
change's effect is seen without the machine's noise. What instruction
counts do not see: cache misses (a cold interpreter costs more time per instruction), so
bench/cost.py stays the measure of what a call costs; this one says where it goes.

    python bench/instructions.py [--calls 400] [--rate 20] [--modes static,edge] [--redis]
                                 [--top 30] [--inclusive] [--keep]

Per mode: instructions per call of each Kamailio role (SIP workers, the event writer's
rtimer, timers …) and of Redis, then (--top) the functions of the SIP workers costing most,
from callgrind_annotate: their own instructions (self cost), or with --inclusive what they
and their callees cost (then mostly call-stack frames: main, run_actions …). Last line: RESULT edge_sip_worker_ir_per_call=…
static_sip_worker_ir_per_call=… worker_ratio=… kamailio_ratio=… redis_ir_per_call=…
"""
from __future__ import annotations

import argparse
import compileall
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (ROOT, ControllerProcess, bench_policies, injection_file,  # noqa: E402
                           require_tools, role_group, run_load, stop_all)
from controller.localstack.kamailio import Kamailio  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from controller.localstack.sipp import SippUAS  # noqa: E402

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_ANNOTATE = shutil.which("callgrind_annotate") or "/usr/bin/callgrind_annotate"


def _callgrind(out_dir: Path, name: str) -> list[str]:
    return [VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out_dir}/{name}.%p",
            "--dump-instr=no", "--collect-jumps=no", "--separate-threads=no"]


class CallgrindKamailio(Kamailio):
    """Kamailio run under callgrind (every forked process writes its own file)."""

    def __init__(self, *args, out_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir

    def command(self) -> list[str]:
        return _callgrind(self.out_dir, "kamailio") + super().command()


class CallgrindRedis(RedisServer):
    def __init__(self, *args, out_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir

    def command(self) -> list[str]:
        return _callgrind(self.out_dir, "redis") + super().command()


def totals(out_dir: Path, prefix: str) -> dict[int, tuple[Path, int]]:
    """pid -> (its callgrind file, written at exit, and the instructions in it)."""
    found: dict[int, tuple[Path, int]] = {}
    for path in out_dir.glob(f"{prefix}.*"):
        match = re.fullmatch(rf"{prefix}\.(\d+)", path.name)
        total = re.search(r"^(?:summary|totals):\s*(\d+)", path.read_text(errors="replace"), re.M) if match else None
        if total:
            found[int(match.group(1))] = (path, int(total.group(1)))
    return found


def run_once(mode: str, calls: int, args, workdir: Path, media, policy_dir: Path) -> dict:
    """One Kamailio (and Redis, controller) under callgrind: `args.warmup` calls, then `calls`
    calls, then idle until the same wall time as every other run of the mode, then stopped
    (callgrind writes each process's counts at its exit). Returns instructions per role, and
    per function (inclusive) of the SIP workers."""
    run_dir = workdir / f"{mode}-{calls}"
    out_dir = run_dir / "callgrind"
    out_dir.mkdir(parents=True)
    things: list = []
    try:
        redis = (CallgrindRedis(run_dir, out_dir=out_dir) if args.redis and mode != "static"
                 else RedisServer(run_dir)).start(timeout=60)
        things.append(redis)
        kamailio = CallgrindKamailio(
            run_dir, {1: [u.addr for u in media]}, name="kamailio", out_dir=out_dir,
            edge_policy=run_dir / "edge.policy" if mode == "edge" else None,
            events_redis=redis.url if mode != "static" else None, edge_name=f"edge-{mode}",
            shm_mb=256, pkg_mb=16, children=args.children, fr_timeout_ms=5000, fr_inv_timeout_ms=30000,
            decision_timeout_ms=2000, log_level=1)
        kamailio.start(timeout=300)
        things.append(kamailio)
        if mode != "static":
            controller = ControllerProcess(run_dir, policy_dir, redis.url, kamailio, name=mode)
            things.append(controller)
            controller.start()
        roles = {int(p["PID"]): str(p["DSC"]) for p in kamailio.jsonrpc("core.psx") or []}

        def load(count: int, seed: int) -> dict:
            inf, probe_inf = run_dir / f"calls-{count}.csv", run_dir / f"probe-{count}.csv"
            injection_file(inf, count, random.Random(seed))
            injection_file(probe_inf, 20, random.Random(seed + 1))
            return run_load(run_dir, kamailio, args.rate, count, args.hold_ms, inf, probe_inf, 1)

        load(args.warmup, 1)  # every worker's interpreter and policy loaded
        started = time.monotonic()
        failed = load(calls, 2)["failed"] if calls else 0
        # the same wall time whatever the calls: time-driven work (timers) cancels out
        time.sleep(max(0.0, started + args.calls / args.rate + args.hold_ms / 1000 + 15 - time.monotonic()))
        for thing in reversed(things):
            thing.stop()
        things.clear()
        time.sleep(1)
        per_role: dict[str, float] = {}
        sip_files: list[Path] = []
        for pid, (path, ir) in totals(out_dir, "kamailio").items():
            role = role_group(roles.get(pid, "main"))
            per_role[role] = per_role.get(role, 0.0) + ir
            if role.startswith("udp receiver"):
                sip_files.append(path)
        if args.redis and mode != "static":
            per_role["redis"] = sum(ir for _, ir in totals(out_dir, "redis").values())
        return {"roles": per_role, "functions": functions(sip_files, args.inclusive) if args.top else {},
                "failed": failed}
    finally:
        stop_all(things)


def functions(files: list[Path], inclusive: bool) -> dict[str, int]:
    """Instructions per function (self cost, or inclusive), added up over the SIP workers'
    files (callgrind_annotate reads one file at a time)."""
    found: dict[str, int] = {}
    for path in files:
        out = subprocess.run([CALLGRIND_ANNOTATE, f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100", str(path)],
                             capture_output=True, text=True, timeout=600).stdout
        for line in out.splitlines():
            match = re.match(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*)$", line)
            if match and match.group(2) != "PROGRAM TOTALS":
                name = re.sub(r"\s*\[[^]]*\]$", "", match.group(2))
                name = re.sub(r"^/tmp/python-build[^:]*/", "python/", name)
                found[name] = found.get(name, 0) + int(match.group(1).replace(",", ""))
    return found


def measure(mode: str, args, workdir: Path, media, policy_dir: Path) -> dict:
    """Instructions per call: a run with the calls minus a run without them (same warm-up,
    same wall time)."""
    idle = run_once(mode, 0, args, workdir, media, policy_dir)
    busy = run_once(mode, args.calls, args, workdir, media, policy_dir)
    calls = args.calls + max(20, int(args.calls / args.rate))  # the load and its probe
    roles = {role: (busy["roles"].get(role, 0) - idle["roles"].get(role, 0)) / calls
             for role in set(busy["roles"]) | set(idle["roles"])}
    top = sorted(((name, (ir - idle["functions"].get(name, 0)) / calls) for name, ir in busy["functions"].items()),
                 key=lambda kv: -kv[1])[:args.top]
    return {"calls": calls, "failed": busy["failed"], "roles": roles, "top": top,
            "redis": roles.pop("redis", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="measured calls per mode")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured calls first")
    parser.add_argument("--rate", type=int, default=20, help="calls per second (callgrind is ~50x slower)")
    parser.add_argument("--hold-ms", type=int, default=1000)
    parser.add_argument("--children", type=int, default=4, help="SIP workers (CHILDREN)")
    parser.add_argument("--modes", default="static,edge")
    parser.add_argument("--redis", action="store_true", help="redis-server under callgrind too (not static)")
    parser.add_argument("--top", type=int, default=0, help="show the SIP workers' N costliest functions (self cost)")
    parser.add_argument("--inclusive", action="store_true", help="--top counts what each function's callees cost too")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (the callgrind files)")
    args = parser.parse_args()
    require_tools()
    for tool in (VALGRIND, CALLGRIND_ANNOTATE):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing (apt-get install valgrind)")
    modes = [m for m in ("static", "edge") if m in args.modes.split(",")]
    os.environ["PYTHONHASHSEED"] = "0"  # (Kamailio's embedded Python: the same work each run)
    # every Kamailio process imports callfabric at start: with stale or missing .pyc files the
    # first run compiles them (in each process: ~100M instructions) and the next does not,
    # which the subtraction would count as calls' work
    for package in ("controller", "kamailio"):
        compileall.compile_dir(str(ROOT / package), quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-bench-ir-"))
    things: list = []
    results: dict[str, dict] = {}
    try:
        media = [SippUAS(workdir, "uas_answer.xml", f"media{i}").start() for i in (1, 2)]
        pbx = SippUAS(workdir, "uas_answer.xml", "pbx").start()
        things += media + [pbx]
        policy_dir = bench_policies(workdir / "policies", pbx.addr)
        print(f"instructions bench: {args.calls} calls at {args.rate} CPS per mode under callgrind, "
              f"{args.children} SIP workers; work dir {workdir}", flush=True)
        for mode in modes:
            r = results[mode] = measure(mode, args, workdir, media, policy_dir)
            roles = ", ".join(f"{role} {ir / 1e3:.0f}k" for role, ir in sorted(r["roles"].items(), key=lambda kv: -kv[1])
                              if ir >= 1000)
            print(f"{mode:<7} calls {r['calls']} (failed {r['failed']})  instructions/call: kamailio "
                  f"{sum(r['roles'].values()) / 1e3:.0f}k ({roles})"
                  + (f", redis {r['redis'] / 1e3:.0f}k" if args.redis and mode != "static" else ""), flush=True)
            for name, ir in r["top"]:
                print(f"    {ir / 1e3:9.1f}k  {name}")
        if "static" in results and "edge" in results:
            def worker(mode: str) -> float:
                return sum(ir for role, ir in results[mode]["roles"].items() if role.startswith("udp receiver"))
            s_all, e_all = (sum(results[m]["roles"].values()) for m in ("static", "edge"))
            print(f"RESULT edge_sip_worker_ir_per_call={worker('edge'):.0f} "
                  f"static_sip_worker_ir_per_call={worker('static'):.0f} worker_ratio={worker('edge') / worker('static'):.2f} "
                  f"kamailio_ratio={e_all / s_all:.2f} redis_ir_per_call={results['edge']['redis']:.0f}")
    finally:
        stop_all(things)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
