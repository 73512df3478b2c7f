"""Repository contracts: CI runs exactly the README's two commands, with pinned versions."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)\n```", section, re.S)]


def ci_commands() -> list[str]:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not line.startswith(("set -", "cd "))]


def test_ci_runs_exactly_the_readme_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert ci_commands() == commands, "README's two commands and .ci/run differ"
    install, tests = commands
    assert "python3 -m venv .venv" in install and "-c constraints.txt" in install and "'.[test]'" in install
    assert install.endswith(".venv/bin/callfabric demo") and tests.startswith(".venv/bin/python -m pytest")


def test_constraints_pin_every_dependency_and_a_pytest_schemathesis_works_with():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()
        assert name in pins, f"{name} is not pinned in constraints.txt (bash .ci/refresh-constraints)"
    major, minor = map(int, pins["pytest"].split(".")[:2])
    assert (major, minor) < (9, 1), "schemathesis' pytest plugin breaks on pytest 9.2 (tests/api/test_api_fuzz.py)"
    assert "pytest>=8,<9.1" in project["optional-dependencies"]["test"][0]


def test_readme_documents_every_setting():
    from controller.config import describe
    readme = (ROOT / "README.md").read_text()
    missing = [name for name, env, _, _ in describe() if f"| `{name}` | `{env}` |" not in readme]
    assert not missing, f"settings missing from the README's table: {missing}"
