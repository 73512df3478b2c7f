"""A minimal SIP caller with real RTP, for the demo and the real-Asterisk suite: INVITE with an SDP offer
(PCMU), ACK along the Record-Route, RTP at 50 packets/s (a 1 kHz tone, so talk detection
hears it) from its own socket while it counts what comes back, BYE. Only what a test needs; asyncio, 127.0.0.1."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import random
import re
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field


def ulaw(sample: int) -> int:
    """G.711 µ-law code of a signed 16-bit sample."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = max(0, magnitude.bit_length() - 8)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


_NEAR_ZERO = bytes(b for b in range(256) if (b & 0x7F) >= 0x7D)  # µ-law codes within 2 steps of zero


def ulaw_silent(payload: bytes) -> bool:
    """True for a µ-law payload of (near) digital silence."""
    return not payload.translate(None, _NEAR_ZERO)


TONE = bytes(ulaw(round(8000 * math.sin(2 * math.pi * i / 8))) for i in range(160))  # 20 ms of 1 kHz


@dataclass
class CallResult:
    call_id: str
    status: int = 0
    reason: str = ""
    rtp_sent: int = 0
    rtp_received: int = 0
    voiced: int = 0  # packets received that carry sound, not silence
    payload_types: Counter = field(default_factory=Counter)  # of the packets received
    received_at: list[float] = field(default_factory=list)
    sdp: str = ""  # the answer's SDP
    rtp_port: int = 0  # the caller's own RTP port, the one its offer names
    invited_at: float = 0.0  # time.monotonic() of the first INVITE
    answered_at: float = 0.0  # … of the final answer
    raw: list[bytes] = field(default_factory=list)  # the first RTP datagrams as they arrived (on the wire)
    payloads: list[bytes] = field(default_factory=list)  # their payloads (decrypted, with SRTP)
    srtp_failed: int = 0  # datagrams that did not authenticate with the answered key
    tls_version: str = ""  # the TLS version the signalling used ("TLSv1.3"), with transport="tls"


class _Rtp(asyncio.DatagramProtocol):
    def __init__(self, result: CallResult, listen=None):
        self.result = result
        self.listen = listen  # listen(rtp packet, time.monotonic()) for every packet received
        self.unprotect = None  # SRTP: decrypts and authenticates, raises on a bad packet

    def datagram_received(self, data, addr):
        if len(data) >= 12 and data[0] >> 6 == 2:
            if len(self.result.raw) < 50:
                self.result.raw.append(data)
            if self.unprotect is not None:
                try:
                    data = self.unprotect(data)
                except Exception:  # noqa: BLE001 - pylibsrtp.Error: not SRTP with the answered key
                    self.result.srtp_failed += 1
                    return
            now = time.monotonic()
            self.result.rtp_received += 1
            self.result.received_at.append(now)
            if self.listen is not None:
                self.listen(data, now)
            self.result.payload_types[data[1] & 0x7F] += 1
            if not ulaw_silent(data[12 + 4 * (data[0] & 0x0F):]):
                self.result.voiced += 1
            if len(self.result.payloads) < 50:
                self.result.payloads.append(data[12:])


def _srtp_session(key_b64: str, outbound: bool):
    import pylibsrtp

    policy = pylibsrtp.Policy(key=base64.b64decode(key_b64), srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
                              ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else
                              pylibsrtp.Policy.SSRC_ANY_INBOUND)
    return pylibsrtp.Session(policy)


class _Sip(asyncio.DatagramProtocol):
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data.decode(errors="replace"))


