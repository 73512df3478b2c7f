"""Run a real rtpengine (Debian's rtpengine-daemon, userspace forwarding: no kernel module) on
loopback: its NG control port for Kamailio's rtpengine module and a private RTP port range.
Used by the tests, the demo and bench/edge_media.py; stopped (process group) at stop()."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from controller.localstack.kamailio import free_port
from controller.localstack.process import spawn, stop_group

RTPENGINE_BIN = shutil.which("rtpengine") or "/usr/bin/rtpengine"


def ng_ping(port: int, timeout: float = 0.3) -> bool:
    """One NG `ping` (bencoded) to 127.0.0.1:port; True when rtpengine answers `pong`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"cookie1 d7:command4:pinge", ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
        return b"pong" in data
    except OSError:
        return False
    finally:
        s.close()


class Rtpengine:
    def __init__(self, workdir: Path | str, *, ports: int = 200, name: str = "rtpengine", log_level: int = 5):
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = ports
        self.log_level = log_level
        self.ng_port = free_port(socket.SOCK_DGRAM)
        self.port_min = 0
        self.log_path = self.workdir / "rtpengine.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def sock(self) -> str:
        """Kamailio's RTPENGINE_SOCK define (with its quotes)."""
        return f'"udp:127.0.0.1:{self.ng_port}"'

    def _range(self) -> int:
        """A start for `ports` consecutive UDP ports that look free now (a random high area)."""
        base = free_port(socket.SOCK_DGRAM)
        base = min(max(base - base % 2, 20000), 60000 - self.ports)
        return base

    def command(self) -> list[str]:
        return [RTPENGINE_BIN, "--config-file=none", "--foreground", "--log-stderr", f"--log-level={self.log_level}",
                "--table=-1", "--interface=127.0.0.1", f"--listen-ng=127.0.0.1:{self.ng_port}",
                f"--port-min={self.port_min}", f"--port-max={self.port_min + self.ports - 1}",
                "--timeout=60", "--delete-delay=0", "--num-threads=2"]

    def start(self, timeout: float = 10.0) -> "Rtpengine":
        self.port_min = self._range()
        self._log = open(self.log_path, "ab")
        self.proc = spawn(self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rtpengine exited with {self.proc.returncode}\n{self.log_tail()}")
            if ng_ping(self.ng_port):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"rtpengine not answering after {timeout}s\n{self.log_tail()}")

    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 5)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Rtpengine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
