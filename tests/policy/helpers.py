"""A small valid policy that tests extend, and evaluator helpers."""
from __future__ import annotations

import textwrap
from datetime import datetime, timezone

import pytest

from controller.policy import Call, Policy, PolicyInvalid, policy_from_texts

DECLARATIONS = textwrap.dedent("""\
    settings:
      numbering: {country_code: "44", international_prefix: "00", national_prefix: "0"}
      timezone: Europe/London
    node_sets:
      media: {dispatcher_set: 1}
    agents:
      intake: {node_set: media, endpoint: "127.0.0.1:4000"}
      billing: {node_set: media, endpoint: "127.0.0.1:4001", transport: audiosocket, codec: slin16}
      ws-agent: {node_set: media, endpoint: "agent_ws", transport: websocket}
    destinations:
      pbx: {uri: "sip:desk@pbx.example.com", failover: ["sip:desk@pbx2.example.com:5062"], attempt_timeout_ms: 2000}
    fork_targets:
      stt: {endpoint: "127.0.0.1:9100"}
      rec: {endpoint: "127.0.0.1:9200", codec: ulaw, direction: both}
    number_lists:
      vip: ["+442079460000", "07700900123"]
    risk_lists:
      premium: ["+44909", "+4487"]
    tenants:
      acme: {trunks: ["203.0.113.0/24"]}
      globex: {trunks: ["198.51.100.0/24"], header: {name: X-Tenant, equals: globex}}
      initech: {header: {name: X-Tenant, equals: initech}}
    default:
      actions: [route_agent: intake]
""")

AT = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)  # a Wednesday, 10:00 in London


def policy_with(rules_yaml: str, extra: dict[str, str] | None = None) -> Policy:
    return policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": textwrap.dedent(rules_yaml), **(extra or {})})


def issues_of(texts: dict[str, str]):
    with pytest.raises(PolicyInvalid) as info:
        policy_from_texts({name: textwrap.dedent(text) for name, text in texts.items()})
    return info.value.issues


def call(**fields) -> Call:
    fields.setdefault("at", AT)
    fields.setdefault("call_id", "call-1")
    fields.setdefault("src_ip", "192.0.2.1")
    return Call(**fields)
