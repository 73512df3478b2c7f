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
- no policy is loaded yet (no file, or none that verified: bundle.py), the request is
  unusable, the record would not fit in an event, or anything goes wrong.
When it leaves a call to the controller, it says which reject the policy gives the call whatever
the controller knows more (verdict.reject_floor): if the call then takes the fallback (no
controller, a timeout …), kamailio.cfg's route[FALLBACK] rejects it instead of routing it.

Standard library only; nothing here blocks (one stat() per second to notice a new policy)."""
from __future__ import annotations

import json
import math
import os
import re
import time
from functools import lru_cache
from typing import Any, Callable, Mapping, NamedTuple

from controller.actions import ANCHOR_MODES, is_trusted_header
from controller.edge import bundle, protocol
from controller.edge.verdict import call_counters, reject_floor, verdict
from controller.policy import Decision, Policy
from controller.policy.model import CounterProbe
from controller.policy.hot import hot_key, hot_thresholds

RECHECK_S = 1.0  # how often the policy file is looked at
MAX_EVENT_BYTES = 24 * 1024  # the `decided` event must fit kamailio.cfg's pv_buffer_size (32 KB)

# kamailio.cfg's limits on an answer (route[VALIDATE_ANSWER], kamailio/PROTOCOL.md): the edge's
# own answers are held to them here, before Kamailio carries them out.
ANSWER_HDRS_MAX = 8192
MAX_RELAY_URIS = 8
RING_TIMEOUT_MS = (1000, 600000)
MAX_DURATION_MAX_S = 86400
_HDR_LINES = re.compile(r"(?:[A-Za-z0-9!%*_+'~.-]+:[ \t]*[^\r\n]*\r\n)+")
_HDR_ROUTING = re.compile(r"(?:^|\n)(?:via|v|from|f|to|t|call-id|i|cseq|contact|m|route|record-route|max-forwards"
                          r"|content-[a-z-]*|l|c|e)[ \t]*:", re.IGNORECASE)
_RELAY_URI = re.compile(r'sips?:[^][ \t\n\r\f\v<>"]+', re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# kamailio.cfg's route[BUILD_DECIDE]: the caller's headers a decide event carries
HDRS_BUDGET = 4096  # bytes of names + values, in message order; headers beyond are left out
_CALLER_HEADER = re.compile(r"x-.+|p-asserted-identity|p-preferred-identity|remote-party-id|diversion|history-info"
                            r"|privacy|referred-by|user-agent|subject|priority|organization|call-info|alert-info",
                            re.IGNORECASE | re.DOTALL)
_UNUSABLE_NAME = re.compile(r"[].[]")  # (the jansson path splits names on '.' and '[')


class EdgeOutcome(NamedTuple):
    """(A tuple: one is made per call, several times faster than a frozen dataclass.)"""

    deferred: str  # why the controller decides this call ("" when the edge decided)
    reply: Mapping[str, Any] | None = None  # the answer (kamailio/PROTOCOL.md), as a controller sends it
    event: str = ""  # the `decided` event JSON for the controller
    # what route[EDGE_DECIDED] carries out: (pseudo-variable, value) as route[VALIDATE_ANSWER] sets them
    kamailio_vars: tuple[tuple[str, str | int], ...] = ()
    floor: tuple[int, str] | None = None  # deferred: the reject it gets if it takes the fallback

    @staticmethod
    def defer(reason: str, floor: Decision | None = None) -> "EdgeOutcome":
        return EdgeOutcome(reason, floor=(floor.reject_code, floor.reject_reason) if floor is not None else None)

    @property
    def answer(self) -> str:
        """The answer JSON ("" when deferred)."""
        return _json(self.reply) if self.reply is not None else ""


_json = json.JSONEncoder(separators=(",", ":")).encode
_str = json.encoder.encode_basestring_ascii  # (what _json does to a string, in C)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# _json's own C encoder, made once (JSONEncoder.encode makes one per call) and without the
# circular-reference bookkeeping (the event is built here: no cycles); _json itself on a
# Python built without the C accelerator
if json.encoder.c_make_encoder is not None:
    _c_encoder = json.encoder.c_make_encoder(None, _not_json, _str, None, ":", ",", False, False, True)

    def _fast_json(value: Any) -> str:
        return "".join(_c_encoder(value, 0))
else:  # pragma: no cover
    _fast_json = _json


# The `decided` event's parts that depend only on the decision (and the policy version):
# encoded once per decision (rules without placeholders share theirs) and pasted in.
_RECORD_OF_DECISION = frozenset(("state", "outcome", "rule", "applied_rules", "target", "policy_version", "decision",
                                 "end_reason", "end_code"))
_TIMELINE_OF_DECISION = frozenset(("event", "outcome", "rule", "target", "policy_version"))
_FRAGMENTS_MAX = 512
_PROBES_MAX = 4096


class DecidedEvent:
    """Encodes `decided` events: the JSON _json makes of the whole event (kamailio/PROTOCOL.md),
    with the record's and the timeline's fields that depend only on the decision encoded once
    per decision (the decision itself is most of the event)."""

    def __init__(self):
        self._decisions: dict[int, tuple[Decision, Any, str, str]] = {}  # id -> (decision, version, record, timeline)
        self._probes: dict[CounterProbe, str] = {}  # a counter probe -> its JSON

    def _counters(self, counters: list[CounterProbe]) -> str:
        """_json(counters), each probe encoded once: calls from one source, tenant, caller …
        read the same probes. (The policy makes them of str, int and bool fields, so probes
        that compare equal encode the same.)"""
        encoded = self._probes
        parts = []
        for probe in counters:
            part = encoded.get(probe)
            if part is None:
                if len(encoded) >= _PROBES_MAX:
                    encoded.clear()
                part = encoded[probe] = _fast_json(probe)
            parts.append(part)
        return f"[{','.join(parts)}]"

    def _fragments(self, decision: Decision, record: Mapping[str, Any], timeline: Mapping[str, Any]) -> tuple[str, str]:
        version = record.get("policy_version")
        cached = self._decisions.get(id(decision))
        if cached is None or cached[0] is not decision or cached[1] != version:
            if len(self._decisions) >= _FRAGMENTS_MAX:
                self._decisions.clear()
            cached = self._decisions[id(decision)] = (
                decision, version,
                _fast_json({k: v for k, v in record.items() if k in _RECORD_OF_DECISION and v is not None})[1:-1],
                _fast_json({k: v for k, v in timeline.items() if k in _TIMELINE_OF_DECISION})[1:-1])
        return cached[2], cached[3]

    def encode(self, call_id: str, tx: str, decision: Decision, record: Mapping[str, Any],
               timeline: Mapping[str, Any], live_scopes: Mapping[str, str], counters: list[CounterProbe]) -> str:
        """_json({"event": "decided", "call_id", "tx", "record" (its null fields left out),
        "timeline", "live_scopes", "counters"})."""
        of_record, of_timeline = self._fragments(decision, record, timeline)
        per_call = _fast_json({k: v for k, v in record.items() if v is not None and k not in _RECORD_OF_DECISION})
        per_event = _fast_json({k: v for k, v in timeline.items() if k not in _TIMELINE_OF_DECISION})
        return (f'{{"event":"decided","call_id":{_str(call_id)},"tx":{_str(tx)},'
                f'"record":{{{of_record}{"," if of_record and len(per_call) > 2 else ""}{per_call[1:]},'
                f'"timeline":{{{of_timeline}{"," if of_timeline and len(per_event) > 2 else ""}{per_event[1:]},'
                f'"live_scopes":{_fast_json(live_scopes)},"counters":{self._counters(counters)}}}')


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _state(path: str | None) -> tuple:
    """What identifies a file's content for a reload (it is read again when this changes)."""
    if not path:
        return ("none",)
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@lru_cache(maxsize=1024)
def _usable_hdrs(hdrs: str) -> bool:
    """CRLF-terminated "Name: value" lines, none of a routing-critical header (the answers of
    one decision share their lines: checked once)."""
    size = len(hdrs) if hdrs.isascii() else len(hdrs.encode())
    return size <= ANSWER_HDRS_MAX and (not hdrs or (_HDR_LINES.fullmatch(hdrs) is not None
                                                     and _HDR_ROUTING.search(hdrs) is None))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kamailio_vars(answer: Mapping[str, Any]) -> tuple[tuple[str, str | int], ...] | None:
    """An answer as route[VALIDATE_ANSWER] turns it into $var(a_*) for route[APPLY_ANSWER], or
    None when Kamailio would refuse it (a bug: the controller then decides the call)."""
    action, hdrs = answer.get("action"), answer.get("hdrs", "")
    if not isinstance(hdrs, str) or not _usable_hdrs(hdrs):
        return None
    ring, max_duration, dispatcher_set, uris, code, reason, media = 0, 0, 0, "", 0, "", ""
    if action in ("dispatch", "relay"):
        if "media" in answer:
            media = answer["media"]
            if media not in ANCHOR_MODES:
                return None
        if "ring_timeout_ms" in answer:
            ring = answer["ring_timeout_ms"]
            if not _count(ring) or not RING_TIMEOUT_MS[0] <= ring <= RING_TIMEOUT_MS[1]:
                return None
        if "max_duration_s" in answer:
            max_duration = answer["max_duration_s"]
            if not _count(max_duration) or not 1 <= max_duration <= MAX_DURATION_MAX_S:
                return None
    if action == "dispatch":
        dispatcher_set = answer.get("set")
        if not _count(dispatcher_set) or dispatcher_set < 0:
            return None
    elif action == "relay":
        listed = answer.get("uris")
        if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_RELAY_URIS or not all(
                isinstance(u, str) and len(u) <= 512 and _RELAY_URI.fullmatch(u) for u in listed):
            return None
        uris = ">".join(listed)  # '>' cannot appear in a URI here
    elif action == "reject":
        code, reason = answer.get("code"), answer.get("reason")
        if not _count(code) or not 400 <= code <= 699 or not isinstance(reason, str) or len(reason) > 128 \
                or _CONTROL.search(reason):
            return None
        reason = reason or "Rejected"
    else:
        return None
    return (("$var(a_action)", action), ("$var(a_hdrs)", hdrs), ("$var(a_ring)", ring),
            ("$var(a_maxdur)", max_duration), ("$var(a_set)", dispatcher_set), ("$var(a_uris)", uris),
            ("$var(a_code)", code), ("$var(a_reason)", reason), ("$var(a_media)", media))


