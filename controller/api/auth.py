"""API tokens with scopes: `read` (calls, timelines, events), `control` (commands on calls,
originate), `phone` (only making browsers' phone tokens: what an application's backend needs to
put its users on /phone), `admin` (policy reload and validation; implies the others). Tokens come from the
settings (`api_tokens`: `name:scope[,scope]:secret`; in the environment several tokens are
separated by spaces, which no Bearer token holds), are compared in constant time, and are
never logged — a request is known by the token's name."""
from __future__ import annotations

import hmac
import logging
import re
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("callfabric.api")
SCOPES = ("read", "control", "admin", "phone")
_SECRET = re.compile(r"[A-Za-z0-9._~+/-]+=*")   # RFC 6750 b64token: what a Bearer token may hold


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    scopes: frozenset[str]
    secret: bytes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def parse_tokens(entries: list[str]) -> list[ApiToken]:
    """`name:read,control:secret` entries → tokens (ValueError naming the bad entry, not its secret)."""
    tokens = []
    for n, entry in enumerate(entries):
        name, sep1, rest = entry.partition(":")
        scopes, sep2, secret = rest.partition(":")
        wanted = {s.strip() for s in scopes.split(",") if s.strip()}
        if not (sep1 and sep2 and name and secret) or not wanted or wanted - set(SCOPES):
            raise ValueError(f"api_tokens[{n}] ({name or '?'}): expected 'name:scope[,scope]:secret' with scopes "
                             f"among {', '.join(SCOPES)}")
        if not _SECRET.fullmatch(secret):
            bad = sorted({c for c in secret if c != "=" and not _SECRET.fullmatch(c)})
            hint = " (tokens are separated by spaces, not commas)" if "," in bad else ""
            raise ValueError(f"api_tokens[{n}] ({name}): the secret may hold letters, digits and -._~+/ (a Bearer "
                             f"token, '=' only at its end), not {' '.join(map(repr, bad)) or 'that'}{hint}")
        if len(secret) < 16:
            raise ValueError(f"api_tokens[{n}] ({name}): the secret must be at least 16 characters")
        tokens.append(ApiToken(name, frozenset(wanted), secret.encode()))
    return tokens


def find_token(tokens: list[ApiToken], presented: str) -> ApiToken | None:
    """The token whose secret is `presented`; every token is compared (constant time each)."""
    found = None
    candidate = presented.encode()
    for token in tokens:
        if hmac.compare_digest(token.secret, candidate):
            found = token
    return found


def error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message, **extra}}, status=status)


def auth_middleware(tokens: list[ApiToken], scope_of: Callable[[web.Request], str | None]):
    """`scope_of(request)` says which scope a route needs (None: public)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        needed = scope_of(request)
        if needed is None:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        token = find_token(tokens, presented) if presented else None
        if token is None:
            response = error(401, "missing or unknown API token (send 'Authorization: Bearer <token>')")
            response.headers["WWW-Authenticate"] = 'Bearer realm="callfabric"'
            return response
        if not token.allows(needed):
            return error(403, f"token {token.name!r} lacks the {needed!r} scope (it has: "
                              f"{', '.join(sorted(token.scopes))})")
        request["token"] = token.name
        return await handler(request)

    return middleware
