"""What a policy is made of once validated, what it is asked (a Call) and what it answers
(a Decision). Pure data, standard library only."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from controller.policy.numbers import Numbering

if TYPE_CHECKING:
    from controller.policy.actionset import ActionSet

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TRUNK_PARAM = "cf-trunk"  # the URI parameter naming the outbound trunk of a branch
_TRANSPORT_OR_TRUNK = re.compile(r";(?:transport|cf-trunk)=[^;>]*")


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    position: Position
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f" {self.path}:" if self.path else ""
        return f"{self.position}: {self.severity}:{where} {self.message}"


class PolicyInvalid(Exception):
    """A policy that must not be used; `issues` holds every error found (and warnings)."""

    def __init__(self, issues: list[PolicyIssue]):
        self.issues = issues
        errors = [i for i in issues if i.severity == "error"]
        super().__init__(f"{len(errors)} error(s) in policy:\n" + "\n".join(str(i) for i in errors))


@dataclass(frozen=True, slots=True)
class NodeSet:
    name: str
    dispatcher_set: int


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    node_set: NodeSet
    endpoint: str
    transport: str
    codec: str
    webhook: str | None = None  # where events of this agent's calls go


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    uris: tuple[str, ...]  # primary first, then failover in order
    attempt_timeout_ms: int | None
    trunks: tuple[str, ...] = ()  # a number reached through outbound trunks: the trunk of each URI
    caller_id: str | None = None  # who a human called there sees calling (else the caller's number)

    def dial_uri(self) -> str:
        """The URI a media node dials (through the edge) to reach this destination. Through a
        trunk, the edge itself builds the carrier's URI (address, transport) and fails over to
        the trunk's failover trunks, so the node only names the number and the trunk."""
        if not self.trunks:
            return self.uris[0]
        return _TRANSPORT_OR_TRUNK.sub("", self.uris[0]) + f";{TRUNK_PARAM}={self.trunks[0]}"


@dataclass(frozen=True, slots=True)
class ForkTarget:
    name: str
    endpoint: str
    transport: str
    codec: str
    direction: str


@dataclass(frozen=True, slots=True)
class Fork:
    target: str
    endpoint: str
    transport: str
    codec: str
    direction: str


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    trunks: tuple[IPNetwork, ...]
    header_name: str | None  # lower-case
    header_value: str | None


@dataclass(frozen=True, slots=True)
class Secret:
    """Where a trunk's password is read from (never the policy itself): an environment
    variable of the process that needs it, or a file (e.g. a container secret)."""

    env: str | None = None
    file: str | None = None

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"


@dataclass(frozen=True, slots=True)
class Digest:
    username: str
    secret: Secret
    realm: str | None = None  # outbound: the carrier's realm, when known (lets the edge keep HA1 only)


@dataclass(frozen=True, slots=True)
class InboundTrunk:
    """Calls a carrier (or a PBX) sends us: recognised at the edge by source address and/or digest."""

    sources: tuple[IPNetwork, ...]
    digest: Digest | None
    numbers: Mapping[str, Any] | None  # a number match (like `ruri:`) the dialled number must pass
    tenant: str | None
    transports: tuple[str, ...]  # allowed signalling transports (empty: any)
    media: str  # always | nat-only | never: rtpengine anchors the call's media at the edge
    srtp: str  # off | optional | required


@dataclass(frozen=True, slots=True)
class OutboundTrunk:
    """Where calls to phone numbers leave us: a carrier's SIP address and how to present ourselves."""

    address: str  # host[:port]
    transport: str  # udp | tcp | tls
    digest: Digest | None
    from_host: str | None
    caller_ids: tuple[str, ...]  # E.164 numbers we may present; empty: the caller's own
    failover: tuple[str, ...]  # other outbound trunks, tried in order
    media: str
    srtp: str
    tls_name: str | None = None  # transport tls: the name the carrier's certificate must carry

    def tls_identity(self) -> str | None:
        """What the carrier's TLS certificate must name (`tls_name`, else the address's host: a
        DNS name, or an IP address in its SubjectAltName), None for udp/tcp."""
        if self.transport != "tls":
            return None
        if self.tls_name:
            return self.tls_name.lower()
        host = self.address[1:self.address.index("]")] if self.address.startswith("[") else self.address.split(":")[0]
        try:
            return ipaddress.ip_address(host).compressed
        except ValueError:
            return host.lower()

    def uri(self, number: str, trunk: str) -> str:
        """The carrier's URI for `number`; `cf-trunk` tells the edge which trunk's credentials,
        From and media apply to this branch (the edge removes it: kamailio/outbound.cfg)."""
        transport = f";transport={self.transport}" if self.transport != "udp" else ""
        return f"sip:{number}@{self.address}{transport};{TRUNK_PARAM}={trunk}"


