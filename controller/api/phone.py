"""Talk to an agent from a browser: the /phone softphone page (controller/api/phone/, JsSIP bundled
at setup time) and the short-lived phone tokens that let a browser's WebSocket through the edge.

A phone token is "<expiry unix s>.<callee>.<signature>", the signature base64url(HMAC-SHA256(
phone_token_secret, "<expiry>.<callee>")): the edge checks it with the same secret (Kamailio
PHONE_SECRET, kamailio/websocket.cfg) at the WebSocket handshake, so no controller is asked on the
call's path, and the browser can only call that callee until the expiry. Tokens are made by
POST /v1/phone/tokens with an API token of scope `phone`: an application's backend hands one to
each of its users' browsers and keeps its own API token to itself."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import json
import re
import time
from pathlib import Path

from aiohttp import web

PAGE_DIR = Path(__file__).resolve().parent / "phone"
BUNDLE = PAGE_DIR / "dist" / "phone.js"
CALLEE_RE = re.compile(r"^(\*|[A-Za-z0-9+_-]{1,64})$")
MAX_TTL_S = 3600


def _signature(secret: str, signed: str) -> str:
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def make_token(secret: str, callee: str, ttl_s: int, now: float | None = None) -> tuple[str, int]:
    """(token, expiry in unix seconds) for a browser that may call `callee` ("*": anyone)."""
    if not secret:
        raise ValueError("no phone_token_secret is set")
    if not CALLEE_RE.match(callee):
        raise ValueError(f"callee {callee!r}: letters, digits, + _ - (at most 64), or *")
    expiry = int(now if now is not None else time.time()) + ttl_s
    signed = f"{expiry}.{callee}"
    return f"{signed}.{_signature(secret, signed)}", expiry


def check_token(secret: str, token: str, now: float | None = None) -> str | None:
    """The callee a valid, unexpired token allows; None otherwise (what the edge checks)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not CALLEE_RE.match(parts[1]) or not secret:
        return None
    if not hmac.compare_digest(_signature(secret, f"{parts[0]}.{parts[1]}"), parts[2].rstrip("=")):
        return None
    return parts[1] if int(parts[0]) > (now if now is not None else time.time()) else None


class PhonePage:
    """The page and its script. The page carries the edge's WebSocket URL; the browser brings its
    own token (in the address's fragment), which names who it calls."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        match = re.match(r"^wss://([^/:]+|\[[^\]]+\])(:\d+)?(/.*)?$", ws_url)
        self.domain = match.group(1) if match else ""

    def html(self) -> str:
        config = json.dumps({"ws_url": self.ws_url, "domain": self.domain})
        # (JSON inside <script>: no "</" may close the element early)
        config = config.replace("</", "<\\/")
        page = (PAGE_DIR / "index.html").read_text()
        return page.replace("{{CONFIG}}", config).replace("{{BUNDLE}}", html.escape("phone/phone.js"))

    def security_headers(self) -> dict[str, str]:
        origin = re.match(r"^(wss://[^/]+)", self.ws_url)
        connect = origin.group(1) if origin else "'none'"
        return {
            "Content-Security-Policy": f"default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                                       f"connect-src {connect}; media-src 'self' blob: mediastream:; "
                                       "frame-ancestors 'none'; base-uri 'none'",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        }


def phone_routes(page: PhonePage | None) -> list[web.RouteDef]:
    """GET /phone and /phone/phone.js (no API token: the page is useless without a phone token)."""

    async def index(request: web.Request) -> web.StreamResponse:
        if page is None or not page.ws_url:
            return web.Response(status=503, text="the phone is not set up: set phone_ws_url (the edge's wss:// URL) "
                                                 "and phone_token_secret\n")
        if not BUNDLE.exists():
            return web.Response(status=503, text="the phone's script is not built: run .ci/install-system-packages "
                                                 "(npm ci and the esbuild bundle in controller/api/phone)\n")
        body = await asyncio.to_thread(page.html)
        return web.Response(text=body, content_type="text/html", headers=page.security_headers())

    async def script(request: web.Request) -> web.StreamResponse:
        if not BUNDLE.exists():
            return web.Response(status=404, text="not built\n")
        return web.FileResponse(BUNDLE, headers={"Content-Type": "text/javascript; charset=utf-8",
                                                 "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
    return [web.get("/phone", index), web.get("/phone/phone.js", script)]
