"""The edge deciding calls itself (EDGE_POLICY: the policy the controller writes, run by
Kamailio's embedded Python), with real Kamailio, SIPp and Redis: routed and rejected per
policy and recorded by the controller, still routed per policy with no controller at all, a
source near a limit handed back to the controller's exact counters, a policy change reaching
the edge."""
from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from controller.edge import bundle
from controller.edge.local import RECHECK_S
from tests.integration.test_edge_slice import POLICY, Controller, Stack, call_ids, invites, wait_state
from tests.integration.test_security_edge import clear_of_window_edges
from tests.support.kamailio import HAS_APP_PYTHON3, wait_clients

pytestmark = [pytest.mark.usefixtures("redis_url"),
              pytest.mark.skipif(any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
                                 reason="kamailio, sipp and redis-server binaries are required"),
              pytest.mark.skipif(not HAS_APP_PYTHON3, reason="Kamailio's app_python3 module is not installed "
                                                             "(kamailio-python3-modules; .ci/run installs it)")]


@pytest.fixture
def stack(tmp_path, procs, redis_url):
    return Stack(tmp_path, procs, redis_url, decide_at_edge=True)


async def edge_policy_version(stack: Stack, other_than: str | None = None, timeout: float = 10.0) -> str:
    """The policy version in the edge's file, once there (and different from `other_than`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            version = (await asyncio.to_thread(
                lambda: bundle.read(stack.edge_policy, bundle.read_key(stack.kamailio.edge_policy_key)))).version
        except bundle.BundleError:
            version = None
        if version and version != other_than:
            return version
        await asyncio.sleep(0.05)
    raise AssertionError("the controller did not write the edge policy")


async def start_controller(stack: Stack, **overrides) -> Controller:
    controller = await Controller(stack.settings(**overrides)).start(stack.kamailio)
    await edge_policy_version(stack)
    return controller


async def test_the_edge_routes_and_rejects_per_policy_and_the_controller_records_it(stack, store):
    controller = await start_controller(stack)
    try:
        result = await stack.call("18005550200", from_user="2025550123")
        assert result.rc == 0 and result.successful == 1, result.output
        (call_id,) = call_ids(result)
        (invite,) = (await invites(stack.sales, call_id=call_id))[:1]
        assert invite.header("X-Callfabric-Agent") == ["sales"] and invite.header("X-Callfabric-Rule") == ["sales-line"]
        assert invite.header("X-Campaign") == ["spring"] and invite.header("X-Caller") == ["+12025550123"]
        assert not invite.header("X-Callfabric-Fallback")
        record = await wait_state(store, call_id, "ended")
        assert record["decided_by"] == "edge" and record["controller"] == "test-controller"
        assert record["rule"] == "sales-line" and record["target"] == "sales" and record["end_reason"] == "bye-caller"
        assert invite.header("X-Callfabric-Policy") == [record["policy_version"]]
        timeline = await store.timeline(call_id)
        assert [e["event"] for e in timeline] == ["decided", "answered", "ended"]
        assert timeline[0]["decided_by"] == "edge" and timeline[0]["decide_ms"] >= 0

        rejected = await stack.call("19005551234", "uac_reject.xml", code=403)
        assert rejected.rc == 0 and rejected.successful == 1, rejected.output
        assert any(line.startswith("SIP/2.0 403 Destination Blocked") for line in rejected.status_lines())
        (rejected_id,) = call_ids(rejected)
        assert (await wait_state(store, rejected_id, "failed"))["decided_by"] == "edge"

        assert controller.metric("callfabric_edge_made_decisions_total", outcome="agent") == 1
        assert controller.metric("callfabric_edge_made_decisions_total", outcome="reject") == 1
        assert controller.metric("callfabric_decision_duration_seconds_count") == 0  # nothing was asked
        assert await store.live_calls() == []
    finally:
        await controller.stop()


async def test_the_edge_reads_the_requests_fields_as_its_decide_event_carries_them(stack, store):
    """The edge's Python reads a plain request's fields from Kamailio itself (not the decide
    event's JSON): the record has what the caller sent; a field that is null (SIPp sends no
    User-Agent) is empty, as in the decide event."""
    controller = await start_controller(stack)
    try:
        result = await stack.call("18005550200", from_user="2025550123")
        assert result.rc == 0 and result.successful == 1, result.output
        (call_id,) = call_ids(result)
        (invite,) = (await invites(stack.sales, call_id=call_id))[:1]
        record = await wait_state(store, call_id, "ended")
        assert record["decided_by"] == "edge"
        (sent_from,) = invite.header("From")
        from_uri, from_tag = sent_from.split("<", 1)[1].split(">", 1)[0], sent_from.split(";tag=", 1)[1]
        (sent_to,) = invite.header("To")
        to_uri = sent_to.split("<", 1)[1].split(">", 1)[0]
        assert (record["from_uri"], record["from_tag"], record["to_uri"]) == (from_uri, from_tag, to_uri)
        assert record["ruri"] == to_uri and record["dialled"] == "+18005550200" and record["caller"] == "+12025550123"
        assert record["src"] == f"127.0.0.1:{from_uri.rsplit(':', 1)[1]}" and record["transport"] == "udp"
        assert record.get("user_agent", "") == "" and record.get("trunk", "") == ""
        assert record["tx"] and ":" in record["tx"]
    finally:
        await controller.stop()


async def test_with_no_controller_the_edge_still_applies_the_policy(stack, store):
    controller = await start_controller(stack)
    await controller.stop()
    await asyncio.to_thread(wait_clients, stack.kamailio, 0)
    result = await stack.call("18005550200")
    assert result.rc == 0 and result.successful == 1, result.output
    (call_id,) = call_ids(result)
    (invite,) = (await invites(stack.sales, call_id=call_id))[:1]
    assert invite.header("X-Callfabric-Rule") == ["sales-line"] and not invite.header("X-Callfabric-Fallback")
    assert await store.get(call_id) is None  # nobody to record it: the edge counts it as dropped
    metrics = await asyncio.to_thread(stack.kamailio.http_get, "/metrics")
    assert 'callfabric_events_dropped_total{why="no-controller"}' in metrics[1]


LANGUAGES = POLICY.replace("rules:\n", """rules:
  - name: french
    match: {{header: {{name: X-Lang, equals: fr}}}}
    actions: [route_agent: sales]
