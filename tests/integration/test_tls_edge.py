"""TLS on the real edge (Kamailio tls module, kamailio/tls.cfg): a caller over TLS reaches an agent
with two-way audio, only TLS 1.2 and newer are accepted, a certificate replaced on disk is served
after `tls.reload` without a restart, a plain-TCP caller on a TLS-only trunk is refused, and calls
to an outbound trunk with `transport: tls` reach the carrier over TLS only when its certificate
chains to the edge's CAs."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import ssl
from pathlib import Path

import pytest

from controller.edge.trunks import build_table, write_table
from controller.localstack.sip_ua import SipCaller
from controller.localstack.sip_uas import SipStreamUas
from controller.localstack.sipp import SippUAS
from controller.localstack.tls import LocalCa
from controller.policy import policy_from_texts
from tests.integration.test_media_anchor import echo_port

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
  tls-only: {inbound: {sources: ["127.0.0.61"], transports: [tls], media: never, srtp: off}}
  anyone: {inbound: {sources: ["127.0.0.0/8"], media: never, srtp: off}}
  carrier: {outbound: {address: "{carrier}", transport: tls, media: never}}
  rogue: {outbound: {address: "{rogue}", transport: tls, media: never}}
destinations:
  carrier-desk: {trunk: carrier, number: "+442079460999"}
  rogue-desk: {trunk: rogue, number: "+442079460999"}
default:
  actions: [route_agent: intake]
"""


@pytest.fixture
async def tls_edge(tmp_path, procs):
    ca = await asyncio.to_thread(LocalCa.create, tmp_path / "pki")
    edge_cert, edge_key = await asyncio.to_thread(ca.issue, "edge")
    carrier = await SipStreamUas(await asyncio.to_thread(ca.issue, "carrier")).start()
    rogue_ca = await asyncio.to_thread(LocalCa.create, tmp_path / "rogue-pki", "rogue CA")
    rogue = await SipStreamUas(await asyncio.to_thread(rogue_ca.issue, "rogue")).start()
    policy = await asyncio.to_thread(policy_from_texts, {
        "p.yaml": POLICY.replace("{carrier}", carrier.addr).replace("{rogue}", rogue.addr)})
    trunks = tmp_path / "trunks"
    await asyncio.to_thread(write_table, str(trunks), build_table(policy.source, "callfabric", environ={}))

    def start():
        media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media", ["-mp", str(echo_port()), "-rtp_echo"]).start())
        kamailio = procs.kamailio({1: [media.addr]}, trunks_dir=trunks, tcp=True, tls=(edge_cert, edge_key, ca.cert))

        def decide(event: dict) -> dict:
            wanted = (event.get("headers", {}).get("X-Dest") or [None])[0]
            if wanted:
                return {"action": "relay", "uris": list(policy.source.destinations[wanted].uris)}
            return {"action": "dispatch", "set": 1}
        return kamailio, procs.decider(kamailio, decide)
    kamailio, decider = await asyncio.to_thread(start)
    yield kamailio, decider, ca, (edge_cert, edge_key), carrier, rogue
    await carrier.stop()
    await rogue.stop()


def client_context(ca: LocalCa, **versions) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    for name, value in versions.items():
        setattr(context, name, value)
    return context


async def test_a_tls_caller_reaches_an_agent_with_two_way_audio(tls_edge):
    kamailio, decider, ca, *_ = tls_edge
    caller = SipCaller(kamailio.tls_port, source_ip="127.0.0.61", transport="tls",
                       ssl_context=await asyncio.to_thread(client_context, ca))
    result = await caller.call("+18005550100", 1.0)
    assert result.status == 200, result
    assert result.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.rtp_sent >= 40 and result.rtp_received >= result.rtp_sent * 0.8, result
    decide = decider.decides[-1]
    assert (decide["transport"], decide["trunk"]) == ("tls", "tls-only")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_only_tls_1_2_and_newer_are_accepted(tls_edge):
    """(The same client completes a TLS 1.1 handshake with a server that allows it.)"""
    kamailio, _, ca, *_ = tls_edge

    def handshake(**versions) -> str:
        context = client_context(ca, **versions)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client itself would offer TLS 1.1
        with socket.create_connection(("127.0.0.1", kamailio.tls_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()
    assert await asyncio.to_thread(handshake, maximum_version=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, minimum_version=ssl.TLSVersion.TLSv1,
                                maximum_version=ssl.TLSVersion.TLSv1_1)


async def test_a_certificate_replaced_on_disk_is_served_after_tls_reload(tls_edge):
    kamailio, _, ca, (edge_cert, edge_key), *_ = tls_edge

    def served() -> str:
        context = client_context(ca)
        with socket.create_connection(("127.0.0.1", kamailio.tls_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
    def fingerprint(path) -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()
    before = await asyncio.to_thread(served)
    assert before == await asyncio.to_thread(fingerprint, edge_cert)
    renewed_cert, renewed_key = await asyncio.to_thread(ca.issue, "edge-renewed")
    await asyncio.to_thread(shutil.copyfile, renewed_cert, edge_cert)
    await asyncio.to_thread(shutil.copyfile, renewed_key, edge_key)
    assert await asyncio.to_thread(served) == before  # nothing changes by itself
    await asyncio.to_thread(kamailio.jsonrpc, "tls.reload")
    after = await asyncio.to_thread(served)
    assert after != before and after == await asyncio.to_thread(fingerprint, renewed_cert)
    assert kamailio.alive()


async def test_a_plain_tcp_caller_on_a_tls_only_trunk_is_refused(tls_edge):
    kamailio, decider, *_ = tls_edge
    plain = await SipCaller(kamailio.tcp_port, source_ip="127.0.0.61", transport="tcp").call("+18005550100", 0.1)
    assert (plain.status, plain.reason) == (403, "Forbidden (transport not allowed on this trunk)")
    assert not decider.decides
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_trunk_checks_total",
                                   'result="trunk-transport"') == 1
    # another trunk's caller may use TCP
    other = await SipCaller(kamailio.tcp_port, source_ip="127.0.0.62", transport="tcp").call("+18005550100", 0.1)
    assert other.status == 200 and decider.decides[-1]["transport"] == "tcp"


async def test_calls_to_a_tls_trunk_go_over_tls_to_a_carrier_whose_certificate_the_edge_trusts(tls_edge):
    kamailio, _, _, _, carrier, rogue = tls_edge
    result = await SipCaller(kamailio.sip_port).call("+442079460999", 0.5, headers={"X-Dest": "carrier-desk"})
    assert result.status == 200, result
    invite = carrier.requests("INVITE")[-1]
    assert invite.first_line == f"INVITE sip:+442079460999@{carrier.addr};transport=tls SIP/2.0"
    assert invite.tls_version in ("TLSv1.2", "TLSv1.3") and invite.header("via")[0].startswith("SIP/2.0/TLS ")
    assert carrier.rtp_echoed > 0 and result.rtp_received > 0
    assert carrier.requests("BYE")  # the caller's hang-up went the same way
    # a carrier whose certificate does not chain to the edge's CAs never gets the call
    refused = await SipCaller(kamailio.sip_port).call("+442079460999", 0.1, headers={"X-Dest": "rogue-desk"})
    assert refused.status >= 400
    assert not rogue.requests("INVITE")
