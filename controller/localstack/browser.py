"""A real browser for the local stack: headless Chromium (Debian's `chromium`) with a fake
microphone fed from a WAV file, driven over the DevTools protocol (a websocket; aiohttp). Used by
the WebRTC tests and bench/edge_media.py to call through the edge like a user of /phone would.

Chromium on loopback needs: --no-sandbox as root; --allow-loopback-in-peer-connection (else it
gathers no 127.0.0.1 candidate) and host candidates not hidden behind mDNS names (rtpengine
cannot resolve them); a test CA trusted by its key's hash (--ignore-certificate-errors-spki-list).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
import shutil
import struct
import subprocess
import wave
from pathlib import Path
from typing import Any

import aiohttp

from controller.localstack.process import spawn, stop_group

CHROMIUM_BIN = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def spki_hash(cert: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate: what Chromium's
    --ignore-certificate-errors-spki-list takes."""
    pem = subprocess.run(["openssl", "x509", "-pubkey", "-noout", "-in", str(cert)], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    der = base64.b64decode("".join(line for line in pem.splitlines() if not line.startswith("-----")))
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def write_tone_wav(path: Path, seconds: float = 10.0, rate: int = 48000, hz: float = 440.0,
                   amplitude: float = 0.3) -> Path:
    """A mono 16-bit WAV of a steady tone: the fake microphone (Chromium loops it)."""
    frames = int(seconds * rate)
    samples = (int(amplitude * 32767 * math.sin(2 * math.pi * hz * i / rate)) for i in range(frames))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return path


class Chromium:
    def __init__(self, workdir: Path | str, *, microphone: Path | None = None, trusted_certs: tuple[Path, ...] = ()):
        self.workdir = Path(workdir) / "chromium"
        self.profile = self.workdir / "profile"
        self.microphone = microphone
        self.trusted_certs = trusted_certs
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    def command(self) -> list[str]:
        cmd = [CHROMIUM_BIN, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
               "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
               "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
               "--autoplay-policy=no-user-gesture-required"]
        if self.microphone is not None:
            cmd.append(f"--use-file-for-fake-audio-capture={self.microphone}")
        if self.trusted_certs:
            cmd.append("--ignore-certificate-errors-spki-list=" + ",".join(spki_hash(c) for c in self.trusted_certs))
        return cmd + ["about:blank"]

    async def start(self, timeout: float = 30.0) -> "Chromium":
        await asyncio.to_thread(self.profile.mkdir, parents=True, exist_ok=True)
        command = await asyncio.to_thread(self.command)
        self._log = await asyncio.to_thread(open, self.workdir / "chromium.log", "ab")
        self.proc = await asyncio.to_thread(spawn, command, stdout=self._log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.workdir)
        active = self.profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {await self.log_tail()}")
            text = await asyncio.to_thread(lambda: active.read_text() if active.exists() else "")
            if text.strip():
                self.port = int(text.split()[0])
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"chromium did not open its DevTools port in {timeout}s: {await self.log_tail()}")
        self._http = aiohttp.ClientSession()
        async with self._http.get(f"http://127.0.0.1:{self.port}/json") as response:
            targets = await response.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await self._ws.receive_json(timeout=30)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def open(self, url: str) -> None:
        await self.send("Page.enable")
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout=20)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate until truthy (polled every 100 ms); its last value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        value = None
        while loop.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{expression!r} still {value!r} after {timeout}s")

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self.proc is not None:
            await asyncio.to_thread(stop_group, self.proc, 5)
        if self._log is not None:
            self._log.close()

    async def log_tail(self, n: int = 40) -> str:
        path = self.workdir / "chromium.log"
        text = await asyncio.to_thread(lambda: path.read_text(errors="replace") if path.exists() else "")
        return "\n".join(text.splitlines()[-n:])
