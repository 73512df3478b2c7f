"""The first vertical slice with real components: SIPp caller → real Kamailio
(kamailio/kamailio.cfg) → the controller (YAML policy, decision over evapi) → real Redis call
state, and SIPp UAS standing in for media nodes, agents and a PBX."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from controller.app import EDGES, METRICS, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.sipp import run_uac
from controller.state.calls import CallStore
from tests.support.kamailio import wait_clients
from tests.support.metrics import sample

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None or shutil.which("redis-server") is None,
    reason="kamailio, sipp and redis-server binaries are required")

POLICY = """\
settings:
  numbering: {{country_code: "1", national_prefix: "1", international_prefix: "011"}}
node_sets:
  media: {{dispatcher_set: 1}}
  sales-nodes: {{dispatcher_set: 2}}
  flaky-nodes: {{dispatcher_set: 3}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:4000"}}
  sales: {{node_set: sales-nodes, endpoint: "127.0.0.1:4001"}}
  flaky: {{node_set: flaky-nodes, endpoint: "127.0.0.1:4002"}}
destinations:
  pbx: {{uri: "sip:desk@{pbx_busy}", failover: ["sip:desk@{pbx}"]}}
risk_lists:
  premium: ["+1900"]
rules:
  - name: premium-blocked
    match: {{destination_risk: premium}}
    actions: [reject: {{code: 403, reason: Destination Blocked}}]
  - name: sales-line
    match: {{ruri: "+18005550200"}}
    actions: [route_agent: sales, add_headers: {{X-Campaign: spring, X-Caller: "${{caller}}"}}, max_duration: 1h]
  - name: flaky-line
    match: {{ruri: "+18005550400"}}
    actions: [route_agent: flaky]
  - name: pbx-line
    match: {{ruri: "+18005550300"}}
    actions: [route_sip: pbx]
default:
  actions: [route_agent: intake]
"""


class Stack:
    def __init__(self, tmp_path: Path, procs, redis_url: str, uas_scenario: str = "uas_answer.xml", *,
                 decide_at_edge: bool = False):
        self.tmp = tmp_path
        self.redis_url = redis_url
        self.media = [procs.uas(uas_scenario, "media1"), procs.uas(uas_scenario, "media2")]
        self.sales = procs.uas(uas_scenario, "sales")
        self.flaky = [procs.uas("uas_503.xml", "flaky-503"), procs.uas(uas_scenario, "flaky-ok")]
        self.pbx_busy = procs.uas("uas_503.xml", "pbx-busy")
        self.pbx = procs.uas(uas_scenario, "pbx")
        # decide_at_edge: the edge decides the common calls with the policy the controller writes
        self.edge_policy = tmp_path / "edge.policy" if decide_at_edge else None
        self.kamailio = procs.kamailio({1: [u.addr for u in self.media], 2: [self.sales.addr],
                                        3: [u.addr for u in self.flaky]}, edge_policy=self.edge_policy)
        self.policy_dir = tmp_path / "policy"
        self.policy_dir.mkdir()
        (self.policy_dir / "policy.yaml").write_text(POLICY.format(pbx_busy=self.pbx_busy.addr, pbx=self.pbx.addr))

    def settings(self, **overrides) -> Settings:
        values = dict(policy_dir=str(self.policy_dir), policy_poll_s=0.2, redis_url=self.redis_url,
                      edge_evapi=[f"127.0.0.1:{self.kamailio.evapi_port}"], http_listen=f"127.0.0.1:{free_port()}",
                      instance_id="test-controller")
        if self.edge_policy is not None:
            values.update(edge_policy_file=str(self.edge_policy), edge_policy_key_file=str(self.kamailio.edge_policy_key),
                          edge_rpc=[f"http://127.0.0.1:{self.kamailio.http_port}/RPC"])
        values.update(overrides)
        return Settings(**values)

    async def call(self, service: str, scenario: str = "uac_call.xml", **kw):
        return await asyncio.to_thread(run_uac, self.tmp, self.kamailio.sip_port, scenario, service=service, **kw)


async def invites(*uas_list, call_id: str | None = None) -> list:
    """INVITEs the UAS received (read off the event loop), optionally for one call."""
    found = []
    for uas in uas_list:
        found += await asyncio.to_thread(uas.invites)
    return [m for m in found if call_id is None or call_id in m.header("Call-ID")]


async def uas_call_ids(uas) -> set[str]:
    return await asyncio.to_thread(uas.call_ids)


class Controller:
    """The controller in this process (its own aiohttp app, real Redis, real evapi)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = build_app(settings)
        self.runner = None

    async def start(self, kamailio) -> "Controller":
        from aiohttp import web
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        host, port = self.settings.http_listen.rsplit(":", 1)
        await web.TCPSite(self.runner, host, int(port)).start()
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in self.app[EDGES])), 10)
        await asyncio.to_thread(wait_clients, kamailio, 1)
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    def metric(self, name: str, **labels) -> float:
        """One sample of this controller's metrics; a missing one fails the test."""
        return sample(self.app[METRICS].registry, name, **labels)


