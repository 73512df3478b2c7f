"""Call changes applied in batches: the records, timelines, indexes and counters of many
calls written with two pipelines per batch, whatever the batch's size (the edges' event
streams are consumed this way, edge/recorder.py).

Every change is idempotent, so a batch delivered twice (a controller died before it
acknowledged it, another one claimed it) changes nothing the second time, and counts
nothing twice: a call is created once (the first create wins; counters are counted only by
the create that made the call), a dialog state only moves forward, a fallback is noted
once. The first pipeline runs each change's script on the call's own keys (one slot); the
second, built from their replies, writes what spans slots (live and recent indexes,
counters) and the caller's acknowledgement."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from redis.exceptions import ConnectionError as RedisConnectionError

from controller.policy.model import CounterProbe
from controller.state.batch import Script
from controller.state.calls import (
    _TRANSITION, FINAL_STATES, LIVE_INDEX, RECENT_INDEX, CallStore, Transition, _event_args, _field, _json,
    _text, call_key, distinct_key, live_scope_key, timeline_key, window_key,
)

# The edge routed the call by its fallback (no controller, timeout, breaker open …). KEYS:
# call hash, timeline. ARGV: fields JSON (for a call not seen yet), event name, ts, event
# JSON, timeline cap, live expiry, created ms, fallback reason. A call already recorded (a
# controller's decision that came too late to be applied, or dialog events seen first) is
# corrected: the edge's fallback is what was applied. Returns 1 (new call), 2 (corrected)
# or 0 (already noted: a replay).
_FALLBACK = Script("""
if redis.call('HGET', KEYS[1], 'fallback') then
  return 0
end
local created = redis.call('HSETNX', KEYS[1], 'created_at_ms', ARGV[7])
local result = 2
if created == 1 then
  local flat = {}
  for k, v in pairs(cjson.decode(ARGV[1])) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(flat))
  redis.call('HSETNX', KEYS[1], 'state', 'routing')
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  result = 1
else
  local rule = redis.call('HGET', KEYS[1], 'rule')
  if rule and rule ~= '' then
    redis.call('HSET', KEYS[1], 'late_decision_rule', rule)
  end
end
redis.call('HSET', KEYS[1], 'fallback', ARGV[8], 'decided_by', 'edge-fallback', 'outcome', 'fallback', 'rule', '')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'ts', ARGV[3], 'data', ARGV[4])
redis.call('PUBLISH', 'cf:events', ARGV[4])
return result
""")


# A call decided elsewhere (the edge), as calls.py's create, plus a mark of its second phase:
# its indexes and counters are written after this script, in another pipeline, and the
# record's `indexed` field says they were. KEYS: call hash, timeline. ARGV: as calls.py's
# create. Returns 1 (created now, or a record recovered from the edge's dialogs replaced by
# the decision), 2 (created earlier, its second phase never confirmed: a batch cut between
# its two pipelines, delivered again) or 0 (nothing to do: a replay).
_RECORD = Script("""
if redis.call('HSETNX', KEYS[1], 'created_at_ms', ARGV[8]) == 0 then
  if redis.call('HGET', KEYS[1], 'decided_by') ~= 'recovered' then
    if redis.call('HGET', KEYS[1], 'indexed') then
      return 0
    end
    return 2
  end
  -- recovered from the edge's dialogs after Redis lost its data: the decision replaces it
  redis.call('HSET', KEYS[1], 'created_at_ms', ARGV[8])
