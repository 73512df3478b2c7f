"""The Redis call store: one hash per call, a capped per-call timeline (stream), indexes of
live and recent calls, and the counters policies read. Every key of a call carries the
call's hash tag (`{…}`), so a call's keys live in one Redis Cluster slot and its scripts
touch one slot only.

A call is a small state machine; the store only moves it forward:

    routing ──▶ answered ──▶ ended
       ├──▶ failed   (rejected, cancelled, no answer, every target failed)
       └──▶ ended    (a dialog that ended without a confirmed state we saw)

Per call: one read of the counters the policy needs (only when it needs any), one write at
decision time (record, timeline, indexes, counters), one per dialog event. Commands of
concurrent calls share pipelines (batch.py)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from redis.exceptions import ConnectionError as RedisConnectionError

from controller.policy.model import CounterProbe as CounterRequest  # a counter bound to a call's scope value
from controller.state.batch import Script, raise_errors
from controller.state.connect import RedisTarget
from controller.state.outage import Observer, OutageQueue

PREFIX = "cf"
LIVE_INDEX = f"{PREFIX}:live"
RECENT_INDEX = f"{PREFIX}:recent"  # the latest calls, live or not (for operators' listings)
RECENT_KEEP = 10_000
EVENTS_CHANNEL = f"{PREFIX}:events"  # every timeline event, published for live listeners (any controller)
STATES = ("routing", "answered", "failed", "ended")
FINAL_STATES = ("failed", "ended")
# fields of the call hash that are the store's own bookkeeping, not the call's record
# (journal.py: `indexed`, a batch's second phase confirmed)
_BOOKKEEPING = frozenset(("indexed",))
_SAFE_ID = re.compile(r"[A-Za-z0-9\-_.@+!%*~:]{1,128}")


def call_key_id(call_id: str) -> str:
    """The call's identity inside keys: the Call-ID itself when it is short and plain,
    else a digest (a Call-ID is caller-controlled text)."""
    if _SAFE_ID.fullmatch(call_id):
        return call_id
    return "h-" + hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def call_key(call_id: str) -> str:
    return f"{PREFIX}:{{{call_key_id(call_id)}}}:call"


def timeline_key(call_id: str) -> str:
    return f"{PREFIX}:{{{call_key_id(call_id)}}}:timeline"


def live_scope_key(scope: str, value: str) -> str:
    return f"{PREFIX}:live:{{{scope}:{value}}}"


def command_key(call_id: str, key: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{PREFIX}:{{{call_key_id(call_id)}}}:command:{digest}"


def metadata_key(call_id: str) -> str:
    return f"{PREFIX}:{{{call_key_id(call_id)}}}:metadata"


def media_index_key(node: str) -> str:
    return f"{PREFIX}:media:{{{node}}}"


def window_key(scope: str, value: str, window_s: int, bucket: int) -> str:
    return f"{PREFIX}:rate:{{{scope}:{value}}}:{window_s}:{bucket}"


def distinct_key(scope: str, value: str, window_s: int, bucket: int) -> str:
    """A HyperLogLog of the distinct members (numbers called) of a scope in a window bucket."""
    return f"{PREFIX}:hll:{{{scope}:{value}}}:{window_s}:{bucket}"


def now_ms() -> int:
    return int(time.time() * 1000)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _field(value: Any) -> str:
    """A hash field's text: strings as they are, integers as digits, the rest as JSON."""
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    return _json(value)


