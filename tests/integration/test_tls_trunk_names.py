"""Who the edge talks TLS to, on the real edge (Kamailio 5.6 tls module + kamailio/outbound.cfg):
a trunk's carrier must present a certificate that chains to the edge's CAs *and* names the trunk
(`tls_name`, else the address's host). Kamailio 5.6 checks no name in the handshake, so the edge
checks it on the carrier's replies: a certificate from the trusted CA for another name gets the
INVITE but never a call up (its replies are dropped, the connection closed, the call fails over);
the right name is accepted, a wildcard covers one label. The trunk's name is sent as SNI, and a
tls.cfg client profile with the trunk's name as `server_id` pins the CA of that trunk alone."""
from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest

from controller.edge.trunks import build_table, write_table
from controller.localstack.sip_ua import SipCaller, _headers
from controller.localstack.sip_uas import Received, SipStreamUas
from controller.localstack.sipp import SippUAS
from controller.localstack.tls import LocalCa
from controller.policy import policy_from_texts
from tests.support.wait import until

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None or shutil.which("openssl") is None
    or not list(Path("/usr/lib").glob("*/kamailio/modules/tls.so")),
    reason="kamailio with its tls module (Debian: kamailio-tls-modules), sipp and openssl are required")

POLICY = """\
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
trunks:
  callers: {inbound: {sources: ["127.0.0.0/8"], media: never, srtp: off}}
  carrier: {outbound: {address: "{good}", transport: tls, tls_name: sip.carrier.example, media: never}}
  spoofed:
    outbound: {address: "{impostor}", transport: tls, tls_name: sip.carrier.example, media: never,
               failover: [carrier]}
  wildcard: {outbound: {address: "{wild}", transport: tls, tls_name: edge.carrier.example, media: never}}
  pinned: {outbound: {address: "{private}", transport: tls, tls_name: sip.private.example, media: never}}
  pinned-elsewhere:
    outbound: {address: "{good2}", transport: tls, tls_name: sip.carrier.example, media: never}
  sideways:
    outbound: {address: "{sideways}", transport: tls, tls_name: sip.carrier.example, media: never,
               failover: [carrier]}
destinations:
  carrier: {trunk: carrier, number: "+442079460999"}
  spoofed: {trunk: spoofed, number: "+442079460999"}
  wildcard: {trunk: wildcard, number: "+442079460999"}
  pinned: {trunk: pinned, number: "+442079460999"}
  pinned-elsewhere: {trunk: pinned-elsewhere, number: "+442079460999"}
  sideways: {trunk: sideways, number: "+442079460999"}
default:
  actions: [route_agent: intake]
"""
# A client profile of the edge's tls.cfg for one trunk: its carrier's certificate must chain to
# that trunk's own CA (not the [client:default] list), the trunk's name as SNI.
PINNED_PROFILE = """
[client:any]
server_id = {trunk}
server_name = sip.private.example
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
ca_list = {ca}
"""


