"""The SIP stand-in `callfabric up` puts where the policy points (a desk, a PBX, a media node's SIP
side), spoken to over real UDP sockets: it answers, retransmits its 200 OK until the ACK, picks
a codec it has, echoes RTP, answers OPTIONS and re-INVITEs, and its own hang-up follows the
Record-Route."""
from __future__ import annotations

import asyncio
import re
import struct

from controller.localstack.standin import StandInUas, parse_sip


class Peer(asyncio.DatagramProtocol):
    def __init__(self):
        self.got: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.got.put_nowait((data, addr))


async def open_peer() -> tuple[asyncio.DatagramTransport, Peer, int]:
    transport, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    return transport, peer, transport.get_extra_info("sockname")[1]


def invite(port: int, uas_port: int, call_id: str, payloads: str = "0", rtp_port: int = 40000,
           to_tag: str = "") -> bytes:
    sdp = f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP {payloads}\r\n"
    return (f"INVITE sip:desk@127.0.0.1:{uas_port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}\r\n"
            f"Record-Route: <sip:127.0.0.1:{port};lr>\r\nFrom: <sip:+12025550123@127.0.0.1>;tag=caller\r\n"
            f"To: <sip:desk@127.0.0.1>{to_tag}\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:caller@127.0.0.1:{port}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode()


async def next_message(peer: Peer, timeout: float = 3.0):
    data, _ = await asyncio.wait_for(peer.got.get(), timeout)
    return parse_sip(data)


async def test_answers_retransmits_until_ack_echoes_and_hangs_up_along_the_route():
    uas = await StandInUas("desk").start()
    transport, peer, port = await open_peer()
    rtp_transport, rtp_peer, rtp_port = await open_peer()
    try:
        transport.sendto(f"OPTIONS sip:desk@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKo\r\n"
                         f"From: <sip:edge@127.0.0.1>;tag=e\r\nTo: <sip:desk@127.0.0.1>\r\nCall-ID: ping\r\n"
                         f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".encode(), ("127.0.0.1", uas.port))
        assert (await next_message(peer))[0] == "SIP/2.0 200 OK"

        transport.sendto(invite(port, uas.port, "c1", "18 8 0", rtp_port), ("127.0.0.1", uas.port))
        first, headers, body = await next_message(peer)
        assert first == "SIP/2.0 200 OK" and "m=audio" in body and re.search(r"RTP/AVP 8\r?\n", body)  # PCMA: offered first
        to = dict(headers)["to"]
        assert "tag=" in to and dict(headers)["record-route"] == f"<sip:127.0.0.1:{port};lr>"
        again = await next_message(peer, 2.0)                           # no ACK yet: the 200 OK again
        assert again[0] == "SIP/2.0 200 OK"
        transport.sendto(f"ACK sip:desk@127.0.0.1:{uas.port} SIP/2.0\r\nCall-ID: c1\r\nCSeq: 1 ACK\r\n"
                         f"Content-Length: 0\r\n\r\n".encode(), ("127.0.0.1", uas.port))

        media_port = int(re.search(r"m=audio (\d+)", body).group(1))
        packet = struct.pack("!BBHII", 0x80, 8, 1, 160, 1234) + b"\xd5" * 160
        rtp_transport.sendto(packet, ("127.0.0.1", media_port))
        echoed, _ = await asyncio.wait_for(rtp_peer.got.get(), 2)
        assert echoed[12:] == packet[12:] and echoed[8:12] != packet[8:12]   # its own SSRC

        transport.sendto(invite(port, uas.port, "c1", "0 8", rtp_port, to_tag=";tag=x"), ("127.0.0.1", uas.port))
        reinvite = await next_message(peer)
        assert reinvite[0] == "SIP/2.0 200 OK" and reinvite[2] == body      # a re-INVITE keeps the media

        assert uas.hang_up("c1") and not uas.hang_up("c1")
        bye_line, bye_headers, _ = await next_message(peer)
        assert bye_line == "BYE sip:caller@127.0.0.1:" + str(port) + " SIP/2.0"
        assert dict(bye_headers)["route"] == f"<sip:127.0.0.1:{port};lr>" and "tag=caller" in dict(bye_headers)["to"]

        transport.sendto(invite(port, uas.port, "c2", "18", rtp_port), ("127.0.0.1", uas.port))
        assert (await next_message(peer))[0] == "SIP/2.0 488 Not Acceptable Here"    # G.729 only
        assert uas.calls == 1
    finally:
        uas.close()
        transport.close()
        rtp_transport.close()
