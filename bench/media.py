"""Media plane bench: what a caller, an AI agent and a fork target feel, measured from outside.

    python3 bench/media.py [--max-calls 80] [--window-s 5] [--conference] [--fake-only]

Target `real` (an Asterisk binary on PATH or named by CALLFABRIC_ASTERISK): SIP callers with
real RTP → real Kamailio → real Asterisk (our asterisk/ config set) → a controller process
(`callfabric run`, real Redis); every call has its own echo agent and fork sink (a policy rule
per called number), so every figure is per call:

- the probe: 1 kHz tone bursts in silence, their onset at a known sample of a 20 ms packet,
  found back sample-accurately at the receiver (onset time = arrival + sample / 8000). It is
  first validated on a direct UDP path (no Asterisk) and that baseline printed;
- latency (a few calls at a time): agent one way (caller → agent), agent round trip (caller →
  echo agent → caller), fork one way (caller → fork target), set-up (INVITE → 200 OK, 200 OK
  → first agent packet, 200 OK → first fork packet);
- transfer gap: the longest silence at the caller around an AI → AI transfer (REST API);
- conference (--conference): the agent round trip with a human in, in `conference` mode (the
  call's bridge mixes three) and in `listen` mode (the human hears a snoop);
- capacity: N concurrent calls with an agent leg and a fork, N = 20, 40, 80 … up to
  --max-calls, until a fork loses packets or the round trip p95 passes 5 ms; CPU % of a core
  per call for Asterisk and the controller from their own /proc/<pid>/stat over a steady
  window (calls up, set-up excluded).

Target `fake` (no Asterisk, or --fake-only): the spec-validating fake ARI with the controller's
MediaPlane in this process and real Redis: it measures ARI requests per call only (there is
no audio); the audio figures are n/a.

Last line:
RESULT agent_rtt_p95_ms=… fork_oneway_p95_ms=… transfer_gap_ms=… max_calls=… asterisk_cpu_pct_per_call=… controller_cpu_pct_per_call=… answered=… target=real|fake
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import Component, ControllerProcess, CpuWindow, percentile  # noqa: E402
from controller.localstack.kamailio import free_port  # noqa: E402
from controller.localstack.redis import RedisServer  # noqa: E402
from controller.localstack.sip_ua import SipCaller, ulaw  # noqa: E402

TOKEN = "bench-control-secret-0123456789"
SILENCE = b"\xff" * 160
BURST_PACKETS = 3  # 60 ms of tone per burst
BURST_EVERY = 25  # packets: a burst every 500 ms
LOUD = bytes(1 if (~b & 0x7F) >= 0x30 else 0 for b in range(256))  # µ-law codes above ~|500|
RTT_LIMIT_MS = 5.0
BENCH_BUSY_PCT = 85.0  # the bench process at this much of a core cannot keep 50 packets/s per call


def tone_from(k: int) -> bytes:
    """A packet of silence whose 1 kHz tone (cosine: loud from its first sample) starts at sample k."""
    return SILENCE[:k] + bytes(ulaw(round(8000 * math.cos(2 * math.pi * i / 8))) for i in range(160 - k))


TONE = tone_from(0)
ONSETS = {k: tone_from(k) for k in range(160)}


def onset(payload: bytes) -> int:
    """The first loud sample of a µ-law payload, -1 if none."""
    return payload.translate(LOUD).find(1)


class Ear:
    """Finds tone onsets in an RTP stream: the time of each (arrival + sample / 8000)."""

    def __init__(self):
        self.onsets: list[float] = []
        self.first_at = 0.0
        self.loud = False
        self.packets = 0
        self.last_seq: int | None = None
        self.lost = 0

    def hear(self, packet: bytes, when: float) -> None:
        self.packets += 1
        self.first_at = self.first_at or when
        seq = struct.unpack("!H", packet[2:4])[0]
        if self.last_seq is not None and (seq - self.last_seq) & 0xFFFF > 1:
            self.lost += ((seq - self.last_seq) & 0xFFFF) - 1
        self.last_seq = seq
        if packet[1] & 0x7F != 0:  # comfort noise and other payloads carry no tone
            return
        found = onset(packet[12 + 4 * (packet[0] & 0x0F):])
        if found >= 0 and not self.loud:
            self.onsets.append(when + found / 8000)
        self.loud = found >= 0


class Mouth:
    """The caller's audio: silence with a tone burst every BURST_EVERY packets, the onset at a
    sample that moves from burst to burst; remembers when each onset was sent."""

    def __init__(self, phase: int, seed: int):
        self.phase, self.seed = phase % BURST_EVERY, seed
        self.sent: list[float] = []

    def __call__(self, n: int) -> bytes:
        position = (n - self.phase) % BURST_EVERY
        if n < self.phase or position >= BURST_PACKETS:
            return SILENCE
        if position == 0:
            k = (37 * len(self.sent) + self.seed) % 160
            self.sent.append(time.monotonic() + k / 8000)
            return ONSETS[k]
        return TONE


def latencies_ms(sent: list[float], heard: list[float], window_s: float = 0.25) -> list[float]:
    """Each sent onset matched with the first one heard after it (within `window_s`)."""
    out, j = [], 0
    for s in sent:
        while j < len(heard) and heard[j] < s - 0.0005:
            j += 1
        if j < len(heard) and heard[j] - s < window_s:
            out.append(max(0.0, heard[j] - s) * 1000)
            j += 1
    return out


class Peer(asyncio.DatagramProtocol):
    """An agent (echoes every packet) or a fork target (only listens), with an Ear."""

    def __init__(self, echo: bool):
        self.echo, self.ear, self.transport = echo, Ear(), None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        if self.echo:
            self.transport.sendto(data, addr)
        self.ear.hear(data, time.monotonic())


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {percentile(values, .5):.2f} ms  p95 {percentile(values, .95):.2f} ms  max {max(values):.2f} ms " \
           f"(n={len(values)})"


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# ------------------------------------------------------------------ the probe on a direct path
async def probe_baseline(bursts: int = 40) -> list[float]:
    """The probe on a direct UDP path: the detector must find each onset at the sample it was
    sent at, and the one-way time is the bench's own floor."""
    loop = asyncio.get_running_loop()
    port = free_port(socket.SOCK_DGRAM)
    listener, peer = await loop.create_datagram_endpoint(lambda: Peer(echo=False), local_addr=("127.0.0.1", port))
    sender, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port))
    mouth = Mouth(phase=1, seed=3)
    started = loop.time()
    for n in range(bursts * BURST_EVERY):
        sender.sendto(struct.pack("!BBHII", 0x80, 0, n & 0xFFFF, n * 160, 1) + mouth(n))
        await asyncio.sleep(max(0.0, started + (n + 1) * 0.002 - loop.time()))  # 10x real time: 2 ms a packet
    await asyncio.sleep(0.05)
    sender.close()
    listener.close()
    found = latencies_ms(mouth.sent, peer.ear.onsets)
    if len(found) != len(mouth.sent):
        raise SystemExit(f"probe invalid: {len(found)} of {len(mouth.sent)} onsets found on a direct path")
    if max(found) > 5:
        raise SystemExit(f"probe invalid: a direct path shows {max(found):.2f} ms (the detector is off by samples)")
    return found


