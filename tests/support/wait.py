"""Waiting for a condition with a deadline (not a count of polls: a loaded machine polls slowly)."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
                every: float = 0.01) -> Any:
    """The predicate's first truthy value (it may be a coroutine function); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(every)
