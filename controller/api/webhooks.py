"""Outgoing webhooks: call events POSTed to the application, signed, in order per call,
retried with backoff, never in the way of signalling; and the decision webhook asked when a
call comes in (`ask_webhook`), bounded by a hard timeout.

Signature: header `Callfabric-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`. A receiver recomputes it over the raw body and rejects a `t` outside its
replay window (examples/webhook_receiver.py does both)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from controller.actions import json_number
from controller.metrics import Metrics

log = logging.getLogger("callfabric.webhooks")
SIGNATURE_HEADER = "Callfabric-Signature"
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_PENDING = 10_000


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, now: float | None = None, window_s: int = 300) -> bool:
    """What a receiver does (and what the tests and the example use)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        signature = parts["v1"]
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > window_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, signature)


@dataclass
class _CallQueue:
    url: str
    events: deque = field(default_factory=deque)
    worker: asyncio.Task | None = None


class WebhookSender:
    """Delivers events to `url_for(call_id, event)` (None: nobody listens) — per call in
    order, each retried up to len(RETRY_DELAYS_S) times on errors and 5xx."""

    def __init__(self, secret: str, metrics: Metrics, url_for: Callable[[dict[str, Any]], str | None],
                 timeout_s: float = 5.0, retry_delays: tuple[float, ...] = RETRY_DELAYS_S):
        self.secret = secret
        self.metrics = metrics
        self.url_for = url_for
        self.timeout_s = timeout_s
        self.retry_delays = retry_delays
        self._queues: dict[str, _CallQueue] = {}
        self._pending = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        return self._session

    async def close(self) -> None:
        for queue in self._queues.values():
            if queue.worker:
                queue.worker.cancel()
        if self._session is not None:
            await self._session.close()

    def publish(self, event: dict[str, Any]) -> None:
        """Queue a public event (never blocks, never raises)."""
        url = self.url_for(event)
        if not url:
            return
        if self._pending >= MAX_PENDING:
            self.metrics.webhook_deliveries.labels(event["type"], "dropped").inc()
            log.error("webhooks: %d events pending, dropping %s of call %s", self._pending, event["type"],
                      event["call_id"])
            return
        queue = self._queues.setdefault(event["call_id"], _CallQueue(url))
        queue.events.append((url, event))
        self._pending += 1
        if queue.worker is None or queue.worker.done():
            queue.worker = asyncio.get_running_loop().create_task(self._drain(event["call_id"], queue))

    async def _drain(self, call_id: str, queue: _CallQueue) -> None:
        try:
            while queue.events:
                url, event = queue.events.popleft()
                self._pending -= 1
                await self._deliver(url, event)
        finally:
            if not queue.events and self._queues.get(call_id) is queue:
                del self._queues[call_id]

    async def _deliver(self, url: str, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        for attempt in range(len(self.retry_delays) + 1):
            started = time.perf_counter()
            outcome = await self._post(url, body)
            self.metrics.webhook_seconds.labels("event").observe(time.perf_counter() - started)
            if outcome == "delivered":
                self.metrics.webhook_deliveries.labels(event["type"], "delivered").inc()
                return
            if outcome == "rejected" or attempt == len(self.retry_delays):
                break
            await asyncio.sleep(self.retry_delays[attempt] * random.uniform(0.8, 1.2))
        self.metrics.webhook_deliveries.labels(event["type"], "failed").inc()
        log.warning("webhooks: %s of call %s not delivered to %s (%s)", event["type"], event["call_id"], url, outcome)

    async def _post(self, url: str, body: bytes) -> str:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, int(time.time()), body)}
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                await response.read()
                if response.status < 300:
                    return "delivered"
                return "retry" if response.status >= 500 or response.status == 429 else "rejected"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return "retry"

    async def ask(self, url: str, payload: dict[str, Any], timeout_s: float) -> tuple[str, Any]:
        """The decision webhook: ('ok', answer JSON) or (why not: 'timeout' | 'error' | 'garbage', None)."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, int(time.time()), body)}
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.post(url, data=body, headers=headers) as response:
                    text = await response.text()
                    if response.status >= 300:
                        return "error", None
            try:
                return "ok", json.loads(text, parse_float=json_number)
            except ValueError:
                return "garbage", None
        except TimeoutError:
            return "timeout", None
        except (aiohttp.ClientError, OSError, UnicodeDecodeError):
            return "error", None
        finally:
            self.metrics.webhook_seconds.labels("decision").observe(time.perf_counter() - started)
