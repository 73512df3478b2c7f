"""What operators run: `callfabric demo`, `callfabric calls list|show`, `callfabric config describe`."""
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.cli import main
from controller.localstack.asterisk import asterisk_binary
from controller.state.calls import CallStore, now_ms

ROOT = Path(__file__).resolve().parents[2]
needs_stack = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("kamailio", "sipp", "redis-server")),
    reason="kamailio, sipp and redis-server binaries are required")


@pytest.fixture(scope="module")
def demo_run():
    """`callfabric demo`, run once for the tests that read what it printed."""
    done = subprocess.run([sys.executable, "-m", "controller.cli", "demo"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    leftovers = subprocess.run(["pgrep", "-f", "callfabric-demo-"], capture_output=True, text=True)
    return done, leftovers.stdout.strip()


@needs_stack
def test_demo_places_calls_and_exits_zero(demo_run):
    done, leftovers = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    calls = 5 if asterisk_binary() else 4  # with Asterisk: a voice call with real RTP too
    assert f"{calls}/{calls} calls OK: every call did what the policy says" in out
    assert "billing received INVITE with X-Callfabric-Agent: billing, X-Department: billing" in out
    assert "caller got: SIP/2.0 403 Destination Blocked" in out
    assert 'callfabric_decisions_total{outcome="reject",rule="block-premium"} 1.0' in out
    assert leftovers == "", "the demo left processes behind"


@needs_stack
@pytest.mark.skipif(asterisk_binary() is None, reason="no asterisk binary (CALLFABRIC_ASTERISK or PATH): the demo's "
                    "voice call with real RTP is not placed, so what the agent and the fork heard cannot be checked")
def test_demo_voice_call_reaches_the_agent_and_the_fork(demo_run):
    done, _ = demo_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "agent heard" in done.stdout and "the STT fork received" in done.stdout


@needs_stack
def test_ctrl_c_stops_everything_the_demo_started():
    demo = subprocess.Popen([sys.executable, "-m", "controller.cli", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        seen = ""
        deadline = time.monotonic() + 60
        while "[1]" not in seen and time.monotonic() < deadline:  # the stack is up, calls start
            seen += demo.stdout.readline()
        assert "[1]" in seen, seen
        started = subprocess.run(["pgrep", "-f", "callfabric-demo-"], capture_output=True, text=True).stdout.split()
        assert started, "the demo's processes should be running"
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
    leftovers = subprocess.run(["pgrep", "-f", "callfabric-demo-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"Ctrl-C left processes behind: {leftovers.stdout}"


def populate(redis_url: str) -> None:
    async def go():
        store = CallStore(redis_url)
        record = {"state": "routing", "outcome": "agent", "rule": "billing-line", "target": "billing",
                  "caller": "+12025550123", "dialled": "+18005550101", "created_at_ms": now_ms(),
                  "policy_version": "abc123abc123"}
        await store.create("live-1@host", record, live_scopes={}, window_counters=[], at_ms=now_ms(),
                           event={"event": "decided", "ts": now_ms(), "rule": "billing-line"})
        await store.create("done-1@host", {**record, "rule": "default", "target": "intake"}, live_scopes={},
                           window_counters=[], at_ms=now_ms(), event={"event": "decided", "ts": now_ms()})
        await store.transition("done-1@host", "ended", {"end_reason": "bye-caller"},
                               {"event": "ended", "ts": now_ms(), "reason": "bye-caller"})
        await store.aclose()
    asyncio.run(go())


def test_calls_list_and_show(redis_url, monkeypatch, capsys):
    populate(redis_url)
    monkeypatch.setenv("CALLFABRIC_REDIS_URL", redis_url)
    assert main(["calls", "list"]) == 0
    out = capsys.readouterr().out
    assert "live-1@host" in out and "done-1@host" not in out and "billing-line" in out and "1 live call(s)" in out
    assert main(["calls", "list", "--recent"]) == 0
    out = capsys.readouterr().out
    assert "live-1@host" in out and "done-1@host" in out and "ended" in out
    assert main(["calls", "show", "done-1@host", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["call"]["state"] == "ended" and [e["event"] for e in shown["timeline"]] == ["decided", "ended"]
    assert main(["calls", "show", "done-1@host"]) == 0
    out = capsys.readouterr().out
    assert "end_reason: bye-caller" in out and "ended" in out
    assert main(["calls", "show", "nope"]) == 1
    assert "no call 'nope'" in capsys.readouterr().err


def test_calls_list_with_redis_down_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("CALLFABRIC_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["calls", "list"]) == 1
    assert "error: Redis at redis://127.0.0.1:1/0" in capsys.readouterr().err


def test_config_describe(capsys):
    assert main(["config", "describe"]) == 0
    out = capsys.readouterr().out
    assert "redis_url  (CALLFABRIC_REDIS_URL, default 'redis://127.0.0.1:6379/0')" in out


def test_run_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("nonsense: 1\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "unknown setting 'nonsense'" in capsys.readouterr().err


def test_calls_trace(redis_url, monkeypatch, capsys):
    populate(redis_url)
    monkeypatch.setenv("CALLFABRIC_REDIS_URL", redis_url)
    assert main(["calls", "trace", "done-1@host"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("done-1@host: started 20")     # ISO 8601, local time
    assert lines[1].startswith("+   0.000s  decided") and "ended" in lines[2] and '"reason": "bye-caller"' in lines[2]
    assert main(["calls", "trace", "nope"]) == 1

    async def written_out_of_time_order():  # the media plane writes its step after the edge's later one
        store = CallStore(redis_url)
        await store.create("trace-1@host", {"state": "routing", "outcome": "agent", "rule": "r", "created_at_ms": 1000},
                           live_scopes={}, window_counters=[], at_ms=1000, event={"event": "decided", "ts": 1000})
        await store.transition("trace-1@host", "answered", {}, {"event": "answered", "ts": 1300})
        await store.append_event("trace-1@host", {"event": "media_up", "ts": 1200})
        await store.append_event("trace-1@host", {"event": "note"})  # no time: stays behind media_up
        await store.aclose()
    asyncio.run(written_out_of_time_order())
    capsys.readouterr()
    assert main(["calls", "trace", "trace-1@host"]) == 0
    steps = [(line[:10].strip(), line[12:].split()[0]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert steps == [("+   0.000s", "decided"), ("+   0.200s", "media_up"), ("", "note"), ("+   0.300s", "answered")]
