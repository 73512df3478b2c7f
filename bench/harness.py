"""What the edge benches (bench/edge.py, bench/cost.py) share: the bench policy, controller
processes, the SIPp load with its latency probe, and the CPU every process of a component
uses (from its own /proc/<pid>/stat, not the machine-wide /proc/stat, which the VM
undercounts for bursty processes)."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controller.localstack.kamailio import Kamailio, free_port  # noqa: E402
from controller.localstack.process import stop_group  # noqa: E402
from controller.localstack.sipp import SCENARIOS, SIPP_BIN  # noqa: E402

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def require_tools() -> None:
    for name in ("kamailio", "sipp", "redis-server"):
        if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists()):
            sys.exit(f"{Path(sys.argv[0]).name} needs {name} (bash .ci/install-system-packages)")


def bench_policies(target: Path, pbx_addr: str) -> Path:
    """The example policies (policies/) with their SIP destinations on the PBX stand-in and
    the limits out of the way of a load that comes from one source: every counter and risk
    detector is still read and written on every call, but 127.0.0.1 placing hundreds of
    calls a second is not an attack here."""
    shutil.copytree(ROOT / "policies", target, ignore=shutil.ignore_patterns("tests"))
    for path in target.glob("*.yaml"):
        text = path.read_text()
        for port in ("5080", "5081", "5090"):
            text = text.replace(f"127.0.0.1:{port}", pbx_addr)
        text = text.replace("at_least: 30}", "at_least: 1000000000}")  # the per-source rate cap
        text = re.sub(r"\b(max|min_calls): [0-9]+", r"\1: 1000000000", text)  # 05-security.yaml's detectors
        path.write_text(text)
    return target


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


# ------------------------------------------------------------------ CPU per process

def group_cpu_ticks(pgid: int) -> dict[int, int]:
    """utime + stime (clock ticks, every thread) of each live process in process group `pgid`."""
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp … utime (14th), stime (15th)
            ticks[int(entry)] = int(fields[11]) + int(fields[12])
    return ticks


@dataclass
class Component:
    """A component whose CPU is measured: every process of the process groups it started
    (Kamailio's forked children, a controller, redis-server), each with a role."""
    name: str
    pgids: list[int]
    roles: dict[int, str] = field(default_factory=dict)  # pid -> what the process does

    def ticks(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for pgid in self.pgids:
            out.update(group_cpu_ticks(pgid))
        return out


def kamailio_component(kamailio: Kamailio, name: str = "kamailio") -> Component:
    """Every Kamailio process, named by Kamailio itself (core.psx: "udp receiver child=0 …",
    "timer", "EVAPI Dispatcher" …)."""
    roles = {}
    try:
        for proc in kamailio.jsonrpc("core.psx") or []:
            roles[int(proc["PID"])] = str(proc["DSC"])
    except (RuntimeError, OSError, ValueError, KeyError, TypeError):
        pass
    return Component(name, [kamailio.proc.pid], roles)


def role_group(role: str) -> str:
    """A process role without its instance details, to add up alike processes."""
    role = re.sub(r"\bchild=\d+", "", role)
    role = re.sub(r"\b(sock|rank)=\S+", "", role)
    role = re.sub(r"\budp:\S+|\btcp:\S+|\b\d+\.\d+\.\d+\.\d+(:\d+)?", "", role)
    return re.sub(r"\s+", " ", role).strip(" -:") or "other"


@dataclass
class CpuWindow:
    """CPU used by each component's processes between two snapshots, and the wall time."""
    started: float
    before: dict[str, dict[int, int]]
    ended: float = 0.0
    used: dict[str, dict[int, float]] = field(default_factory=dict)  # component -> pid -> seconds

    @staticmethod
    def start(components: list[Component]) -> "CpuWindow":
        return CpuWindow(time.time(), {c.name: c.ticks() for c in components})

    def stop(self, components: list[Component]) -> "CpuWindow":
        self.ended = time.time()
        for c in components:
            now, before = c.ticks(), self.before.get(c.name, {})
            self.used[c.name] = {pid: (t - before.get(pid, 0)) * TICK_S for pid, t in now.items()}
        return self

    def seconds(self, name: str) -> float:
        return sum(self.used.get(name, {}).values())


# ------------------------------------------------------------------ controllers

def stop_all(things: list) -> None:
    """Stop what a bench started, the last started first; one that will not stop is reported
    and the others are still stopped."""
    for thing in reversed(things):
        try:
            thing.stop()
        except Exception as exc:  # noqa: BLE001
            print(f"could not stop {thing!r}: {exc}", file=sys.stderr)
    things.clear()


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


class ControllerProcess:
    """`count` controller processes sharing the work (Kamailio sends each decide to one of
    them, round robin), like a scaled-out deployment."""

    def __init__(self, workdir: Path, policy_dir: Path, redis_url: str, kamailio: Kamailio, count: int = 1,
                 name: str = "bench", extra: dict | None = None):
        self.kamailio = kamailio
        self.configs, self.https = [], []
        for index in range(count):
            config, http = workdir / f"{name}-controller-{index}.yaml", f"127.0.0.1:{free_port()}"
            config.write_text(json.dumps({
                "policy_dir": str(policy_dir), "redis_url": redis_url,
                "edge_evapi": [f"127.0.0.1:{kamailio.evapi_port}"],
                "edge_rpc": [f"http://127.0.0.1:{kamailio.http_port}/RPC"],
                "edge_policy_file": str(kamailio.edge_policy or ""),
                "edge_policy_key_file": str(kamailio.edge_policy_key or ""),
                "edge_streams": [kamailio.edge_name],  # (read only when the edge writes it: EVENTS_REDIS)
                "http_listen": http, "log_level": "WARNING", "instance_id": f"{name}-{index}", **(extra or {})}))
            self.configs.append(config)
            self.https.append(http)
        self.log = workdir / f"{name}-controller.log"
        self.procs: list[subprocess.Popen] = []

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.procs[0] if self.procs else None

    def start(self) -> "ControllerProcess":
        with open(self.log, "ab") as log:
            self.procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
                          for config in self.configs]
        wait_clients(self.kamailio, len(self.procs))
        deadline = time.monotonic() + 20
        while self.kamailio.edge_policy is not None and not self.kamailio.edge_policy.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not write {self.kamailio.edge_policy}")
            time.sleep(0.05)
        return self

    def stop(self, wait_gone: bool = False) -> None:
        for proc in self.procs:
            stop_group(proc, 15)
        self.procs = []
        if wait_gone:
            wait_clients(self.kamailio, 0)

    def component(self, name: str = "controller") -> Component:
        return Component(name, [p.pid for p in self.procs], {p.pid: f"controller {i}" for i, p in enumerate(self.procs)})

    def metrics(self) -> str:
        """Every controller's /metrics, one after the other."""
        texts = []
        for http in self.https:
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as r:
                texts.append(r.read().decode())
        return "\n".join(texts)


def metric_sum(metrics: str, name: str) -> float:
    """The sum of a metric over its label sets (0 before the first increment); a name the
    controllers do not export is an error, not 0."""
    if f"# TYPE {name} " not in metrics and f"# TYPE {name.removesuffix('_total')} " not in metrics:
        raise LookupError(f"the controllers export no metric {name}")
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


# ------------------------------------------------------------------ SIPp load

def _sipp(kamailio: Kamailio, run_dir: Path, name: str, rate: int, count: int, hold_ms: int, inf: Path,
          budget_s: float, trace: bool) -> tuple[list[str], Path]:
    scenario = run_dir / f"{name}.xml"
    scenario.write_text((SCENARIOS / "uac_bench.xml").read_text().replace("@@HOLD_MS@@", str(hold_ms)))
    cmd = [SIPP_BIN, f"127.0.0.1:{kamailio.sip_port}", "-sf", str(scenario), "-inf", str(inf),
           "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-t", "u1",
           "-r", str(rate), "-rp", "1000", "-m", str(count), "-l", str(max(200, rate * (1 + hold_ms // 1000) * 2)),
           "-timeout", f"{int(budget_s)}s", "-timeout_error", "-nostdin", "-recv_timeout", "5000",
           "-trace_stat", "-stf", str(run_dir / f"{name}-stat.csv"), "-fd", "1",
           "-trace_err", "-error_file", str(run_dir / f"{name}-errors.log")]
    if trace:
        cmd += ["-trace_msg", "-message_file", str(run_dir / f"{name}-messages.log")]
    return cmd, run_dir / f"{name}-stat.csv"


def _stat_rows(stat: Path) -> list[dict[str, str]]:
    rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def _counts(stat: Path) -> tuple[int, int]:
    last = _stat_rows(stat)[-1]
    return int(last["SuccessfulCall(C)"]), int(last["FailedCall(C)"])


def calls_created_between(stat: Path, start: float, end: float) -> float:
    """Calls SIPp placed between two wall-clock times, interpolated from its once-a-second
    cumulative statistics (the CurrentTime column ends with the Unix time)."""
    points = [(float(row["CurrentTime"].split("\t")[-1]), int(row["TotalCallCreated"])) for row in _stat_rows(stat)]

    def at(t: float) -> float:
        if not points or t <= points[0][0]:
            return float(points[0][1]) if points else 0.0
        for (t0, c0), (t1, c1) in zip(points, points[1:]):
            if t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return float(points[-1][1])
    return at(end) - at(start)


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
             probe_rate: int, *, cpu_of: list[Component] | None = None,
             window: tuple[float, float] | None = None) -> dict:
    """The load (SIPp at `rate`, counted) plus, at the same time, a low-rate probe SIPp whose
    µs-stamped message trace gives the setup latency of calls placed under that load.

    With `cpu_of` and `window` (seconds after the start, inside the load), the CPU those
    components use in that window of steady load is measured, with the calls both SIPps
    placed in it ("cpu": CpuWindow, "window_calls")."""
    run_dir = workdir / f"load-{time.monotonic_ns()}"
    run_dir.mkdir()
    budget_s = count / rate * 3 + hold_ms / 1000 + 15
    load_cmd, load_stat = _sipp(kamailio, run_dir, "load", rate, count, hold_ms, inf, budget_s, trace=False)
    probe_count = max(20, int(probe_rate * count / rate))
    probe_cmd, probe_stat = _sipp(kamailio, run_dir, "probe", probe_rate, probe_count, hold_ms, probe_inf, budget_s,
                                  trace=True)
    started = time.monotonic()
    load = subprocess.Popen(load_cmd, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = subprocess.Popen(probe_cmd, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu = None
    try:
        if cpu_of and window:
            time.sleep(max(0.0, started + window[0] - time.monotonic()))
            cpu = CpuWindow.start(cpu_of)
            time.sleep(max(0.0, started + window[1] - time.monotonic()))
            cpu.stop(cpu_of)
        load.wait(timeout=budget_s + 30)
        elapsed = time.monotonic() - started
        probe.wait(timeout=budget_s + 30)
    finally:
        for proc in (load, probe):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    successful, failed = _counts(load_stat)
    call_time = elapsed - hold_ms / 1000
    run = {"rc": load.returncode, "successful": successful, "failed": failed, "elapsed": elapsed,
           "achieved_cps": successful / call_time if call_time > 0 else 0.0,
           "setups": setup_times_ms(run_dir / "probe-messages.log")}
    if cpu is not None:
        run["cpu"] = cpu
        run["window_calls"] = (calls_created_between(load_stat, cpu.started, cpu.ended)
                               + calls_created_between(probe_stat, cpu.started, cpu.ended))
    return run
