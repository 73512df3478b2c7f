"""A minimal SIP answering end over TCP or TLS (SIPp as packaged by Debian has no TLS): a carrier
behind an outbound trunk with `transport: tls`, or a TLS peer of the edge. It answers every
INVITE (100, then 200 with an SDP of its RTP echo socket, Record-Route copied), records every
request it receives, answers BYE, and echoes the RTP it gets. asyncio, 127.0.0.1."""
from __future__ import annotations

import asyncio
import ssl
import uuid
from dataclasses import dataclass, field

from controller.localstack.sip_ua import _headers, _SipStream


@dataclass
class Received:
    first_line: str
    headers: dict[str, list[str]]
    body: str
    tls_version: str = ""

    def header(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, owner: "SipStreamUas"):
        self.owner = owner

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.owner.rtp_echoed += 1
        self.transport.sendto(data, addr)


class _Peer(_SipStream):
    def __init__(self, owner: "SipStreamUas"):
        super().__init__()
        self.owner = owner
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version() if ssl_object else ""

    def data_received(self, data):
        super().data_received(data)
        while not self.queue.empty():
            self.owner._handle(self, self.queue.get_nowait())


class SipStreamUas:
    """`ssl_files`: (certificate, key) to serve TLS with; None: plain TCP. `server_names`: the
    SNI of every TLS handshake (None when the client sent none)."""

    def __init__(self, ssl_files: tuple | None = None):
        self.ssl_files = ssl_files
        self.port = 0
        self.received: list[Received] = []
        self.server_names: list[str | None] = []
        self.rtp_echoed = 0
        self._server = None
        self._echo = None
        self._echo_port = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> "SipStreamUas":
        loop = asyncio.get_running_loop()
        context = None
        if self.ssl_files is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            await asyncio.to_thread(context.load_cert_chain, *map(str, self.ssl_files))
            context.sni_callback = lambda _sock, name, _context: self.server_names.append(name)
        self._server = await loop.create_server(lambda: _Peer(self), "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]
        self._echo, _ = await loop.create_datagram_endpoint(lambda: _Echo(self), local_addr=("127.0.0.1", 0))
        self._echo_port = self._echo.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._echo is not None:
            self._echo.close()

    def requests(self, method: str) -> list[Received]:
        return [r for r in self.received if r.first_line.startswith(method + " ")]

    def _handle(self, peer: _Peer, message: str) -> None:
        first, headers, body = _headers(message)
        if first.startswith("SIP/2.0"):
            return
        self.received.append(Received(first, headers, body, peer.tls_version))
        method = first.split(" ", 1)[0]
        if method == "ACK":
            return

        def reply(status: str, extra: str = "", sdp: str = "", to_tag: bool = False) -> None:
            to = headers["to"][0] + (f";tag={uuid.uuid4().hex[:8]}" if to_tag and ";tag=" not in headers["to"][0] else "")
            lines = [f"SIP/2.0 {status}", *(f"Via: {v}" for v in headers["via"]), f"From: {headers['from'][0]}",
                     f"To: {to}", f"Call-ID: {headers['call-id'][0]}", f"CSeq: {headers['cseq'][0]}"]
            text = "\r\n".join(lines) + "\r\n" + extra
            text += (f"Content-Type: application/sdp\r\n" if sdp else "") + f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
            peer.transport.write(text.encode())
        if method == "INVITE":
            reply("100 Trying")
            sdp = (f"v=0\r\no=carrier 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                   f"m=audio {self._echo_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")
            route = "".join(f"Record-Route: {r}\r\n" for r in headers.get("record-route", []))
            transport = "tls" if self.ssl_files else "tcp"
            reply("200 OK", f"{route}Contact: <sip:carrier@127.0.0.1:{self.port};transport={transport}>\r\n", sdp,
                  to_tag=True)
        else:
            reply("200 OK")
