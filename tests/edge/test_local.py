"""The edge's own decisions (controller/edge/local.py) and the policy file they read
(controller/edge/bundle.py): same answers and records as the controller, the cases left to
the controller, a policy file that changes or goes bad, and a bare interpreter like
Kamailio's."""
from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.edge import bundle, protocol
from controller.edge.local import RECHECK_S, EdgeDecider, EdgeOutcome, caller_headers, kamailio_vars
from controller.policy.hot import hot_thresholds
from controller.metrics import Metrics
from controller.security.hot import HotScopes
from controller.policy import load_policy, policy_from_texts
from tests.policy.helpers import DECLARATIONS

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

RULES = textwrap.dedent("""\
    rules:
      - name: premium
        match: {destination_risk: premium}
        actions: [reject: {code: 403, reason: Destination Blocked}]
      - name: flood-cap
        match: {calls_in_window: {scope: source, window: 60s, at_least: 30}}
        actions: [reject: {code: 503, reason: Rate Limited}]
      - name: billing
        match: {ruri: "+442079460001"}
        actions: [route_agent: billing, add_headers: {X-Line: billing}, max_duration: 30m]
      - name: ask-app
        match: {ruri: "+442079460002"}
        actions: [ask_webhook: {url: "http://127.0.0.1:9/hook", fallback: [route_agent: intake]}]
      - name: desk
        match: {ruri: "+442079460003"}
        actions: [route_sip: pbx]
""")


def request(ruri_user: str = "02079460001", **fields) -> dict:
    message = {"event": "decide", "tx": "12:345", "call_id": "c-1@test", "from_uri": "sip:07700900999@test",
               "from_user": "07700900999", "from_tag": "ft", "to_uri": f"sip:{ruri_user}@test",
               "to_user": ruri_user, "ruri": f"sip:{ruri_user}@edge", "ruri_user": ruri_user, "src_ip": "192.0.2.7",
               "src_port": 5060, "transport": "udp", "user_agent": "phone", "headers": {}}
    message.update(fields)
    return message


class Logged(list):
    def __call__(self, level: str, message: str) -> None:
        self.append((level, message))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


KEY = b"k" * 32


def key_file(tmp_path: Path, key: bytes = KEY) -> Path:
    path = tmp_path / "edge-policy.key"
    path.write_bytes(key + b"\n")
    return path


def decider_for(tmp_path: Path, policy, hot: set[str] | None = None):
    path = tmp_path / "edge.policy"
    bundle.write(path, policy.source, KEY)
    log, clock = Logged(), Clock()
    decider = EdgeDecider(str(path), str(key_file(tmp_path)), log, clock)
    hot = hot if hot is not None else set()
    return decider, (lambda message: decider.decide(json.dumps(message), hot.__contains__)), log, clock, path


@pytest.fixture
def policy():
    return policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": RULES})


