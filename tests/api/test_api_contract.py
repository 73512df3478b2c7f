"""Contract tests of the REST API against its OpenAPI document (controller/api/openapi.json):
every operation the document lists is exercised with every status code it documents, on a
running controller (the fake ARI, real Redis), and every answer is checked against the
document — its status must be documented for the operation, its JSON body must validate
against the documented response schema (Draft 2020-12), and an error body must carry its own
status. The set of (method, path, status) observed must equal the set documented: a code
documented without a case here, or answered without being documented, fails the test.

Three controllers: the main one (serving, a live call on the fake ARI), a degraded one whose
Redis is a closed port (503), and one with no valid policy that is then drained (GET /policy
503, reload 422, drain 202) so the drain does not affect the others."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from controller.api.phone import check_token
from controller.app import STORE, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.state.calls import now_ms
from tests.api.test_api import ADMIN, CONTROL, POLICY, READ, Api
from tests.support import fake_ari
from tests.support.fake_ari import FakeAri

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT: dict[str, Any] = json.loads((ROOT / "controller" / "api" / "openapi.json").read_text())
DOC_URI = "urn:callfabric:openapi"
REGISTRY = Registry().with_resource(DOC_URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012))

CONTROL_ONLY = "k" * 24  # a token without `read`: the 403 of read routes
PHONE = "p" * 24  # an application backend's token: it only makes phone tokens
PHONE_SECRET = "contract-phone-secret"
TOKENS = [f"viewer:read:{READ}", f"bot:read,control:{CONTROL}", f"ops:admin:{ADMIN}", f"pusher:control:{CONTROL_ONLY}",
          f"app:phone:{PHONE}"]
LACKING = {"read": CONTROL_ONLY, "control": READ, "admin": CONTROL, "phone": CONTROL}  # a token without the scope
SAMPLE_PARAMS = {"call_id": "ghost@edge", "name": "summary", "ip": "192.0.2.200", "recording_id": "r1"}  # for 401/403 cases

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    (method.upper(), path): operation
    for path, item in DOCUMENT["paths"].items() for method, operation in item.items()
    if method in ("get", "put", "post", "delete", "patch", "head", "options")}
DOCUMENTED: set[tuple[str, str, str]] = {(method, path, status) for (method, path), op in OPERATIONS.items()
                                         for status in op["responses"]}


def _validator(*pointer: str) -> Draft202012Validator:
    """A validator for the schema at this JSON pointer of the document; its "#/components/..."
    references resolve in the document."""
    fragment = "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in pointer)
    return Draft202012Validator({"$ref": f"{DOC_URI}#{quote(fragment)}"}, registry=REGISTRY)


def operation_for(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The document's operation answering `method path` (path relative to the server URL /v1):
    a literal segment beats a template parameter."""
    segments = path.strip("/").split("/")
    candidates = []
    for (op_method, template), operation in OPERATIONS.items():
        parts = template.strip("/").split("/")
        if op_method == method and len(parts) == len(segments) \
                and all(p.startswith("{") or p == s for p, s in zip(parts, segments)):
            candidates.append(([p.startswith("{") for p in parts], template, operation))
    assert candidates, f"{method} {path}: no operation of the OpenAPI document answers it"
    _, template, operation = min(candidates, key=lambda c: c[0])
    return template, operation


@dataclass
class Contract:
    """Checks answers against the document and remembers which (method, path, status) it saw."""

    seen: set[tuple[str, str, str]] = field(default_factory=set)

    def check(self, method: str, path: str, status: int, content_type: str | None, raw: bytes | None,
              case: str) -> Any:
        template, operation = operation_for(method, path)
        where = f"[{case}] {method} {template} ({path}) answered {status}"
        documented = operation["responses"]
        assert str(status) in documented, \
            f"{where}: status not documented (documented: {sorted(documented)}); body {raw[:300] if raw else raw!r}"
        content = documented[str(status)].get("content")
        body = None
        if content is None:
            assert not raw, f"{where}: the document says no content, got {raw[:200]!r}"
        elif "audio/wav" in content:
            assert content_type == "audio/wav" and raw[:4] == b"RIFF", f"{where}: {content_type}, {raw[:12]!r}"
        else:
            assert content_type == "application/json", f"{where}: Content-Type {content_type!r}, not JSON"
            body = json.loads(raw)
            validator = _validator("paths", template, method.lower(), "responses", str(status), "content",
                                   "application/json", "schema")
            problems = [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
                        for e in validator.iter_errors(body)]
            assert not problems, f"{where}: body does not match the documented schema: {problems}; body {body}"
            if status >= 400:
                assert body["error"]["status"] == status, f"{where}: error.status is {body['error']['status']}"
        self.seen.add((method, template, str(status)))
        return body

    def request_body_valid(self, method: str, path: str, body: Any) -> list[str]:
        """Problems of `body` against the operation's documented request body schema."""
        template, operation = operation_for(method, path)
        assert "requestBody" in operation, f"{method} {template}: the document has no request body"
        validator = _validator("paths", template, method.lower(), "requestBody", "content", "application/json",
                               "schema")
        return [e.message for e in validator.iter_errors(body)]


