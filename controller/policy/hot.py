"""Hot scopes, as the policy defines them: the thing a counter counts (a source, a tenant, a
prefix …) is hot once its counter reaches half of the smallest limit reading it. The edge
decides calls itself only while their scopes are cold (controller/edge/local.py); security
marks scopes hot at the edges (controller/security/hot.py). Standard library only, like the
rest of the policy engine (Kamailio's interpreter imports it)."""
from __future__ import annotations

from typing import Any

from controller.policy.model import CounterProbe


def hot_key(probe: CounterProbe) -> str:
    """The edge's name for the thing a counter counts (a source, a tenant, a prefix …): while
    it is hot, the edge leaves its calls to the controller, which reads the counters exactly."""
    return f"{probe.scope}|{probe.value}"


def hot_thresholds(policy: Any) -> dict[str, int]:
    """Counter key -> the value from which its scope is hot: half of the smallest limit that
    reads the counter (a condition's `at_least`, a detector's `max` …). Below it the edge may
    take the counter as 0 — every comparison against the limit comes out the same — and the
    exact count follows within milliseconds. 0: the edge never decides a call reading it."""
    return {key: limit // 2 for key, limit in policy.compiled.counter_limits.items()}
