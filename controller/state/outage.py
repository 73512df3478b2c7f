"""Redis unreachable for a while: the state changes of calls (decisions, dialog events, media
steps) wait here, in the order they happened, and are written in that order when Redis
answers again. Bounded: past the bound a change is refused loudly (log line and metric),
never dropped in silence."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("callfabric.state")

# observe(event, depth): "queued", "flushed", "failed", "dropped", "down", "up"
Observer = Callable[[str, int], None]


class QueueFull(RedisConnectionError):
    """Redis is unreachable and the outage queue is full: this change could not be kept."""


@dataclass(slots=True)
class _Held:
    what: str  # create, transition, media …
    call_id: str
    write: Callable[[], Awaitable[Any]]


class OutageQueue:
    def __init__(self, probe: Callable[[], Awaitable[Any]], limit: int = 10_000, *,
                 observe: Observer | None = None, retry_s: float = 0.25):
        self.probe = probe  # raises RedisError while Redis is unreachable
        self.limit = limit
        self.retry_s = retry_s
        self._observe = observe or (lambda event, depth: None)
        self._pending: deque[_Held] = deque()
        self._task: asyncio.Task | None = None
        self._down_since = 0.0
        self._written = 0  # since the outage began
        self.available = True  # False from the first failure until every held change is written
        self.dropped = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def hold(self, what: str, call_id: str, write: Callable[[], Awaitable[Any]]) -> None:
        """Keep `write` (a change that could not reach Redis) to run when Redis is back, after
        every change held before it. Raises QueueFull when the bound is reached."""
        if len(self._pending) >= self.limit:
            self.dropped += 1
            self._observe("dropped", len(self._pending))
            log.error("call %s: Redis unreachable and %d state changes already queued: its %s is NOT recorded",
                      call_id, len(self._pending), what)
            raise QueueFull(f"Redis unreachable and the outage queue is full ({self.limit})")
        if self.available:
            self.available = False
            self._down_since = time.monotonic()
            self._written = 0
            self._observe("down", 0)
            log.error("Redis unreachable: state changes are queued in memory (at most %d) and written in order "
                      "when it is back", self.limit)
        self._pending.append(_Held(what, call_id, write))
        self._observe("queued", len(self._pending))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="redis outage queue")

    async def _flush(self) -> None:
        while self._pending:
            try:
                await self.probe()
            except RedisError:
                await asyncio.sleep(self.retry_s)
                continue
            while self._pending:
                held = self._pending[0]
                try:
                    await held.write()
                except RedisConnectionError:
                    break  # gone again: keep it first in line
                except Exception as exc:  # a change Redis refuses: say so, go on with the others
                    log.error("call %s: queued %s could not be written and is skipped: %s", held.call_id, held.what,
                              exc)
                    self._observe("failed", len(self._pending) - 1)
                self._pending.popleft()
                self._written += 1
                self._observe("flushed", len(self._pending))
            if self._pending:
                await asyncio.sleep(self.retry_s)
                continue
            self.available = True
            self._observe("up", 0)
            log.warning("Redis is back after %.1fs: %d queued state change(s) written in order",
                        time.monotonic() - self._down_since, self._written)

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every held change is written; False if some are not."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._pending

    async def close(self) -> None:
        if self._pending:
            log.error("stopping with %d state change(s) still queued for Redis: they are lost (first: %s of call %s)",
                      len(self._pending), self._pending[0].what, self._pending[0].call_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
