"""Risk scoring of a new call, compiled from the policy's `security` section: each detector
that fires adds its score, the total picks the outcome (allow, challenge, reject, ban).

Pure like the rest of the policy: the counters a detector needs are named per call
(`probes`), the controller fetches them into `Facts.counters`, then `assess` reads them. What
each detector found is written as a sentence, so a call's timeline says why it was stopped."""
from __future__ import annotations

import json
from dataclasses import replace
from itertools import chain
from typing import TYPE_CHECKING, Callable

from controller.policy.actionset import REASON_PHRASES, assemble
from controller.policy.facts import Facts
from controller.policy.model import (
    CounterProbe, Decision, Detector, Finding, RiskAssessment, SecurityPolicy,
)

if TYPE_CHECKING:
    from controller.policy.compile import _Compiler

Matcher = Callable[[Facts], bool]
# Counters fed by events after the decision (calls ending, Asterisk security events): the
# controller increments them in these namespaces, the detectors only read them.
SHORT_CALLS_SCOPE = "short:source"
ASTERISK_SECURITY_SCOPE = "astsec:source"
MAX_PROBED_VALUES = 4096  # scope values whose probes a detector keeps


def _scope_label(scope: str, value: str) -> str:
    return "all calls" if scope == "global" else f"{scope} {value}"


class _Measure:
    """One detector, compiled: which counters it needs for a call, and whether it fires."""

    def __init__(self, detector: Detector, when: Matcher, risk_prefixes: dict[str, str]):
        self.d = detector
        self.name = detector.name
        self.when = when
        self.prefixes = risk_prefixes  # destination_rate: prefix -> list name
        self.lengths = tuple(sorted({len(p) for p in risk_prefixes}, reverse=True))
        self.key = f"risk:{detector.name}"
        # the counter and the value below which the detector cannot fire: most calls stop there
        self.gate: tuple[str, int] | None = next(iter(self.limits().items()), None)
        self._made: dict[str, tuple[CounterProbe, ...]] = {}  # scope value -> its probes

    def _value(self, f: Facts) -> str:
        d = self.d
        if d.kind == "destination_rate":
            for n in self.lengths:
                if f.ruri[:n] in self.prefixes:
                    return f.ruri[:n]
            return ""
        if d.kind in ("short_calls", "asterisk_security"):
            return f.scope_value("source")
        return f.scope_value(d.scope)

    def probes(self, f: Facts) -> tuple[CounterProbe, ...]:
        d = self.d
        if d.kind == "match":
            return ()
        value = self._value(f)
        if not value:
            return ()
        if d.kind == "distinct_callees":
            return (CounterProbe(self.key, "distinct", f"callees:{d.scope}", value, d.window_s, member=f.ruri),)
        # the probes depend on the scope's value only: made once per value (calls come from the
        # same sources, tenants, prefixes again and again)
        made = self._made.get(value)
        if made is None:
            if len(self._made) >= MAX_PROBED_VALUES:
                self._made.clear()
            made = self._made[value] = tuple(self._make(d, value))
        return made

    def _make(self, d: Detector, value: str) -> list[CounterProbe]:
        if d.kind == "rate_spike":
            return [CounterProbe(self.key + ":window", "window", d.scope, value, d.window_s),
                    CounterProbe(self.key + ":baseline", "window", d.scope, value, d.baseline_s)]
        if d.kind == "concurrent_calls":
            return [CounterProbe(self.key, "live", d.scope, value)]
        if d.kind == "destination_rate":
            return [CounterProbe(self.key, "window", "dest", value, d.window_s)]
        if d.kind == "short_calls":
            return [CounterProbe(self.key, "window", SHORT_CALLS_SCOPE, value, d.window_s, count=False)]
        return [CounterProbe(self.key, "window", ASTERISK_SECURITY_SCOPE, value, d.window_s, count=False)]

    def limits(self) -> dict[str, int]:
        """The counter values (as `finding` reads them) from which this detector fires."""
        d = self.d
        if d.kind == "match":
            return {}
        if d.kind == "rate_spike":  # the baseline alone never fires it
            return {self.key + ":window": max(0, d.min_calls - 1)}
        return {self.key: d.max}

    def finding(self, f: Facts) -> str | None:
        """Why the detector fires for this call, or None."""
        d = self.d
        if d.kind == "match":
            return f"matched {_compact(d.when)}"
        gate = self.gate
        if gate is not None and f.counter(gate[0]) < gate[1]:
            return None
        value = self._value(f)
        if not value:
            return None
        who = _scope_label(d.scope, value)
        if d.kind == "rate_spike":
            seen, baseline = f.counter(self.key + ":window"), f.counter(self.key + ":baseline")
            calls = seen + 1
            expected = max(0, baseline - seen) * d.window_s / (d.baseline_s - d.window_s)
            if calls >= d.min_calls and calls >= d.factor * expected:
                return (f"{calls} calls in {d.window_s}s from {who}; its baseline is {expected:.1f} per "
                        f"{d.window_s}s (spike at ×{d.factor:g}, at least {d.min_calls})")
            return None
        if d.kind == "concurrent_calls":
            live = f.counter(self.key) + 1
            return f"{live} live calls for {who}, more than {d.max}" if live > d.max else None
        if d.kind == "destination_rate":
            calls = f.counter(self.key) + 1
            if calls > d.max:
                return (f"{calls} calls to prefix {value} ({self.prefixes[value]}) in {d.window_s}s, "
                        f"more than {d.max}")
            return None
        if d.kind == "short_calls":
            short = f.counter(self.key)
            if short >= d.max:
                return (f"{short} answered calls shorter than {d.shorter_than_ms / 1000:g}s from source {value} "
                        f"in {d.window_s}s (at most {d.max - 1})")
            return None
        if d.kind == "distinct_callees":
            distinct = f.counter(self.key) + 1
            if distinct > d.max:
                return f"{distinct} distinct numbers called by {who} in {d.window_s}s, more than {d.max}"
            return None
        events = f.counter(self.key)
        if events >= d.max:
            return f"{events} Asterisk security events from source {value} in {d.window_s}s"
        return None


