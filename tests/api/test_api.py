"""The REST API on a running controller (its aiohttp app), with the media plane on the
spec-validating fake ARI and real Redis: auth and scopes, reads, actions on live calls
(idempotency, 404/409/422), originate, the policy endpoints and the events websocket."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controller.api.openapi import document
from controller.app import MEDIA, STORE, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.state.calls import now_ms
from tests.support.fake_ari import FakeAri
from tests.support.wait import until

ROOT = Path(__file__).resolve().parents[2]
READ, CONTROL, ADMIN = "r" * 24, "c" * 24, "a" * 24
POLICY = """\
node_sets: {media: {dispatcher_set: 1}}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
  billing: {node_set: media, endpoint: "127.0.0.1:4001", transport: audiosocket, codec: slin16}
destinations:
  desk: {uri: "sip:desk@pbx.example.com"}
fork_targets:
  stt: {endpoint: "127.0.0.1:9100"}
default:
  actions: [route_agent: intake]
"""


class Api:
    def __init__(self, base: str, http: aiohttp.ClientSession, app: web.Application, fake: FakeAri):
        self.base, self.http, self.app, self.fake = base, http, app, fake

    async def call(self, method: str, path: str, token: str | None = CONTROL, **kw) -> tuple[int, dict]:
        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.base + path, headers=headers, **kw) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else {})

    async def live_call(self, call_id: str = "c1@edge") -> str:
        store = self.app[STORE]
        decision = {"outcome": "agent", "rule": "default", "agent": {"name": "intake"}, "forks": []}
        await store.create(call_id, {"state": "routing", "outcome": "agent", "rule": "default", "decision": decision},
                           live_scopes={}, window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": 1})
        channel = await self.fake.inbound_call("callfabric", [call_id, "intake"], sip_call_id=call_id)
        plane = self.app[MEDIA]
        await until(lambda: call_id in plane.calls and plane.calls[call_id].state == "active",
                    what="the call active")
        return channel


@pytest.fixture
def policy_dir(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "p.yaml").write_text(POLICY)
    return tmp_path / "policy"


@pytest.fixture
async def api(redis_url, policy_dir):
    fake = await FakeAri(stasis_delay=0.005, ring_delay=0.005).start()
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_url, edge_evapi=[], instance_id="api-test",
                        http_listen=f"127.0.0.1:{free_port()}", api_base_url="http://controller.test",
                        ari_nodes=[f"media1=http://callfabric:secret@127.0.0.1:{fake.port}/ari"],
                        api_tokens=[f"viewer:read:{READ}", f"bot:read,control:{CONTROL}", f"ops:admin:{ADMIN}"])
    app = build_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = settings.http_listen.split(":")
    await web.TCPSite(runner, host, int(port)).start()
    await fake.wait_for_app("callfabric")
    async with aiohttp.ClientSession() as http:
        yield Api(f"http://{settings.http_listen}/v1", http, app, fake)
    await runner.cleanup()
    await fake.stop()


async def test_auth_and_scopes(api):
    status, body = await api.call("GET", "/calls", token=None)
    assert status == 401 and "Bearer" in body["error"]["message"]
    status, _ = await api.call("GET", "/calls", token="x" * 24)
    assert status == 401
    status, body = await api.call("POST", "/calls/c1@edge/actions", token=READ, json={"action": {"hangup": True}})
    assert status == 403 and body["error"]["message"] == "token 'viewer' lacks the 'control' scope (it has: read)"
    status, _ = await api.call("POST", "/policy/reload", token=CONTROL)
    assert status == 403
    status, _ = await api.call("GET", "/calls", token=ADMIN)  # admin implies read
    assert status == 200
    status, doc = await api.call("GET", "/openapi.json", token=None)
    assert status == 200 and doc["openapi"] == "3.1.0"


async def test_reading_calls(api):
    await api.live_call()
    status, body = await api.call("GET", "/calls", token=READ)
    assert status == 200 and [c["call_id"] for c in body["calls"]] == ["c1@edge"]
    status, body = await api.call("GET", "/calls/c1@edge", token=READ)
    assert status == 200 and body["call"]["rule"] == "default" and body["media"]["state"] == "active"
    assert body["media"]["agent"]["name"] == "intake"
    status, body = await api.call("GET", "/calls/c1@edge/timeline", token=READ)
    assert [e["event"] for e in body["events"]][:3] == ["decided", "media_start", "media_up"]
    status, body = await api.call("GET", "/calls/nope/timeline", token=READ)
    assert status == 404 and body["error"]["message"] == "no call 'nope'"
    for bad in ("/calls?state=old", "/calls?limit=0", "/calls?limit=x"):
        assert (await api.call("GET", bad, token=READ))[0] == 400


async def test_transfer_fork_play_and_hangup_through_actions(api):
    caller = await api.live_call()
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"route_agent": "billing"}})
    assert status == 200 and body["action"] == "route_agent" and body["result"]["agent"] == "billing"
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"fork": {"target": "stt"}}})
    assert status == 200 and body["result"]["fork_id"]
    fork_id = body["result"]["fork_id"]
    status, body = await api.call("GET", "/calls/c1@edge/forks", token=READ)
    assert [f["fork_id"] for f in body["forks"]] == [fork_id] and body["forks"][0]["state"] == "up"
    assert (await api.call("POST", "/calls/c1@edge/actions", json={"action": {"stop_fork": {"fork_id": fork_id}}}))[0] == 200
    assert (await api.call("POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:hello-world"}}))[0] == 200
    status, _ = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"hangup": True}})
    assert status == 200 and caller not in api.fake.channels
    await api.app[STORE].transition("c1@edge", "ended", {"end_reason": "bye-callee"}, {"event": "ended", "ts": 2})
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:x"}})
    assert status == 409 and body["error"]["message"] == "call 'c1@edge' has ended (bye-callee)"


@pytest.mark.parametrize("body, status, path, fragment", [
    ({"action": {"route_agnt": "billing"}}, 422, "action.route_agnt", "unknown key 'route_agnt'"),
    ({"action": {"route_agent": "billing", "hangup": True}}, 422, "action", "has more than 1"),
    ({"action": {"play": "file:/etc/passwd"}}, 422, "action.play", "is not media to play: sound:NAME"),
    ({"action": {"play": "sound:../../../etc/passwd"}}, 422, "action.play", "is not media to play: sound:NAME"),
    ({"action": {"play": "tone:U?[wP&"}}, 422, "action.play", "is not media to play: sound:NAME"),
    ({"action": {"play": "tone:440,480"}}, 422, "action.play", "is not media to play: sound:NAME"),
    ({"action": {"play": "number:twelve"}}, 422, "action.play", "is not media to play: sound:NAME"),
    ({"action": {"stop_fork": {"fork_id": "zzz"}}}, 422, "action.stop_fork.fork_id", "is not a fork id such as f3"),
    ({"actions": []}, 422, "(body)", "missing required key 'action'"),
    ({"action": {"route_agent": "nobody"}}, 422, "action", "unknown agent 'nobody'"),
    ({"action": {"route_sip": "nowhere"}}, 422, "action", "unknown destination 'nowhere'"),
])
async def test_invalid_actions_are_422_with_paths_and_change_nothing(api, body, status, path, fragment):
    await api.live_call()
    before = len(api.fake.requests)
    got, answer = await api.call("POST", "/calls/c1@edge/actions", json=body)
    assert got == status, answer
    assert any(e["path"] == path and fragment in e["message"] for e in answer["error"]["errors"]), answer
    assert len(api.fake.requests) == before  # nothing was asked of Asterisk


async def test_media_only_asterisk_can_refuse_costs_it_one_playback_at_most(api):
    await api.live_call()
    bridge = api.app[MEDIA].calls["c1@edge"].bridge
    before = len(api.fake.requests)
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"play": "sound:no-such-sound"}})
    assert status == 422 and body["error"]["playback_id"], body  # Asterisk's PlaybackFinished said `failed`
    assert [(r.method, r.path) for r in api.fake.requests[before:] if r.method != "GET"] == \
        [("POST", f"/bridges/{bridge}/play/{body['error']['playback_id']}")]
    before = len(api.fake.requests)  # a recording Asterisk would skip without a word: asked for first
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"play": "recording:no-such"}})
    assert status == 422 and "no stored recording 'no-such'" in body["error"]["message"], body
    assert [(r.method, r.path) for r in api.fake.requests[before:]] == [("GET", "/recordings/stored/no-such")]
    status, body = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"play": "tone:440+480/2000|0/4000"}})
    assert status == 200 and body["result"]["state"] == "playing", body  # a tone string plays until stopped


async def test_a_whole_number_written_as_a_float_is_an_integer(api):
    """JSON Schema's integer takes 362.0: Asterisk gets 362, never "362.0" (a 400 from ARI)."""
    await api.live_call()
    body = b'{"action": {"send_dtmf": {"digits": "12", "duration_ms": 362.0, "between_ms": 1e2}}}'
    status, answer = await api.call("POST", "/calls/c1@edge/actions", data=body,
                                    headers={"Content-Type": "application/json"})
    assert status == 200, answer
    request = next(r for r in api.fake.requests if r.path.endswith("/dtmf"))
    assert (request.query["duration"], request.query["between"]) == ("362", "100")