class ContractApi(Api):
    """Api whose every request is checked against the document."""

    def __init__(self, base: str, http: aiohttp.ClientSession, app: web.Application, fake: FakeAri | None,
                 contract: Contract, settings: Settings):
        super().__init__(base, http, app, fake)
        self.contract, self.settings = contract, settings

    async def expect(self, status: int, method: str, path: str, token: str | None = CONTROL, *,
                     case: str = "", **kw) -> Any:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if "json" in kw and 200 <= status < 300:  # what the API accepts, the document must accept too
            problems = self.contract.request_body_valid(method, urlsplit(path).path, kw["json"])
            assert not problems, f"[{case}] the documented request schema refuses an accepted body: {problems}"
        async with self.http.request(method, self.base + path, headers=headers, **kw) as response:
            raw = await response.read()
            got, content_type = response.status, response.content_type
        body = self.contract.check(method, urlsplit(path).path, got, content_type, raw, case or f"{method} {path}")
        assert got == status, f"[{case}] {method} {path}: expected {status}, got {got}: {body}"
        return body


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def controller(contract: Contract, http: aiohttp.ClientSession, *, redis_url: str, policy_dir: Path,
                     instance_id: str, fake: FakeAri | None = None, phone_secret: str = PHONE_SECRET
                     ) -> AsyncIterator[ContractApi]:
    """A controller on a free port, as in tests/api/test_api.py's `api` fixture."""
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_url, edge_evapi=[], instance_id=instance_id,
                        http_listen=f"127.0.0.1:{free_port()}", api_base_url="http://controller.test",
                        ari_nodes=[f"media1=http://callfabric:secret@127.0.0.1:{fake.port}/ari"] if fake else [],
                        api_tokens=TOKENS, drain_timeout_s=2.0, phone_token_secret=phone_secret)
    app = build_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        host, port = settings.http_listen.split(":")
        await web.TCPSite(runner, host, int(port)).start()
        if fake is not None:
            await fake.wait_for_app("callfabric")
        yield ContractApi(f"http://{settings.http_listen}/v1", http, app, fake, contract, settings)
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def ari_failing(fake: FakeAri, *operations: tuple[str, str]):
    """The fake Asterisk answers 500 to these ARI operations (resource, nickname) meanwhile."""
    originals = {op: fake._handlers[op] for op in operations}

    def failing(args: dict) -> None:
        raise fake_ari._AriError(500, "Internal Server Error (injected by the contract test)")
    for op in operations:
        fake._handlers[op] = failing
    try:
        yield
    finally:
        fake._handlers.update(originals)


@pytest.fixture
def policy_dirs(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "p.yaml").write_text(POLICY)
    (bad / "p.yaml").write_text("rules: [")
    return good, bad


def _concrete(template: str) -> str:
    return "/".join(SAMPLE_PARAMS[p[1:-1]] if p.startswith("{") else p for p in template.split("/"))


async def _auth_cases(api: ContractApi) -> None:
    """401 (no token, unknown token) and 403 (a token without the scope) for every protected
    operation the document lists."""
    for (method, template), operation in sorted(OPERATIONS.items()):
        if not operation.get("security"):
            continue
        path, scope = _concrete(template), operation["x-scope"]
        await api.expect(401, method, path, token=None, case=f"no token {method} {template}")
        await api.expect(401, method, path, token="z" * 24, case=f"unknown token {method} {template}")
        await api.expect(403, method, path, token=LACKING[scope], case=f"no {scope} scope {method} {template}")


