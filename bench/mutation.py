"""Does the suite bite? Mutation testing (mutmut) over the modules where a silent bug costs most:
the edge protocol and header sanitising, policy compile/evaluate, risk and bans, and the call
store's record transitions. Each mutant (an operator flipped, a constant changed, a call
dropped …) is run against the fast tests that cover its function; a mutant no test fails on
"survived". Surviving mutants are printed, with a one-line reason where one was judged
harmless (SURVIVOR_REASONS); the others are tests still to write.

    python bench/mutation.py [--max-children 2] [--budget-min 30] [--modules controller/x.py ...]

It works on a copy of the tracked files (mutmut rewrites the code it mutates), needs
redis-server (the call store's tests) and mutmut (`pip install -e '.[bench]'`), and is not part
of the CI test run. Last line:
RESULT killed_pct=… killed_pct_code=… mutants=… modules=… killed=… survived=… no_tests=…
timeout=… unchecked=… complete=true|false seconds=…   (goal: killed_pct >= 85). killed_pct counts
timeouts as killed and mutants no test reaches as not killed; when the time budget
(--budget-min, 30 by default) runs out, the workers are stopped and the line covers the mutants
checked by then (complete=false, unchecked=how many were left).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which of their functions: mutant names (fnmatch) — the whole module, or the named parts.
SELECTED = [
    "controller.edge.protocol.*",
    "controller.actions.x_header_*", "controller.actions.x_sanitize_header_value*",
    "controller.actions.x_reason_problem*", "controller.actions.x_parse_duration_ms*",
    "controller.actions.x_canonical_action*",
    "controller.policy.compile.*", "controller.policy.conditions.*",
    "controller.policy.risk.*", "controller.security.bans.*",
    # the call store: keys, record encoding, create (and its counters) and state transitions
    "controller.state.calls.x_*key*", "controller.state.calls.x__*", "controller.state.calls.*create*",
    "controller.state.calls.*_held_if_lost*", "controller.state.calls.*transition*",
    "controller.state.calls.*reconcile_live*", "controller.state.calls.*read_counter*",
]
MODULES = [
    "controller/edge/protocol.py",      # the decision channel's wire format, answers, parsing of edge events
    "controller/actions.py",            # header names/values, reasons: what may reach a SIP message
    "controller/policy/compile.py",     # the compiled policy: rule index, matchers, decide
    "controller/policy/conditions.py",  # conditions compiled to closures
    "controller/policy/risk.py",        # risk detectors, scores and outcomes
    "controller/security/bans.py",      # bans: records, expiry, pushes to the edges
    "controller/state/calls.py",        # call records and their state transitions in Redis
]
TESTS = [
    "tests/edge/test_protocol.py", "tests/edge/test_protocol_limits.py", "tests/edge/test_channel.py",
    "tests/edge/test_local.py",
    "tests/policy/test_conditions.py", "tests/policy/test_decisions.py", "tests/policy/test_numbers.py",
    "tests/policy/test_security.py", "tests/policy/test_risk_exact.py", "tests/policy/test_validation.py",
    "tests/policy/test_action_limits.py",
    "tests/policy/test_engine_property.py",
    "tests/security/test_guard.py", "tests/security/test_bans.py", "tests/state/test_calls.py",
    "tests/state/test_pack.py", "tests/state/test_counters_exact.py", "tests/state/test_transitions_exact.py",
    "tests/api/test_webhooks.py", "tests/api/test_api.py", "tests/media/test_media_plane.py",
]
# Lines whose text is for people, not behaviour: log calls and schema descriptions.
NOT_MUTATED = [r"\blog\.(debug|info|warning|error|exception)\(", r"\blogging\.getLogger\(", r'"description":']

# Survivors judged harmless, by mutant name prefix: why no test should fail on them.
SURVIVOR_REASONS: dict[str, str] = {
    "controller.security.bans.xǁBanListǁ_push": "pushes to the edges' Kamailio: tested against a real Kamailio "
    "(tests/integration/test_security_edge.py, test_edge_defence.py), not among this bench's fast tests",
}


def copy_tree(dest: Path) -> None:
    """The tracked files (and the working tree's edits to them): what the tests run on."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def config(modules: list[str]) -> str:
    def items(values: list[str]) -> str:
        return "".join(f"\n    {v}" for v in values)
    return ("[mutmut]\nsource_paths=controller\n"
            f"only_mutate={items(modules)}\n"
            f"tests_dir={items(TESTS)}\n"
            f"pytest_add_cli_args={items(['-p', 'no:cacheprovider'])}\n"
            f"do_not_mutate_patterns={items(NOT_MUTATED)}\n"
            f"also_copy={items(['tests', 'policies', 'examples', 'kamailio', 'asterisk', 'pyproject.toml'])}\n")


def mutmut(workdir: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutants come first, not a checkout
    env["CALLFABRIC_PROPERTY_EXAMPLES"] = "25"
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)


_SOURCES: dict[Path, dict[str, list[str]]] = {}


def _functions(path: Path) -> dict[str, list[str]]:
    """Function name -> its source lines, for every function (methods too) of a mutated module."""
    if path not in _SOURCES:
        lines = path.read_text().splitlines()
        found: dict[str, list[str]] = {}
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
                found[node.name] = lines[node.lineno:node.end_lineno]  # the body: the def line differs
        _SOURCES[path] = found
    return _SOURCES[path]


def _code_only(line: str) -> str:
    """The line with its string literals blanked (what is left is code)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return line
    out = []
    for t in tokens:
        if t.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if t.type == tokenize.STRING:  # its text goes; an f-string's expressions are code and stay
            prefix = t.string[:len(t.string) - len(t.string.lstrip("rRbBuUfF"))]
            out.append('""' + ("".join(re.findall(r"\{[^{}]*\}", t.string)) if "f" in prefix.lower() else ""))
        else:
            out.append(t.string)
    return " ".join(out)


def text_only(change: str) -> bool:
    """A mutant that only changed the wording of a message: a text string raised or returned
    (an error's reason), no code and no bytes (data) changed."""
    old, _, new = change.partition("  ->  ")
    code = _code_only(old)
    message = code.startswith(("raise ", "return ")) and not re.search(r"""\b[bB][rR]?["']""", old)
    return message and old != new and code == _code_only(new)


def redis_case_only(change: str) -> bool:
    """A mutant that only changed the letter case of a Redis command name (`("ZCARD", …` → `("zcard", …`)."""
    old, _, new = change.partition("  ->  ")
    return old != new and old.lower() == new.lower() and bool(re.search(r"""\(\s*["'][A-Z]+["']\s*,""", old))


def changed_line(workdir: Path, name: str) -> str:
    """The mutant's change as `old -> new` (the lines that differ from the original function)."""
    module, _, function = name.rpartition(".")
    functions = _functions(workdir / "mutants" / (module.replace(".", "/") + ".py"))
    original = functions.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", [])
    diff = [line for line in difflib.ndiff(original, functions.get(function, [])) if line[:2] in ("- ", "+ ")]
    old = " / ".join(line[2:].strip() for line in diff if line.startswith("- "))
    new = " / ".join(line[2:].strip() for line in diff if line.startswith("+ "))
    return f"{old[:110]}  ->  {new[:110]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-children", type=int, default=4, help="mutants run at once (most of a run waits)")
    parser.add_argument("--budget-min", type=float, default=30.0, help="give up (exit 2) after this long")
    parser.add_argument("--modules", nargs="*", default=MODULES)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (mutmut browse there)")
    parser.add_argument("--debug", action="store_true", help="mutmut's debug output (pytest's own errors)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is required (the call store's tests)", file=sys.stderr)
        return 2
    try:
        import mutmut as _  # noqa: F401
    except ImportError:
        print("mutmut is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="callfabric-mutation-"))
    started = time.monotonic()
    try:
        copy_tree(workdir)
        (workdir / "setup.cfg").write_text(config(args.modules) + ("debug=true\n" if args.debug else ""))
        print(f"mutating {len(args.modules)} modules in {workdir}, against {len(TESTS)} test files", flush=True)
        selected = SELECTED if args.modules == MODULES else []
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["CALLFABRIC_PROPERTY_EXAMPLES"] = "25"
        log = workdir / "mutmut-run.log"
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                                    *selected], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
            try:
                complete = run.wait(timeout=args.budget_min * 60) == 0
                if not complete:
                    print(log.read_text()[-3000:], f"(all of it: {log})", sep="\n", file=sys.stderr)
                    return 2
            except subprocess.TimeoutExpired:  # bounded: stop every worker, report what was checked
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                complete = False
                print(f"the {args.budget_min:g} min budget ran out: the results below cover the mutants checked "
                      f"by then", flush=True)
        results = mutmut(workdir, "results", "--all", "true", timeout=300).stdout
        outcomes = {name: outcome for name, outcome in re.findall(r"^\s*(\S+): (\w[\w ]*)$", results, re.M)
                    if not selected or any(fnmatch.fnmatch(name, pattern) for pattern in selected)}
        unchecked = sum(1 for outcome in outcomes.values() if outcome == "not checked")
        if not complete:  # unchecked mutants are neither killed nor survivors
            outcomes = {name: outcome for name, outcome in outcomes.items() if outcome != "not checked"}
        stats = {key: sum(1 for o in outcomes.values() if o == outcome) for key, outcome in (
            ("killed", "killed"), ("survived", "survived"), ("no_tests", "no tests"), ("timeout", "timeout"),
            ("suspicious", "suspicious"), ("not_checked", "not checked"))}
        if stats["not_checked"] and complete:
            print(f"{stats['not_checked']} selected mutants were not checked", file=sys.stderr)
            return 2
        survivors = sorted(n for n, o in outcomes.items() if o in ("survived", "no tests"))
        unexplained, wording, explained = 0, 0, 0
        print(f"\n{len(survivors)} mutants not killed (survived, or no test reaches them):")
        for name in survivors:
            change = changed_line(workdir, name)
            reason = next((r for prefix, r in SURVIVOR_REASONS.items() if name.startswith(prefix)), "")
            if not reason and redis_case_only(change):
                reason = "a Redis command name in other letters: Redis reads command names case-insensitively"
            if reason:
                explained += 1
            elif text_only(change):
                wording += 1
                reason = "only the wording of a message changed (tests check behaviour and key phrases)"
            unexplained += not reason
            print(f"  {name} [{outcomes[name]}]: {change}" + (f"\n      reason: {reason}" if reason else ""))
        killed = stats.get("killed", 0) + stats.get("timeout", 0)
        total = killed + stats.get("survived", 0) + stats.get("no_tests", 0) + stats.get("suspicious", 0)
        pct = 100.0 * killed / total if total else 0.0
        harmless = wording + explained
        behaviour = 100.0 * killed / (total - harmless) if total > harmless else 0.0
        print(f"\n{unexplained} survivors without a reason: each is a test to write; {wording} changed only a "
              f"message's wording and {explained} are harmless for the reason printed (all counted as survivors in "
              f"killed_pct, left out of killed_pct_code)")
        print(f"RESULT killed_pct={pct:.1f} killed_pct_code={behaviour:.1f} mutants={total} modules={len(args.modules)} "
              f"killed={stats.get('killed', 0)} survived={stats.get('survived', 0)} "
              f"no_tests={stats.get('no_tests', 0)} timeout={stats.get('timeout', 0)} "
              f"unchecked={unchecked} complete={str(complete).lower()} "
              f"seconds={time.monotonic() - started:.0f}")
        return 0 if pct >= 85 and complete else 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