@dataclass(frozen=True, slots=True)
class Trunk:
    name: str
    inbound: InboundTrunk | None
    outbound: OutboundTrunk | None
    position: Position = Position("<policy>", 1, 1)

    def dial_uri(self, number: str) -> str:
        """What a media node dials to call `number` through this (outbound) trunk: the edge
        builds the carrier's URI and fails over to the trunk's failover trunks."""
        assert self.outbound is not None
        return f"sip:{number}@{self.outbound.address};{TRUNK_PARAM}={self.name}"


@dataclass(frozen=True, slots=True)
class Settings:
    numbering: Numbering
    timezone: str
    limits_without_counters: str = "open"  # open | closed (schema.py)


@dataclass(slots=True)
class Call:
    """The facts of a new call as the edge saw them (SIP-derived: may be anything)."""

    call_id: str = ""
    from_user: str = ""
    to_user: str = ""
    ruri_user: str = ""
    src_ip: str = ""
    src_port: int = 0
    transport: str = "udp"
    headers: Mapping[str, Any] = field(default_factory=dict)  # name -> value or list of values
    at: datetime | None = None  # aware; None means now
    trunk: str = ""  # the inbound trunk the edge recognised (source address / digest), "" for none
    counters: Mapping[str, int] = field(default_factory=dict)  # see CounterSpec.key


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """A counter a policy reads: calls seen in a window, or live calls, per scope."""

    kind: str  # "window" | "live"
    scope: str  # source | tenant | caller | callee | global
    window_s: int = 0

    @property
    def key(self) -> str:
        return f"window:{self.scope}:{self.window_s}" if self.kind == "window" else f"live:{self.scope}"


class CounterProbe(NamedTuple):
    """A counter one call's risk detectors read (and, when `count`, add this call to): the
    controller fetches it from the call store before deciding. (A tuple: every call builds
    several, and a tuple is built several times faster than a frozen dataclass.)"""

    key: str  # where the value lands in Call.counters
    kind: str  # "window" | "live" | "distinct"
    scope: str  # the counter's namespace (source, tenant, global, short:source, dest …)
    value: str  # this call's value of the scope (an address, a tenant, a prefix)
    window_s: int = 0
    count: bool = True  # window: this call adds one; distinct: this call adds `member`
    member: str = ""


@dataclass(frozen=True, slots=True)
class Detector:
    """A validated risk detector (see schema.DETECTOR_KINDS)."""

    name: str
    kind: str
    score: int
    when: Mapping[str, Any] | None
    scope: str = "source"
    window_s: int = 60
    baseline_s: int = 3600
    factor: float = 5.0
    min_calls: int = 20
    max: int = 0
    lists: tuple[str, ...] = ()
    shorter_than_ms: int = 5000


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    detectors: tuple[Detector, ...]
    position: Position = Position("<policy>", 1, 1)  # of the `security:` section
    exempt: Mapping[str, Any] | None = None
    challenge_at: int | None = None
    challenge: "ActionSet | None" = None
    reject_at: int | None = None
    reject_code: int = 403
    reject_reason: str = "Forbidden"
    ban_at: int | None = None
    ban_s: int = 900
    ban_code: int = 403
    max_call_duration_s: int | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str
    score: int
    why: str


@dataclass(frozen=True, slots=True)
class RiskAssessment:
    """What the detectors found about one call and what it leads to."""

    score: int
    outcome: str  # allow | challenge | reject | ban
    findings: tuple[Finding, ...]
    ban_s: int | None = None  # when outcome is ban

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "outcome": self.outcome,
                               "findings": [{"detector": f.detector, "score": f.score, "why": f.why}
                                            for f in self.findings]}
        if self.ban_s is not None:
            out["ban_s"] = self.ban_s
        return out