async def _main_cases(api: ContractApi) -> None:
    limit = api.app._client_max_size  # aiohttp's request body limit (1 MiB unless build_app sets another)
    too_big = b"[" + b" " * limit + b"]"
    not_json = {"data": b"{not json", "headers": {"Content-Type": "application/json"}}
    big = {"data": too_big, "headers": {"Content-Type": "application/json"}}

    await api.expect(200, "GET", "/openapi.json", token=None)

    # -- calls: reads
    await api.live_call("c1@edge")
    store = api.app[STORE]
    await store.create("ended@edge", {"state": "routing", "outcome": "agent", "rule": "default"}, live_scopes={},
                       window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
    await store.transition("ended@edge", "ended", {"end_reason": "bye-caller"}, {"event": "ended", "ts": 2})
    body = await api.expect(200, "GET", "/calls", READ)
    assert [c["call_id"] for c in body["calls"]] == ["c1@edge"]
    await api.expect(200, "GET", "/calls?state=recent&limit=5", READ)
    for bad in ("state=old", "limit=0", "limit=501", "limit=x"):
        await api.expect(400, "GET", f"/calls?{bad}", READ, case=f"bad query {bad}")
    body = await api.expect(200, "GET", "/calls/c1@edge", READ)
    assert body["media"]["state"] == "active"
    await api.expect(404, "GET", "/calls/ghost@edge", READ)
    await api.expect(200, "GET", "/calls/c1@edge/timeline", READ)
    await api.expect(404, "GET", "/calls/ghost@edge/timeline", READ)

    # -- actions on the live call
    await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"set_metadata": {"intent": "refund"}}})
    body = await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"fork": {"target": "stt"}}})
    fork_id = body["result"]["fork_id"]
    body = await api.expect(200, "GET", "/calls/c1@edge/forks", READ)
    assert [f["fork_id"] for f in body["forks"]] == [fork_id]
    await api.expect(404, "GET", "/calls/ghost@edge/forks", READ)
    await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:hello-world"}},
                     headers={"Idempotency-Key": "play-1"})
    summary = "The caller explained at length. " * 20  # long: sent to the human by reference
    await api.expect(200, "POST", "/calls/c1@edge/actions",
                     json={"action": {"add_human": {"destination": "desk", "context": {"summary": summary}}}})
    body = await api.expect(200, "GET", "/calls/c1@edge/context/summary", READ)
    assert body["value"].strip() == summary.strip()
    await api.expect(404, "GET", "/calls/c1@edge/context/transcript", READ, case="unknown context name")

    # -- recordings: one on the node (no recording_dir), one still recording
    body = await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"record": "caller"}})
    kept = body["result"]["recording_id"]
    await api.fake.wait_for_event("RecordingStarted")
    await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"stop_record": {"recording_id": kept}}})
    for _ in range(100):
        body = await api.expect(200, "GET", "/calls/c1@edge/recordings", READ)
        if body["recordings"][0]["state"] == "done":
            break
        await asyncio.sleep(0.05)
    assert body["recordings"][0]["url"] == f"/v1/calls/c1@edge/recordings/{kept}"
    await api.expect(200, "GET", f"/calls/c1@edge/recordings/{kept}", READ)
    body = await api.expect(200, "POST", "/calls/c1@edge/actions", json={"action": {"record": "both"}})
    live = body["result"]["recording_id"]
    body = await api.expect(409, "GET", f"/calls/c1@edge/recordings/{live}", READ, case="recording in progress")
    assert "not done" in body["error"]["message"]
    await api.expect(404, "GET", "/calls/c1@edge/recordings/r999", READ, case="unknown recording")
    await api.expect(404, "GET", "/calls/ghost@edge/recordings", READ)
    with ari_failing(api.fake, ("recordings", "getStored")):
        await api.expect(502, "GET", f"/calls/c1@edge/recordings/{kept}", READ, case="the node fails")
    name = next(n for n in api.fake.stored_recordings)
    del api.fake.stored_recordings[name]
    body = await api.expect(404, "GET", f"/calls/c1@edge/recordings/{kept}", READ, case="gone from the node")
    assert "no longer on media node" in body["error"]["message"]
    await api.expect(404, "GET", "/calls/ghost@edge/context/summary", READ, case="context of an unknown call")

    await api.expect(400, "POST", "/calls/c1@edge/actions", case="action not JSON", **not_json)
    await api.expect(400, "POST", "/calls/c1@edge/actions", json={"action": {"hangup": True}},
                     headers={"Idempotency-Key": "k" * 129}, case="Idempotency-Key too long")
    await api.expect(404, "POST", "/calls/ghost@edge/actions", json={"action": {"hangup": True}})
    body = await api.expect(409, "POST", "/calls/ended@edge/actions", json={"action": {"play": "sound:x"}})
    assert body["error"]["message"] == "call 'ended@edge' has ended (bye-caller)"
    await api.expect(413, "POST", "/calls/c1@edge/actions", case="action too big", **big)
    body = await api.expect(422, "POST", "/calls/c1@edge/actions", json={"action": {"route_agnt": "billing"}})
    assert [e["path"] for e in body["error"]["errors"]] == ["action.route_agnt"], body
    body = await api.expect(422, "POST", "/calls/c1@edge/actions", json={"action": {"route_agent": "nobody"}})
    assert body["error"]["errors"][0]["path"] == "action"
    body = await api.expect(422, "POST", "/calls/c1@edge/actions", json={"actions": []})
    assert body["error"]["errors"][0]["path"] == "(body)"
    with ari_failing(api.fake, ("channels", "originate"), ("channels", "originateWithId")):
        body = await api.expect(502, "POST", "/calls/c1@edge/actions",
                                json={"action": {"add_human": {"destination": "desk"}}}, case="ARI refuses a human")
    assert "could not call desk" in body["error"]["message"]
    with ari_failing(api.fake, ("bridges", "play"), ("bridges", "playWithId")):  # was a 500 (AriError not caught)
        await api.expect(502, "POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:x"}},
                         headers={"Idempotency-Key": "play-fails"}, case="ARI refuses a playback")
    body = await api.expect(502, "POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:x"}},
                            headers={"Idempotency-Key": "play-fails"}, case="retry of a failed playback")
    assert "ARI playBridge: 500" in body["error"]["message"]  # the stored answer, not 409 "still being carried out"

    # -- originate
    body = await api.expect(201, "POST", "/calls", json={"to": "sip:+15551234567@carrier.example.com",
                                                         "agent": "intake", "caller_id": "+18005550100"})
    assert body["call_id"].endswith("@callfabric") and body["node"] == "media1"
    await api.expect(400, "POST", "/calls", case="originate not JSON", **not_json)
    await api.expect(413, "POST", "/calls", case="originate too big", **big)
    body = await api.expect(422, "POST", "/calls", json={"to": "sip:x@y"})
    assert body["error"]["errors"][0]["path"] == "(body)"
    body = await api.expect(422, "POST", "/calls", json={"to": "+15551234567", "agent": "intake"})
    assert body["error"]["errors"][0]["path"] == "to"
    with ari_failing(api.fake, ("channels", "originate"), ("channels", "originateWithId")):
        body = await api.expect(502, "POST", "/calls", json={"to": "sip:bob@carrier.example.com", "agent": "intake"},
                                case="ARI refuses the outbound call")
    assert "could not call" in body["error"]["message"]

    # -- policy
    body = await api.expect(200, "GET", "/policy", READ)
    assert body["agents"] == ["billing", "intake"]
    body = await api.expect(200, "POST", "/policy/reload", ADMIN)
    assert body["accepted"] is True
    await api.expect(200, "POST", "/policy/validate", ADMIN, json={"files": {"a.yaml": POLICY}})
    await api.expect(400, "POST", "/policy/validate", ADMIN, case="candidate not JSON", **not_json)
    await api.expect(413, "POST", "/policy/validate", ADMIN, case="candidate too big", **big)
    body = await api.expect(422, "POST", "/policy/validate", ADMIN, json={"files": {"a.txt": POLICY}})
    assert body["error"]["errors"][0]["path"].startswith("files")
    body = await api.expect(422, "POST", "/policy/validate", ADMIN,
                            json={"files": {"a.yaml": POLICY + "rules:\n  - {name: r, actions: [route_agent: x]}\n"}})
    assert body["error"]["errors"][0]["path"].startswith("a.yaml:")

    # -- events
    ws_headers = {"Authorization": f"Bearer {READ}"}
    async with api.http.ws_connect(api.base + "/events?types=call.*", headers=ws_headers) as ws:
        api.contract.check("GET", "/events", ws._response.status, None, None, "websocket upgrade")
        hello = await ws.receive_json(timeout=5)
        assert hello == {"type": "subscribed", "call_id": None, "types": ["call.*"]}
    await api.expect(400, "GET", "/events", READ, case="events without a websocket upgrade")

    # -- bans
    await api.expect(200, "GET", "/bans", ADMIN)
    body = await api.expect(201, "POST", "/bans", ADMIN, json={"ip": "192.0.2.7", "for": "15m", "reason": "contract"})
    assert body["ban"]["ip"] == "192.0.2.7"
    body = await api.expect(200, "GET", "/bans", ADMIN)
    assert [b["ip"] for b in body["bans"]] == ["192.0.2.7"]
    await api.expect(400, "POST", "/bans", ADMIN, case="ban not JSON", **not_json)
    await api.expect(413, "POST", "/bans", ADMIN, case="ban too big", **big)
    body = await api.expect(422, "POST", "/bans", ADMIN, json={"ip": "not-an-ip", "for": 60})
    assert body["error"]["errors"][0]["path"] == "ip"
    body = await api.expect(422, "POST", "/bans", ADMIN, json={"ip": "192.0.2.8", "for": "forever"})
    assert body["error"]["errors"][0]["path"].startswith("for")
    body = await api.expect(422, "POST", "/bans", ADMIN, json={"ip": "192.0.2.8", "for": "9999999h"})
    assert body["error"]["errors"] == [{"path": "for", "message": "at most 30 days (2592000 s)"}]
    await api.expect(200, "GET", "/bans/192.0.2.7", ADMIN)
    await api.expect(404, "GET", "/bans/192.0.2.8", ADMIN, case="unknown ban")
    await api.expect(422, "GET", "/bans/not-an-ip", ADMIN)
    body = await api.expect(200, "DELETE", "/bans/192.0.2.7", ADMIN)
    assert body == {"ip": "192.0.2.7", "removed": True}
    await api.expect(422, "DELETE", "/bans/not-an-ip", ADMIN)
    await api.expect(404, "GET", "/bans/192.0.2.7", ADMIN, case="lifted ban")

    # -- phone tokens
    body = await api.expect(201, "POST", "/phone/tokens", PHONE, json={"to": "intake", "ttl_s": 120})
    assert check_token(PHONE_SECRET, body["token"]) == "intake"
    assert body["url"] == f"http://controller.test/phone#token={body['token']}" and body["to"] == "intake"
    await api.expect(400, "POST", "/phone/tokens", PHONE, case="phone token not JSON", **not_json)
    await api.expect(413, "POST", "/phone/tokens", PHONE, case="phone token too big", **big)
    body = await api.expect(422, "POST", "/phone/tokens", PHONE, json={"to": "intake@evil.example"})
    assert body["error"]["errors"][0]["path"] == "to"

    # -- admin (the drain that succeeds is in its own controller)
    body = await api.expect(200, "GET", "/admin/status", ADMIN)
    assert body["instance"] == "contract-main" and body["state"] == "serving"
    await api.expect(400, "POST", "/admin/drain", ADMIN, case="drain not JSON", **not_json)
    await api.expect(413, "POST", "/admin/drain", ADMIN, case="drain too big", **big)
    await api.expect(422, "POST", "/admin/drain", ADMIN, json={"instance": ""})
    body = await api.expect(409, "POST", "/admin/drain", ADMIN, json={"instance": "contract-other"})
    assert "nothing drained" in body["error"]["message"]
    assert (await api.expect(200, "GET", "/admin/status", ADMIN))["state"] == "serving"

    await _auth_cases(api)


