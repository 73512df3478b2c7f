"""Fallback routing never connects a call the last good policy rejects (issue 18: a controller
restarted while a broken file sat in the policy directory had no policy, every call got the
edge's fallback, and a call to a premium-rate number the policy blocks was connected).

Real Kamailio, SIPp, Redis; the controller as its own process (frozen with SIGSTOP, restarted).
The policy blocks +1900 (premium) with a rule; a `match` detector also watches premium numbers
(a low score: it only makes the edge leave those calls to a controller, so that with edge
decisions on they meet every fallback path too). Every path is tried with the edge deciding
the common calls (EDGE_DECIDE 1), with the edge leaving every call to the controllers but
keeping the policy's rejects (EDGE_DECIDE 0), and without the policy at the edge (no
EDGE_POLICY: only what the controllers can do themselves)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from controller.localstack.sipp import run_uac
from controller.state.policycopy import LAST_GOOD_KEY
from tests.support.ha import ControllerProcess
from tests.support.kamailio import HAS_APP_PYTHON3, wait_clients

pytestmark = pytest.mark.skipif(any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
                                reason="kamailio, sipp and redis-server binaries are required")
needs_python = pytest.mark.skipif(not HAS_APP_PYTHON3, reason="Kamailio's app_python3 module is not installed "
                                                              "(kamailio-python3-modules; .ci/run installs it)")

PREMIUM, ORDINARY = "19005551234", "18005550100"
POLICY = """\
settings:
  numbering: {country_code: "1", national_prefix: "1", international_prefix: "011"}
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
risk_lists:
  premium: ["+1900"]
security:
  detectors:
    - {name: premium-watch, kind: match, when: {destination_risk: premium}, score: 10}
  outcomes:
    reject: {at_least: 100}
rules:
  - name: premium-blocked
    match: {destination_risk: premium}
    actions: [reject: {code: 403, reason: Destination Blocked}]
default:
  actions: [route_agent: intake]
