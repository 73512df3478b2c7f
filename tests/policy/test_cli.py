"""The four operator commands, run on the shipped example policies and on broken copies."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from controller.cli import main

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def broken(tmp_path):
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def test_check_accepts_the_examples(capsys):
    assert main(["policy", "check", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "OK, version" in out and "rule(s)" in out


def test_check_lists_every_error_with_position_and_fails(broken, capsys):
    routing = broken / "20-routing.yaml"
    text = routing.read_text().replace("route_sip: pbx", "route_sip: pbxx", 1).replace("fork: stt", "fork: {target: stt, direction: up}", 1)
    routing.write_text(text)
    assert main(["policy", "check", str(broken)]) == 1
    err = capsys.readouterr().err.splitlines()
    line_of = lambda needle: next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)  # noqa: E731
    assert any(e.startswith(f"20-routing.yaml:{line_of('pbxx')}:") and "unknown destination 'pbxx' (did you mean 'pbx'?)" in e for e in err)
    assert any(e.startswith(f"20-routing.yaml:{line_of('direction: up')}:") and "'up' is not one of: in, out, both" in e for e in err)
    assert err[-1].endswith("2 error(s); policy refused")


def test_schema_is_a_valid_json_schema_that_accepts_every_example(capsys):
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    Draft202012Validator.check_schema(schema)
    shipped = sorted(POLICIES.glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert not list(Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text()))), path
    assert list(Draft202012Validator(schema).iter_errors({"rules": [{"name": "x", "actions": [{"fly": 1}]}]}))


def test_explain_shows_each_rule_and_why(capsys):
    code = main(["policy", "explain", str(POLICIES), "--from", "2025550123", "--to", "+18005550101",
                 "--at", "2026-11-25T19:30", "--src", "203.0.113.4:5060", "--header", "X-Foo: bar"])
    assert code == 0
    out = capsys.readouterr().out
    assert "✗ block-premium-destinations" in out and "is in none of the risk lists" in out
    assert "+ tag-tenant" in out  # a `continue` rule whose actions were applied
    assert "✗ vip-to-human" in out and "is not in number list 'vip-callers'" in out
    assert "→ after-hours-to-pbx" in out and "outside 08:00-18:00" in out
    assert '"outcome": "sip"' in out and "billing-line" not in out.split("decision:")[0].split("after-hours-to-pbx")[1]


def test_explain_json_and_counters(capsys):
    code = main(["policy", "explain", str(POLICIES), "--to", "+18005550000", "--src", "198.51.100.7",
                 "--counter", "window:source:60=31", "--at", "2026-11-25T10:00:00-05:00", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"]["reject"] == {"code": 503, "reason": "Rate Limited"}
    assert [r["rule"] for r in out["rules"]] == ["block-premium-destinations", "source-call-rate-cap"]
    assert out["rules"][1]["why"] == "31 calls in the last 60s for source '198.51.100.7' (≥ 30)"


@pytest.mark.parametrize("args", [["--header", "no-colon"], ["--counter", "x=y"], ["--at", "tuesday"]])
def test_explain_rejects_bad_arguments(args, capsys):
    assert main(["policy", "explain", str(POLICIES), *args]) == 2
    assert "error:" in capsys.readouterr().err


def test_test_command_passes_on_the_examples(capsys):
    assert main(["policy", "test", str(POLICIES)]) == 0
    assert capsys.readouterr().out.strip().endswith("passed, 0 failed")


def test_test_command_prints_a_diff_and_fails(broken, capsys):
    cases = broken / "tests" / "routing.yaml"
    cases.write_text(cases.read_text().replace("expect: {outcome: sip, destination: pbx, rule: after-hours-to-pbx",
                                               "expect: {outcome: sip, destination: vip-desk, rule: after-hours-to-pbx"))
    assert main(["policy", "test", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "FAIL after hours goes to the PBX  (tests/routing.yaml:" in out
    assert '-  "destination": "vip-desk",' in out and '+  "destination": "pbx",' in out
    assert out.strip().endswith("1 failed")


def test_test_command_reports_bad_test_files(broken, capsys):
    (broken / "tests" / "bad.yaml").write_text("tests:\n  - name: x\n    call: {form: '+1'}\n    expect: {agent: intake}\n")
    assert main(["policy", "test", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "tests/bad.yaml:3:12: error: tests[0].call.form: unknown key 'form' (did you mean 'from'?)" in err


def test_test_command_without_cases_fails(tmp_path, capsys):
    shutil.copy(POLICIES / "00-declarations.yaml", tmp_path)
    (tmp_path / "z.yaml").write_text("default:\n  actions: [route_agent: intake]\n")
    assert main(["policy", "test", str(tmp_path)]) == 1
    assert "no test cases found" in capsys.readouterr().err


def test_console_script_is_installed():
    beside = Path(sys.executable).with_name("callfabric")   # a venv's bin/, used without activating it
    exe = str(beside) if beside.exists() else shutil.which("callfabric")
    assert exe, "the `callfabric` console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "policy", "check", str(POLICIES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "controller.cli", "policy", "check", "/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "does not exist" in done.stderr
