"""A scripted Kamailio evapi end for the controller's decision channel: it accepts the
controller's connection, sends netstring frames and collects the answers."""
from __future__ import annotations

import asyncio
import json

from controller.edge import protocol


class ScriptedEdge:
    """An evapi stand-in: accepts the controller, sends frames, collects answers."""

    def __init__(self):
        self.connections: asyncio.Queue = asyncio.Queue()
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer):
        await self.connections.put((reader, writer))

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


async def read_answers(reader, count, timeout=5.0):
    """The next `count` answers from the controller (its heartbeats are skipped)."""
    decoder = protocol.NetstringDecoder()
    answers = []
    while len(answers) < count:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        assert data, "controller closed the connection"
        answers += [a for a in map(json.loads, decoder.feed(data)) if a != {"event": "alive"}]
    return answers


def frame(obj) -> bytes:
    return protocol.netstring(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
