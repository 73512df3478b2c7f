"""The controller's Prometheus metrics. Names carry the `callfabric_` prefix and their unit;
label sets are bounded (rule names come from the policy, never Call-IDs or numbers).

Each Metrics object owns its registry, so several controllers can live in one process
(tests) without clashing."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

from controller.policy.reload import ReloadOutcome

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025,
                    0.05, 0.1, 0.25)


# Counters whose label values are known in advance: their series exist (at 0) from the start,
# so alerts and dashboards (rate, increase) see them before the first increment, and a reader
# asking for a name or value that does not exist gets nothing instead of a silent 0.
KNOWN_LABEL_VALUES: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "decision_errors": ("framing", "bad-json", "overload", "disconnected", "answer-too-long", "bad-request",
                        "no-policy", "redis", "internal", "bad-decided-event", "bad-ban-event", "bad-dialog-event",
                        "bad-fallback-event", "bad-auth-event", "bad-event"),
    "redis_errors": ("create", "counters", "transition", "media", "housekeeping", "security", "edge-events"),
    "edge_rpc_errors": ("block", "unblock", "htable.reload"),
    "hot_scopes": ("pushed", "failed", "dropped"),
    "edge_policy_writes": ("ok", "error"),
    "webhook_decisions": ("answered", "timeout", "error", "garbage", "invalid"),
    "risk_outcomes": ("allow", "challenge", "reject", "ban"),
    "commands_forwarded": ("answered", "timeout", "no-owner"),
    "redis_queue": ("queued", "flushed", "failed", "dropped"),
    "decisions_without_state": ("open", "closed", "edge", "replaying", "refused"),
    "policy_reloads": tuple((trigger, result) for trigger in ("start", "file", "signal", "api", "last-good")
                            for result in ("accepted", "refused")),
    "fallback_rejects": ("state-unavailable", "overload", "internal"),
    "bans_refused": ("policy", "api", "asterisk", "edge"),
    "policy_last_good_writes": tuple((where, result) for where in ("redis", "file", "encode")
                                     for result in ("ok", "error")),
    "dtmf": ("received", "sent"),
    "gathers": ("max_digits", "finish_key", "timeout", "replaced"),
    "amd": ("human", "machine", "unknown"),
    "recordings": ("completed", "failed"),
}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.decisions = Counter("callfabric_decisions_total", "Routing decisions: answered to the edge, or made "
                                 "by the edge itself and recorded here.", ["outcome", "rule"], registry=r)
        self.edge_made_decisions = Counter("callfabric_edge_made_decisions_total", "Decisions the edge made itself "
                                           "(its own copy of the policy) and this controller recorded.", ["outcome"],
                                           registry=r)
        self.edge_policy_mismatch = Counter("callfabric_edge_policy_mismatch_total", "Calls the edge decided with "
                                            "another policy version than this controller serves (briefly during a "
                                            "reload; lasting: an edge reading a file no controller updates).",
                                            registry=r)
        self.hot_scopes = Counter("callfabric_hot_scopes_total", "Scopes marked hot at the edges (their calls are "
                                  "decided here, with exact counters), by result: pushed, failed, dropped.",
                                  ["result"], registry=r)
        self.edge_policy_writes = Counter("callfabric_edge_policy_writes_total", "Policy files written for the "
                                          "edges' own decisions, by result (ok, error).", ["result"], registry=r)
        self.edge_trunk_writes = Counter("callfabric_edge_trunk_writes_total", "Trunk tables written for the edges, "
                                         "by result (ok; problems: a trunk's secret was missing; error).", ["result"],
                                         registry=r)
        self.edge_auth_failures = Counter("callfabric_edge_auth_failures_total", "Failed digest authentications of "
                                          "inbound trunks at the edge, by reason.", ["reason"], registry=r)
        self.decision_seconds = Histogram("callfabric_decision_duration_seconds",
                                          "Time from reading a decision request to writing its answer.",
                                          buckets=DECISION_BUCKETS, registry=r)
        self.decision_errors = Counter("callfabric_decision_errors_total",
                                       "Decision requests answered with the edge fallback or not at all.",
                                       ["reason"], registry=r)
        self.edge_fallbacks = Counter("callfabric_edge_fallbacks_total",
                                      "Calls the edge routed by its fallback instead of a decision.",
                                      ["reason"], registry=r)
        self.edge_events = Counter("callfabric_edge_events_total", "Edge events read (from each edge's stream, or "
                                   "over evapi) by result: applied (idempotently: a replay changes nothing), "
                                   "dropped (the evapi backlog was full while Redis was unreachable), failed "
                                   "(batches that hit a bug, read again).",
                                   ["source", "result"], registry=r)
        self.edge_events_lag = Gauge("callfabric_edge_events_lag", "Events in an edge's stream not yet applied "
                                     "(read by the controller consuming it).", ["edge"], registry=r)
        self.dialog_events = Counter("callfabric_dialog_events_total", "Dialog lifecycle events from the edge.",
                                     ["state", "reason"], registry=r)
        self.edge_connected = Gauge("callfabric_edge_connected", "1 while connected to the edge's decision channel.",
                                    ["edge"], registry=r)
        self.edge_in_flight = Gauge("callfabric_edge_in_flight", "Decision requests being processed.", registry=r)
        self.calls_reconciled = Counter("callfabric_calls_reconciled_total", "Live records of calls no edge holds "
                                        "(dlg.list) closed by reconciliation (their end was never recorded).",
                                        registry=r)
        self.calls_recovered = Counter("callfabric_calls_recovered_total", "Live calls whose records Redis lost "
                                       "(restarted without its data) recorded again from the edges' dialogs.",
                                       registry=r)
        self.live_calls = Gauge("callfabric_live_calls", "Calls live in the call store (all controllers).", registry=r)
        self.redis_up = Gauge("callfabric_redis_up", "1 when the call store answered the last health check.",
                              registry=r)
        self.redis_errors = Counter("callfabric_redis_errors_total", "Failed Redis operations.", ["operation"],
                                    registry=r)
        self.policy_reloads = Counter("callfabric_policy_reloads_total", "Policy loads by result.",
                                      ["trigger", "result"], registry=r)
        self.policy_last_good = Gauge("callfabric_policy_last_good", "1 while the policy serving is the last good copy "
                                      "(Redis or policy_last_good_file) because the files were refused at start.",
                                      registry=r)
        self.policy_last_good_writes = Counter("callfabric_policy_last_good_writes_total", "Serving policies kept as "
                                               "the last good one, by where (redis, file, encode) and result.",
                                               ["where", "result"], registry=r)
        self.policy_info = Gauge("callfabric_policy_info", "The policy version serving (value 1).", ["version"],
                                 registry=r)
        self.ari_connected = Gauge("callfabric_ari_connected", "1 while the events websocket of an Asterisk node is up.",
                                   ["node"], registry=r)
        self.ari_request_seconds = Histogram("callfabric_ari_request_duration_seconds", "ARI REST request latency.",
                                             ["operation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                                     0.25, 0.5, 1, 2.5, 5), registry=r)
        self.ari_request_errors = Counter("callfabric_ari_request_errors_total", "ARI requests that failed.",
                                          ["operation"], registry=r)
        self.forks_active = Gauge("callfabric_forks_active", "Live audio forks running.", registry=r)
        self.forks_started = Counter("callfabric_forks_started_total", "Audio forks started.", registry=r)
        self.forks_failed = Counter("callfabric_forks_failed_total", "Audio forks that failed.", ["reason"], registry=r)
        self.fork_start_seconds = Histogram("callfabric_fork_start_duration_seconds",
                                            "From the call entering the media plane (or the fork request) to the fork "
                                            "bridged.", buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
                                            registry=r)
        self.dtmf = Counter("callfabric_dtmf_total", "DTMF digits received from callers and humans, and sent to them.",
                            ["direction"], registry=r)
        self.gathers = Counter("callfabric_gathers_total", "Digit gathers by how they ended (max_digits, finish_key, "
                               "timeout, replaced).", ["reason"], registry=r)
        self.amd = Counter("callfabric_amd_total", "Answering-machine detections of outbound calls by result (human, "
                           "machine, unknown).", ["result"], registry=r)
        self.recordings = Counter("callfabric_recordings_total", "Call recordings by result (completed, failed).",
                                  ["result"], registry=r)
        self.recording_bytes = Counter("callfabric_recording_bytes_total", "Bytes of call recordings written "
                                       "(fetched from the media nodes).", registry=r)
        self.transfers = Counter("callfabric_transfers_total", "Transfers by kind and result.", ["kind", "result"],
                                 registry=r)
        self.rtp_packets = Counter("callfabric_media_rtp_packets_total",
                                   "RTP packets of callers' channels (leg=caller; direction: sent to the caller, "
                                   "received from the caller).", ["leg", "direction"], registry=r)
        self.one_way_audio = Counter("callfabric_one_way_audio_total",
                                     "Calls whose audio flowed one way only for one_way_audio_after_s (leg=agent: "
                                     "the caller hears nothing; leg=caller: the caller sends nothing).", ["leg"],
                                     registry=r)
        self.ami_connected = Gauge("callfabric_ami_connected", "1 while logged in to a node's AMI.", ["node"], registry=r)
        self.asterisk_security_events = Counter("callfabric_asterisk_security_events_total",
                                                "Security events reported by Asterisk (failed auth, bad requests …).",
                                                ["node", "event"], registry=r)
        self.pjsip_contact_reachable = Gauge("callfabric_pjsip_contact_reachable",
                                             "1 when a PJSIP contact of a node is reachable.", ["node", "endpoint"],
                                             registry=r)
        self.webhook_deliveries = Counter("callfabric_webhook_deliveries_total", "Event webhooks by type and result "
                                          "(delivered, failed after retries, dropped).", ["type", "result"], registry=r)
        self.webhook_seconds = Histogram("callfabric_webhook_duration_seconds", "Webhook request latency.", ["kind"],
                                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.webhook_decisions = Counter("callfabric_webhook_decisions_total", "Decision webhooks by result (answered, "
                                         "timeout, error, garbage, invalid).", ["result"], registry=r)
        self.risk_findings = Counter("callfabric_risk_findings_total", "Risk detectors that fired on a new call.",
                                     ["detector"], registry=r)
        self.risk_outcomes = Counter("callfabric_risk_outcomes_total", "New calls with a risk score, by outcome "
                                     "(allow, challenge, reject, ban).", ["outcome"], registry=r)
        self.bans = Counter("callfabric_bans_total", "Sources banned at the edge, by origin (policy, api, asterisk) "
                            "and the detector that weighed most (manual for the API).", ["origin", "detector"],
                            registry=r)
        self.fallback_rejects = Counter("callfabric_fallback_rejects_total", "Calls this controller could not decide "
                                        "(state-unavailable, overload, internal) that the policy rejects anyway: "
                                        "answered with that reject instead of the edge's fallback.", ["reason"],
                                        registry=r)
        self.bans_refused = Counter("callfabric_bans_refused_total", "Bans refused because they would hit a trusted "
                                    "peer (a media node, trusted_peers), by origin (policy, api, asterisk, edge).",
                                    ["origin"], registry=r)
        self.bans_active = Gauge("callfabric_bans_active", "Bans in force (at the last resync).", registry=r)
        self.edge_rpc_errors = Counter("callfabric_edge_rpc_errors_total", "Failed JSON-RPC calls to an edge.",
                                       ["method"], registry=r)
        # High availability: node leases, Redis outages, drains.
        self.node_owned = Gauge("callfabric_node_owned", "1 while this controller owns a media node's events (holds "
                                "its lease).", ["node"], registry=r)
        self.node_lease_events = Counter("callfabric_node_lease_events_total", "Media node lease changes: acquired, "
                                         "lost, released, in_doubt (Redis unreachable while owning), replaced (another "
                                         "client took the ARI application).", ["node", "event"], registry=r)
        self.node_takeover_seconds = Histogram("callfabric_node_takeover_duration_seconds",
                                               "From taking a media node's lease to its live calls resynced with ARI.",
                                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5), registry=r)
        self.media_fenced = Counter("callfabric_media_fenced_total", "Media record writes refused because another "
                                    "controller owns the node now (fencing token).", registry=r)
        self.commands_forwarded = Counter("callfabric_commands_forwarded_total", "API commands carried out by the "
                                          "owner of the call's media node, by result (answered, timeout, no-owner).",
                                          ["result"], registry=r)
        self.redis_outages = Counter("callfabric_redis_outages_total", "Times Redis became unreachable for state "
                                     "changes (they are queued until it is back).", registry=r)
        self.state_degraded = Gauge("callfabric_state_degraded", "1 while Redis is unreachable or the state changes "
                                    "queued meanwhile are being replayed (counters may be short).", registry=r)
        self.redis_queue_depth = Gauge("callfabric_redis_outage_queue_depth", "State changes waiting for Redis.",
                                       registry=r)
        self.redis_queue = Counter("callfabric_redis_outage_queue_total", "State changes through the outage queue: "
                                   "queued, flushed (written later), failed (refused by Redis), dropped (queue full).",
                                   ["event"], registry=r)
        self.decisions_without_state = Counter("callfabric_decisions_without_state_total", "Decisions made while "
                                               "Redis was unreachable, by mode (open: the policy decided without "
                                               "counters; closed: rejected 503; edge: the edge's fallback).",
                                               ["mode"], registry=r)
        self.draining = Gauge("callfabric_draining", "1 while this controller drains: no new calls, nodes handed over.",
                              registry=r)
        self._version: str | None = None
        for name, values in KNOWN_LABEL_VALUES.items():
            counter = getattr(self, name)
            for value in values:
                counter.labels(*((value,) if isinstance(value, str) else value))

    def policy_outcome(self, outcome: ReloadOutcome) -> None:
        self.policy_reloads.labels(outcome.trigger, "accepted" if outcome.accepted else "refused").inc()
        if outcome.accepted and outcome.version != self._version:
            if self._version is not None:
                self.policy_info.remove(self._version)
            self.policy_info.labels(outcome.version).set(1)
            self._version = outcome.version

    def redis_outage(self, event: str, depth: int) -> None:
        """The call store's outage queue reports here (state/outage.py events)."""
        self.redis_queue_depth.set(depth)
        if event == "down":
            self.redis_outages.inc()
            self.state_degraded.set(1)
        elif event == "replayed":
            self.state_degraded.set(0)
        elif event in ("queued", "flushed", "failed", "dropped"):
            self.redis_queue.labels(event).inc()

    def describe(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(exported name, type, label names, help) of every metric, in declaration order."""
        out = []
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase):
                name = metric._name + ("_total" if metric._type == "counter" else "")
                out.append((name, metric._type, tuple(metric._labelnames), metric._documentation))
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