async def _degraded_cases(api: ContractApi) -> None:
    """Redis unreachable (and no media node): 503 wherever the call store or bans are needed."""
    await api.expect(503, "GET", "/calls", READ)
    await api.expect(503, "GET", "/calls/c1@edge", READ)
    await api.expect(503, "GET", "/calls/c1@edge/timeline", READ)
    await api.expect(503, "GET", "/calls/c1@edge/forks", READ)
    await api.expect(503, "GET", "/calls/c1@edge/context/summary", READ)
    await api.expect(503, "GET", "/calls/c1@edge/recordings", READ)
    await api.expect(503, "GET", "/calls/c1@edge/recordings/r1", READ)
    await api.expect(503, "POST", "/calls/c1@edge/actions", json={"action": {"hangup": True}})
    await api.expect(503, "POST", "/calls", json={"to": "sip:bob@carrier.example.com", "agent": "intake"})
    await api.expect(503, "GET", "/bans", ADMIN)
    await api.expect(503, "POST", "/bans", ADMIN, json={"ip": "192.0.2.7", "for": 60})
    await api.expect(503, "GET", "/bans/192.0.2.7", ADMIN)
    await api.expect(503, "DELETE", "/bans/192.0.2.7", ADMIN)
    body = await api.expect(200, "GET", "/admin/status", ADMIN)
    assert body["redis"]["mode"] == "single"


