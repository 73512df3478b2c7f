"""Decisions made at the edge itself, inside Kamailio (kamailio/edge_decide.py runs this in
its embedded Python): the same compiled policy, read from the file the controller writes
(controller/edge/bundle.py), without a round trip to the controller. The controller still
records every such call (the edge queues a `decided` event) and follows its dialog.

The edge decides a call only when its decision cannot depend on what only the controller
knows. It leaves the call to the controller (the evapi decide) when:
- a counter the call reads is near a limit: its scope (source, tenant, prefix …) is in the
  edge's `cfhot` table, pushed by the controller once a counter reaches half of the smallest
  limit reading it (controller/security/hot.py); below that, reading it as 0 compares the
  same against every limit;
- a limit is so small that half of it is 0;
- the policy asks a webhook, or a risk detector found something (scoring, bans and their
  timeline belong to the controller);
- no policy is loaded yet, the request is unusable, the record would not fit in an event, or
  anything goes wrong.

Standard library only; nothing here blocks (one stat() per second to notice a new policy)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

from controller.edge import bundle, protocol
from controller.edge.verdict import call_counters, hot_key, hot_thresholds, verdict
from controller.policy import Policy

RECHECK_S = 1.0  # how often the policy file is looked at
MAX_EVENT_BYTES = 24 * 1024  # the `decided` event must fit kamailio.cfg's pv_buffer_size (32 KB)


@dataclass(frozen=True, slots=True)
class EdgeOutcome:
    deferred: str  # why the controller decides this call ("" when the edge decided)
    answer: str = ""  # the answer JSON for route[EDGE_DECIDED]
    event: str = ""  # the `decided` event JSON for the controller

    @staticmethod
    def defer(reason: str) -> "EdgeOutcome":
        return EdgeOutcome(reason)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class EdgeDecider:
    def __init__(self, path: str, log: Callable[[str, str], None], clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.policy: Policy | None = None
        self._log = log  # (level: info|warn|error, message)
        self._clock = clock
        self._checked = -math.inf
        self._stamp: tuple | None = None
        self._thresholds: dict[str, int] = {}

    def refresh(self) -> None:
        """Load the policy file when it changed (looked at once per RECHECK_S); a file that
        cannot be used is reported and the last good policy keeps deciding."""
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as exc:
            stamp: tuple = ("missing", exc.errno)
            if stamp != self._stamp:
                self._stamp = stamp
                self._log("warn", f"edge policy {self.path}: {exc.strerror or exc}; the controller decides every call"
                          if self.policy is None else f"edge policy {self.path} is gone; still deciding with "
                          f"{self.policy.version}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            policy = Policy(bundle.read(self.path))
        except Exception as exc:  # BundleError, or a bug compiling it: keep the last good one
            kept = self.policy.version if self.policy else "none (the controller decides every call)"
            self._log("error", f"edge policy {self.path} refused: {exc}; still deciding with {kept}")
            return
        self.policy = policy
        self._thresholds = hot_thresholds(policy)
        self._log("info", f"edge policy {policy.version} loaded from {self.path}")

    def decide(self, request_json: str, is_hot: Callable[[str], bool]) -> EdgeOutcome:
        try:
            return self._decide(request_json, is_hot)
        except Exception as exc:  # never a failed call because of the edge's own decision
            self._log("error", f"edge decision failed, the controller decides: {type(exc).__name__}: {exc}")
            return EdgeOutcome.defer("error")

    def _decide(self, request_json: str, is_hot: Callable[[str], bool]) -> EdgeOutcome:
        started = time.perf_counter()
        self.refresh()
        policy = self.policy
        if policy is None:
            return EdgeOutcome.defer("no-policy")
        try:
            message = json.loads(request_json)
            request = protocol.parse_decide(message if isinstance(message, dict) else {})
        except (ValueError, protocol.BadRequest):
            return EdgeOutcome.defer("bad-request")
        facts = policy.compiled.facts(request.call)
        counters = call_counters(policy, facts)
        thresholds = self._thresholds
        for probe in counters:
            if thresholds.get(probe.key, 1) <= 0:
                return EdgeOutcome.defer("exact-counter")
            if is_hot(hot_key(probe)):
                return EdgeOutcome.defer("hot")
        decision = policy.compiled.decide_facts(facts)
        if decision.outcome == "webhook":
            return EdgeOutcome.defer("webhook")
        if decision.risk is not None:
            return EdgeOutcome.defer("risk")
        at_ms = time.time_ns() // 1_000_000
        result = verdict(policy, request, facts, decision, counters, at_ms=at_ms,
                         decide_ms=round((time.perf_counter() - started) * 1000, 3), decided_by="edge")
        event = {"event": "decided", "call_id": request.call.call_id, "tx": request.tx, "record": result.record,
                 "timeline": result.event, "live_scopes": result.live_scopes,
                 "counters": [[c.key, c.kind, c.scope, c.value, c.window_s, c.count, c.member]
                              for c in counters]}
        encoded = _json(event)
        if len(encoded) > MAX_EVENT_BYTES:  # beyond Kamailio's pv buffer: let the controller record it
            return EdgeOutcome.defer("too-big")
        return EdgeOutcome("", _json(result.answer), encoded)
