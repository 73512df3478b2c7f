"""Who owns each Asterisk node's event stream: a lease in Redis with a TTL and a fencing token.

One controller at a time holds a node's lease (`cf:lease:{node}` = "<instance>|<fence>"); it
renews it well before the TTL runs out, and the others try to take it as soon as it expires
(the owner died) or is released (the owner drains). Each acquisition gets a new fence, larger
than every earlier one of that node — the server's clock in milliseconds, or the last fence
plus one if that is larger, so it stays monotonic even if an AOF restart lost the last
increment — and media records are written with their owner's fence (see calls.py), so a
stale owner cannot overwrite the new one's work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.state.batch import Batcher, Script

PREFIX = "cf"


def lease_key(node: str) -> str:
    return f"{PREFIX}:lease:{{{node}}}"


def fence_key(node: str) -> str:
    return f"{PREFIX}:fence:{{{node}}}"


# KEYS: lease, fence. ARGV: instance, ttl ms. Returns {1, value} when taken, {0, holder}.
_ACQUIRE = Script("""
local holder = redis.call('GET', KEYS[1])
if holder then
  return {0, holder}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence = math.max((tonumber(redis.call('GET', KEYS[2]) or '0') or 0) + 1, now)
local text = string.format('%d', fence)
redis.call('SET', KEYS[2], text)
local value = ARGV[1] .. '|' .. text
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
""")

# KEYS: lease. ARGV: value, ttl ms. 1 when still ours (and extended), else 0. A lease that
# expired while Redis was unreachable (or restarting) and that nobody took meanwhile is
# still ours: taken back with the same fence (had another controller held it in between,
# its newer fence on the records would refuse our writes anyway).
_RENEW = Script("""
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
""")

# KEYS: lease. ARGV: value. 1 when it was ours (and is gone), else 0.
_RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
""")


@dataclass(frozen=True, slots=True)
class Lease:
    node: str
    instance: str
    fence: int

    @property
    def value(self) -> str:
        return f"{self.instance}|{self.fence}"

    @classmethod
    def parse(cls, node: str, raw: Any) -> "Lease | None":
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
        instance, sep, fence = text.rpartition("|")
        if not sep or not instance or not fence.isdigit():
            return None  # garbage in the key: treated as nobody's
        return cls(node, instance, int(fence))


class NodeLeases:
    def __init__(self, batch: Batcher, instance: str, ttl_s: float):
        self.batch = batch
        self.instance = instance
        self.ttl_ms = max(100, int(ttl_s * 1000))

    async def acquire(self, node: str) -> Lease | None:
        """The node's lease if it was free (now ours, with a new fence), else None."""
        ((taken, value),) = await self.batch.run([("EVALSHA", _ACQUIRE, [lease_key(node), fence_key(node)],
                                                   [self.instance, self.ttl_ms])])
        return Lease.parse(node, value) if taken == 1 else None

    async def renew(self, lease: Lease) -> bool:
        """Extend our lease; False when another controller holds it now."""
        (renewed,) = await self.batch.run([("EVALSHA", _RENEW, [lease_key(lease.node)], [lease.value, self.ttl_ms])])
        return renewed == 1

    async def release(self, lease: Lease) -> bool:
        (released,) = await self.batch.run([("EVALSHA", _RELEASE, [lease_key(lease.node)], [lease.value])])
        return released == 1

    async def holder(self, node: str) -> Lease | None:
        (raw,) = await self.batch.run([("GET", lease_key(node))])
        return Lease.parse(node, raw) if raw is not None else None
