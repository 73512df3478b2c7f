"""Redis unreachable for a while: the state changes of calls (decisions, dialog events, media
steps) wait here, in the order they happened, and are written in that order when Redis
answers again. Bounded: past the bound a change is refused loudly (log line and metric),
never dropped in silence.

The outage ends when Redis answers, not when this queue is empty: from then on, a change of
a call with nothing held goes straight to Redis, while a change of a call that has older
changes held joins the queue behind them (per-call order); writers that do not go through
the store's own methods (the edges' events, state/journal.py) wait for `written` first. The
queue is replayed in chunks whose writes share pipelines (thousands of changes a second);
every held write is idempotent, so a chunk cut by a new failure is simply written again.
Until it is empty the store is `degraded`: the counters the policy reads do not yet include
the held calls."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("callfabric.state")

# observe(event, depth): "queued", "flushed", "failed", "dropped", "down", "up" (Redis answers
# again: replay starts), "replayed" (the queue is empty: state complete again)
Observer = Callable[[str, int], None]
REPLAY_CHUNK = 500


class QueueFull(RedisConnectionError):
    """Redis is unreachable and the outage queue is full: this change could not be kept."""


@dataclass(slots=True)
class _Held:
    what: str  # create, transition, media …
    call_id: str
    write: Callable[[], Awaitable[Any]]


class OutageQueue:
    def __init__(self, probe: Callable[[], Awaitable[Any]], limit: int = 10_000, *,
                 observe: Observer | None = None, retry_s: float = 0.25, chunk: int = REPLAY_CHUNK):
        self.probe = probe  # raises RedisError while Redis is unreachable
        self.limit = limit
        self.retry_s = retry_s
        self.chunk = chunk
        self._observe = observe or (lambda event, depth: None)
        self._pending: deque[_Held] = deque()
        self._held_calls: Counter[str] = Counter()  # call id -> its changes in the queue
        self._moved = asyncio.Event()  # set (and replaced) whenever held changes leave the queue
        self._task: asyncio.Task | None = None
        self._down_since = 0.0
        self._back_at = 0.0
        self._written = 0  # since the outage began
        self.reachable = True  # False from a failure until Redis answers again
        self.dropped = 0

    @property
    def available(self) -> bool:
        """Redis takes writes now (a replay may still be under way: see `degraded`)."""
        return self.reachable

    @property
    def degraded(self) -> bool:
        """Unreachable, or reachable with older changes still being replayed."""
        return not self.reachable or bool(self._pending)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def holds(self, call_id: str) -> bool:
        """True while older changes of this call wait here (a new one must queue behind them)."""
        return bool(self._pending) and self._held_calls[call_id] > 0

    async def written(self, call_ids: Iterable[str] | None = None) -> None:
        """Return once no change of `call_ids` (of any call: None) is held here any more, so
        that what is written next about them lands after what was held (per-call order for
        writers that write to Redis themselves, e.g. the edges' events). Waits while Redis is
        unreachable and those calls have changes held."""
        if not self._pending:
            return
        calls = None if call_ids is None else set(call_ids)
        while self._pending and (calls is None or not calls.isdisjoint(self._held_calls)):
            await self._moved.wait()

    def _notify(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def hold(self, what: str, call_id: str, write: Callable[[], Awaitable[Any]], *, failed: bool = True) -> None:
        """Keep `write` to run after every change held before it. `failed`: it could not reach
        Redis (the outage begins, if it had not); False: it only waits behind older changes
        of its call. Raises QueueFull when the bound is reached."""
        if len(self._pending) >= self.limit:
            self.dropped += 1
            self._observe("dropped", len(self._pending))
            log.error("call %s: Redis unreachable and %d state changes already queued: its %s is NOT recorded",
                      call_id, len(self._pending), what)
            raise QueueFull(f"Redis unreachable and the outage queue is full ({self.limit})")
        if failed and self.reachable:
            self.reachable = False
            if not self._pending:
                self._down_since = time.monotonic()
                self._written = 0
            self._observe("down", len(self._pending))
            log.error("Redis unreachable: state changes are queued in memory (at most %d) and written in order "
                      "when it is back", self.limit)
        self._pending.append(_Held(what, call_id, write))
        self._held_calls[call_id] += 1
        self._observe("queued", len(self._pending))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="redis outage queue")

    def _pop(self) -> None:
        held = self._pending.popleft()
        left = self._held_calls[held.call_id] - 1
        if left > 0:
            self._held_calls[held.call_id] = left
        else:
            del self._held_calls[held.call_id]

    async def _flush(self) -> None:
        while self._pending:
            if not self.reachable:
                try:
                    await self.probe()
                except RedisError:
                    await asyncio.sleep(self.retry_s)
                    continue
                self.reachable = True
                self._back_at = time.monotonic()
                self._observe("up", len(self._pending))
                log.warning("Redis is back after %.1fs: replaying %d queued state change(s) in order",
                            self._back_at - self._down_since, len(self._pending))
            chunk = [self._pending[i] for i in range(min(self.chunk, len(self._pending)))]
            # started in queue order: their commands enter the shared pipelines in that order
            tasks = [asyncio.ensure_future(held.write()) for held in chunk]
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            lost = False
            for held, outcome in zip(chunk, outcomes):
                if isinstance(outcome, RedisConnectionError):
                    lost = True  # gone again: this one and everything after it stay (written again)
                    break
                if isinstance(outcome, Exception):  # a change Redis refuses: say so, go on with the others
                    log.error("call %s: queued %s could not be written and is skipped: %s", held.call_id,
                              held.what, outcome)
                    self._observe("failed", len(self._pending) - 1)
                self._pop()
                self._written += 1
                self._observe("flushed", len(self._pending))
            self._notify()
            if lost:
                if self.reachable:
                    self.reachable = False
                    self._observe("down", len(self._pending))
                await asyncio.sleep(self.retry_s)
        if self._written:
            self._observe("replayed", 0)
            log.warning("Redis outage over: %d queued state change(s) written in order, %.2fs after Redis was back",
                        self._written, time.monotonic() - self._back_at)
            self._written = 0

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
        self._pending.clear()  # nobody waits for them any more (written)
        self._held_calls.clear()
        self._notify()