async def test_not_json_and_unknown_call(api):
    status, body = await api.call("POST", "/calls/c1@edge/actions", data=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["message"] == "the body is not valid JSON"
    status, body = await api.call("POST", "/calls/ghost/actions", json={"action": {"hangup": True}})
    assert status == 404 and body["error"]["message"] == "no call 'ghost'"


async def test_idempotency_key_makes_retries_safe(api):
    await api.live_call()
    headers = {"Idempotency-Key": "transfer-42"}
    first = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"route_agent": "billing"}}, headers=dict(headers))
    second = await api.call("POST", "/calls/c1@edge/actions", json={"action": {"route_agent": "billing"}}, headers=dict(headers))
    assert first == second and first[0] == 200
    assert len([r for r in api.fake.requests if r.path.endswith("/externalMedia")]) == 2  # intake + ONE transfer


async def test_humans_get_the_metadata_as_headers(api):
    await api.live_call()
    status, _ = await api.call("POST", "/calls/c1@edge/actions",
                               json={"action": {"set_metadata": {"summary": "Refund request", "intent": "refund"}}})
    assert status == 200
    status, body = await api.call("POST", "/calls/c1@edge/actions",
                                  json={"action": {"add_human": {"destination": "desk", "mode": "conference",
                                                                 "context": {"sentiment": "calm"}}}})
    assert status == 200
    originate = next(r for r in api.fake.requests if r.method == "POST" and r.query.get("endpoint", "").startswith("PJSIP/"))
    variables = originate.body["variables"]
    assert variables["PJSIP_HEADER(add,X-Summary)"] == "Refund request"
    assert variables["PJSIP_HEADER(add,X-Intent)"] == "refund" and variables["PJSIP_HEADER(add,X-Sentiment)"] == "calm"
    assert originate.query["endpoint"] == "PJSIP/edge/sip:desk@pbx.example.com"