def caller_headers(message: str, wanted: frozenset[str]) -> dict[str, list[str]]:
    """The `headers` of a decide event (route[BUILD_DECIDE]: the caller's X-* and identity
    headers, the names callfabric sets or trusts left out, at most HDRS_BUDGET bytes of them
    in message order),
    from the request as received, keeping only the names in `wanted` (lower case): what the
    policy reads. For requests of plain printable ASCII lines (route[JSAFE]), which are the
    only ones read this way: values are those lines' text after the colon, trimmed."""
    headers: dict[str, list[str]] = {}
    used = 0
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        name = name.rstrip(" ")
        if not colon or not _CALLER_HEADER.fullmatch(name) or is_trusted_header(name) or _UNUSABLE_NAME.search(name):
            continue
        value = value.strip(" ")
        if used + len(name) + len(value) > HDRS_BUDGET:
            continue
        used += len(name) + len(value)
        if name.lower() in wanted:
            headers.setdefault(name, []).append(value)
    return headers


class EdgeDecider:
    """One per Kamailio process (each has its own interpreter). The policy in use is the last
    one that verified: from the controller's file, else from the edge's own copy of the last
    file that verified (`cache_path`, written by whichever process verified it first), so a
    process that never saw a good file, or a Kamailio restarted while the file is tampered
    with, still has the policy the controller served last."""

    def __init__(self, path: str, key_path: str | None, log: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic, refused: Callable[[str, str], bool] | None = None,
                 cache_path: str | None = None):
        self.path = path
        self.key_path = key_path
        self.cache_path = cache_path
        self.policy: Policy | None = None
        self._log = log  # (level: info|warn|error, message)
        self._refused = refused or (lambda state, reason: True)  # (file state, reason) -> first to report it
        self._clock = clock
        self._checked = -math.inf
        self._stamp: tuple | None = None
        self._loaded_at = 0.0  # wall clock time the policy in use was loaded
        self._thresholds: dict[str, int] = {}
        self._event = DecidedEvent()
        self._vars: dict[int, tuple[Decision, str, Any]] = {}  # id -> (decision, version, kamailio_vars)

    def _kamailio_vars(self, decision: Decision, version: str, answer: Mapping[str, Any]):
        """kamailio_vars(answer), worked out once per decision (and policy version): an answer
        is the decision's but for its `tx`, which Kamailio's variables do not carry."""
        cached = self._vars.get(id(decision))
        if cached is None or cached[0] is not decision or cached[1] != version:
            if len(self._vars) >= _FRAGMENTS_MAX:
                self._vars.clear()
            cached = self._vars[id(decision)] = (decision, version, kamailio_vars(answer))
        return cached[2]

    def refresh(self) -> None:
        """Look at the files once per RECHECK_S; when the policy file, the key or the last good
        copy changed, use the policy file if it verifies, else the last good copy if it is newer
        than the policy in use. A file that cannot be used — unsigned, a MAC that does not
        verify, another code version, not a policy — is refused loudly (logged, counted once)."""
        now = self._clock()
        if now - self._checked < RECHECK_S:
            return
        self._checked = now
        main = _state(self.path)
        stamp = (main, _state(self.key_path), _state(self.cache_path))
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            if not self.key_path:
                raise bundle.BundleError("no-key", "no key to verify it with (EDGE_POLICY_KEY is not set)")
            key = bundle.read_key(self.key_path)
        except bundle.BundleError as exc:
            self._refuse(stamp, exc)
            return
        if main[0] == "missing":
            self._log("warn", f"edge policy {self.path} is not there; " + (
                f"still deciding with {self.policy.version}" if self.policy else "the controller decides every call"))
        else:
            try:
                data = _read(self.path)
                self._use(bundle.load(data, key), "")
            except Exception as exc:  # BundleError, or a bug compiling it: keep the last good one
                self._refuse(stamp, exc)
            else:
                self._keep(data)
                return
        self._from_cache(key)

    def _use(self, source, origin: str) -> None:
        policy = Policy(source)
        self.policy, self._thresholds, self._loaded_at = policy, hot_thresholds(policy), time.time()
        self._log("info", f"edge policy {policy.version} loaded from {origin or self.path}")

    def _refuse(self, stamp: tuple, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, bundle.BundleError) else "error"
        first = self._refused(":".join(map(str, stamp)), reason)
        kept = self.policy.version if self.policy else "none"
        self._log("error" if first else "info", f"edge policy {self.path} refused ({reason}): {exc}; still deciding "
                  f"with {kept}")

    def _keep(self, data: bytes) -> None:
        """Make the file that verified the edge's last good copy (atomically; once per content)."""
        if not self.cache_path:
            return
        try:
            if _read(self.cache_path) == data:
                return
        except OSError:
            pass
        directory = os.path.dirname(self.cache_path) or "."
        temporary = os.path.join(directory, f".{os.path.basename(self.cache_path)}.{os.getpid()}")
        try:
            with open(temporary, "wb") as out:
                out.write(data)
            os.replace(temporary, self.cache_path)
        except OSError as exc:
            self._log("warn", f"could not keep the last good edge policy in {self.cache_path}: {exc}")

    def _from_cache(self, key: bytes) -> None:
        if not self.cache_path:
            return
        try:
            cached_at = os.stat(self.cache_path).st_mtime
            if self.policy is not None and cached_at <= self._loaded_at:
                return  # ours is as recent
            source = bundle.load(_read(self.cache_path), key)
            if self.policy is None or source.version != self.policy.version:
                self._use(source, f"the last good copy {self.cache_path}")
        except FileNotFoundError:
            return
        except Exception as exc:
            self._log("warn", f"the last good edge policy copy {self.cache_path} is unusable: {exc}")

    @property
    def header_names(self) -> frozenset[str]:
        """The caller's headers the current policy reads (lower case), after refresh()."""
        return self.policy.compiled.header_names if self.policy is not None else frozenset()

    def floor(self, request: str | Mapping[str, Any]) -> EdgeOutcome:
        """For an edge that leaves every call to the controllers (EDGE_DECIDE 0): only the reject
        the call gets if it takes the fallback (deferred "controller")."""
        try:
            self.refresh()
            policy = self.policy
            if policy is None:
                return EdgeOutcome.defer("no-policy")
            message = json.loads(request) if isinstance(request, str) else request
            parsed = protocol.parse_decide(message if isinstance(message, dict) else {})
            return EdgeOutcome.defer("controller", reject_floor(policy, policy.compiled.facts(parsed.call)))
        except (ValueError, protocol.BadRequest):
            return EdgeOutcome.defer("bad-request")
        except Exception as exc:
            self._log("error", f"edge fallback check failed: {type(exc).__name__}: {exc}")
            return EdgeOutcome.defer("error")

    def decide(self, request: str | Mapping[str, Any], is_hot: Callable[[str], bool]) -> EdgeOutcome:
        """Decide the call of a decide event: its JSON, or the same fields already read (the
        `headers` only need the names in header_names)."""
        try:
            return self._decide(request, is_hot)
        except Exception as exc:  # never a failed call because of the edge's own decision
            self._log("error", f"edge decision failed, the controller decides: {type(exc).__name__}: {exc}")
            return EdgeOutcome.defer("error")

    def _decide(self, request: str | Mapping[str, Any], is_hot: Callable[[str], bool]) -> EdgeOutcome:
        started = time.perf_counter()
        self.refresh()
        policy = self.policy
        if policy is None:
            return EdgeOutcome.defer("no-policy")
        try:
            message = json.loads(request) if isinstance(request, str) else request
            parsed = protocol.parse_decide(message if isinstance(message, dict) else {})
        except (ValueError, protocol.BadRequest):
            return EdgeOutcome.defer("bad-request")
        facts = policy.compiled.facts(parsed.call)
        counters = call_counters(policy, facts)
        thresholds = self._thresholds
        watched = set()  # the scopes whose counters have a limit: one look each at the hot table
        for probe in counters:
            limit = thresholds.get(probe.key)
            if limit is not None:
                if limit <= 0:
                    return EdgeOutcome.defer("exact-counter", reject_floor(policy, facts))
                watched.add(hot_key(probe))
        if any(is_hot(key) for key in watched):
            return EdgeOutcome.defer("hot", reject_floor(policy, facts))
        decision = policy.compiled.decide_facts(facts)
        if decision.outcome == "webhook":
            return EdgeOutcome.defer("webhook", reject_floor(policy, facts, decision))
        if decision.risk is not None:
            return EdgeOutcome.defer("risk", reject_floor(policy, facts, decision))
        at_ms = time.time_ns() // 1_000_000
        result = verdict(policy, parsed, facts, decision, counters, at_ms=at_ms,
                         decide_ms=round((time.perf_counter() - started) * 1000, 3), decided_by="edge")
        carried_out = self._kamailio_vars(result.decision, policy.version, result.answer)
        if carried_out is None:
            self._log("error", f"edge answer refused by Kamailio's own checks, the controller decides: "
                               f"{_json(result.answer)[:300]}")
            return EdgeOutcome.defer("invalid", reject_floor(policy, facts, decision))
        # (a counter probe is the tuple [key, kind, scope, value, window_s, count, member]; the
        # record's null fields are left out: absent and null read the same)
        encoded = self._event.encode(parsed.call.call_id, parsed.tx, result.decision, result.record, result.event,
                                     result.live_scopes, counters)
        if len(encoded) > MAX_EVENT_BYTES:  # beyond Kamailio's pv buffer: let the controller record it
            return EdgeOutcome.defer("too-big", reject_floor(policy, facts, decision))
        return EdgeOutcome("", result.answer, encoded, carried_out)
