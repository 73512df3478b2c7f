"""Outbound trunks at the real edge: a call routed to a number through a trunk (the policy's
relay URIs, or a media node dialling `;cf-trunk=`) goes to the carrier's address, answers the
carrier's digest challenge with the trunk's credentials (uac), presents the trunk's caller ID
and From host, fails over to the trunk's failover trunks, and never shows the caller a
carrier's challenge. The carriers are SIPp UASs that challenge (uas_auth.xml)."""
from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from controller.edge.trunks import build_table, write_table
from controller.localstack.rtpengine import Rtpengine
from controller.localstack.sip_ua import SipCaller
from controller.localstack.sipp import SippUAS
from controller.policy import policy_from_texts
from tests.integration.test_media_anchor import echo_port, received_invites, sdp_address

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="kamailio and sipp binaries are required")

REALM = "carrier.example"
NODE_PORT = 5080  # the media node's SIP port on 127.0.0.5 (nothing else uses that address)
PASSWORD = "pa55:w0rd"
POLICY = """\
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
trunks:
  primary:
    outbound:
      address: "{primary}"
      digest: {username: acme, password_env: CF_OUT_PW}
      from_host: pbx.acme.example
      caller_ids: ["+442079460001", "+442079460002"]
      failover: [backup]
      media: never
  backup:
    outbound:
      address: "{backup}"
      digest: {username: acme, password_env: CF_OUT_PW, realm: carrier.example}
      media: never
  mute:
    outbound: {address: "{backup}", media: never}
  anchored:
    outbound: {address: "{primary}", digest: {username: acme, password_env: CF_OUT_PW}}
  secure:
    outbound: {address: "{backup}", srtp: required}
destinations:
  desk: {trunk: primary, number: "+442079460999"}
  mute-desk: {trunk: mute, number: "+442079460999"}
default:
  actions: [route_sip: desk]
"""


def carrier(tmp_path, procs, name: str, password: str = PASSWORD, scenario: str = "uas_auth.xml") -> SippUAS:
    values = {"REALM": REALM, "USER": "acme", "PASSWORD": password} if scenario == "uas_auth.xml" else None
    return procs.add(SippUAS(tmp_path, scenario, name, ["-mp", str(echo_port()), "-rtp_echo"], values).start())


def edge(tmp_path, procs, primary: SippUAS, backup: SippUAS, env: dict[str, str], **kw):
    """The edge with the trunk table written from POLICY; its decider relays every call to the
    destination the policy names (`X-Dest` header, default desk), with the policy's URIs."""
    policy = policy_from_texts({"p.yaml": POLICY.replace("{primary}", primary.addr).replace("{backup}", backup.addr)})
    trunks = tmp_path / "trunks"
    write_table(str(trunks), build_table(policy.source, "callfabric", environ=env))
    kamailio = procs.kamailio({1: [f"127.0.0.5:{NODE_PORT}"]}, trunks_dir=trunks, **kw)

    def decide(event: dict) -> dict:
        wanted = (event.get("headers", {}).get("X-Dest") or ["desk"])[0]
        return {"action": "relay", "uris": list(policy.source.destinations[wanted].uris)}
    decider = procs.decider(kamailio, decide)
    return kamailio, decider


def invites(uas: SippUAS):
    return uas.invites()


def auth_of(message) -> str:
    return (message.header("Authorization") or [""])[0]


async def test_a_call_to_a_number_answers_the_carriers_challenge_and_presents_the_trunks_caller_id(
        tmp_path, procs):
    primary = await asyncio.to_thread(carrier, tmp_path, procs, "primary")
    backup = await asyncio.to_thread(carrier, tmp_path, procs, "backup")
    kamailio, _ = await asyncio.to_thread(edge, tmp_path, procs, primary, backup, {"CF_OUT_PW": PASSWORD})
    result = await SipCaller(kamailio.sip_port, from_user="+12025550123").call("+442079460999", 0.5,
                                                                             headers={"P-Asserted-Identity": "<sip:+19005550000@evil.example>"})
    assert result.status == 200, result
    assert result.rtp_received > 0  # the carrier's (echoed) audio reached the caller

    sent = await asyncio.to_thread(invites, primary)
    first, second = sent[0], sent[-1]
    # the carrier's URI: the number at its address, no internal parameter
    assert first.first_line == f"INVITE sip:+442079460999@{primary.addr} SIP/2.0"
    assert not auth_of(first)
    # challenged once, then the same branch sent again with the trunk's credentials and the next CSeq
    assert auth_of(second).startswith('Digest username="acme", realm="carrier.example"')
    assert PASSWORD not in second.raw
    cseq = [int(m.header("CSeq")[0].split()[0]) for m in (first, second)]
    assert cseq[1] == cseq[0] + 1
    # presented with a number of the trunk's pool (the caller's is not in it), at its from_host;
    # the caller's own identity header is not passed to the carrier
    from_uri = re.search(r"<([^>]+)>", second.header("From")[0]).group(1)
    assert from_uri in ("sip:+442079460001@pbx.acme.example", "sip:+442079460002@pbx.acme.example")
    assert second.header("P-Asserted-Identity") == [f"<{from_uri}>"]
    assert "evil.example" not in second.raw
    # the caller's hang-up reached the carrier with the carrier's view of the dialog
    byes = await asyncio.to_thread(primary.requests, "BYE")
    assert byes and re.search(r"<([^>]+)>", byes[0].header("From")[0]).group(1) == from_uri
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total",
                                   'result="authenticated"') == 1
    assert not await asyncio.to_thread(invites, backup)