async def test_a_long_context_value_is_sent_by_reference(api):
    await api.live_call()
    summary = "The caller explained at length. " * 20
    await api.call("POST", "/calls/c1@edge/actions",
                   json={"action": {"add_human": {"destination": "desk", "context": {"summary": summary}}}})
    originate = next(r for r in api.fake.requests if r.query.get("endpoint", "").startswith("PJSIP/"))
    ref = originate.body["variables"]["PJSIP_HEADER(add,X-Summary-Ref)"]
    assert ref == "http://controller.test/v1/calls/c1@edge/context/summary"
    status, body = await api.call("GET", "/calls/c1@edge/context/summary", token=READ)
    assert status == 200 and body["value"] == summary, (status, body)  # stored as sent, whitespace too


async def test_originate_an_outbound_call_with_an_agent(api):
    status, body = await api.call("POST", "/calls", json={"to": "sip:+15551234567@carrier.example.com",
                                                          "agent": "intake", "caller_id": "+18005550100"})
    assert status == 201, body
    call_id, channel = body["call_id"], body["channel"]
    await api.fake.answer_outbound(channel)
    plane = api.app[MEDIA]
    await until(lambda: plane.calls.get(call_id) and plane.calls[call_id].state == "active", what="the call active")
    media = plane.calls[call_id]
    assert media.agent.name == "intake" and set(api.fake.bridges[media.bridge]["channels"]) == {channel, media.agent.channel}
    record = await api.app[STORE].get(call_id)
    assert record["direction"] == "outbound" and record["state"] == "answered"
    await api.fake.caller_hangup(channel)
    async def ended() -> bool:
        return (await api.app[STORE].get(call_id))["state"] == "ended"
    await until(ended, what="the call ended")
    status, body = await api.call("POST", "/calls", json={"to": "+15551234567", "agent": "intake"})
    assert status == 422 and "declares no outbound trunk" in body["error"]["message"]
    status, body = await api.call("POST", "/calls", json={"to": "sip:x@y", "agent": "nobody"})
    assert status == 422 and "unknown agent" in body["error"]["message"]


TRUNKS = """\
trunks:
  carrier-a: {outbound: {address: "sip.carrier-a.example:5061", transport: tls, failover: [carrier-b]}}
  carrier-b: {outbound: {address: "10.0.0.9"}}
destinations:
  desk: {trunk: carrier-a, number: "+442079460999"}
"""