@pytest.fixture
def stack(tmp_path, procs, redis_url, request):
    """The stack; `@pytest.mark.parametrize("stack", [scenario], indirect=True)` picks the UAS behaviour."""
    return Stack(tmp_path, procs, redis_url, getattr(request, "param", "uas_answer.xml"))


@pytest.fixture
async def controller(stack):
    c = await Controller(stack.settings()).start(stack.kamailio)
    yield c
    await c.stop()


async def wait_state(store: CallStore, call_id: str, state: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        record = await store.get(call_id)
        if record and record.get("state") == state:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"call {call_id} not {state} in time: {record}")


def call_ids(result) -> list[str]:
    return sorted({c for m in result.messages for c in m.header("Call-ID")})


async def test_calls_are_routed_per_policy_and_recorded(stack, controller, store):
    result = await stack.call("18005550200", from_user="2025550123")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    (invite,) = (await invites(stack.sales, call_id=call_id))[:1]
    assert invite.header("X-Callfabric-Agent") == ["sales"]
    assert invite.header("X-Campaign") == ["spring"] and invite.header("X-Caller") == ["+12025550123"]
    record = await wait_state(store, call_id, "ended")
    assert record["outcome"] == "agent" and record["rule"] == "sales-line" and record["target"] == "sales"
    assert invite.header("X-Callfabric-Policy") == [record["policy_version"]]
    assert record["end_reason"] == "bye-caller" and record["answered_at_ms"] >= record["created_at_ms"]
    assert record["caller"] == "+12025550123" and record["dialled"] == "+18005550200"
    events = [e["event"] for e in await store.timeline(call_id)]
    assert events == ["decided", "answered", "ended"]
    assert not await invites(*stack.media)

    other = await stack.call("18005559999")
    (other_id,) = call_ids(other)
    assert await invites(*stack.media, call_id=other_id)
    assert (await wait_state(store, other_id, "ended"))["rule"] == "default"
    assert controller.metric("callfabric_decisions_total", outcome="agent", rule="sales-line") == 1
    assert controller.metric("callfabric_decision_duration_seconds_count") == 2


async def test_reject_with_code_and_reason(stack, controller, store):
    result = await stack.call("19005551234", "uac_reject.xml", code=403)
    assert result.rc == 0 and result.successful == 1, result.output
    assert any(line.startswith("SIP/2.0 403 Destination Blocked") for line in result.status_lines())
    (call_id,) = call_ids(result)
    record = await wait_state(store, call_id, "failed")
    assert record["outcome"] == "reject" and record["end_code"] == 403 and record["end_reason"] == "rejected"
    assert await store.live_calls() == []