async def test_failover_to_the_next_trunk_and_a_refused_password_never_reaches_the_caller(tmp_path, procs):
    # primary refuses (503): backup answers, with HA1 credentials (its realm is declared)
    primary = await asyncio.to_thread(carrier, tmp_path, procs, "primary", scenario="uas_503.xml")
    backup = await asyncio.to_thread(carrier, tmp_path, procs, "backup")
    kamailio, _ = await asyncio.to_thread(edge, tmp_path, procs, primary, backup, {"CF_OUT_PW": PASSWORD})
    result = await SipCaller(kamailio.sip_port).call("+442079460999", 0.2)
    assert result.status == 200, result
    assert len(await asyncio.to_thread(invites, primary)) >= 1
    answered = (await asyncio.to_thread(invites, backup))[-1]
    assert answered.first_line == f"INVITE sip:+442079460999@{backup.addr} SIP/2.0"
    assert auth_of(answered).startswith('Digest username="acme"')
    # the backup has no caller IDs or from_host: the caller's number at the edge's own address
    assert re.search(r"<sip:\+12025550123@127\.0\.0\.1>", answered.header("From")[0])

    # a trunk without credentials that is challenged: the caller gets 503, not the challenge
    mute = await SipCaller(kamailio.sip_port).call("+442079460999", 0.2, headers={"X-Dest": "mute-desk"})
    assert (mute.status, mute.reason) == (503, "Service Unavailable")
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total",
                                   'result="no-credentials"') == 1


async def test_refused_credentials_are_not_retried_and_the_caller_gets_503(tmp_path, procs):
    primary = await asyncio.to_thread(carrier, tmp_path, procs, "primary", password="another")
    backup = await asyncio.to_thread(carrier, tmp_path, procs, "backup", password="another")
    kamailio, _ = await asyncio.to_thread(edge, tmp_path, procs, primary, backup, {"CF_OUT_PW": PASSWORD})
    result = await SipCaller(kamailio.sip_port).call("+442079460999", 0.2)
    assert (result.status, result.reason) == (503, "Service Unavailable")
    # each trunk got the call twice (challenge, one answer), never a third time
    assert len(await asyncio.to_thread(invites, primary)) == 2
    assert len(await asyncio.to_thread(invites, backup)) == 2
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total",
                                   'result="auth-refused"') == 2


async def test_a_media_node_calls_a_number_through_the_trunk_and_its_failover(tmp_path, procs):
    primary = await asyncio.to_thread(carrier, tmp_path, procs, "primary", scenario="uas_503.xml")
    backup = await asyncio.to_thread(carrier, tmp_path, procs, "backup")
    kamailio, decider = await asyncio.to_thread(edge, tmp_path, procs, primary, backup, {"CF_OUT_PW": PASSWORD})
    # the media node (a dispatcher destination) dials the number on the first trunk
    node = SipCaller(kamailio.sip_port, from_user="+442079460002", source_ip="127.0.0.5", source_port=NODE_PORT)
    result = await node.call("+442079460999", 0.3, uri_params=";cf-trunk=primary")
    assert result.status == 200, result
    assert not decider.decides  # a media node's call is not decided (nor looped back to the edge)
    first = (await asyncio.to_thread(invites, primary))[0]
    assert first.first_line == f"INVITE sip:+442079460999@{primary.addr} SIP/2.0"
    # in the pool: kept; the media node's address never reaches a carrier
    assert re.search(r"<sip:\+442079460002@pbx\.acme\.example>", first.header("From")[0])
    answered = (await asyncio.to_thread(invites, backup))[-1]
    assert auth_of(answered).startswith('Digest username="acme"') and "cf-trunk" not in answered.raw
    assert "127.0.0.5" not in answered.header("From")[0]
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total", 'result="failover"') == 1


@pytest.mark.skipif(shutil.which("rtpengine") is None, reason="rtpengine (Debian: rtpengine-daemon) is required")
async def test_a_media_nodes_call_through_a_trunk_is_anchored_and_srtp_toward_a_trunk_that_requires_it(
        tmp_path, procs):
    primary = await asyncio.to_thread(carrier, tmp_path, procs, "primary")
    backup = await asyncio.to_thread(carrier, tmp_path, procs, "backup", scenario="uas_answer.xml")
    rtp = await asyncio.to_thread(lambda: procs.add(Rtpengine(tmp_path).start()))
    kamailio, _ = await asyncio.to_thread(edge, tmp_path, procs, primary, backup, {"CF_OUT_PW": PASSWORD},
                                          extra_defines={"RTPENGINE_SOCK": rtp.sock})
    node = SipCaller(kamailio.sip_port, source_ip="127.0.0.5", source_port=NODE_PORT)

    result = await node.call("+442079460999", 1.0, uri_params=";cf-trunk=anchored")
    assert result.status == 200 and result.rtp_sent >= 40 and result.rtp_received >= result.rtp_sent * 0.8, result
    # both sides see rtpengine: the node in the answer, the carrier in the (authenticated) offer
    assert rtp.port_min <= sdp_address(result.sdp)[1] < rtp.port_min + rtp.ports
    offer = (await asyncio.to_thread(received_invites, primary))[-1].partition("\n\n")[2]
    assert rtp.port_min <= sdp_address(offer)[1] < rtp.port_min + rtp.ports and "127.0.0.5" not in offer

    secure = await node.call("+442079460999", 0.2, uri_params=";cf-trunk=secure")
    assert secure.status == 200, secure
    offer = (await asyncio.to_thread(received_invites, backup))[-1].partition("\n\n")[2]
    assert re.search(r"m=audio \d+ RTP/SAVP ", offer) and "a=crypto:" in offer, offer