"""
BROKEN = "rules:\n  - name: half-written\n    match: [\n"


class Edge:
    """Kamailio (with the policy at the edge or not) + a SIPp media node, and the controller's
    settings for it."""

    def __init__(self, tmp_path: Path, procs, redis_url: str, mode: str, **kamailio_kw):
        self.tmp = tmp_path
        self.mode = mode  # decide | floor | none
        self.redis_url = redis_url
        self.media = procs.uas("uas_answer.xml", "media")
        edge_policy = tmp_path / "edge" / "edge.policy" if mode != "none" else None
        if edge_policy is not None:
            edge_policy.parent.mkdir(exist_ok=True)
        defines = {"EDGE_DECIDE": "0"} if mode == "floor" else {}
        self.kamailio = procs.kamailio({1: [self.media.addr]}, edge_policy=edge_policy, cb_threshold=2,
                                       extra_defines=defines, **kamailio_kw)
        self.policy_dir = tmp_path / "policies"
        self.policy_dir.mkdir()
        (self.policy_dir / "policy.yaml").write_text(POLICY)
        self.procs = procs
        self.controllers: list[ControllerProcess] = []

    def controller(self, name: str, **settings) -> ControllerProcess:
        """Start a controller process (blocking: call through asyncio.to_thread)."""
        values = {"policy_dir": str(self.policy_dir), "policy_poll_s": 0.3, "redis_url": self.redis_url,
                  "edge_evapi": [f"127.0.0.1:{self.kamailio.evapi_port}"],
                  "edge_rpc": [f"http://127.0.0.1:{self.kamailio.http_port}/RPC"],
                  "policy_last_good_file": str(self.tmp / f"{name}-last-good.json")}
        if self.kamailio.edge_policy is not None:
            values.update(edge_policy_file=str(self.kamailio.edge_policy),
                          edge_policy_key_file=str(self.kamailio.edge_policy_key))
        values.update(settings)
        controller = self.procs.add(ControllerProcess(self.tmp, name, values)).start()
        self.controllers.append(controller)
        controller.wait_ready()
        return controller

    async def call(self, number: str, expect: int | None = None, **kw):
        scenario = "uac_reject.xml" if expect else "uac_call.xml"
        extra = {"code": expect} if expect else {}
        return await asyncio.to_thread(run_uac, self.tmp, self.kamailio.sip_port, scenario, service=number,
                                       timeout_s=kw.pop("timeout_s", 10), **extra, **kw)

    async def premium_is_refused(self, why: str) -> None:
        result = await self.call(PREMIUM, expect=403)
        assert result.successful == 1, (why, result.output)
        assert any(line.startswith("SIP/2.0 403 Destination Blocked") for line in result.status_lines()), why
        invites = await asyncio.to_thread(self.media.invites)
        assert not [m for m in invites if PREMIUM in m.first_line], f"{why}: the premium call reached a media node"

    async def ordinary_is_routed(self, why: str, fallback: str | None) -> None:
        """Routed to the media node, by a decision (fallback None) or by the fallback
        (its reason, or reasons joined with |)."""
        result = await self.call(ORDINARY)
        assert result.successful == 1, (why, result.output)
        call_id = [c for m in result.messages for c in m.header("Call-ID")][0]
        invite = [m for m in await asyncio.to_thread(self.media.invites) if call_id in m.header("Call-ID")][0]
        expected = [[reason] for reason in fallback.split("|")] if fallback else [[]]
        assert invite.header("X-Callfabric-Fallback") in expected, (why, invite.raw)

    async def edge_metric(self, name: str, label: str) -> float:
        return await asyncio.to_thread(self.kamailio.metric, f"kamailio_callfabric_{name}", label)

    async def edge_policy_written(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.kamailio.edge_policy.exists):
            assert time.monotonic() < deadline, "the controller never wrote the edge policy"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.3)  # every worker looks at it (once a second)


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s")


@pytest.fixture
async def redis_client(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


# ===============================================================================================
async def test_a_controller_restarted_with_a_broken_policy_file_keeps_rejecting_what_it_rejected(
        tmp_path, procs, redis_url, redis_client):
    edge = await asyncio.to_thread(Edge, tmp_path, procs, redis_url, "none")
    first = await asyncio.to_thread(edge.controller, "first")
    await edge.premium_is_refused("served from the files")
    await wait_for(lambda: redis_client.exists(LAST_GOOD_KEY), what="the last good policy kept in Redis")
    await asyncio.to_thread(first.stop)
    await asyncio.to_thread((edge.policy_dir / "policy.yaml").write_text, BROKEN)

    second = await asyncio.to_thread(edge.controller, "second")
    await edge.premium_is_refused("restarted with a broken file: the last good policy serves")
    await edge.ordinary_is_routed("restarted with a broken file", fallback=None)  # decided, not a fallback
    code, health = await asyncio.to_thread(_health, second)
    assert code == 503 and health["policy"]["from"] == "last-good (redis)" and health["policy"]["files"] == "refused"
    assert "SERVING THE LAST GOOD POLICY" in await asyncio.to_thread(second.log_text)
    await asyncio.to_thread(second.stop)

    # a new, empty Redis: the controller's own copy (policy_last_good_file) still has it
    await redis_client.flushall()
    await asyncio.to_thread(shutil.copy, edge.tmp / "first-last-good.json", edge.tmp / "third-last-good.json")
    third = await asyncio.to_thread(edge.controller, "third")
    await edge.premium_is_refused("restarted with a broken file and an empty Redis")
    code, health = await asyncio.to_thread(_health, third)
    assert health["policy"]["from"].startswith("last-good (file ")


def _health(controller: ControllerProcess) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{controller.http}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ===============================================================================================
@needs_python
@pytest.mark.parametrize("mode", ["decide", "floor"])
async def test_no_fallback_path_routes_a_call_the_edges_policy_rejects(tmp_path, procs, redis_url, redis_client,
                                                                       mode):
    edge = await asyncio.to_thread(Edge, tmp_path, procs, redis_url, mode)

    def fallback(reason: str) -> str | None:
        return None if mode == "decide" else reason  # (the edge decides ordinary calls itself)
    controller = await asyncio.to_thread(edge.controller, "serving")
    await edge.edge_policy_written()
    await edge.premium_is_refused("a controller answers")
    await edge.ordinary_is_routed("a controller answers", fallback=None)

    # 1. the controller frozen: the decision budget runs out (timeout), then its breaker opens
    os.killpg(controller.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(10):  # timeouts, then the breaker (one probe a second gets a timeout again)
            await edge.premium_is_refused("frozen controller")
            if await edge.edge_metric("fallback_rejected_total", 'reason="circuit-open"') >= 1:
                break
        assert await edge.edge_metric("fallback_rejected_total", 'reason="timeout"') >= 1
        assert await edge.edge_metric("fallback_rejected_total", 'reason="circuit-open"') >= 1
        await edge.ordinary_is_routed("frozen controller", fallback=fallback("circuit-open|timeout"))
    finally:
        os.killpg(controller.proc.pid, signal.SIGCONT)
    await asyncio.to_thread(controller.stop)
    await asyncio.to_thread(wait_clients, edge.kamailio, 0)

    # 2. no controller connected
    await edge.premium_is_refused("no controller")
    await edge.ordinary_is_routed("no controller", fallback=fallback("no-controller"))
    assert await edge.edge_metric("fallback_rejected_total", 'reason="no-controller"') >= 1

    # 3. a controller that has no policy at all (broken files, nothing kept anywhere) answers
    #    "fallback no-policy": the edge still holds the last policy one served
    await asyncio.to_thread((edge.policy_dir / "policy.yaml").write_text, BROKEN)
    await redis_client.flushall()
    await asyncio.to_thread(edge.controller, "empty", policy_last_good_file="")
    await edge.premium_is_refused("a controller without a policy")
    await edge.ordinary_is_routed("a controller without a policy", fallback=fallback("controller-no-policy"))
    assert await edge.edge_metric("fallback_rejected_total", 'reason="controller-no-policy"') >= 1


# ===============================================================================================
async def test_without_the_policy_at_the_edge_the_controller_still_refuses_what_it_cannot_decide(
        tmp_path, procs, redis_url):
    edge = await asyncio.to_thread(Edge, tmp_path, procs, redis_url, "none")
    # Redis unreachable, the controller set to leave such calls to the edge's fallback
    await asyncio.to_thread(edge.controller, "no-redis", redis_url="redis://127.0.0.1:1/0",
                            redis_outage_decisions="edge", policy_last_good_file="")
    await edge.premium_is_refused("call store unavailable")
    await edge.ordinary_is_routed("call store unavailable", fallback="controller-state-unavailable")
    await asyncio.to_thread(edge.controllers[-1].stop)
    await asyncio.to_thread(wait_clients, edge.kamailio, 0)
    # a controller that sheds every decide (overloaded)
    await asyncio.to_thread(edge.controller, "overloaded", edge_max_in_flight=0)
    await edge.premium_is_refused("overloaded controller")
    await edge.ordinary_is_routed("overloaded controller", fallback="controller-overload")
    # what no controller can help with is said at the edge's start
    assert "FALLBACK=open without EDGE_POLICY" in await asyncio.to_thread(edge.kamailio.log_text)
