"""The example agent endpoint (examples/media_agent.py) speaks the packet formats the README
documents: RTP echoed with its own SSRC; AudioSocket session UUID then echoed audio frames."""
import asyncio
import importlib.util
import struct
import uuid
from pathlib import Path

spec = importlib.util.spec_from_file_location("media_agent", Path(__file__).resolve().parents[2] / "examples" / "media_agent.py")
media_agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(media_agent)


async def test_rtp_agent_echoes_audio_with_its_own_stream():
    loop = asyncio.get_running_loop()
    agent = media_agent.RtpAgent()
    transport, _ = await loop.create_datagram_endpoint(lambda: agent, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    got = asyncio.Queue()

    class Caller(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            got.put_nowait(data)
    caller, _ = await loop.create_datagram_endpoint(Caller, remote_addr=("127.0.0.1", port))
    try:
        for seq in range(3):
            payload = bytes([seq]) * 160
            caller.sendto(struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x1234) + payload)
        replies = [await asyncio.wait_for(got.get(), 2) for _ in range(3)]
    finally:
        caller.close()
        transport.close()
    for seq, reply in enumerate(replies):
        version_pt, pt, rseq, ts, ssrc = struct.unpack("!BBHII", reply[:12])
        assert version_pt == 0x80 and pt == 0 and ssrc == agent.ssrc != 0x1234
        assert reply[12:] == bytes([seq]) * 160 and ts == seq * 160
    assert agent.received == 3 and agent.sent == 3


async def test_audiosocket_agent_reads_the_session_and_echoes():
    agent = media_agent.AudioSocketAgent()
    server = await asyncio.start_server(agent.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = uuid.uuid4()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("!BH", 0x01, 16) + session.bytes)
    audio = b"\x01\x02" * 160
    writer.write(struct.pack("!BH", 0x10, len(audio)) + audio)
    header = await asyncio.wait_for(reader.readexactly(3), 2)
    body = await reader.readexactly(struct.unpack("!H", header[1:])[0])
    writer.write(struct.pack("!BH", 0x00, 0))
    await writer.drain()
    writer.close()
    server.close()
    await server.wait_closed()
    assert header[0] == 0x10 and body == audio
    assert agent.sessions == [str(session)]
