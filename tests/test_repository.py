"""Repository contracts: CI runs the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Run the tests", 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert section in ci_lines, f"README test command {section!r} is not what .ci/run runs"
    assert ci_lines[-1] == section  # the last thing CI does


def test_readme_documents_every_setting():
    from controller.config import describe
    readme = (ROOT / "README.md").read_text()
    missing = [name for name, env, _, _ in describe() if f"| `{name}` | `{env}` |" not in readme]
    assert not missing, f"settings missing from the README's table: {missing}"
