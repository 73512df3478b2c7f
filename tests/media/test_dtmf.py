"""DTMF on the media plane against the spec-validating fake ARI, with real Redis: digits the
caller presses reach the timeline (and the public `call.dtmf` event), digits are sent to the
caller, and gathers end on max digits, the finish key or the timeout, their result taking a
policy branch or asking a (real, local) webhook for the actions to carry out."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from controller.api.commands import CallControl, CommandError
from controller.api.events import public_event
from controller.api.webhooks import WebhookSender, verify
from controller.localstack.kamailio import free_port
from controller.media.plane import MediaError
from controller.metrics import Metrics
from controller.policy import policy_from_texts
from tests.media.test_media_plane import Harness, h  # noqa: F401  (the fixture)

POLICY = """\
node_sets: {media: {dispatcher_set: 1}}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000", transport: rtp, codec: ulaw}
  billing: {node_set: media, endpoint: "127.0.0.1:4001", transport: audiosocket, codec: slin16}
default: {actions: [route_agent: intake]}
"""
SERVING = policy_from_texts({"p.yaml": POLICY})
CALL = "call-1@edge"


def control(h: Harness, ask=None) -> CallControl:
    return CallControl(h.plane, h.store, lambda: SERVING, ask_webhook=ask)


async def events(h: Harness, name: str) -> list[dict]:
    return [e for e in await h.store.timeline(CALL) if e["event"] == name]


async def test_digits_the_caller_presses_are_recorded_in_order_as_public_events(h):
    caller = await h.call_up()
    for digit in "42#":
        await h.fake.send_dtmf(caller, digit, duration_ms=120)
    deadline = asyncio.get_running_loop().time() + 5
    while len(await events(h, "dtmf")) < 3:
        assert asyncio.get_running_loop().time() < deadline, "the digits never reached the timeline"
        await asyncio.sleep(0.01)
    pressed = await events(h, "dtmf")
    assert [(e["digit"], e["leg"], e["duration_ms"]) for e in pressed] == [("4", "caller", 120), ("2", "caller", 120),
                                                                           ("#", "caller", 120)]
    public = public_event({**pressed[0], "call_id": CALL})
    assert public["type"] == "call.dtmf" and public["data"]["digit"] == "4"


async def test_send_dtmf_to_the_caller_through_ari(h):
    caller = await h.call_up()
    result = await control(h).execute(CALL, {"send_dtmf": {"digits": "1w2#", "duration_ms": 80}})
    assert result.status == 200 and result.body["result"] == {"digits": "1w2#", "to": "caller"}
    (request,) = h.fake.requests_to("POST", rf"/channels/{caller}/dtmf")
    assert request.query == {"dtmf": "1w2#", "duration": "80", "between": "100"}
    assert [e["digits"] for e in await events(h, "dtmf_sent")] == ["1w2#"]


async def test_send_dtmf_refuses_bad_digits_and_unknown_legs(h):
    await h.call_up()
    with pytest.raises(CommandError) as bad:
        await control(h).execute(CALL, {"send_dtmf": "12x"})
    assert bad.value.status == 422 and bad.value.errors[0]["path"].startswith("action.send_dtmf")
    unknown = await control(h).execute(CALL, {"send_dtmf": {"digits": "1", "to": "h7"}})
    assert unknown.status == 404 and "h7" in unknown.body["error"]["message"]
    assert not h.fake.requests_to("POST", r".*/dtmf")


async def test_gather_ends_at_the_finish_key_and_takes_the_matching_policy_branch(h):
    caller = await h.call_up()
    gather = {"max_digits": 6, "finish_key": "#", "timeout": "5s", "then": [
        {"match": {"digits": {"regex": "^9"}}, "actions": [{"send_dtmf": "9"}]},
        {"match": {"all": [{"digits": {"min_length": 2}}, {"reason": "finish_key"}]},
         "actions": [{"route_agent": "billing"}]},
        {"actions": [{"hangup": True}]}]}
    result = await control(h).execute(CALL, {"gather": gather})
    assert result.status == 200 and result.body["result"]["gather_id"].startswith("g")
    for digit in "123#":
        await h.fake.send_dtmf(caller, digit)
    await h.until(lambda: h.plane.calls[CALL].agent and h.plane.calls[CALL].agent.name == "billing")
    (done,) = await events(h, "gather_completed")
    assert (done["digits"], done["reason"], done["leg"]) == ("123", "finish_key", "caller")
    assert not h.fake.requests_to("POST", r".*/dtmf")  # the first branch did not match
    assert h.plane.calls[CALL].gather is None


async def test_gather_ends_at_max_digits_and_at_the_timeout(h):
    caller = await h.call_up()
    ctl = control(h)
    await ctl.execute(CALL, {"gather": {"max_digits": 2, "timeout": "2s"}})
    for digit in "789":
        await h.fake.send_dtmf(caller, digit)
    deadline = asyncio.get_running_loop().time() + 5
    while not await events(h, "gather_completed"):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    first = (await events(h, "gather_completed"))[0]
    assert (first["digits"], first["reason"]) == ("78", "max_digits")
    started = asyncio.get_running_loop().time()
    await ctl.execute(CALL, {"gather": {"max_digits": 4, "timeout": "300ms", "finish_key": ""}})
    await h.fake.send_dtmf(caller, "5")
    while len(await events(h, "gather_completed")) < 2:
        assert asyncio.get_running_loop().time() - started < 5, "the gather never timed out"
        await asyncio.sleep(0.01)
    second = (await events(h, "gather_completed"))[1]
    assert (second["digits"], second["reason"]) == ("5", "timeout")
    assert asyncio.get_running_loop().time() - started >= 0.3


async def test_the_first_digit_stops_the_prompt_and_a_new_gather_replaces_the_old(h):
    h.fake.playback_duration = 30.0  # a long prompt
    caller = await h.call_up()
    ctl = control(h)
    await ctl.execute(CALL, {"gather": {"prompt": "sound:conf-getpin", "max_digits": 4}})
    (play,) = h.fake.requests_to("POST", r".*/play/.*")
    playback_id = play.path.rsplit("/", 1)[1]
    assert h.plane.calls[CALL].gather.prompt_playback == playback_id
    await h.fake.send_dtmf(caller, "1")
    await h.fake.wait_for_request("DELETE", rf"/playbacks/{playback_id}")
    await ctl.execute(CALL, {"gather": {"max_digits": 1}})
    (replaced,) = await events(h, "gather_completed")
    assert (replaced["digits"], replaced["reason"]) == ("1", "replaced")


async def test_a_gather_webhook_is_asked_and_its_actions_carried_out(h):
    received = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify("s3cret", request.headers["Callfabric-Signature"], body)
        received.append(json.loads(body))
        return web.json_response({"actions": [{"send_dtmf": "0"}, {"route_agent": "nobody"}, {"play": "sound:vm-goodbye"}]})

    app = web.Application()
    app.router.add_post("/gathered", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sender = WebhookSender("s3cret", Metrics(), lambda event: None)
    try:
        caller = await h.call_up()
        await control(h, sender.ask).execute(CALL, {"gather": {"max_digits": 3,
                                                               "webhook": f"http://127.0.0.1:{port}/gathered"}})
        for digit in "314":
            await h.fake.send_dtmf(caller, digit)
        await h.fake.wait_for_request("POST", r".*/play/.*")
        assert received[0]["type"] == "gather.completed" and received[0]["call_id"] == CALL
        assert received[0]["data"]["digits"] == "314" and received[0]["data"]["reason"] == "max_digits"
        assert h.fake.requests_to("POST", rf"/channels/{caller}/dtmf")[0].query["dtmf"] == "0"
        (failed,) = await events(h, "gather_action_failed")
        assert failed["action"] == 1 and "nobody" in failed["reason"]  # the next action still ran
    finally:
        await sender.close()
        await runner.cleanup()


async def test_gather_refusals(h):
    await h.call_up()
    ctl = control(h)
    with pytest.raises(CommandError) as both:
        await ctl.execute(CALL, {"gather": {"then": [{"actions": [{"hangup": True}]}], "webhook": "http://x/y"}})
    assert both.value.status == 422
    with pytest.raises(CommandError) as regex:
        await ctl.execute(CALL, {"gather": {"then": [{"match": {"digits": {"regex": "(("}},
                                                      "actions": [{"hangup": True}]}]}})
    assert regex.value.errors[0]["path"] == "action.gather.then.0.match.digits.regex"
    unknown = await ctl.execute(CALL, {"gather": {"then": [{"actions": [{"route_agent": "nobody"}]}]}})
    assert unknown.status == 422
    with pytest.raises(MediaError, match="no answered human"):
        await h.plane.dtmf.gather(CALL, leg="h9")
    assert h.plane.calls[CALL].gather is None
    with pytest.raises(CommandError):
        await ctl._run(CALL, {"gather": {"then": [{"actions": [{"route_sip": "nowhere"}]}]}})


def test_the_cli_builds_dtmf_and_gather_actions():
    from controller.cli import _call_action, build_parser
    parse = build_parser().parse_args
    assert _call_action(parse(["call", "dtmf", "c1", "12#", "--to", "h2"])) == \
        {"send_dtmf": {"digits": "12#", "to": "h2"}}
    action = _call_action(parse(["call", "gather", "c1", "--max-digits", "4", "--prompt", "sound:conf-getpin",
                                 "--then", '[{"match": {"digits": "1"}, "actions": [{"hangup": true}]}]']))
    assert action == {"gather": {"max_digits": 4, "finish_key": "#", "timeout": "5s", "prompt": "sound:conf-getpin",
                                 "then": [{"match": {"digits": "1"}, "actions": [{"hangup": True}]}]}}
    from controller.api.commands import validate_action
    assert validate_action(action)
    with pytest.raises(ValueError):
        _call_action(parse(["call", "gather", "c1", "--webhook", "http://a/b", "--then", "[]"]))


async def test_a_gather_goes_on_after_a_controller_restart(h):
    """The gather is part of the call's record: the next controller finishes it (its digits
    so far, its timeout counted from the last digit, its branch)."""
    caller = await h.call_up()
    await control(h).execute(CALL, {"gather": {"max_digits": 4, "timeout": "3s", "finish_key": "",
                                               "then": [{"match": {"digits": "12"}, "actions": [{"send_dtmf": "9"}]}]}})
    await h.fake.send_dtmf(caller, "1")
    await h.until(lambda: h.plane.calls[CALL].gather.digits == "1")
    old = h.plane
    await h.stop_plane()
    await old.release_node("media1")  # gone with its process: none of its timers fire any more
    await h.start_plane()
    control(h)  # the new controller's call control carries out the gather's branch
    await asyncio.wait_for(h.plane.wait_synced("media1"), 5)  # it took the call over (and the node's events)
    assert h.plane.calls[CALL].gather.digits == "1"
    await h.fake.send_dtmf(caller, "2")
    deadline = asyncio.get_running_loop().time() + 5
    while not await events(h, "gather_completed"):
        assert asyncio.get_running_loop().time() < deadline, "the gather never ended after the restart"
        await asyncio.sleep(0.02)
    (done,) = await events(h, "gather_completed")
    assert (done["digits"], done["reason"]) == ("12", "timeout")
    await h.fake.wait_for_request("POST", rf"/channels/{caller}/dtmf")
