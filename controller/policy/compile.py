"""The fast evaluator: conditions compiled once per load into closures, and rules indexed by
the number, prefix or tenant they require, so a call only visits the rules that can match.

Evaluation is pure standard-library Python with no I/O, importable by Kamailio's embedded
interpreter."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Callable

from controller.policy import conditions as cond
from controller.policy.actionset import ActionSet, assemble
from controller.policy.facts import Facts, Source
from controller.policy.model import Call, CounterSpec, Decision, PolicySource, trunk_refusal
from controller.policy.risk import CompiledSecurity

Matcher = Callable[[Facts], bool]
NUMBER_FIELDS = ("caller", "callee", "ruri")


def _always(_: Facts) -> bool:
    return True


def _and(matchers: list[Matcher]) -> Matcher:
    if not matchers:
        return _always
    if len(matchers) == 1:
        return matchers[0]
    if len(matchers) == 2:
        a, b = matchers
        return lambda f: a(f) and b(f)
    items = tuple(matchers)

    def every(f: Facts) -> bool:
        for m in items:
            if not m(f):
                return False
        return True
    return every


def _or(matchers: list[Matcher]) -> Matcher:
    if len(matchers) == 1:
        return matchers[0]
    items = tuple(matchers)

    def some(f: Facts) -> bool:
        for m in items:
            if m(f):
                return True
        return False
    return some


def _prefix_test(prefixes: set[str]) -> Callable[[str], bool]:
    pset = frozenset(prefixes)
    lengths = tuple(sorted({len(p) for p in pset}))
    if len(lengths) == 1:
        (n,) = lengths
        return lambda value: value[:n] in pset

    def test(value: str) -> bool:
        for n in lengths:
            if value[:n] in pset:
                return True
        return False
    return test


_FIELD = {"caller": lambda f: f.caller, "callee": lambda f: f.callee, "ruri": lambda f: f.ruri}


class _Compiler:
    def __init__(self, source: PolicySource):
        self.source = source
        self.numbering = source.settings.numbering
        self.counters: set[CounterSpec] = set()
        self.counter_limits: dict[str, int] = {}  # counter key -> the smallest `at_least` reading it
        self.header_names: set[str] = {t.header_name for t in source.tenants if t.header_name}

    def condition(self, node: dict[str, Any] | None) -> Matcher:
        if node is None:
            return _always
        return _and([self.kind(kind, value) for kind, value in node.items()])

    def kind(self, kind: str, value: Any) -> Matcher:
        if kind == "all":
            return _and([self.condition(c) for c in value])
        if kind == "any":
            return _or([self.condition(c) for c in value])
        if kind == "not":
            inner = self.condition(value)
            return lambda f: not inner(f)
        if kind in NUMBER_FIELDS:
            return self.number(_FIELD[kind], value)
        if kind == "source_ip":
            nets = tuple(cond.parse_network(t) for t in cond.as_list(value))
            return lambda f: f.src_ip is not None and any(f.src_ip in n for n in nets)
        if kind == "transport":
            allowed = frozenset(cond.as_list(value))
            return lambda f: f.transport in allowed
        if kind == "header":
            return self.header(value)
        if kind == "tenant":
            tenants = frozenset(cond.as_list(value))
            return lambda f: f.tenant in tenants
        if kind == "trunk":
            trunks = frozenset(cond.as_list(value))
            return lambda f: f.trunk in trunks
        if kind == "time":
            return self.time(value)
        if kind == "split":
            low, high = cond.split_bounds(value["percent"], value.get("offset", 0))
            seed = value.get("seed", "")
            return lambda f: low <= f.bucket(seed) < high
        if kind == "destination_risk":
            prefixes = set(chain.from_iterable(self.source.risk_lists[n] for n in cond.as_list(value)))
            starts = _prefix_test(prefixes) if prefixes else (lambda v: False)
            return lambda f: starts(f.ruri)
        if kind == "calls_in_window":
            spec = CounterSpec("window", value["scope"], cond.window_seconds(value["window"]))
            return self.counter(spec, value["at_least"])
        if kind == "concurrent_calls":
            return self.counter(CounterSpec("live", value["scope"]), value["at_least"])
        raise ValueError(f"unknown condition {kind!r}")  # unreachable for validated policies

    def counter(self, spec: CounterSpec, at_least: int) -> Matcher:
        self.counters.add(spec)
        key = spec.key
        self.counter_limits[key] = min(at_least, self.counter_limits.get(key, at_least))
        return lambda f: f.counter(key) >= at_least

    def number(self, get: Callable[[Facts], str], value: Any) -> Matcher:
        spec = value if isinstance(value, dict) else {"exact": value}
        parts: list[Matcher] = []
        for key, items in spec.items():
            if key == "exact":
                exact = frozenset(cond.number_pattern(v, self.numbering) for v in cond.as_list(items))
                parts.append(lambda f, s=exact: get(f) in s)
            elif key == "prefix":
                starts = _prefix_test({cond.number_prefix(p) for p in cond.as_list(items)})
                parts.append(lambda f, t=starts: t(get(f)))
            elif key == "regex":
                search = cond.compile_regex(items).search
                parts.append(lambda f, s=search: s(get(f)) is not None)
            elif key == "in_list":
                members = frozenset(chain.from_iterable(self.source.number_lists[n] for n in cond.as_list(items)))
                parts.append(lambda f, s=members: get(f) in s)
        return _and(parts)

    def header(self, spec: dict[str, Any]) -> Matcher:
        name = spec["name"].lower()
        self.header_names.add(name)
        fold = spec.get("ignore_case", False)
        if "present" in spec:
            present = spec["present"]
            return lambda f: bool(f.headers.get(name)) is present
        if "equals" in spec:
            wanted = frozenset(v.casefold() if fold else v for v in cond.as_list(spec["equals"]))
            if fold:
                return lambda f: any(v.casefold() in wanted for v in f.headers.get(name, ()))
            return lambda f: any(v in wanted for v in f.headers.get(name, ()))
        search = cond.compile_regex(spec["regex"], re.IGNORECASE if fold else 0).search
        return lambda f: any(search(v) is not None for v in f.headers.get(name, ()))

    def time(self, spec: dict[str, Any]) -> Matcher:
        tz = spec.get("tz", self.source.settings.timezone)
        cond.zone(tz)
        parts: list[Callable[[tuple[int, int, tuple[int, int, int]]], bool]] = []
        if "days" in spec:
            days = cond.parse_days(spec["days"])
            parts.append(lambda t: t[0] in days)
        if "hours" in spec:
            windows = cond.parse_hours(spec["hours"])
            parts.append(lambda t: cond.minute_in_windows(t[1], windows))
        if "dates" in spec:
            full, yearly = cond.parse_dates(spec["dates"])
            parts.append(lambda t: t[2] in full or t[2][1:] in yearly)
        checks = tuple(parts)
        return lambda f: all(check(f.local(tz)) for check in checks)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    test: Matcher
    actions: ActionSet


def _index_keys(node: dict[str, Any] | None, compiler: _Compiler) -> tuple[str, str, frozenset[str]] | None:
    """A value the rule requires, usable to look the rule up: (kind, field, values)."""
    if not node:
        return None
    conjuncts: list[tuple[str, Any]] = []
    stack = [node]
    while stack:
        for kind, value in stack.pop().items():
            if kind == "all":
                stack.extend(value)
            else:
                conjuncts.append((kind, value))
    best: tuple[int, tuple[str, str, frozenset[str]]] | None = None
    numbering = compiler.numbering
    for kind, value in conjuncts:
        candidates: list[tuple[int, tuple[str, str, frozenset[str]]]] = []
        if kind in NUMBER_FIELDS:
            spec = value if isinstance(value, dict) else {"exact": value}
            if "exact" in spec:
                keys = frozenset(cond.number_pattern(v, numbering) for v in cond.as_list(spec["exact"]))
                candidates.append((0, ("exact", kind, keys)))
            if "in_list" in spec:
                keys = frozenset(chain.from_iterable(compiler.source.number_lists[n] for n in cond.as_list(spec["in_list"])))
                candidates.append((1, ("exact", kind, keys)))
            if "prefix" in spec:
                keys = frozenset(cond.number_prefix(p) for p in cond.as_list(spec["prefix"]))
                candidates.append((2, ("prefix", kind, keys)))
        elif kind == "tenant":
            candidates.append((3, ("tenant", "tenant", frozenset(cond.as_list(value)))))
        for candidate in candidates:
            if best is None or candidate[0] < best[0]:
                best = candidate
    return best[1] if best else None


class CompiledPolicy:
    """First match wins over the rules that can match; `continue` rules add their actions."""

    def __init__(self, source: PolicySource):
        compiler = _Compiler(source)
        self.version = source.version
        self.rules: list[CompiledRule] = []
        self._unindexed: list[int] = []
        self._exact: dict[str, dict[str, list[int]]] = {f: {} for f in NUMBER_FIELDS}
        self._prefix: dict[str, dict[str, list[int]]] = {f: {} for f in NUMBER_FIELDS}
        self._tenant: dict[str, list[int]] = {}
        for rule in source.rules:
            if not rule.enabled:
                continue
            position = len(self.rules)
            self.rules.append(CompiledRule(rule.name, compiler.condition(rule.match), rule.actions))
            key = _index_keys(rule.match, compiler)
            if key is None:
                self._unindexed.append(position)
                continue
            kind, field, values = key
            table = {"exact": self._exact.get(field), "prefix": self._prefix.get(field), "tenant": self._tenant}[kind]
            for value in values:
                table.setdefault(value, []).append(position)
        self._prefix_lengths = {f: tuple(sorted({len(p) for p in table})) for f, table in self._prefix.items()}
        self._exact_fields = tuple(f for f in NUMBER_FIELDS if self._exact[f])
        self._prefix_fields = tuple(f for f in NUMBER_FIELDS if self._prefix[f])
        self.security = CompiledSecurity(source.security, compiler) if source.security else None
        self.counter_specs = frozenset(compiler.counters)
        # counter key -> the value from which a condition or a detector reading it can fire
        self.counter_limits = dict(compiler.counter_limits)
        if self.security is not None:
            for key, limit in self.security.limits().items():
                self.counter_limits[key] = min(limit, self.counter_limits.get(key, limit))
        self.header_names = frozenset(compiler.header_names)
        self._settings = source.settings
        self._tenants = source.tenants
        self._trunk_tenants = source.trunk_tenants()
        # inbound trunk -> the test its dialled numbers must pass (trunks that restrict them)
        self._trunk_numbers = {t.name: compiler.number(_FIELD["ruri"], t.inbound.numbers)
                               for t in source.trunks.values() if t.inbound is not None and t.inbound.numbers}
        self._default = source.default
        self._decisions: dict[tuple, Decision] = {}  # (rule path, tenant) -> its decision, see _decision
        self._sources: dict[str, Source] = {}  # source addresses seen (facts.Source)

    def facts(self, call: Call) -> Facts:
        return Facts(call, self._settings, self._tenants, self._trunk_tenants, self._sources)

    def _candidates(self, f: Facts) -> list[int]:
        hits: list[list[int]] = []
        for field in self._exact_fields:
            found = self._exact[field].get(getattr(f, field))
            if found:
                hits.append(found)
        for field in self._prefix_fields:
            value = getattr(f, field)
            table = self._prefix[field]
            for n in self._prefix_lengths[field]:
                found = table.get(value[:n])
                if found:
                    hits.append(found)
        if self._tenant and f.tenant is not None:
            found = self._tenant.get(f.tenant)
            if found:
                hits.append(found)
        if not hits:
            return self._unindexed
        # Indexed and unindexed rules are disjoint; only the hits may repeat a rule.
        merged = self._unindexed + (hits[0] if len(hits) == 1 else list(set(chain.from_iterable(hits))))
        merged.sort()
        return merged

    def decide(self, call: Call) -> Decision:
        return self.decide_facts(self.facts(call))

    def decide_facts(self, f: Facts) -> Decision:
        """Decide from facts already derived (the edge derives them once to know which
        counters to fetch, then sets `f.counters`). A number its trunk does not carry is
        refused first; then risk scoring: a challenge, reject or ban outcome decides instead of
        the rules."""
        if f.trunk is not None and f.trunk in self._trunk_numbers and not self._trunk_numbers[f.trunk](f):
            return trunk_refusal(f.trunk, self.version, f.tenant)
        security = self.security
        if security is None:
            return self._rules_decide(f)
        risk = security.assess(f)
        if risk is not None and risk.outcome != "allow":
            return security.decision(risk, f, self.version)
        decision = self._rules_decide(f)
        return decision if risk is None else replace(decision, risk=risk)

    def _rules_decide(self, f: Facts) -> Decision:
        rules = self.rules
        applied: list[int] = []
        for position in self._candidates(f):
            rule = rules[position]
            if rule.test(f):
                applied.append(position)
                if rule.actions.terminal is not None:
                    return self._decision(tuple(applied), f)
        applied.append(DEFAULT)
        return self._decision(tuple(applied), f)

    def _decision(self, path: tuple[int, ...], f: Facts) -> Decision:
        """The decision of the rules at `path` (positions, DEFAULT for the default), capped by
        the policy's longest call. Most calls take one of a few paths whose actions read
        nothing of the call (no placeholder): those decisions are built once and shared
        (Decision is immutable)."""
        key = (path, f.tenant)
        decision = self._decisions.get(key)
        if decision is not None:
            return decision
        rules = self.rules
        applied = [(rules[p].name, rules[p].actions) if p != DEFAULT else ("default", self._default) for p in path]
        decision = assemble(applied, f, self.version)
        if self.security is not None:
            decision = self.security.cap(decision)
        if len(self._decisions) < MAX_SHARED_DECISIONS and not any(_per_call(actions) for _, actions in applied):
            self._decisions[key] = decision
        return decision


DEFAULT = -1  # the default's place in a decision path
MAX_SHARED_DECISIONS = 4096


def _per_call(actions: ActionSet) -> bool:
    """Whether the actions' outcome depends on the call (a header with a placeholder)."""
    fallback = actions.webhook_fallback
    return any(h.dynamic for h in actions.headers) or (fallback is not None and _per_call(fallback))