def _compact(node: object, limit: int = 160) -> str:
    text = json.dumps(node, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CompiledSecurity:
    def __init__(self, policy: SecurityPolicy, compiler: "_Compiler"):
        self.policy = policy
        self.exempt: Matcher | None = compiler.condition(policy.exempt) if policy.exempt else None
        source = compiler.source
        self.measures: list[_Measure] = []
        for d in policy.detectors:
            prefixes = {p: name for name in d.lists for p in source.risk_lists.get(name, ())}
            self.measures.append(_Measure(d, compiler.condition(d.when), prefixes))
        self.cap_s = policy.max_call_duration_s

    def _active(self, f: Facts) -> tuple[_Measure, ...]:
        """The detectors that apply to this call (none when it is exempt). Worked out once
        per call for `probes` and `assess` alike, unless the counters were handed over in
        between (a `when` may read them)."""
        cached = f.risk_measures
        if cached is not None and cached[0] is f.counters:
            return cached[1]
        active = () if self.exempt is not None and self.exempt(f) else tuple(m for m in self.measures if m.when(f))
        f.risk_measures = (f.counters, active)
        return active

    def probes(self, f: Facts) -> list[CounterProbe]:
        """The counters this call's detectors read (fetched before `assess`)."""
        return list(chain.from_iterable(m.probes(f) for m in self._active(f)))

    def assess(self, f: Facts) -> RiskAssessment | None:
        findings = []
        for m in self._active(f):
            why = m.finding(f)
            if why is not None:
                findings.append(Finding(m.name, m.d.score, why))
        if not findings:
            return None
        score = sum(x.score for x in findings)
        p = self.policy
        if p.ban_at is not None and score >= p.ban_at:
            return RiskAssessment(score, "ban", tuple(findings), ban_s=p.ban_s)
        if p.reject_at is not None and score >= p.reject_at:
            return RiskAssessment(score, "reject", tuple(findings))
        if p.challenge_at is not None and score >= p.challenge_at:
            return RiskAssessment(score, "challenge", tuple(findings))
        return RiskAssessment(score, "allow", tuple(findings))

    def decision(self, risk: RiskAssessment, f: Facts, version: str) -> Decision:
        """The decision a challenge / reject / ban outcome imposes (rule `security`)."""
        p = self.policy
        if risk.outcome == "challenge":
            return replace(self.cap(assemble([("security", p.challenge)], f, version)), risk=risk)
        if risk.outcome == "ban":
            code, reason = p.ban_code, REASON_PHRASES.get(p.ban_code, "Forbidden")
        else:
            code, reason = p.reject_code, p.reject_reason
        return Decision(outcome="reject", rule="security", applied_rules=("security",), policy_version=version,
                        reject_code=code, reject_reason=reason, tenant=f.tenant, risk=risk, trunk=f.trunk)

    def cap(self, decision: Decision) -> Decision:
        """The policy-wide maximum call duration over whatever the rules (or a webhook) said."""
        cap = self.cap_s
        if cap is None or decision.outcome == "reject":
            return decision
        if decision.max_duration_s is not None and decision.max_duration_s <= cap:
            return decision
        webhook = decision.webhook
        if webhook is not None:
            webhook = replace(webhook, fallback=self.cap(webhook.fallback))
        return replace(decision, max_duration_s=cap, webhook=webhook)

    def limits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.measures:
            out.update(m.limits())
        return out

    def ends_short_calls(self) -> tuple[Detector, ...]:
        return tuple(m.d for m in self.measures if m.d.kind == "short_calls")

    def watches_asterisk(self) -> tuple[Detector, ...]:
        return tuple(m.d for m in self.measures if m.d.kind == "asterisk_security")
