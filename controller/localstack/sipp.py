"""Real SIPp processes: UAS stand-ins for media nodes and agents, UAC callers (tests,
`callfabric demo`, benchmarks).

Scenarios live in scenarios/ next to this file.  A UAS records every SIP message it receives with
-trace_msg into its own message file; `invites()` parses the INVITEs back so tests can
look at the headers the media node saw.  Every process is bounded (-timeout for UACs)
and killed at stop()/teardown.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from controller.localstack.kamailio import free_port
from controller.localstack.process import spawn

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SIPP_BIN = shutil.which("sipp") or "/usr/bin/sipp"
SIPP_PCAPS = Path("/usr/share/sip-tester")  # shipped with SIPp: dtmf_2833_<digit>.pcap (RFC 4733), g711a.pcap


def _render(template: str, workdir: Path, values: dict[str, str]) -> Path:
    text = (SCENARIOS / template).read_text()
    for key, val in values.items():
        text = text.replace(f"@@{key}@@", val)
    missing = re.findall(r"@@[A-Z_]+@@", text)
    if missing:
        raise ValueError(f"unfilled placeholder in {template}: {missing}")
    out = workdir / f"{Path(template).stem}-{uuid.uuid4().hex[:6]}.xml"
    out.write_text(text)
    return out


def write_rtp_pcap(path: Path | str, payloads: list[bytes], payload_type: int = 0, ptime_ms: int = 20) -> Path:
    """A pcap of one RTP stream (Ethernet/IPv4/UDP, one packet per payload every `ptime_ms`)
    for SIPp's play_pcap_audio, which rewrites the addresses and ports as it sends."""
    path = Path(path)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # pcap header, link type Ethernet
    ssrc, samples = 0x0CA11FAB, 8 * ptime_ms
    for n, payload in enumerate(payloads):
        rtp = struct.pack("!BBHII", 0x80, payload_type | (0x80 if n == 0 else 0), n & 0xFFFF, n * samples, ssrc)
        udp = struct.pack("!HHHH", 6000, 6002, 8 + len(rtp) + len(payload), 0) + rtp + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
        frame = b"\x00" * 12 + b"\x08\x00" + ip
        seconds, micros = divmod(n * ptime_ms * 1000, 1_000_000)
        out.append(struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


def _headers_block(headers: dict[str, str] | list[tuple[str, str]] | None) -> str:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    return "\n".join(f"      {k}: {v}" for k, v in items)


def parse_messages(text: str) -> list[tuple[str, str]]:
    """Split a SIPp -trace_msg file into (direction, raw message), direction 'in'/'out'."""
    out = []
    for block in re.split(r"(?:^|\n)-{5,}[^\n]*\n", text):
        m = re.match(r"\s*\w+ message (received|sent)[^\n]*\n+", block)
        if not m:
            continue
        raw = block[m.end():].strip("\n")
        if re.match(r"^[A-Z]+ |^SIP/2.0", raw):
            out.append(("in" if m.group(1) == "received" else "out", raw))
    return out


@dataclass
class SipMessage:
    first_line: str
    headers: list[tuple[str, str]]
    raw: str
    direction: str = "in"

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_sip(raw: str, direction: str = "in") -> SipMessage:
    head = raw.replace("\r\n", "\n").split("\n\n", 1)[0]
    lines = head.split("\n")
    hdrs = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs.append((k.strip(), v.strip()))
    return SipMessage(lines[0].strip(), hdrs, raw, direction)


class SippUAS:
    """A SIPp UAS on a free loopback UDP port, running until stop()."""

    def __init__(self, workdir: Path | str, scenario: str = "uas_answer.xml", name: str | None = None,
                 extra_args: list[str] | None = None, values: dict[str, str] | None = None, ip: str = "127.0.0.1"):
        self.scenario = scenario
        self.ip = ip  # any 127.0.0.0/8 address: a destination the edge tells apart by its address
        self.extra_args = list(extra_args or [])  # e.g. ["-mp", port, "-rtp_echo"]: echo the RTP it gets
        self.name = name or Path(scenario).stem
        self.workdir = Path(workdir) / f"uas-{self.name}-{uuid.uuid4().hex[:4]}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        # the scenario's @@PLACEHOLDERS@@ (e.g. uas_auth.xml's credentials), filled in a copy
        self.scenario_path = _render(scenario, self.workdir, values) if values else SCENARIOS / scenario
        self.port = free_port(socket.SOCK_DGRAM)
        self.msg_file = self.workdir / "messages.log"
        self.out_file = self.workdir / "sipp.out"
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self, attempts: int = 5) -> "SippUAS":
        """Start SIPp on a free port; another process may take that port between our check
        and SIPp's bind (it then exits with "Unable to bind"): try again on another one."""
        for _ in range(attempts):
            if self._start_once():
                return self
            self.port = free_port(socket.SOCK_DGRAM)
        raise RuntimeError(f"sipp UAS could not bind a port in {attempts} attempts: {self._output()}")

    def _start_once(self) -> bool:
        self._out = open(self.out_file, "wb")
        self.proc = spawn(
            [SIPP_BIN, "-sf", str(self.scenario_path), "-i", self.ip,
             "-p", str(self.port), "-t", "u1", "-nostdin", "-trace_msg",
             "-message_file", str(self.msg_file), "-max_recv_loops", "1000", *self.extra_args],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir)
        # SIPp binds before it starts its loop; wait until the port is taken
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._out.close()
                if "Unable to bind" in self._output():
                    return False
                raise RuntimeError(f"sipp UAS died: {self._output()}")
            if _holds_udp_port(self.proc.pid, self.port):
                return True
            time.sleep(0.02)
        raise RuntimeError("sipp UAS did not bind")

    def _output(self) -> str:
        text = self.out_file.read_text(errors="replace")
        return text if len(text) <= 2000 else text[:600] + " … " + text[-1400:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None

    def __enter__(self) -> "SippUAS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def messages(self) -> list[SipMessage]:
        try:
            text = self.msg_file.read_text(errors="replace")
        except OSError:
            return []
        return [parse_sip(raw, d) for d, raw in parse_messages(text)]

    def invites(self) -> list[SipMessage]:
        """INVITEs received (retransmissions included)."""
        return self.requests("INVITE")

    def requests(self, method: str) -> list[SipMessage]:
        return [m for m in self.messages()
                if m.direction == "in" and m.first_line.startswith(method + " ")]

    def call_ids(self, method: str = "INVITE") -> set[str]:
        return {c for m in self.requests(method) for c in m.header("Call-ID")}


@dataclass
class UacResult:
    rc: int
    successful: int
    failed: int
    elapsed: float
    messages: list[SipMessage] = field(default_factory=list)
    output: str = ""

    def responses(self) -> list[SipMessage]:
        return [m for m in self.messages
                if m.direction == "in" and m.first_line.startswith("SIP/2.0")]

    def status_lines(self) -> list[str]:
        return [m.first_line for m in self.responses()]


def _holds_udp_port(pid: int, port: int) -> bool:
    """Whether process `pid` has a UDP socket bound to `port` (not just anyone: another
    process may hold the port, and SIPp then exits with "Unable to bind")."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def run_uac(
    workdir: Path | str,
    target_port: int,
    scenario: str = "uac_call.xml",
    *,
    calls: int = 1,
    rate: int = 10,
    limit: int = 50,
    timeout_s: int = 20,
    service: str = "agent",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    hold_ms: int = 200,
    code: int | None = None,
    from_user: str = "+15551230000",
    source_ip: str = "127.0.0.1",
    source_port: int = 0,
    number_per_call: bool = False,
    dtmf: str = "",
    audio: str = "",
) -> UacResult:
    """Run a SIPp UAC to completion (bounded by -m and -timeout); return counts.

    `source_ip`: any 127.0.0.0/8 address (calls from several "sources" on one machine);
    `source_port`: its SIP port (0: a free one), e.g. a media node's known one;
    `number_per_call`: each call dials `service` followed by its call number (1, 2, …);
    `dtmf`: digits (0-9) the caller presses (uac_media.xml: RFC 4733 events from SIPp's pcaps, which
    share one SSRC and carry sequence numbers rising 1-9 then 0: a receiver drops a key whose
    numbers go back, so give digits in that order); `audio`: a pcap of PCMA speech the caller
    plays from the start (uac_media.xml; SIPp's g711a.pcap is 7 s of it)."""
    order = [("1234567890".index(d) if d in "1234567890" else -1) for d in dtmf]
    if -1 in order or order != sorted(set(order)):
        raise ValueError(f"dtmf {dtmf!r}: distinct digits 0-9 in the order 1…9, 0 (see the docstring)")
    workdir = Path(workdir) / f"uac-{uuid.uuid4().hex[:6]}"
    workdir.mkdir(parents=True, exist_ok=True)
    values = {"EXTRA_HEADERS": _headers_block(headers), "HOLD_MS": str(hold_ms), "FROM_USER": from_user,
              "CODEC": "PCMA" if audio else "PCMU", "CODEC_PT": "8" if audio else "0",
              "AUDIO": f'  <nop><action><exec play_pcap_audio="{audio}"/></action></nop>' if audio else "",
              "DTMF_PCAPS": "\n".join(f'  <nop><action><exec play_pcap_audio="{SIPP_PCAPS}/dtmf_2833_{d}.pcap"/>'
                                      f'</action></nop>\n  <pause milliseconds="400"/>' for d in dtmf)}
    if code is not None:
        values["CODE"] = str(code)
    xml = _render(scenario, workdir, values)
    # an empty placeholder line would end the header block
    text = re.sub(r"\n[ \t]*\n(?=[ \t]+[A-Z][\w-]*:)", "\n", xml.read_text())
    if number_per_call:
        text = text.replace("sip:[service]@", "sip:[service][call_number]@")
    xml.write_text(text)
    stat = workdir / "stat.csv"
    msgs = workdir / "messages.log"
    t0 = time.monotonic()
    for _ in range(5):  # another process may take the free port before SIPp binds it: try another
        cmd = [SIPP_BIN, f"127.0.0.1:{target_port}", "-sf", str(xml), "-s", service,
               "-i", source_ip, "-p", str(source_port or free_port(socket.SOCK_DGRAM)), "-t", "u1",
               "-m", str(calls), "-r", str(rate), "-l", str(limit),
               "-timeout", f"{timeout_s}s", "-timeout_error", "-nostdin",
               "-trace_stat", "-stf", str(stat), "-fd", "1",
               "-trace_msg", "-message_file", str(msgs),
               "-recv_timeout", "15000", "-max_recv_loops", "1000"]
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, cwd=workdir)
        try:
            out, _ = proc.communicate(timeout=timeout_s + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        if b"Unable to bind main socket" not in (out or b""):
            break
    elapsed = time.monotonic() - t0
    ok, failed = _read_stat(stat)
    try:
        mtext = msgs.read_text(errors="replace")
    except OSError:
        mtext = ""
    parsed = [parse_sip(raw, d) for d, raw in parse_messages(mtext)]
    return UacResult(proc.returncode, ok, failed, elapsed, parsed,
                     (out or b"").decode(errors="replace")[-3000:])


def _read_stat(path: Path) -> tuple[int, int]:
    try:
        rows = list(csv.reader(path.read_text().splitlines(), delimiter=";"))
    except OSError:
        return 0, 0
    if len(rows) < 2:
        return 0, 0
    head, last = rows[0], rows[-1]
    idx = {name: i for i, name in enumerate(head)}

    def val(name: str) -> int:
        i = idx.get(name)
        try:
            return int(last[i]) if i is not None else 0
        except (ValueError, IndexError):
            return 0
    return val("SuccessfulCall(C)"), val("FailedCall(C)")