async def test_failover_to_the_second_media_node_when_the_first_answers_503(stack, controller, store):
    result = await stack.call("18005550400", calls=4, rate=10)
    assert result.rc == 0 and result.successful == 4, result.output
    assert len(await uas_call_ids(stack.flaky[1])) == 4  # every call ended up on the healthy node
    assert await invites(stack.flaky[0]), "round robin should have tried the failing node first at least once"
    for call_id in call_ids(result):
        await wait_state(store, call_id, "ended")


async def test_sip_destination_with_failover(stack, controller, store):
    result = await stack.call("18005550300")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    assert await uas_call_ids(stack.pbx_busy) == {call_id} and await uas_call_ids(stack.pbx) == {call_id}
    (invite,) = (await invites(stack.pbx))[:1]
    assert invite.first_line.startswith("INVITE sip:desk@127.0.0.1:")
    record = await wait_state(store, call_id, "ended")
    assert record["outcome"] == "sip" and record["target"] == "pbx"


@pytest.mark.parametrize("stack", ["uas_answer_bye.xml"], indirect=True)
async def test_bye_from_the_callee(stack, controller, store):
    result = await stack.call("18005559999", "uac_wait_bye.xml")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    assert (await wait_state(store, call_id, "ended"))["end_reason"] == "bye-callee"


@pytest.mark.parametrize("stack", ["uas_ring.xml"], indirect=True)
async def test_cancel_before_answer(stack, controller, store):
    result = await stack.call("18005559999", "uac_cancel.xml")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    record = await wait_state(store, call_id, "failed")
    assert record["end_reason"] == "cancel" and record["end_code"] == 487
    assert await store.live_calls() == []


async def test_controller_gone_then_back(stack, controller, store):
    await controller.stop()
    await asyncio.to_thread(wait_clients, stack.kamailio, 0)
    result = await stack.call("18005550200")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    seen = await invites(*stack.media, call_id=call_id)
    assert seen and seen[0].header("X-Callfabric-Fallback") == ["no-controller"]
    back = await Controller(stack.settings()).start(stack.kamailio)
    try:
        result = await stack.call("18005550200")
        (call_id,) = call_ids(result)
        (invite,) = (await invites(stack.sales, call_id=call_id))[:1]
        assert invite.header("X-Callfabric-Agent") == ["sales"] and not invite.header("X-Callfabric-Fallback")
    finally:
        await back.stop()


async def test_no_valid_policy_means_immediate_edge_fallback(stack, store):
    await asyncio.to_thread((stack.policy_dir / "policy.yaml").write_text, "rules: [")
    c = await Controller(stack.settings()).start(stack.kamailio)
    try:
        started = time.monotonic()
        result = await stack.call("18005550200")
        assert result.rc == 0 and result.successful == 1, result.output
        (call_id,) = call_ids(result)
        seen = await invites(*stack.media, call_id=call_id)
        assert seen, "the call should have reached the fallback node set"
        assert seen[0].header("X-Callfabric-Fallback")[0] in ("controller-no-policy", "bad-answer")
        assert c.metric("callfabric_decision_errors_total", reason="no-policy") == 1
        assert time.monotonic() - started < 10
    finally:
        await c.stop()


async def test_two_hundred_calls_leave_no_live_entries(stack, controller, store):
    result = await stack.call("18005559999", calls=200, rate=100, limit=100, hold_ms=50, timeout_s=60)
    assert result.rc == 0 and result.successful == 200, result.output
    ids = call_ids(result)
    assert len(ids) == 200
    deadline = time.monotonic() + 15
    while await store.live_count() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await store.live_count() == 0
    records = await store.get_many(ids)
    assert all(r and r["state"] == "ended" and r["end_reason"] == "bye-caller" for r in records)
    assert controller.metric("callfabric_decisions_total", outcome="agent", rule="default") == 200
    assert controller.metric("callfabric_edge_in_flight") == 0


