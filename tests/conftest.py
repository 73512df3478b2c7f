"""Shared fixtures. Every async test runs with a guard that fails it when the event loop
thread does blocking work (file I/O, sleep, subprocess, DNS) inside a loop callback."""
from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

_BLOCKING_EVENTS = {"open", "time.sleep", "subprocess.Popen", "os.system", "socket.gethostbyname",
                    "socket.gethostbyaddr", "socket.getaddrinfo"}
_ALLOWED_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".json")  # lazy imports (and jsonschema's bundled metaschemas)


class BlockingGuard:
    """sys.audit hook: records blocking calls made on the loop thread while a loop runs."""

    def __init__(self) -> None:
        self.armed = False
        self.loop_thread: int | None = None
        self.violations: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed or event not in _BLOCKING_EVENTS or threading.get_ident() != self.loop_thread:
            return
        if asyncio._get_running_loop() is None:  # sync test code and fixtures may block
            return
        if event == "open":
            path = str(args[0]) if args else ""
            if path.endswith(_ALLOWED_SUFFIXES) or path.endswith(".zip") or ".dist-info/" in path \
                    or "/zoneinfo/" in path or path.startswith("/proc/"):  # import machinery, package metadata
                return
        if event == "socket.getaddrinfo" and args and _is_numeric_host(args[0]):
            return
        self.violations.append(f"{event}{args[:2]!r}")


def _is_numeric_host(host: object) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
        return True
    except ValueError:
        return False


_GUARD = BlockingGuard()
sys.addaudithook(_GUARD)

if sys.version_info < (3, 12):  # time.sleep raises its audit event from 3.12 on
    _real_sleep = time.sleep

    def _audited_sleep(seconds: float) -> None:
        sys.audit("time.sleep", seconds)
        _real_sleep(seconds)

    time.sleep = _audited_sleep


@pytest.fixture(autouse=True)
def no_blocking_on_loop(request):
    """Arm the guard for coroutine tests; fail the test if the loop thread blocked."""
    if not asyncio.iscoroutinefunction(getattr(request, "function", None)):
        yield
        return
    _GUARD.violations.clear()
    _GUARD.loop_thread = threading.get_ident()
    _GUARD.armed = True
    try:
        yield _GUARD
    finally:
        _GUARD.armed = False
    if _GUARD.violations:
        pytest.fail("blocking call(s) on the event loop: " + "; ".join(_GUARD.violations[:5]))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session, on a free loopback port."""
    from controller.localstack.redis import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied for this test."""
    import socket as _socket

    with _socket.create_connection(("127.0.0.1", redis_server.port), timeout=2) as s:
        s.sendall(b"FLUSHALL\r\n")
        assert s.recv(16).startswith(b"+OK")
    return redis_server.url
