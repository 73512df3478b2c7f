"""Media anchored at the edge by a real rtpengine (userspace): the media node only ever sees
rtpengine's address, a caller behind NAT (private address in Contact, Via and SDP, sending from
loopback) gets two-way audio, and trunks choose whether a call is anchored."""
from __future__ import annotations

import asyncio
import re
import shutil
import socket

import pytest

from controller.localstack.kamailio import free_port
from controller.localstack.rtpengine import Rtpengine
from controller.localstack.sip_ua import TONE, SipCaller  # TONE: what SipCaller sends
from controller.localstack.sipp import SippUAS

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None or shutil.which("rtpengine") is None,
    reason="kamailio, sipp and rtpengine (Debian: rtpengine-daemon) binaries are required")

PRIVATE = "192.168.77.10"  # announced only: nothing may ever be sent there


def echo_port() -> int:
    """A UDP port free together with port + 2 (SIPp's -rtp_echo binds both)."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port + 2))
            return port
        except OSError:
            continue
        finally:
            probe.close()
    raise RuntimeError("no free echo port pair")


@pytest.fixture
def anchored(tmp_path, procs):
    rtp = procs.add(Rtpengine(tmp_path).start())
    media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media", ["-mp", str(echo_port()), "-rtp_echo"]).start())
    kamailio = procs.kamailio({1: [media.addr]}, extra_defines={"RTPENGINE_SOCK": rtp.sock})
    procs.decider(kamailio)  # every call to the media node set
    return kamailio, media, rtp


def sdp_address(sdp: str) -> tuple[str, int]:
    return re.search(r"c=IN IP4 (\S+)", sdp).group(1), int(re.search(r"m=audio (\d+)", sdp).group(1))


def received_invites(media: SippUAS) -> list[str]:
    """The INVITEs SIPp logged (-trace_msg), headers and body with LF line ends."""
    text = media.msg_file.read_text(errors="replace").replace("\r", "") if media.msg_file.exists() else ""
    blocks = [b.split("\n\n", 1)[-1] for b in re.split(r"\n?-{10,}[^\n]*\n", text)]
    return [b for b in blocks if b.startswith("INVITE ")]


async def test_nat_caller_gets_two_way_audio_through_rtpengine(anchored):
    kamailio, media, rtp = anchored
    caller = SipCaller(kamailio.sip_port, announce_ip=PRIVATE)
    result = await caller.call("+18005550100", 1.5)
    assert result.status == 200
    # the caller is answered with rtpengine's address, not the media node's
    address, port = sdp_address(result.sdp)
    assert address == "127.0.0.1" and rtp.port_min <= port < rtp.port_min + rtp.ports
    # audio both ways: the media node echoed what reached it through rtpengine, back to the
    # caller's real (loopback) address — never to the private one it announced
    assert result.rtp_sent >= 60 and result.rtp_received >= result.rtp_sent * 0.8, result
    invite = (await asyncio.to_thread(received_invites, media))[-1]
    head, _, body = invite.partition("\n\n")
    contact = re.search(r"^Contact: (.*)$", head, re.M).group(1)
    assert PRIVATE not in contact and PRIVATE not in body  # Contact fixed, SDP rewritten by rtpengine
    offered, offered_port = sdp_address(body)
    assert offered == "127.0.0.1" and rtp.port_min <= offered_port < rtp.port_min + rtp.ports
    assert await asyncio.to_thread(kamailio.metric, "kamailio_callfabric_media_anchor_total",
                                   'result="anchored"') == 1


TRUNKS = """\
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
trunks:
  secure: {inbound: {sources: ["127.0.0.41"], srtp: required}}
  direct: {inbound: {sources: ["127.0.0.42"], media: never, srtp: off}}
  nat-only: {inbound: {sources: ["127.0.0.43"], media: nat-only}}
default:
  actions: [route_agent: intake]
