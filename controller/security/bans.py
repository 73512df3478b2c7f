"""Bans: sources the edge refuses for a while. Redis holds the truth (who, why, until when:
`cf:ban:{<ip>}` and the index `cf:bans`), every Kamailio's `blocklist` table holds a copy
with the same expiry. Copies are pushed when a ban is made or lifted and re-pushed
periodically, so an edge that restarted (its table is in memory) gets them back. A ban never
hits a trusted peer (security/trust.py): such a ban is refused, whoever asks."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import Any

from controller.metrics import Metrics
from controller.security.edges import Edge, EdgeError
from controller.security.trust import BanRefused, TrustedPeers
from controller.state.batch import Batcher

log = logging.getLogger("callfabric.security")

BANS_INDEX = "cf:bans"
MAX_BAN_S = 30 * 86400
REASON_LIMIT = 512


def ban_key(ip: str) -> str:
    return f"cf:ban:{{{ip}}}"


def normalise_ip(text: str) -> str:
    """A ban is per address; ValueError with a clear message for anything else."""
    try:
        return str(ipaddress.ip_address(str(text).strip()))
    except ValueError:
        raise ValueError(f"{str(text)[:64]!r} is not an IP address") from None


@dataclass(frozen=True, slots=True)
class Ban:
    ip: str
    reason: str
    origin: str  # policy | api | asterisk | edge
    detector: str  # the detector that weighed most, "manual", or the edge's reason (flood, scanner, sweep)
    created_ms: int
    expires_ms: int
    call_id: str | None = None
    by: str | None = None  # API token name / controller instance

    def to_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "reason": self.reason, "origin": self.origin, "detector": self.detector,
                "created_ms": self.created_ms, "expires_ms": self.expires_ms, "call_id": self.call_id, "by": self.by}


def _text(value: bytes) -> str:
    """A Redis reply's bytes (the pipeline's replies are never decoded) as text."""
    return value.decode("utf-8", "replace")


class BanList:
    def __init__(self, batch: Batcher, metrics: Metrics, edges: list[Edge], trust: TrustedPeers | None = None):
        self.batch = batch
        self.metrics = metrics
        self.edges = edges
        self.trust = trust or TrustedPeers((), [])

    async def add(self, ip: str, seconds: int, reason: str, *, origin: str, detector: str, now_ms: int,
                  call_id: str | None = None, by: str | None = None) -> Ban:
        """Record a ban (a longer existing one is kept) and push it to every edge. BanRefused
        (logged and counted) when `ip` is a trusted peer."""
        ip = normalise_ip(ip)
        if not self.trust.complete:  # an edge's media nodes were never read: try now
            await self.trust.refresh()
        try:
            self.trust.check(ip)
        except BanRefused as exc:
            self.metrics.bans_refused.labels(origin).inc()
            log.error("ban refused (%s, %s): %s", origin, detector, exc)
            raise
        seconds = max(1, min(int(seconds), MAX_BAN_S))
        ban = Ban(ip, reason[:REASON_LIMIT], origin, detector, now_ms, now_ms + seconds * 1000, call_id, by)
        key = ban_key(ip)
        previous, = await self.batch.run([("HGET", key, "expires_ms")])
        if previous is not None and _text(previous).isdigit() and int(_text(previous)) >= ban.expires_ms:
            existing = await self.get(ip)
            if existing is not None:
                return existing
        fields = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in ban.to_dict().items() if v is not None}
        await self.batch.run([
            ("DEL", key),
            ("HSET", key, *[x for pair in fields.items() for x in pair]),
            ("PEXPIREAT", key, ban.expires_ms),
            ("ZADD", BANS_INDEX, ban.expires_ms, ip),
        ])
        self.metrics.bans.labels(origin, detector).inc()
        log.warning("banned %s for %ds (%s, %s): %s", ip, seconds, origin, detector, ban.reason)
        await self._push(lambda edge: edge.block(ip, seconds), "block")
        return ban

    async def remove(self, ip: str) -> bool:
        """Lift the ban of `ip` everywhere: Redis, and at every edge both the blocklist and the
        ban the edge may have made by itself (flood, scanner, sweep — also when the controller
        never recorded it). True when Redis had a ban for it."""
        ip = normalise_ip(ip)
        deleted, _ = await self.batch.run([("DEL", ban_key(ip)), ("ZREM", BANS_INDEX, ip)])
        await self._push(lambda edge: edge.unblock(ip), "unblock")
        if deleted:
            log.warning("ban of %s lifted", ip)
        return bool(deleted)

    async def get(self, ip: str) -> Ban | None:
        flat, = await self.batch.run([("HGETALL", ban_key(normalise_ip(ip)))])
        return _ban(flat)

    async def active(self, now_ms: int, limit: int = 10_000) -> list[Ban]:
        """Bans in force, soonest to expire first (expired index entries are dropped)."""
        _, ips = await self.batch.run([("ZREMRANGEBYSCORE", BANS_INDEX, "-inf", now_ms),
                                       ("ZRANGEBYSCORE", BANS_INDEX, now_ms, "+inf", "LIMIT", 0, limit)])
        if not ips:
            return []
        replies = await self.batch.run([("HGETALL", ban_key(_text(ip))) for ip in ips])
        bans = [b for b in (_ban(flat) for flat in replies) if b is not None and b.expires_ms > now_ms]
        self.metrics.bans_active.set(len(bans))
        return bans

    async def resync(self, now_ms: int) -> int:
        """Push every ban in force to every edge (with the time each has left). A ban recorded
        before its address became a trusted peer is lifted instead."""
        await self.trust.refresh()
        bans = await self.active(now_ms)
        for ban in bans:
            reason = self.trust.why(ban.ip)
            if reason is not None:
                log.error("lifting the ban of %s: %s", ban.ip, reason)
                await self.remove(ban.ip)
                continue
            seconds = max(1, (ban.expires_ms - now_ms + 999) // 1000)
            await self._push(lambda edge, b=ban, s=seconds: edge.block(b.ip, s), "block")
        return len(bans)

    async def _push(self, operation, name: str) -> None:
        results = await asyncio.gather(*(operation(edge) for edge in self.edges), return_exceptions=True)
        for edge, result in zip(self.edges, results):
            if isinstance(result, EdgeError):
                self.metrics.edge_rpc_errors.labels(name).inc()
                log.error("edge %s: could not %s: %s (retried at the next resync)", edge.url, name, result)
            elif isinstance(result, BaseException):
                raise result


def _ban(flat: Any) -> Ban | None:
    if not flat:
        return None
    fields = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2])}
    try:
        return Ban(ip=fields["ip"], reason=fields.get("reason", ""), origin=fields.get("origin", "?"),
                   detector=fields.get("detector", "?"), created_ms=int(fields.get("created_ms", 0)),
                   expires_ms=int(fields["expires_ms"]), call_id=fields.get("call_id"), by=fields.get("by"))
    except (KeyError, ValueError):
        return None  # a damaged entry: not a ban we can show or enforce
