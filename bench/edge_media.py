"""What anchoring media at the edge costs, and what forks made at the edge gain, measured from
outside on one stack: real Redis, Kamailio (RTPENGINE_SOCK), rtpengine (userspace), a controller
process (`callfabric run`), and a media node — a real Asterisk when one is found (PATH or
CALLFABRIC_ASTERISK), else callfabric's stand-in media node (ARI emulator + echoing SIP side).

    python3 bench/edge_media.py [--rounds 4] [--hold-s 5] [--load-calls 20] [--load-s 10]

1. anchoring: the same calls to an echoing SIP endpoint, with and without rtpengine in the path
   (the policy's anchor_media per called number), interleaved. The caller sends 1 kHz tone
   bursts in silence (bench/media.py's probe: onsets found back sample-accurately, validated on
   a direct UDP path first); the one-way time caller → echo endpoint is measured at the endpoint,
   the round trip at the caller. Prints p50/p95 of each mode and the difference (added by the
   anchor, one way).
2. rtpengine's CPU: `--load-calls` anchored calls held together; rtpengine's own CPU (utime +
   stime of its process, /proc/<pid>/stat) over a window of `--load-s` seconds with every call
   up, per call and second of call (and idle, the same window with no call, printed apart).
3. forks: calls to an echo agent with a fork of the caller's audio, made at the edge (fork_mode
   edge: rtpengine copies the caller's packets) then with an Asterisk snoop (fork_mode snoop:
   needs the real Asterisk); one way caller → fork target for each.

Last line:
RESULT anchor_added_ms_p95=… rtpengine_cpu_us_per_call_s=… edge_fork_oneway_p95_ms=… snoop_fork_oneway_p95_ms=…
(snoop n/a without an Asterisk). Everything runs on 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import Component, ControllerProcess, CpuWindow, percentile  # noqa: E402
from bench.media import BURST_EVERY, Ear, Mouth, Peer, fmt, latencies_ms, probe_baseline, stats  # noqa: E402
from controller.localstack.asterisk import Asterisk, asterisk_binary  # noqa: E402
from controller.localstack.kamailio import Kamailio  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from controller.localstack.rtpengine import Rtpengine  # noqa: E402
from controller.localstack.sip_ua import SipCaller  # noqa: E402
from controller.localstack.standin import StandInMediaNode, StandInUas  # noqa: E402

ANCHORED, DIRECT, LOAD = "+18005550001", "+18005550002", "+18005550003"
FORK_SLOTS = 4


class EchoNode:
    """An echoing SIP endpoint (the stand-in UAS) whose calls' RTP is also timed on arrival."""

    def __init__(self):
        self.uas = StandInUas("echo", on_call=self._call)
        self.ears: dict[str, Ear] = {}

    async def _call(self, dialog) -> None:
        ear = self.ears.setdefault(dialog.call_id, Ear())
        echo = dialog.rtp.datagram_received

        def hear(data: bytes, addr) -> None:
            if len(data) >= 12 and data[0] >> 6 == 2:
                ear.hear(data, time.monotonic())
            echo(data, addr)
        dialog.rtp.datagram_received = hear