""", 1)


async def test_the_edge_matches_on_the_callers_headers(stack, store):
    """The edge's Python reads a plain ASCII request's headers itself, and those of any other
    request from its decide event: the same decisions either way."""
    await asyncio.to_thread((stack.policy_dir / "policy.yaml").write_text,
                            LANGUAGES.format(pbx_busy=stack.pbx_busy.addr, pbx=stack.pbx.addr))
    controller = await start_controller(stack)
    try:
        for headers, rule in ((["X-Lang: fr"], "french"), (["X-Lang: de", "x-lang: fr"], "french"),
                              (["X-Lang: de"], "default"), (["X-Lang: fr", "X-Note: caf\u00e9"], "french"),
                              (["X-Lang: de", "X-Note: caf\u00e9"], "default")):
            result = await stack.call("18005559999", headers=[tuple(h.split(": ", 1)) for h in headers])
            assert result.rc == 0 and result.successful == 1, (headers, result.output)
            (call_id,) = call_ids(result)
            record = await wait_state(store, call_id, "ended")
            assert (record["decided_by"], record["rule"]) == ("edge", rule), headers
            assert bool(await invites(stack.sales, call_id=call_id)) is (rule == "french"), headers
        metrics = (await asyncio.to_thread(stack.kamailio.http_get, "/metrics"))[1]
        assert [line for line in metrics.splitlines() if line.startswith("callfabric_edge_deferred_total{")] == []
    finally:
        await controller.stop()


CAPPED = POLICY.replace("rules:\n", """rules:
  - name: source-cap
    match: {{calls_in_window: {{scope: source, window: 60s, at_least: 4}}}}
    actions: [reject: {{code: 503, reason: Rate Limited}}]
