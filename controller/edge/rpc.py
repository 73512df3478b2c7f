"""Kamailio's JSON-RPC management endpoint (xhttp + jsonrpcs, `POST /RPC`): what the controller
changes at the edge outside calls — the blocklist of banned sources, lifting the bans the
edge made by itself (`floodban`), the hot scopes whose calls it leaves to a controller
(`cfhot`) — and what it reads there (its media nodes, never bannable; the dialogs it holds,
`dlg.list`). It is the edge security/ asks for (controller/security/edges.py)."""
from __future__ import annotations

import itertools
import json
from typing import Any

import aiohttp

from controller.security.edges import EdgeError

BLOCKLIST = "blocklist"  # the htable kamailio.cfg checks before anything else
FLOODBAN = "floodban"  # the edge's own bans (flood, scanner, sweep): source IP => reason
HOT_TABLE = "cfhot"  # scopes whose calls the edge leaves to a controller (kamailio/edge_decide.py)


class RpcError(EdgeError):
    pass


class KamailioRpc:
    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float = 2.0):
        self.url = url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ids = itertools.count(1)

    async def call(self, method: str, *params: Any) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "params": list(params), "id": next(self._ids)}
        try:
            async with self._session.post(self.url, data=json.dumps(body), timeout=self._timeout,
                                          headers={"Content-Type": "application/json"}) as response:
                text = await response.text()
                if response.status != 200:
                    raise RpcError(f"{self.url}: HTTP {response.status} {text[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RpcError(f"{self.url}: {type(exc).__name__} {exc}") from None
        try:
            reply = json.loads(text)
        except ValueError:
            raise RpcError(f"{self.url}: not JSON: {text[:200]!r}") from None
        if not isinstance(reply, dict):
            raise RpcError(f"{self.url}: unexpected reply {text[:200]!r}")
        if "error" in reply:
            error = reply["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RpcError(f"{self.url}: {method}: {message}")
        return reply.get("result")

    async def block(self, ip: str, seconds: int) -> None:
        await self.call("htable.setxi", BLOCKLIST, ip, 1, max(1, int(seconds)))

    async def mark_hot(self, key: str, seconds: int) -> None:
        await self.call("htable.setxi", HOT_TABLE, key, 1, int(seconds))

    async def unblock(self, ip: str) -> None:
        """Lift every ban of `ip` at this edge: the controller's (`blocklist`) and the one the
        edge made by itself (`floodban`), so an operator's "lift" is a lift whoever banned."""
        for table in (BLOCKLIST, FLOODBAN):
            try:
                await self.call("htable.delete", table, ip)
            except RpcError as exc:
                if "not found" not in str(exc).lower():  # already gone (expired) is what we wanted
                    raise

    async def media_nodes(self) -> list[str]:
        """The URIs of every dispatcher destination this edge routes to (its media nodes)."""
        result = await self.call("dispatcher.list")
        records = result.get("RECORDS") if isinstance(result, dict) else None
        uris = []
        for record in records if isinstance(records, list) else []:
            targets = (record.get("SET") or {}).get("TARGETS") if isinstance(record, dict) else None
            for target in targets if isinstance(targets, list) else []:
                uri = (target.get("DEST") or {}).get("URI") if isinstance(target, dict) else None
                if isinstance(uri, str):
                    uris.append(uri)
        return uris

    async def _dump(self, table: str) -> list[dict[str, Any]]:
        """The items of an htable (`htable.dump`), whatever else the reply holds skipped."""
        result = await self.call("htable.dump", table)
        return [item for slot in (result if isinstance(result, list) else [])
                for item in (slot.get("slot", []) if isinstance(slot, dict) else [])
                if isinstance(item, dict) and isinstance(item.get("name"), str)]

    async def edge_banned(self) -> dict[str, str]:
        """The bans the edge made by itself: {ip: reason (flood, scanner, sweep)}."""
        return {item["name"]: str(item.get("value", "")) for item in await self._dump(FLOODBAN)}

    async def blocked(self) -> dict[str, int]:
        """The blocklist as the edge holds it: {ip: seconds left (0 when unknown)}."""
        return {item["name"]: int(item["expires"]) if str(item.get("expires", "")).isdigit() else 0
                for item in await self._dump(BLOCKLIST)}

    async def dialogs(self) -> list[dict[str, Any]]:
        """Every dialog the edge holds now (`dlg.list`: early and confirmed), as Kamailio lists
        them (call-id, state 4 = confirmed, init_ts, start_ts, from_uri, to_uri, variables)."""
        result = await self.call("dlg.list")
        if not isinstance(result, list):
            raise RpcError(f"{self.url}: dlg.list answered {str(result)[:120]!r}")
        return [d for d in result if isinstance(d, dict) and isinstance(d.get("call-id"), str)]