class Stack:
    def __init__(self, workdir: Path, binary: str | None):
        self.workdir, self.binary = workdir, binary
        self.redis = RedisServer(workdir).start()
        self.rtpengine = Rtpengine(workdir, ports=2000, log_level=4).start()
        self.kamailio = Kamailio(workdir, {}, extra_defines={"RTPENGINE_SOCK": self.rtpengine.sock})
        self.asterisk = Asterisk(workdir, edge_port=self.kamailio.sip_port, binary=binary) if binary else None
        self.echo = EchoNode()
        self.standin: StandInMediaNode | None = None
        self.controller: ControllerProcess | None = None
        self.agents: list[Peer] = []
        self.sinks: list[Peer] = []
        self.transports = []
        self.policy_dir = workdir / "policy"

    async def start(self) -> None:
        await self.echo.uas.start()
        if self.asterisk is not None:
            await asyncio.to_thread(self.asterisk.start)
            media_node, ari = f"127.0.0.1:{self.asterisk.sip_port}", self.asterisk.ari_node()
        else:
            self.standin = await StandInMediaNode().start()
            media_node, ari = self.standin.sip_addr, self.standin.ari_node()
        self.kamailio.write_dispatcher_list({1: [self.echo.uas.addr], 2: [media_node]})
        await asyncio.to_thread(self.kamailio.start)
        loop = asyncio.get_running_loop()
        ports = []
        for _ in range(FORK_SLOTS):
            pair = []
            for echo in (True, False):
                transport, peer = await loop.create_datagram_endpoint(lambda e=echo: Peer(e),
                                                                      local_addr=("127.0.0.1", 0))
                self.transports.append(transport)
                pair.append((peer, transport.get_extra_info("sockname")[1]))
            self.agents.append(pair[0][0])
            self.sinks.append(pair[1][0])
            ports.append((pair[0][1], pair[1][1]))
        lines = ["settings: {numbering: {country_code: '1', national_prefix: '1'}}",
                 "node_sets: {echo: {dispatcher_set: 1}, media: {dispatcher_set: 2}}",
                 "agents:", "  echo: {node_set: echo, endpoint: '127.0.0.1:9'}"]
        lines += [f"  a{i}: {{node_set: media, endpoint: '127.0.0.1:{a}', codec: ulaw}}" for i, (a, _) in enumerate(ports)]
        lines += ["fork_targets:"]
        lines += [f"  f{i}: {{endpoint: '127.0.0.1:{f}', transport: rtp, codec: ulaw, direction: in}}"
                  for i, (_, f) in enumerate(ports)]
        lines += ["rules:",
                  f"  - {{name: anchored, match: {{ruri: '{ANCHORED}'}}, actions: [route_agent: echo, anchor_media: always]}}",
                  f"  - {{name: direct, match: {{ruri: '{DIRECT}'}}, actions: [route_agent: echo, anchor_media: never]}}",
                  f"  - {{name: load, match: {{ruri: '{LOAD}'}}, actions: [route_agent: echo, anchor_media: always]}}"]
        lines += [f"  - {{name: fork{i}, match: {{ruri: '+1800556{i:04d}'}}, actions: "
                  f"[route_agent: a{i}, fork: f{i}, anchor_media: always]}}" for i in range(FORK_SLOTS)]
        lines += ["default: {actions: [reject: 404]}"]
        self.policy_dir.mkdir()
        (self.policy_dir / "bench.yaml").write_text("\n".join(lines) + "\n")
        self.ari = ari
        await self.restart_controller("edge")

    async def restart_controller(self, fork_mode: str) -> None:
        if self.controller is not None:
            await asyncio.to_thread(self.controller.stop, True)
        self.controller = ControllerProcess(
            self.workdir, self.policy_dir, self.redis.url, self.kamailio, name=f"fork-{fork_mode}",
            extra={"ari_nodes": [self.ari], "rtpengine_ng": [f"127.0.0.1:{self.rtpengine.ng_port}"],
                   "fork_mode": fork_mode})
        await asyncio.to_thread(self.controller.start)
        deadline = time.monotonic() + 20
        while 'callfabric_ari_connected{node="media1"} 1.0' not in await asyncio.to_thread(self.controller.metrics):
            if time.monotonic() > deadline:
                raise RuntimeError("the controller did not connect to the media node's ARI")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for transport in self.transports:
            transport.close()
        self.echo.uas.close()
        if self.standin is not None:
            await self.standin.stop()
        for thing in (self.controller, self.asterisk, self.kamailio, self.rtpengine, self.redis):
            if thing is None:
                continue
            try:
                await asyncio.to_thread(thing.stop)
            except Exception as exc:  # noqa: BLE001 - one stop failing must not leave the others running
                print(f"  warning: stopping {type(thing).__name__}: {exc}")


