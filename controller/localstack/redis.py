"""A private redis-server on a free loopback port (no persistence unless asked)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from controller.localstack.kamailio import free_port
from controller.localstack.process import spawn, stop_group

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir: Path | str, *, appendonly: bool = False, name: str = "redis",
                 extra_args: list[str] | None = None, sentinel_of: tuple[str, int] | None = None):
        """`extra_args`: more redis-server options (cluster mode, replicaof); `sentinel_of`:
        run as a Sentinel watching (master name, master port) on 127.0.0.1."""
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(socket.SOCK_STREAM)
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])
        self.sentinel_of = sentinel_of
        self.log_path = self.workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
               "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
               "--logfile", str(self.log_path), "--daemonize", "no", "--protected-mode", "yes", *self.extra_args]
        if self.sentinel_of is not None:  # a Sentinel rewrites its config file: it needs one of its own
            config = self.workdir / "sentinel.conf"
            name, master_port = self.sentinel_of
            config.write_text(f"sentinel monitor {name} 127.0.0.1 {master_port} 1\n"
                              f"sentinel down-after-milliseconds {name} 1000\n"
                              f"sentinel failover-timeout {name} 5000\n")
            cmd = [REDIS_BIN, str(config), "--sentinel", "--bind", "127.0.0.1", "--port", str(self.port),
                   "--dir", str(self.workdir), "--logfile", str(self.log_path), "--daemonize", "no"]
        return cmd

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.proc = spawn(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server not ready after {timeout}s: {self.log_tail()}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_group(self.proc, 5)

    def restart(self, timeout: float = 10.0) -> "RedisServer":
        """Stop (SIGTERM: with AOF on, Redis fsyncs before it exits) and start again on the same
        port and directory."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
