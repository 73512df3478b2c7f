"""Builds deploy/grafana/dashboards/callfabric.json from the panel list below (the JSON is
committed; tests check it is current and that every metric a panel uses exists).

    python deploy/grafana/build_dashboard.py > deploy/grafana/dashboards/callfabric.json
"""
from __future__ import annotations

import json

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
Q = "histogram_quantile"

# (row title, [(panel title, type, unit, [(query, legend)])])
ROWS = [
    ("Calls", [
        ("Calls active", "stat", "none", [("max(callfabric_live_calls)", "live calls")]),
        ("Calls per second by outcome", "timeseries", "reqps",
         [("sum by (outcome) (rate(callfabric_decisions_total[1m]))", "{{outcome}}")]),
        ("Decision latency", "timeseries", "s",
         [(f"{Q}(0.5, sum by (le) (rate(callfabric_decision_duration_seconds_bucket[5m])))", "p50"),
          (f"{Q}(0.99, sum by (le) (rate(callfabric_decision_duration_seconds_bucket[5m])))", "p99")]),
        ("Rejects by rule", "timeseries", "reqps",
         [('sum by (rule) (rate(callfabric_decisions_total{outcome="reject"}[5m]))', "{{rule}}")]),
        ("Edge fallbacks by reason", "timeseries", "reqps",
         [("sum by (reason) (rate(callfabric_edge_fallbacks_total[5m]))", "{{reason}}"),
          ("sum by (reason) (rate(kamailio_callfabric_fallback_total[5m]))", "edge: {{reason}}")]),
        ("Decision errors by reason", "timeseries", "reqps",
         [("sum by (reason) (rate(callfabric_decision_errors_total[5m]))", "{{reason}}")]),
        ("Where calls are decided", "timeseries", "reqps",
         [("sum(rate(callfabric_edge_made_decisions_total[1m]))", "at the edge"),
          ("sum(rate(callfabric_decisions_total[1m])) - sum(rate(callfabric_edge_made_decisions_total[1m]))",
           "by a controller"),
          ("sum by (reason) (rate(kamailio_callfabric_edge_deferred_total[5m]))", "left to a controller: {{reason}}")]),
        ("Hot scopes marked / edge policy writes", "timeseries", "ops",
         [("sum by (result) (rate(callfabric_hot_scopes_total[5m]))", "hot scopes {{result}}"),
          ("sum by (result) (rate(callfabric_edge_policy_writes_total[5m]))", "policy file {{result}}")]),
    ]),
    ("Security", [
        ("Bans by origin and detector", "timeseries", "short",
         [("sum by (origin, detector) (increase(callfabric_bans_total[10m]))", "{{origin}} {{detector}}")]),
        ("Bans in force", "stat", "none", [("max(callfabric_bans_active)", "bans")]),
        ("Risk outcomes", "timeseries", "reqps",
         [("sum by (outcome) (rate(callfabric_risk_outcomes_total[5m]))", "{{outcome}}")]),
        ("Risk detectors firing", "timeseries", "reqps",
         [("sum by (detector) (rate(callfabric_risk_findings_total[5m]))", "{{detector}}")]),
        ("Asterisk security events", "timeseries", "ops",
         [("sum by (event) (rate(callfabric_asterisk_security_events_total[5m]))", "{{event}}")]),
        ("Ban pushes to the edge failing", "timeseries", "ops",
         [("sum by (method) (rate(callfabric_edge_rpc_errors_total[5m]))", "{{method}}")]),
    ]),
    ("Media", [
        ("Forks active", "stat", "none", [("sum(callfabric_forks_active)", "forks")]),
        ("Forks started / failed", "timeseries", "ops",
         [("sum(rate(callfabric_forks_started_total[5m]))", "started"),
          ("sum by (reason) (rate(callfabric_forks_failed_total[5m]))", "failed: {{reason}}")]),
        ("Fork start latency p95", "timeseries", "s",
         [(f"{Q}(0.95, sum by (le) (rate(callfabric_fork_start_duration_seconds_bucket[5m])))", "p95")]),
        ("One-way audio alarms", "timeseries", "short",
         [("sum by (leg) (increase(callfabric_one_way_audio_total[10m]))", "{{leg}}")]),
        ("Transfers", "timeseries", "ops",
         [("sum by (kind, result) (rate(callfabric_transfers_total[5m]))", "{{kind}} {{result}}")]),
        ("RTP packets on ExternalMedia legs", "timeseries", "pps",
         [("sum by (leg, direction) (rate(callfabric_media_rtp_packets_total[1m]))", "{{leg}} {{direction}}")]),
    ]),
    ("Edge: carriers, media, browsers", [
        ("Inbound trunk checks", "timeseries", "reqps",
         [("sum by (result) (rate(kamailio_callfabric_trunk_checks_total[5m]))", "{{result}}")]),
        ("Outbound trunk branches", "timeseries", "reqps",
         [("sum by (result) (rate(kamailio_callfabric_trunk_out_total[5m]))", "{{result}}")]),
        ("Media anchored at the edge (rtpengine)", "timeseries", "reqps",
         [("sum by (result) (rate(kamailio_callfabric_media_anchor_total[5m]))", "{{result}}"),
          ("sum by (reason) (rate(kamailio_callfabric_media_refused_total[5m]))", "refused: {{reason}}")]),
        ("Browsers (/phone)", "timeseries", "ops",
         [("sum by (result) (rate(kamailio_callfabric_phone_total[5m]))", "{{result}}")]),
        ("Trunk table / failed trunk digests", "timeseries", "ops",
         [("sum by (result) (rate(callfabric_edge_trunk_writes_total[5m]))", "table {{result}}"),
          ("sum by (reason) (rate(callfabric_edge_auth_failures_total[5m]))", "digest failed: {{reason}}")]),
    ]),
    ("In-call telephony", [
        ("Recordings", "timeseries", "ops",
         [("sum by (result) (rate(callfabric_recordings_total[5m]))", "{{result}}")]),
        ("Recording bytes written", "timeseries", "Bps",
         [("sum(rate(callfabric_recording_bytes_total[5m]))", "bytes/s")]),
        ("DTMF digits", "timeseries", "ops",
         [("sum by (direction) (rate(callfabric_dtmf_total[5m]))", "{{direction}}")]),
        ("Gathers by how they ended", "timeseries", "short",
         [("sum by (reason) (increase(callfabric_gathers_total[10m]))", "{{reason}}")]),
        ("Cold transfers (SIP REFER)", "timeseries", "short",
         [('sum by (result) (increase(callfabric_transfers_total{kind="refer"}[10m]))', "{{result}}")]),
        ("Answering-machine detection", "timeseries", "short",
         [("sum by (result) (increase(callfabric_amd_total[10m]))", "{{result}}")]),
    ]),
    ("Application (webhooks)", [
        ("Webhook latency p95", "timeseries", "s",
         [(f"{Q}(0.95, sum by (le, kind) (rate(callfabric_webhook_duration_seconds_bucket[5m])))", "{{kind}}")]),
        ("Webhook deliveries", "timeseries", "ops",
         [("sum by (result) (rate(callfabric_webhook_deliveries_total[5m]))", "{{result}}")]),
        ("Decision webhooks by result", "timeseries", "ops",
         [("sum by (result) (rate(callfabric_webhook_decisions_total[5m]))", "{{result}}")]),
    ]),
    ("Health", [
        ("Policy version serving", "table", "none", [("max by (version) (callfabric_policy_info)", "{{version}}")]),
        ("Policy reloads", "timeseries", "short",
         [("sum by (result) (increase(callfabric_policy_reloads_total[10m]))", "{{result}}")]),
        ("ARI connected per media node", "stat", "none", [("min by (node) (callfabric_ari_connected)", "{{node}}")]),
        ("Redis", "timeseries", "short",
         [("min(callfabric_redis_up)", "up"), ("sum(rate(callfabric_redis_errors_total[5m]))", "errors/s")]),
        ("Kamailio edge", "timeseries", "short",
         [('up{job="kamailio"}', "scrape up"), ("max(kamailio_callfabric_evapi_clients)", "controllers connected"),
          ("max(kamailio_callfabric_breaker_open)", "breaker open"),
          ("min(callfabric_edge_connected)", "controller → edge")]),
        ("Edge decisions by result", "timeseries", "reqps",
         [("sum by (result) (rate(kamailio_callfabric_decide_total[1m]))", "{{result}}")]),
        ("Call state: degraded, replay queue, reconciled", "timeseries", "short",
         [("max(callfabric_state_degraded)", "degraded (outage or replay)"),
          ("max(callfabric_redis_outage_queue_depth)", "changes queued"),
          ("sum(increase(callfabric_calls_reconciled_total[10m]))", "phantoms closed (10 min)")]),
        ("Edge events: written, queued, applied, dropped", "timeseries", "short",
         [("sum(rate(kamailio_callfabric_events_written_total[1m]))", "written to the stream /s"),
          ("max(kamailio_callfabric_events_queued)", "queued at the edge"),
          ("sum(rate(callfabric_edge_events_total{result=\"applied\"}[1m]))", "applied /s"),
          ("max by (edge) (callfabric_edge_events_lag)", "not yet applied: {{edge}}"),
          ("sum by (why) (increase(kamailio_callfabric_events_dropped_total[10m]))", "dropped: {{why}}")]),
    ]),
]


def build() -> dict:
    panels, next_id, y = [], 1, 0
    for title, row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for n, (panel_title, kind, unit, queries) in enumerate(row):
            panels.append({
                "id": next_id, "type": kind, "title": panel_title, "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": (n % 3) * 8, "y": y + (n // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {},
                "targets": [{"refId": chr(65 + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                            for i, (expr, legend) in enumerate(queries)],
            })
            next_id += 1
        y += ((len(row) + 2) // 3) * 8
    return {"uid": "callfabric", "title": "callfabric", "tags": ["callfabric"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": []}, "annotations": {"list": []},
            "panels": panels}


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
