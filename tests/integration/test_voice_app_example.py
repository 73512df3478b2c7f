"""examples/voice_app.py against the shipped policies (policies/): every action document it
answers or sends names what they declare, at the address their `partner-webhook` rule asks;
and against the local stack: a SIPp caller → real Kamailio → the controller (the shipped
declarations, a rule asking the app), the call reaches the media node (the fake ARI stands in
for Asterisk's Stasis side), the fork the app asked for starts, the app hears fork.started
through its events webhook and moves the call to the billing agent through the REST API."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from controller.app import MEDIA, STORE, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.localstack.sipp import run_uac
from tests.support.fake_ari import FakeAri
from tests.support.kamailio import wait_clients

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
                                reason="kamailio, sipp and redis-server binaries are required")
SECRET, TOKEN = "w" * 32, "t" * 32
ROUTING = """\
rules:
  - name: partner-webhook
    actions:
      - ask_webhook: {{url: "http://127.0.0.1:{port}/hooks/call-initiated", timeout_ms: 600,
                      fallback: [route_agent: intake]}}
default:
  actions: [route_agent: intake]
"""


def load_example(monkeypatch):
    monkeypatch.setenv("CALLFABRIC_API", "http://127.0.0.1:8460")
    monkeypatch.setenv("CALLFABRIC_TOKEN", TOKEN)
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    spec = importlib.util.spec_from_file_location("voice_app_example", ROOT / "examples" / "voice_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_answers_with_what_the_shipped_policy_declares(monkeypatch):
    from aiohttp.test_utils import TestClient, TestServer

    from controller.api.webhooks import SIGNATURE_HEADER, sign
    from controller.policy import load_policy
    from controller.policy.answers import decision_from_answer
    from controller.policy.testing import build_call

    example = load_example(monkeypatch)
    policy = await asyncio.to_thread(load_policy, ROOT / "policies")
    asked = policy.decide(build_call({"from": "+12025550123", "to": "+18005550300", "at": "2026-11-25T10:00"},
                                     policy.source.settings.timezone))
    assert asked.outcome == "webhook" and asked.rule == "partner-webhook"
    url = urlsplit(asked.webhook.url)
    assert url.port == 8081 and 'os.environ.get("PORT", "8081")' in (ROOT / "examples" / "voice_app.py").read_text()
    assert example.API == "http://127.0.0.1:8460/v1"
    assert url.path in {r.resource.canonical for r in example.app.router.routes()}
    async with TestClient(TestServer(example.app)) as client:
        for caller, outcome, target in (("+12025550123", "agent", "intake"), ("+14155550100", "sip", "vip-desk")):
            body = json.dumps({"type": "call.initiated", "call_id": "c1", "data": {"from": caller}}).encode()
            response = await client.post(url.path, data=body, headers={SIGNATURE_HEADER: sign(SECRET, int(time.time()),
                                                                                               body)})
            decision = decision_from_answer(policy.source, asked, await response.json())
            assert (decision.outcome, (decision.agent or decision.destination).name) == (outcome, target)
    assert "billing" in policy.source.agents      # what it moves callers to mid-call


@pytest.fixture
def media_uas(procs):
    return procs.uas("uas_answer.xml", "asterisk-sip-side")


@pytest.fixture
def kamailio(procs, media_uas):
    return procs.kamailio({1: [media_uas.addr]}, decision_timeout_ms=1000)


@pytest.fixture
def voice_app(tmp_path):
    port = free_port()
    return {"port": port, "log": tmp_path / "voice_app.log"}


async def test_the_example_app_routes_follows_and_transfers_a_call(tmp_path, redis_url, kamailio, media_uas, voice_app):
    fake = await FakeAri(stasis_delay=0.005).start()
    policy_dir = tmp_path / "policy"
    await asyncio.to_thread(policy_dir.mkdir)
    await asyncio.to_thread(shutil.copy, ROOT / "policies" / "00-declarations.yaml", policy_dir)
    await asyncio.to_thread((policy_dir / "20-routing.yaml").write_text, ROUTING.format(port=voice_app["port"]))
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_url, instance_id="example",
                        edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], edge_decision_budget_ms=1000,
                        http_listen=f"127.0.0.1:{free_port()}", ari_nodes=[f"media1=http://callfabric:secret@127.0.0.1:{fake.port}/ari"],
                        webhook_url=f"http://127.0.0.1:{voice_app['port']}/hooks/events", webhook_secret=SECRET,
                        api_tokens=[f"voice-app:read,control:{TOKEN}"])
    app = build_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(settings.http_listen.split(":")[1])).start()
    env = {**os.environ, "CALLFABRIC_API": f"http://{settings.http_listen}", "CALLFABRIC_TOKEN": TOKEN,
           "WEBHOOK_SECRET": SECRET, "PORT": str(voice_app["port"])}
    log = await asyncio.to_thread(open, voice_app["log"], "wb")
    example = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, str(ROOT / "examples" / "voice_app.py")], env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await asyncio.to_thread(wait_clients, kamailio, 1)
        await fake.wait_for_app("callfabric")
        for _ in range(100):  # the example app is listening
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", voice_app["port"])
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        caller = asyncio.create_task(asyncio.to_thread(run_uac, tmp_path, kamailio.sip_port, "uac_call.xml",
                                                       service="18005550123", hold_ms=4000, timeout_s=20))
        invite = None
        deadline = time.monotonic() + 10
        while invite is None:
            invites = await asyncio.to_thread(media_uas.invites)
            invite = invites[0] if invites else None
            assert time.monotonic() < deadline, "the call never reached the media node"
            await asyncio.sleep(0.05)
        call_id = invite.header("Call-ID")[0]
        assert invite.header("X-Callfabric-Agent") == ["intake"]  # the app's answer decided
        # Asterisk's side: the routed call enters our Stasis application.
        await fake.inbound_call("callfabric", [call_id, "intake"], sip_call_id=call_id)
        plane = app[MEDIA]
        deadline = time.monotonic() + 10
        while not (plane.calls.get(call_id) and plane.calls[call_id].agent
                   and plane.calls[call_id].agent.name == "billing"):
            assert time.monotonic() < deadline, "the example app did not move the call to billing"
            await asyncio.sleep(0.05)
        media = plane.calls[call_id]
        assert [(f.target, f.state) for f in media.forks.values()] == [("stt", "up")]  # the app asked for it
        deadline = time.monotonic() + 10     # the plane moves on first; its timeline steps are written after
        while not {"fork_started", "transfer_completed"} <= {e["event"] for e in await app[STORE].timeline(call_id)}:
            assert time.monotonic() < deadline, [e["event"] for e in await app[STORE].timeline(call_id)]
            await asyncio.sleep(0.05)
        decided = (await app[STORE].timeline(call_id))[0]
        assert decided["webhook"]["applied"] == "answer"
        result = await caller
        assert result.successful == 1, result.output
        for _ in range(100):
            output = await asyncio.to_thread(voice_app["log"].read_text)
            if "transfer.completed" in output:
                break
            await asyncio.sleep(0.05)
        assert "fork.started" in output and "transfer.completed" in output, output
    finally:
        os.killpg(example.pid, signal.SIGTERM)
        await asyncio.to_thread(example.wait, 10)
        log.close()
        await runner.cleanup()
        await fake.stop()
