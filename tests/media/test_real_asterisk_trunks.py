"""A human brought in through an outbound trunk by a real Asterisk (what POST /v1/calls/{id}/humans
or a policy's add_human does for a `{trunk, number}` destination): Asterisk dials the trunk's dial
URI through the edge with the call's reference and context headers, and the carrier — a SIPp UAS
that answers 599 to any request carrying one of callfabric's header names — gets the call, and its
hang-up, without any of them."""
from __future__ import annotations

import asyncio
import time

import pytest

from controller.actions import is_trusted_header
from controller.edge.trunks import build_table, write_table
from controller.localstack.sipp import SippUAS
from controller.policy import policy_from_texts
from tests.integration.test_trunks_outbound_headers import methods, uas_scenario
from tests.media.test_real_asterisk import (  # noqa: F401  (skip marks, fixtures)
    asterisk_options, pytestmark, running, stack, wait_active)

TRUNKS = """\
trunks:
  callers: {inbound: {sources: ["127.0.0.1"], media: never, srtp: off}}
  carrier: {outbound: {address: "{carrier}", media: never}}
destinations:
  pstn: {trunk: carrier, number: "+442079460999"}
default:
  actions: [reject: {code: 403}]
"""


@pytest.fixture
def carrier(tmp_path):
    scenario = tmp_path / "strict-carrier.xml"
    scenario.write_text(uas_scenario(strict=True, info=False, sdp=True))
    uas = SippUAS(tmp_path, str(scenario), "carrier").start()
    yield uas
    uas.stop()


@pytest.fixture
def edge_trunks(tmp_path, carrier):
    policy = policy_from_texts({"trunks.yaml": TRUNKS.replace("{carrier}", carrier.addr)})
    directory = tmp_path / "trunks"
    write_table(str(directory), build_table(policy.source, "callfabric", environ={}))
    return directory


async def test_a_human_through_a_trunk_gets_the_call_without_callfabrics_headers(running, carrier, tmp_path):
    plane = running["plane"]
    policy = await asyncio.to_thread(policy_from_texts, {"t.yaml": TRUNKS.replace("{carrier}", carrier.addr)})
    uri = policy.source.destinations["pstn"].dial_uri()
    assert ";cf-trunk=carrier" in uri
    joined = {}

    async def bring_human(result):
        await wait_active(plane, result.call_id)
        added = await plane.humans.add(result.call_id, "pstn", uri, mode="conference",
                                       context={"summary": "Wants a refund", "intent": "refund"})
        deadline = time.monotonic() + 10
        while plane.calls[result.call_id].humans[added["leg_id"]].state != "up":
            assert time.monotonic() < deadline, "the carrier's answer never joined the call"
            await asyncio.sleep(0.1)
        joined["leg"] = added["leg_id"]

    result = await running["caller"].call("18005550199", hold_s=4.0, while_up=bring_human)
    assert result.status == 200 and joined
    # the strict carrier answered (a 599 would have left the leg down) and saw none of the names
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(carrier.requests, "BYE"):
        assert time.monotonic() < deadline, "the human leg's BYE never reached the carrier"
        await asyncio.sleep(0.1)
    got = [m for m in await asyncio.to_thread(carrier.messages) if m.direction == "in"]
    assert methods(got) == ["ACK", "BYE", "INVITE"]
    for message in got:
        assert not [n for n, _ in message.headers if is_trusted_header(n)], message.raw
    invite = got[0]
    assert invite.first_line == f"INVITE sip:+442079460999@{carrier.addr} SIP/2.0"
    assert "cf-trunk" not in invite.raw and "Wants a refund" not in invite.raw
