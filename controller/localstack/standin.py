"""Stand-ins for what `callfabric up` needs on this machine and may not have.

`StandInUas` is a SIP endpoint that answers every call it gets (200 OK with an SDP answer,
PCMU or PCMA) and echoes the caller's RTP back: a human desk, a PBX, or a media node's SIP
side. It follows RFC 3261 as far as a UAS over UDP on a trusted network needs: 200 OK
retransmitted until the ACK, in-dialog requests (re-INVITE, UPDATE, INFO, BYE) answered,
OPTIONS pings (Kamailio's dispatcher probes) answered, and a BYE of its own sent along the
Record-Route when told to hang up.

`StandInMediaNode` stands in for an Asterisk media node when none is installed: its SIP side is
a `StandInUas`, and every call it answers enters the controller's Stasis application through
ARI exactly like on Asterisk (StasisStart with the Call-ID and the agent), served by
callfabric's ARI emulator (`tests/support/fake_ari.py`, so a callfabric clone is needed). The
controller answers, bridges, transfers, forks, plays and hangs up through the same ARI calls as
on Asterisk, and its records and events are the same; what the stand-in does not do is move
audio between legs: the caller hears its own echo, agents and fork targets receive nothing.
A hang-up by the controller becomes a BYE to the caller; a call to a human (originate) is
answered after a second.
"""
from __future__ import annotations

import asyncio
import logging
import random
import re
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger("callfabric.standin")
REPO = Path(__file__).resolve().parents[2]
_T1, _RETRANSMISSIONS = 0.5, 7
_CODECS = {0: "PCMU/8000", 8: "PCMA/8000"}


def parse_sip(data: bytes) -> tuple[str, list[tuple[str, str]], str]:
    """(start line, [(lower-case name, value)] in order, body)."""
    text = data.decode(errors="replace")
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = []
    compact = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
               "c": "content-type"}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            name = name.strip().lower()
            headers.append((compact.get(name, name), value.strip()))
    return lines[0], headers, body


def _all(headers: list[tuple[str, str]], name: str) -> list[str]:
    out = []
    for key, value in headers:
        if key == name:
            out += [v.strip() for v in re.split(r",(?=\s*<)", value)] if name in ("record-route", "route") \
                else [value]
    return out


def _one(headers: list[tuple[str, str]], name: str) -> str:
    values = _all(headers, name)
    return values[0] if values else ""


def _uri(value: str) -> str:
    found = re.search(r"<([^>]+)>", value)
    return found.group(1) if found else value.split(";", 1)[0].strip()


def _hostport(uri: str) -> tuple[str, int]:
    found = re.match(r"sips?:(?:[^@;>]*@)?(\[[^\]]+\]|[^:;>]+)(?::(\d+))?", uri)
    if not found:
        raise ValueError(f"no host in {uri!r}")
    return found.group(1).strip("[]"), int(found.group(2) or 5060)


class _RtpEcho(asyncio.DatagramProtocol):
    """Sends every RTP packet back where it came from, with its own SSRC and sequence."""

    def __init__(self):
        self.ssrc, self.seq = random.getrandbits(32), random.getrandbits(16)
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        self.received += 1
        self.seq = (self.seq + 1) & 0xFFFF
        self.transport.sendto(data[:1] + data[1:2] + struct.pack("!H", self.seq) + data[4:8]
                              + struct.pack("!I", self.ssrc) + data[12:], addr)


@dataclass
class Dialog:
    call_id: str
    remote: tuple[str, int]                 # where its INVITE came from (the edge)
    invite: list[tuple[str, str]]           # the INVITE's headers
    local_tag: str
    sdp: str
    rtp: _RtpEcho
    rtp_transport: asyncio.DatagramTransport
    answer: bytes = b""                     # the 200 OK, for retransmissions
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    local_cseq: int = 1

    @property
    def agent(self) -> str:
        return _one(self.invite, "x-callfabric-agent")

    @property
    def caller(self) -> str:
        found = re.search(r"sips?:([^@;>]+)@", _uri(_one(self.invite, "from")))
        return found.group(1) if found else ""

    @property
    def callee(self) -> str:
        found = re.search(r"sips?:([^@;>]+)@", _uri(_one(self.invite, "to")))
        return found.group(1) if found else ""


