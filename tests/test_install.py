""".ci/install-system-packages on a machine where the packages are missing: Debian's
redis-server, prometheus and kamailio would start and enable services on 6379, 9090 and 5060;
the script keeps them from starting while it installs and disables what they enabled, with
systemd or without. apt-get, systemctl, dpkg-query and friends are recording stand-ins here
(the real install runs in CI's first command)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$LOG"
"""
APT_GET = STUB + """[ "$1" = install ] && { [ -e "$POLICY_RC_D" ] && echo "policy-rc.d present: $(tail -1 "$POLICY_RC_D")" >> "$LOG" \
    || echo "policy-rc.d absent" >> "$LOG"; }
exit 0
"""
DPKG_QUERY = """#!/bin/sh
case " $MISSING " in *" $3 "*) exit 1;; esac
echo "install ok installed"
"""


def run_install(tmp_path: Path, missing: str, systemd: bool, policy_before: str | None) -> tuple[list[str], Path]:
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "install-system-packages", repo / ".ci")
    (repo / "deploy" / "grafana" / "schema-check").mkdir(parents=True)
    (repo / "deploy" / "grafana" / "schema-check" / "package-lock.json").write_text("{}")
    (repo / "controller" / "api" / "phone").mkdir(parents=True)
    for name in ("package-lock.json", "phone.js"):
        (repo / "controller" / "api" / "phone" / name).write_text("{}")
    bin_dir.mkdir()
    for name, text in {"apt-get": APT_GET, "dpkg-query": DPKG_QUERY, "systemctl": STUB, "update-rc.d": STUB,
                       "service": STUB, "npm": STUB, "sudo": STUB + 'exec "$@"\n', "id": "#!/bin/sh\necho 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    policy = tmp_path / "policy-rc.d"
    if policy_before is not None:
        policy.write_text(policy_before)
    systemd_dir = tmp_path / "run-systemd"
    if systemd:
        systemd_dir.mkdir()
    log = tmp_path / "log"
    log.touch()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "MISSING": missing,
           "POLICY_RC_D": str(policy), "SYSTEMD_RUN_DIR": str(systemd_dir)}
    done = subprocess.run(["bash", str(repo / ".ci" / "install-system-packages")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines(), policy


def test_with_systemd_no_service_starts_and_the_enabled_ones_are_disabled(tmp_path):
    log, policy = run_install(tmp_path, "redis-server prometheus kamailio sip-tester", systemd=True,
                              policy_before=None)
    install = next(line for line in log if line.startswith("apt-get install"))
    assert all(pkg in install for pkg in ("redis-server", "prometheus", "kamailio", "sip-tester"))
    assert "policy-rc.d present: exit 101" in log            # nothing started during the install
    assert not policy.exists()                                # and the script's policy is gone again
    disabled = [line for line in log if line.startswith("systemctl")]
    assert disabled == ["systemctl disable --now redis-server", "systemctl disable --now prometheus",
                        "systemctl disable --now kamailio"]
    assert "npm ci --prefix deploy/grafana/schema-check --no-audit --no-fund --silent" in log
    # the /phone page's bundle is built (npm ci, then esbuild through the package's build script)
    assert log[-2:] == ["npm ci --prefix controller/api/phone --no-audit --no-fund --silent",
                        "npm run --prefix controller/api/phone --silent build"]


def test_without_systemd_the_init_scripts_are_disabled_and_an_existing_policy_is_kept(tmp_path):
    log, policy = run_install(tmp_path, "prometheus", systemd=False, policy_before="#!/bin/sh\nexit 101\n")
    assert policy.read_text() == "#!/bin/sh\nexit 101\n"
    assert [line for line in log if line.startswith(("update-rc.d", "service", "systemctl"))] == [
        "service prometheus stop", "update-rc.d prometheus disable"]


def test_packages_already_installed_are_left_alone(tmp_path):
    log, policy = run_install(tmp_path, "", systemd=True, policy_before=None)
    assert not [line for line in log if line.startswith(("apt-get", "systemctl", "update-rc.d"))]
    assert not policy.exists()


@pytest.mark.parametrize("well_known", [9090, 9091, 9093, 9100, 3000, 8080, 8000, 8443, 8888, 6379, 5060, 8088,
                                        8090, 8448])
def test_the_controller_default_port_is_no_common_service_port(well_known):
    from controller.config import Settings, split_host_port
    _, port = split_host_port(Settings(instance_id="x").http_listen, "http_listen")
    assert port != well_known
    services = Path("/etc/services")
    if services.exists():
        assert not any(line.split()[1].startswith(f"{port}/") for line in services.read_text().splitlines()
                       if line.strip() and not line.startswith("#") and len(line.split()) > 1)
