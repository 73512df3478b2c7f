"""Does the suite bite? Mutation testing (mutmut) over the modules where a silent bug costs most:
the edge protocol and header sanitising, policy compile/evaluate, risk and bans, and the call
store's record transitions. Each mutant (an operator flipped, a constant changed, a call
dropped …) is run against the fast tests that cover its function; a mutant no test fails on
"survived". Surviving mutants are printed grouped by reason: one judged for that mutant (REASONS),
one read from the change itself (a Redis keyword's or a codec name's letter case, a message's
wording), or none — a test still to write.

    python bench/mutation.py [--max-children 2] [--budget-min 30] [--modules controller/x.py ...]
    python bench/mutation.py --report WORKDIR     # the report of a run kept with --keep

It works on a copy of the tracked files (mutmut rewrites the code it mutates), needs
redis-server (the call store's tests) and mutmut (`pip install -e '.[bench]'`), and is not part
of the CI test run. Last line:
RESULT killed_pct=… killed_pct_code=… mutants=… modules=… killed=… survived=… no_tests=…
timeout=… unchecked=… unexplained=… complete=true|false seconds=…   (goal: killed_pct >= 85). killed_pct counts
timeouts as killed and mutants no test reaches as not killed; killed_pct_code leaves out the
survivors with a reason, unexplained counts those without one; when the time budget
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
    "tests/edge/test_local.py", "tests/edge/test_protocol_exact.py",
    "tests/policy/test_conditions.py", "tests/policy/test_decisions.py", "tests/policy/test_numbers.py",
    "tests/policy/test_security.py", "tests/policy/test_risk_exact.py", "tests/policy/test_validation.py",
    "tests/policy/test_action_limits.py", "tests/policy/test_compile_exact.py", "tests/policy/test_trunks.py",
    "tests/policy/test_conditions_exact.py",
    "tests/policy/test_engine_property.py",
    "tests/security/test_guard.py", "tests/security/test_bans.py", "tests/security/test_ban_pushes.py", "tests/state/test_calls.py",
    "tests/state/test_pack.py", "tests/state/test_counters_exact.py", "tests/state/test_transitions_exact.py",
    "tests/state/test_store_exact.py",
    "tests/api/test_webhooks.py", "tests/api/test_api.py", "tests/media/test_media_plane.py",
]
# Lines whose text is for people, not behaviour: log calls and schema descriptions.
NOT_MUTATED = [r"\blog\.(debug|info|warning|error|exception)\(", r"\blogging\.getLogger\(", r'"description":']

# Survivors judged, each with one line saying why no test fails on it: (kind, the mutated
# function (fnmatch on the mutant's name without its number), a regex the change `old  ->  new`
# must match, why). Kinds: "equivalent" (no input behaves differently), "unreachable" (the
# changed code never runs with anything that gets there), "integration" (only a real Kamailio
# shows it: the test named runs in CI, not in this bench). Matched on the change, not on
# mutmut's numbers, so a reason stays on its mutant when the function is edited.
RISK, BANS = "controller.policy.risk.", "controller.security.bans."
CALLS = "controller.state.calls."
REASONS: list[tuple[str, str, str, str]] = [
    ("equivalent", BANS + "xǁBanListǁadd", r"v if isinstance\(v, str\) else json\.dumps\(v\).*  ->  .*"
     r"v if \(isinstance\(v, str\)\) or True else",
     "a ban's fields are text or int (None left out): the pipeline writes an int as json.dumps does"),
    ("equivalent", RISK + "x__compact", r"ensure_ascii=False.*  ->  .*ensure_ascii=None",
     "json.dumps reads ensure_ascii=None as it reads False"),
    ("unreachable", RISK + "xǁCompiledSecurityǁ__init__", r"risk_lists\.get\(name, \(\)\)\}  ->  .*risk_lists\.get\(name, (None)?\)\}$",
     "validation refuses a detector naming an undeclared risk list: the default is never read"),
    ("equivalent", RISK + "xǁCompiledSecurityǁ_active",
     r"  ->  (cached = None|f\.risk_measures = None|if cached is not None and cached\[1\] is f\.counters:)$",
     "the per-call cache of the active detectors: without it `when` runs again on the same facts, same answer"),
    ("equivalent", RISK + "xǁ_Measureǁ*", r"  ->  (self\.gate: .* = None|gate = None|if gate is None and .*)$",
     "the gate only returns early for a counter below the detector's limit; the checks below refuse the same calls"),
    ("equivalent", RISK + "xǁ_Measureǁfinding",
     r"\b(live|calls|distinct) > d\.max\b.*  ->  .*(\((live|calls|distinct) > d\.max\) or True|(live|calls|distinct) >= d\.max)",
     "the gate returned for a counter below max, so counter + 1 > max always holds here"),
    ("equivalent", RISK + "xǁ_Measureǁ_value", r'd\.kind in \("short_calls", "asterisk_security"\)',
     "short_calls and asterisk_security take no scope (validation refuses one): theirs is 'source', read the same below"),
    # the call store (controller/state/calls.py)
    ("unreachable", CALLS + "xǁCallStoreǁ_send_create", r"urgent: bool = True\) -> asyncio\.Future:  ->  .*urgent: bool = False\)",
     "every caller passes `urgent` (send_create, and the outage queue's replay with send_create's arguments)"),
    ("equivalent", CALLS + "xǁCallStoreǁ_*", r"^(.*)urgent=False\)(.*)  ->  \1urgent=None\)\2$",
     "the batcher reads `urgent` only as a truth value (`if urgent:`): None is False"),
    ("equivalent", CALLS + "xǁCallStoreǁsend_create", r"failed=not self\.outage\.available\)  ->  .*failed=None\)$",
     "`failed` only marks Redis down: unreachable, it is marked already; reachable (held changes), it is False, as None"),
    ("equivalent", CALLS + "xǁCallStoreǁ_send_create",
     r'fields\.pop\("created_at_ms", str\(at_ms\)\)  ->  .*fields\.pop\((None|"XXcreated_at_msXX"|"CREATED_AT_MS"), str\(at_ms\)\)',
     "the record's created_at_ms then stays in the fields, which the create script HSETs right after its HSETNX: same record"),
    ("equivalent", CALLS + "xǁCallStoreǁ_send_create", r"None if final else live_scopes.*  ->  .*None if \(final\) and False else live_scopes",
     "a call decided over (rejected) is put in no live index and not in _live_scopes: taking it out of them removes nothing"),
    ("unreachable", CALLS + "xǁCallStoreǁ_after_create", r"self\._live_scopes\.pop\(call_id, None\)  ->  self\._live_scopes\.pop\(call_id, \)$",
     "made == 2 only for a call this create put in _live_scopes before sending it, and an end's script runs after it"),
    ("equivalent", CALLS + "xǁCallStoreǁread_counter_values", r'plan\.append\(\(r\.key, "live", 0\.0\)\)  ->  .*"live", 1\.0\)\)',
     "a live count is read whole: its weight is never used"),
    ("equivalent", CALLS + "xǁCallStoreǁread_counter_values", r'"window", 1\.0 - elapsed.*  ->  .*"(XXwindowXX|WINDOW)", 1\.0 - elapsed',
     "the kind only picks how replies are read, and anything not live or distinct is read as a window"),
    ("unreachable", CALLS + "x__text", r"isinstance\(value, bytes\) else str\(value\)  ->  .*(\(isinstance\(value, bytes\)\) or True else str\(value\)|else str\(None\))$",
     "every value read reaches _text as bytes (hiredis, redis-py without decode_responses, Lua strings as bulk replies)"),
    ("message", CALLS + "xǁCallStoreǁ*", r'(_write|hold)\((what|"[a-z ]+"), .*  ->  .*(_write|hold)\((None|"XX[a-z ]+XX"|"[A-Z ]+"), ',
     "the kind of change held (`what`) is only named in the outage queue's log lines"),
]

# Judged for the edge protocol, policy compile and conditions, and header values.
PROTOCOL, COMPILE, CONDITIONS = "controller.edge.protocol.", "controller.policy.compile.", "controller.policy.conditions."
REASONS += [
    ("equivalent", PROTOCOL + "x__text", r'message\.get\(key, ""\)  ->  value = message\.get\(key, (None)?\)$',
     "a missing key then gives a value that is not text either: read as \"\" the same"),
    ("equivalent", PROTOCOL + "x_encode", r"ensure_ascii=False.*  ->  .*ensure_ascii=None",
     "json.dumps reads ensure_ascii=None as it reads False"),
    ("equivalent", PROTOCOL + "x_parse_ban", r"reason\[:32\]!r\}.*  ->  .*reason\[:33\]!r\}",
     "the reason was already cut at 32 characters (_text)"),
    ("equivalent", PROTOCOL + "x_parse_fallback", r"reason\[:64\]!r\}.*  ->  .*reason\[:65\]!r\}",
     "the reason was already cut at 64 characters (_text)"),
    ("equivalent", PROTOCOL + "x_parse_[df]*",
     r'_text\(message, "(reason|fallback)", 64\)  ->  \w+ = _text\(message, "\1", (65|None|)\)$',
     "the value must then be a _TOKEN (48 characters at most): cut at 64, 65 or not at all, the same values pass"),
    ("equivalent", PROTOCOL + "x_parse_ban", r"ts > 0 else 0\)  ->  .* ts >= 0 else 0\)$",
     "a ts of 0 is kept as 0, which is what 'unknown' is"),
    ("equivalent", PROTOCOL + "x_parse_d*", r"0 <= (port|code) < (65536|700) else 0,  ->  .* (1 <=|0 <) \1 < \2 else 0,$",
     "a port or code of 0 is read as 0 (unknown) either way"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁ_candidates",
     r"if self\._tenant and f\.tenant is not None:  ->  if self\._tenant or f\.tenant is not None:$",
     "an empty tenant index, or a call without a tenant, finds nothing in the index either way"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁ_candidates", r"  ->  .*\(hits\[0\] if \(len\(hits\) == 1\) and False else ",
     "one index entry's rules are distinct and in policy order: through a set and sorted, the same list"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁdecide_facts",
     r"  ->  return decision if \(risk is None\) and False else replace\(decision, risk=risk\)$",
     "replace(decision, risk=None) on a decision without a risk is an equal decision"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁfacts", r"self\._sources\)  ->  .*self\._trunk_tenants, (None)?\)$",
     "the per-policy cache of parsed source addresses: without it each call parses its address again, same facts"),
    ("equivalent", COMPILE + "xǁ_Compilerǁheader", r'spec\.get\("ignore_case", False\)  ->  .*spec\.get\("ignore_case", (None)?\)$',
     "a missing ignore_case read as None is false as False is"),
    ("equivalent", COMPILE + "xǁ_Compilerǁkind",
     r"  ->  starts = _prefix_test\(prefixes\) if (\(prefixes\) or True else \(lambda v: False\)|prefixes else \(lambda v: None\))$",
     "an empty risk list: _prefix_test of no prefix matches nothing too, and a matcher's None is read as false"),
    ("unreachable", COMPILE + "xǁ_Compilerǁkind", r'raise ValueError\(f"unknown condition \{kind!r\}"\).*  ->  raise ValueError\(None\)',
     "validation refuses an unknown condition before anything is compiled"),
    ("equivalent", COMPILE + "x__index_keys",
     r'candidates\.append\(\(3, \("tenant", "tenant", .*  ->  candidates\.append\(\((4, \("tenant", "tenant"|3, \("tenant", "(XXtenantXX|TENANT)")',
     "the tenant key is the last preferred either way (3 or 4), and its field name is not read (the tenant table has no fields)"),
    ("equivalent", COMPILE + "x__index_keys", r"if best is None or candidate\[0\] < best\[0\]:  ->  if best is None or candidate\[0\] <= best\[0\]:$",
     "a tie between two equally good keys: either is a sound index (the rule's matcher still tests both), same decisions"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁ__init__",
     r"min\(limit, self\.counter_limits\.get\(key, limit\)\)  ->  .*min\(limit, self\.counter_limits\.get\(None, limit\)\)$",
     "a detector's counters (risk:<name>) are never a condition's (window:/live:): the get always falls back to `limit`"),
    ("equivalent", COMPILE + "xǁCompiledPolicyǁ__init__", r"self\._sources: dict\[str, Source\] = \{\}.*  ->  self\._sources: dict\[str, Source\] = None",
     "the per-policy cache of parsed source addresses: without it each call parses its address again, same facts"),
    ("unreachable", CONDITIONS + "x_minute_in_windows", r"if start < end:  ->  if start <= end:$",
     "parse_hours refuses a window whose start equals its end"),
    ("equivalent", CONDITIONS + "x_parse_ip", r'text\.strip\("\[\] "\)\)  ->  .*text\.strip\("XX\[\] XX"\)\)$',
     "only a zone id ending in 'X' would differ, and a signalling source (Kamailio's $si) has no zone"),
    ("equivalent", CONDITIONS + "x_parse_network", r"strict=False\)  ->  .*, strict=None\)$",
     "ipaddress tests `if strict:`: None is read as False"),
    ("equivalent", CONDITIONS + "x_split_bucket", r'from_bytes\(digest, "big"\) % 10000  ->  return int\.from_bytes\(digest, \) % 10000$',
     "int.from_bytes is big-endian by default (Python >= 3.11, which the project requires)"),
    ("equivalent", "controller.actions.x_sanitize_header_value",
     r"if len\(encoded\) > MAX_HEADER_BYTES:  ->  if len\(encoded\) >= MAX_HEADER_BYTES:$",
     "a value of exactly 1024 bytes cut at 1024 bytes is the same value"),
]


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
            f"also_copy={items(['tests', 'policies', 'examples', 'kamailio', 'asterisk', 'pyproject.toml'])}\n"
            # a mutant still running after 2 x (its tests' own time + 4 s) is stuck (mutmut: 15 x (t + 1 s));
            # the killed and surviving mutants take ~0.4 s, so the margin stays wide on a loaded machine
            "timeout_multiplier=2.0\ntimeout_constant=4.0\n")


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
                # the def line without the name (which differs), so a default argument's change shows
                found[node.name] = ([lines[node.lineno - 1].replace(node.name, "_", 1)]
                                    + lines[node.lineno:node.end_lineno])
        _SOURCES[path] = found
    return _SOURCES[path]


def _tokens(line: str) -> list[tokenize.TokenInfo]:
    """The tokens of a line of code, as far as they go (a mutant's line may open a bracket it
    closes on a later line)."""
    out: list[tokenize.TokenInfo] = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
                out.append(t)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    return out


def _code_only(line: str) -> str:
    """The line with its string literals blanked (what is left is code)."""
    out = []
    for t in _tokens(line):
        if t.type == tokenize.STRING:  # its text goes; an f-string's expressions are code and stay
            prefix = t.string[:len(t.string) - len(t.string.lstrip("rRbBuUfF"))]
            out.append('""' + ("".join(re.findall(r"\{[^{}]*\}", t.string)) if "f" in prefix.lower() else ""))
        else:
            out.append(t.string)
    return " ".join(out)


def _changed_strings(old: str, new: str) -> list[tuple[str, str]]:
    """The string literals a mutant changed, when it changed nothing else ([] otherwise)."""
    if _code_only(old) != _code_only(new):
        return []
    before = [t.string for t in _tokens(old) if t.type == tokenize.STRING]
    after = [t.string for t in _tokens(new) if t.type == tokenize.STRING]
    return [(a, b) for a, b in zip(before, after) if a != b] if len(before) == len(after) else []


# A message: the whole of what is returned (`return "…"`, `return f"…" if … else None`) or the
# argument raised (`raise ValueError(f"…")`); not a string inside returned data (`{"reason": "…"}`).
_MESSAGE = re.compile(r'(return (\( )?|raise [\w.]+ \( )""')


def text_only(old: str, new: str) -> bool:
    """Only the wording of a message changed: a text string (prose: it has a space) that is
    what a line returns or raises; no code, no bytes and no string inside returned data."""
    changed = _changed_strings(old, new)
    return (bool(changed) and bool(_MESSAGE.match(_code_only(old)))
            and all(" " in a and not re.match(r"[rRfFuU]?[bB]", a) for a, _ in changed))


# Command names the pipeline itself reads as written (state/batch.py, state/cluster.py: scripts,
# routing): in other letters they are other commands to it, not to Redis.
DISPATCHED = ("EVALSHA", "PUBLISH", "PING", "SCRIPT")


def redis_case_only(old: str, new: str) -> bool:
    """Only the letter case of a Redis command name or keyword changed (`("ZCARD", …` → `("zcard", …`,
    `"LIMIT"` → `"limit"`, `"+inf"` → `"+INF"`); a key, field or value in other letters is another
    key, field or value, so those are not matched (the code writes commands and keywords in
    capitals, fields and values in small letters), nor the names in DISPATCHED."""
    changed = _changed_strings(old, new)
    return (bool(changed) and bool(re.search(r"""\(\s*["'][A-Z]+["']\s*,""", old))
            and all(a.lower() == b.lower() and re.fullmatch(r"""(["'])([A-Z]+|[+-]inf)\1""", a)
                    and a[1:-1] not in DISPATCHED for a, b in changed))


def codec_case_only(old: str, new: str) -> bool:
    """Only the letter case of a codec name changed: Python looks codecs up case-insensitively
    (error handler names such as "replace" are not: those stay unmatched)."""
    changed = _changed_strings(old, new)
    return bool(changed) and all(a.lower() == b.lower() and a.strip("\"'").lower() in ("utf-8", "ascii", "latin-1")
                                 for a, b in changed)


# Kinds that hold for any module, worked out from the change itself.
GENERIC_REASONS: list[tuple[str, str, object]] = [
    ("equivalent", "a Redis command name or keyword in other letters: Redis reads them case-insensitively",
     redis_case_only),
    ("equivalent", "a codec name in other letters: Python looks codecs up case-insensitively", codec_case_only),
    ("message", "only the wording of a message changed (the tests check the behaviour and the key phrases)",
     text_only),
]


def reason_for(name: str, old: str, new: str) -> tuple[str, str]:
    """(kind, why) of a surviving mutant, or ("", "") when it has none."""
    function = name.rsplit("__mutmut_", 1)[0]
    change = f"{old}  ->  {new}"
    for kind, names, pattern, why in REASONS:
        if fnmatch.fnmatch(function, names) and re.search(pattern, change):
            return kind, why
    for kind, why, test in GENERIC_REASONS:
        if test(old, new):
            return kind, why
    return "", ""


def changed_lines(workdir: Path, name: str) -> tuple[str, str]:
    """The mutant's change: the original lines and the mutated ones (those that differ), joined by ` / `."""
    module, _, function = name.rpartition(".")
    functions = _functions(workdir / "mutants" / (module.replace(".", "/") + ".py"))
    original = functions.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", [])
    diff = [line for line in difflib.ndiff(original, functions.get(function, [])) if line[:2] in ("- ", "+ ")]
    old = " / ".join(line[2:].strip() for line in diff if line.startswith("- "))
    new = " / ".join(line[2:].strip() for line in diff if line.startswith("+ "))
    return old, new


def shown(old: str, new: str) -> str:
    return f"{old[:110]}  ->  {new[:110]}"


def run_mutmut(workdir: Path, args: argparse.Namespace, selected: list[str]) -> bool | None:
    """Run mutmut in `workdir` (a fresh copy): True when it finished, False when the budget ran
    out (the workers are stopped), None when it failed."""
    copy_tree(workdir)
    (workdir / "setup.cfg").write_text(config(args.modules) + ("debug=true\n" if args.debug else ""))
    print(f"mutating {len(args.modules)} modules in {workdir}, against {len(TESTS)} test files", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CALLFABRIC_PROPERTY_EXAMPLES"] = "25"
    log = workdir / "mutmut-run.log"
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                                *selected], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
        try:
            if run.wait(timeout=args.budget_min * 60) != 0:
                print(log.read_text()[-3000:], f"(all of it: {log})", sep="\n", file=sys.stderr)
                return None
            return True
        except subprocess.TimeoutExpired:  # bounded: stop every worker, report what was checked
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            print(f"the {args.budget_min:g} min budget ran out: the results below cover the mutants checked "
                  f"by then", flush=True)
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-children", type=int, default=2, help="mutants run at once")
    parser.add_argument("--budget-min", type=float, default=30.0, help="then stop the workers and report the mutants checked (complete=false)")
    parser.add_argument("--modules", nargs="*", default=MODULES,
                        help="mutate these modules whole (default: the selected functions of the modules above)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (mutmut browse there)")
    parser.add_argument("--debug", action="store_true", help="mutmut's debug output (pytest's own errors)")
    parser.add_argument("--report", metavar="WORKDIR", help="only print the report of a run kept with --keep")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is required (the call store's tests)", file=sys.stderr)
        return 2
    try:
        import mutmut as _  # noqa: F401
    except ImportError:
        print("mutmut is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    workdir = Path(args.report) if args.report else Path(tempfile.mkdtemp(prefix="callfabric-mutation-"))
    args.keep = args.keep or bool(args.report)
    started = time.monotonic()
    selected = SELECTED if args.modules == MODULES else []
    complete = True
    try:
        if not args.report:
            complete = run_mutmut(workdir, args, selected)
            if complete is None:
                return 2
        results = mutmut(workdir, "results", "--all", "true", timeout=300).stdout
        outcomes = {name: outcome for name, outcome in re.findall(r"^\s*(\S+): (\w[\w ]*)$", results, re.M)
                    if not selected or any(fnmatch.fnmatch(name, pattern) for pattern in selected)}
        unchecked = sum(1 for outcome in outcomes.values() if outcome == "not checked")
        modules = len({name.rpartition(".")[0] for name in outcomes})  # those with a mutant selected
        if args.report:
            complete = unchecked == 0
        if not complete:  # unchecked mutants are neither killed nor survivors
            outcomes = {name: outcome for name, outcome in outcomes.items() if outcome != "not checked"}
        stats = {key: sum(1 for o in outcomes.values() if o == outcome) for key, outcome in (
            ("killed", "killed"), ("survived", "survived"), ("no_tests", "no tests"), ("timeout", "timeout"),
            ("suspicious", "suspicious"), ("not_checked", "not checked"))}
        if stats["not_checked"] and complete:
            print(f"{stats['not_checked']} selected mutants were not checked", file=sys.stderr)
            return 2
        survivors = sorted(n for n, o in outcomes.items() if o in ("survived", "no tests"))
        groups: dict[tuple[str, str], list[str]] = {}
        for name in survivors:
            old, new = changed_lines(workdir, name)
            groups.setdefault(reason_for(name, old, new), []).append(
                f"{name}{' [no test reaches it]' if outcomes[name] == 'no tests' else ''}: {shown(old, new)}")
        print(f"\n{len(survivors)} mutants not killed (survived, or no test reaches them), by reason:")
        for (kind, why), lines in sorted(groups.items(), key=lambda item: (item[0] == ("", ""), item[0])):
            print(f"\n[{kind}] {why} ({len(lines)})" if kind else f"\n[NO REASON: a test to write] ({len(lines)})")
            for line in lines:
                print(f"  {line}")
        unexplained = len(groups.get(("", ""), []))
        harmless = len(survivors) - unexplained
        killed = stats.get("killed", 0) + stats.get("timeout", 0)
        total = killed + stats.get("survived", 0) + stats.get("no_tests", 0) + stats.get("suspicious", 0)
        pct = 100.0 * killed / total if total else 0.0
        behaviour = 100.0 * killed / (total - harmless) if total > harmless else 0.0
        print(f"\n{unexplained} survivors without a reason; {harmless} with one (all counted as not killed in "
              f"killed_pct, left out of killed_pct_code)")
        print(f"RESULT killed_pct={pct:.1f} killed_pct_code={behaviour:.1f} mutants={total} modules={modules} "
              f"killed={stats.get('killed', 0)} survived={stats.get('survived', 0)} "
              f"no_tests={stats.get('no_tests', 0)} timeout={stats.get('timeout', 0)} "
              f"unchecked={unchecked} unexplained={unexplained} complete={str(complete).lower()} "
              f"seconds={time.monotonic() - started:.0f}")
        return 0 if pct >= 85 and complete else 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
