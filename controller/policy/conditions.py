"""Parsers for the values inside match conditions, shared by validation (to report errors),
the compiler and the reference evaluator. Each raises ValueError with an operator-facing
message."""
from __future__ import annotations

import hashlib
import ipaddress
import re
from datetime import date
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from controller.actions import parse_duration_ms
from controller.policy.model import IPNetwork
from controller.policy.numbers import Numbering

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_WORDS = {name: i for i, name in enumerate(DAY_NAMES)} | {
    full: i for i, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))}
_DAY_ALIASES = {"weekdays": "mon-fri", "weekend": "sat-sun", "everyday": "mon-sun"}
_HOURS = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])$")
_DATE = re.compile(r"^(?:([0-9]{4})-)?([0-9]{2})-([0-9]{2})$")
MAX_REGEX_LENGTH = 512
_SIP_USER = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+$")  # RFC 3261 user characters


def as_list(value: object) -> list:
    return list(value) if isinstance(value, list) else [value]


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name:
        raise ValueError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'Europe/London')") from None


def parse_days(value: str | list[str]) -> frozenset[int]:
    """'mon-fri', ['sat', 'sun'], 'weekend' → weekday numbers (Monday = 0)."""
    days: set[int] = set()
    for item in as_list(value):
        text = _DAY_ALIASES.get(str(item).strip().lower(), str(item).strip().lower())
        parts = text.split("-")
        if len(parts) not in (1, 2) or any(p not in _DAY_WORDS for p in parts):
            raise ValueError(f"{item!r} is not a day or day range (mon..sun, e.g. 'mon-fri', 'weekend')")
        start, end = _DAY_WORDS[parts[0]], _DAY_WORDS[parts[-1]]
        day = start
        days.add(day)
        while day != end:
            day = (day + 1) % 7
            days.add(day)
    return frozenset(days)


def parse_hours(value: str | list[str]) -> tuple[tuple[int, int], ...]:
    """'09:00-17:30' → ((540, 1050),); end exclusive; a window may wrap past midnight."""
    windows = []
    for item in as_list(value):
        m = _HOURS.match(str(item).replace(" ", ""))
        if not m:
            raise ValueError(f"{item!r} is not an hours window 'HH:MM-HH:MM' (e.g. '09:00-17:30', '22:00-06:00')")
        start = int(m.group(1)) * 60 + int(m.group(2))
        end = int(m.group(3)) * 60 + int(m.group(4))
        if end > 1440:
            raise ValueError(f"{item!r}: the end of the day is 24:00")
        if start == end:
            raise ValueError(f"{item!r} is an empty window (start equals end)")
        windows.append((start, end))
    return tuple(windows)


def minute_in_windows(minute: int, windows: tuple[tuple[int, int], ...]) -> bool:
    for start, end in windows:
        if start < end:
            if start <= minute < end:
                return True
        elif minute >= start or minute < end:
            return True
    return False


def parse_dates(value: str | list[str]) -> tuple[frozenset[tuple[int, int, int]], frozenset[tuple[int, int]]]:
    """'2026-12-25' (one day) or '12-25' (every year) → (full dates, recurring month-days)."""
    full: set[tuple[int, int, int]] = set()
    yearly: set[tuple[int, int]] = set()
    for item in as_list(value):
        m = _DATE.match(str(item).strip())
        if not m:
            raise ValueError(f"{item!r} is not a date (YYYY-MM-DD, or MM-DD for every year)")
        year, month, day = m.group(1), int(m.group(2)), int(m.group(3))
        try:
            date(int(year) if year else 2024, month, day)  # 2024: a leap year accepts 02-29
        except ValueError:
            raise ValueError(f"{item!r} is not a real date") from None
        if year:
            full.add((int(year), month, day))
        else:
            yearly.add((month, day))
    return frozenset(full), frozenset(yearly)


def parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR (e.g. '192.0.2.10', '10.0.0.0/8', '2001:db8::/32')") from None


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A source address from signalling; None when it is not an address."""
    if not isinstance(text, str):
        return None
    try:
        return ipaddress.ip_address(text.strip("[] "))
    except ValueError:
        return None


def compile_regex(pattern: str, flags: int = 0) -> re.Pattern[str]:
    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"regex is longer than {MAX_REGEX_LENGTH} characters")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None


def number_pattern(value: str | int, numbering: Numbering) -> str:
    """An exact number written in a policy, normalised like the calls it is compared with."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number or SIP user")
    text = str(value).strip()
    if not text:
        raise ValueError("empty number")
    normalised = numbering.normalise(text)
    if not _SIP_USER.match(normalised):
        raise ValueError(f"{text!r} is neither a phone number nor a SIP user")
    return normalised


def number_prefix(value: str) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("empty prefix")
    if text.isdigit():
        raise ValueError(f"number prefix {text!r} must be written in E.164 with a leading '+' (e.g. '+{text}'), "
                         "because calls are compared after normalisation")
    if text.startswith("+") and not text[1:].isdigit():
        raise ValueError(f"number prefix {text!r}: only digits may follow '+'")
    return text


def risk_prefix(value: str) -> str:
    text = str(value).strip()
    if not (text.startswith("+") and text[1:].isdigit() and len(text) >= 2):
        raise ValueError(f"risk list entry {value!r} must be an E.164 prefix such as '+1900'")
    return text


def split_bounds(percent: float, offset: float = 0) -> tuple[int, int]:
    """Percent/offset (two decimals at most) → bucket range [low, high) out of 10,000."""
    low, high = round(offset * 100), round((offset + percent) * 100)
    if abs(percent * 100 - round(percent * 100)) > 1e-6 or abs(offset * 100 - round(offset * 100)) > 1e-6:
        raise ValueError("split percent and offset take at most two decimals")
    if high > 10000:
        raise ValueError(f"split offset {offset} + percent {percent} is more than 100")
    return low, high


def split_bucket(seed: str, call_id: str) -> int:
    """Deterministic bucket 0..9999 of a call for a seed (same call, same bucket, every time)."""
    digest = hashlib.blake2b(f"{seed}\x00{call_id}".encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10000


def window_seconds(value: int | str) -> int:
    ms = parse_duration_ms(value)
    if ms % 1000:
        raise ValueError(f"window {value!r} must be a whole number of seconds")
    return ms // 1000