class AnsweringSideways(SipStreamUas):
    """An impostor that takes the INVITE over TLS (with a certificate for another name) and
    answers it over UDP, straight to the edge's SIP port: tm matches a reply by its Via branch,
    whatever the way it came."""

    edge_port = 0

    def _handle(self, peer, message: str) -> None:
        first, headers, body = _headers(message)
        if first.startswith("SIP/2.0"):
            return
        self.received.append(Received(first, headers, body, peer.tls_version))
        if not first.startswith("INVITE "):
            return
        sdp = ("v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
        lines = ["SIP/2.0 200 OK", *(f"Via: {v}" for v in headers["via"]), f"From: {headers['from'][0]}",
                 f"To: {headers['to'][0]};tag=sideways", f"Call-ID: {headers['call-id'][0]}",
                 f"CSeq: {headers['cseq'][0]}", *(f"Record-Route: {r}" for r in headers.get("record-route", [])),
                 "Contact: <sip:impostor@127.0.0.1:5999>", "Content-Type: application/sdp",
                 f"Content-Length: {len(sdp)}"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(("\r\n".join(lines) + "\r\n\r\n" + sdp).encode(), ("127.0.0.1", self.edge_port))


@pytest.fixture
async def edge(tmp_path, procs):
    ca = await asyncio.to_thread(LocalCa.create, tmp_path / "pki")  # the edge's trusted CA
    private = await asyncio.to_thread(LocalCa.create, tmp_path / "private-pki", "a carrier's own CA")
    edge_cert, edge_key = await asyncio.to_thread(ca.issue, "edge")
    carriers = {
        "good": await asyncio.to_thread(ca.issue, "good", ("sip.carrier.example",)),
        "good2": await asyncio.to_thread(ca.issue, "good2", ("sip.carrier.example",)),
        # the trusted CA, another name (a certificate anyone can get for a name of their own)
        "impostor": await asyncio.to_thread(ca.issue, "impostor", ("sbc.other.example", "127.0.0.1")),
        "wild": await asyncio.to_thread(ca.issue, "wild", ("*.carrier.example",)),
        "private": await asyncio.to_thread(private.issue, "private", ("sip.private.example",)),
    }
    uas = {name: await SipStreamUas(files).start() for name, files in carriers.items()}
    uas["sideways"] = await AnsweringSideways(carriers["impostor"]).start()
    text = POLICY
    for name, server in uas.items():
        text = text.replace("{" + name + "}", server.addr)
    policy = await asyncio.to_thread(policy_from_texts, {"p.yaml": text})
    trunks = tmp_path / "trunks"
    await asyncio.to_thread(write_table, str(trunks), build_table(policy.source, "callfabric", environ={}))

    def start():
        media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media").start())
        kamailio = procs.kamailio({1: [media.addr]}, trunks_dir=trunks, tls=(edge_cert, edge_key, ca.cert))
        # the pinned trunks' profile, added to the running edge's tls.cfg (tls.reload)
        with open(kamailio.workdir / "tls.cfg", "a") as cfg:
            for trunk in ("pinned", "pinned-elsewhere"):
                cfg.write(PINNED_PROFILE.format(trunk=trunk, ca=private.cert))
        kamailio.jsonrpc("tls.reload")
        uas["sideways"].edge_port = kamailio.sip_port
        decider = procs.decider(kamailio, lambda event: {
            "action": "relay", "uris": list(policy.source.destinations[event["headers"]["X-Dest"][0]].uris)})
        return kamailio, decider
    kamailio, decider = await asyncio.to_thread(start)
    yield kamailio, uas
    for server in uas.values():
        await server.stop()


async def call(kamailio, destination: str):
    return await SipCaller(kamailio.sip_port).call("+442079460999", 0.2, headers={"X-Dest": destination})


async def test_the_carrier_named_by_the_trunk_is_accepted_and_gets_its_name_as_sni(edge):
    kamailio, uas = edge
    result = await call(kamailio, "carrier")
    assert result.status == 200, result
    good = uas["good"]
    assert [r.first_line.split()[0] for r in good.received] == ["INVITE", "ACK", "BYE"]
    assert good.server_names == ["sip.carrier.example"]
    # a wildcard certificate covers the trunk's name (one label)
    assert (await call(kamailio, "wildcard")).status == 200
    assert uas["wild"].requests("BYE") and uas["wild"].server_names == ["edge.carrier.example"]
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total", 'result="tls-name"') == 0


async def test_a_certificate_from_the_trusted_ca_for_another_name_never_gets_the_call(edge):
    kamailio, uas = edge
    result = await call(kamailio, "spoofed")
    # the call went up through the failover trunk, not the impostor (whose 200 was dropped)
    assert result.status == 200, result
    impostor, good = uas["impostor"], uas["good"]
    assert [r.first_line.split()[0] for r in impostor.received] == ["INVITE"]  # no ACK, no BYE: no call
    assert good.requests("ACK") and good.requests("BYE")
    assert impostor.server_names == ["sip.carrier.example"]
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total", 'result="tls-name"') == 1
    # the impostor's connection was closed: the next call to it needs a new handshake, refused again
    again = await call(kamailio, "spoofed")
    assert again.status == 200 and len(impostor.requests("INVITE")) == 2
    assert not impostor.requests("ACK")
    await until(lambda: len(impostor.server_names) == 2, timeout=5, what="a second handshake with the impostor")


async def test_an_answer_that_does_not_come_over_the_carriers_connection_is_refused(edge):
    kamailio, uas = edge
    result = await call(kamailio, "sideways")
    # its 200 over UDP was dropped: the call went up through the failover trunk
    assert result.status == 200, result
    assert [r.first_line.split()[0] for r in uas["sideways"].received] == ["INVITE"]  # no ACK, no BYE
    assert uas["good"].requests("BYE")
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_out_total", 'result="tls-name"') == 1


async def test_a_trunks_own_tls_profile_pins_its_ca(edge):
    kamailio, uas = edge
    # the carrier's certificate is from its own CA, which only the trunk's profile trusts
    result = await call(kamailio, "pinned")
    assert result.status == 200, result
    assert uas["private"].requests("BYE") and uas["private"].server_names == ["sip.private.example"]
    # a trunk pinned to that CA refuses a carrier whose certificate is from the edge's default CA,
    # right name or not: the handshake fails, the carrier never gets the INVITE
    refused = await call(kamailio, "pinned-elsewhere")
    assert refused.status >= 400, refused
    assert not uas["good2"].requests("INVITE")