class _SipStream(asyncio.Protocol):
    """SIP over TCP or TLS: one message per Content-Length (keep-alive CRLFs skipped)."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n")
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*(\d+)", self.buffer[:end])
            size = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < size:
                return
            message, self.buffer = self.buffer[:size], self.buffer[size:]
            self.queue.put_nowait(message.decode(errors="replace"))


def _headers(message: str) -> tuple[str, dict[str, list[str]], str]:
    head, _, body = message.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], headers, body


def digest_answer(challenge: str, method: str, uri: str, username: str, password: str) -> str:
    """A Proxy-Authorization value answering a Proxy-Authenticate challenge (MD5, qop=auth if offered)."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.split(" ", 1)[1]))
    realm, nonce = params["realm"], params["nonce"]
    ha1 = hashlib.md5(f"{username}:{realm}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"{method}:{uri}".encode()).hexdigest()
    value = f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
    if "auth" in params.get("qop", "").split(","):
        cnonce, nc = uuid.uuid4().hex[:16], "00000001"
        response = hashlib.md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        value += f', qop=auth, nc={nc}, cnonce="{cnonce}"'
    else:
        response = hashlib.md5(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
    return value + f', response="{response}"' + (f', opaque="{params["opaque"]}"' if "opaque" in params else "")


class SipCaller:
    """`source_ip`: the 127.0.0.x address it sends from; `announce_ip`: the address its Via,
    Contact and SDP claim (a caller behind NAT announces its private one); `auth`: digest
    (username, password) answering a 407; `transport`: udp, tcp or tls (`ssl_context`: how the
    edge's certificate is checked); `codec`: the payload type and rtpmap it offers and sends
    (default PCMU; (9, "G722/8000") for wideband, with `payload` giving G.722 bytes)."""

    def __init__(self, edge_port: int, from_user: str = "+12025550123", *, source_ip: str = "127.0.0.1",
                 announce_ip: str | None = None, auth: tuple[str, str] | None = None, srtp: bool = False,
                 source_port: int = 0, transport: str = "udp", ssl_context=None,
                 codec: tuple[int, str] = (0, "PCMU/8000")):
        self.codec = codec
        self.transport = transport
        self.ssl_context = ssl_context
        self.edge = ("127.0.0.1", edge_port)
        self.from_user = from_user
        self.source_ip = source_ip
        self.source_port = source_port  # its SIP port (0: any free one), e.g. a media node's known one
        self.announce_ip = announce_ip or source_ip
        self.auth = auth
        self.srtp = srtp  # offer RTP/SAVP with an SDES key (AES_CM_128_HMAC_SHA1_80) and encrypt
        self.challenges: list[int] = []  # 401/407 answers seen before the final one

    async def call(self, to_user: str, hold_s: float, *, headers: dict[str, str] | None = None,
                   while_up=None, observe=None, uri_params: str = "", payload=None, listen=None,
                   from_tag: str | None = None) -> CallResult:
        """Call `to_user` (Request-URI parameters `uri_params`, e.g. ";cf-trunk=carrier"), stream
        audio for `hold_s` seconds (awaiting `while_up(result)` if given, concurrently), hang up.
        `observe(result)` is called before the INVITE leaves (to watch the call while it is being
        answered). `payload(n)` is the audio of the n-th packet sent (default: a 1 kHz tone),
        `listen(packet, when)` hears every one received; `from_tag`: its From tag (default: 8
        random hex digits; many phones send digits only)."""
        loop = asyncio.get_running_loop()
        call_id = f"{uuid.uuid4().hex}@real-suite"
        result = CallResult(call_id)
        if observe is not None:
            observe(result)
        if self.transport == "udp":
            sip_transport, sip = await loop.create_datagram_endpoint(_Sip, local_addr=(self.source_ip, self.source_port))

            def send(message: str | bytes) -> None:
                sip_transport.sendto(message.encode() if isinstance(message, str) else message, self.edge)
        else:
            sip_transport, sip = await loop.create_connection(
                _SipStream, *self.edge, local_addr=(self.source_ip, self.source_port),
                ssl=self.ssl_context if self.transport == "tls" else None)
            if self.transport == "tls":
                result.tls_version = sip_transport.get_extra_info("ssl_object").version()

            def send(message: str | bytes) -> None:
                sip_transport.write(message.encode() if isinstance(message, str) else message)
        proto, tparam = self.transport.upper(), "" if self.transport == "udp" else f";transport={self.transport}"
        rtp_transport, rtp = await loop.create_datagram_endpoint(lambda: _Rtp(result, listen), local_addr=(self.source_ip, 0))
        me = self.announce_ip
        key = base64.b64encode(os.urandom(30)).decode()
        sip_port = sip_transport.get_extra_info("sockname")[1]
        rtp_port = result.rtp_port = rtp_transport.get_extra_info("sockname")[1]
        tag = from_tag or uuid.uuid4().hex[:8]
        try:
            profile = "RTP/SAVP" if self.srtp else "RTP/AVP"
            crypto = f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}\r\n" if self.srtp else ""
            sdp = (f"v=0\r\no=- 1 1 IN IP4 {me}\r\ns=-\r\nc=IN IP4 {me}\r\nt=0 0\r\n"
                   f"m=audio {rtp_port} {profile} {self.codec[0]}\r\na=rtpmap:{self.codec[0]} {self.codec[1]}\r\n"
                   f"{crypto}a=sendrecv\r\n")
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            ruri = f"sip:{to_user}@127.0.0.1:{self.edge[1]}{tparam}{uri_params}"
            cseq, authorization = 1, ""
            while True:
                branch = f"z9hG4bK{uuid.uuid4().hex}"
                invite = (f"INVITE {ruri} SIP/2.0\r\n"
                          f"Via: SIP/2.0/{proto} {me}:{sip_port};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                          f"From: <sip:{self.from_user}@{me}>;tag={tag}\r\nTo: <sip:{to_user}@127.0.0.1>\r\n"
                          f"Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:caller@{me}:{sip_port}{tparam}>\r\n"
                          f"{authorization}{extra}Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
                send(invite)
                result.invited_at = result.invited_at or time.monotonic()
                final = None
                deadline = loop.time() + 10
                while final is None:
                    message = await asyncio.wait_for(sip.queue.get(), max(0.1, deadline - loop.time()))
                    first, hdrs, body = _headers(message)
                    if first.startswith("SIP/2.0 ") and f"{cseq} INVITE" in hdrs.get("cseq", [""])[0]:
                        code = int(first.split()[1])
                        if code >= 200:
                            final = (first, hdrs, body)
                code = int(final[0].split()[1])
                if code not in (401, 407) or self.auth is None or self.challenges:
                    break
                self.challenges.append(code)  # answer one challenge
                ack = (f"ACK {ruri} SIP/2.0\r\nVia: SIP/2.0/{proto} {me}:{sip_port};branch={branch};rport\r\n"
                       f"Max-Forwards: 70\r\nFrom: <sip:{self.from_user}@{me}>;tag={tag}\r\nTo: {final[1]['to'][0]}\r\n"
                       f"Call-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n")
                send(ack)
                header = "proxy-authenticate" if code == 407 else "www-authenticate"
                answer = digest_answer(final[1][header][0], "INVITE", ruri, *self.auth)
                authorization = f"{'Proxy-Authorization' if code == 407 else 'Authorization'}: {answer}\r\n"
                cseq += 1
            first, hdrs, body = final
            result.answered_at = time.monotonic()
            result.status, result.reason = int(first.split()[1]), first.split(" ", 2)[2]
            result.sdp = body
            to_header = hdrs["to"][0]
            route = list(reversed(hdrs.get("record-route", [])))
            if result.status >= 300:
                ack = (f"ACK {ruri} SIP/2.0\r\n"
                       f"Via: SIP/2.0/{proto} {me}:{sip_port};branch={branch};rport\r\nMax-Forwards: 70\r\n"
                       f"From: <sip:{self.from_user}@{me}>;tag={tag}\r\nTo: {to_header}\r\nCall-ID: {call_id}\r\n"
                       f"CSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n")
                send(ack)
                return result
            contact = re.search(r"<([^>]+)>", hdrs["contact"][0]).group(1)
            media_ip = re.search(r"c=IN IP4 (\S+)", body).group(1)
            media_port = int(re.search(r"m=audio (\d+)", body).group(1))
            protect = None
            if self.srtp:
                answered = re.search(r"a=crypto:\d+ AES_CM_128_HMAC_SHA1_80 inline:([A-Za-z0-9+/=]+)", body)
                if answered is None:
                    raise RuntimeError("SRTP offered but the answer has no AES_CM_128_HMAC_SHA1_80 key")
                protect = _srtp_session(key, outbound=True).protect
                rtp.unprotect = _srtp_session(answered.group(1), outbound=False).unprotect
            route_lines = "".join(f"Route: {r}\r\n" for r in route)

            def in_dialog(method: str, cseq: int) -> bytes:
                return (f"{method} {contact} SIP/2.0\r\n"
                        f"Via: SIP/2.0/{proto} {me}:{sip_port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                        f"Max-Forwards: 70\r\n{route_lines}From: <sip:{self.from_user}@{me}>;tag={tag}\r\n"
                        f"To: {to_header}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
                        f"Content-Length: 0\r\n\r\n").encode()
            send(in_dialog("ACK", cseq))

            async def stream() -> None:
                ssrc, seq, ts = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
                started = loop.time()
                while loop.time() - started < hold_s:
                    audio = payload(result.rtp_sent) if payload is not None else TONE
                    packet = struct.pack("!BBHII", 0x80, self.codec[0], seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + audio
                    rtp_transport.sendto(protect(packet) if protect else packet, (media_ip, media_port))
                    result.rtp_sent += 1
                    seq, ts = seq + 1, ts + 160
                    # on the 20 ms clock (not 20 ms after this packet: the rate would drift low)
                    await asyncio.sleep(max(0.0, started + result.rtp_sent * 0.02 - loop.time()))
            if while_up is not None:
                await asyncio.gather(stream(), while_up(result))
            else:
                await stream()
            send(in_dialog("BYE", cseq + 1))
            try:
                while True:
                    message = await asyncio.wait_for(sip.queue.get(), 3)
                    if message.startswith("SIP/2.0 ") and "BYE" in message:
                        break
            except asyncio.TimeoutError:
                pass
            return result
        finally:
            sip_transport.close()
            rtp_transport.close()