async def _no_policy_then_drain_cases(api: ContractApi) -> None:
    """No valid policy on disk (GET /policy 503, reload 422), then drained (202)."""
    body = await api.expect(503, "GET", "/policy", READ)
    assert body["error"]["message"] == "no valid policy is loaded"
    body = await api.expect(422, "POST", "/policy/reload", ADMIN)
    assert body["error"]["errors"] and body["error"]["serving"] is None
    body = await api.expect(503, "POST", "/phone/tokens", PHONE, json={"to": "intake"})
    assert "phone_token_secret" in body["error"]["message"]
    body = await api.expect(202, "POST", "/admin/drain", ADMIN, json={"instance": "contract-drain"})
    assert body["instance"] == "contract-drain" and body["state"] in ("draining", "drained")
    body = await api.expect(200, "GET", "/admin/status", ADMIN)
    assert body["state"] in ("draining", "drained")


async def test_every_operation_answers_every_documented_status_as_documented(redis_url, policy_dirs):
    good, bad = policy_dirs
    contract = Contract()
    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with controller(contract, http, redis_url=redis_url, policy_dir=good, instance_id="contract-main",
                                  fake=fake) as api:
                await _main_cases(api)
            async with controller(contract, http, redis_url=f"redis://127.0.0.1:{closed_port()}/0", policy_dir=good,
                                  instance_id="contract-degraded") as api:
                await _degraded_cases(api)
            # (another Redis database: no policy was ever served there, so none is restored)
            async with controller(contract, http, redis_url=redis_url.rsplit("/", 1)[0] + "/1", policy_dir=bad,
                                  instance_id="contract-drain", phone_secret="") as api:
                await _no_policy_then_drain_cases(api)
    finally:
        await fake.stop()
    missing = sorted(DOCUMENTED - contract.seen)
    assert not missing, "documented but never produced by a case here (add one):\n" + \
        "\n".join(f"  {m} {p} {s}" for m, p, s in missing)
    assert contract.seen == DOCUMENTED


