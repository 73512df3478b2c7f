"""Test-only evapi peers: a fake decider speaking the decision protocol
(kamailio/PROTOCOL.md) and a frozen client that never reads."""
from __future__ import annotations

import asyncio
import glob
import json
import socket
import threading
import time
from typing import Any, Callable

from controller.localstack.kamailio import Kamailio

# Kamailio's embedded Python (Debian: kamailio-python3-modules), needed for EDGE_POLICY
HAS_APP_PYTHON3 = bool(glob.glob("/usr/lib/*/kamailio/modules/app_python3.so")
                       + glob.glob("/usr/lib/kamailio/modules/app_python3.so"))


# ------------------------------------------------------------------ fake decider
def netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


class NetstringReader:
    """Incremental netstring decoder (evapi framing)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            self.buf = self.buf.lstrip(b" \r\n\t")
            colon = self.buf.find(b":")
            if colon <= 0:
                break
            n = int(self.buf[:colon])
            end = colon + 1 + n
            if len(self.buf) < end + 1:
                break
            out.append(self.buf[colon + 1:end])
            self.buf = self.buf[end + 1:]
        return out


Policy = Callable[[dict], Any]


class FakeDecider:
    """asyncio TCP client on its own thread: reads decide/dialog events, answers decides.

    policy(decide) returns a dict (sent as JSON with "tx" filled in), raw bytes (sent as
    one netstring payload), a ("delay", seconds, answer) tuple, or None (stay silent).
    """

    def __init__(self, port: int, policy: Policy | None = None) -> None:
        self.port = port
        self.policy = policy or (lambda d: {"action": "dispatch", "set": 1})
        self.events: list[dict] = []
        self.decides: list[dict] = []
        self.decide_rx: dict[str, float] = {}     # tx -> time.time() the decide was read
        self.answered: list[str] = []              # tx of every answer written
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.connected = threading.Event()
        self.closed = threading.Event()
        self._writer: asyncio.StreamWriter | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            self.closed.set()
            return
        self._writer = writer
        self.connected.set()
        ns = NetstringReader()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for frame in ns.feed(data):
                    try:
                        ev = json.loads(frame)
                    except ValueError:
                        continue
                    with self.cond:
                        self.events.append(ev)
                        if ev.get("event") == "decide":
                            self.decides.append(ev)
                            self.decide_rx[str(ev.get("tx"))] = time.time()
                        self.cond.notify_all()
                    if ev.get("event") == "decide":
                        asyncio.ensure_future(self._answer(ev))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            writer.close()

    async def _answer(self, ev: dict) -> None:
        ans = self.policy(ev)
        if isinstance(ans, tuple) and ans and ans[0] == "delay":
            await asyncio.sleep(ans[1])
            ans = ans[2]
        if ans is None or self._writer is None:
            return
        if isinstance(ans, (bytes, bytearray)):
            payload = bytes(ans)
        else:
            ans = dict(ans)
            ans.setdefault("tx", ev["tx"])
            payload = json.dumps(ans).encode()
        self._writer.write(netstring(payload))
        await self._writer.drain()
        with self.cond:
            self.answered.append(str(ev.get("tx")))

    def send_raw(self, data: bytes) -> None:
        async def _send() -> None:
            assert self._writer is not None
            self._writer.write(data)
            await self._writer.drain()
        asyncio.run_coroutine_threadsafe(_send(), self.loop).result(5)

    def start(self, timeout: float = 5.0) -> "FakeDecider":
        self.thread.start()
        if not self.connected.wait(timeout):
            raise RuntimeError("decider could not connect to evapi")
        return self

    def stop(self) -> None:
        if self.loop.is_running():
            def _close() -> None:
                if self._writer is not None:
                    self._writer.close()
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
            self.loop.call_soon_threadsafe(_close)
        self.thread.join(timeout=5)

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 5.0, count: int = 1,
                 at_least: int | None = None) -> list[dict]:
        """The events matching `pred` once there are `count` of them; fewer by the deadline
        fails (AssertionError), unless the caller says how few it accepts (`at_least`)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [e for e in self.events if pred(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    if at_least is not None and len(found) >= at_least:
                        return found
                    raise AssertionError(f"{len(found)} of {count} expected events within {timeout}s: {found}")
                self.cond.wait(left)

    def dialog_events(self, call_id: str | None = None) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e.get("event") == "dialog"
                    and (call_id is None or e.get("call_id") == call_id)]


def wait_clients(k: Kamailio, n: int, timeout: float = 5.0) -> None:
    """Wait until Kamailio counts n evapi clients (connection-new ran)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = k.http_get("/health")
        try:
            if json.loads(body).get("evapi_clients") == n:
                return
        except ValueError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"kamailio did not see {n} evapi client(s): {k.http_get('/health')}")


class FrozenClient:
    """Connects to evapi and never reads (a stalled controller, in-process)."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))

    def stop(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