# A controller in its own process, so it can be frozen with SIGSTOP like a stuck one.
@pytest.fixture
def controller_process(stack, tmp_path):
    settings = stack.settings()
    config = tmp_path / "controller.yaml"
    config.write_text(yaml.safe_dump({
        "policy_dir": settings.policy_dir, "redis_url": settings.redis_url, "redis_mode": settings.redis_mode,
        "redis_nodes": list(settings.redis_nodes), "edge_evapi": settings.edge_evapi,
        "http_listen": settings.http_listen, "instance_id": "frozen-one", "log_level": "INFO"}))
    log = open(tmp_path / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        wait_clients(stack.kamailio, 1, timeout=15)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


async def test_frozen_controller_falls_back_within_budget_then_recovers(stack, controller_process, store):
    warm = await stack.call("18005550200")
    assert warm.successful == 1 and await invites(stack.sales)
    os.killpg(controller_process.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            started = time.monotonic()
            result = await stack.call("18005550200")
            assert result.rc == 0 and result.successful == 1, result.output
            assert time.monotonic() - started < 5  # SIPp start + budget; never a stuck transaction
            (call_id,) = call_ids(result)
            seen = await invites(*stack.media, call_id=call_id)
            assert seen and seen[0].header("X-Callfabric-Fallback")[0] in ("timeout", "circuit-open")
    finally:
        os.killpg(controller_process.pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while True:
        result = await stack.call("18005550200")
        (call_id,) = call_ids(result)
        routed = await invites(stack.sales, call_id=call_id)
        if routed:
            assert routed[0].header("X-Callfabric-Agent") == ["sales"]
            break
        assert time.monotonic() < deadline, "normal routing did not come back after SIGCONT"
        await asyncio.sleep(0.5)
    assert controller_process.poll() is None


async def test_metrics_and_health_endpoints(stack, controller):
    import aiohttp
    await stack.call("18005550200")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{controller.settings.http_listen}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        async with http.get(f"http://{controller.settings.http_listen}/healthz") as response:
            health = await response.json()
            assert response.status == 200
    for name in ("callfabric_decisions_total", "callfabric_decision_duration_seconds_bucket", "callfabric_live_calls",
                 "callfabric_edge_connected", "callfabric_policy_info", "callfabric_policy_reloads_total",
                 "callfabric_dialog_events_total"):
        assert name in text, name
    assert 'callfabric_decisions_total{outcome="agent",rule="sales-line"} 1.0' in text
    assert health["status"] == "ok" and health["redis"] is True and all(health["edges"].values())
    assert health["policy_version"] and f'callfabric_policy_info{{version="{health["policy_version"]}"}} 1.0' in text


async def test_policy_hot_reload_changes_routing_and_a_bad_version_is_refused(stack, controller):
    policy_file = stack.policy_dir / "policy.yaml"
    text = await asyncio.to_thread(policy_file.read_text)
    await asyncio.to_thread(policy_file.write_text, text.replace("actions: [route_agent: intake]", "actions: [route_agent: sales]"))
    deadline = time.monotonic() + 10
    while controller.metric("callfabric_policy_reloads_total", trigger="file", result="accepted") < 1:
        assert time.monotonic() < deadline, "the policy change was not picked up"
        await asyncio.sleep(0.1)
    result = await stack.call("18005559999")
    (call_id,) = call_ids(result)
    assert await invites(stack.sales, call_id=call_id)  # the new default
    await asyncio.to_thread(policy_file.write_text, text.replace("actions: [route_agent: intake]", "actions: [route_agent: nobody]"))
    while controller.metric("callfabric_policy_reloads_total", trigger="file", result="refused") < 1:
        assert time.monotonic() < deadline + 10, "the broken policy was not noticed"
        await asyncio.sleep(0.1)
    result = await stack.call("18005559999")
    (call_id,) = call_ids(result)
    assert await invites(stack.sales, call_id=call_id)  # last good version still serving