# A new call. KEYS: call hash, timeline. ARGV: state, event name, event ts, event JSON,
# timeline cap, expiry seconds, fields JSON (an object of strings, state excluded), creation
# time (ms). A call is created once: when another controller decided it already (Kamailio
# may relay a decide to every controller), nothing is written and 0 is returned, so its
# counters are not counted twice. A decision written after events of its call (held by a
# controller while Redis was down, while another applied the edge's events) keeps the state
# they set (forward only) and goes first in the timeline, their entries written again after
# it; it returns 2 when the call is over already (its end set its retention and took it out
# of the live indexes: the creator takes it out of those it adds to), else 1. (Fields travel
# as one JSON document: decoding it costs Redis less than encoding dozens of arguments costs
# the controller.) The scripts' bodies are Lua functions of (KEYS, ARGV), so that the applier of
# the edges' event streams (journal.py) runs the very same code for a batch of calls; there
# the fields come as a table already. Timeline events are published on cf:events (the API's
# event streams, controller/api/events.py); the applier of a batch looks once whether anyone
# listens (`listened`) instead of publishing each event to nobody.
FIELDS_LUA = """
local function fields_of(fields)
  if type(fields) == 'string' then
    return cjson.decode(fields)
  end
  return fields
end
local listened = true
local function announce(event)
  if listened then
    redis.call('PUBLISH', 'cf:events', event)
  end
end
"""
CREATE_LUA = """
local function create(KEYS, ARGV)
  if redis.call('HSETNX', KEYS[1], 'created_at_ms', ARGV[8]) == 0 then
    return 0
  end
  local flat = {}
  for k, v in pairs(fields_of(ARGV[7])) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(flat))
  local state = redis.call('HGET', KEYS[1], 'state')
  local later = {}
  if state then
    later = redis.call('XRANGE', KEYS[2], '-', '+')
    redis.call('DEL', KEYS[2])
  else
    redis.call('HSET', KEYS[1], 'state', ARGV[1])
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'ts', ARGV[3], 'data', ARGV[4])
  for _, entry in ipairs(later) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(entry[2]))
  end
  announce(ARGV[4])
  if state == 'failed' or state == 'ended' then
    local retention = redis.call('TTL', KEYS[1])
    if retention > 0 then
      redis.call('EXPIRE', KEYS[2], retention)
    end
    return 2
  end
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  return 1
end
"""
_CREATE = Script(FIELDS_LUA + CREATE_LUA + "return create(KEYS, ARGV)\n")

# Moves a call forward only (never back, never to the state it is in: a change written
# twice — replayed after a lost reply — is applied once), appends to its timeline, sets its
# retention when it ends. KEYS: call hash, timeline. ARGV: new state, event name, event
# ts, event JSON, timeline cap, retention seconds (final states) or 0, live safety expiry,
# fields JSON. Returns {previous state or '', applied 0/1, live scopes JSON or '', source
# address:port or '', answered time (ms) or ''}.
TRANSITION_LUA = """
local function transition(KEYS, ARGV)
  local info = redis.call('HMGET', KEYS[1], 'state', 'live_scopes', 'src', 'answered_at_ms')
  local current, scopes, src, answered = info[1], info[2] or '', info[3] or '', info[4] or ''
  local new = ARGV[1]
  local rank = {routing=1, answered=2, failed=3, ended=3}
  if current and rank[current] and (rank[current] >= 3 or rank[new] <= rank[current]) then
    return {current, 0, scopes, src, answered}
  end
  local flat = {'state', new}
  for k, v in pairs(fields_of(ARGV[8])) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(flat))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'ts', ARGV[3], 'data', ARGV[4])
  announce(ARGV[4])
  local ttl = tonumber(ARGV[6])
  if ttl == 0 and not current then
    ttl = tonumber(ARGV[7])  -- a call first seen live: its safety expiry
  end
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
  end
  return {current or '', 1, scopes, src, answered}
end
"""
_TRANSITION = Script(FIELDS_LUA + TRANSITION_LUA + "return transition(KEYS, ARGV)\n")


# The media record of a call and a timeline event, fenced: the node owner's lease token
# (fence) must not be older than the one that last wrote the record, so a controller that
# lost a node (paused, partitioned) cannot overwrite what the new owner wrote. KEYS: call
# hash, timeline. ARGV: media JSON, fence, event name, event ts, event JSON, timeline cap.
# Returns 1, or 0 when fenced out.
_SAVE_MEDIA = Script("""
local stored = tonumber(redis.call('HGET', KEYS[1], 'media_fence') or '0') or 0
if tonumber(ARGV[2]) < stored then
  return 0
end
redis.call('HSET', KEYS[1], 'media', ARGV[1], 'media_fence', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[3], 'ts', ARGV[4], 'data', ARGV[5])
redis.call('PUBLISH', 'cf:events', ARGV[5])
return 1
""")


