"""A tiny AI-agent media endpoint: receives the caller's audio from Asterisk and sends audio
back (here: the caller's own voice, an echo). Swap `respond()` for speech-to-text → LLM →
text-to-speech and you have a voice agent.

    python examples/media_agent.py rtp 127.0.0.1:4000          # agents with transport: rtp
    python examples/media_agent.py audiosocket 127.0.0.1:4001  # agents with transport: audiosocket
    python examples/media_agent.py sink 127.0.0.1:9100         # a fork target (STT stand-in): counts packets
    python examples/media_agent.py websocket 127.0.0.1:4002    # agents with transport: websocket

RTP (ExternalMedia encapsulation rtp over UDP): Asterisk sends RTP packets (12-byte header,
then 20 ms of audio in the agent's codec: ulaw/alaw 160 bytes, slin16 640 bytes big-endian)
to this address, from its UNICASTRTP_LOCAL_ADDRESS:PORT; send your audio back to the address
the packets come from, as RTP with your own SSRC, sequence numbers and timestamps.

AudioSocket (encapsulation audiosocket over TCP): Asterisk connects to this address; every
message is 1 byte kind, 2 bytes length (big-endian), payload. Kinds: 0x01 the session UUID
(16 bytes, first message; callfabric records it as the leg's `session`), 0x10 audio (signed
16-bit little-endian linear PCM, 8 kHz mono for slin, 20 ms = 320 bytes), 0x00 hang-up,
0xff error. Send 0x10 messages back to speak; 0x00 to hang up.

WebSocket (Asterisk's chan_websocket; the agent's `endpoint` names a connection of
asterisk/websocket_client.conf, whose `uri` is this server, subprotocol `media`): Asterisk
connects per call and sends a text `MEDIA_START connection_id:… channel:… format:ulaw
optimal_frame_size:160 ptime:20`, then the caller's audio as binary messages (20 ms each, in
the agent's codec, no header). Send audio back as binary messages of any size: Asterisk
queues it and plays it out at real time toward the caller. Barge-in: when the caller starts
talking over the agent, send the text `FLUSH_MEDIA` — Asterisk drops what it has queued and
the caller stops hearing the agent within a frame or two (callfabric's real-Asterisk suite
measures it at the caller). `MARK_MEDIA <id>` after some audio is answered `MEDIA_MARK_PROCESSED
<id>` once that audio has been played (not when flushed): how an agent knows what the caller
actually heard. Digits the caller presses arrive as `DTMF_END digit:5 channel_id:…`;
`HANGUP` hangs the call up.
"""
from __future__ import annotations

import asyncio
import struct
import sys
import time
import uuid

AUDIO, UUID_KIND, HANGUP, ERROR = 0x10, 0x01, 0x00, 0xFF


def respond(audio: bytes) -> bytes:
    """What the agent says back: here, what it heard."""
    return audio


class RtpAgent(asyncio.DatagramProtocol):
    """Answers every RTP packet with one of its own carrying `respond(payload)`."""

    def __init__(self, echo: bool = True):
        self.echo = echo
        self.ssrc = int.from_bytes(uuid.uuid4().bytes[:4], "big")
        self.seq = 0
        self.timestamp = 0
        self.received = 0
        self.sent = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:  # not RTP version 2
            return
        self.received += 1
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        if not self.echo:
            return
        payload_type = data[1] & 0x7F
        header_len = 12 + 4 * (data[0] & 0x0F)
        payload = respond(data[header_len:])
        samples = struct.unpack("!I", data[4:8])[0]  # follow the caller's clock rate
        self.seq = (self.seq + 1) & 0xFFFF
        self.timestamp = samples
        packet = struct.pack("!BBHII", 0x80, payload_type, self.seq, self.timestamp, self.ssrc) + payload
        self.transport.sendto(packet, addr)
        self.sent += 1

    def rate(self) -> float:
        """Packets per second received so far."""
        if not self.first_at or self.last_at == self.first_at:
            return 0.0
        return (self.received - 1) / (self.last_at - self.first_at)


