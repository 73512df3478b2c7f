"""The decision channel to one Kamailio: a TCP connection to its evapi socket, reconnected
with backoff. It reads continuously (a controller that stops reading stalls the edge's evapi
dispatcher, Kamailio issue 4603) and answers each decide from its own task, with a bound on
the decisions in progress: beyond it, requests get the edge fallback at once."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time

from controller.edge import protocol
from controller.edge.decisions import EdgeDecisions
from controller.edge.recorder import EdgeRecorder
from controller.metrics import Metrics

log = logging.getLogger("callfabric.edge")
MAX_PENDING_WRITE_BYTES = 4 * 1024 * 1024  # an edge that stops reading our answers is dropped
HEARTBEAT = protocol.netstring(b'{"event":"alive"}')
HEARTBEAT_S = 1.0


def _ack_now(sock) -> None:
    """Acknowledge what we just read at once. Kamailio writes events with Nagle's algorithm
    on: without an immediate ACK, Linux delays ours up to 40 ms and every event queued behind
    it waits that long (measured: +50 ms setup p50 at 600 CPS). Quick-ACK mode does not
    stick, so it is re-armed after every read."""
    if sock is not None and _TCP_QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class EdgeChannel:
    def __init__(self, host: str, port: int, decisions: EdgeDecisions, recorder: EdgeRecorder, metrics: Metrics, *,
                 max_in_flight: int = 2000, reconnect_max_s: float = 5.0):
        self.host, self.port = host, port
        self.name = f"{host}:{port}"
        self.decisions = decisions
        self.recorder = recorder
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.reconnect_max_s = reconnect_max_s
        self.connected = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._outgoing: list[bytes] = []
        self._stopping = False

    async def run(self) -> None:
        """Connect, serve, reconnect with jittered exponential backoff; until stop() or cancelled."""
        delay = 0.05
        while not self._stopping:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                log.warning("edge %s: cannot connect (%s); retrying in %.2fs", self.name, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(self.reconnect_max_s, delay * 2)
                continue
            if self._stopping:  # stop() came while connecting
                writer.close()
                return
            delay = 0.05
            log.info("edge %s: connected", self.name)
            try:
                await self._serve(reader, writer)
            finally:
                self._writer = None
                self._outgoing = []
                self.connected.clear()
                self.metrics.edge_connected.labels(self.name).set(0)
                writer.close()
            if not self._stopping:
                log.warning("edge %s: connection lost; reconnecting", self.name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.connected.set()
        self.metrics.edge_connected.labels(self.name).set(1)
        decoder = protocol.NetstringDecoder()
        sock = writer.get_extra_info("socket")
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(writer))
        try:
            await self._read(reader, decoder, sock)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, writer: asyncio.StreamWriter) -> None:
        """Tell the edge every HEARTBEAT_S that this controller is alive and reading: a breaker
        the edge opened while it was stalled (frozen, overloaded) closes at once, without
        waiting for a call to probe it."""
        while not writer.is_closing():
            if writer.transport.get_write_buffer_size() == 0:
                writer.write(HEARTBEAT)
            await asyncio.sleep(HEARTBEAT_S)

    async def _read(self, reader: asyncio.StreamReader, decoder: protocol.NetstringDecoder, sock) -> None:
        while True:
            try:
                data = await reader.read(256 * 1024)
            except (ConnectionError, OSError) as exc:
                log.warning("edge %s: read failed: %s", self.name, exc)
                return
            if not data:
                return
            _ack_now(sock)
            try:
                frames = decoder.feed(data)
            except protocol.FramingError as exc:
                self.metrics.decision_errors.labels("framing").inc()
                log.error("edge %s: broken stream, resetting the connection: %s", self.name, exc)
                return
            received = time.perf_counter()
            for frame in frames:
                self._dispatch(frame, received)

    def _dispatch(self, frame: bytes, received: float) -> None:
        try:
            message = json.loads(frame)
        except ValueError:
            self.metrics.decision_errors.labels("bad-json").inc()
            log.warning("edge %s: frame is not JSON: %r", self.name, frame[:80])
            return
        if not isinstance(message, dict):
            self.metrics.decision_errors.labels("bad-json").inc()
            return
        kind = message.get("event")
        if kind == "decide":
            if len(self._tasks) >= self.max_in_flight:
                self.metrics.decision_errors.labels("overload").inc()
                answer = self.decisions.without_decision(message, "overload")
                if answer is not None:
                    self._send(answer)
                return
            self._spawn(self._answer(message, received))
        elif kind in ("dialog", "decided", "fallback", "ban", "auth"):
            self.recorder.submit(message)  # applied in order, in batches
        else:
            log.debug("edge %s: ignored event %r", self.name, str(kind)[:32])

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        self.metrics.edge_in_flight.inc()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.metrics.edge_in_flight.dec()
        if not task.cancelled() and task.exception() is not None:
            log.error("edge %s: event handler failed", self.name, exc_info=task.exception())

    async def _answer(self, message: dict, received: float) -> None:
        answer = await self.decisions.decide(message, received)
        if answer is not None:
            self._send(answer)
            self.metrics.decision_seconds.observe(time.perf_counter() - received)

    def _send(self, answer: dict) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            self.metrics.decision_errors.labels("disconnected").inc()
            return
        payload = protocol.encode(answer)
        if len(payload) > protocol.MAX_ANSWER_BYTES:
            self.metrics.decision_errors.labels("answer-too-long").inc()
            payload = protocol.encode(protocol.fallback_answer(answer["tx"], "answer-too-long"))
        if writer.transport.get_write_buffer_size() > MAX_PENDING_WRITE_BYTES:
            log.error("edge %s: not reading our answers; dropping the connection", self.name)
            writer.transport.abort()
            return
        # Answers ready in the same loop iteration leave in one write (one syscall).
        self._outgoing.append(payload)
        if len(self._outgoing) == 1:
            asyncio.get_running_loop().call_soon(self._write_out, writer)

    def _write_out(self, writer: asyncio.StreamWriter) -> None:
        payloads, self._outgoing = self._outgoing, []
        if not writer.is_closing():
            writer.writelines(payloads)

    async def drain(self) -> None:
        """Wait for the events being handled (used at shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Take no more calls from this edge (graceful drain): answer the events in progress,
        then close the connection and stay away. Kamailio sends the next calls to another
        controller (or applies its fallback when none is left)."""
        self._stopping = True
        while self._tasks:  # events read meanwhile are answered too
            await self.drain()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            self._write_out(writer)
            writer.close()
            log.info("edge %s: disconnected (draining)", self.name)