async def call(stack: Stack, number: str, hold_s: float, phase: int, seed: int, ear: Ear | None = None):
    mouth = Mouth(phase, seed)
    at_caller = ear or Ear()
    result = await SipCaller(stack.kamailio.sip_port).call(number.lstrip("+"), hold_s, payload=mouth,
                                                           listen=at_caller.hear)
    return result, mouth, at_caller


async def anchoring_phase(stack: Stack, rounds: int, hold_s: float) -> dict[str, dict[str, list[float]]]:
    """One way (at the echo endpoint) and round trip (at the caller), per mode, interleaved."""
    out = {mode: {"oneway": [], "rtt": [], "calls": 0} for mode in ("anchored", "direct")}
    for r in range(rounds):
        for mode, number in (("anchored", ANCHORED), ("direct", DIRECT)) if r % 2 == 0 else \
                (("direct", DIRECT), ("anchored", ANCHORED)):
            result, mouth, at_caller = await call(stack, number, hold_s, phase=r * 7, seed=r * 13 + len(mode))
            if result.status != 200:
                print(f"  {mode} call failed: {result.status} {result.reason}")
                continue
            ear = stack.echo.ears.get(result.call_id)
            out[mode]["calls"] += 1
            out[mode]["oneway"] += latencies_ms(mouth.sent, ear.onsets if ear else [])
            out[mode]["rtt"] += latencies_ms(mouth.sent, at_caller.onsets)
    return out


async def cpu_phase(stack: Stack, calls: int, window_s: float) -> tuple[float, float]:
    """rtpengine's CPU seconds over the window with `calls` anchored calls up, and idle."""
    component = Component("rtpengine", [stack.rtpengine.pid()])
    idle = CpuWindow.start([component])
    await asyncio.sleep(window_s)
    idle.stop([component])
    up = asyncio.Event()
    answered: list[float] = []

    async def one(i: int):
        async def while_up(result):
            answered.append(time.monotonic())
            if len(answered) == calls:
                up.set()
        await asyncio.sleep(i * 0.05)
        return await SipCaller(stack.kamailio.sip_port).call(LOAD.lstrip("+"), window_s + 2 + calls * 0.05,
                                                             while_up=while_up)
    tasks = [asyncio.create_task(one(i)) for i in range(calls)]
    try:
        await asyncio.wait_for(up.wait(), 20)
    except asyncio.TimeoutError:
        print(f"  warning: only {len(answered)} of {calls} load calls came up")
    await asyncio.sleep(0.5)
    window = CpuWindow.start([component])
    await asyncio.sleep(window_s)
    window.stop([component])
    results = await asyncio.gather(*tasks)
    ok = sum(1 for r in results if r.status == 200 and r.rtp_received > 0)
    if ok < calls:
        print(f"  warning: {calls - ok} of {calls} load calls failed or got no audio")
    return window.seconds("rtpengine"), idle.seconds("rtpengine"), ok


