"""The ARI fake is faithful (real spec, Asterisk's event order) and strict (bad requests fail)."""
from __future__ import annotations

import asyncio
import base64
import json
import re

import aiohttp
import pytest

from tests.support.ari_spec import SPEC, SpecError, validate_model, validate_request
from tests.support.fake_ari import FakeAri, FakeAriBug

APP = "callfabric"


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


AUTH = basic("callfabric", "secret")


# ---------------------------------------------------------------------- helpers
class Events:
    """Client side of the events websocket: every message is checked against the spec."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws

    async def next(self, timeout: float = 2.0) -> dict:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        event = json.loads(msg.data)
        validate_model("Message", event)
        return event

    async def expect(self, *types: str) -> list[dict]:
        got = [await self.next() for _ in types]
        assert [e["type"] for e in got] == list(types), [e["type"] for e in got]
        return got

    async def until(self, type_: str) -> list[dict]:
        got = []
        while not got or got[-1]["type"] != type_:
            got.append(await self.next())
        return got

    async def quiet(self, wait: float = 0.05) -> None:
        with pytest.raises(asyncio.TimeoutError):
            msg = await asyncio.wait_for(self.ws.receive(), wait)
            pytest.fail(f"unexpected event {msg.data}")


@pytest.fixture
async def fake():
    server = await FakeAri(stasis_delay=0.01, ring_delay=0.005, playback_duration=0.02).start()
    yield server
    await server.stop()


@pytest.fixture
async def http(fake):
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def connect(http: aiohttp.ClientSession, fake: FakeAri, app: str = APP, **params) -> Events:
    ws = await http.ws_connect(fake.ws_url, params={"app": app, **params})
    await fake.wait_for_app(app.split(",")[0])
    return Events(ws)


async def call(http, fake, method, path, params=None, body=None, expect=None):
    async with http.request(method, fake.url + path, params=params, json=body) as resp:
        data = await resp.json() if resp.status != 204 else None
        if expect is not None:
            assert resp.status == expect, (resp.status, data)
        return resp.status, data


# ---------------------------------------------------------------------- the spec itself
def _sample(type_str: str):
    item = re.fullmatch(r"List\[(.+)\]", type_str)
    if item:
        return [_sample(item.group(1))]
    samples = {"string": "x", "int": 1, "long": 1, "double": 1.5, "boolean": True, "object": {},
               "Date": "2026-11-26T10:00:00.123+0000"}
    return samples[type_str] if type_str in samples else _instance(type_str)


def _instance(model: str, *, optional: bool = True) -> dict:
    out = {}
    for name, prop in SPEC.all_properties(model).items():
        if prop.required or optional:
            out[name] = prop.allowable[1][0] if prop.allowable and prop.allowable[0] == "LIST" else _sample(prop.type)
    if "type" in out and SPEC._discriminator(model):
        out["type"] = model
    return out


def test_every_operation_is_routable():
    assert SPEC.api_version == "10.0.0" and len(SPEC.operations) >= 14   # what the controller calls, at least
    for op in SPEC.operations:
        path = re.sub(r"\{(\w+)\}", lambda m: f"v-{m.group(1)}", op.path)
        found, params = SPEC.resolve(op.method, "/ari" + path)
        assert found is op, (op, found)
        assert params == {n: f"v-{n}" for n in op.path_params}


def test_every_event_model_validates_and_mutations_fail():
    assert {"StasisStart", "StasisEnd", "ChannelDestroyed", "ApplicationReplaced"} <= set(SPEC.event_types)
    for event_type in SPEC.event_types:
        for optional in (False, True):
            event = _instance(event_type, optional=optional)
            validate_model("Message", event)
            validate_model("Event", event)
            validate_model(event_type, event)
        required = [p for p, d in SPEC.all_properties(event_type).items() if d.required and p != "type"]
        for prop in required:
            broken = _instance(event_type)
            del broken[prop]
            with pytest.raises(SpecError, match=re.escape(f"$.{prop}")):
                validate_model("Message", broken)
        with pytest.raises(SpecError, match=r"\$\.bogus: undocumented"):
            validate_model("Message", {**_instance(event_type), "bogus": 1})
    with pytest.raises(SpecError, match="unknown Message type 'StasisBegin'"):
        validate_model("Message", {**_instance("StasisStart"), "type": "StasisBegin"})
    bad_channel = _instance("StasisStart")
    bad_channel["channel"]["state"] = "Answered"
    with pytest.raises(SpecError, match=r"\$\.channel\.state"):
        validate_model("Message", bad_channel)
    bad_cause = {**_instance("ChannelDestroyed"), "cause": "16"}
    with pytest.raises(SpecError, match=r"\$\.cause: expected int"):
        validate_model("Message", bad_cause)
    with pytest.raises(SpecError, match=r"\$\.timestamp: expected Date"):
        validate_model("Message", {**_instance("StasisEnd"), "timestamp": "yesterday"})
    with pytest.raises(SpecError, match=r"txjitter: expected double, got integer"):
        validate_model("RTPstat", {**_instance("RTPstat"), "txjitter": 1})


@pytest.mark.parametrize("method,path,query,body,status,reason", [
    ("GET", "/channels/c1/foo", None, None, 404, "Resource not found"),
    ("GET", "/channels/", None, None, 404, "do not end with a slash"),
    ("GET", "/channels/externalMedia", None, None, 405, "GET not allowed"),
    ("PUT", "/channels/c1/answer", None, None, 405, "allowed: POST"),
    ("POST", "/channels/c1/snoop", {"app": "a", "spy": "sideways"}, None, 400, "not in allowed values"),
    ("POST", "/channels/c1/snoop", {"spy": "in"}, None, 400, "missing required query parameter 'app'"),
    ("POST", "/channels/c1/snoop", {"app": "a", "spy": "in", "speed": "2"}, None, 400, "unknown query parameter 'speed'"),
    ("POST", "/bridges/b1/addChannel", [("channel", "a"), ("channel", "b")], None, 400, "given 2 times"),
    ("POST", "/bridges/b1/addChannel", {"channel": "a", "mute": "sometimes"}, None, 400, "expected boolean"),
    ("POST", "/channels/c1/dial", {"timeout": "-5"}, None, 400, "out of range"),
    ("POST", "/channels/c1/dtmf", {"dtmf": "1", "between": "fast"}, None, 400, "expected int"),
    ("POST", "/channels", None, {"endpoint": "PJSIP/x", "app": "a", "timeout": "30"}, 400, "expected JSON integer"),
    ("POST", "/channels", None, {"endpoint": "PJSIP/x", "app": "a", "callerid": "1"}, 400, "unknown JSON body field"),
    ("POST", "/channels", None, ["PJSIP/x"], 400, "must be a JSON object"),
    ("POST", "/channels/c1/variables", None, {}, 400, "missing required JSON body field 'variables'"),
    ("POST", "/channels/c1/variables", None, {"variables": {"A": 1}}, 400, "must be a string or an object"),
    ("POST", "/channels/externalMedia", {"app": "a", "encapsulation": "srtp", "format": "ulaw"}, None, 400,
     "not in allowed values ['rtp', 'audiosocket', 'none']"),
    ("GET", "/asterisk/info", {"only": "build,kernel"}, None, 400, "'kernel' not in allowed values"),
])
def test_request_validation_reasons(method, path, query, body, status, reason):
    with pytest.raises(SpecError) as err:
        validate_request(method, path, query, body)
    assert err.value.status == status and reason in err.value.reason, err.value.reason


def test_valid_requests_and_typed_args():
    op, params = validate_request("POST", "/ari/channels/c%2F1/snoop/s1", {"app": "a", "spy": "in", "appArgs": "x,y"})
    assert (op.nickname, params) == ("snoopChannelWithId", {"channelId": "c/1", "snoopId": "s1"})
    op, params = validate_request("POST", "/channels", None, {
        "endpoint": "PJSIP/kamailio/sip:+33100@10.0.0.1", "app": "a", "timeout": 20,
        "variables": {"PJSIP_HEADER(add,X-Summary)": "vip", "Call_State": {"value": "x", "report_events": True}}})
    args = SPEC.request_args(op, params, None, {"endpoint": "PJSIP/x", "app": "a", "timeout": 20})
    assert args == {"endpoint": "PJSIP/x", "app": "a", "timeout": 20}
    op, params = validate_request("POST", "/bridges/b1/addChannel", {"channel": "c1,c2", "absorbDTMF": "True"})
    assert SPEC.request_args(op, params, {"channel": "c1,c2", "absorbDTMF": "True"})["channel"] == ["c1", "c2"]
    assert validate_request("GET", "/events", {"app": "a,b", "subscribeAll": "true"})[0].is_websocket


# ---------------------------------------------------------------------- strictness over HTTP
async def test_auth_is_required(fake):
    async with aiohttp.ClientSession() as anon:
        async with anon.get(fake.url + "/channels") as resp:
            assert resp.status == 401 and "Basic realm" in resp.headers["WWW-Authenticate"]
            assert await resp.json() == {"message": "Authentication required"}
        async with anon.get(fake.url + "/channels", headers=basic("callfabric", "wrong")) as resp:
            assert resp.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await anon.ws_connect(fake.ws_url, params={"app": APP})
        assert err.value.status == 401
        async with anon.get(fake.url + "/channels", params={"api_key": "callfabric:secret"}) as resp:
            assert resp.status == 200 and await resp.json() == []
    assert [r.status for r in fake.rejected] == [401, 401, 401]
    assert [r.path for r in fake.requests] == ["/channels"]


async def test_invalid_requests_get_asterisk_errors_and_are_recorded(fake, http):
    cases = [
        ("POST", "/channels/c1/snoop", {"app": APP, "spy": "in", "colour": "red"}, None, 400, "unknown query parameter"),
        ("POST", "/channels/c1/snoop", {"app": APP, "spy": "loud"}, None, 400, "not in allowed values"),
        ("POST", "/channels/externalMedia", {"app": APP, "external_host": "127.0.0.1:4000"}, None, 400,
         "missing required query parameter 'format'"),
        ("DELETE", "/channels/externalMedia", None, None, 405, "Invalid method"),
        ("GET", "/nowhere", None, None, 404, "Resource not found"),
        ("POST", "/channels", None, {"endpoint": "PJSIP/x", "app": APP, "variables": {"X": 5}}, 400,
         "must be a string or an object"),
    ]
    for method, path, params, body, status, reason in cases:
        got, data = await call(http, fake, method, path, params, body)
        assert got == status and reason in data["message"], (path, got, data)
    async with http.post(fake.url + "/channels", data=b'{"endpoint": "PJSIP/x"}',
                         headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 400 and "application/json" in (await resp.json())["message"]
    async with http.post(fake.url + "/channels", data=b'{"endpoint": ', headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and (await resp.json())["message"] == "Error parsing request body"
    assert fake.requests == []
    assert [(r.method, r.path, r.status) for r in fake.rejected][:4] == [
        ("POST", "/channels/c1/snoop", 400), ("POST", "/channels/c1/snoop", 400),
        ("POST", "/channels/externalMedia", 400), ("DELETE", "/channels/externalMedia", 405)]
    assert fake.rejected[0].query == {"app": APP, "spy": "in", "colour": "red"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await http.ws_connect(fake.ws_url)
    assert err.value.status == 400 and fake.rejected[-1].reason == "HTTP request is missing param: [app]"


async def test_unknown_ids_are_404_like_asterisk(fake, http):
    assert await call(http, fake, "GET", "/channels/nope") == (404, {"message": "Channel not found"})
    assert await call(http, fake, "GET", "/bridges/nope") == (404, {"message": "Bridge not found"})
    assert await call(http, fake, "DELETE", "/channels/nope") == (404, {"message": "Channel not found"})
    assert await call(http, fake, "POST", "/channels/nope/answer") == (404, {"message": "Channel not found"})
    assert (await call(http, fake, "POST", "/channels/nope/snoop", {"app": APP, "spy": "in"}))[0] == 404
    assert await call(http, fake, "DELETE", "/playbacks/nope") == (404, {"message": "Playback not found"})
    assert await call(http, fake, "GET", "/applications/nope") == (404, {"message": "Application does not exist."})
    assert [r.status for r in fake.requests] == [404] * 7 and not fake.rejected


# ---------------------------------------------------------------------- happy paths, real websocket
async def test_agent_leg_and_fork_then_caller_hangup(fake, http):
    ev = await connect(http, fake)
    chan = await fake.inbound_call(APP, ["call-1", "agent-a"], caller_number="+33100", callee="+33200",
                                   sip_call_id="abc@edge")
    (start,) = await ev.expect("StasisStart")
    assert start["args"] == ["call-1", "agent-a"] and start["application"] == APP
    assert start["channel"]["state"] == "Ring" and start["channel"]["protocol_id"] == "abc@edge"
    assert start["channel"]["dialplan"]["app_data"] == f"{APP},call-1,agent-a"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", start["timestamp"])

    await call(http, fake, "POST", f"/channels/{chan}/answer", expect=204)
    (change,) = await ev.expect("ChannelStateChange")
    assert change["channel"]["state"] == "Up"

    _, bridge = await call(http, fake, "POST", "/bridges", {"type": "mixing", "bridgeId": "agent-b1", "name": "c1"},
                           expect=200)
    assert (bridge["id"], bridge["bridge_type"], bridge["channels"]) == ("agent-b1", "mixing", [])
    _, ext = await call(http, fake, "POST", "/channels/externalMedia", {
        "app": APP, "external_host": "127.0.0.1:40000", "format": "ulaw", "channelId": "ext-1"}, expect=200)
    assert ext["state"] == "Down" and ext["name"].startswith("UnicastRTP/127.0.0.1:40000-")
    assert ext["channelvars"]["UNICASTRTP_LOCAL_ADDRESS"] == "127.0.0.1"
    assert int(ext["channelvars"]["UNICASTRTP_LOCAL_PORT"]) >= 10000
    # not in Stasis before its StasisStart: Asterisk answers 422
    status, data = await call(http, fake, "POST", "/bridges/agent-b1/addChannel", {"channel": "ext-1"})
    assert (status, data) == (422, {"message": "Channel not in Stasis application"})
    events = await ev.until("StasisStart")
    assert [e["type"] for e in events] == ["Dial", "ChannelStateChange", "Dial", "StasisStart"]
    assert events[-1]["channel"]["id"] == "ext-1" and events[-1]["args"] == []

    await call(http, fake, "POST", "/bridges/agent-b1/addChannel", {"channel": f"{chan},ext-1"}, expect=204)
    entered = await ev.expect("ChannelEnteredBridge", "ChannelEnteredBridge")
    assert [e["channel"]["id"] for e in entered] == [chan, "ext-1"]
    assert entered[1]["bridge"]["channels"] == [chan, "ext-1"]

    _, snoop = await call(http, fake, "POST", f"/channels/{chan}/snoop/fork-1",
                          {"spy": "in", "app": APP, "appArgs": "fork,call-1"}, expect=200)
    assert re.fullmatch(rf"Snoop/{re.escape(chan)}-[0-9a-f]{{8}}", snoop["name"]) and snoop["state"] == "Up"
    (snoop_start,) = await ev.expect("StasisStart")
    assert snoop_start["args"] == ["fork", "call-1"] and snoop_start["channel"]["id"] == "fork-1"

    await fake.caller_hangup(chan, cause=16)
    events = await ev.expect("ChannelHangupRequest", "ChannelLeftBridge", "StasisEnd")
    assert events[0]["cause"] == 16 and "soft" not in events[0]
    assert events[1]["bridge"]["channels"] == ["ext-1"]
    # the snoop dies with the channel it spied on; neither ChannelDestroyed reaches the app: it was
    # unsubscribed by StasisEnd (only the app that originated a channel stays subscribed)
    (snoop_end,) = await ev.expect("StasisEnd")
    assert snoop_end["channel"]["id"] == "fork-1"
    await ev.quiet()
    assert fake.channel(chan).hangup_cause == 16
    assert set(fake.channels) == {"ext-1"} and fake.bridges["agent-b1"]["channels"] == ["ext-1"]
    await call(http, fake, "DELETE", "/channels/ext-1", expect=204)
    events = await ev.expect("ChannelHangupRequest", "ChannelLeftBridge", "StasisEnd", "ChannelDestroyed")
    assert (events[3]["cause"], events[3]["cause_txt"]) == (16, "Normal Clearing")   # app originated it
    assert [(r.method, r.path) for r in fake.requests] == [
        ("GET", "/events"), ("POST", f"/channels/{chan}/answer"), ("POST", "/bridges"),
        ("POST", "/channels/externalMedia"), ("POST", "/bridges/agent-b1/addChannel"),
        ("POST", "/bridges/agent-b1/addChannel"), ("POST", f"/channels/{chan}/snoop/fork-1"),
        ("DELETE", "/channels/ext-1")]
    assert fake.requests[3].query["external_host"] == "127.0.0.1:40000"
    assert fake.events_sent == fake.events(app=APP) and not fake.bugs


async def test_ari_hangup_and_bridge_destroy(fake, http):
    ev = await connect(http, fake)
    chan = await fake.inbound_call(APP, ["c2"])
    await ev.expect("StasisStart")
    status, data = await call(http, fake, "DELETE", f"/channels/{chan}", {"reason": "busy", "reason_code": "17"})
    assert (status, data["message"]) == (400, "The reason and reason_code can't both be specified")
    await call(http, fake, "POST", "/bridges/b2", {"type": "mixing"}, expect=200)
    await call(http, fake, "POST", "/bridges/b2/addChannel", {"channel": chan}, expect=204)
    await ev.expect("ChannelEnteredBridge")
    await call(http, fake, "DELETE", "/bridges/b2", expect=204)
    # the caller leaves first, and with it the app's subscription to the bridge: no
    # BridgeDestroyed (as recorded from Asterisk, tests/media/ari_conversations/refusals.json)
    (left,) = await ev.expect("ChannelLeftBridge")
    assert left["bridge"]["channels"] == [] and "b2" not in fake.bridges
    await ev.quiet()
    assert fake.channel(chan).in_stasis                  # destroying a bridge does not hang up
    # an explicit subscription keeps the app subscribed past StasisEnd: it then gets ChannelDestroyed
    await call(http, fake, "POST", f"/applications/{APP}/subscription", {"eventSource": f"channel:{chan}"},
               expect=200)
    await call(http, fake, "DELETE", f"/channels/{chan}", {"reason": "busy"}, expect=204)
    req, _end, gone = await ev.expect("ChannelHangupRequest", "StasisEnd", "ChannelDestroyed")
    assert (req["cause"], req["soft"]) == (32, True)          # AST_SOFTHANGUP_EXPLICIT
    assert (gone["cause"], gone["cause_txt"]) == (17, "User busy")
    assert await call(http, fake, "GET", "/channels") == (200, [])


async def test_bridge_events_reach_subscribe_all_apps_only(fake, http):
    ev = await connect(http, fake)
    watcher = await connect(http, fake, "watcher", subscribeAll="true")
    await call(http, fake, "POST", "/bridges", {"bridgeId": "b3"}, expect=200)
    (created,) = await watcher.expect("BridgeCreated")
    assert created["application"] == "watcher" and created["bridge"]["technology"] == "simple_bridge"
    await ev.quiet()
    await fake.inbound_call(APP, [])
    await watcher.expect("ChannelCreated", "ChannelDialplan")
    await ev.expect("StasisStart")
    await watcher.quiet()                                 # StasisStart goes to the channel's app only


async def test_originate_rings_and_is_answered_or_fails_on_test_command(fake, http):
    ev = await connect(http, fake)
    _, chan = await call(http, fake, "POST", "/channels", None, {
        "endpoint": "PJSIP/kamailio/sip:+33300@10.0.0.2", "app": APP, "appArgs": "human,call-1",
        "callerId": "Agent <+33100>", "timeout": 20, "channelId": "out-1",
        "variables": {"PJSIP_HEADER(add,X-Summary)": "wants a refund", "PJSIP_HEADER(add,X-Intent)": "refund"}},
        expect=200)
    assert (chan["id"], chan["state"], chan["caller"]) == ("out-1", "Down", {"name": "Agent", "number": "+33100"})
    assert chan["name"].startswith("PJSIP/kamailio-")
    dial, ringing, dial_ringing = await ev.expect("Dial", "ChannelStateChange", "Dial")
    assert (dial["dialstatus"], dial["dialstring"]) == ("", "kamailio/sip:+33300@10.0.0.2")
    assert ringing["channel"]["state"] == "Ringing" and dial_ringing["dialstatus"] == "RINGING"
    assert fake.channel("out-1").variables["PJSIP_HEADER(add,X-Summary)"] == "wants a refund"
    assert fake.originations[0]["callerId"] == "Agent <+33100>"
    assert (await call(http, fake, "POST", "/channels/out-1/answer"))[0] == 409   # not in Stasis yet
    await fake.answer_outbound("out-1")
    up, answered, start = await ev.expect("ChannelStateChange", "Dial", "StasisStart")
    assert up["channel"]["state"] == "Up" and answered["dialstatus"] == "ANSWER"
    assert start["args"] == ["human", "call-1"]

    await call(http, fake, "POST", "/channels/out-2", {"endpoint": "PJSIP/kamailio", "app": APP}, expect=200)
    await ev.expect("Dial", "ChannelStateChange", "Dial")
    await fake.fail_outbound("out-2", cause=17, tech_cause=486)
    busy, gone = await ev.expect("Dial", "ChannelDestroyed")      # the originating app is still subscribed
    assert busy["dialstatus"] == "BUSY" and (gone["cause"], gone["cause_txt"]) == (17, "User busy")
    assert gone["tech_cause"] == 486 and gone["channel"]["state"] == "Ringing"
    assert "out-2" not in fake.channels and fake.channel("out-2").hangup_cause == 17
    status, data = await call(http, fake, "POST", "/channels/out-1", {"endpoint": "PJSIP/kamailio", "app": APP})
    assert status == 409
    status, data = await call(http, fake, "POST", "/channels", {"endpoint": "kamailio", "app": APP})
    assert (status, data["message"]) == (400, "Invalid endpoint specified")


async def test_create_then_dial(fake, http):
    ev = await connect(http, fake)
    caller = await fake.inbound_call(APP, ["c4"], caller_number="+33111")
    await ev.expect("StasisStart")
    _, chan = await call(http, fake, "POST", "/channels/create",
                         {"endpoint": "PJSIP/kamailio/sip:+33400@10.0.0.2", "app": APP, "appArgs": "dialed"},
                         expect=200)
    (start,) = await ev.expect("StasisStart")
    assert start["channel"]["state"] == "Down" and start["args"] == ["dialed"]
    assert (await call(http, fake, "POST", f"/channels/{chan['id']}/answer"))[0] == 412
    await call(http, fake, "POST", f"/channels/{chan['id']}/dial", {"caller": caller, "timeout": "30"}, expect=204)
    dial = (await ev.expect("Dial", "ChannelStateChange", "Dial"))[0]
    assert dial["caller"]["id"] == caller and dial["peer"]["id"] == chan["id"]
    assert (await call(http, fake, "POST", f"/channels/{chan['id']}/dial"))[0] == 409
    await fake.answer_outbound(chan["id"])
    await ev.expect("ChannelStateChange", "Dial")
    await ev.quiet()                                      # already in Stasis: no second StasisStart


async def test_playback_started_finished_and_stopped(fake, http):
    ev = await connect(http, fake)
    chan = await fake.inbound_call(APP, [])
    await ev.expect("StasisStart")
    await call(http, fake, "POST", f"/channels/{chan}/answer", expect=204)
    await ev.expect("ChannelStateChange")
    status, pb = await call(http, fake, "POST", f"/channels/{chan}/play/pb-1",
                            {"media": "sound:hello-world,sound:goodbye"})
    assert status == 201 and pb == {"id": "pb-1", "media_uri": "sound:hello-world", "next_media_uri": "sound:goodbye",
                                    "target_uri": f"channel:{chan}", "language": "en", "state": "queued"}
    started, _cont, second, finished = await ev.expect("PlaybackStarted", "PlaybackContinuing", "PlaybackStarted",
                                                       "PlaybackFinished")
    assert started["playback"]["state"] == "playing" and finished["playback"]["state"] == "done"
    assert second["playback"]["media_uri"] == "sound:goodbye"
    await call(http, fake, "POST", f"/channels/{chan}/play/pb-2", {"media": "tone:ring"}, expect=201)  # until stopped
    await ev.expect("PlaybackStarted")
    await call(http, fake, "DELETE", "/playbacks/pb-2", expect=204)
    (stopped,) = await ev.expect("PlaybackFinished")
    assert stopped["playback"]["id"] == "pb-2"


async def test_status_bridge_lists_variables_rtp_and_info(fake, http):
    ev = await connect(http, fake)
    chan = await fake.inbound_call(APP, [], sip_headers={"X-Call-Id": "c-9"})
    await ev.expect("StasisStart")
    await call(http, fake, "POST", "/bridges/b5", None, {"variables": {"Call": "c-9"}}, expect=200)
    assert fake.bridge("b5").variables == {"Call": "c-9"}
    # POST /bridges (no id) reads the WHOLE body as variables in 22.10.1: {"variables": ...} fails, bridge leaks
    status, data = await call(http, fake, "POST", "/bridges", {"bridgeId": "b6"}, {"variables": {"Call": "c-9"}})
    assert status == 400 and "whole JSON body" in data["message"] and "b6" in fake.bridges
    assert sorted(b["id"] for b in (await call(http, fake, "GET", "/bridges"))[1]) == ["b5", "b6"]
    assert [c["id"] for c in (await call(http, fake, "GET", "/channels"))[1]] == [chan]
    assert (await call(http, fake, "GET", f"/channels/{chan}"))[1]["id"] == chan
    assert (await call(http, fake, "GET", f"/channels/{chan}/variable",
                       {"variable": "PJSIP_HEADER(read,X-Call-Id)"}))[1] == {"value": "c-9"}
    assert (await call(http, fake, "GET", f"/channels/{chan}/variable", {"variable": "NOPE"}))[0] == 404
    await call(http, fake, "POST", f"/channels/{chan}/variable", {"variable": "CALL_ID", "value": "c-9"}, expect=204)
    assert (await ev.expect("ChannelVarset"))[0]["value"] == "c-9"
    assert (await call(http, fake, "GET", f"/channels/{chan}/rtp_statistics"))[1] == {"message": "RTP info not found"}
    await call(http, fake, "POST", f"/channels/{chan}/answer", expect=204)   # no RTP before the answer
    await ev.expect("ChannelStateChange")
    fake.set_rtp(chan, txcount=500, rxcount=480, rxploss=3, rxjitter=0.25)
    _, stats = await call(http, fake, "GET", f"/channels/{chan}/rtp_statistics", expect=200)
    assert (stats["txcount"], stats["rxcount"], stats["rxploss"], stats["rxjitter"]) == (500, 480, 3, 0.25)
    await call(http, fake, "POST", f"/channels/{chan}/snoop/s5", {"spy": "both", "app": APP}, expect=200)
    assert (await call(http, fake, "GET", "/channels/s5/rtp_statistics"))[0] == 403   # Snoop: no RTP glue
    await ev.expect("StasisStart")
    _, info = await call(http, fake, "GET", "/asterisk/info", {"only": "system"}, expect=200)
    assert info == {"system": {"version": "22.10.1", "entity_id": fake.asterisk_id}}
    _, app = await call(http, fake, "GET", f"/applications/{APP}", expect=200)
    assert app["name"] == APP and app["channel_ids"] == [chan, "s5"]


async def test_reconnect_resync_and_replacement(fake, http):
    ev = await connect(http, fake)
    chan = await fake.inbound_call(APP, ["c6"])
    await ev.expect("StasisStart")
    await fake.drop_websockets()
    msg = await ev.ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ev.ws.close_code == 1001
    assert not fake.app_connected(APP)
    await call(http, fake, "POST", f"/channels/{chan}/answer", expect=204)   # REST still works
    assert [e["type"] for e in fake.events_dropped] == ["ChannelStateChange"]
    with pytest.raises(RuntimeError, match="no websocket"):
        await fake.inbound_call(APP, ["c7"])
    ev2 = await connect(http, fake)
    assert [c["state"] for c in (await call(http, fake, "GET", "/channels"))[1]] == ["Up"]   # resync
    await fake.caller_hangup(chan)
    await ev2.expect("ChannelHangupRequest", "StasisEnd")   # still subscribed after the reconnect
    ev3 = await connect(http, fake)
    (replaced,) = await ev2.expect("ApplicationReplaced")
    assert replaced["application"] == APP
    await fake.inbound_call(APP, ["c8"])
    await ev3.expect("StasisStart")
    await ev2.quiet()


async def test_fake_refuses_to_emit_invalid_events(fake, http):
    ev = await connect(http, fake)
    with pytest.raises(FakeAriBug, match=r"\$\.channel: missing required field"):
        fake.emit_event(APP, {"type": "StasisStart", "args": []})
    with pytest.raises(FakeAriBug, match="unknown Message type 'CallStarted'"):
        fake.emit_event(APP, {"type": "CallStarted"})
    assert len(fake.bugs) == 2
    fake.bugs.clear()
    chan = await fake.inbound_call(APP, [])
    await ev.expect("StasisStart")
    fake.emit_event(APP, {"type": "ChannelDtmfReceived", "digit": "5", "duration_ms": 90,
                          "channel": fake.channels[chan]})
    (dtmf,) = await ev.expect("ChannelDtmfReceived")
    assert dtmf["digit"] == "5"
    fake.send_raw(APP, "{not json")                       # garbage from ARI, for client robustness tests
    msg = await ev.ws.receive()
    assert msg.data == "{not json"


async def test_freeze_holds_http(fake, http):
    fake.freeze(True)
    task = asyncio.ensure_future(call(http, fake, "GET", "/asterisk/ping"))
    await asyncio.sleep(0.05)
    assert not task.done()
    fake.freeze(False)
    status, pong = await task
    assert status == 200 and pong["ping"] == "pong"