""", 1)


def hot_at_edge(kamailio, scope: str) -> bool:
    try:
        kamailio.jsonrpc("htable.get", ["cfhot", scope])
    except RuntimeError:  # jsonrpc error: no such item
        return False
    return True


async def test_a_source_near_a_limit_is_decided_by_the_controller_with_exact_counts(stack, store):
    await asyncio.to_thread((stack.policy_dir / "policy.yaml").write_text,
                            CAPPED.format(pbx_busy=stack.pbx_busy.addr, pbx=stack.pbx.addr))
    controller = await start_controller(stack)
    await clear_of_window_edges()  # the window's sliding estimate under-counts just after a minute edge
    try:
        decided = []
        for n in range(6):  # one source (127.0.0.1): the cap's limit is 4, the edge lets go at 2
            if n < 4:
                result = await stack.call("18005559999")
            else:
                result = await stack.call("18005559999", "uac_reject.xml", code=503)
            assert result.rc == 0 and result.successful == 1, (n, result.output)
            (call_id,) = call_ids(result)
            record = await wait_state(store, call_id, "failed" if n >= 4 else "ended")
            decided.append((record["decided_by"], record["rule"]))
            if n == 1:  # two calls counted: half the cap, the controller reads it and tells the edge
                deadline = time.monotonic() + 10
                while not await asyncio.to_thread(hot_at_edge, stack.kamailio, "source|127.0.0.1"):
                    assert time.monotonic() < deadline, "the source was never marked hot at the edge"
                    await asyncio.sleep(0.05)
        assert decided == [("edge", "default"), ("edge", "default"), ("controller", "default"),
                           ("controller", "default"), ("controller", "source-cap"), ("controller", "source-cap")]
        assert controller.metric("callfabric_hot_scopes_total", result="pushed") >= 1
        hot = await asyncio.to_thread(stack.kamailio.jsonrpc, "htable.get", ["cfhot", "source|127.0.0.1"])
        assert hot["item"]["value"] == 1, hot
    finally:
        await controller.stop()


async def test_a_policy_change_reaches_the_edge(stack, store):
    controller = await start_controller(stack)
    try:
        first = await edge_policy_version(stack)
        changed = POLICY.replace("actions: [route_agent: sales, add_headers: {{X-Campaign: spring, "
                                 "X-Caller: \"${{caller}}\"}}, max_duration: 1h]",
                                 "actions: [reject: {{code: 480, reason: Closed Today}}]")
        assert changed != POLICY
        await asyncio.to_thread((stack.policy_dir / "policy.yaml").write_text,
                                changed.format(pbx_busy=stack.pbx_busy.addr, pbx=stack.pbx.addr))
        await edge_policy_version(stack, other_than=first)
        await asyncio.sleep(RECHECK_S + 0.3)  # every worker looks at the file again
        result = await stack.call("18005550200", "uac_reject.xml", code=480)
        assert result.rc == 0 and result.successful == 1, result.output
        (call_id,) = call_ids(result)
        record = await wait_state(store, call_id, "failed")
        assert record["decided_by"] == "edge" and record["policy_version"] != first and record["end_code"] == 480
    finally:
        await controller.stop()


async def test_an_edge_that_cannot_load_the_deciding_code_leaves_every_call_to_the_controller(
        tmp_path, procs, redis_url, store, monkeypatch):
    monkeypatch.setenv("CALLFABRIC_HOME", str(tmp_path / "no-callfabric-here"))
    monkeypatch.setenv("PYTHONPATH", "")
    # Kamailio starts with that environment (processes: started off the loop)
    stack = await asyncio.to_thread(Stack, tmp_path, procs, redis_url, decide_at_edge=True)
    controller = await start_controller(stack)
    try:
        result = await stack.call("18005550200")
        assert result.rc == 0 and result.successful == 1, result.output
        (call_id,) = call_ids(result)
        record = await wait_state(store, call_id, "ended")
        assert record["decided_by"] == "controller" and record["rule"] == "sales-line"
        metrics = (await asyncio.to_thread(stack.kamailio.http_get, "/metrics"))[1]
        assert 'callfabric_edge_deferred_total{reason="no-code"} 1' in metrics
        assert "edge decisions off: cannot load callfabric" in await asyncio.to_thread(stack.kamailio.log_text)
    finally:
        await controller.stop()


async def test_a_tampered_or_unsigned_policy_file_is_refused_loudly_and_the_last_good_keeps_deciding(stack, store):
    """The file is data with a MAC: whoever can write the policy volume but does not hold the
    key (tampering, a file of the old unsigned format, one signed with another key) gets it
    refused at the edge — logged, counted once per file — and the edge goes on deciding with the
    last policy that verified."""
    controller = await start_controller(stack)
    good = await edge_policy_version(stack)
    result = await stack.call("18005550200")
    assert result.successful == 1 and (await wait_state(store, call_ids(result)[0], "ended"))["decided_by"] == "edge"
    await controller.stop()  # nobody rewrites the file now
    await asyncio.to_thread(wait_clients, stack.kamailio, 0)
    signed = await asyncio.to_thread(stack.edge_policy.read_bytes)
    payload = signed.split(b"\n", 2)[2]
    # the premium reject turned into a route to the sales agent, MAC left as it was
    tampered = signed.replace(b'"reject_code":403', b'"reject_code":480', 1)
    assert tampered != signed
    forged_key = bundle.MAGIC + bundle.MAC_PREFIX + bundle._mac(b"attacker-key-" * 3, payload) + b"\n" + payload
    for bad, reason in ((tampered, "bad-mac"), (bundle.MAGIC + payload, "unsigned"),
                        (b"callfabric-edge-policy\n" + payload, "format"), (forged_key, "bad-mac")):
        await asyncio.to_thread(stack.edge_policy.write_bytes, bad)
        metric = f'kamailio_callfabric_edge_policy_refused_total{{reason="{reason}"}}'
        before = await asyncio.to_thread(stack.kamailio.metric, metric.split("{")[0], f'reason="{reason}"')
        await asyncio.sleep(RECHECK_S + 0.2)
        # a premium number stays rejected by the last good policy, at the edge, with no controller
        rejected = await stack.call("19005551234", "uac_reject.xml", code=403)
        assert rejected.successful == 1, (reason, rejected.output)
        for _ in range(3):  # every worker gets a call: the file is counted once all the same
            assert (await stack.call("18005550200")).successful == 1
        after = await asyncio.to_thread(stack.kamailio.metric, metric.split("{")[0], f'reason="{reason}"')
        assert after == before + 1, (reason, before, after)
    log = await asyncio.to_thread(stack.kamailio.log_text)
    assert "refused (bad-mac): its MAC does not verify" in log and f"still deciding with {good}" in log
    assert "refused (unsigned): the file carries no MAC" in log
    assert await asyncio.to_thread(stack.kamailio.metric, "kamailio_callfabric_edge_deferred_total",
                                   'reason="no-policy"') == 0  # every worker had a policy

    # Kamailio restarted while the file is still tampered with: its copy of the last file that
    # verified (EDGE_POLICY_CACHE) is what it decides with
    await asyncio.to_thread(stack.edge_policy.write_bytes, tampered)
    await asyncio.to_thread(stack.kamailio.stop)
    await asyncio.to_thread(stack.kamailio.start)
    rejected = await stack.call("19005551234", "uac_reject.xml", code=403)
    assert rejected.successful == 1, rejected.output
    routed = await stack.call("18005550200")
    assert routed.successful == 1, routed.output
    (invite,) = (await invites(stack.sales, call_id=call_ids(routed)[0]))[:1]
    assert invite.header("X-Callfabric-Policy") == [good] and not invite.header("X-Callfabric-Fallback")
    log = await asyncio.to_thread(stack.kamailio.log_text)
    assert f"edge policy {good} loaded from the last good copy" in log
