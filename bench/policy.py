"""Decision latency of the compiled policy engine against the naive reference evaluator,
measured in the same process on the same calls, 1,000 rules, a realistic call mix.

    python bench/policy.py [--calls 20000] [--naive-calls 3000] [--rules 1000] [--seed 7]

Last line: RESULT p50_ms=… p99_ms=… naive_p99_ms=… ratio=… rules=1000
(ratio = naive p99 / compiled p99: how many times faster the compiled engine is at p99).
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.policy import Call, policy_from_texts  # noqa: E402

DECLARATIONS = """\
settings:
  numbering: {country_code: "1", international_prefix: "011", national_prefix: "1"}
  timezone: America/New_York
node_sets:
  media: {dispatcher_set: 1}
agents:
%(agents)s
destinations:
%(destinations)s
fork_targets:
  stt: {endpoint: "127.0.0.1:9100", codec: slin16}
risk_lists:
  premium: ["+1900", "+1976"]
  irsf: ["+881", "+882", "+883"]
number_lists:
%(lists)s
tenants:
%(tenants)s
default:
  actions: [route_agent: agent-0, fork: stt]
"""


def build_policy(n_rules: int, rng: random.Random) -> tuple[str, str, dict]:
    agents = "\n".join(f"  agent-{i}: {{node_set: media, endpoint: '127.0.0.1:{4000 + i}'}}" for i in range(40))
    destinations = "\n".join(f"  pbx-{i}: {{uri: 'sip:desk@10.1.{i}.1', failover: ['sip:desk@10.2.{i}.1']}}" for i in range(20))
    vip = {f"vip-{i}": [f"+1415{rng.randrange(10**7):07d}" for _ in range(50)] for i in range(10)}
    lists = "\n".join(f"  {name}: [{', '.join(repr(n) for n in numbers)}]" for name, numbers in vip.items())
    tenants = "\n".join(f"  tenant-{i}: {{trunks: ['10.{i}.0.0/16']}}" for i in range(30))
    decl = DECLARATIONS % dict(agents=agents, destinations=destinations, lists=lists, tenants=tenants)

    rules: list[dict] = [
        {"name": "block-risky", "match": {"destination_risk": ["premium", "irsf"]}, "actions": [{"reject": 403}]},
        {"name": "source-rate", "match": {"calls_in_window": {"scope": "source", "window": 60, "at_least": 30}},
         "actions": [{"reject": 503}]},
        {"name": "scanner", "match": {"header": {"name": "User-Agent", "regex": "(?i)friendly-scanner|sipvicious"}},
         "actions": [{"reject": 403}]},
    ]
    dids, prefixes, campaigns = [], [], []
    kinds = (["did"] * 600 + ["prefix"] * 150 + ["vip"] * 60 + ["caller"] * 40 + ["tenant"] * 50
             + ["header"] * 50 + ["hours"] * 30 + ["split"] * 10 + ["continue"] * 7)
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds[: n_rules - len(rules)]):
        agent = {"route_agent": f"agent-{rng.randrange(40)}"}
        name = f"{kind}-{i}"
        if kind == "did":
            did = f"+1800{rng.randrange(10**7):07d}"
            dids.append(did)
            rules.append({"name": name, "match": {"ruri": did}, "actions": [agent, {"fork": "stt"}]})
        elif kind == "prefix":
            prefix = f"+1{rng.randrange(200, 999)}{rng.randrange(200, 999)}"
            prefixes.append(prefix)
            rules.append({"name": name, "match": {"ruri": {"prefix": prefix}, "time": {"days": "mon-fri"}},
                          "actions": [{"route_sip": f"pbx-{rng.randrange(20)}"}]})
        elif kind == "vip":
            rules.append({"name": name, "match": {"caller": {"in_list": f"vip-{rng.randrange(10)}"}},
                          "actions": [{"route_sip": f"pbx-{rng.randrange(20)}"}, {"add_headers": {"X-VIP": "yes"}}]})
        elif kind == "caller":
            rules.append({"name": name, "match": {"caller": {"exact": [f"+1212{rng.randrange(10**7):07d}" for _ in range(3)]}},
                          "actions": [agent]})
        elif kind == "tenant":
            rules.append({"name": name, "match": {"tenant": f"tenant-{rng.randrange(30)}",
                                                  "time": {"hours": "08:00-20:00"}}, "actions": [agent]})
        elif kind == "header":
            campaign = f"c{i}"
            campaigns.append(campaign)
            rules.append({"name": name, "match": {"header": {"name": "X-Campaign", "equals": campaign}}, "actions": [agent]})
        elif kind == "hours":
            rules.append({"name": name, "match": {"source_ip": f"172.{rng.randrange(16, 32)}.0.0/16",
                                                  "time": {"days": "weekend", "hours": "22:00-06:00"}}, "actions": [agent]})
        elif kind == "split":
            rules.append({"name": name, "match": {"split": {"percent": 5, "offset": 5 * (i % 10), "seed": "ab"},
                                                  "transport": "tcp"}, "actions": [agent]})
        else:
            rules.append({"name": name, "match": {"source_ip": f"10.{rng.randrange(30)}.0.0/16"},
                          "actions": [{"add_headers": {"X-Trunk": "${source_ip}"}}, {"continue": True}]})
    pools = dict(dids=dids, prefixes=prefixes, campaigns=campaigns, vips=[n for v in vip.values() for n in v])
    return decl, yaml.safe_dump({"rules": rules}, sort_keys=False), pools


def build_calls(n: int, pools: dict, rng: random.Random) -> list[Call]:
    start = datetime(2026, 11, 23, tzinfo=timezone.utc)
    calls = []
    for i in range(n):
        roll = rng.random()
        frm, to, headers = f"+1202{rng.randrange(10**7):07d}", f"+1800{rng.randrange(10**7):07d}", {}
        if roll < 0.55:
            to = rng.choice(pools["dids"])[2:]  # dialled nationally: normalised by the engine
        elif roll < 0.75:
            to = rng.choice(pools["prefixes"]) + f"{rng.randrange(10**4):04d}"
        elif roll < 0.85:
            frm = rng.choice(pools["vips"])
        elif roll < 0.92:
            headers = {"X-Campaign": rng.choice(pools["campaigns"]), "User-Agent": "Acme PBX 2.1"}
        elif roll < 0.94:
            to = "+1900" + f"{rng.randrange(10**7):07d}"
        calls.append(Call(
            call_id=f"{rng.getrandbits(64):016x}@bench", from_user=frm, to_user=to, ruri_user=to,
            src_ip=f"10.{rng.randrange(40)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" if rng.random() < 0.5
            else f"198.51.100.{rng.randrange(1, 255)}",
            transport=rng.choice(["udp", "udp", "tcp"]), headers=headers,
            at=start + timedelta(seconds=rng.randrange(7 * 86400)),
            counters={"window:source:60": rng.randrange(40) if rng.random() < 0.05 else rng.randrange(5)},
        ))
    return calls


def percentile(sorted_ns: list[int], q: float) -> float:
    index = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[index] / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20000, help="decisions timed on the compiled engine")
    parser.add_argument("--naive-calls", type=int, default=3000, help="decisions timed on the reference evaluator")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    decl, rules, pools = build_policy(args.rules, rng)
    started = time.perf_counter()
    policy = policy_from_texts({"00-decl.yaml": decl, "10-rules.yaml": rules})
    load_s = time.perf_counter() - started
    n_rules = len(policy.source.rules)
    calls = build_calls(args.calls, pools, rng)
    print(f"policy: {n_rules} rules, {len(policy.compiled._unindexed)} not indexable, loaded+compiled in {load_s:.2f}s")

    # Same calls, same answers: the benchmark also checks the engines agree.
    for c in calls[:500]:
        assert policy.compiled.decide(c) == policy.reference.decide(c)

    compiled_ns: list[int] = []
    naive_ns: list[int] = []
    decide, naive = policy.compiled.decide, policy.reference.decide
    clock = time.perf_counter_ns
    gc.collect()
    naive_every = max(1, args.calls // args.naive_calls)
    for i, c in enumerate(calls):  # interleaved: both see the same machine noise
        t0 = clock()
        decide(c)
        compiled_ns.append(clock() - t0)
        if i % naive_every == 0 and len(naive_ns) < args.naive_calls:
            t0 = clock()
            naive(c)
            naive_ns.append(clock() - t0)
    compiled_ns.sort()
    naive_ns.sort()
    p50, p99 = percentile(compiled_ns, 0.50), percentile(compiled_ns, 0.99)
    n50, n99 = percentile(naive_ns, 0.50), percentile(naive_ns, 0.99)
    print(f"compiled  ({len(compiled_ns)} decisions): p50 {p50:.4f} ms  p99 {p99:.4f} ms  "
          f"mean {statistics.fmean(compiled_ns) / 1e6:.4f} ms  max {compiled_ns[-1] / 1e6:.3f} ms")
    print(f"reference ({len(naive_ns)} decisions): p50 {n50:.4f} ms  p99 {n99:.4f} ms  "
          f"mean {statistics.fmean(naive_ns) / 1e6:.4f} ms  max {naive_ns[-1] / 1e6:.3f} ms")
    print(f"target p99 <= 1 ms for 1,000 rules: {'met' if p99 <= 1.0 else 'NOT met'}")
    print(f"RESULT p50_ms={p50:.4f} p99_ms={p99:.4f} naive_p99_ms={n99:.4f} ratio={n99 / p99:.1f} rules={n_rules}")


if __name__ == "__main__":
    main()
