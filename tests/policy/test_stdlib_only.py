"""The evaluation path must run on a bare interpreter (Kamailio's embedded Debian Python):
a validated policy is handed over as plain data and evaluated with site-packages disabled."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

from controller.policy import load_policy
from controller.policy.testing import build_call

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

SCRIPT = """
import json, pickle, sys
assert not any('site-packages' in p or 'dist-packages' in p for p in sys.path), sys.path
from controller.policy import Policy
source, calls = pickle.load(open(sys.argv[1], 'rb'))
policy = Policy(source)
print(json.dumps([policy.decide(c).to_dict() for c in calls]))
for banned in ('yaml', 'jsonschema', 'aiohttp', 'redis'):
    assert banned not in sys.modules, banned
"""


def test_compiled_engine_runs_without_site_packages(tmp_path):
    policy = load_policy(ROOT / "policies")
    calls = [build_call(spec, "America/New_York") for spec in (
        {"from": "+12025550123", "to": "+18005550101", "at": "2026-11-25T10:00", "src": "203.0.113.9"},
        {"from": "4155550100", "to": "+18005550000", "at": "2026-11-25T23:00"},
        {"from": "+12025550123", "to": "+19005551234", "at": "2026-11-25T10:00"},
        {"from": "+12025550123", "to": "+18005550300", "at": "2026-11-25T10:00"},
    )]
    blob = tmp_path / "policy.pickle"
    blob.write_bytes(pickle.dumps((policy.source, calls)))
    done = subprocess.run([SYSTEM_PYTHON, "-S", "-c", SCRIPT, str(blob)], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [policy.decide(c).to_dict() for c in calls]