class StandInUas(asyncio.DatagramProtocol):
    def __init__(self, name: str, host: str = "127.0.0.1", *,
                 on_call: Callable[[Dialog], Awaitable[None]] | None = None,
                 on_end: Callable[[Dialog], Awaitable[None]] | None = None):
        self.name, self.host = name, host
        self.on_call, self.on_end = on_call, on_end
        self.port = 0
        self.dialogs: dict[str, Dialog] = {}
        self.calls = 0
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> StandInUas:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, port))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for dialog in self.dialogs.values():
            dialog.rtp_transport.close()
        self.dialogs.clear()
        if self.transport is not None:
            self.transport.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ receiving
    def datagram_received(self, data: bytes, addr) -> None:
        try:
            start, headers, body = parse_sip(data)
        except Exception:  # noqa: BLE001 - a stand-in drops what it cannot read
            return
        if start.startswith("SIP/2.0"):
            return                                   # answers to our BYEs: nothing to do
        method = start.split(" ", 1)[0]
        call_id = _one(headers, "call-id")
        dialog = self.dialogs.get(call_id)
        if method == "INVITE":
            if dialog is None:
                self._spawn(self._new_call(call_id, headers, body, addr))
            elif dialog.answer and not dialog.acked.is_set() and "tag=" not in _one(headers, "to"):
                self.transport.sendto(dialog.answer, addr)          # a retransmitted INVITE
            else:
                self._reply(headers, addr, 200, "OK", sdp=dialog.sdp, dialog=dialog)   # re-INVITE: same media
        elif method == "ACK":
            if dialog is not None:
                dialog.acked.set()
        elif method == "BYE":
            self._reply(headers, addr, 200 if dialog else 481, "OK" if dialog else "Call/Transaction Does Not Exist")
            if dialog is not None and not dialog.ended:
                self._end(dialog)
                if self.on_end is not None:
                    self._spawn(self.on_end(dialog))
        elif method == "CANCEL":
            self._reply(headers, addr, 200, "OK")     # the INVITE was answered at once: nothing to cancel
        elif method in ("OPTIONS", "UPDATE", "INFO", "NOTIFY", "PRACK"):
            self._reply(headers, addr, 200, "OK")
        else:
            self._reply(headers, addr, 405, "Method Not Allowed", extra="Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, "
                                                                        "UPDATE, INFO\r\n")

    def _reply(self, headers, addr, code: int, reason: str, *, sdp: str = "", dialog: Dialog | None = None,
               extra: str = "") -> bytes:
        to = _one(headers, "to")
        if dialog is not None and "tag=" not in to:
            to += f";tag={dialog.local_tag}"
        lines = [f"SIP/2.0 {code} {reason}"]
        lines += [f"Via: {v}" for v in _all(headers, "via")]
        lines += [f"From: {_one(headers, 'from')}", f"To: {to}", f"Call-ID: {_one(headers, 'call-id')}",
                  f"CSeq: {_one(headers, 'cseq')}"]
        if dialog is not None:
            lines += [f"Record-Route: {r}" for r in _all(headers, "record-route")]
            lines.append(f"Contact: <sip:{self.name}@{self.host}:{self.port}>")
        lines.append("Server: callfabric-standin")
        message = "\r\n".join(lines) + "\r\n" + extra
        if sdp:
            message += f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}"
        else:
            message += "Content-Length: 0\r\n\r\n"
        data = message.encode()
        self.transport.sendto(data, addr)
        return data

    async def _new_call(self, call_id: str, headers, body: str, addr) -> None:
        offered = [int(pt) for pt in re.findall(r"m=audio \d+ RTP/AVP((?: \d+)+)", body)[0].split()] \
            if "m=audio" in body else [0]
        codec = next((pt for pt in offered if pt in _CODECS), None)
        if codec is None:
            self._reply(headers, addr, 488, "Not Acceptable Here")
            return
        loop = asyncio.get_running_loop()
        rtp = _RtpEcho()
        rtp_transport, _ = await loop.create_datagram_endpoint(lambda: rtp, local_addr=(self.host, 0))
        rtp_port = rtp_transport.get_extra_info("sockname")[1]
        sdp = (f"v=0\r\no=callfabric-standin {random.getrandbits(31)} 1 IN IP4 {self.host}\r\ns=-\r\n"
               f"c=IN IP4 {self.host}\r\nt=0 0\r\nm=audio {rtp_port} RTP/AVP {codec}\r\n"
               f"a=rtpmap:{codec} {_CODECS[codec]}\r\na=sendrecv\r\n")
        dialog = Dialog(call_id, addr, headers, uuid.uuid4().hex[:10], sdp, rtp, rtp_transport)
        self.dialogs[call_id] = dialog
        self.calls += 1
        dialog.answer = self._reply(headers, addr, 200, "OK", sdp=sdp, dialog=dialog)
        if self.on_call is not None:
            self._spawn(self.on_call(dialog))
        interval = _T1
        for _ in range(_RETRANSMISSIONS):            # until the ACK (RFC 3261 13.3.1.4)
            try:
                await asyncio.wait_for(dialog.acked.wait(), interval)
                return
            except asyncio.TimeoutError:
                if dialog.ended:
                    return
                self.transport.sendto(dialog.answer, addr)
                interval = min(interval * 2, 4.0)

    # ------------------------------------------------------------------ ending
    def _end(self, dialog: Dialog) -> None:
        dialog.ended = True
        dialog.rtp_transport.close()
        self.dialogs.pop(dialog.call_id, None)

    def hang_up(self, call_id: str) -> bool:
        """Send a BYE for this call along its route set; False if there is no such call."""
        dialog = self.dialogs.get(call_id)
        if dialog is None:
            return False
        routes = _all(dialog.invite, "record-route")
        contact = _uri(_one(dialog.invite, "contact")) or _uri(_one(dialog.invite, "from"))
        target = _hostport(_uri(routes[0])) if routes else _hostport(contact)
        dialog.local_cseq += 1
        to_them = _one(dialog.invite, "from")
        from_us = _one(dialog.invite, "to") + (f";tag={dialog.local_tag}" if "tag=" not in _one(dialog.invite, "to")
                                               else "")
        message = (f"BYE {contact} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK{uuid.uuid4().hex};rport\r\n"
                   f"Max-Forwards: 70\r\n" + "".join(f"Route: {r}\r\n" for r in routes)
                   + f"From: {from_us}\r\nTo: {to_them}\r\nCall-ID: {dialog.call_id}\r\n"
                   f"CSeq: {dialog.local_cseq} BYE\r\nContent-Length: 0\r\n\r\n")
        self.transport.sendto(message.encode(), target)
        self._end(dialog)
        return True