# ------------------------------------------------------------------ the real stack
@dataclass
class CallPlan:
    index: int
    agent: Peer
    sink: Peer
    mouth: Mouth
    ear: Ear = field(default_factory=Ear)  # at the caller (the echo)
    result: object = None


class RealStack:
    def __init__(self, workdir: Path, binary: str, max_calls: int):
        from controller.localstack.asterisk import Asterisk
        from controller.localstack.kamailio import Kamailio
        from controller.localstack.sipp import SippUAS

        self.workdir = workdir
        self.redis = RedisServer(workdir).start()
        self.kamailio = Kamailio(workdir, {})
        # 3 RTP streams a call (caller, agent, fork), 2 ports each (RTCP)
        self.asterisk = Asterisk(workdir, edge_port=self.kamailio.sip_port, binary=binary,
                                 rtp_ports=max(200, 8 * (max_calls + 4)))
        self.kamailio.write_dispatcher_list({1: [f"127.0.0.1:{self.asterisk.sip_port}"]})
        self.human = SippUAS(workdir, "uas_answer.xml", "human")
        self.slots = max_calls
        self.peers: list[tuple[Peer, Peer]] = []
        self.spare = Peer(echo=True)  # the agent calls are transferred to
        self.transports = []
        self.controller: ControllerProcess | None = None
        self.http = ""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for thing in (self.kamailio, self.asterisk, self.human):
            await asyncio.to_thread(thing.start)
        ports = []
        for _ in range(self.slots):
            pair = []
            for echo in (True, False):
                port = free_port(socket.SOCK_DGRAM)
                transport, peer = await loop.create_datagram_endpoint(lambda e=echo: Peer(e),
                                                                      local_addr=("127.0.0.1", port))
                self.transports.append(transport)
                pair.append((peer, port))
            self.peers.append((pair[0][0], pair[1][0]))
            ports.append((pair[0][1], pair[1][1]))
        spare_port = free_port(socket.SOCK_DGRAM)
        transport, self.spare = await loop.create_datagram_endpoint(lambda: Peer(True),
                                                                    local_addr=("127.0.0.1", spare_port))
        self.transports.append(transport)
        policy_dir = self.workdir / "policy"
        policy_dir.mkdir()
        lines = ["settings: {numbering: {country_code: '1', national_prefix: '1'}}",
                 "node_sets: {media: {dispatcher_set: 1}}", "agents:",
                 f"  spare: {{node_set: media, endpoint: '127.0.0.1:{spare_port}', codec: ulaw}}"]
        lines += [f"  a{i}: {{node_set: media, endpoint: '127.0.0.1:{a}', codec: ulaw}}" for i, (a, _) in enumerate(ports)]
        lines += ["fork_targets:"]
        lines += [f"  f{i}: {{endpoint: '127.0.0.1:{f}', transport: rtp, codec: ulaw, direction: in}}"
                  for i, (_, f) in enumerate(ports)]
        lines += ["destinations:", f"  desk: {{uri: 'sip:desk@{self.human.addr}'}}", "rules:"]
        lines += [f"  - {{name: c{i}, match: {{ruri: '+1800555{i:04d}'}}, actions: [route_agent: a{i}, fork: f{i}]}}"
                  for i in range(self.slots)]
        lines += ["default: {actions: [reject: 404]}"]
        (policy_dir / "bench.yaml").write_text("\n".join(lines) + "\n")
        self.controller = ControllerProcess(self.workdir, policy_dir, self.redis.url, self.kamailio, name="media",
                                            extra={"ari_nodes": [self.asterisk.ari_node()],
                                                   "api_tokens": [f"bench:control:{TOKEN}"]})
        self.http = self.controller.https[0]
        await asyncio.to_thread(self.controller.start)
        deadline = time.monotonic() + 20
        while "callfabric_ari_connected{node=\"media1\"} 1.0" not in await asyncio.to_thread(self.controller.metrics):
            if time.monotonic() > deadline:
                raise RuntimeError("the controller did not connect to Asterisk's ARI")
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Every process goes, whatever state a failed run left the others in."""
        for transport in self.transports:
            transport.close()
        for thing in (self.controller, self.human, self.asterisk, self.kamailio, self.redis):
            if thing is None:
                continue
            try:
                await asyncio.to_thread(thing.stop)
            except Exception as exc:  # noqa: BLE001 - one stop failing must not leave the others running
                print(f"  warning: stopping {type(thing).__name__}: {exc}")

    def components(self) -> list[Component]:
        return [Component("asterisk", [self.asterisk.proc.pid]), self.controller.component()]

    async def api(self, path: str, body: dict) -> dict:
        def post() -> dict:
            request = urllib.request.Request(f"http://{self.http}/v1{path}", data=json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {TOKEN}",
                                                      "Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        return await asyncio.to_thread(post)

    def plan(self, slot: int, phase: int = 0) -> CallPlan:
        """A call on `slot` (its own agent and fork target, fresh ears)."""
        agent, sink = self.peers[slot]
        agent.ear, sink.ear = Ear(), Ear()
        return CallPlan(slot, agent, sink, Mouth(phase, seed=slot * 11))

    async def call(self, plan: CallPlan, hold_s: float, while_up=None) -> CallPlan:
        plan.result = await SipCaller(self.kamailio.sip_port).call(
            f"1800555{plan.index:04d}", hold_s, payload=plan.mouth, listen=plan.ear.hear, while_up=while_up)
        return plan


async def wait_idle(stack: RealStack, timeout: float = 15.0) -> None:
    """Until Asterisk has no channel left (the calls are torn down)."""
    from controller.media.ari import AriClient, AriNode
    node = AriNode("media1", stack.asterisk.ari_url, stack.asterisk.ari_user, stack.asterisk.ari_password)
    client = AriClient(node, "bench-observer")
    try:
        deadline = time.monotonic() + timeout
        while await client.channels():
            if time.monotonic() > deadline:
                print(f"  warning: {len(await client.channels())} channel(s) still up after {timeout:.0f} s")
                return
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def latency_phase(stack: RealStack, calls: int = 4, hold_s: float = 6.0) -> dict:
    async def one(i: int) -> CallPlan:
        await asyncio.sleep(i * 0.2)  # one set-up at a time: the set-up time of a call, not of a burst of calls
        return await stack.call(stack.plan(i, phase=i * BURST_EVERY // calls), hold_s)
    plans = await asyncio.gather(*(one(i) for i in range(calls)))
    await wait_idle(stack)
    setup, agent_first, fork_first, rtt, one_way, fork = [], [], [], [], [], []
    for plan in plans:
        r = plan.result
        if r.status != 200:
            continue
        setup.append((r.answered_at - r.invited_at) * 1000)
        if plan.agent.ear.first_at:
            agent_first.append((plan.agent.ear.first_at - r.answered_at) * 1000)
        if plan.sink.ear.first_at:
            fork_first.append((plan.sink.ear.first_at - r.answered_at) * 1000)
        rtt += latencies_ms(plan.mouth.sent, plan.ear.onsets)
        one_way += latencies_ms(plan.mouth.sent, plan.agent.ear.onsets)
        fork += latencies_ms(plan.mouth.sent, plan.sink.ear.onsets)
    answered = sum(1 for p in plans if p.result.status == 200)
    print(f"latency: {answered}/{calls} calls answered (placed 200 ms apart), agent leg + fork each, {hold_s:.0f} s, "
          f"a burst every {BURST_EVERY * 20} ms")
    print(f"  INVITE -> 200 OK:            {stats(setup)}")
    print(f"  200 OK -> first agent packet: {stats(agent_first)}")
    print(f"  200 OK -> first fork packet:  {stats(fork_first)}")
    print(f"  caller -> agent (one way):   {stats(one_way)}")
    print(f"  caller -> agent -> caller:   {stats(rtt)}")
    print(f"  caller -> fork (one way):    {stats(fork)}")
    return {"rtt": rtt, "fork": fork, "answered": answered}


async def transfer_phase(stack: RealStack) -> float | None:
    moment = {}

    async def transfer(result):
        await asyncio.sleep(2.0)
        moment["at"] = time.monotonic()
        answer = await stack.api(f"/calls/{result.call_id}/actions", {"action": {"route_agent": "spare"}})
        moment["answer"] = answer

    stack.spare.ear = Ear()
    plan = await stack.call(stack.plan(0), 4.5, while_up=transfer)
    await wait_idle(stack)
    if plan.result.status != 200 or "at" not in moment:
        print("transfer: the call failed")
        return None
    arrivals = [t for t in plan.result.received_at if moment["at"] - 0.5 <= t <= moment["at"] + 1.5]
    gap = max((b - a for a, b in zip(arrivals, arrivals[1:])), default=float("nan")) * 1000
    print(f"transfer: AI -> AI through the API ({moment['answer'].get('result', {}).get('agent', '?')}): the caller's "
          f"longest gap between packets {gap:.1f} ms (20 ms is no gap); new agent heard {stack.spare.ear.packets} "
          f"packets")
    return gap


async def conference_phase(stack: RealStack) -> None:
    """The agent's round trip before and while a human is in: `conference` (the call's bridge
    mixes three) and `listen` (the human hears a snoop; the call's bridge stays two-party)."""
    for mode in ("conference", "listen"):
        window = {}
        mouth, ear = Mouth(0, seed=5), Ear()

        async def add_human(result):
            await asyncio.sleep(2.0)
            window["before"] = len(mouth.sent)
            await stack.api(f"/calls/{result.call_id}/actions",
                            {"action": {"add_human": {"destination": "desk", "mode": mode}}})
            await asyncio.sleep(1.0)
            window["with"] = len(mouth.sent)

        agent, sink = stack.peers[0]
        agent.ear, sink.ear = Ear(), Ear()
        result = await SipCaller(stack.kamailio.sip_port).call("18005550000", 6.0, payload=mouth, listen=ear.hear,
                                                               while_up=add_human)
        await wait_idle(stack)
        if result.status != 200 or "with" not in window:
            print(f"{mode}: the call failed")
            continue
        two = latencies_ms(mouth.sent[:window["before"]], ear.onsets)
        three = latencies_ms(mouth.sent[window["with"]:], ear.onsets)
        print(f"{mode}: agent round trip, caller + agent: {stats(two)}")
        print(f"{' ' * len(mode)}  with a human in ({mode}): {stats(three)}")


async def capacity_phase(stack: RealStack, steps: list[int], window_s: float, rate: float = 20.0) -> dict:
    """Steps of N concurrent calls (placed at `rate` a second), each measured over a steady
    window once all are up; stops at the first step that loses fork packets, fails calls or
    passes the round-trip limit."""
    best: dict = {}
    for n in steps:
        ramp = n / rate
        plans = [stack.plan(i, phase=i % BURST_EVERY) for i in range(n)]
        window: dict = {}

        async def one(plan: CallPlan) -> None:
            await asyncio.sleep(plan.index / rate)
            await stack.call(plan, ramp - plan.index / rate + 1.5 + window_s + 0.5)

        async def measure() -> None:
            await asyncio.sleep(ramp + 1.5)
            components = stack.components()
            window["fork"] = [(p.sink.ear.packets, p.sink.ear.lost) for p in plans]
            window["from"] = time.monotonic()
            cpu = await asyncio.to_thread(CpuWindow.start, components)
            own = time.process_time()
            await asyncio.sleep(window_s)
            window["own"] = time.process_time() - own
            window["cpu"] = await asyncio.to_thread(cpu.stop, components)
            window["to"] = time.monotonic()
            window["fork_after"] = [(p.sink.ear.packets, p.sink.ear.lost) for p in plans]

        await asyncio.gather(measure(), *(one(plan) for plan in plans))
        await wait_idle(stack)
        answered = sum(1 for p in plans if p.result is not None and p.result.status == 200)
        rtt = []
        for plan in plans:
            sent = [t for t in plan.mouth.sent if window["from"] <= t <= window["to"] - 0.3]
            rtt += latencies_ms(sent, plan.ear.onsets)
        fork_packets = sum(a[0] - b[0] for a, b in zip(window["fork_after"], window["fork"]))
        lost = sum(a[1] - b[1] for a, b in zip(window["fork_after"], window["fork"]))
        cpu = window["cpu"]
        wall = cpu.ended - cpu.started
        asterisk_pct = cpu.seconds("asterisk") / wall * 100
        controller_pct = cpu.seconds("controller") / wall * 100
        rtt95 = percentile(rtt, .95)
        ok = answered == n and lost == 0 and rtt95 <= RTT_LIMIT_MS
        bench_pct = window["own"] / wall * 100  # this process plays every caller, agent and fork target
        bench_bound = not ok and bench_pct >= BENCH_BUSY_PCT
        per_call = (lambda pct, d: f"{pct / answered:.{d}f}" if answered else "n/a")
        print(f"capacity {n:3d} calls: answered {answered}/{n}; round trip {stats(rtt)}; forks got {fork_packets} "
              f"packets in {wall:.1f} s ({fork_packets / wall / n:.1f}/s per call), lost {lost}; Asterisk "
              f"{asterisk_pct:.1f} % of a core ({per_call(asterisk_pct, 3)} % per call), controller "
              f"{controller_pct:.2f} % ({per_call(controller_pct, 4)} % per call); the bench itself {bench_pct:.0f} %, load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores "
              f"-> {'ok' if ok else 'LIMIT (of the bench process: its callers and agents fell behind)' if bench_bound else 'LIMIT'}")
        result = {"n": n, "answered": answered, "asterisk": asterisk_pct / answered if answered else None,
                  "controller": controller_pct / answered if answered else None}
        if not ok:
            best.setdefault("last", result)
            best["bench_bound"] = bench_bound
            break
        best = {"ok": result, "last": result}
    return best


async def run_real(args: argparse.Namespace, workdir: Path, binary: str) -> dict:
    steps = [n for n in (20, 40, 80, 160, 320) if n <= args.max_calls] or [args.max_calls]
    stack = RealStack(workdir, binary, max(steps))
    await stack.start()
    try:
        latency = await latency_phase(stack)
        gap = await transfer_phase(stack)
        if args.conference:
            await conference_phase(stack)
        capacity = await capacity_phase(stack, steps, args.window_s)
    finally:
        await stack.stop()
    ok, last = capacity.get("ok"), capacity.get("last") or {}
    shown = ok or last
    if capacity.get("bench_bound"):
        print(f"max_calls={ok['n'] if ok else 0} is a lower bound: the next step was limited by this process, not "
              f"by Asterisk or the controller")
    return {"rtt": percentile(latency["rtt"], .95), "fork": percentile(latency["fork"], .95), "gap": gap,
            "max_calls": ok["n"] if ok else 0, "asterisk": shown.get("asterisk"), "controller": shown.get("controller"),
            "answered": shown.get("answered", 0)}


# ------------------------------------------------------------------ the fake ARI
async def run_fake(args: argparse.Namespace, redis_url: str) -> dict:
    from controller.media.ari import AriClient, AriNode
    from controller.media.feature import Endpoint
    from controller.media.plane import MediaPlane
    from controller.metrics import Metrics
    from controller.state.calls import CallStore, now_ms
    from tests.support.fake_ari import FakeAri

    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005, playback_duration=0.02).start()
    store = CallStore(redis_url)
    agents = {"intake": Endpoint("intake", "127.0.0.1:4000", "rtp", "ulaw")}
    plane = MediaPlane({"media1": AriClient(AriNode("media1", fake.url, "callfabric", "secret"), "callfabric")}, store,
                       Metrics(), resolve_agent=agents.get, resolve_fork_target=lambda n: None, edge_endpoint="edge",
                       instance_id="bench")
    serving = asyncio.create_task(plane.serve_node("media1"))
    await fake.wait_for_app("callfabric")
    fork = {"target": "stt", "endpoint": "127.0.0.1:9100", "transport": "rtp", "codec": "ulaw", "direction": "in"}
    before = len(fake.requests)
    answered = 0
    for n in range(args.fake_calls):
        call_id = f"bench-{n}@edge"
        decision = {"outcome": "agent", "rule": "bench", "agent": {"name": "intake"}, "forks": [fork]}
        await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "bench", "decision": decision},
                           live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
        caller = await fake.inbound_call("callfabric", [call_id, "intake"], sip_call_id=call_id)
        deadline = time.monotonic() + 5
        while not ((m := plane.calls.get(call_id)) and m.state == "active"
                   and all(f.state == "up" for f in m.forks.values()) and m.forks):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
        else:
            answered += 1
        await fake.caller_hangup(caller)
        while call_id in plane.calls and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.002)
    await fake.settle()
    requests = len(fake.requests) - before
    leaks = [c for c in fake.channels if c.startswith("cf-")] + list(fake.bridges)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await plane.nodes["media1"].close()
    await store.aclose()
    await fake.stop()
    per_call = f"{requests / answered:.1f}" if answered else "n/a"
    print(f"fake ARI: {answered}/{args.fake_calls} calls up with an agent leg and a fork; ARI requests {requests} "
          f"({per_call} per call, set-up and clean-up); leaked objects {len(leaks)}; refused requests "
          f"{len(fake.rejected)} (no audio: the audio figures need a real Asterisk)")
    return {"rtt": None, "fork": None, "gap": None, "max_calls": None, "asterisk": None, "controller": None,
            "answered": answered}


