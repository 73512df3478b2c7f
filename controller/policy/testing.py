"""Policy test cases operators keep next to their policies (`<policy dir>/tests/*.yaml`):
an input call and the expected decision; a failure prints a diff."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path as FsPath
from typing import Any

from controller.actions import parse_duration_ms
from controller.policy import Call, Policy
from controller.policy.conditions import zone
from controller.policy.model import PolicyIssue, Position
from controller.policy.validate import dotted
from controller.policy.yamlpos import PositionedDocument, YamlSyntaxError, load_yaml

CALL_KEYS = {"from", "to", "ruri", "src", "transport", "headers", "at", "call_id", "counters", "trunk"}
EXPECT_KEYS = {"outcome", "rule", "applied_rules", "agent", "destination", "reject", "headers", "forks",
               "max_duration", "tenant", "trunk", "anchor_media", "webhook", "fallback", "risk", "findings"}


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    position: Position
    passed: bool
    diff: str = ""


class TestFileInvalid(Exception):
    def __init__(self, issues: list[PolicyIssue]):
        self.issues = issues
        super().__init__("\n".join(map(str, issues)))


def parse_at(text: str, default_tz: str) -> datetime:
    """ISO time; without a UTC offset it is read in the policy's default time zone."""
    moment = datetime.fromisoformat(str(text).strip())
    return moment if moment.tzinfo else moment.replace(tzinfo=zone(default_tz))


def split_source(text: str) -> tuple[str, int]:
    """'203.0.113.5', '203.0.113.5:5060', '[2001:db8::1]:5060' → (ip, port)."""
    text = str(text).strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 5060)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 5060


def build_call(spec: dict[str, Any], default_tz: str) -> Call:
    headers: dict[str, list[str]] = {}
    for name, value in (spec.get("headers") or {}).items():
        headers.setdefault(name, []).extend(value if isinstance(value, list) else [str(value)])
    src_ip, src_port = split_source(spec.get("src", "127.0.0.1"))
    to_user = str(spec.get("to", ""))
    return Call(
        call_id=str(spec.get("call_id", "test-call")), from_user=str(spec.get("from", "")), to_user=to_user,
        ruri_user=str(spec.get("ruri", to_user)), src_ip=src_ip, src_port=src_port,
        transport=str(spec.get("transport", "udp")), headers=headers,
        at=parse_at(spec["at"], default_tz) if "at" in spec else None, counters=dict(spec.get("counters") or {}),
        trunk=str(spec.get("trunk") or ""),
    )


def decision_view(decision_dict: dict[str, Any]) -> dict[str, Any]:
    """The decision in the vocabulary of test expectations."""
    view: dict[str, Any] = {"outcome": decision_dict["outcome"], "rule": decision_dict["rule"],
                            "applied_rules": decision_dict.get("applied_rules", [decision_dict["rule"]]),
                            "headers": decision_dict.get("headers", {}),
                            "forks": [f["target"] for f in decision_dict.get("forks", [])],
                            "max_duration": decision_dict.get("max_duration_s"),
                            "tenant": decision_dict.get("tenant"),
                            "trunk": decision_dict.get("trunk"),
                            "anchor_media": decision_dict.get("anchor_media"),
                            "risk": decision_dict.get("risk", {}).get("outcome"),
                            "findings": [x["detector"] for x in decision_dict.get("risk", {}).get("findings", [])]}
    if "agent" in decision_dict:
        view["agent"] = decision_dict["agent"]["name"]
    if "destination" in decision_dict:
        view["destination"] = decision_dict["destination"]["name"]
    if "reject" in decision_dict:
        view["reject"] = decision_dict["reject"]
    if "webhook" in decision_dict:
        view["webhook"] = decision_dict["webhook"]["url"]
        view["fallback"] = decision_view(decision_dict["webhook"]["fallback"])
    return view


