"""Automatic pipelining on the decision path: the Redis commands of every call in flight
share one pipeline.

Each operation (a few commands) is queued; one pipeline carries everything queued. Up to
`max_in_flight` pipelines are out at once (Redis answers a connection's pipelines in order), so
a call waiting for its decision does not wait behind another pipeline's round trip; when that
many are out, new operations queue for the next one. At low load an operation goes out at
once; under load, batches grow by themselves and round trips, syscalls and client work per
call fall. Scripts go as EVALSHA, loaded once per connection (ahead of the first pipeline that
uses them on it) and reloaded if Redis answers NOSCRIPT.

The pipelines travel on a dedicated connection that writes RESP and parses replies with
hiredis (redis-py's own parser) directly: measured on this machine, a 4-command pipeline
costs 142 µs of CPU through redis-py's asyncio client and 24 µs this way, and CPU is what
limits calls per second on a small box. Everything else (admin, listings, housekeeping)
uses redis-py."""
from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import hiredis
from hiredis import pack_command as _pack_command
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

Command = tuple[Any, ...]  # ("HSET", key, field, value, …) or ("EVALSHA", Script, keys, args)
Address = Callable[[], Awaitable[tuple[str, int]]]  # where Redis is now (Sentinel: the current master)
# Replies that mean "this server cannot take writes now" (a demoted master, a restart still
# loading its AOF, a cluster slot in transition): the command did not run; retry later.
_UNAVAILABLE = (b"READONLY", b"LOADING", b"MASTERDOWN", b"CLUSTERDOWN", b"TRYAGAIN")


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str = field(init=False, compare=False)  # computed once: it is on every EVALSHA

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