async def test_the_edge_answers_and_records_what_the_controller_answers_over_evapi(tmp_path, policy, redis_url):
    """The same calls decided twice, by independent paths: at the edge (EdgeDecider, as
    Kamailio's Python runs it) and by the controller over the decision channel end to end
    (netstring frames over TCP -> EdgeChannel -> EdgeDecisions -> real Redis). Answers and
    records must be the same, field by field."""
    from controller.edge.channel import EdgeChannel
    from controller.edge.decisions import EdgeDecisions
    from controller.edge.recorder import EdgeRecorder
    from controller.state.calls import CallStore
    from controller.state.journal import Journal
    from tests.support.evapi import ScriptedEdge, frame, read_answers
    _, decide, log, _, _ = await asyncio.to_thread(decider_for, tmp_path, policy)
    store, metrics, edge = CallStore(redis_url), Metrics(), ScriptedEdge()
    decisions = EdgeDecisions(lambda: policy, store, metrics, "ctl-1")
    recorder = EdgeRecorder(decisions, Journal(store), metrics)
    channel = EdgeChannel("127.0.0.1", await edge.start(), decisions, recorder, metrics)
    task = asyncio.create_task(channel.run())
    try:
        reader, writer = await asyncio.wait_for(edge.connections.get(), 10)
        ruris = ("02079460001", "02079460003", "0909123456", "01632960000")
        async def stored(call_id: str) -> dict:
            from tests.support.wait import until
            return await until(lambda: store.get(call_id), what=f"the record of {call_id}")  # acknowledged after its answer

        def same(record: dict) -> dict:
            return {k: v for k, v in record.items() if k not in ("call_id", "created_at_ms", "ended_at_ms", "decided_by")}

        for n, ruri in enumerate(ruris):
            message = request(ruri, call_id=f"ctl-{n}@test", tx=f"12:{n}")
            outcome = await asyncio.to_thread(decide, {**message, "call_id": f"edge-{n}@test"})
            assert outcome.deferred == "", ruri
            writer.write(frame(message))
            (controller_answer,) = await read_answers(reader, 1)
            assert json.loads(outcome.answer) == controller_answer, ruri
            event = json.loads(outcome.event)
            assert protocol.parse_decided(event).record["decided_by"] == "edge"  # what the controller accepts
            await recorder.apply([event], source="test")
            at_edge, at_controller = await stored(f"edge-{n}@test"), await stored(f"ctl-{n}@test")
            assert at_edge["decided_by"] == "edge" and at_controller["decided_by"] == "controller"
            assert same(at_edge) == same(at_controller), ruri
            timelines = [await store.timeline(f"{who}-{n}@test") for who in ("edge", "ctl")]
            # the edge reads no counter (below the hot mark they compare as 0): its event has none
            steady = [[{k: v for k, v in e.items() if k not in ("id", "call_id", "ts", "decide_ms", "decided_by",
                                                                  "counters")} for e in t] for t in timelines]
            assert steady[0] == steady[1] and [e["event"] for e in steady[0]] == ["decided"], ruri
        billing = json.loads((await asyncio.to_thread(decide, request("02079460001"))).answer)
        assert billing["action"] == "dispatch" and billing["max_duration_s"] == 1800
        assert "X-Line: billing" in billing["hdrs"]
        assert json.loads((await asyncio.to_thread(decide, request("0909123456"))).answer)["code"] == 403
        assert log[0][0] == "info" and "loaded" in log[0][1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await edge.stop()
        await store.aclose()


def test_calls_the_edge_leaves_to_the_controller(tmp_path, policy):
    hot: set[str] = set()
    _, decide, _, _, _ = decider_for(tmp_path, policy, hot)
    assert decide(request("02079460002")).deferred == "webhook"
    hot.add("source|192.0.2.7")  # the controller said: near the flood cap
    assert decide(request("02079460001")).deferred == "hot"
    assert decide(request("02079460001", src_ip="192.0.2.8")).deferred == ""
    assert decide(request("02079460001", tx="not-a-tx")).deferred == "bad-request"
    assert decide(request("02079460001", call_id="")).deferred == "bad-request"


def test_a_limit_too_small_to_take_as_zero_is_never_decided_at_the_edge(tmp_path):
    tight = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": textwrap.dedent("""\
        rules:
          - name: one-at-a-time
            match: {concurrent_calls: {scope: source, at_least: 1}}
            actions: [reject: {code: 486, reason: Busy Here}]
        """)})
    assert hot_thresholds(tight) == {"live:source": 0}
    _, decide, _, _, _ = decider_for(tmp_path, tight)
    assert decide(request()).deferred == "exact-counter"


def test_a_risk_finding_is_left_to_the_controller(tmp_path):
    scored = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": textwrap.dedent("""\
        security:
          detectors:
            - {name: premium-risk, kind: match, when: {destination_risk: premium}, score: 10}
            - {name: burst, kind: rate_spike, scope: source, window: 60s, baseline: 1h, min_calls: 40, score: 50}
          outcomes:
            reject: {at_least: 50}
        rules: []
        """)})
    assert hot_thresholds(scored) == {"risk:burst:window": 19}
    _, decide, _, _, _ = decider_for(tmp_path, scored)
    assert decide(request("0909123456")).deferred == "risk"  # a finding (allow, score 10): scored there
    assert decide(request("01632960000")).deferred == ""


def test_a_new_policy_is_picked_up_and_a_bad_one_leaves_the_last_good(tmp_path, policy):
    decider, decide, log, clock, path = decider_for(tmp_path, policy)
    assert decide(request("02079460001")).deferred == ""
    first = decider.policy.version
    changed = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": RULES.replace(
        "route_agent: billing", "reject: {code: 480, reason: Closed}")})
    bundle.write(path, changed.source, KEY)
    assert json.loads(decide(request("02079460001")).answer)["action"] == "dispatch"  # not looked at yet
    clock.now += RECHECK_S
    assert json.loads(decide(request("02079460001")).answer)["code"] == 480
    assert decider.policy.version == changed.version != first

    path.write_bytes(b"callfabric-edge-policy\n{\"format\": 1}\n" + b"junk")
    clock.now += RECHECK_S
    assert json.loads(decide(request("02079460001")).answer)["code"] == 480  # last good kept
    assert log[-1][0] == "error" and "refused" in log[-1][1] and changed.version in log[-1][1]
    path.unlink()
    clock.now += RECHECK_S
    assert decide(request("02079460001")).deferred == ""
    assert "is not there; still deciding with" in log[-1][1]


def test_no_policy_file_means_the_controller_decides(tmp_path):
    log = Logged()
    decider = EdgeDecider(str(tmp_path / "missing.policy"), str(key_file(tmp_path)), log)
    assert decider.decide(json.dumps(request()), lambda key: False).deferred == "no-policy"
    assert log[0][0] == "warn" and "controller decides every call" in log[0][1]


def _signed(payload: bytes, key: bytes = KEY) -> bytes:
    """A file whose MAC verifies with `key` around any payload (what a holder of the key could write)."""
    return bundle.MAGIC + bundle.MAC_PREFIX + bundle._mac(key, payload) + b"\n" + payload


def _payload(data: bytes) -> bytes:
    return data.split(b"\n", 2)[2]


@pytest.mark.parametrize("damage, reason", [
    (lambda data: b"not a policy", "format"),
    (lambda data: b"callfabric-edge-policy\n" + _payload(data), "format"),  # the unsigned format 1
    (lambda data: bundle.MAGIC + _payload(data), "unsigned"),
    (lambda data: data.replace(b'"agents":{', b'"agents":{"evil":{},', 1), "bad-mac"),  # tampered after signing
    (lambda data: data[:-40], "bad-mac"),
    (lambda data: _signed(_payload(data), b"x" * 32), "bad-mac"),  # signed with another key
    (lambda data: _signed(_payload(data).replace(b'"format":2', b'"format":3')), "format"),
    (lambda data: _signed(_payload(data).replace(bundle.CODE.encode(), b"0" * 16)), "code"),
    (lambda data: _signed(_payload(data).replace(b'"codec":"ulaw"', b'"codec":7', 1)), "invalid"),
    (lambda data: _signed(_payload(data).split(b"\n")[0] + b"\n" + pickle.dumps(os.getcwd)), "invalid"),
], ids=["magic", "format-1", "unsigned", "tampered", "truncated", "other-key", "format", "other-code",
        "bad-type", "pickle"])
def test_a_bad_policy_file_is_refused_with_a_reason(policy, damage, reason):
    with pytest.raises(bundle.BundleError) as info:
        bundle.load(damage(bundle.dump(policy.source, KEY)), KEY)
    assert info.value.reason == reason and str(info.value)


def test_a_policy_file_is_data_never_code(tmp_path, policy):
    """Even a file signed with the right key (a compromised controller) cannot make the edge
    run anything: there is no pickle, only the policy model's fields."""
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/owned",))
    head = _payload(bundle.dump(policy.source, KEY)).split(b"\n")[0]
    for body in (pickle.dumps(Exploit()), json.dumps({"format": 1, "policy": {"__reduce__": ["os.system", "x"]}}).encode()):
        with pytest.raises(bundle.BundleError, match="not a valid policy"):
            bundle.load(_signed(head + b"\n" + body), KEY)
    assert not (tmp_path / "owned").exists()


def test_a_refused_file_is_reported_once_and_the_last_good_keeps_deciding(tmp_path, policy):
    decider, decide, log, clock, path = decider_for(tmp_path, policy)
    reports = []
    decider._refused = lambda state, reason: (reports.append((state, reason)), len(reports) == 1)[1]
    assert decide(request("02079460001")).deferred == ""
    good = decider.policy.version
    path.write_bytes(path.read_bytes().replace(b'"agents":{', b'"agents":{"evil":{},', 1))
    clock.now += RECHECK_S
    assert json.loads(decide(request("02079460001")).answer)["action"] == "dispatch"
    assert decider.policy.version == good
    assert [r for _, r in reports] == ["bad-mac"] and log[-1][0] == "error" and "MAC" in log[-1][1]
    clock.now += RECHECK_S
    decide(request("02079460001"))
    assert len(reports) == 1  # the same file is not reported again
    # a new key on the edge's side (rotation not done at the controller yet): refused too
    key_file(tmp_path, b"r" * 32)
    clock.now += RECHECK_S
    decide(request("02079460001"))
    assert [r for _, r in reports] == ["bad-mac", "bad-mac"] and log[-1][0] == "info"


def test_without_a_key_every_file_is_refused(tmp_path, policy):
    path = tmp_path / "edge.policy"
    bundle.write(path, policy.source, KEY)
    log = Logged()
    for key_path in (None, str(tmp_path / "no-such.key")):
        decider = EdgeDecider(str(path), key_path, log)
        assert decider.decide(json.dumps(request()), lambda key: False).deferred == "no-policy"
        assert log[-1][0] == "error" and "no-key" in log[-1][1]
    (tmp_path / "short.key").write_bytes(b"short")
    decider = EdgeDecider(str(path), str(tmp_path / "short.key"), log)
    assert decider.decide(json.dumps(request()), lambda key: False).deferred == "no-policy"
    assert "at least 32" in log[-1][1]


BARE = """
import json, sys
assert not any('site-packages' in p or 'dist-packages' in p for p in sys.path), sys.path
from controller.edge.local import EdgeDecider
decider = EdgeDecider(sys.argv[1], sys.argv[2], lambda level, message: None)
out = [decider.decide(line, lambda key: False) for line in sys.stdin.read().splitlines()]
print(json.dumps([[o.deferred, o.answer] for o in out]))
for banned in ('yaml', 'jsonschema', 'aiohttp', 'redis', 'prometheus_client'):
    assert banned not in sys.modules, banned
"""


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="under bench/mutation.py: a bare interpreter "
                    "(no site-packages) cannot run mutmut's mutated code")
