"""`callfabric up`: the whole stack on this machine until Ctrl-C, and `up --check`.

A real `callfabric up` process (Redis, Kamailio, the controller, Prometheus, the stand-in media
node) on free loopback ports from a config file written here; the CLI run from the same folder
finds it; a live call is hung up through the REST API and the caller gets the BYE; Ctrl-C
stops every process it started. With an Asterisk installed, `up --check` runs once with it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from controller.config import load_settings
from controller.localstack.asterisk import asterisk_binary
from controller.localstack.kamailio import free_port
from controller.localstack.sipp import run_uac
from controller.localstack.up import DEFAULT_ASTERISK, UpConfig, load_config, write_config

ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
TOKEN = "Up-Test-Token-0123456789abcdef"
pytestmark = pytest.mark.skipif(any(not (Path("/usr/sbin") / b).exists() and not (Path("/usr/bin") / b).exists()
                                    for b in ("kamailio", "redis-server", "sipp")),
                                reason="kamailio, redis-server and sipp are required")


def around_the_clock_policies(folder: Path) -> Path:
    """The shipped policies without their after-hours rule, which sends every call to the PBX
    outside New York's business hours: the calls here must reach an agent whenever CI runs (the
    rule itself is checked by policies/tests/routing.yaml)."""
    shutil.copytree(ROOT / "policies", folder)
    routing = folder / "20-routing.yaml"
    document = yaml.safe_load(routing.read_text())
    rules = [rule for rule in document["rules"] if rule["name"] != "after-hours-to-pbx"]
    assert len(rules) == len(document["rules"]) - 1, "the shipped routing has no after-hours-to-pbx rule"
    routing.write_text(yaml.safe_dump({**document, "rules": rules}, sort_keys=False))
    return folder


def config_text(tmp_path: Path, media: str = "stand-in") -> str:
    return yaml.safe_dump({
        "x-up": {"sip": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", "prometheus": f"127.0.0.1:{free_port()}",
                 "media": media},
        "policy_dir": str(around_the_clock_policies(tmp_path / "policies")),
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "edge_evapi": [f"127.0.0.1:{free_port()}"], "edge_rpc": [f"http://127.0.0.1:{free_port()}/RPC"],
        "edge_policy_file": str(tmp_path / ".callfabric" / "edge" / "policy.bin"),
        "edge_policy_key_file": str(tmp_path / ".callfabric" / "keys" / "edge-policy.key"),
        "http_listen": f"127.0.0.1:{free_port()}", "api_tokens": [f"ops:read,control,admin:{TOKEN}"],
        "log_format": "text"})


def cli(cwd: Path, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *argv], cwd=cwd, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=timeout)


def leftovers(workdir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(workdir) in line and "ps -eo" not in line]


@pytest.fixture
def stack(tmp_path):
    """`callfabric up` with the stand-in media node, until the test ends (SIGINT, as Ctrl-C)."""
    (tmp_path / "callfabric.yaml").write_text(config_text(tmp_path))
    out = tmp_path / "up.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "up"], cwd=tmp_path, env=CHILD_ENV,
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while "Ctrl-C stops everything" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)
    try:
        yield proc, out, tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_up_runs_the_stack_until_ctrl_c(stack):
    proc, out, folder = stack
    config = load_config(folder / "callfabric.yaml")
    summary = out.read_text()
    sip_host, sip_port = config.sip
    assert f"udp:127.0.0.1:{sip_port}" in summary and f"token: {TOKEN}" in summary and config.api in summary
    assert "media node              stand-in" in summary and "Prometheus" in summary and "(reused)" in summary

    # another terminal: the check, then the CLI finding the stack through ./callfabric.yaml
    checked = cli(folder, "up", "--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "checking it" in checked.stdout and "check: OK" in checked.stdout
    listed = cli(folder, "calls", "list", "--recent", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout), listed.stderr

    # a live call hung up through the API: the caller (SIPp, waiting for it) gets the BYE
    import threading
    result = {}
    caller = threading.Thread(target=lambda: result.update(
        r=run_uac(folder, sip_port, "uac_wait_bye.xml", service="18005550000", timeout_s=30)))
    caller.start()
    call_id, deadline = None, time.monotonic() + 20
    while call_id is None:
        assert time.monotonic() < deadline, "the call never became live"
        live = json.loads(cli(folder, "calls", "list", "--json").stdout or "[]")
        call_id = next((c["call_id"] for c in live if "media_up" in cli(folder, "calls", "trace", c["call_id"]).stdout),
                       None)
        time.sleep(0.3)
    hung = cli(folder, "call", "hangup", call_id)
    assert hung.returncode == 0 and "hangup done" in hung.stdout, hung.stdout + hung.stderr
    caller.join(40)
    assert result["r"].successful == 1, result["r"].output[-2000:]

    # Prometheus scrapes the controller and Kamailio
    host, port = config.prometheus
    deadline, health = time.monotonic() + 40, {}
    while set(health.values()) != {"up"} or len(health) < 2:
        assert time.monotonic() < deadline, health
        with urllib.request.urlopen(f"http://{host}:{port}/api/v1/targets", timeout=5) as response:
            targets = json.loads(response.read())["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        time.sleep(1)
    assert set(health) == {"callfabric", "kamailio"}

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert "stopping everything" in out.read_text()
    assert leftovers(folder / ".callfabric") == []


@pytest.mark.skipif(not (asterisk_binary() or os.access(DEFAULT_ASTERISK, os.X_OK)),
                    reason="no Asterisk installed (CALLFABRIC_ASTERISK, /opt/asterisk/sbin/asterisk, PATH): the "
                           "stand-in media node is checked instead")
def test_up_check_with_a_real_asterisk(tmp_path):
    (tmp_path / "callfabric.yaml").write_text(config_text(tmp_path, media="asterisk"))
    done = cli(tmp_path, "up", "--check", timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert re.search(r"media node +Asterisk", done.stdout) and "live-call action through the REST API" in done.stdout
    assert "transfer_completed" in done.stdout and "check: OK" in done.stdout
    assert leftovers(tmp_path / ".callfabric") == []


def test_the_first_run_writes_a_private_config_the_controller_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "callfabric.yaml"
    write_config(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    config = load_config(path)
    assert isinstance(config, UpConfig) and not config.created and config.media == "auto"
    assert config.sip[1] and config.prometheus[1] and len(config.token) >= 24
    settings = load_settings(path)           # `callfabric run` reads it too: x-up is ignored
    assert settings.http_listen == "127.0.0.1:" + config.api.rsplit(":", 1)[1].split("/")[0]
    assert Path(settings.policy_dir).is_dir() and settings.edge_policy_file.startswith(str(tmp_path))
    load_config(path)
    assert path.read_text() == text          # reused, never rewritten


@pytest.mark.parametrize("edit, message", [
    ({"x-up": {"media": "vm"}}, "x-up.media: 'vm': expected one of auto, asterisk, stand-in"),
    ({"x-up": {"sip": "5060"}}, "is not host:port"),
    ({"api_tokens": ["ops:read:short"]}, "at least 16 characters"),
    ({"policy_dir": "nowhere"}, "nowhere"),
])
def test_config_errors_are_one_line(tmp_path, edit, message):
    data = yaml.safe_load(config_text(tmp_path))
    for key, value in edit.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    (tmp_path / "callfabric.yaml").write_text(yaml.safe_dump(data))
    done = cli(tmp_path, "up", "--check", timeout=60)
    assert done.returncode in (1, 2) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert leftovers(tmp_path / ".callfabric") == []