def test_the_validator_refuses_what_the_document_does_not_say():
    """The checker itself: an undocumented status, a body off its schema, a wrong error status."""
    contract = Contract()
    with pytest.raises(AssertionError, match="status not documented"):
        contract.check("GET", "/admin/status", 404, "application/json", b'{"error": {"status": 404, "message": ""}}',
                       "self-test")
    with pytest.raises(AssertionError, match="documented schema"):
        contract.check("GET", "/calls", 200, "application/json", b'{"calls": 3}', "self-test")
    with pytest.raises(AssertionError, match="documented schema"):
        contract.check("POST", "/calls/x/actions", 422, "application/json", b'{"error": {"status": 422}}', "self-test")
    with pytest.raises(AssertionError, match="error.status"):
        contract.check("GET", "/calls/x", 404, "application/json", b'{"error": {"status": 400, "message": ""}}',
                       "self-test")
    with pytest.raises(AssertionError, match="no operation"):
        contract.check("GET", "/nowhere", 200, "application/json", b"{}", "self-test")
    assert operation_for("GET", "/calls/a@b/context/n")[0] == "/calls/{call_id}/context/{name}"
    assert contract.seen == set()


def test_the_committed_document_is_what_the_api_serves():
    from controller.api.openapi import document
    assert DOCUMENT == document()
