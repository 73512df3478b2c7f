"""What deciding a new call produces, whoever decides it — the controller (asked over evapi)
or the edge itself (kamailio/edge_decide.py, the same policy in Kamailio's embedded Python):
the counters the call reads and adds to, the answer Kamailio carries out, and the call record
with its first timeline event. One code path, so a call reads the same in Redis wherever it
was decided.

Standard library only (Kamailio's interpreter imports it), like the policy engine."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from controller.edge import protocol
from controller.policy import Decision
from controller.policy.facts import Facts
from controller.policy.model import CounterProbe


def target(decision: Decision) -> str:
    if decision.outcome == "agent":
        return decision.agent.name
    if decision.outcome == "sip":
        return decision.destination.name
    if decision.outcome == "reject":
        return str(decision.reject_code)
    return decision.webhook.url if decision.webhook else ""


def call_counters(policy: Any, facts: Facts) -> list[CounterProbe]:
    """The counters this call's conditions and risk detectors read (bound to its scope values)."""
    probes = [CounterProbe(s.key, s.kind, s.scope, facts.scope_value(s.scope), s.window_s)
              for s in policy.counter_specs]
    security = policy.compiled.security
    if security is not None:
        probes += security.probes(facts)
    return probes


def reject_floor(policy: Any, facts: Facts, decision: Decision | None = None) -> Decision | None:
    """The reject a call gets even when it takes the fallback (no controller, a timeout, a
    controller that cannot decide): the policy's own decision with what it knows without the
    controller — every counter read as 0, a decision webhook's fallback actions — when that is
    a reject (a blocked premium number, a source outside its hours, a risk list match …).
    None: the fallback may route it. A limit reached (counters) is not seen here."""
    decision = decision if decision is not None else policy.compiled.decide_facts(facts)
    if decision.outcome == "webhook":
        carried = decision.webhook.fallback
        security = policy.compiled.security
        if security is not None:
            carried = security.cap(carried if carried.risk else replace(carried, risk=decision.risk))
        decision = carried
    return decision if decision.outcome == "reject" else None


_ANSWERS_MAX = 512
_answers: dict[int, tuple[Decision, str, dict[str, Any], list[str]]] = {}  # id -> (decision, version, answer, dropped)


def _answer(tx: str, decision: Decision, version: str) -> tuple[dict[str, Any], list[str]]:
    """protocol.answer_for with callfabric's own headers: worked out once per decision (and
    policy version), the answer being the decision's but for its tx (rules without
    placeholders share one decision)."""
    cached = _answers.get(id(decision))
    if cached is None or cached[0] is not decision or cached[1] != version:
        internal = [("X-Callfabric-Policy", version), ("X-Callfabric-Rule", decision.rule)]
        if decision.outcome == "agent":
            internal.insert(0, ("X-Callfabric-Agent", decision.agent.name))
        answer, dropped = protocol.answer_for("", decision, internal)
        del answer["tx"]
        if len(_answers) >= _ANSWERS_MAX:
            _answers.clear()
        cached = _answers[id(decision)] = (decision, version, answer, dropped)
    answer = {"tx": tx, **cached[2]}
    if "uris" in answer:
        answer["uris"] = list(answer["uris"])  # (each answer its own list)
    return answer, list(cached[3])


@dataclass(slots=True)
class Verdict:
    decision: Decision  # what the call carries out (after a decision webhook: its answer or fallback)
    answer: dict[str, Any]  # for Kamailio (kamailio/PROTOCOL.md)
    record: dict[str, Any]  # the call record's fields
    event: dict[str, Any]  # its first timeline event ("decided")
    live_scopes: dict[str, str]  # live-call indexes the call joins (scope -> value)
    window_counters: list[CounterProbe]  # window / distinct counters the call adds to


def verdict(policy: Any, request: protocol.DecideRequest, facts: Facts, decision: Decision,
            counters: list[CounterProbe], *, at_ms: int, decide_ms: float, decided_by: str,
            timeline_extra: dict[str, Any] | None = None) -> Verdict:
    call = request.call
    extra = dict(timeline_extra or {})
    answer, dropped = _answer(request.tx, decision, policy.version)
    if dropped:
        extra["headers_dropped"] = dropped
    rejected = decision.outcome == "reject"
    record = {
        "state": "failed" if rejected else "routing",
        "outcome": decision.outcome, "rule": decision.rule, "applied_rules": list(decision.applied_rules),
        "target": target(decision), "policy_version": policy.version, "decision": decision.to_dict(),
        "from_uri": request.from_uri, "from_tag": request.from_tag, "to_uri": request.to_uri, "ruri": request.ruri,
        "caller": facts.caller, "callee": facts.callee, "dialled": facts.ruri,
        "src": f"{call.src_ip}:{call.src_port}", "transport": call.transport, "tenant": facts.tenant,
        "trunk": facts.trunk, "user_agent": request.user_agent, "tx": request.tx, "created_at_ms": at_ms, "decided_by": decided_by,
        "end_reason": "rejected" if rejected else None, "end_code": decision.reject_code if rejected else None,
        "ended_at_ms": at_ms if rejected else None,
    }
    live_scopes = {c.scope: c.value for c in counters if c.kind == "live" and c.scope != "global" and c.value}
    if facts.tenant:
        live_scopes["tenant"] = facts.tenant
    event = {"event": "decided", "ts": at_ms, "outcome": decision.outcome, "rule": decision.rule,
             "target": record["target"], "policy_version": policy.version, "decide_ms": decide_ms,
             "counters": dict(facts.counters) if facts.counters else None, "decided_by": decided_by, **extra}
    if decision.risk is not None:
        event["risk"] = decision.risk.to_dict()
    return Verdict(decision, answer, record, event, live_scopes, [c for c in counters if c.kind != "live"])