@dataclass(frozen=True, slots=True)
class WebhookAsk:
    url: str
    timeout_ms: int
    fallback: "Decision"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one call: where it goes, plus what travels with it."""

    outcome: str  # "agent" | "sip" | "reject" | "webhook"
    rule: str  # the rule whose terminal action decided ("default" for the default)
    applied_rules: tuple[str, ...]  # every rule whose actions were applied, in order
    policy_version: str
    agent: Agent | None = None
    destination: Destination | None = None
    reject_code: int | None = None
    reject_reason: str | None = None
    webhook: WebhookAsk | None = None
    headers: tuple[tuple[str, str], ...] = ()
    forks: tuple[Fork, ...] = ()
    max_duration_s: int | None = None
    tenant: str | None = None
    risk: RiskAssessment | None = None  # when the policy scores risk and something was found
    on_answer: tuple[Mapping[str, Any], ...] = ()  # live actions (record, gather) once the agent is connected
    trunk: str | None = None  # the inbound trunk the call came in on
    anchor_media: str | None = None  # always | nat-only | never: overrides the trunk's media anchoring

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (what the decision record, explain and tests show)."""
        out: dict[str, Any] = {"outcome": self.outcome, "rule": self.rule}
        if len(self.applied_rules) > 1:
            out["applied_rules"] = list(self.applied_rules)
        if self.agent:
            a = self.agent
            out["agent"] = {"name": a.name, "node_set": a.node_set.name, "dispatcher_set": a.node_set.dispatcher_set,
                            "endpoint": a.endpoint, "transport": a.transport, "codec": a.codec}
        if self.destination:
            out["destination"] = {"name": self.destination.name, "uris": list(self.destination.uris)}
            if self.destination.trunks:
                out["destination"]["trunks"] = list(self.destination.trunks)
            if self.destination.attempt_timeout_ms:
                out["destination"]["attempt_timeout_ms"] = self.destination.attempt_timeout_ms
        if self.reject_code is not None:
            out["reject"] = {"code": self.reject_code, "reason": self.reject_reason}
        if self.webhook:
            out["webhook"] = {"url": self.webhook.url, "timeout_ms": self.webhook.timeout_ms,
                              "fallback": self.webhook.fallback.to_dict()}
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.forks:
            out["forks"] = [{"target": f.target, "endpoint": f.endpoint, "transport": f.transport,
                             "codec": f.codec, "direction": f.direction} for f in self.forks]
        if self.max_duration_s is not None:
            out["max_duration_s"] = self.max_duration_s
        if self.on_answer:
            out["on_answer"] = [dict(a) for a in self.on_answer]
        if self.tenant is not None:
            out["tenant"] = self.tenant
        if self.trunk is not None:
            out["trunk"] = self.trunk
        if self.anchor_media is not None:
            out["anchor_media"] = self.anchor_media
        if self.risk is not None:
            out["risk"] = self.risk.to_dict()
        out["policy_version"] = self.policy_version
        return out


@dataclass(frozen=True, slots=True)
class RuleSource:
    """A validated rule as written (conditions stay as data; evaluators compile or interpret them)."""

    name: str
    index: int
    position: Position
    match: Mapping[str, Any] | None
    actions: "ActionSet"
    enabled: bool = True


@dataclass(slots=True)
class PolicySource:
    """A validated policy, before compilation: plain data (picklable), so a validated policy
    can be handed to an evaluator that has nothing but the standard library."""

    version: str
    files: tuple[str, ...]
    settings: Settings
    node_sets: dict[str, NodeSet]
    agents: dict[str, Agent]
    destinations: dict[str, Destination]
    fork_targets: dict[str, ForkTarget]
    number_lists: dict[str, frozenset[str]]
    risk_lists: dict[str, tuple[str, ...]]
    tenants: tuple[Tenant, ...]
    rules: tuple[RuleSource, ...]
    default: "ActionSet"
    default_position: Position
    security: SecurityPolicy | None = None
    trunks: dict[str, Trunk] = field(default_factory=dict)
    warnings: tuple[PolicyIssue, ...] = field(default=())

    def trunk_tenants(self) -> dict[str, str | None]:
        """Inbound trunk name -> its tenant (the trunks a call can come in on)."""
        return {t.name: t.inbound.tenant for t in self.trunks.values() if t.inbound is not None}


def trunk_refusal(trunk: str, version: str, tenant: str | None) -> Decision:
    """A call to a number its inbound trunk does not carry: refused before any rule."""
    return Decision(outcome="reject", rule="trunk", applied_rules=("trunk",), policy_version=version,
                    reject_code=404, reject_reason="Not Found", tenant=tenant, trunk=trunk)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
