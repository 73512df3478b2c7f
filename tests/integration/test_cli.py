"""The `callfabric` command line behaves like one: every client command reads --config (the
API's address and token included) and takes --api/--token after its subcommand, --api with or
without /v1, tables for people and --json for scripts, ISO 8601 local times (epoch ms in
--json), broken pipes end quietly, and every settings error is one line. Against a real
controller process with a real Redis, its tokens given through the environment."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from controller.api.auth import parse_tokens
from controller.cli import api_base, main
from controller.config import load_settings
from controller.localstack.kamailio import free_port
from controller.state.calls import CallStore, now_ms
from tests.support.ha import ControllerProcess

ROOT = Path(__file__).resolve().parents[2]
OPS, VIEWER = "Ops-Secret-0123456789abcdef", "Viewer-Secret-0123456789ab"
ENV_TOKENS = f"ops:read,control,admin:{OPS} viewer:read:{VIEWER}"   # several scopes, several tokens
PHONE_SECRET = "cli-phone-secret-0123456789"
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}                      # children run this checkout


def iso(ms: int) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone().isoformat(timespec="milliseconds")


@pytest.fixture(scope="module")
def controller(redis_server, tmp_path_factory):
    """`callfabric run` whose API tokens come from CALLFABRIC_API_TOKENS (two tokens, one with three scopes)."""
    workdir = tmp_path_factory.mktemp("cli")
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/7"
    proc = ControllerProcess(workdir, "cli", {"redis_url": redis_url, "policy_dir": str(ROOT / "policies"),
                                              "edge_evapi": [f"127.0.0.1:{free_port()}"], "api_tokens": [],
                                              "phone_token_secret": PHONE_SECRET})
    with mock.patch.dict(os.environ, {"CALLFABRIC_API_TOKENS": ENV_TOKENS}):
        proc.start()
    try:
        wait_api(proc)
        # What a client's config file says: where the API is and its tokens (read-only first).
        client = workdir / "callfabric.yaml"
        client.write_text(yaml.safe_dump({"http_listen": proc.http, "redis_url": redis_url,
                                          "api_tokens": [f"viewer:read:{VIEWER}", f"ops:read,control,admin:{OPS}"]}))
        proc.client_config, proc.redis_url = client, redis_url
        yield proc
    finally:
        proc.stop()


def wait_api(proc: ControllerProcess, timeout: float = 30.0) -> None:
    import time
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log_tail()
        try:
            request = urllib.request.Request(f"http://{proc.http}/v1/bans", headers={"Authorization": f"Bearer {OPS}"})
            with urllib.request.urlopen(request, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"controller API not up: {proc.log_tail()}")


@pytest.fixture(autouse=True)
def no_ambient_settings(monkeypatch, tmp_path):
    for name in ("CALLFABRIC_CONFIG", "CALLFABRIC_API", "CALLFABRIC_TOKEN", "CALLFABRIC_API_TOKENS",
                 "CALLFABRIC_REDIS_URL", "CALLFABRIC_HTTP_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)      # no ./callfabric.yaml unless a test writes one


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_api_base_with_or_without_v1():
    assert api_base("http://10.0.0.5:8460") == "http://10.0.0.5:8460/v1"
    assert api_base("http://10.0.0.5:8460/v1/") == "http://10.0.0.5:8460/v1"
    assert api_base("10.0.0.5:8460") == "http://10.0.0.5:8460/v1"
    assert api_base("https://api.example.com/callfabric") == "https://api.example.com/callfabric/v1"


def test_tokens_with_several_scopes_through_the_environment():
    settings = load_settings(None, environ={"CALLFABRIC_API_TOKENS": f"  {ENV_TOKENS}\n"})
    tokens = parse_tokens(settings.api_tokens)
    assert [(t.name, sorted(t.scopes)) for t in tokens] == [("ops", ["admin", "control", "read"]),
                                                            ("viewer", ["read"])]
    comma_separated = load_settings(None, environ={"CALLFABRIC_API_TOKENS": f"ops:admin:{OPS},viewer:read:{VIEWER}"})
    with pytest.raises(ValueError, match="separated by spaces, not commas"):
        parse_tokens(comma_separated.api_tokens)


def test_bans_read_the_config_file_and_take_options_after_the_subcommand(controller, capsys):
    config = str(controller.client_config)
    code, out, err = run(capsys, "bans", "add", "203.0.113.7", "--for", "2h", "--reason", "cli test",
                         "--config", config)
    assert code == 0, err
    assert out.startswith("banned 203.0.113.7 at every edge until 20") and out.rstrip().endswith("cli test")
    code, out, err = run(capsys, "bans", "--config", config, "list")      # before the subcommand too
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split() == ["IP", "ORIGIN", "DETECTOR", "SINCE", "UNTIL", "REASON"]
    assert row.split()[:3] == ["203.0.113.7", "api", "manual"] and "1 ban(s) in force" in out
    code, out, err = run(capsys, "bans", "list", "--json", "--config", config)
    ban = json.loads(out)["bans"][0]
    assert isinstance(ban["expires_ms"], int) and iso(ban["expires_ms"]) in run(capsys, "bans", "list", "--config",
                                                                                config)[1]
    for api in (f"http://{controller.http}", f"http://{controller.http}/v1/"):
        code, out, err = run(capsys, "bans", "remove", "203.0.113.7", "--api", api, "--token", OPS)
        assert code == 0 and out.startswith("203.0.113.7: "), err


def test_phone_token_prints_the_page_address_with_a_token_for_the_callee(controller, capsys):
    from controller.api.phone import check_token
    code, out, err = run(capsys, "phone", "token", "intake", "--ttl", "120", "--config", str(controller.client_config))
    assert code == 0, err
    url, until = out.splitlines()
    assert url.startswith(f"http://{controller.http}/phone#token=") and "calls intake until" in until
    assert check_token(PHONE_SECRET, url.split("#token=", 1)[1]) == "intake"
    code, out, err = run(capsys, "phone", "token", "intake@example.com", "--config", str(controller.client_config))
    assert code == 1 and "to" in err and len(err.strip().splitlines()) == 1


def test_a_config_in_the_working_directory_is_used(controller, capsys, tmp_path):
    (tmp_path / "callfabric.yaml").write_text(controller.client_config.read_text())
    code, out, err = run(capsys, "bans", "list")
    assert code == 0 and "ban(s) in force" in out, err


def test_the_token_with_the_needed_scope_is_picked_and_a_missing_one_is_named(controller, capsys, tmp_path):
    code, out, err = run(capsys, "bans", "list", "--config", str(controller.client_config))  # viewer comes first
    assert code == 0, err
    read_only = tmp_path / "viewer.yaml"
    read_only.write_text(yaml.safe_dump({"http_listen": controller.http, "api_tokens": [f"viewer:read:{VIEWER}"]}))
    code, out, err = run(capsys, "call", "hangup", "nope@x", "--config", str(read_only))
    assert code == 1 and err.strip() == ("error: an API token with the control scope is needed: --token, "
                                         "CALLFABRIC_TOKEN, or api_tokens in the config file")
    code, out, err = run(capsys, "call", "hangup", "nope@x", "--config", str(read_only), "--token", VIEWER)
    assert code == 1 and len(err.splitlines()) == 1 and "403" in err and "lacks the 'control' scope" in err


def test_a_live_call_action_on_an_unknown_call_is_one_line(controller, capsys):
    code, out, err = run(capsys, "call", "--config", str(controller.client_config), "hangup", "nope@x")
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: 40"), err
    populate(controller.redis_url, 1, "decided")   # a call this controller decided, but it has no media node
    code, out, err = run(capsys, "call", "hangup", "decided-0@host", "--config", str(controller.client_config))
    assert code == 1 and "404" in err and "this controller has no media nodes (ari_nodes)" in err, err


def test_an_api_that_is_not_there_is_one_line(capsys):
    code, out, err = run(capsys, "bans", "list", "--api", f"127.0.0.1:{free_port()}", "--token", OPS)
    assert code == 1 and len(err.splitlines()) == 1 and "is the controller running?" in err


def populate(redis_url: str, count: int, prefix: str = "cli") -> list[int]:
    async def go() -> list[int]:
        store = CallStore(redis_url)
        created = []
        for n in range(count):
            at = now_ms() - n * 1000
            await store.create(f"{prefix}-{n}@host", {"state": "routing", "outcome": "agent", "rule": "default",
                                                  "target": "intake", "caller": "+12025550123",
                                                  "dialled": "+18005550101", "created_at_ms": at},
                               live_scopes={}, window_counters=[], at_ms=at, event={"event": "decided", "ts": at})
            created.append(at)
        await store.aclose()
        return created
    return asyncio.run(go())


def test_calls_tables_show_local_iso_times_and_json_keeps_epoch_ms(controller, capsys):
    created = populate(controller.redis_url, 2)
    config = str(controller.client_config)
    code, out, err = run(capsys, "calls", "show", "cli-1@host", "--config", config)
    assert code == 0, err
    assert f"created_at_ms: {iso(created[1])}" in out and f"  {iso(created[1])}  decided" in out
    code, out, err = run(capsys, "calls", "show", "cli-1@host", "--json", "--config", config)
    assert json.loads(out)["call"]["created_at_ms"] == created[1]
    code, out, err = run(capsys, "calls", "list", "--config", config)
    assert code == 0 and iso(created[0]) in out and "cli-0@host" in out, err
    through_api = run(capsys, "calls", "list", "--json", "--api", f"http://{controller.http}", "--token", VIEWER)
    assert {c["call_id"] for c in json.loads(through_api[1])} >= {"cli-0@host", "cli-1@host"}


def cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=CHILD_ENV)


@pytest.mark.parametrize("argv", [("api", "openapi"), ("calls", "list", "--recent", "--json", "--limit", "400")])
def test_a_reader_that_stops_reading_ends_the_command_quietly(controller, argv):
    if "calls" in argv:
        populate(controller.redis_url, 400, "many")     # more than a pipe holds
        argv = (*argv, "--config", str(controller.client_config))
    proc = cli(*argv)
    first = proc.stdout.readline()             # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and first and err == ""


@pytest.mark.parametrize("setting, value, message", [
    ("api_tokens", ["ops:read,control,admin:short"], "at least 16 characters"),
    ("api_tokens", ["ops:read,root:0123456789abcdefgh"], "with scopes among read, control, admin"),
    ("ari_nodes", ["media1=http://10.0.0.5:8088/ari"], "needs the ARI user and password"),
    ("ami_nodes", ["media1=http://u:p@10.0.0.5:5038"], "is not 'name=tcp://user:secret@host:5038'"),
    ("http_listen", "8460", "is not host:port"),
    ("edge_evapi", ["kamailio"], "is not host:port"),
    ("edge_rpc", ["kamailio:8090"], "is not http://host:port/RPC"),
    ("redis_mode", "sharded", "redis_mode"),
    ("redis_outage_decisions", "maybe", "expected one of open, closed, edge"),
    ("log_format", "xml", "expected json or text"),
    ("log_levels", ["callfabric.edge=LOUD"], "expected [module=]"),
])
def test_every_settings_error_is_one_line(tmp_path, capsys, setting, value, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({setting: value}))
    code, out, err = run(capsys, "run", "--config", str(config))
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_the_environment_token_list_that_used_to_crash_run_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "controller.cli", "run"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**CHILD_ENV, "CALLFABRIC_API_TOKENS": "ops:read,control,admin:secret",
                               "CALLFABRIC_POLICY_DIR": str(ROOT / "policies")})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "at least 16 characters" in done.stderr


def test_a_taken_port_is_one_line(redis_server, tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"http_listen": f"127.0.0.1:{taken.getsockname()[1]}",
                                          "redis_url": redis_server.url, "policy_dir": str(ROOT / "policies"),
                                          "edge_evapi": [f"127.0.0.1:{free_port()}"], "log_format": "text",
                                          "log_level": "ERROR"}))
        done = subprocess.run([sys.executable, "-m", "controller.cli", "run", "--config", str(config)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, env=CHILD_ENV)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "http_listen" in done.stderr