end
local flat = {}
for k, v in pairs(cjson.decode(ARGV[7])) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('HSETNX', KEYS[1], 'state', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'ts', ARGV[3], 'data', ARGV[4])
redis.call('PUBLISH', 'cf:events', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
""")


class PartlyApplied(RedisConnectionError):
    """The first pipeline of a batch was applied, the second (indexes, counters,
    acknowledgement) did not reach Redis: `results` says what the first did. The batch will
    be delivered again; its second phase is then completed (see _RECORD)."""

    def __init__(self, message: str, results: list["Applied"]):
        super().__init__(message)
        self.results = results


@dataclass(slots=True)
class NewCall:
    """A call decided elsewhere (the edge), with its first timeline event and its counters."""
    call_id: str
    record: dict[str, Any]
    event: dict[str, Any]
    live_scopes: dict[str, str]
    counters: list[CounterProbe]
    at_ms: int


@dataclass(slots=True)
class FallbackTaken:
    call_id: str
    reason: str
    fields: dict[str, Any]  # the record of a call not seen before
    event: dict[str, Any]
    at_ms: int


@dataclass(slots=True)
class DialogChange:
    call_id: str
    state: str  # answered | failed | ended
    fields: dict[str, Any]
    event: dict[str, Any]


Change = NewCall | FallbackTaken | DialogChange


@dataclass(slots=True)
class Applied:
    """What a change did: `applied` False for a replay (or a state change that came too
    late); `transition` for dialog changes; `created` for calls this change created."""
    change: Change
    applied: bool
    created: bool = False
    indexing: bool = False  # its indexes and counters are to be written (now, or again after a cut batch)
    transition: Transition | None = None
    error: Exception | None = None


class Journal:
    def __init__(self, store: CallStore):
        self.store = store

    async def apply(self, changes: list[Change], ack: Iterable[tuple] = ()) -> list[Applied]:
        """Apply `changes` in order (two pipelines), then run `ack` (commands, e.g. XACK) in the
        second pipeline. Raises RedisError when Redis is unreachable (nothing is acknowledged
        then; applying again is harmless)."""
        store = self.store
        cap = store.timeline_max_events
        first: list[tuple] = []
        for change in changes:
            call_id = change.call_id
            keys = [call_key(call_id), timeline_key(call_id)]
            if type(change) is DialogChange:
                final = change.state in FINAL_STATES
                fields = {k: _field(v) for k, v in {**change.fields, "call_id": call_id}.items() if v is not None}
                first.append(("EVALSHA", _TRANSITION, keys,
                              [change.state, *_event_args({**change.event, "call_id": call_id}), cap,
                               store.call_retention_s if final else 0, store.live_call_ttl_s, _json(fields)]))
            elif type(change) is NewCall:
                record = change.record
                fields = {k: _field(v) for k, v in record.items() if v is not None}
                state = fields.pop("state")
                created = fields.pop("created_at_ms", str(change.at_ms))
                fields["call_id"] = call_id
                fields["live_scopes"] = _json(change.live_scopes)
                ttl = store.call_retention_s if state in FINAL_STATES else store.live_call_ttl_s
                first.append(("EVALSHA", _RECORD, keys,
                              [state, *_event_args({**change.event, "call_id": call_id}), cap, ttl, _json(fields),
                               created]))
            else:
                fields = {k: _field(v) for k, v in {**change.fields, "call_id": call_id}.items() if v is not None}
                first.append(("EVALSHA", _FALLBACK, keys,
                              [_json(fields), *_event_args({**change.event, "call_id": call_id}), cap,
                               store.live_call_ttl_s, str(change.at_ms), change.reason]))
        replies = await store.batch.submit(first, urgent=True).replies if first else []
        results: list[Applied] = []
        ended: set[str] = set()  # calls whose end this batch recorded (not to be indexed live again)
        for change, reply in zip(changes, replies):
            if isinstance(reply, Exception):
                if _connection_lost(reply):
                    raise reply
                results.append(Applied(change, False, error=reply))
                continue
            if type(change) is DialogChange:
                previous, applied = _text(reply[0]), bool(int(reply[1]))
                src, answered = _text(reply[3]), _text(reply[4])
                transition = Transition(previous, applied, src, int(answered) if answered.isdigit() else None)
                results.append(Applied(change, applied, created=applied and not previous, transition=transition))
                if change.state in FINAL_STATES:
                    ended.add(change.call_id)
                    stored = _loads_dict(_text(reply[2]))
                    change.fields["_scopes"] = stored
            elif type(change) is NewCall:
                results.append(Applied(change, reply == 1, created=reply == 1, indexing=reply in (1, 2)))
            else:
                results.append(Applied(change, reply != 0, created=reply == 1))
        second: list[tuple] = []
        for result in results:
            change = result.change
            call_id = change.call_id
            if type(change) is DialogChange:
                if change.state in FINAL_STATES:
                    second.append(("ZREM", LIVE_INDEX, call_id))
                    scopes = change.fields.pop("_scopes", None) or store._live_scopes.pop(call_id, None) or {}
                    second += [("ZREM", live_scope_key(str(s), str(v)), call_id) for s, v in scopes.items()]
                elif result.created and call_id not in ended:  # first seen live
                    second += [("ZADD", LIVE_INDEX, change.event.get("ts", 0), call_id),
                               ("ZADD", RECENT_INDEX, change.event.get("ts", 0), call_id)]
                continue
            if type(change) is NewCall and not result.indexing or type(change) is FallbackTaken and not result.created:
                continue
            second.append(("ZADD", RECENT_INDEX, change.at_ms, call_id))
            if type(change) is FallbackTaken:
                if call_id not in ended:
                    second.append(("ZADD", LIVE_INDEX, change.at_ms, call_id))
                continue
            if change.record.get("state") not in FINAL_STATES and call_id not in ended:
                second.append(("ZADD", LIVE_INDEX, change.at_ms, call_id))
                for scope, value in change.live_scopes.items():
                    key = live_scope_key(scope, value)
                    second += [("ZADD", key, change.at_ms, call_id), ("EXPIRE", key, store.live_call_ttl_s)]
            second += _counter_commands(change.counters, change.at_ms)
            second.append(("HSET", call_key(call_id), "indexed", "1"))  # after its indexes and counters
        second += list(ack)
        if second:
            try:
                replies = await store.batch.submit(second, urgent=True).replies
            except RedisConnectionError as exc:
                raise PartlyApplied(str(exc), results) from exc
            lost = next((r for r in replies if isinstance(r, Exception) and _connection_lost(r)), None)
            if lost is not None:
                raise PartlyApplied(str(lost), results) from lost
        for result in results:
            if result.applied:
                store._emit(result.change.call_id, result.change.event)
        return results


def _counter_commands(counters: Iterable[CounterProbe], at_ms: int) -> list[tuple]:
    """The window and distinct counters a new call adds to (once per bucket key and call)."""
    commands: list[tuple] = []
    mine: set[str] = set()
    for r in counters:
        if not r.count or r.kind == "live":
            continue
        bucket = at_ms // (r.window_s * 1000)
        if r.kind == "distinct":
            key = distinct_key(r.scope, r.value, r.window_s, bucket)
            if r.member:
                commands += [("PFADD", key, r.member), ("EXPIRE", key, 2 * r.window_s + 1)]
            continue
        key = window_key(r.scope, r.value, r.window_s, bucket)
        if key not in mine:
            mine.add(key)
            commands += [("INCR", key), ("EXPIRE", key, 2 * r.window_s + 1)]
    return commands


def _connection_lost(reply: Exception) -> bool:
    return isinstance(reply, RedisConnectionError)


def _loads_dict(text: str) -> dict[str, str]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