def _expected(expect: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """Normalise the expectation's short forms, keeping only the keys it names."""
    out: dict[str, Any] = {}
    for key, value in expect.items():
        if key == "reject":
            value = {"code": value} if isinstance(value, int) else dict(value)
            value = {**{"reason": actual.get("reject", {}).get("reason")}, **value} if "reason" not in value else value
        elif key == "max_duration" and value is not None:
            value = parse_duration_ms(value) // 1000
        elif key == "headers":
            value = {str(k): v for k, v in value.items()}
        elif key == "fallback":
            value = _expected(value, actual.get("fallback", {}))
        out[key] = value
    return out


def _restrict(actual: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in expect.items():
        got = actual.get(key)
        if key == "headers" and isinstance(got, dict):
            got = {name: got.get(name) for name in value}  # only the headers the test names
        elif key == "fallback" and isinstance(got, dict):
            got = _restrict(got, value)
        out[key] = got
    return out


def _dump(value: dict[str, Any]) -> list[str]:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def load_cases(path: FsPath, display: str) -> tuple[PositionedDocument, list[tuple[int, dict[str, Any]]]]:
    issues: list[PolicyIssue] = []
    try:
        doc = load_yaml(path.read_text(encoding="utf-8"), display)
    except YamlSyntaxError as exc:
        raise TestFileInvalid([PolicyIssue(exc.position, "", exc.message)]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TestFileInvalid([PolicyIssue(Position(display, 1, 1), "", f"cannot read: {exc}")]) from None
    cases = doc.data.get("tests") if isinstance(doc.data, dict) else None
    if not isinstance(cases, list):
        raise TestFileInvalid([PolicyIssue(doc.position(()), "tests", "a test file holds a `tests:` list")])
    out = []
    for i, case in enumerate(cases):
        path_ = ("tests", i)
        if not isinstance(case, dict) or not isinstance(case.get("call"), dict) or not isinstance(case.get("expect"), dict):
            issues.append(PolicyIssue(doc.position(path_), dotted(path_), "a test case needs `name`, `call:` and `expect:` mappings"))
            continue
        for section, allowed in (("call", CALL_KEYS), ("expect", EXPECT_KEYS)):
            for key in case[section]:
                if key not in allowed:
                    hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                    issues.append(PolicyIssue(doc.position(path_ + (section, key), key=True), dotted(path_ + (section, key)),
                                              f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                                          f" (expected one of: {', '.join(sorted(allowed))})")))
        out.append((i, case))
    if issues:
        raise TestFileInvalid(issues)
    return doc, out


def run_case(policy: Policy, doc: PositionedDocument, index: int, case: dict[str, Any]) -> CaseResult:
    name = str(case.get("name", f"test {index + 1}"))
    position = doc.position(("tests", index))
    try:
        call = build_call(case["call"], policy.source.settings.timezone)
    except (ValueError, TypeError) as exc:
        return CaseResult(name, position, False, f"bad call: {exc}")
    actual = decision_view(policy.decide(call).to_dict())
    reference = decision_view(policy.explain(call).decision.to_dict())
    expected = _expected(case["expect"], actual)
    got = _restrict(actual, expected)
    if got == expected and reference == actual:
        return CaseResult(name, position, True)
    if reference != actual:  # would be an engine bug, never an operator's
        diff = "\n".join(difflib.unified_diff(_dump(reference), _dump(actual), "reference evaluator", "compiled engine", lineterm=""))
        return CaseResult(name, position, False, "the compiled engine disagrees with the reference evaluator:\n" + diff)
    diff = "\n".join(difflib.unified_diff(_dump(expected), _dump(got), "expected", "actual", lineterm=""))
    return CaseResult(name, position, False, diff)


def run_policy_tests(policy: Policy, directory: str) -> tuple[list[CaseResult], list[PolicyIssue]]:
    """Run every case of `<directory>/tests/*.yaml`; returns results and test-file problems."""
    root = FsPath(directory) / "tests"
    results: list[CaseResult] = []
    problems: list[PolicyIssue] = []
    files = sorted(p for p in root.glob("*.y*ml") if p.suffix in (".yaml", ".yml")) if root.is_dir() else []
    for path in files:
        try:
            doc, cases = load_cases(path, f"tests/{path.name}")
        except TestFileInvalid as exc:
            problems.extend(exc.issues)
            continue
        results.extend(run_case(policy, doc, i, case) for i, case in cases)
    return results, problems
