"""What security asks of an edge: to refuse a source for a while (and to stop refusing it),
to send a hot scope's calls to a controller, and which media nodes it routes to (never
bannable). The Kamailio implementation is controller/edge/rpc.py (KamailioRpc), handed in by
app.py: security never speaks an edge's wire protocol."""
from __future__ import annotations

from typing import Protocol


class EdgeError(Exception):
    """An edge did not do what was asked (unreachable, refused, answered garbage): logged,
    counted and done again at the next resync. Anything else an edge raises is a bug."""


class Edge(Protocol):
    @property
    def url(self) -> str: ...

    async def block(self, ip: str, seconds: int) -> None: ...

    async def unblock(self, ip: str) -> None: ...

    async def mark_hot(self, key: str, seconds: int) -> None: ...

    async def media_nodes(self) -> list[str]: ...