class AudioSocketAgent:
    """An AudioSocket server: echoes audio frames; remembers each session's UUID."""

    def __init__(self):
        self.sessions: list[str] = []
        self.frames = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(3)
                kind, length = header[0], struct.unpack("!H", header[1:])[0]
                payload = await reader.readexactly(length) if length else b""
                if kind == UUID_KIND and len(payload) == 16:
                    self.sessions.append(str(uuid.UUID(bytes=payload)))
                elif kind == AUDIO:
                    self.frames += 1
                    reply = respond(payload)
                    writer.write(struct.pack("!BH", AUDIO, len(reply)) + reply)
                elif kind in (HANGUP, ERROR):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class WebSocketAgent:
    """An agent on Asterisk's websocket media channel (aiohttp server, subprotocol `media`).
    In `echo` mode it says back what it hears; an agent with its own voice calls `say()`, and
    barges in (`FLUSH_MEDIA`) when the caller talks over it."""

    SILENT_ULAW = frozenset(b for b in range(256) if (b & 0x7F) >= 0x7D)  # µ-law codes of near silence

    def __init__(self, echo: bool = False):
        self.echo = echo
        self.sockets: list = []
        self.texts: list[tuple[float, str]] = []  # (time.monotonic(), control message from Asterisk)
        self.frames = 0  # audio messages from Asterisk (the caller's voice)
        self.speaking = False  # something said and not yet marked played
        self.barge_ins = 0

    async def handle(self, request):
        from aiohttp import WSMsgType, web
        ws = web.WebSocketResponse(protocols=("media",))
        await ws.prepare(request)
        self.sockets.append(ws)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                self.texts.append((time.monotonic(), message.data))
                if message.data.startswith("MEDIA_MARK_PROCESSED"):
                    self.speaking = False
            elif message.type == WSMsgType.BINARY:
                self.frames += 1
                if self.echo:
                    await ws.send_bytes(respond(message.data))
                elif self.speaking and self.voiced(message.data):
                    await self.barge_in(ws)  # the caller talks over the agent: stop talking
        return ws

    def voiced(self, audio: bytes) -> bool:
        return bool(audio.translate(None, bytes(self.SILENT_ULAW)))

    async def say(self, ws, audio: bytes, mark: str = "said") -> None:
        """Queue `audio` toward the caller, then a mark answered once it has been played."""
        self.speaking = True
        await ws.send_bytes(audio)
        await ws.send_str(f"MARK_MEDIA {mark}")

    async def barge_in(self, ws) -> None:
        """Drop what Asterisk still has queued toward the caller."""
        self.barge_ins += 1
        self.speaking = False
        await ws.send_str("FLUSH_MEDIA")

    def marks(self, mark: str) -> list[float]:
        return [t for t, text in self.texts if text == f"MEDIA_MARK_PROCESSED {mark}"]


async def serve(mode: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if mode in ("rtp", "sink"):
        agent = RtpAgent(echo=mode == "rtp")
        await loop.create_datagram_endpoint(lambda: agent, local_addr=(host, port))
        print(f"{mode} on udp {host}:{port}", flush=True)
        while True:
            await asyncio.sleep(5)
            print(f"received {agent.received} packets ({agent.rate():.1f}/s), sent {agent.sent}", flush=True)
    elif mode == "websocket":
        from aiohttp import web
        ws_agent = WebSocketAgent(echo=True)
        app = web.Application()
        app.router.add_get("/{tail:.*}", ws_agent.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        print(f"websocket on ws://{host}:{port}/ (subprotocol media)", flush=True)
        while True:
            await asyncio.sleep(5)
            print(f"received {ws_agent.frames} frames", flush=True)
    else:
        server_agent = AudioSocketAgent()
        server = await asyncio.start_server(server_agent.handle, host, port)
        print(f"audiosocket on tcp {host}:{port}", flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("rtp", "audiosocket", "sink", "websocket"):
        sys.exit(__doc__)
    host, _, port = sys.argv[2].rpartition(":")
    asyncio.run(serve(sys.argv[1], host, int(port)))
