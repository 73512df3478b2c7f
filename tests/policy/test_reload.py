"""Hot reload: atomic swap on a good version, last good kept on a bad one; file watch and
SIGHUP; file reads happen off the event loop (the autouse guard fails the test otherwise)."""
import asyncio
import os
import signal
import time

import pytest

from controller.policy.reload import PolicyHolder, reload_on_sighup
from tests.policy.helpers import DECLARATIONS, call

RULES_V1 = "rules:\n  - {name: v1, actions: [route_agent: billing]}\n"
RULES_V2 = "rules:\n  - {name: v2, actions: [route_sip: pbx]}\n"
BROKEN = "rules:\n  - {name: v3, actions: [route_sip: nowhere]}\n"


@pytest.fixture
def policy_dir(tmp_path):
    (tmp_path / "a.yaml").write_text(DECLARATIONS)
    (tmp_path / "b.yaml").write_text(RULES_V1)
    return tmp_path


def write_later(path, text):
    """Write from a thread, bumping mtime so a same-size rewrite is still seen."""
    def write():
        path.write_text(text)
        later = time.time() + 5
        os.utime(path, (later, later))
    return asyncio.to_thread(write)


async def until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_initial_load_then_good_reload_swaps(policy_dir):
    outcomes = []
    holder = PolicyHolder(policy_dir, outcomes.append)
    first = await holder.reload("start")
    assert first.accepted and first.changed and holder.policy.decide(call()).rule == "v1"
    await write_later(policy_dir / "b.yaml", RULES_V2)
    second = await holder.reload("api")
    assert second.accepted and second.previous == first.version and second.version != first.version
    assert holder.policy.decide(call()).rule == "v2"
    assert holder.policy.decide(call()).policy_version == second.version
    assert [o.trigger for o in outcomes] == ["start", "api"]


async def test_invalid_version_is_refused_and_the_last_good_keeps_serving(policy_dir, caplog):
    outcomes = []
    holder = PolicyHolder(policy_dir, outcomes.append)
    await holder.reload("start")
    serving = holder.policy
    await write_later(policy_dir / "b.yaml", BROKEN)
    outcome = await holder.reload("signal")
    assert not outcome.accepted and outcome.version == serving.version
    assert holder.policy is serving and holder.policy.decide(call()).rule == "v1"
    assert any("unknown destination 'nowhere'" in str(i) and str(i).startswith("b.yaml:2:") for i in outcome.issues)
    assert "refused, still serving " + serving.version in caplog.text


@pytest.fixture
def broken_dir(tmp_path):
    (tmp_path / "a.yaml").write_text("rules: [")
    return tmp_path


async def test_invalid_policy_at_start_serves_nothing(broken_dir):
    holder = PolicyHolder(broken_dir)
    outcome = await holder.reload("start")
    assert not outcome.accepted and holder.policy is None and outcome.previous is None


async def test_file_watch_reloads_on_change(policy_dir):
    outcomes = []
    holder = PolicyHolder(policy_dir, outcomes.append)
    await holder.reload("start")
    watcher = asyncio.create_task(holder.watch(interval=0.05))
    try:
        await write_later(policy_dir / "b.yaml", RULES_V2)
        await until(lambda: holder.policy.decide(call()).rule == "v2")
        await write_later(policy_dir / "b.yaml", BROKEN)
        await until(lambda: any(not o.accepted for o in outcomes))
        assert holder.policy.decide(call()).rule == "v2"  # last good kept
        await asyncio.sleep(0.2)
        assert sum(not o.accepted for o in outcomes) == 1  # a refused version is not retried until it changes
    finally:
        watcher.cancel()
    assert [o.trigger for o in outcomes] == ["start", "file", "file"]


async def test_sighup_reloads(policy_dir):
    holder = PolicyHolder(policy_dir)
    await holder.reload("start")
    reload_on_sighup(holder)
    try:
        await write_later(policy_dir / "b.yaml", RULES_V2)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: holder.policy.decide(call()).rule == "v2")
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


async def test_decisions_keep_flowing_during_a_reload(policy_dir):
    holder = PolicyHolder(policy_dir)
    await holder.reload("start")
    await write_later(policy_dir / "b.yaml", RULES_V2)
    reload = asyncio.create_task(holder.reload("api"))
    seen = set()
    while not reload.done():
        seen.add(holder.policy.decide(call()).rule)  # never None, never half a policy
        await asyncio.sleep(0)
    await reload
    seen.add(holder.policy.decide(call()).rule)
    assert seen <= {"v1", "v2"} and "v2" in seen


async def test_the_blocking_guard_catches_blocking_calls(no_blocking_on_loop):
    """The guard itself must be able to fail a test (else it proves nothing)."""
    time.sleep(0.001)
    with open(os.devnull, "rb"):
        pass
    found = list(no_blocking_on_loop.violations)
    no_blocking_on_loop.violations.clear()
    assert any("time.sleep" in v for v in found) and any("open" in v for v in found)