def fake_ari_class():
    """callfabric's ARI emulator, from the clone this package runs from."""
    if not (REPO / "tests" / "support" / "fake_ari.py").is_file():
        raise RuntimeError(f"the stand-in media node needs a callfabric clone ({REPO}/tests/support/fake_ari.py is "
                           f"missing): install Asterisk, or run from a clone")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.support.fake_ari import FakeAri
    return FakeAri


class StandInMediaNode:
    """A media node without Asterisk: SIP answered and echoed by a StandInUas, the calls handed
    to the controller's Stasis application over (emulated) ARI."""

    ANSWER_HUMANS_AFTER_S = 1.0
    KEEP_RECORDS = 2000          # the emulator's request/event logs are trimmed beyond this

    def __init__(self, app: str = "callfabric", host: str = "127.0.0.1"):
        self.app = app
        self.user, self.password = "callfabric", uuid.uuid4().hex
        self.uas = StandInUas("media", host, on_call=self._call_in, on_end=self._caller_gone)
        self.fake = None
        self.channels: dict[str, str] = {}     # SIP Call-ID -> channel id
        self._watch: asyncio.Task | None = None

    async def start(self, sip_port: int = 0) -> StandInMediaNode:
        self.fake = await fake_ari_class()(self.user, self.password, playback_duration=1.0,
                                           endpoints=("PJSIP/edge",)).start()
        await self.uas.start(sip_port)
        self._watch = asyncio.get_running_loop().create_task(self._watch_channels())
        return self

    @property
    def sip_addr(self) -> str:
        return self.uas.addr

    def ari_node(self, name: str = "media1") -> str:
        return f"{name}=http://{self.user}:{self.password}@127.0.0.1:{self.fake.port}/ari"

    @property
    def ari_url(self) -> str:
        return self.fake.url

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self.uas.close()
        if self.fake is not None:
            await self.fake.stop(check=False)

    async def _call_in(self, dialog: Dialog) -> None:
        """Asterisk's dialplan: Stasis(callfabric, <Call-ID>, <X-Callfabric-Agent>)."""
        try:
            channel = await self.fake.inbound_call(self.app, [dialog.call_id, dialog.agent],
                                                   caller_number=dialog.caller or "anonymous",
                                                   callee=dialog.callee or "s", sip_call_id=dialog.call_id,
                                                   endpoint="edge", if_app_missing="fail")
        except Exception as exc:  # noqa: BLE001 - the call goes on with its echo
            log.warning("stand-in media node: call %s not handed to the controller: %s", dialog.call_id, exc)
            return
        self.channels[dialog.call_id] = channel

    async def _caller_gone(self, dialog: Dialog) -> None:
        channel = self.channels.pop(dialog.call_id, None)
        if channel is not None and channel in self.fake.channels:
            await self.fake.caller_hangup(channel)

    async def _watch_channels(self) -> None:
        ringing: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.1)
            live = self.fake.channels
            for call_id, channel in list(self.channels.items()):
                if channel not in live:          # hung up by the controller: BYE to the caller
                    self.channels.pop(call_id, None)
                    self.uas.hang_up(call_id)
            for channel_id in live:
                ch = self.fake.channel(channel_id)
                if ch.kind == "outbound" and ch.dialing:
                    since = ringing.setdefault(channel_id, loop.time())
                    if loop.time() - since >= self.ANSWER_HUMANS_AFTER_S:
                        ringing.pop(channel_id, None)
                        try:
                            await self.fake.answer_outbound(channel_id)
                        except RuntimeError:
                            pass
            for name in ("requests", "events_sent", "events_dropped", "originations"):
                records = getattr(self.fake, name)
                if len(records) > self.KEEP_RECORDS:
                    del records[:-self.KEEP_RECORDS // 2]
            if len(self.fake.destroyed) > self.KEEP_RECORDS:
                for key in list(self.fake.destroyed)[:-self.KEEP_RECORDS // 2]:
                    del self.fake.destroyed[key]