def run_loop(coroutine):
    """uvloop (a dependency of the controller) when installed: the bench plays every caller,
    agent and fork target in this process, and packets per second are its limit."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-calls", type=int, default=80, help="the capacity steps stop here (20, 40, 80 …)")
    parser.add_argument("--window-s", type=float, default=10.0,
                        help="the steady window of each capacity step (CPU is counted in 10 ms ticks)")
    parser.add_argument("--conference", action="store_true", help="also measure the round trip with a human in")
    parser.add_argument("--fake-calls", type=int, default=50)
    parser.add_argument("--fake-only", action="store_true", help="skip the real Asterisk even when available")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) for a look afterwards")
    args = parser.parse_args()
    from controller.localstack.asterisk import asterisk_binary

    baseline = asyncio.run(probe_baseline())
    print(f"probe: tone-burst onsets on a direct UDP path (no Asterisk), sample-accurate: one way {stats(baseline)}")
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-bench-media-"))
    try:
        binary = asterisk_binary()
        if binary and not args.fake_only:
            result, target = run_loop(run_real(args, workdir, binary)), "real"
        else:
            if not binary:
                print("real Asterisk: skipped (no asterisk binary on PATH or CALLFABRIC_ASTERISK)")
            redis = RedisServer(workdir).start()
            try:
                result, target = asyncio.run(run_fake(args, redis.url)), "fake"
            finally:
                redis.stop()
        print(f"RESULT agent_rtt_p95_ms={fmt(result['rtt'])} fork_oneway_p95_ms={fmt(result['fork'])} "
              f"transfer_gap_ms={fmt(result['gap'], 1)} max_calls={result['max_calls'] if result['max_calls'] is not None else 'n/a'} "
              f"asterisk_cpu_pct_per_call={fmt(result['asterisk'], 3)} "
              f"controller_cpu_pct_per_call={fmt(result['controller'], 4)} answered={result['answered']} "
              f"target={target}")
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
