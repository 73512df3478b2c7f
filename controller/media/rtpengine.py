"""rtpengine's NG control protocol (bencoded dictionaries over UDP, each request prefixed with a
cookie its reply repeats): what the controller asks the edge's rtpengine directly — a copy of a
call party's media (`subscribe request` / `subscribe answer`, `unsubscribe`) for edge forks, and
`query`. Kamailio's rtpengine module speaks the same protocol for offers and answers."""
from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any


class RtpengineError(Exception):
    pass


def bencode(value: Any) -> bytes:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, (list, tuple)):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"d" + b"".join(bencode(str(k)) + bencode(v) for k, v in sorted(value.items())) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def bdecode(data: bytes) -> Any:
    value, end = _decode(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after the bencoded value")
    return value


def _decode(data: bytes, i: int) -> tuple[Any, int]:
    kind = data[i:i + 1]
    if kind == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if kind in (b"l", b"d"):
        items, i = [], i + 1
        while data[i:i + 1] != b"e":
            item, i = _decode(data, i)
            items.append(item)
        if kind == b"l":
            return items, i + 1
        if len(items) % 2:
            raise ValueError("a bencoded dictionary with a key and no value")
        return {items[n]: items[n + 1] for n in range(0, len(items), 2)}, i + 1
    if kind.isdigit():
        colon = data.index(b":", i)
        size = int(data[i:colon])
        raw = data[colon + 1:colon + 1 + size]
        if len(raw) != size:
            raise ValueError("a bencoded string cut short")
        try:
            return raw.decode(), colon + 1 + size
        except UnicodeDecodeError:
            return raw, colon + 1 + size
    raise ValueError(f"not bencode at byte {i}")


class _Replies(asyncio.DatagramProtocol):
    def __init__(self):
        self.waiting: dict[bytes, asyncio.Future] = {}

    def datagram_received(self, data, addr):
        cookie, _, body = data.partition(b" ")
        future = self.waiting.pop(cookie, None)
        if future is not None and not future.done():
            future.set_result(body)


class RtpengineClient:
    """One rtpengine's NG socket (`host:port`); requests time out after `timeout_s` (one retry)."""

    def __init__(self, address: str, timeout_s: float = 0.5):
        host, _, port = address.rpartition(":")
        self.name = address
        self.address = (host or "127.0.0.1", int(port))
        self.timeout_s = timeout_s
        self._transport = None
        self._replies: _Replies | None = None
        self._cookies = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    async def _ensure(self) -> _Replies:
        if self._transport is None:
            loop = asyncio.get_running_loop()
            self._transport, self._replies = await loop.create_datagram_endpoint(_Replies, remote_addr=self.address)
        return self._replies

    async def request(self, command: str, **params: Any) -> dict[str, Any]:
        """One NG command; its reply (RtpengineError for `result: error` or no reply)."""
        replies = await self._ensure()
        cookie = f"{self._prefix}{next(self._cookies)}".encode()
        message = cookie + b" " + bencode({"command": command, **params})
        for attempt in range(2):
            future = asyncio.get_running_loop().create_future()
            replies.waiting[cookie] = future
            self._transport.sendto(message)
            try:
                body = await asyncio.wait_for(future, self.timeout_s)
                break
            except asyncio.TimeoutError:
                replies.waiting.pop(cookie, None)
        else:
            raise RtpengineError(f"rtpengine {self.address[0]}:{self.address[1]} did not answer {command!r}")
        reply = bdecode(body)
        if not isinstance(reply, dict) or reply.get("result") not in ("ok", "pong"):
            reason = reply.get("error-reason", reply) if isinstance(reply, dict) else reply
            raise RtpengineError(f"rtpengine refused {command!r}: {reason}")
        return reply

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