"""


@pytest.fixture
def trunked(tmp_path, procs):
    """The edge with a trunk table written from TRUNKS (as the controller does) and rtpengine."""
    from controller.edge.trunks import build_table, write_table
    from controller.policy.validate import build_policy_source

    trunks = tmp_path / "trunks"
    write_table(str(trunks), build_table(build_policy_source({"p.yaml": TRUNKS}), "callfabric", environ={}))
    rtp = procs.add(Rtpengine(tmp_path).start())
    media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media", ["-mp", str(echo_port()), "-rtp_echo"]).start())
    kamailio = procs.kamailio({1: [media.addr]}, extra_defines={"RTPENGINE_SOCK": rtp.sock}, trunks_dir=trunks)
    decider = procs.decider(kamailio)
    return kamailio, media, rtp, decider


async def test_srtp_required_trunk_refuses_plain_rtp_and_encrypts_the_caller_leg(trunked):
    kamailio, media, rtp, decider = trunked
    plain = await SipCaller(kamailio.sip_port, source_ip="127.0.0.41").call("+18005550100", 0.2)
    assert (plain.status, plain.reason) == (488, "Not Acceptable Here")
    assert not decider.decides  # refused at the edge, before any decision

    result = await SipCaller(kamailio.sip_port, source_ip="127.0.0.41", srtp=True).call("+18005550100", 1.5)
    assert result.status == 200 and "RTP/SAVP" in result.sdp and "a=crypto:" in result.sdp
    assert decider.decides[-1]["trunk"] == "secure"
    # the media node got plain RTP/AVP from rtpengine (it could echo it) ...
    invite = (await asyncio.to_thread(received_invites, media))[-1]
    assert "m=audio" in invite and "RTP/AVP" in invite and "RTP/SAVP" not in invite and "crypto" not in invite
    # ... and the caller's leg is SRTP both ways: what came back authenticates with rtpengine's key,
    # decrypts to the caller's own tone, and the tone is nowhere in the datagrams on the wire
    assert result.rtp_received >= result.rtp_sent * 0.8 and result.srtp_failed == 0, result
    assert result.payloads and all(p == TONE for p in result.payloads)
    assert not any(TONE[:40] in datagram for datagram in result.raw)


async def test_trunks_choose_whether_media_is_anchored(trunked):
    kamailio, media, rtp, _ = trunked

    async def offered_to_media_node(source: str, **kw) -> tuple[tuple[str, int], int]:
        """What the media node was offered, and the caller's own RTP port."""
        result = await SipCaller(kamailio.sip_port, source_ip=source, **kw).call("+18005550100", 0.5)
        assert result.status == 200 and result.rtp_received > 0, result
        invite = [i for i in await asyncio.to_thread(received_invites, media) if result.call_id in i][-1]
        return sdp_address(invite.partition("\n\n")[2]), result.rtp_port

    def anchored_port(port: int) -> bool:
        return rtp.port_min <= port < rtp.port_min + rtp.ports

    # never: the media node sees the caller's own address and port (a caller's port may fall in
    # rtpengine's range: both come from the same ephemeral ports, so the port is compared itself)
    offer, own_port = await offered_to_media_node("127.0.0.42")
    assert offer == ("127.0.0.42", own_port)
    # nat-only: a caller on its real address is not anchored, one behind NAT is
    offer, own_port = await offered_to_media_node("127.0.0.43")
    assert offer == ("127.0.0.43", own_port)
    (address, port), own_port = await offered_to_media_node("127.0.0.43", announce_ip=PRIVATE)
    assert address == "127.0.0.1" and anchored_port(port) and port != own_port


async def test_the_decision_chooses_the_calls_anchoring(tmp_path, procs):
    """The answer's `media` (a policy's or webhook's anchor_media) replaces the trunk's choice;
    an SRTP caller stays anchored whatever the decision says."""
    from controller.edge.trunks import build_table, write_table
    from controller.policy.validate import build_policy_source

    trunks = tmp_path / "trunks"

    def start():
        write_table(str(trunks), build_table(build_policy_source({"p.yaml": TRUNKS}), "callfabric", environ={}))
        rtp = procs.add(Rtpengine(tmp_path).start())
        media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media", ["-mp", str(echo_port()), "-rtp_echo"]).start())
        kamailio = procs.kamailio({1: [media.addr]}, extra_defines={"RTPENGINE_SOCK": rtp.sock}, trunks_dir=trunks)
        procs.decider(kamailio, lambda d: {"action": "dispatch", "set": 1,
                                           **({"media": d["headers"]["X-Anchor"][0]} if "X-Anchor" in d["headers"] else {})})
        return kamailio, media, rtp
    kamailio, media, rtp = await asyncio.to_thread(start)

    async def offered(source: str, anchor: str | None, audio: bool = True, **kw) -> tuple[str, int]:
        result = await SipCaller(kamailio.sip_port, source_ip=source, **kw).call(
            "+18005550100", 0.4, headers={"X-Anchor": anchor} if anchor else None)
        assert result.status == 200 and (result.rtp_received > 0 or not audio), result
        invite = [i for i in await asyncio.to_thread(received_invites, media) if result.call_id in i][-1]
        return sdp_address(invite.partition("\n\n")[2])

    def anchored(address: tuple[str, int]) -> bool:
        return address[0] == "127.0.0.1" and rtp.port_min <= address[1] < rtp.port_min + rtp.ports
    # trunk `direct` (127.0.0.42) is never anchored by itself; a decision can anchor its calls
    assert not anchored(await offered("127.0.0.42", None))
    assert anchored(await offered("127.0.0.42", "always"))
    # trunk `nat-only` (127.0.0.43): a NAT caller is anchored unless the decision says never (then
    # the media node is told the caller's private address: no audio, as the decision asked)
    assert anchored(await offered("127.0.0.43", "nat-only", announce_ip=PRIVATE))
    assert (await offered("127.0.0.43", "never", audio=False, announce_ip=PRIVATE))[0] == PRIVATE
    # trunk `secure` (127.0.0.41, SRTP required): SRTP ends at the edge, whatever is decided
    assert anchored(await offered("127.0.0.41", "never", srtp=True))
