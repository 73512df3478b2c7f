"""The controller keeps the edges' policy file current: every version it starts serving is
written (atomically, signed with the key), a refused one is not, and a write that fails — no
key, a directory that is not there — is reported and counted."""
from __future__ import annotations

import asyncio
import textwrap

from controller.edge import bundle
from controller.edge.publish import EdgePolicyPublisher
from controller.metrics import Metrics
from controller.policy.reload import PolicyHolder
from tests.policy.helpers import DECLARATIONS

RULES = textwrap.dedent("""\
    rules:
      - name: billing
        match: {ruri: "+442079460001"}
        actions: [route_agent: billing]
    """)


async def test_each_served_version_is_written_and_a_refused_one_is_not(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    await asyncio.to_thread((policies / "00-decl.yaml").write_text, DECLARATIONS)
    target, key = tmp_path / "edge.policy", tmp_path / "edge-policy.key"
    await asyncio.to_thread(bundle.create_key, key)
    metrics = Metrics()
    publisher: EdgePolicyPublisher | None = None
    holder = PolicyHolder(policies, lambda outcome: publisher.outcome(outcome))
    publisher = EdgePolicyPublisher(str(target), str(key), holder, metrics)

    async def read(path):
        return await asyncio.to_thread(lambda: bundle.read(path, bundle.read_key(key)))

    first = await holder.reload("start")
    await publisher.close()
    assert (await read(target)).version == first.version == publisher.written

    await asyncio.to_thread((policies / "10-rules.yaml").write_text, RULES)
    second = await holder.reload("file")
    await publisher.close()
    assert second.version != first.version
    assert (await read(target)).version == second.version

    await asyncio.to_thread((policies / "10-rules.yaml").write_text, "rules: [")
    refused = await holder.reload("file")
    await publisher.close()
    assert not refused.accepted
    assert (await read(target)).version == second.version  # the last good one stays
    assert metrics.registry.get_sample_value("callfabric_edge_policy_writes_total", {"result": "ok"}) == 2


async def test_a_write_that_fails_is_counted_and_tried_again_with_the_next_version(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    await asyncio.to_thread((policies / "00-decl.yaml").write_text, DECLARATIONS)
    metrics = Metrics()
    holder = PolicyHolder(policies)
    key = tmp_path / "edge-policy.key"
    publisher = EdgePolicyPublisher(str(tmp_path / "no-such-dir" / "edge.policy"), str(key), holder, metrics)
    outcome = await holder.reload("start")
    publisher.outcome(outcome)
    await publisher.close()
    assert publisher.written is None
    assert metrics.registry.get_sample_value("callfabric_edge_policy_writes_total", {"result": "error"}) == 1
    publisher.path = str(tmp_path / "edge.policy")
    publisher.outcome(outcome)  # no key file yet: nothing unsigned is ever written
    await publisher.close()
    assert publisher.written is None and not await asyncio.to_thread((tmp_path / "edge.policy").exists)
    assert metrics.registry.get_sample_value("callfabric_edge_policy_writes_total", {"result": "error"}) == 2
    await asyncio.to_thread(bundle.create_key, key)
    publisher.outcome(outcome)
    await publisher.close()
    assert publisher.written == outcome.version
