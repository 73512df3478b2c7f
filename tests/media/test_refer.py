"""Cold transfer by SIP REFER against the spec-validating fake ARI, with real Redis: the caller
is sent to the node's [callfabric-refer] dialplan (what Transfer() does there is played by the
test through the fake: the status variables, then Stasis with the outcome), the outcome is
recorded with its SIP status, and a refused REFER falls back to a handoff through the edge."""
from __future__ import annotations

import asyncio

import pytest

from controller.api.commands import CallControl, CommandError
from controller.api.events import public_event
from tests.media.test_dtmf import SERVING, events
from tests.media.test_media_plane import APP, h  # noqa: F401  (the fixture)
from tests.api.test_api_contract import ari_failing
from tests.media.test_recording import until_event

CALL = "call-1@edge"


async def refer(h, **extra):
    caller = await h.call_up()
    control = CallControl(h.plane, h.store, lambda: SERVING)
    result = await control.execute(CALL, {"transfer": {"to": "sip:+15550009999@carrier.example.com",
                                                       "headers": {"X-Case": "42 a,b"}, **extra}})
    assert result.status == 200, result.body
    return caller, result.body["result"]


async def test_the_caller_is_sent_to_the_refer_dialplan(h):
    caller, result = await refer(h)
    target = "<sip:+15550009999@carrier.example.com?X-Case=42%20a%2Cb>"
    assert result == {"transfer_id": result["transfer_id"], "to": target, "method": "refer", "state": "referring"}
    media = h.plane.calls[CALL]
    assert media.state == "referring"
    subscribe = h.fake.requests_to("POST", rf"/applications/{APP}/subscription")[-1]
    assert subscribe.query == {"eventSource": f"channel:{caller}"}
    variables = {r.query["variable"]: r.query["value"] for r in h.fake.requests_to("POST", rf"/channels/{caller}/variable")}
    assert variables == {"CALLFABRIC_REFER_TO": target, "CALLFABRIC_TRANSFER": result["transfer_id"]}
    (cont,) = h.fake.requests_to("POST", rf"/channels/{caller}/continue")
    assert cont.query == {"context": "callfabric-refer", "extension": "refer", "priority": "1"}
    assert caller not in h.fake.bridges[media.bridge]["channels"]
    await h.fake.wait_for_event("StasisEnd", channel_id=caller)
    await asyncio.sleep(0.1)
    assert CALL in h.plane.calls and media.state == "referring"  # the caller's StasisEnd is no hang-up


async def test_an_accepted_refer_completes_and_the_call_leaves(h):
    caller, result = await refer(h)
    await h.fake.dialplan_set(caller, "TRANSFERSTATUS", "SUCCESS")
    await h.fake.dialplan_set(caller, "TRANSFERSTATUSPROTOCOL", "0")
    await h.fake.dialplan_stasis(caller, APP, ["refer", result["transfer_id"], "SUCCESS", "0"])
    done = await until_event(h, "transfer_completed")
    assert (done["method"], done["status"], done["confirmed"]) == ("refer", 200, True)
    await h.until(lambda: CALL not in h.plane.calls)
    assert caller not in h.fake.channels  # our end of the caller's dialog is hung up
    assert (await h.store.load_media(CALL))["refers"][result["transfer_id"]]["state"] == "completed"
    assert public_event({**done, "call_id": CALL})["type"] == "transfer.completed"
    assert h.metrics.registry.get_sample_value("callfabric_transfers_total",
                                               {"kind": "refer", "result": "completed"}) == 1


async def test_a_refused_refer_reports_the_status_and_falls_back_to_a_handoff(h):
    caller, result = await refer(h)
    await h.fake.dialplan_set(caller, "TRANSFERSTATUS", "FAILURE")
    await h.fake.dialplan_set(caller, "TRANSFERSTATUSPROTOCOL", "603")
    await h.fake.dialplan_stasis(caller, APP, ["refer", result["transfer_id"], "FAILURE", "603"])
    failed = await until_event(h, "transfer_failed")
    assert (failed["status"], failed["reason"], failed["fallback"]) == (603, "refused", True)
    media = h.plane.calls[CALL]
    await h.until(lambda: media.state == "active" and caller in h.fake.bridges[media.bridge]["channels"])
    fallback = await until_event(h, "transfer_fallback")
    human = media.humans[fallback["leg"]]
    origination = h.fake.originations[-1]
    assert origination["endpoint"] == "PJSIP/edge/sip:+15550009999@carrier.example.com"
    assert origination["variables"]["PJSIP_HEADER(add,X-Case)"] == "42 a,b"
    await h.fake.answer_outbound(human.channel)
    await until_event(h, "handoff_completed")
    assert media.agent is None and set(h.fake.bridges[media.bridge]["channels"]) == {caller, human.channel}


async def test_the_far_end_hanging_up_during_the_refer_ends_the_call(h):
    caller, result = await refer(h, fallback=False)
    await h.fake.caller_hangup(caller)
    done = await until_event(h, "transfer_completed")
    assert done["confirmed"] is False
    await h.until(lambda: CALL not in h.plane.calls)


async def test_a_node_that_refuses_the_refer_leaves_the_call_up(h):
    caller = await h.call_up()
    with ari_failing(h.fake, ("channels", "continueInDialplan")):
        with pytest.raises(Exception, match="transfer by REFER failed"):
            await h.plane.refer.start(CALL, "sip:bob@pbx.example.com", fallback=False)
    media = h.plane.calls[CALL]
    assert media.state == "active" and caller in h.fake.bridges[media.bridge]["channels"]
    failed = (await events(h, "transfer_failed"))[-1]
    assert "the node refused" in failed["reason"] and not await events(h, "transfer_fallback")
    unsubscribed = h.fake.requests_to("DELETE", rf"/applications/{APP}/subscription")
    assert unsubscribed and unsubscribed[-1].query == {"eventSource": f"channel:{caller}"}


async def test_bridge_method_and_refusals(h):
    await h.call_up()
    control = CallControl(h.plane, h.store, lambda: SERVING)
    result = await control.execute(CALL, {"transfer": {"to": "sip:desk@pbx.example.com", "method": "bridge"}})
    assert result.body["result"]["method"] == "bridge" and result.body["result"]["mode"] == "handoff"
    assert not h.fake.requests_to("POST", r".*/continue")
    for bad in ({"to": "sip:a@b?x=1"}, {"to": "12"[:1]}):  # refused by the schema
        with pytest.raises(CommandError) as refused:
            await control.execute(CALL, {"transfer": bad})
        assert refused.value.status == 422, bad
    result = await control.execute(CALL, {"transfer": {"to": "sip:a@b", "headers": {"Via": "x"}}})
    assert result.status == 422 and result.body["error"]["errors"][0]["path"] == "action.transfer.headers.Via"


def test_the_cli_builds_cold_transfers():
    from controller.api.commands import validate_action
    from controller.cli import _call_action, build_parser
    parse = build_parser().parse_args
    action = _call_action(parse(["call", "transfer", "c1", "--to", "+15550009999", "--header", "X-Case=42",
                                 "--no-fallback"]))
    assert action == {"transfer": {"to": "+15550009999", "method": "refer", "headers": {"X-Case": "42"},
                                   "fallback": False}}
    assert validate_action(action)
    with pytest.raises(ValueError):
        _call_action(parse(["call", "transfer", "c1", "--to", "sip:a@b", "--agent", "billing"]))
    with pytest.raises(ValueError):
        _call_action(parse(["call", "transfer", "c1", "--to", "sip:a@b", "--header", "novalue"]))