class FencedOut(Exception):
    """A media write refused: another controller took the node over (newer lease token)."""


@dataclass(frozen=True, slots=True)
class Transition:
    previous: str  # "" when the call was unknown
    applied: bool
    src: str = ""  # the call's source (ip:port) as recorded at its decision
    answered_at_ms: int | None = None
    queued: bool = False  # Redis was unreachable: held in the outage queue, written later


class CallStore:
    """Owns its Redis connections: a pipelining one for the call path (batch.py, or
    cluster.py), redis-py for the rest; and the outage queue that keeps state changes while
    Redis is unreachable."""

    def __init__(self, target: RedisTarget | str, *, timeline_max_events: int = 500, call_retention_s: int = 7 * 86400,
                 live_call_ttl_s: int = 6 * 3600, timeout_s: float = 2.0, outage_queue_max: int = 10_000,
                 observe_outage: Observer | None = None):
        self.target = RedisTarget.of(target)
        # No per-reply socket timeout on redis-py: the batcher bounds whole pipelines.
        self.redis = self.target.client(timeout_s)
        self.batch = self.target.batcher(timeout_s)
        self.outage = OutageQueue(self._probe, outage_queue_max, observe=observe_outage)
        self.timeline_max_events = timeline_max_events
        self.call_retention_s = call_retention_s
        self.live_call_ttl_s = live_call_ttl_s
        self._live_scopes: dict[str, dict[str, str]] = {}  # calls this store put in live indexes
        # Told of every timeline event this process writes (the webhook sender): local, so
        # several controllers never send one event twice.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Whether the listeners have a use for every event now (e.g. a webhook is configured):
        # the events Redis applies itself (journal.py apply_stream) come back here only then.
        self.wants_events: Callable[[], bool] = lambda: bool(self.listeners)

    def _emit(self, call_id: str, event: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener({**event, "call_id": call_id})
            except Exception:  # a listener's bug must not fail the write that happened
                logging.getLogger("callfabric.state").exception("event listener failed")

    async def aclose(self) -> None:
        await self.outage.close()
        self.batch.close()
        await self.redis.aclose()

    @property
    def available(self) -> bool:
        """False while Redis is unreachable (state changes are queued meanwhile)."""
        return self.outage.available

    @property
    def degraded(self) -> bool:
        """Redis unreachable, or older state changes still being replayed: counters may be short."""
        return self.outage.degraded

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def _probe(self) -> None:
        await self.batch.run([("PING",)])

    async def _write(self, what: str, call_id: str, write, *args: Any, queued: Any = None) -> Any:
        """Run a state change, `write(*args)`, now — or hold it in the outage queue (in order
        behind those held before) when Redis is unreachable; `queued` is what the caller gets
        then."""
        failed = not self.outage.available
        if not failed and not self.outage.holds(call_id):
            try:
                return await write(*args)
            except RedisConnectionError:
                failed = True
        # behind the older changes of the call still held (per-call order), or Redis is gone
        self.outage.hold(what, call_id, functools.partial(write, *args), failed=failed)
        return queued

    def _unavailable(self) -> None:
        """Reads fail at once while changes wait for Redis (no connect timeout per call)."""
        if not self.outage.available:
            raise RedisConnectionError(f"Redis unreachable ({self.outage.depth} state changes queued)")

    # -- counters -----------------------------------------------------------------------------
    async def read_counters(self, requests: Iterable[CounterRequest], at_ms: int) -> dict[str, int]:
        """read_counter_values keyed by each request's `key`."""
        requests = list(requests)
        return dict(zip((r.key for r in requests), await self.read_counter_values(requests, at_ms)))

    async def read_counter_values(self, requests: Iterable[CounterRequest], at_ms: int,
                                  urgent: bool = True) -> list[int]:
        """Current values of counters (in the order asked: several scope values may share a
        key), in one round trip.

        Calls in a window use two fixed buckets weighted by the window's elapsed part (a
        sliding-window estimate); live counts are the size of the live index of the scope;
        distinct members are the current bucket's HyperLogLog plus the weighted part of the
        previous one's members not in it."""
        commands: list[tuple] = []
        plan: list[tuple[str, str, float]] = []
        for r in requests:
            if r.kind == "live":
                commands.append(("ZCARD", LIVE_INDEX if r.scope == "global" else live_scope_key(r.scope, r.value)))
                plan.append((r.key, "live", 0.0))
            elif r.kind == "distinct":
                bucket, elapsed = divmod(at_ms, r.window_s * 1000)
                current = distinct_key(r.scope, r.value, r.window_s, bucket)
                commands.append(("PFCOUNT", current))
                commands.append(("PFCOUNT", current, distinct_key(r.scope, r.value, r.window_s, bucket - 1)))
                plan.append((r.key, "distinct", 1.0 - elapsed / (r.window_s * 1000)))
            else:
                bucket, elapsed = divmod(at_ms, r.window_s * 1000)
                commands.append(("GET", window_key(r.scope, r.value, r.window_s, bucket)))
                commands.append(("GET", window_key(r.scope, r.value, r.window_s, bucket - 1)))
                plan.append((r.key, "window", 1.0 - elapsed / (r.window_s * 1000)))
        if not commands:
            return []
        self._unavailable()
        replies = iter(await self.batch.run(commands, urgent))
        out: list[int] = []
        for _key, kind, previous_weight in plan:
            if kind == "live":
                out.append(int(next(replies) or 0))
            elif kind == "distinct":
                current, union = int(next(replies) or 0), int(next(replies) or 0)
                out.append(int(current + max(0, union - current) * previous_weight))
            else:
                current, previous = next(replies), next(replies)
                out.append(int(int(current or 0) + int(previous or 0) * previous_weight))
        return out

    # -- lifecycle ------------------------------------------------------------------------------
    async def create(self, call_id: str, record: dict[str, Any], *, live_scopes: dict[str, str],
                     window_counters: Iterable[CounterRequest], at_ms: int, event: dict[str, Any]) -> None:
        """Write a new call and wait until Redis has it (see send_create)."""
        raise_errors(await (await self.send_create(call_id, record, live_scopes=live_scopes,
                                                   window_counters=window_counters, at_ms=at_ms, event=event)))

    async def send_create(self, call_id: str, record: dict[str, Any], *, live_scopes: dict[str, str],
                          window_counters: Iterable[CounterRequest], at_ms: int,
                          event: dict[str, Any], hold: bool = True, urgent: bool = True) -> asyncio.Future:
        """Send a new call (decided: routing, or failed when rejected), its first timeline
        event, its indexes and its counters (`window_counters`: the window and distinct
        counters this call adds to): one round trip. Returns once the commands
        are in Redis's socket — ahead of anything later about this call, since Redis runs a
        connection's commands in order — with the future of their replies (check them with
        `raise_errors`). Window counters are counted once Redis says this controller created
        the call (not a duplicate decide), in a later pipeline. While Redis is unreachable the
        call is held in the outage queue (the future is then done at once) — unless `hold` is
        False. Not `urgent` (nobody waits: a call the edge decided), it may wait `linger_s` for
        company in a pipeline. Raises RedisError when it could be neither sent nor held."""
        args = (record, live_scopes, window_counters, at_ms, event, urgent)
        if not self.outage.available or self.outage.holds(call_id):
            if not hold:
                raise RedisConnectionError(f"Redis unreachable ({self.outage.depth} state changes queued)")
            return self._hold_create(call_id, *args, failed=not self.outage.available)
        try:
            sent = await self._send_create(call_id, *args)
        except RedisConnectionError:
            if not hold:
                raise
            return self._hold_create(call_id, *args)
        return self._held_if_lost(call_id, sent, args)

    def _held_if_lost(self, call_id: str, sent: asyncio.Future, args: tuple) -> asyncio.Future:
        """The replies of a create that is already in Redis's socket. When the connection dies
        before Redis answers (a restart, a failover), or Redis answers that it cannot take
        writes now (loading its AOF, demoted), the call may or may not be stored: the create
        is held and written again when Redis is back. Writing it twice is harmless (a call's
        first create wins), and it is held before any later change of the call, which comes
        after this reply."""
        result = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future) -> None:
            if done.cancelled():
                result.cancel()
                return
            problem = done.exception()
            replies = [] if problem is not None else done.result()
            lost = problem if isinstance(problem, RedisConnectionError) else next(
                (r for r in replies[:1] if isinstance(r, RedisConnectionError)), None)
            if lost is None:
                if problem is not None:
                    result.set_exception(problem)
                else:
                    result.set_result(replies)
                return
            try:
                self._hold_create(call_id, *args)
            except RedisConnectionError as full:  # the outage queue is full: said and counted there
                result.set_exception(full)
                return
            logging.getLogger("callfabric.state").warning(
                "call %s: Redis did not confirm its record (%s): held and written again when Redis is back",
                call_id, lost)
            result.set_result([])
        sent.add_done_callback(settle)
        return result

    def _hold_create(self, call_id: str, *args: Any, failed: bool = True) -> asyncio.Future:
        async def write() -> None:
            raise_errors(await (await self._send_create(call_id, *args)))
        self.outage.hold("decision", call_id, write, failed=failed)
        done = asyncio.get_running_loop().create_future()
        done.set_result([])
        return done

    async def _send_create(self, call_id: str, record: dict[str, Any], live_scopes: dict[str, str],
                           window_counters: Iterable[CounterRequest], at_ms: int,
                           event: dict[str, Any], urgent: bool = True) -> asyncio.Future:
        final = record.get("state") in FINAL_STATES
        fields = {k: _field(v) for k, v in record.items() if v is not None}
        state = fields.pop("state")
        created = fields.pop("created_at_ms", str(at_ms))
        fields["call_id"] = call_id
        fields["live_scopes"] = _json(live_scopes)
        ttl = self.call_retention_s if final else self.live_call_ttl_s
        commands: list[tuple] = [
            ("EVALSHA", _CREATE, [call_key(call_id), timeline_key(call_id)],
             [state, *_event_args({**event, "call_id": call_id}), self.timeline_max_events, ttl, _json(fields),
              created]),
            ("ZADD", RECENT_INDEX, at_ms, call_id),
        ]
        if not final:
            commands.append(("ZADD", LIVE_INDEX, at_ms, call_id))
            for scope, value in live_scopes.items():
                commands += [("ZADD", live_scope_key(scope, value), at_ms, call_id),
                             ("EXPIRE", live_scope_key(scope, value), self.live_call_ttl_s)]
            self._live_scopes[call_id] = live_scopes
        counted: set[str] = set()  # a policy condition and a detector may read the same counter
        counters: list[tuple] = []  # not idempotent: only when this controller created the call
        for r in window_counters:
            if not r.count:
                continue
            bucket = at_ms // (r.window_s * 1000)
            if r.kind == "distinct":
                bucket_key = distinct_key(r.scope, r.value, r.window_s, bucket)
                if r.member:
                    commands += [("PFADD", bucket_key, r.member), ("EXPIRE", bucket_key, 2 * r.window_s + 1)]
                continue
            bucket_key = window_key(r.scope, r.value, r.window_s, bucket)
            if bucket_key not in counted:
                counted.add(bucket_key)
                counters += [("INCR", bucket_key), ("EXPIRE", bucket_key, 2 * r.window_s + 1)]
        operation = await self.batch.send(commands, urgent)
        self._emit(call_id, event)
        if not counters and final:
            return operation.replies
        done = asyncio.get_running_loop().create_future()
        operation.replies.add_done_callback(functools.partial(
            self._after_create, call_id, counters, None if final else live_scopes, done))
        return done

    def _after_create(self, call_id: str, counters: list[tuple], live_scopes: dict[str, str] | None,
                      done: asyncio.Future, created: asyncio.Future) -> None:
        """After the create's replies: count the call in its windows if this controller created
        it, and take it out of the live indexes (`live_scopes`: it was put in them) if it was
        over before its decision was written (_CREATE returned 2); `done` gets the create's
        replies once that is over (an index or counter that could not be written is logged;
        it does not fail the record)."""
        if created.exception() is not None:
            done.set_exception(created.exception())
            return
        replies = created.result()
        made = replies[0]
        follow_up = list(counters) if made in (1, 2) else []  # not for a duplicate decide (or an error reply)
        if made == 2 and live_scopes is not None:
            self._live_scopes.pop(call_id, None)
            follow_up.append(("ZREM", LIVE_INDEX, call_id))
            follow_up += [("ZREM", live_scope_key(s, v), call_id) for s, v in live_scopes.items()]
        if not follow_up:
            done.set_result(replies)
            return

        def followed(result: asyncio.Future) -> None:
            problem = result.exception() or next((r for r in result.result() if isinstance(r, Exception)), None)
            if problem is not None:
                logging.getLogger("callfabric.state").error("call %s: its counters or live indexes were not "
                                                            "written: %s", call_id, problem)
            if not done.done():
                done.set_result(replies)
        self.batch.submit(follow_up, urgent=False).replies.add_done_callback(followed)

    async def transition(self, call_id: str, state: str, fields: dict[str, Any], event: dict[str, Any]) -> Transition:
        """Move a call forward (answered, failed, ended); a final state removes it from the
        live indexes and starts its retention. A call we never saw is created by it."""
        if state not in STATES:
            raise ValueError(f"unknown call state {state!r}")
        return await self._write("transition", call_id, self._transition, call_id, state, fields, event,
                                 queued=Transition("", False, queued=True))

    async def _transition(self, call_id: str, state: str, fields: dict[str, Any], event: dict[str, Any]) -> Transition:
        final = state in FINAL_STATES
        fields = {k: _field(v) for k, v in {**fields, "call_id": call_id}.items() if v is not None}
        commands: list[tuple] = [("EVALSHA", _TRANSITION, [call_key(call_id), timeline_key(call_id)],
                                  [state, *_event_args({**event, "call_id": call_id}), self.timeline_max_events,
                                   self.call_retention_s if final else 0, self.live_call_ttl_s, _json(fields)])]
        known = self._live_scopes.pop(call_id, None) if final else None
        if final:  # leaving the live indexes is right whether or not this event is the one that ends it
            commands.append(("ZREM", LIVE_INDEX, call_id))
            commands += [("ZREM", live_scope_key(s, v), call_id) for s, v in (known or {}).items()]
        replies = await self.batch.run(commands, urgent=False)
        previous, applied, stored_scopes = _text(replies[0][0]), bool(int(replies[0][1])), _text(replies[0][2])
        src, answered = _text(replies[0][3]), _text(replies[0][4])
        if applied:
            self._emit(call_id, event)
        if final and known is None and stored_scopes:  # decided elsewhere (another controller, a restart)
            scopes = _loads(stored_scopes)
            if isinstance(scopes, dict) and scopes:
                await self.batch.run([("ZREM", live_scope_key(str(s), str(v)), call_id) for s, v in scopes.items()])
        elif applied and not previous and not final:  # first seen live (routed by the edge's fallback)
            await self.batch.run([("ZADD", LIVE_INDEX, now_ms(), call_id), ("ZADD", RECENT_INDEX, now_ms(), call_id)])
        return Transition(previous, applied, src, int(answered) if answered.isdigit() else None)

    async def reconcile_live(self, older_than_ms: int, batch: int = 500) -> int:
        """Drop live-index entries whose call is over or gone (an end seen before a late
        decision, a record expired because its end was never seen), and trim the recent
        index. Returns how many live entries were dropped."""
        await self.redis.zremrangebyrank(RECENT_INDEX, 0, -RECENT_KEEP - 1)
        candidates = [_text(c) for c in await self.redis.zrangebyscore(LIVE_INDEX, 0, older_than_ms, start=0, num=batch)]
        if not candidates:
            return 0
        states = await self.batch.run([("HGET", call_key(c), "state") for c in candidates])
        stale = [c for c, state in zip(candidates, states) if state is None or _text(state) in FINAL_STATES]
        if stale:
            await self.redis.zrem(LIVE_INDEX, *stale)
            for call_id in stale:
                self._live_scopes.pop(call_id, None)
        return len(stale)

    async def live_edge_calls(self, older_than_ms: int, limit: int = 2000) -> list[str]:
        """Live calls that came through an edge (their record has its `tx`), live since before
        `older_than_ms`: what reconciliation checks against the edges' dialogs."""
        candidates = [_text(c) for c in await self.redis.zrangebyscore(LIVE_INDEX, 0, older_than_ms, start=0,
                                                                       num=limit)]
        if not candidates:
            return []
        replies = await self.batch.run([("HMGET", call_key(c), "tx", "state") for c in candidates])
        return [c for c, (tx, state) in zip(candidates, replies)
                if tx is not None and _text(state or b"") not in FINAL_STATES]

    # -- media records (the media plane's part of a call) ---------------------------------------
    async def save_media(self, call_id: str, media: dict[str, Any], event: dict[str, Any], fence: int = 0) -> None:
        """The call's media record and a timeline event, together (one slot, one round trip),
        written only if `fence` (the node owner's lease token) is not older than the last
        writer's: raises FencedOut otherwise."""
        await self._write("media", call_id, self._save_media, call_id, _json(media), event, fence)

    async def _save_media(self, call_id: str, media: str, event: dict[str, Any], fence: int) -> None:
        (saved,) = await self.batch.run([("EVALSHA", _SAVE_MEDIA, [call_key(call_id), timeline_key(call_id)],
                                          [media, fence, *_event_args({**event, "call_id": call_id}),
                                           self.timeline_max_events])])
        if saved != 1:
            raise FencedOut(f"call {call_id}: its media record was written by a newer owner of its node")
        self._emit(call_id, event)

    async def load_media(self, call_id: str) -> dict[str, Any] | None:
        (raw,) = await self.batch.run([("HGET", call_key(call_id), "media")])
        data = _loads(_text(raw)) if raw is not None else None
        return data if isinstance(data, dict) else None

    async def append_event(self, call_id: str, event: dict[str, Any]) -> None:
        await self._write("event", call_id, self._append_event, call_id, event)

    async def _append_event(self, call_id: str, event: dict[str, Any]) -> None:
        fields = _event_fields({**event, "call_id": call_id})
        await self.batch.run([("XADD", timeline_key(call_id), "MAXLEN", "~", self.timeline_max_events, "*", *fields),
                              ("PUBLISH", EVENTS_CHANNEL, fields[-1])], urgent=False)
        self._emit(call_id, event)

    async def set_fields(self, call_id: str, fields: dict[str, Any]) -> None:
        command = ("HSET", call_key(call_id), *_flat({k: _field(v) for k, v in fields.items()}))
        await self._write("fields", call_id, self.batch.run, [command])

    async def add_media_call(self, node: str, call_id: str) -> None:
        """Index of the calls whose media lives on `node`, for recovery after a restart."""
        await self._write("media index", call_id, self.batch.run, [("SADD", media_index_key(node), call_id)])

    async def forget_media(self, node: str, call_id: str) -> None:
        await self._write("media index", call_id, self.batch.run, [("SREM", media_index_key(node), call_id)])

    async def media_calls(self, node: str) -> list[str]:
        (members,) = await self.batch.run([("SMEMBERS", media_index_key(node))])
        return sorted(_text(m) for m in members or [])

    # -- API support: idempotent commands, conversation metadata ----------------------------------
    async def claim_command(self, call_id: str, key: str, ttl_s: int) -> tuple[bool, str | None]:
        """Claim an idempotency key for a command on a call: (True, None) when it is new, else
        (False, what is stored: 'pending' or the recorded response)."""
        redis_key = command_key(call_id, key)
        claimed, previous = await self.batch.run([("SET", redis_key, "pending", "NX", "EX", ttl_s),
                                                  ("GET", redis_key)])
        return claimed is not None, None if claimed is not None else _text(previous) if previous is not None else None

    async def remember_command(self, call_id: str, key: str, response: str, ttl_s: int) -> None:
        await self.batch.run([("SET", command_key(call_id, key), response, "EX", ttl_s)])

    async def merge_metadata(self, call_id: str, fields: dict[str, str]) -> None:
        """Conversation context set through the API (summary, intent, sentiment …)."""
        await self.batch.run([("HSET", metadata_key(call_id), *_flat(fields)),
                              ("EXPIRE", metadata_key(call_id), self.call_retention_s)])

    async def metadata(self, call_id: str) -> dict[str, str]:
        (flat,) = await self.batch.run([("HGETALL", metadata_key(call_id))])
        return {_text(k): _text(v) for k, v in zip((flat or [])[::2], (flat or [])[1::2])}

    # -- reading -------------------------------------------------------------------------------
    async def get(self, call_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(call_key(call_id))
        if not raw:
            return None
        return {k: _decode_field(k, _text(v)) for k, v in ((_text(k), v) for k, v in raw.items()) if k not in _BOOKKEEPING}

    async def get_many(self, call_ids: list[str]) -> list[dict[str, Any] | None]:
        replies = await self.batch.run([("HGETALL", call_key(c)) for c in call_ids]) if call_ids else []
        return [{k: _decode_field(k, _text(v)) for k, v in ((_text(k), v) for k, v in zip(flat[::2], flat[1::2]))
                 if k not in _BOOKKEEPING} or None for flat in replies]

    async def timeline(self, call_id: str) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(timeline_key(call_id))
        out = []
        for entry_id, data in entries:
            fields = {_text(k): _text(v) for k, v in data.items()}
            event = _loads(fields.get("data", "{}"))
            if not isinstance(event, dict):
                event = {"event": fields.get("event", "?"), "unreadable": fields.get("data")}
            event.setdefault("id", _text(entry_id))
            out.append(event)
        return out

    async def live_calls(self, limit: int = 100) -> list[str]:
        return [_text(c) for c in await self.redis.zrevrange(LIVE_INDEX, 0, max(0, limit - 1))]

    async def recent_calls(self, limit: int = 100) -> list[str]:
        return [_text(c) for c in await self.redis.zrevrange(RECENT_INDEX, 0, max(0, limit - 1))]

    async def live_count(self) -> int:
        return int(await self.redis.zcard(LIVE_INDEX))


def _event_fields(event: dict[str, Any]) -> tuple[str, ...]:
    name, ts, data = _event_args(event)
    return "event", name, "ts", ts, "data", data


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _event_args(event: dict[str, Any]) -> tuple[str, str, str]:
    return str(event.get("event", "?")), str(event.get("ts", now_ms())), _json(event)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


# Fields that are text whatever they look like: a from-tag, a number or a user agent of
# digits only ("12345678", "02079460000") is the same string read back, never an int (a
# from-tag sent to rtpengine as an int matches no party; a number loses its leading 0).
_TEXT_FIELDS = frozenset((
    "state", "outcome", "rule", "target", "policy_version", "from_uri", "from_tag", "to_uri", "ruri", "caller",
    "callee", "dialled", "src", "transport", "tenant", "trunk", "user_agent", "tx", "decided_by", "end_reason",
    "fallback_mode", "edge", "call_id"))


def _decode_field(name: str, value: str) -> Any:
    return value if name in _TEXT_FIELDS or name.startswith("context_") else _decode(value)


def _decode(value: str) -> Any:
    """Hash fields hold strings; those written as JSON (objects, lists, numbers) come back typed."""
    if value[:1] in ("{", "[") or value.isdigit():
        decoded = _loads(value)
        return value if decoded is None else decoded
    return value
