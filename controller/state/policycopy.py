"""Redis's copy of the last policy a controller served (policy/lastgood.py): one key that
every controller sharing the call store reads at start when its own files are refused."""
from __future__ import annotations

import asyncio
from typing import Any

LAST_GOOD_KEY = "cf:policy:last-good"


class PolicyCopy:
    def __init__(self, redis: Any, timeout_s: float = 2.0):
        self.redis = redis  # the call store's redis-py client
        self.timeout_s = timeout_s

    async def save(self, data: bytes) -> None:
        await asyncio.wait_for(self.redis.set(LAST_GOOD_KEY, data), self.timeout_s)

    async def load(self) -> bytes | None:
        data = await asyncio.wait_for(self.redis.get(LAST_GOOD_KEY), self.timeout_s)
        return data.encode() if isinstance(data, str) else data