async def fork_phase(stack: Stack, rounds: int, hold_s: float) -> tuple[list[float], float | None]:
    """Fork one way (caller → fork target), and Asterisk's CPU per call-second meanwhile."""
    oneway: list[float] = []
    asterisk = [Component("asterisk", [stack.asterisk.proc.pid])] if stack.asterisk is not None else []
    window = CpuWindow.start(asterisk)
    calls = 0
    for r in range(rounds):
        async def one(i: int):
            await asyncio.sleep(i * 0.3)
            sink = stack.sinks[i]
            sink.ear = Ear()
            mouth = Mouth((r + i) * 5 % BURST_EVERY, seed=r * 17 + i)
            result = await SipCaller(stack.kamailio.sip_port).call(f"1800556{i:04d}", hold_s, payload=mouth)
            return result, mouth, sink.ear
        for result, mouth, ear in await asyncio.gather(*(one(i) for i in range(FORK_SLOTS))):
            if result.status == 200:
                calls += 1
                oneway += latencies_ms(mouth.sent, ear.onsets)
    window.stop(asterisk)
    cpu = window.seconds("asterisk") / (max(calls, 1) * hold_s) * 1e6 if asterisk else None
    return oneway, cpu


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="anchored/direct call pairs (and fork rounds)")
    parser.add_argument("--hold-s", type=float, default=5.0, help="how long each measured call lasts")
    parser.add_argument("--load-calls", type=int, default=20, help="anchored calls held together for the CPU figure")
    parser.add_argument("--load-s", type=float, default=10.0, help="the CPU window")
    args = parser.parse_args()
    for tool in ("kamailio", "rtpengine", "redis-server"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            sys.exit(f"bench/edge_media.py needs {tool} (bash .ci/install-system-packages)")
    binary = asterisk_binary()
    print(f"media node: {'Asterisk ' + binary if binary else 'the stand-in (no Asterisk: snoop forks n/a)'}")
    baseline = await probe_baseline()
    print(f"probe on a direct UDP path: {stats(baseline)}")
    workdir = Path(tempfile.mkdtemp(prefix="cf-edge-media-"))
    stack = Stack(workdir, binary)
    try:
        await stack.start()
        print(f"\n1. anchoring ({args.rounds} calls each way, {args.hold_s:.0f} s, interleaved)")
        anchoring = await anchoring_phase(stack, args.rounds, args.hold_s)
        for mode, found in anchoring.items():
            print(f"  {mode:9s} calls {found['calls']}  one way: {stats(found['oneway'])}")
            print(f"  {'':9s}          round trip: {stats(found['rtt'])}")
        added = {q: percentile(anchoring["anchored"]["oneway"], q) - percentile(anchoring["direct"]["oneway"], q)
                 for q in (.5, .95)}
        print(f"  added by the anchor, one way: p50 {fmt(added[.5])} ms  p95 {fmt(added[.95])} ms")

        print(f"\n2. rtpengine CPU ({args.load_calls} anchored calls up, {args.load_s:.0f} s window)")
        busy, idle, ok = await cpu_phase(stack, args.load_calls, args.load_s)
        per_call_s = (busy - idle) / (max(ok, 1) * args.load_s) * 1e6
        print(f"  rtpengine: {busy * 1000:.1f} ms CPU with the calls, {idle * 1000:.1f} ms idle; "
              f"{per_call_s:.1f} µs per call-second (idle subtracted; {ok} calls, 50 packets/s each way)")

        print(f"\n3. forks ({args.rounds} rounds of {FORK_SLOTS} calls with an echo agent and a fork of the caller)")
        edge, edge_cpu = await fork_phase(stack, args.rounds, args.hold_s)
        print(f"  edge (rtpengine copies):  {stats(edge)}")
        snoop: list[float] = []
        if binary:
            await stack.restart_controller("snoop")
            snoop, snoop_cpu = await fork_phase(stack, args.rounds, args.hold_s)
            print(f"  snoop (Asterisk):         {stats(snoop)}")
            print(f"  Asterisk CPU per call-second (agent leg + fork): edge forks {fmt(edge_cpu, 0)} µs, "
                  f"snoop forks {fmt(snoop_cpu, 0)} µs")
        else:
            print("  snoop: n/a (needs a real Asterisk)")
    finally:
        await stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT anchor_added_ms_p95={fmt(added[.95])} rtpengine_cpu_us_per_call_s={fmt(per_call_s, 1)} "
          f"edge_fork_oneway_p95_ms={fmt(percentile(edge, .95) if edge else None)} "
          f"snoop_fork_oneway_p95_ms={fmt(percentile(snoop, .95) if snoop else None)}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
