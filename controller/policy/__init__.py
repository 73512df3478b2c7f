"""Routing policies written in YAML: validated with positions, compiled once, evaluated
without I/O, explained on demand, hot-reloaded with the last good version kept.

Pure: imports no other callfabric boundary (edge, media, state, api, security). Evaluating a
validated PolicySource needs only the standard library (Kamailio's embedded Python can run
it); loading YAML needs PyYAML and jsonschema."""
from __future__ import annotations

import os
from typing import Callable

from controller.policy.compile import CompiledPolicy
from controller.policy.model import Call, CounterSpec, Decision, PolicyInvalid, PolicyIssue, PolicySource
from controller.policy.reference import Explanation, ReferenceEvaluator

__all__ = ["Call", "CounterSpec", "Decision", "Explanation", "Policy", "PolicyInvalid", "PolicyIssue",
           "load_policy", "policy_from_texts"]


class Policy:
    """A loaded policy: `decide` is the fast path, `explain` the talking one."""

    def __init__(self, source: PolicySource):
        self.source = source
        self.version = source.version
        self.compiled = CompiledPolicy(source)
        self.reference = ReferenceEvaluator(source)
        self.decide: Callable[[Call], Decision] = self.compiled.decide
        self.counter_specs: frozenset[CounterSpec] = self.compiled.counter_specs
        self.header_names: frozenset[str] = self.compiled.header_names  # lower-case names conditions read
        self.warnings: tuple[PolicyIssue, ...] = source.warnings

    def explain(self, call: Call) -> Explanation:
        return self.reference.explain(call)


def load_policy(directory: str | os.PathLike[str]) -> Policy:
    """Read, validate and compile a policy directory; raises PolicyInvalid listing every issue."""
    from controller.policy.validate import read_policy_dir  # loading needs PyYAML + jsonschema, evaluating does not

    return Policy(read_policy_dir(directory))


def policy_from_texts(texts: dict[str, str]) -> Policy:
    """Same as load_policy for files held in memory (API candidates, tests)."""
    from controller.policy.validate import build_policy_source

    return Policy(build_policy_source(texts))
