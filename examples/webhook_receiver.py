"""A reference webhook receiver: checks callfabric's signature and replay window, and keeps
the events it accepted. Use its `verify` in your own receiver.

    WEBHOOK_SECRET=... python examples/webhook_receiver.py 127.0.0.1:8090
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time

from aiohttp import web

REPLAY_WINDOW_S = 300


def verify(secret: str, signature_header: str, body: bytes, now: float | None = None) -> bool:
    """`Callfabric-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`;
    refuse a timestamp outside the replay window."""
    try:
        fields = dict(part.split("=", 1) for part in signature_header.split(","))
        timestamp, received = int(fields["t"]), fields["v1"]
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > REPLAY_WINDOW_S:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received)


def receiver(secret: str) -> web.Application:
    """An app that accepts signed events at POST /events (401 otherwise) into app["events"]."""
    app = web.Application()
    app["events"] = []

    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get("Callfabric-Signature", ""), body):
            return web.Response(status=401, text="bad signature")
        app["events"].append(json.loads(body))
        return web.Response(status=204)

    app.router.add_post("/events", events)
    return app


if __name__ == "__main__":
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8090").rpartition(":")
    web.run_app(receiver(os.environ["WEBHOOK_SECRET"]), host=host, port=int(port))