async def test_phone_numbers_are_called_through_the_policys_outbound_trunks(api, policy_dir):
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, POLICY.replace(
        'destinations:\n  desk: {uri: "sip:desk@pbx.example.com"}\n', TRUNKS))
    status, body = await api.call("POST", "/policy/reload", token=ADMIN)
    assert status == 200, body
    # two outbound trunks and no outbound_trunk setting: the request must name one
    status, body = await api.call("POST", "/calls", json={"to": "+15551234567", "agent": "intake"})
    assert status == 422 and "several outbound trunks (carrier-a, carrier-b)" in body["error"]["message"]
    status, body = await api.call("POST", "/calls", json={"to": "+15551234567", "agent": "intake", "trunk": "nope"})
    assert status == 422 and body["error"]["errors"] == [{"path": "trunk", "message": "unknown outbound trunk 'nope'"}]
    status, body = await api.call("POST", "/calls", json={"to": "sip:a@b", "agent": "intake", "trunk": "carrier-a"})
    assert status == 422 and body["error"]["errors"][0]["path"] == "trunk"
    # the media node dials the number on the trunk; the edge builds the carrier's URI from there
    status, body = await api.call("POST", "/calls", json={"to": "+15551234567", "agent": "intake", "trunk": "carrier-a"})
    assert status == 201, body
    assert api.fake.originations[-1]["endpoint"] == "PJSIP/edge/sip:+15551234567@sip.carrier-a.example:5061;cf-trunk=carrier-a"
    # a human brought in through a destination behind a trunk: the same, never the carrier's transport
    await api.live_call("h1@edge")
    status, body = await api.call("POST", "/calls/h1@edge/actions", json={"action": {"add_human": {"destination": "desk"}}})
    assert status == 200, body
    assert api.fake.originations[-1]["endpoint"] == "PJSIP/edge/sip:+442079460999@sip.carrier-a.example:5061;cf-trunk=carrier-a"


async def test_policy_endpoints(api, policy_dir):
    status, body = await api.call("GET", "/policy", token=READ)
    assert status == 200 and body["agents"] == ["billing", "intake"] and len(body["version"]) == 12
    status, body = await api.call("POST", "/policy/validate", token=ADMIN,
                                  json={"files": {"a.yaml": POLICY + "rules:\n  - {name: r, actions: [route_agent: nobody]}\n"}})
    assert status == 422
    (error,) = body["error"]["errors"]
    assert error["path"].startswith("a.yaml:") and "unknown agent 'nobody'" in error["message"]
    status, body = await api.call("POST", "/policy/validate", token=ADMIN, json={"files": {"a.yaml": POLICY}})
    assert status == 200 and body["valid"] is True
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, POLICY.replace("intake]", "billing]"))
    status, body = await api.call("POST", "/policy/reload", token=ADMIN)
    assert status == 200 and body["accepted"] and body["version"] != body["previous"]
    await asyncio.to_thread((policy_dir / "p.yaml").write_text, "rules: [")
    status, body = await api.call("POST", "/policy/reload", token=ADMIN)
    assert status == 422 and body["error"]["serving"] and body["error"]["errors"]


async def test_events_websocket_streams_call_events(api):
    headers = {"Authorization": f"Bearer {READ}"}
    async with api.http.ws_connect(api.base + "/events?types=fork.*,transfer.completed", headers=headers) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "subscribed"
        await api.live_call()
        await api.call("POST", "/calls/c1@edge/actions", json={"action": {"fork": "stt"}})
        await api.call("POST", "/calls/c1@edge/actions", json={"action": {"route_agent": "billing"}})
        seen = [await ws.receive_json(timeout=5) for _ in range(2)]
    assert [e["type"] for e in seen] == ["fork.started", "transfer.completed"]
    assert all(e["call_id"] == "c1@edge" for e in seen) and seen[1]["data"]["to_agent"] == "billing"


def test_the_committed_openapi_document_is_current():
    committed = json.loads((ROOT / "controller" / "api" / "openapi.json").read_text())
    assert committed == document(), \
        "controller/api/openapi.json is stale: run `callfabric api openapi > controller/api/openapi.json`"


async def test_the_cli_acts_on_calls_through_the_api(api, capsys):
    from controller.cli import main
    await api.live_call()
    code = await asyncio.to_thread(main, ["call", "--api", api.base, "--token", CONTROL, "transfer", "c1@edge",
                                          "--agent", "billing", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["result"]["agent"] == "billing"
    code = await asyncio.to_thread(main, ["call", "hangup", "c1@edge", "--api", api.base, "--token", READ])
    assert code == 1 and "lacks the 'control' scope" in capsys.readouterr().err
    code = await asyncio.to_thread(main, ["call", "--api", api.base, "--token", CONTROL, "transfer", "c1@edge"])
    assert code == 2