def _encode(arg: Any) -> bytes:
    """One argument as Redis receives it (also how a cluster key is hashed to its slot)."""
    kind = type(arg)
    if kind is str:
        return arg.encode("utf-8", "surrogatepass")
    if kind is bytes:
        return arg
    if kind is int or kind is float:
        return repr(arg).encode()
    raise TypeError(f"cannot send {kind.__name__} to Redis")


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP: hiredis's packer (it runs for every command of every call);
    text it refuses (lone surrogates from JSON escapes) or a wrong type goes the slow way."""
    try:
        return _pack_command(args)
    except (UnicodeError, TypeError):
        return _pack(args)


def _pack(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _RespProtocol(asyncio.Protocol):
    """Replies are matched to pipelines in order: Redis answers in the order it is asked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[tuple[asyncio.Future, int, list[Any]]] = deque()
        self.lost: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        try:
            while (reply := self.parser.gets()) is not False:
                future, expected, replies = self.waiting[0]
                replies.append(reply)
                if len(replies) == expected:
                    self.waiting.popleft()
                    if not future.done():
                        future.set_result(replies)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage from the server, or a reply nobody asked for
            self.transport.abort()
            self.connection_lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("Redis closed the connection")
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError(f"Redis connection lost: {self.lost}"))

    def send(self, payload: bytes, expected: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((future, expected, []))
        self.transport.write(payload)
        return future


class RespConnection:
    """One Redis connection speaking RESP2: write a pipeline, get its replies."""

    def __init__(self, url: str, connect_timeout: float = 2.0, *, address: Address | None = None):
        """`address`: asked at every (re)connection instead of the URL's host and port, and the
        server must then say it is a master (ROLE): a Sentinel-managed Redis moves."""
        self.params = parse_url(url)
        self.connect_timeout = connect_timeout
        self.address = address
        self._protocol: _RespProtocol | None = None

    async def _connect(self) -> _RespProtocol:
        p = self.params
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            if self.address is not None:
                host, port = await self.address()
                _, protocol = await loop.create_connection(_RespProtocol, host, port)
            elif p.get("path"):
                _, protocol = await loop.create_unix_connection(_RespProtocol, p["path"])
            else:
                _, protocol = await loop.create_connection(_RespProtocol, p.get("host", "127.0.0.1"),
                                                           int(p.get("port", 6379)))
            setup: list[tuple] = []
            if p.get("password"):
                setup.append(("AUTH", p["username"], p["password"]) if p.get("username") else ("AUTH", p["password"]))
            if int(p.get("db", 0) or 0):
                setup.append(("SELECT", int(p["db"])))
            if self.address is not None:
                setup.append(("ROLE",))
            if setup:
                replies = await protocol.send(b"".join(pack(c) for c in setup), len(setup))
                for reply in replies:
                    if isinstance(reply, Exception):
                        protocol.transport.abort()
                        raise RedisConnectionError(f"Redis refused the connection setup: {reply}")
                if self.address is not None and not (replies[-1] and replies[-1][0] == b"master"):
                    protocol.transport.abort()
                    raise RedisConnectionError("Redis at the announced master address is not a master (yet)")
        return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    def drop(self, protocol: "_RespProtocol") -> None:
        """Abandon `protocol` (a connection that can no longer be trusted); the next pipeline
        connects again. Everything still waiting on it fails with a connection error."""
        if protocol is self._protocol:
            self._protocol = None
        if protocol.transport is not None:
            protocol.transport.abort()

    @staticmethod
    def write(protocol: "_RespProtocol", commands: list[tuple]) -> asyncio.Future:
        """Write a pipeline on `protocol` (from ready()) now; the future of its replies."""
        return protocol.send(b"".join(pack(c) for c in commands), len(commands))

    async def ready(self) -> "_RespProtocol":
        """The live connection, connected first if there is none."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            try:
                protocol = self._protocol = await self._connect()
            except TimeoutError:
                raise RedisConnectionError(f"Redis did not accept a connection within {self.connect_timeout}s") from None
            except OSError as exc:
                raise RedisConnectionError(f"Redis connection failed: {exc}") from None
        return protocol

    async def execute(self, commands: list[tuple], timeout: float, on_sent: Callable[[], None] | None = None) -> list[Any]:
        """Send a pipeline and wait for its replies; `on_sent` runs once it is in the socket."""
        try:
            async with asyncio.timeout(timeout):
                protocol = self._protocol
                if protocol is None or protocol.lost is not None:
                    protocol = self._protocol = await self._connect()
                replies = protocol.send(b"".join(pack(c) for c in commands), len(commands))
                if on_sent is not None:
                    on_sent()
                return await replies
        except TimeoutError:
            self.close()  # replies may still arrive: this connection can no longer be trusted
            raise RedisConnectionError(f"Redis did not answer {len(commands)} command(s) within {timeout}s") from None
        except OSError as exc:
            self.close()
            raise RedisConnectionError(f"Redis connection failed: {exc}") from None


class Batcher:
    def __init__(self, url: str, max_batch: int = 2000, timeout_s: float = 2.0, linger_s: float = 0.005, *,
                 address: Address | None = None, max_in_flight: int = 4):
        self.connection = RespConnection(url, address=address)
        self._loaded: set[str] = set()
        self._loaded_for: _RespProtocol | None = None  # the connection `_loaded` is true of
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._slot_free = asyncio.Event()
        self._settling: set[asyncio.Task] = set()
        self._init_pipelining(max_batch, timeout_s, linger_s)

    def _init_pipelining(self, max_batch: int, timeout_s: float, linger_s: float) -> None:
        self.max_batch = max_batch
        self.timeout_s = timeout_s  # for a whole pipeline
        self.linger_s = linger_s  # how long a non-urgent operation may wait for company
        self._queue: deque[_Operation] = deque()
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, commands: list[Command], urgent: bool = True) -> list[Any]:
        """Send `commands` (in order, in one pipeline) and return their replies; a reply that
        is an error raises it (the operation failed; its siblings are unaffected).

        Urgent operations (a call waiting for its decision) leave with the next pipeline;
        others (recording a dialog event) wait up to `linger_s` or ride along with the next
        urgent one, so that at low load too they rarely cost a round trip of their own."""
        return raise_errors(await self.submit(commands, urgent).replies)

    async def send(self, commands: list[Command], urgent: bool = True) -> "_Operation":
        """Send `commands` (now, or within `linger_s` when not urgent) and return once they are
        in the socket, ahead of anything sent later on this connection (Redis executes a
        connection's commands in order); the replies come in `operation.replies`. Raises when
        they could not be sent."""
        operation = self.submit(commands, urgent=urgent)
        await asyncio.wait([operation.sent, operation.replies], return_when=asyncio.FIRST_COMPLETED)
        if not operation.sent.done():
            operation.replies.result()  # raises the error that kept it from being sent
        return operation

    def submit(self, commands: list[Command], urgent: bool) -> "_Operation":
        loop = asyncio.get_running_loop()
        operation = _Operation(commands, loop.create_future(), loop.create_future())
        self._queue.append(operation)
        if urgent:
            self._start_flush()
        elif self._timer is None and not self._flushing:
            self._timer = loop.call_later(self.linger_s, self._start_flush)
        return operation

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())

    def close(self) -> None:
        self.connection.close()

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, taken = [], 0
                while self._queue and (not batch or taken + len(self._queue[0].commands) <= self.max_batch):
                    operation = self._queue.popleft()
                    batch.append(operation)
                    taken += len(operation.commands)
                await self._send(batch)
        finally:
            self._flushing = False

    async def _send(self, batch: list["_Operation"]) -> None:
        """Write one pipeline and return once it is in the socket (or has failed); its replies
        are settled by a task of its own, so the next pipeline need not wait for them."""
        while self._in_flight >= self.max_in_flight:
            self._slot_free.clear()
            await self._slot_free.wait()
        scripts = {cmd[1].sha: cmd[1] for op in batch for cmd in op.commands if cmd[0] == "EVALSHA"}
        wire = [self._wire(cmd) for op in batch for cmd in op.commands]
        try:
            protocol = await self.connection.ready()
            if protocol is not self._loaded_for:  # a new connection (maybe a restarted Redis): load again
                self._loaded, self._loaded_for = set(), protocol
            missing = [s for sha, s in scripts.items() if sha not in self._loaded]
            self._loaded.update(s.sha for s in missing)  # later pipelines follow this one on the wire
            replies = self.connection.write(protocol, [("SCRIPT", "LOAD", s.source) for s in missing] + wire)
        except Exception as exc:
            self._fail(batch, exc)
            return
        for op in batch:
            if not op.sent.done():
                op.sent.set_result(None)
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._settle(batch, protocol, replies, len(missing), wire,
                                                                   scripts))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task) -> None:
        self._settling.discard(task)
        self._in_flight -= 1
        self._slot_free.set()

    async def _settle(self, batch: list["_Operation"], protocol: "_RespProtocol", pending: asyncio.Future,
                      loaded: int, wire: list[tuple], scripts: dict[str, Script]) -> None:
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    replies = (await pending)[loaded:]
            except TimeoutError:
                self.connection.drop(protocol)  # replies may still come: this connection can't be trusted
                raise RedisConnectionError(f"Redis did not answer {len(wire)} command(s) within "
                                           f"{self.timeout_s}s") from None
            errors = [r for r in replies if type(r) is ResponseError]
            if any(_is_no_script(r) for r in errors):  # scripts flushed behind our back: load them, run again
                reload = [("SCRIPT", "LOAD", s.source) for s in scripts.values()]
                replies = (await self.connection.execute(reload + wire, self.timeout_s))[len(reload):]
                errors = [r for r in replies if type(r) is ResponseError]
            if any(unavailable(r) for r in errors):  # e.g. a master demoted by a failover: find the new one
                self.connection.drop(protocol)
                replies = [RedisConnectionError(f"Redis cannot take this now: {r}") if unavailable(r) else r
                           for r in replies]
        except Exception as exc:  # whatever happens, no caller may wait forever
            self._fail(batch, exc)
            return
        position = 0
        for op in batch:
            if not op.replies.done():
                op.replies.set_result([NoScriptError(str(r)) if _is_no_script(r) else r
                                       for r in replies[position:position + len(op.commands)]])
            position += len(op.commands)

    @staticmethod
    def _fail(batch: list["_Operation"], exc: BaseException) -> None:
        error = exc if isinstance(exc, RedisError) else RedisError(f"pipeline failed: {exc!r}")
        for op in batch:
            if not op.replies.done():
                op.replies.set_exception(error)

    @staticmethod
    def _wire(cmd: Command) -> tuple:
        if cmd[0] == "EVALSHA":
            _, script, keys, args = cmd
            return ("EVALSHA", script.sha, len(keys), *keys, *args)
        return cmd


@dataclass(slots=True)
class _Operation:
    commands: list[Command]
    sent: asyncio.Future  # done once the commands are in the socket
    replies: asyncio.Future  # their replies; an error reply raises when awaited


def raise_errors(replies: list[Any]) -> list[Any]:
    """Replies of one operation, or the first error among them raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _is_no_script(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")


def unavailable(reply: Any) -> bool:
    """An error reply that says the server cannot serve this now (not that the command is wrong)."""
    return isinstance(reply, ResponseError) and str(reply).encode()[:12].startswith(_UNAVAILABLE)
