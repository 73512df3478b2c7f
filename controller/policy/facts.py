"""Per-call facts, derived once from a Call (numbers normalised, address parsed, tenant
resolved) so that no rule re-derives them. Garbage in the call never raises: a field that
cannot be understood simply matches nothing."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from controller.policy.conditions import parse_ip, split_bucket, zone
from controller.policy.model import Call, Settings, Tenant

MAX_HEADER_VALUES = 16
IPAddress = IPv4Address | IPv6Address


def _text(value: Any, limit: int = 512) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _headers(raw: Any) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        kept = tuple(v.strip() for v in values[:MAX_HEADER_VALUES] if isinstance(v, str))
        if kept:
            key = name.lower()
            out[key] = out.get(key, ()) + kept
    return out


MAX_SOURCES = 4096  # source addresses remembered per policy (calls come from a few trunks and peers)


@dataclass(frozen=True, slots=True)
class Source:
    """A signalling source address as calls see it: parsed (None: not an address), its text as
    counters key it, and the tenant whose trunk it is in. Parsing and the trunk lookup are
    the slow part of a call's facts, and calls come from the same addresses again and again."""
    ip: IPAddress | None
    text: str
    tenant: str | None

    @staticmethod
    def of(address: Any, tenants: tuple[Tenant, ...]) -> "Source":
        ip = parse_ip(address)
        if ip is None:
            return Source(None, "", None)
        trunk = next((t.name for t in tenants if any(ip in net for net in t.trunks)), None)
        return Source(ip, str(ip), trunk)


class Facts:
    __slots__ = ("call_id", "caller", "callee", "ruri", "src_ip", "source", "transport", "headers", "at",
                 "counters", "trunk", "tenant", "risk_measures", "_local", "_buckets")

    def __init__(self, call: Call, settings: Settings, tenants: tuple[Tenant, ...],
                 trunk_tenants: Mapping[str, str | None] | None = None, sources: dict[str, Source] | None = None):
        """`sources`: what is known of source addresses already (see Source), shared by the
        calls decided with one policy."""
        numbering = settings.numbering
        self.call_id = _text(call.call_id, 256)
        self.caller = numbering.normalise(_text(call.from_user))
        self.callee = numbering.normalise(_text(call.to_user))
        ruri = _text(call.ruri_user)
        self.ruri = numbering.normalise(ruri) if ruri else self.callee
        source = sources.get(call.src_ip) if sources is not None and type(call.src_ip) is str else None
        if source is None:
            source = Source.of(call.src_ip, tenants)
            if sources is not None and len(sources) < MAX_SOURCES and type(call.src_ip) is str:
                sources[call.src_ip] = source
        self.src_ip, self.source = source.ip, source.text
        self.transport = _text(call.transport, 8).lower()
        self.headers = _headers(call.headers)
        at = call.at if isinstance(call.at, datetime) else datetime.now(timezone.utc)
        self.at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        counters = call.counters if isinstance(call.counters, Mapping) else {}
        self.counters = counters
        # the inbound trunk the edge recognised; a name the policy does not declare is no trunk
        trunk = _text(call.trunk, 64)
        self.trunk = trunk if trunk_tenants is not None and trunk in trunk_tenants else None
        # (after the inbound trunk's own tenant) trunk addresses first (they cannot be forged),
        # then a header a trusted upstream sets
        self.tenant = ((trunk_tenants or {}).get(self.trunk or "") or source.tenant
                       or self._tenant_by_header(tenants))
        self.risk_measures: tuple[Any, tuple] | None = None  # (counters, detectors applying): risk.py
        self._local: dict[str, tuple[int, int, tuple[int, int, int]]] = {}
        self._buckets: dict[str, int] = {}

    def _tenant_by_header(self, tenants: tuple[Tenant, ...]) -> str | None:
        for tenant in tenants:
            if tenant.header_name and tenant.header_value in self.headers.get(tenant.header_name, ()):
                return tenant.name
        return None

    def local(self, tz: str) -> tuple[int, int, tuple[int, int, int]]:
        """(weekday, minute of day, (year, month, day)) of the call in `tz`."""
        cached = self._local.get(tz)
        if cached is None:
            t = self.at.astimezone(zone(tz))
            cached = (t.weekday(), t.hour * 60 + t.minute, (t.year, t.month, t.day))
            self._local[tz] = cached
        return cached

    def bucket(self, seed: str) -> int:
        cached = self._buckets.get(seed)
        if cached is None:
            cached = self._buckets[seed] = split_bucket(seed, self.call_id)
        return cached

    def counter(self, key: str) -> int:
        value = self.counters.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def scope_value(self, scope: str) -> str:
        """The value a counter scope keys on for this call (what the edge counts by)."""
        if scope == "source":
            return self.source
        if scope == "tenant":
            return self.tenant or ""
        if scope == "caller":
            return self.caller
        if scope == "callee":
            return self.ruri
        return "*"
