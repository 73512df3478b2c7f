"""E.164 normalisation, so that `0207 946 0000`, `+44 20 7946 0000` and `00442079460000`
all match the same rule. Anything that is not a phone number (`alice`, `anonymous`) is
left exactly as it came, and short codes (`999`, `112`) are not given a country code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SEPARATORS = re.compile(r"[\s\-.()]")
_DIALLED = re.compile(r"^\+?[0-9]+$")


@dataclass(frozen=True, slots=True)
class Numbering:
    """How national numbers are dialled where the calls come from."""

    country_code: str | None = None  # e.g. "44"; None leaves national numbers as dialled
    international_prefixes: tuple[str, ...] = ("00",)
    national_prefix: str | None = None  # trunk prefix, e.g. "0" (UK) or "1" (NANP)
    min_national_length: int = 7  # shorter digit strings are short codes

    def normalise(self, raw: str) -> str:
        user = raw.split(";", 1)[0] if ";" in raw else raw
        if user.isascii() and (user.isdigit() or (user[:1] == "+" and user[1:].isdigit())):
            compact = user  # already plain digits (most calls): no separators to remove
        else:
            compact = _SEPARATORS.sub("", user)
            if not compact or not _DIALLED.match(compact):
                return raw
        if compact[0] == "+":
            return compact
        for prefix in self.international_prefixes:
            if compact.startswith(prefix) and len(compact) > len(prefix):
                return "+" + compact[len(prefix):]
        if self.country_code is None or len(compact) < self.min_national_length:
            return compact
        if self.national_prefix and compact.startswith(self.national_prefix):
            return "+" + self.country_code + compact[len(self.national_prefix):]
        return "+" + self.country_code + compact


def is_e164_like(value: str) -> bool:
    return bool(re.match(r"^\+[0-9]{1,15}$", value))