def test_the_edge_decides_on_a_bare_interpreter_like_kamailios(tmp_path):
    policy = load_policy(ROOT / "policies")
    path = tmp_path / "edge.policy"
    bundle.write(path, policy.source, KEY)
    calls = [request(ruri, src_ip="203.0.113.9", from_user="+12025550123")
             for ruri in ("18005550101", "18005550000", "19005551234", "18005550300")]
    done = subprocess.run([SYSTEM_PYTHON, "-S", "-c", BARE, str(path), str(key_file(tmp_path))],
                          input="\n".join(map(json.dumps, calls)),
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    here = EdgeDecider(str(path), str(key_file(tmp_path)), lambda level, message: None)
    expected = [[o.deferred, o.answer] for o in (here.decide(json.dumps(c), lambda key: False) for c in calls)]
    assert json.loads(done.stdout) == expected
    assert any(deferred == "" for deferred, _ in expected)


class SeenHot(HotScopes):
    """HotScopes (no edge to tell) that keeps the counter values it was shown."""

    def __init__(self) -> None:
        super().__init__([], Metrics())
        self.seen: list[tuple[str, str, int]] = []

    def observe(self, policy, counters, values) -> None:
        counters, values = list(counters), list(values)
        self.seen += [(c.key, c.value, v) for c, v in zip(counters, values)]
        super().observe(policy, counters, values)


async def test_the_controller_records_an_edge_decision_counts_it_and_checks_its_scopes(tmp_path, policy, redis_url):
    from controller.edge.decisions import EdgeDecisions
    from controller.edge.recorder import EdgeRecorder
    from controller.state.calls import CallStore
    from controller.state.journal import Journal
    _, decide, _, _, _ = await asyncio.to_thread(decider_for, tmp_path, policy)  # files: off the loop
    store, metrics, hot = CallStore(redis_url), Metrics(), SeenHot()
    serving = [policy]
    decisions = EdgeDecisions(lambda: serving[0], store, metrics, "ctl-1", hot=hot)
    recorder = EdgeRecorder(decisions, Journal(store), metrics)
    try:
        for n in range(3):
            outcome = await asyncio.to_thread(decide, request("02079460001", call_id=f"edge-{n}@test",
                                                              src_ip="192.0.2.50"))
            await recorder.apply([json.loads(outcome.event)], source="test")
        await recorder.settled()
        record = await store.get("edge-2@test")
        assert record["decided_by"] == "edge" and record["controller"] == "ctl-1" and record["rule"] == "billing"
        assert [e["event"] for e in await store.timeline("edge-2@test")] == ["decided"]
        assert ("window:source:60", "192.0.2.50", 3) in hot.seen  # read once all three were counted
        assert metrics.registry.get_sample_value("callfabric_edge_policy_mismatch_total") == 0

        serving[0] = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": RULES + "\n"})
        assert serving[0].version != policy.version
        outcome = await asyncio.to_thread(decide, request("02079460001", call_id="edge-3@test"))
        await recorder.apply([json.loads(outcome.event)], source="test")
        assert metrics.registry.get_sample_value("callfabric_edge_policy_mismatch_total") == 1
        await recorder.settled()
    finally:
        await store.aclose()


def sip_request(*headers: str) -> str:
    return ("INVITE sip:02079460001@edge SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\n"
            "From: <sip:07700900999@test>;tag=ft\r\nTo: <sip:02079460001@test>\r\nCall-ID: c-1@test\r\n"
            "CSeq: 1 INVITE\r\n" + "".join(h + "\r\n" for h in headers) + "Content-Length: 4\r\n\r\nX-B: body\r\n")


def test_the_edge_reads_the_callers_headers_like_the_decide_event_carries_them():
    """kamailio.cfg route[BUILD_DECIDE]'s choice of headers (X-*, identity ones; never the
    names callfabric sets or trusts, never names with '.', '[' or ']'; a 4 KB budget in
    message order), as
    the edge's Python reads them from a plain ASCII request, keeping what the policy reads."""
    wanted = frozenset({"x-lang", "subject", "x-callfabric-agent", "x-intent", "x.y", "x-b", "x-late"})
    headers = caller_headers(sip_request("X-Lang: fr", "Subject:  hello  ", "X-Callfabric-Agent: forged", "X-Intent: x",
                                         "x-lang: de", "X.Y: dotted", "s: compact", "X-Other: 1",
                                         "Diversion: <sip:a@b>", "X-Huge: " + "z" * 4030, "X-Late: after"), wanted)
    assert headers == {"X-Lang": ["fr"], "Subject": ["hello"], "x-lang": ["de"]}
    # nothing the policy does not read, and the body is not a header
    assert caller_headers(sip_request("X-Lang: fr"), frozenset({"x-b"})) == {}
    # one header beyond the budget is left out, a later one within it is kept
    assert caller_headers(sip_request("X-Huge: " + "z" * 4091, "X-Late: after"), wanted) == {"X-Late": ["after"]}


def test_fields_read_from_the_request_decide_like_its_decide_event(tmp_path, policy):
    """What kamailio/edge_decide.py hands over for a plain ASCII request (the fields, the
    headers the policy reads) decides like the decide event JSON of the same request."""
    header_rules = RULES.replace("rules:\n", "rules:\n  - name: french\n    match: {header: {name: X-Lang, "
                                              "equals: fr}}\n    actions: [route_agent: billing]\n", 1)
    decider, decide, _, _, _ = decider_for(tmp_path, policy_from_texts({"00-decl.yaml": DECLARATIONS,
                                                                        "10-rules.yaml": header_rules}))
    decider.refresh()
    assert "x-lang" in decider.header_names  # (and the tenant header of the declarations)
    for lang, rule in (("fr", "french"), ("de", "desk")):
        message = request("02079460003", headers={"X-Lang": [lang], "X-Other": ["1"]})
        as_json = decide(message)
        read = decider.decide({**message, "headers": caller_headers(sip_request(f"X-Lang: {lang}", "X-Other: 1"),
                                                                    decider.header_names)}, lambda key: False)
        assert as_json.deferred == read.deferred == "" and json.loads(as_json.answer) == json.loads(read.answer)
        assert json.loads(read.event)["record"]["rule"] == rule
        assert dict(read.kamailio_vars)["$var(a_action)"] == ("dispatch" if rule == "french" else "relay")


@pytest.mark.parametrize("answer, carried_out", [
    ({"action": "dispatch", "set": 2, "hdrs": "X-A: b\r\n", "max_duration_s": 60},
     {"$var(a_action)": "dispatch", "$var(a_set)": 2, "$var(a_hdrs)": "X-A: b\r\n", "$var(a_maxdur)": 60}),
    ({"action": "relay", "uris": ["sip:a@h:5060", "sips:b@h"], "hdrs": "", "ring_timeout_ms": 3000},
     {"$var(a_action)": "relay", "$var(a_uris)": "sip:a@h:5060>sips:b@h", "$var(a_ring)": 3000}),
    ({"action": "reject", "code": 486, "reason": "", "hdrs": ""},
     {"$var(a_action)": "reject", "$var(a_code)": 486, "$var(a_reason)": "Rejected"}),
    ({"action": "dispatch", "set": 1, "hdrs": "", "media": "nat-only"},
     {"$var(a_action)": "dispatch", "$var(a_set)": 1, "$var(a_media)": "nat-only"}),
])
def test_an_edge_answer_becomes_what_kamailio_carries_out(answer, carried_out):
    got = dict(kamailio_vars({"tx": "1:2", **answer}))
    assert got == {**{"$var(a_hdrs)": "", "$var(a_ring)": 0, "$var(a_maxdur)": 0, "$var(a_set)": 0,
                      "$var(a_uris)": "", "$var(a_code)": 0, "$var(a_reason)": "", "$var(a_media)": ""},
                   **carried_out}


@pytest.mark.parametrize("answer", [
    {"action": "dispatch", "set": 1, "hdrs": "Via: SIP/2.0/UDP evil\r\n"},
    {"action": "dispatch", "set": 1, "hdrs": "X-A: b\r\nf: <sip:x@y>\r\n"},
    {"action": "dispatch", "set": 1, "hdrs": "X-A: b"},
    {"action": "dispatch", "set": 1, "hdrs": "X-A: b\r\nX-B\r\n"},
    {"action": "dispatch", "set": 1, "hdrs": "X-A: " + "b" * 8200 + "\r\n"},
    {"action": "dispatch", "set": True},
    {"action": "dispatch", "set": -1},
    {"action": "dispatch", "set": 1, "max_duration_s": 0},
    {"action": "dispatch", "set": 1, "ring_timeout_ms": 999},
    {"action": "dispatch", "set": 1, "media": "sometimes"},
    {"action": "dispatch", "set": 1, "media": 1},
    {"action": "relay", "uris": []},
    {"action": "relay", "uris": ["sip:a b@h"]},
    {"action": "relay", "uris": ["tel:+1"]},
    {"action": "relay", "uris": ["sip:a@h"] * 9},
    {"action": "reject", "code": 302, "reason": "Moved"},
    {"action": "reject", "code": 403, "reason": "Bad\r\nX-Injected: 1"},
    {"action": "fallback", "reason": "no-policy"},
])
def test_an_edge_answer_kamailio_would_refuse_is_not_carried_out(answer):
    assert kamailio_vars({"tx": "1:2", "hdrs": "", **answer}) is None


# -- the last good copy ------------------------------------------------------------------------
def _tamper(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"agents":{', b'"agents":{"evil":{},', 1))


def test_a_process_that_never_saw_a_good_file_uses_the_edges_last_good_copy(tmp_path, policy):
    path, key, cache = tmp_path / "edge.policy", key_file(tmp_path), tmp_path / "cache" / "last-good"
    cache.parent.mkdir()
    bundle.write(path, policy.source, KEY)
    first = EdgeDecider(str(path), str(key), Logged(), cache_path=str(cache))
    assert first.decide(json.dumps(request("02079460001")), lambda k: False).deferred == ""
    assert cache.read_bytes() == path.read_bytes()  # the file that verified, as it was
    _tamper(path)
    # another Kamailio process (or Kamailio restarted) meets the tampered file first
    log = Logged()
    second = EdgeDecider(str(path), str(key), log, cache_path=str(cache))
    outcome = second.decide(json.dumps(request("09090000000")), lambda k: False)
    assert json.loads(outcome.answer)["code"] == 403  # the premium reject of the last good policy
    assert second.policy.version == policy.version
    assert [level for level, _ in log[:2]] == ["error", "info"] and "last good copy" in log[1][1]
    # a copy that does not verify is no policy either
    _tamper(cache)
    third = EdgeDecider(str(path), str(key), log, cache_path=str(cache))
    assert third.decide(json.dumps(request()), lambda k: False).deferred == "no-policy"
    assert "unusable" in log[-1][1]


def test_a_process_holding_an_older_policy_takes_the_newer_last_good_copy(tmp_path, policy):
    path, key, cache = tmp_path / "edge.policy", key_file(tmp_path), tmp_path / "last-good"
    bundle.write(path, policy.source, KEY)
    clock = Clock()
    idle = EdgeDecider(str(path), str(key), Logged(), clock, cache_path=str(cache))
    idle.refresh()
    newer = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": RULES.replace(
        "route_agent: billing", "reject: {code: 480, reason: Closed}")})
    bundle.write(path, newer.source, KEY)
    busy = EdgeDecider(str(path), str(key), Logged(), cache_path=str(cache))
    busy.refresh()  # verified the new file first: it is the edge's last good copy now
    os.utime(cache, (os.path.getmtime(cache) + 1,) * 2)  # (written after the idle one loaded its policy)
    _tamper(path)
    clock.now += RECHECK_S
    idle.refresh()
    assert idle.policy.version == newer.version


# -- the reject a call keeps in the fallback ---------------------------------------------------
def test_a_deferred_call_carries_the_reject_the_policy_would_give_it(tmp_path, policy):
    _, decide, _, _, _ = decider_for(tmp_path, policy, hot={"source|192.0.2.7"})
    # a hot source: the controller counts exactly; the premium number is refused whatever it counts
    deferred = decide(request("09090000000"))
    assert deferred.deferred == "hot" and deferred.floor == (403, "Destination Blocked")
    assert decide(request("02079460001")).floor is None  # routed if the controller does not answer
    # a decision webhook's own fallback decides what happens without the controller
    webhook = policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": textwrap.dedent("""\
        rules:
          - name: ask
            match: {ruri: "+442079460002"}
            actions: [ask_webhook: {url: "http://127.0.0.1:9/hook", fallback: [reject: {code: 480}]}]
        """)})
    (tmp_path / "webhook").mkdir()
    _, decide, _, _, _ = decider_for(tmp_path / "webhook", webhook)
    outcome = decide(request("02079460002"))
    assert outcome.deferred == "webhook" and outcome.floor == (480, "Temporarily Unavailable")


def test_an_edge_that_leaves_every_call_to_the_controllers_still_knows_its_rejects(tmp_path, policy):
    decider, _, _, _, _ = decider_for(tmp_path, policy)
    assert decider.floor(json.dumps(request("09090000000"))) == EdgeOutcome("controller", floor=(403, "Destination Blocked"))
    assert decider.floor(json.dumps(request("02079460001"))).floor is None
    assert decider.floor("not json").deferred == "bad-request"
    nothing = EdgeDecider(str(tmp_path / "none"), str(key_file(tmp_path)), Logged())
    assert nothing.floor(json.dumps(request("09090000000"))).deferred == "no-policy"

