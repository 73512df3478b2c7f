"""Run a real Asterisk with callfabric's asterisk/ config set on free loopback ports, when an
`asterisk` binary is available (on PATH, or named by CALLFABRIC_ASTERISK)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

from controller.localstack.kamailio import free_port
from controller.localstack.process import spawn, stop_group

REPO = Path(__file__).resolve().parents[2]
CONFIG_SET = REPO / "asterisk"
SYSTEM_SOUNDS = Path("/usr/share/asterisk/sounds")  # Debian's asterisk-core-sounds-en* packages


def asterisk_binary() -> str | None:
    """The asterisk binary to use, or None (the real-Asterisk suite is then skipped)."""
    named = os.environ.get("CALLFABRIC_ASTERISK")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("asterisk")


def _install_prefix(binary: str) -> Path:
    """/opt/asterisk for /opt/asterisk/sbin/asterisk (where its modules and sounds live)."""
    return Path(binary).resolve().parent.parent


def websocket_client_section(name: str, uri: str) -> str:
    """A websocket_client.conf connection to a websocket agent (per call, subprotocol media)."""
    return (f"[{name}]\ntype = websocket_client\nconnection_type = per_call_config\nuri = {uri}\n"
            "protocols = media\nconnection_timeout = 500\nreconnect_attempts = 2\n")


class Asterisk:
    def __init__(self, workdir: Path | str, *, edge_port: int, binary: str | None = None,
                 ari_user: str = "callfabric", ari_password: str = "ari-secret",
                 ami_user: str = "callfabric", ami_password: str = "ami-secret", name: str = "asterisk",
                 rtp_ports: int = 200, websocket_clients: dict[str, str] | None = None):
        self.binary = binary or asterisk_binary()
        if not self.binary:
            raise RuntimeError("no asterisk binary (PATH or CALLFABRIC_ASTERISK)")
        self.workdir = Path(workdir) / name
        self.etc = self.workdir / "etc"
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.http_port = free_port()
        self.ami_port = free_port()
        rtp = free_port(socket.SOCK_DGRAM)
        self.rtp_start, self.rtp_end = rtp - rtp % 2, rtp - rtp % 2 + rtp_ports  # 2 per RTP stream (RTCP)
        self.edge_port = edge_port
        self.ari_user, self.ari_password = ari_user, ari_password
        self.ami_user, self.ami_password = ami_user, ami_password
        self.log_path = self.workdir / "asterisk.out"
        self.proc: subprocess.Popen | None = None
        # websocket agents: connection id -> ws:// URI (websocket_client.conf)
        self.websocket_clients = dict(websocket_clients or {})

    @property
    def ari_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/ari"

    def ari_node(self, name: str = "media1") -> str:
        """The controller's `ari_nodes` entry for this Asterisk."""
        return f"{name}=http://{self.ari_user}:{self.ari_password}@127.0.0.1:{self.http_port}/ari"

    def ami_node(self, name: str = "media1") -> str:
        return f"{name}=tcp://{self.ami_user}:{self.ami_password}@127.0.0.1:{self.ami_port}"

    def write_config(self) -> None:
        prefix = _install_prefix(self.binary)
        values = {
            "SIP_BIND": f"127.0.0.1:{self.sip_port}", "EDGE_IP": "127.0.0.1",
            "EDGE_URI": f"sip:127.0.0.1:{self.edge_port}", "HTTP_BIND": "127.0.0.1", "HTTP_PORT": str(self.http_port),
            "RTP_START": str(self.rtp_start), "RTP_END": str(self.rtp_end), "AMI_BIND": "127.0.0.1",
            "AMI_PORT": str(self.ami_port), "CONFIG_DIR": str(self.etc),
            "WEBSOCKET_CLIENTS": "\n".join(websocket_client_section(name, uri)
                                           for name, uri in self.websocket_clients.items()),
        }
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.copytree(CONFIG_SET, self.etc, ignore=shutil.ignore_patterns("README.md", "Dockerfile"))
        for path in self.etc.glob("*.conf"):
            text = path.read_text()
            for key, value in values.items():
                text = text.replace(f"@@{key}@@", value)
            path.write_text(text)
        dirs = {name: self.workdir / name for name in ("run", "log", "spool", "lib", "db")}
        for d in [*dirs.values(), dirs["spool"] / "recording"]:  # ARI recordings are written to spool/recording
            d.mkdir(parents=True, exist_ok=True)
        modules = next((p for p in (prefix / "lib" / "asterisk" / "modules", prefix / "lib64" / "asterisk" / "modules",
                                    Path("/usr/lib/asterisk/modules"), Path("/usr/lib/x86_64-linux-gnu/asterisk/modules"))
                        if p.is_dir()), prefix / "lib" / "asterisk" / "modules")
        data = self._data_dir(prefix)
        # The config set's asterisk.conf carries the [options] (the container uses it as it is).
        options = (CONFIG_SET / "asterisk.conf").read_text()
        (self.etc / "asterisk.conf").write_text(
            "[directories]\n"
            f"astetcdir => {self.etc}\nastmoddir => {modules}\nastvarlibdir => {dirs['lib']}\n"
            f"astdbdir => {dirs['db']}\nastkeydir => {dirs['lib']}\nastdatadir => {data}\n"
            f"astagidir => {dirs['lib']}\nastspooldir => {dirs['spool']}\nastrundir => {dirs['run']}\n"
            f"astlogdir => {dirs['log']}\nastsbindir => {Path(self.binary).parent}\n\n" + options)

    def _data_dir(self, prefix: Path) -> Path:
        """Asterisk's data directory: the install's own (documentation, rest-api …) with the
        sounds of Debian's asterisk-core-sounds-en* packages where the install has none."""
        own = next((p for p in (prefix / "var" / "lib" / "asterisk", prefix / "share" / "asterisk",
                                Path("/usr/share/asterisk"), Path("/var/lib/asterisk")) if p.is_dir()), None)
        sounds = next((p for p in ((own / "sounds") if own else None, SYSTEM_SOUNDS)
                       if p is not None and (p / "en").is_dir()), None)
        if own is not None and (sounds is None or sounds == own / "sounds"):
            return own
        data = self.workdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for entry in (own.iterdir() if own else ()):
            if entry.name != "sounds":
                (data / entry.name).symlink_to(entry)
        if sounds is not None:
            (data / "sounds").symlink_to(sounds)
        return data

    def start(self, timeout: float = 60.0) -> "Asterisk":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        env = {**os.environ, "ARI_USER": self.ari_user, "ARI_PASSWORD": self.ari_password,
               "AMI_USER": self.ami_user, "AMI_PASSWORD": self.ami_password}
        log = open(self.log_path, "ab")
        self.proc = spawn([self.binary, "-f", "-vvv", "-n", "-C", str(self.etc / "asterisk.conf")],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asterisk exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ari_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"asterisk ARI not ready after {timeout}s:\n{self.log_tail()}")

    def _ari_ready(self) -> bool:
        auth = b64encode(f"{self.ari_user}:{self.ari_password}".encode()).decode()
        request = urllib.request.Request(f"{self.ari_url}/asterisk/info", headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        stop_group(self.proc, 10)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "Asterisk":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
