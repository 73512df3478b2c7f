"""ARI client for one Asterisk media node: REST calls with timeouts and clear errors, and
the events websocket, reconnected with backoff; after each (re)connection the caller is told
so it can resync live channels and bridges."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp

from controller.media.feature import MediaNodeError

log = logging.getLogger("callfabric.media.ari")


class AriError(MediaNodeError):
    """A failed ARI request: `status` is the HTTP status (0 when Asterisk was unreachable)."""

    def __init__(self, operation: str, status: int, message: str):
        super().__init__(f"ARI {operation}: {status or 'unreachable'} {message}".rstrip())
        self.operation = operation
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class AriNode:
    name: str
    url: str  # http://host:8088/ari
    username: str
    password: str


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def basic_authorization(username: str, password: str) -> str:
    """The Authorization header value ARI expects (HTTP Basic, UTF-8)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class AriClient:
    def __init__(self, node: AriNode, app: str, *, timeout_s: float = 5.0,
                 observe: Callable[[str, float, int], None] | None = None):
        self.node = node
        self.app = app
        self.timeout_s = timeout_s
        self._observe = observe  # (operation, seconds, status) for metrics
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": basic_authorization(self.node.username, self.node.password)},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=64))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, operation: str, method: str, path: str, *, params: dict[str, Any] | None = None,
                      body: dict[str, Any] | None = None, ok_missing: bool = False) -> Any:
        """One REST call. `operation` names it in errors and metrics (e.g. "externalMedia").
        With `ok_missing`, a 404 returns None (the thing is already gone)."""
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        started = time.perf_counter()
        status = 0
        try:
            async with self.session.request(method, self.node.url + path, params=query, json=body) as response:
                status = response.status
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise AriError(operation, 0, f"{self.node.name}: {type(exc).__name__} {exc}".strip()) from None
        finally:
            if self._observe:
                self._observe(operation, time.perf_counter() - started, status)
        if status == 404 and ok_missing:
            return None
        if status >= 300:
            message = text[:300]
            try:
                message = json.loads(text).get("message", message)
            except (ValueError, AttributeError):
                pass
            raise AriError(operation, status, f"{self.node.name}: {message}")
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise AriError(operation, status, f"{self.node.name}: answer is not JSON: {text[:80]!r}") from None

    async def download(self, operation: str, path: str, sink: Callable[[bytes], Awaitable[None]],
                       chunk_bytes: int = 1 << 16) -> int:
        """A binary answer (a stored recording's file), handed to `sink` chunk by chunk (no
        total timeout: a long recording takes as long as it takes; 30 s without data fails).
        Returns the bytes received."""
        started = time.perf_counter()
        status, size = 0, 0
        try:
            async with self.session.get(self.node.url + path,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_read=30)) as response:
                status = response.status
                if status >= 300:
                    text = await response.text()
                    raise AriError(operation, status, f"{self.node.name}: {text[:300]}")
                async for chunk in response.content.iter_chunked(chunk_bytes):
                    size += len(chunk)
                    await sink(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise AriError(operation, 0, f"{self.node.name}: {type(exc).__name__} {exc}".strip()) from None
        finally:
            if self._observe:
                self._observe(operation, time.perf_counter() - started, status)
        return size

    # -- operations the media plane uses (paths and parameters as in the ARI description) ------
    async def answer(self, channel_id: str) -> None:
        await self.request("answer", "POST", f"/channels/{channel_id}/answer")

    async def hangup(self, channel_id: str, reason: str = "normal") -> None:
        await self.request("hangup", "DELETE", f"/channels/{channel_id}", params={"reason": reason}, ok_missing=True)

    async def create_bridge(self, bridge_id: str, name: str, kind: str = "mixing") -> dict:
        return await self.request("createBridge", "POST", "/bridges",
                                  params={"type": kind, "bridgeId": bridge_id, "name": name})

    async def destroy_bridge(self, bridge_id: str) -> None:
        await self.request("destroyBridge", "DELETE", f"/bridges/{bridge_id}", ok_missing=True)

    async def add_channel(self, bridge_id: str, channel_id: str, role: str | None = None) -> None:
        await self.request("addChannel", "POST", f"/bridges/{bridge_id}/addChannel",
                           params={"channel": channel_id, "role": role})

    async def remove_channel(self, bridge_id: str, channel_id: str) -> None:
        await self.request("removeChannel", "POST", f"/bridges/{bridge_id}/removeChannel",
                           params={"channel": channel_id}, ok_missing=True)

    async def external_media(self, channel_id: str, external_host: str, fmt: str, *, encapsulation: str,
                             transport: str, data: str | None = None) -> dict:
        """The channel enters our application by itself (StasisStart, args = `data`)."""
        params = {"channelId": channel_id, "app": self.app, "external_host": external_host, "format": fmt,
                  "encapsulation": encapsulation, "transport": transport, "direction": "both", "data": data}
        return await self.request("externalMedia", "POST", "/channels/externalMedia", params=params)

    async def snoop(self, channel_id: str, snoop_id: str, spy: str, app_args: str) -> dict:
        return await self.request("snoop", "POST", f"/channels/{channel_id}/snoop/{snoop_id}",
                                  params={"spy": spy, "whisper": "none", "app": self.app, "appArgs": app_args})

    async def originate(self, channel_id: str, endpoint: str, *, app_args: str = "", caller_id: str | None = None,
                        timeout_s: int = 30, variables: dict[str, str] | None = None,
                        dialplan: dict[str, Any] | None = None) -> dict:
        """On answer the channel enters our application (`app_args`), or, with `dialplan`
        (context, extension, priority), the dialplan, which brings it into the application
        later; then nothing about it reaches us unless we subscribe to it."""
        where = dialplan if dialplan is not None else {"app": self.app, "appArgs": app_args}
        return await self.request("originate", "POST", f"/channels/{channel_id}",
                                  params={"endpoint": endpoint, **where, "callerId": caller_id, "timeout": timeout_s},
                                  body={"variables": variables or {}})

    async def play(self, channel_id: str, playback_id: str, media: str) -> dict:
        return await self.request("play", "POST", f"/channels/{channel_id}/play/{playback_id}",
                                  params={"media": media})

    async def rtp_statistics(self, channel_id: str) -> dict | None:
        return await self.request("rtpStatistics", "GET", f"/channels/{channel_id}/rtp_statistics", ok_missing=True)

    async def channels(self) -> list[dict]:
        return await self.request("listChannels", "GET", "/channels") or []

    async def bridges(self) -> list[dict]:
        return await self.request("listBridges", "GET", "/bridges") or []

    # -- events ---------------------------------------------------------------------------------
    async def events(self, on_connected: Callable[[], Awaitable[None]] | None = None,
                     reconnect_max_s: float = 5.0) -> AsyncIterator[dict]:
        """Events of our application, forever: reconnects with jittered backoff, and awaits
        `on_connected` after every (re)connection, before yielding its events."""
        delay = 0.1
        ws_url = self.node.url.replace("http://", "ws://").replace("https://", "wss://") + "/events"
        while True:
            try:
                async with self.session.ws_connect(ws_url, params={"app": self.app, "subscribeAll": "false"},
                                                   heartbeat=15, timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                    log.info("ARI %s: events connected", self.node.name)
                    delay = 0.1
                    if on_connected is not None:
                        await on_connected()
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            try:
                                event = json.loads(message.data)
                            except ValueError:
                                log.warning("ARI %s: event is not JSON: %r", self.node.name, message.data[:80])
                                continue
                            if isinstance(event, dict) and isinstance(event.get("type"), str):
                                yield event
                            else:
                                log.warning("ARI %s: not an event: %r", self.node.name, message.data[:80])
                        elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.warning("ARI %s: events connection failed (%s); retrying in %.1fs", self.node.name, exc, delay)
            else:
                log.warning("ARI %s: events connection closed; reconnecting", self.node.name)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(reconnect_max_s, delay * 2)
