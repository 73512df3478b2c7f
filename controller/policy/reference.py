"""The reference evaluator: interprets each rule's conditions as written, every call, rule
after rule, and says why each rule did or did not match. It is the oracle the compiled
engine is tested against (same decisions on random policies and calls), the naive baseline
of bench/policy.py, and what `callfabric policy explain` prints."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from controller.policy import conditions as cond
from controller.policy.actionset import ActionSet, assemble
from controller.policy.facts import Facts
from controller.policy.model import Call, Decision, PolicySource, Position, trunk_refusal
from controller.policy.risk import CompiledSecurity

_LABEL = {"caller": "caller", "callee": "callee", "ruri": "dialled number (R-URI)"}
_DAY = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    text: str


@dataclass(frozen=True, slots=True)
class RuleTrace:
    rule: str
    position: Position
    matched: bool
    reason: str
    applied: bool  # its actions went into the decision


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    traces: tuple[RuleTrace, ...]
    facts: Facts


def _quote(values: list[Any]) -> str:
    shown = ", ".join(repr(str(v)) for v in values[:5])
    return shown + (f" (+{len(values) - 5} more)" if len(values) > 5 else "")


class ReferenceEvaluator:
    def __init__(self, source: PolicySource):
        self.source = source
        self.numbering = source.settings.numbering
        self._compiled_security: CompiledSecurity | None = None

    def decide(self, call: Call) -> Decision:
        return self.explain(call).decision

    def explain(self, call: Call) -> Explanation:
        f = Facts(call, self.source.settings, self.source.tenants, self.source.trunk_tenants())
        trunk = self.source.trunks.get(f.trunk or "")
        if trunk is not None and trunk.inbound.numbers:
            check = self.number("ruri", trunk.inbound.numbers, f)
            if not check.ok:
                trace = RuleTrace("trunk", trunk.position, True,
                                  f"trunk {trunk.name!r} does not carry this number: {check.text}", True)
                return Explanation(trunk_refusal(trunk.name, self.source.version, f.tenant), (trace,), f)
        security = self._security()
        if security is None:
            return self._explain_rules(f)
        risk = security.assess(f)
        if risk is None:
            explanation = self._explain_rules(f)
            return replace(explanation, decision=security.cap(explanation.decision))
        findings = "; ".join(f"{x.detector} (+{x.score}): {x.why}" for x in risk.findings)
        trace = RuleTrace("security", self.source.security.position, risk.outcome != "allow",
                          f"risk score {risk.score} → {risk.outcome}: {findings}", risk.outcome != "allow")
        if risk.outcome != "allow":
            return Explanation(security.decision(risk, f, self.source.version), (trace,), f)
        explanation = self._explain_rules(f)
        return Explanation(replace(security.cap(explanation.decision), risk=risk), (trace,) + explanation.traces, f)

    def _security(self) -> CompiledSecurity | None:
        """Risk scoring is shared code (it is not what the oracle checks): compiled once, lazily."""
        if self.source.security is None:
            return None
        if self._compiled_security is None:
            from controller.policy.compile import _Compiler

            self._compiled_security = CompiledSecurity(self.source.security, _Compiler(self.source))
        return self._compiled_security

    def _explain_rules(self, f: Facts) -> Explanation:
        traces: list[RuleTrace] = []
        applied: list[tuple[str, ActionSet]] = []
        for rule in self.source.rules:
            if not rule.enabled:
                traces.append(RuleTrace(rule.name, rule.position, False, "disabled (enabled: false)", False))
                continue
            check = self.check(rule.match, f) if rule.match is not None else Check(True, "no conditions: matches every call")
            traces.append(RuleTrace(rule.name, rule.position, check.ok, check.text, check.ok))
            if check.ok:
                applied.append((rule.name, rule.actions))
                if rule.actions.terminal is not None:
                    return Explanation(assemble(applied, f, self.source.version), tuple(traces), f)
        traces.append(RuleTrace("default", self.source.default_position, True, "no rule decided", True))
        applied.append(("default", self.source.default))
        return Explanation(assemble(applied, f, self.source.version), tuple(traces), f)

    # Each check returns whether it holds and a sentence saying why.
    def check(self, node: dict[str, Any], f: Facts) -> Check:
        checks = [self.kind(kind, value, f) for kind, value in node.items()]
        failed = [c for c in checks if not c.ok]
        return Check(not failed, "; ".join(c.text for c in (failed or checks)))

    def kind(self, kind: str, value: Any, f: Facts) -> Check:
        if kind == "all":
            results = [self.check(c, f) for c in value]
            failed = [c for c in results if not c.ok]
            return Check(not failed, "; ".join(c.text for c in (failed or results)))
        if kind == "any":
            results = [self.check(c, f) for c in value]
            for c in results:
                if c.ok:
                    return c
            return Check(False, "none of: " + " | ".join(c.text for c in results))
        if kind == "not":
            inner = self.check(value, f)
            # A failing inner check already says why `not` holds; a passing one is why it fails.
            return Check(not inner.ok, inner.text if not inner.ok else f"excluded because {inner.text}")
        if kind in _LABEL:
            return self.number(kind, value, f)
        if kind == "source_ip":
            nets = [cond.parse_network(t) for t in cond.as_list(value)]
            if f.src_ip is None:
                return Check(False, "the source address is unknown or not an IP")
            hit = [str(n) for n in nets if f.src_ip.version == n.version and f.src_ip in n]
            if hit:
                return Check(True, f"source {f.src_ip} is in {hit[0]}")
            return Check(False, f"source {f.src_ip} is not in {_quote([str(n) for n in nets])}")
        if kind == "transport":
            allowed = cond.as_list(value)
            ok = f.transport in allowed
            return Check(ok, f"transport {f.transport!r} is {'' if ok else 'not '}one of {_quote(allowed)}")
        if kind == "header":
            return self.header(value, f)
        if kind == "tenant":
            allowed = cond.as_list(value)
            ok = f.tenant is not None and f.tenant in allowed
            return Check(ok, f"tenant {f.tenant!r} is {'' if ok else 'not '}one of {_quote(allowed)}")
        if kind == "trunk":
            allowed = cond.as_list(value)
            ok = f.trunk is not None and f.trunk in allowed
            return Check(ok, f"trunk {f.trunk!r} is {'' if ok else 'not '}one of {_quote(allowed)}")
        if kind == "time":
            return self.time(value, f)
        if kind == "split":
            low, high = cond.split_bounds(value["percent"], value.get("offset", 0))
            bucket = cond.split_bucket(value.get("seed", ""), f.call_id)
            ok = low <= bucket < high
            return Check(ok, f"Call-ID bucket {bucket / 100:.2f}% is {'' if ok else 'not '}in "
                             f"[{low / 100:g}%, {high / 100:g}%) (seed {value.get('seed', '')!r})")
        if kind == "destination_risk":
            for name in cond.as_list(value):
                for prefix in self.source.risk_lists[name]:
                    if f.ruri.startswith(prefix):
                        return Check(True, f"dialled number {f.ruri!r} is in risk list {name!r} (prefix {prefix!r})")
            return Check(False, f"dialled number {f.ruri!r} is in none of the risk lists {_quote(cond.as_list(value))}")
        if kind in ("calls_in_window", "concurrent_calls"):
            if kind == "calls_in_window":
                seconds = cond.window_seconds(value["window"])
                key, what = f"window:{value['scope']}:{seconds}", f"calls in the last {seconds}s"
            else:
                key, what = f"live:{value['scope']}", "live calls"
            count = f.counter(key)
            ok = count >= value["at_least"]
            return Check(ok, f"{count} {what} for {value['scope']} {f.scope_value(value['scope'])!r} "
                             f"({'≥' if ok else '<'} {value['at_least']})")
        raise ValueError(f"unknown condition {kind!r}")

    def number(self, field: str, value: Any, f: Facts) -> Check:
        got = getattr(f, field)
        label = f"{_LABEL[field]} {got!r}"
        spec = value if isinstance(value, dict) else {"exact": value}
        results = []
        for key, items in spec.items():
            items = cond.as_list(items)
            if key == "exact":
                wanted = [cond.number_pattern(v, self.numbering) for v in items]
                ok = got in wanted
                results.append(Check(ok, f"{label} is {'' if ok else 'not '}{_quote(wanted)}"))
            elif key == "prefix":
                hit = [p for p in items if got.startswith(cond.number_prefix(p))]
                results.append(Check(bool(hit), f"{label} starts with {hit[0]!r}" if hit else
                                     f"{label} does not start with {_quote(items)}"))
            elif key == "regex":
                ok = re.search(items[0], got) is not None
                results.append(Check(ok, f"{label} {'matches' if ok else 'does not match'} /{items[0]}/"))
            elif key == "in_list":
                hit = [n for n in items if got in self.source.number_lists[n]]
                results.append(Check(bool(hit), f"{label} is in number list {hit[0]!r}" if hit else
                                     f"{label} is not in number list {_quote(items)}"))
        failed = [c for c in results if not c.ok]
        return Check(not failed, "; ".join(c.text for c in (failed or results)))

    def header(self, spec: dict[str, Any], f: Facts) -> Check:
        name = spec["name"]
        values = f.headers.get(name.lower(), ())
        fold = spec.get("ignore_case", False)
        if "present" in spec:
            ok = bool(values) == spec["present"]
            return Check(ok, f"header {name} is {'present' if values else 'absent'}")
        if not values:
            return Check(False, f"header {name} is absent")
        if "equals" in spec:
            wanted = cond.as_list(spec["equals"])
            norm = (lambda s: s.casefold()) if fold else (lambda s: s)
            ok = any(norm(v) == norm(w) for v in values for w in wanted)
            return Check(ok, f"header {name} {_quote(list(values))} {'equals' if ok else 'does not equal'} {_quote(wanted)}")
        ok = any(re.search(spec["regex"], v, re.IGNORECASE if fold else 0) for v in values)
        return Check(ok, f"header {name} {_quote(list(values))} {'matches' if ok else 'does not match'} /{spec['regex']}/")

    def time(self, spec: dict[str, Any], f: Facts) -> Check:
        tz = spec.get("tz", self.source.settings.timezone)
        local = f.at.astimezone(cond.zone(tz))
        weekday, minute = local.weekday(), local.hour * 60 + local.minute
        when = f"{local:%Y-%m-%d %H:%M} {_DAY[weekday]} ({tz})"
        problems = []
        if "days" in spec and weekday not in cond.parse_days(spec["days"]):
            problems.append(f"not on {spec['days']}")
        if "hours" in spec and not cond.minute_in_windows(minute, cond.parse_hours(spec["hours"])):
            problems.append(f"outside {spec['hours']}")
        if "dates" in spec:
            full, yearly = cond.parse_dates(spec["dates"])
            if (local.year, local.month, local.day) not in full and (local.month, local.day) not in yearly:
                problems.append(f"not on {spec['dates']}")
        if problems:
            return Check(False, f"time {when} is " + " and ".join(problems))
        return Check(True, f"time {when} is within {', '.join(f'{k} {spec[k]}' for k in ('days', 'hours', 'dates') if k in spec)}")
