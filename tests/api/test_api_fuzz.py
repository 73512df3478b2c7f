"""Schemathesis against a running controller: generated requests for every operation of the
OpenAPI document — never a 500, every answer documented and shaped as documented, and a
rejected command changes nothing on the media node."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from aiohttp import web

from controller.api.openapi import document
from controller.app import MEDIA, STORE, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.state.calls import now_ms
from tests.api.test_api import ADMIN, POLICY
from tests.support.fake_ari import FakeAri


class Running:
    """The controller and a fake Asterisk on their own event loop thread."""

    def __init__(self, redis_url: str, policy_dir):
        self.loop = asyncio.new_event_loop()
        self.redis_url, self.policy_dir = redis_url, policy_dir
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by start()
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.fake = await FakeAri(stasis_delay=0.002, ring_delay=0.002).start()
        self.settings = Settings(policy_dir=str(self.policy_dir), redis_url=self.redis_url, edge_evapi=[],
                                 http_listen=f"127.0.0.1:{free_port()}", instance_id="fuzz",
                                 ari_nodes=[f"media1=http://callfabric:secret@127.0.0.1:{self.fake.port}/ari"],
                                 api_tokens=[f"ops:admin:{ADMIN}"], phone_token_secret="fuzz-phone-secret-key")
        self.app = build_app(self.settings)
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", int(self.settings.http_listen.split(":")[1])).start()
        await self.fake.wait_for_app("callfabric")
        self.calls = 0
        await self._new_call()

    async def _new_call(self) -> None:
        """A live call for the commands to act on (the next one once a command ended it)."""
        self.calls += 1
        call_id = self.call_id = f"fuzz-{self.calls}@edge"
        decision = {"outcome": "agent", "rule": "default", "agent": {"name": "intake"}, "forks": []}
        await self.app[STORE].create(call_id, {"state": "routing", "outcome": "agent", "decision": decision},
                                     live_scopes={}, window_counters=[], at_ms=now_ms(),
                                     event={"event": "decided", "ts": 1})
        await self.fake.inbound_call("callfabric", [call_id, "intake"], sip_call_id=call_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            media = self.app[MEDIA].calls.get(call_id)
            if media and media.state == "active":
                return
            await asyncio.sleep(0.01)
        # without a live call, "a rejected command changed nothing" would prove nothing
        raise RuntimeError(f"the fuzz target call never became active: {self.app[MEDIA].calls.get(call_id)}")

    def live_call(self) -> str:
        """The id of a live call (a generated hangup or transfer may have ended the last one)."""
        media = self.app[MEDIA].calls.get(self.call_id)
        if media is None or media.state != "active":
            asyncio.run_coroutine_threadsafe(self._new_call(), self.loop).result(20)
        return self.call_id

    def start(self) -> "Running":
        self.error = None
        self.thread.start()
        assert self.ready.wait(20), "the controller did not start"
        if self.error is not None:
            raise self.error
        return self

    def changed_requests(self) -> list:
        """Requests that change something on the media node (reads, like the periodic RTP
        statistics of the audio health check, do not)."""
        return [r for r in self.fake.requests if r.method != "GET"]

    def changes(self) -> int:
        return len(self.changed_requests())

    def playback_state(self, playback_id: str) -> str | None:
        """How the fake Asterisk said a playback ended (PlaybackFinished), if it did."""
        return next((e["playback"]["state"] for e in self.fake.events("PlaybackFinished")
                     if e["playback"]["id"] == playback_id), None)

    def settled_change_count(self) -> int:
        """quiet_change_count once the recordings earlier cases started (an accepted command's
        ARI work goes on after its answer) have finished: one whose max_duration passed during a
        later case hung its snoop up then, blamed on that case."""
        async def end_recordings() -> None:
            self.fake.end_recordings()
        self.quiet_change_count()
        asyncio.run_coroutine_threadsafe(end_recordings(), self.loop).result(5)
        return self.quiet_change_count()

    def quiet_change_count(self, quiet_s: float = 0.15, limit_s: float = 5.0) -> int:
        """Changing requests that reached the fake once it has been idle for `quiet_s`: an
        accepted command finishes its ARI work after its answer, and must not be blamed on the
        next case."""
        deadline = time.monotonic() + limit_s
        count, since = self.changes(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if self.changes() != count:
                count, since = self.changes(), time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return count

    def stop(self) -> None:
        async def shutdown():
            await self.runner.cleanup()
            await self.fake.stop(check=False)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def running(redis_server, tmp_path_factory):
    policy_dir = tmp_path_factory.mktemp("fuzz-policy")
    (policy_dir / "p.yaml").write_text(POLICY)
    server = Running(redis_server.url, policy_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(running):
    return schemathesis.openapi.from_dict(document())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_documented_answers(case, running):
    is_command = case.path == "/calls/{call_id}/actions"
    if is_command and case.path_parameters:
        case.path_parameters["call_id"] = running.live_call()  # so commands reach the media plane
    requests_before = running.settled_change_count() if is_command else 0
    response = case.call(base_url=f"http://{running.settings.http_listen}/v1",
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert response.status_code < 500, response.text
    case.validate_response(response, checks=[schemathesis.checks.status_code_conformance,
                                             schemathesis.checks.response_schema_conformance])
    if is_command and response.status_code >= 400:
        running.quiet_change_count()
        changed = [(r.method, r.path) for r in running.changed_requests()[requests_before:]]
        failed_playback = response.json()["error"].get("playback_id") if response.status_code == 422 else None
        if failed_playback is None:
            assert changed == [], "a rejected command changed something on Asterisk"
        else:  # a well-formed sound only Asterisk knows it does not have: the one playback it failed
            bridge = running.app[MEDIA].calls[case.path_parameters["call_id"]].bridge
            assert changed == [("POST", f"/bridges/{bridge}/play/{failed_playback}")], \
                "a rejected play changed more on Asterisk than the playback it failed"
            assert running.playback_state(failed_playback) == "failed", "a 422 for a playback Asterisk did not fail"
