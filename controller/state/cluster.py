"""Automatic pipelining over a Redis Cluster.

The same batching as batch.py (every operation queued meanwhile shares the next flush), but
a flush is split per master by key slot and the masters' pipelines go out together. A
call's keys share a hash tag, so everything about one call lands on one master, in order.
Redirections are followed (MOVED updates the slot map, ASK is asked once), a transient
`TRYAGAIN` / `CLUSTERDOWN` is retried briefly, and a master that cannot be reached fails
its commands with a connection error and gets the slot map re-read before the next flush
(after a failover its replica serves the slots)."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from controller.state.batch import (
    Batcher, Command, RespConnection, Script, _encode, _is_no_script, _Operation, unavailable,
)

log = logging.getLogger("callfabric.state")

SLOTS = 16384
MAX_REDIRECTS = 4
Node = tuple[str, int]


def command_key(cmd: Command) -> Any:
    """The key a command is routed by (None: any master will do)."""
    if cmd[0] == "EVALSHA":
        return cmd[2][0] if cmd[2] else None
    if cmd[0] in ("PUBLISH", "PING", "SCRIPT") or len(cmd) < 2:
        return None
    return cmd[1]


class ClusterBatcher(Batcher):
    def __init__(self, url: str, seeds: list[Node], max_batch: int = 2000, timeout_s: float = 2.0,
                 linger_s: float = 0.005):
        """`url` gives the credentials (its host is not used); `seeds` are cluster nodes to
        learn the slot map from."""
        self.url = url
        self.seeds = list(seeds)
        self._slots: list[Node] | None = None
        self._connections: dict[Node, RespConnection] = {}
        self._loaded_on: dict[Node, set[str]] = {}
        self._refreshing: asyncio.Future | None = None
        self._init_pipelining(max_batch, timeout_s, linger_s)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def _connection(self, node: Node) -> RespConnection:
        connection = self._connections.get(node)
        if connection is None:
            connection = self._connections[node] = RespConnection(self.url)
            connection.params = {**connection.params, "host": node[0], "port": node[1], "db": 0}
        return connection

    # -- the slot map --------------------------------------------------------------------------
    async def _slot_map(self) -> list[Node]:
        if self._slots is None:
            if self._refreshing is None or self._refreshing.done():  # one refresh at a time, shared
                self._refreshing = asyncio.ensure_future(self._read_slot_map())
            self._slots = await asyncio.shield(self._refreshing)
        return self._slots

    async def _read_slot_map(self) -> list[Node]:
        candidates = list(dict.fromkeys([*self._connections, *self.seeds]))
        problems = []
        for node in candidates:
            try:
                (reply,) = await self._connection(node).execute([("CLUSTER", "SLOTS")], self.timeout_s)
            except RedisError as exc:
                problems.append(f"{node[0]}:{node[1]}: {exc}")
                continue
            if isinstance(reply, Exception) or not isinstance(reply, list) or not reply:
                problems.append(f"{node[0]}:{node[1]}: {reply!r}"[:200])
                continue
            table: list[Node | None] = [None] * SLOTS
            for entry in reply:
                start, end, master = entry[0], entry[1], entry[2]
                host = master[0].decode() if master[0] else node[0]
                for slot in range(int(start), int(end) + 1):
                    table[slot] = (host, int(master[1]))
            if any(n is None for n in table):
                problems.append(f"{node[0]}:{node[1]}: slots not all served")
                continue
            return table  # type: ignore[return-value]
        raise RedisConnectionError("no Redis Cluster node gave a complete slot map: " + "; ".join(problems))

    # -- sending ---------------------------------------------------------------------------------
    async def _send(self, batch: list[_Operation]) -> None:
        flat = [cmd for op in batch for cmd in op.commands]
        replies: list[Any] = [None] * len(flat)
        try:
            await self._send_flat(batch, flat, replies)
        except Exception as exc:  # whatever happens, no caller may wait forever
            error = exc if isinstance(exc, RedisError) else RedisError(f"pipeline failed: {exc!r}")
            for op in batch:
                if not op.replies.done():
                    op.replies.set_exception(error)
            return
        position = 0
        for op in batch:
            if not op.sent.done():
                op.sent.set_result(None)
            if not op.replies.done():
                op.replies.set_result([NoScriptError(str(r)) if _is_no_script(r) else r
                                       for r in replies[position:position + len(op.commands)]])
            position += len(op.commands)

    async def _send_flat(self, batch: list[_Operation], flat: list[Command], replies: list[Any]) -> None:
        pending = list(range(len(flat)))
        asking: dict[int, Node] = {}
        for attempt in range(MAX_REDIRECTS):
            slots = await self._slot_map()
            groups: dict[Node, list[int]] = {}
            for i in pending:
                key = command_key(flat[i])
                node = asking.get(i) or (slots[key_slot(_encode(key))] if key is not None else slots[0])
                groups.setdefault(node, []).append(i)
            results = await asyncio.gather(*(self._run_on(node, [flat[i] for i in positions],
                                                          {n for n, i in enumerate(positions) if i in asking})
                                             for node, positions in groups.items()), return_exceptions=True)
            if attempt == 0:
                for op in batch:  # in the masters' sockets (or failed): later operations go after them
                    if not op.sent.done():
                        op.sent.set_result(None)
            retry: list[int] = []
            wait = False
            for (node, positions), result in zip(groups.items(), results):
                if isinstance(result, BaseException):
                    self._slots = None  # re-read who serves what before the next flush
                    error = result if isinstance(result, RedisError) else RedisError(f"pipeline failed: {result!r}")
                    for i in positions:
                        replies[i] = error
                    continue
                for i, reply in zip(positions, result):
                    text = str(reply) if type(reply) is ResponseError else ""
                    if text.startswith("MOVED "):
                        slot, moved_to = _redirect(text)
                        if self._slots is not None:
                            self._slots[slot] = moved_to
                        asking.pop(i, None)
                        retry.append(i)
                    elif text.startswith("ASK "):
                        asking[i] = _redirect(text)[1]
                        retry.append(i)
                    elif text.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                        wait = True
                        retry.append(i)
                    elif unavailable(reply):  # e.g. a demoted master: re-read the slot map
                        self._slots = None
                        self._connection(node).close()
                        replies[i] = RedisConnectionError(f"Redis Cluster node cannot take this now: {text}")
                    else:
                        replies[i] = reply
            if not retry:
                return
            pending = retry
            if wait:
                await asyncio.sleep(0.05 * (attempt + 1))
        for i in pending:
            replies[i] = RedisConnectionError(f"Redis Cluster kept redirecting or refusing: {flat[i][0]}")

    async def _run_on(self, node: Node, commands: list[Command], asking: set[int]) -> list[Any]:
        """One master's share of a flush (scripts loaded there first; ASKING before redirected ones)."""
        loaded = self._loaded_on.setdefault(node, set())
        scripts = {cmd[1].sha: cmd[1] for cmd in commands if cmd[0] == "EVALSHA"}
        missing = [s for sha, s in scripts.items() if sha not in loaded]
        wire: list[tuple] = [("SCRIPT", "LOAD", s.source) for s in missing]
        for n, cmd in enumerate(commands):
            if n in asking:
                wire.append(("ASKING",))
            wire.append(self._wire(cmd))
        connection = self._connection(node)
        replies = await connection.execute(wire, self.timeout_s)
        loaded.update(s.sha for s in missing)
        out = _without_asking(replies[len(missing):], commands, asking)
        if any(_is_no_script(r) for r in out):  # the master restarted or failed over: scripts are gone
            reload = [("SCRIPT", "LOAD", s.source) for s in _all_scripts(commands)]
            again = await connection.execute(reload + wire[len(missing):], self.timeout_s)
            out = _without_asking(again[len(reload):], commands, asking)
        return out


def _all_scripts(commands: list[Command]) -> list[Script]:
    return list({cmd[1].sha: cmd[1] for cmd in commands if cmd[0] == "EVALSHA"}.values())


def _without_asking(replies: list[Any], commands: list[Command], asking: set[int]) -> list[Any]:
    out, position = [], 0
    for n in range(len(commands)):
        if n in asking:
            position += 1  # ASKING's +OK
        out.append(replies[position])
        position += 1
    return out


def _redirect(text: str) -> tuple[int, Node]:
    """'MOVED 3999 127.0.0.1:6381' → (3999, ('127.0.0.1', 6381))."""
    _, slot, where = text.split(" ", 2)
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise ResponseError(f"unreadable cluster redirection: {text}")
    return int(slot), (host, int(port))
