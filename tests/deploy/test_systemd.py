"""deploy/systemd: the units for one server without containers agree with each other and with
the repository: systemd itself accepts them (systemd-analyze verify, with the clone where the
units expect /opt/callfabric), the controller's config and secrets pass its own checks, the
addresses line up (evapi, JSON-RPC, the edge policy file, Redis, Prometheus' targets), and
Prometheus accepts its config (promtool)."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller.config import check_settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
SERVICES = sorted(UNITS.glob("*.service"))


def unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    return sections


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def test_every_service_belongs_to_the_stack_and_runs_something_shipped():
    names = {p.name for p in SERVICES}
    assert names == {"callfabric-redis.service", "callfabric-kamailio.service", "callfabric-controller.service",
                     "callfabric-prometheus.service", "callfabric-asterisk.service"}
    target = unit(UNITS / "callfabric.target")
    assert set(target["Unit"]["Wants"].split()) == names - {"callfabric-asterisk.service"}
    for path in SERVICES:
        sections = unit(path)
        command = shlex.split(sections["Service"]["ExecStart"])[0]
        if command.startswith("/opt/callfabric/"):
            shipped = ROOT / command.removeprefix("/opt/callfabric/")
            assert shipped.name == "callfabric" or shipped.is_file(), f"{path.name}: {command} is not in the repo"
        for env in filter(None, [sections["Service"].get("EnvironmentFile", "").lstrip("-")]):
            assert (UNITS / Path(env).name).is_file(), f"{path.name}: no example for {env}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path):
    exe = Path(sys.executable).with_name("callfabric")
    callfabric = str(exe) if exe.exists() else shutil.which("callfabric")
    if not callfabric:
        pytest.skip("the callfabric console script is not installed")
    for path in [*SERVICES, UNITS / "callfabric.target"]:
        text = path.read_text().replace("/opt/callfabric/.venv/bin/callfabric", callfabric)
        (tmp_path / path.name).write_text(text.replace("/opt/callfabric/", f"{ROOT}/"))
    present = [p for p in sorted(tmp_path.iterdir())
               if all(Path(shlex.split(v)[0]).exists() for v in re.findall(r"^ExecStart=(.+)$", p.read_text(), re.M))]
    assert {p.name for p in present} >= {"callfabric-controller.service", "callfabric-kamailio.service",
                                         "callfabric.target"}
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, present)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "callfabric" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr     # it warns, rc 0, on a bad key


def test_the_controller_settings_and_secrets_pass_its_checks():
    secrets = env_file(UNITS / "secrets.env")
    settings = load_settings(UNITS / "callfabric.yaml", environ=secrets)
    check_settings(settings)
    assert len(settings.api_tokens) == 1 and settings.webhook_secret
    controller = unit(UNITS / "callfabric-controller.service")["Service"]
    assert controller["ExecStart"].endswith("callfabric run --config /etc/callfabric/callfabric.yaml")
    assert controller["KillSignal"] == "SIGTERM" and int(controller["TimeoutStopSec"]) > 3 * settings.drain_timeout_s


def test_the_addresses_line_up():
    settings = load_settings(UNITS / "callfabric.yaml", environ={})
    kamailio = env_file(UNITS / "kamailio.env")
    entrypoint = (ROOT / "kamailio" / "docker-entrypoint.sh").read_text()
    assert all(f"${{{key}" in entrypoint for key in kamailio), "kamailio.env sets what the entry point never reads"
    assert settings.edge_evapi == [kamailio["EVAPI_BIND"]]
    assert settings.edge_rpc == [f"http://127.0.0.1:{kamailio['HTTP_PORT']}/RPC"]
    assert settings.edge_policy_file == kamailio["EDGE_POLICY"]
    assert settings.edge_policy_key_file == kamailio["EDGE_POLICY_KEY"]
    redis = shlex.split(unit(UNITS / "callfabric-redis.service")["Service"]["ExecStart"])
    assert settings.redis_url == f"redis://127.0.0.1:{redis[redis.index('--port') + 1]}/0"
    asterisk = env_file(UNITS / "asterisk.env")
    asterisk_entry = (ROOT / "asterisk" / "bin" / "docker-entrypoint.sh").read_text() + \
        (ROOT / "asterisk" / "bin" / "env-user.sh").read_text()
    assert all(key in asterisk_entry for key in asterisk)
    scrape = yaml.safe_load((UNITS / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in scrape["scrape_configs"]}
    assert targets == {"callfabric": settings.http_listen, "kamailio": f"127.0.0.1:{kamailio['HTTP_PORT']}"}
    assert scrape["rule_files"] == ["/opt/callfabric/deploy/prometheus/alerts.yml"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_prometheus_accepts_its_config(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text((UNITS / "prometheus.yml").read_text().replace("/opt/callfabric/", f"{ROOT}/"))
    done = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
