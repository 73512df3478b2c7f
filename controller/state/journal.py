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
import time
from dataclasses import dataclass
from typing import Any, Iterable

from redis.exceptions import ConnectionError as RedisConnectionError

from controller.policy.model import CounterProbe
from controller.state.batch import Script
from controller.state.calls import (
    _TRANSITION, FIELDS_LUA, FINAL_STATES, LIVE_INDEX, RECENT_INDEX, TRANSITION_LUA, CallStore, Transition,
    _event_args, _field, _json, _text, call_key, distinct_key, live_scope_key, timeline_key, window_key,
)

# The edge routed the call by its fallback (no controller, timeout, breaker open …). KEYS:
# call hash, timeline. ARGV: fields JSON (for a call not seen yet), event name, ts, event
# JSON, timeline cap, live expiry, created ms, fallback reason. A call already recorded (a
# controller's decision that came too late to be applied, or dialog events seen first) is
# corrected: the edge's fallback is what was applied. Returns 1 (new call), 2 (corrected)
# or 0 (already noted: a replay).
FALLBACK_LUA = """
local function fallback(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], 'fallback') then
    return 0
  end
  local created = redis.call('HSETNX', KEYS[1], 'created_at_ms', ARGV[7])
  local result = 2
  if created == 1 then
    local flat = {}
    for k, v in pairs(fields_of(ARGV[1])) do
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
  announce(ARGV[4])
  return result
end
"""
_FALLBACK = Script(FIELDS_LUA + FALLBACK_LUA + "return fallback(KEYS, ARGV)\n")


# A call decided elsewhere (the edge), as calls.py's create, plus a mark of its second phase:
# its indexes and counters are written after this script, in another pipeline, and the
# record's `indexed` field says they were. KEYS: call hash, timeline. ARGV: as calls.py's
# create. Returns 1 (created now, or a record recovered from the edge's dialogs replaced by
# the decision), 2 (created earlier, its second phase never confirmed: a batch cut between
# its two pipelines, delivered again) or 0 (nothing to do: a replay).
RECORD_LUA = """
local function record(KEYS, ARGV)
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
  for k, v in pairs(fields_of(ARGV[7])) do
    flat[#flat + 1] = k
    flat[#flat + 1] = v
  end
  redis.call('HSET', KEYS[1], unpack(flat))
  redis.call('HSETNX', KEYS[1], 'state', ARGV[1])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'ts', ARGV[3], 'data', ARGV[4])
  announce(ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  return 1
end
"""
_RECORD = Script(FIELDS_LUA + RECORD_LUA + "return record(KEYS, ARGV)\n")


# An edge's events applied inside Redis, a batch per script: what Journal.apply and the
# recorder (edge/recorder.py _change) do for them, with the same scripts (create, transition,
# fallback above), so that the controller is not on the per-call path of calls it did not
# decide. Only on one Redis (or a Sentinel-managed one): the calls' keys are in many slots.
# KEYS: the edge's stream, its consumers' batch summaries (see below). ARGV: consumer group,
# consumer, max entries, now (ms), this
# controller's name, timeline cap, retention (s), live expiry (s), the controller's policy
# version, hot thresholds JSON ({counter key: value}), the short_calls detectors JSON ([[name,
# shorter than (ms), window (s)] …]: an answered call that ended sooner counts for its
# source, as security/guard.py short_calls counts it), return the applied events (1/0), the
# edge's name, this batch's token, the token of the last batch the controller settled.
# Each batch's summary is kept (KEYS[2], per consumer) until the controller says it settled
# it: when Redis stopped before its reply reached the controller, the next call returns it
# again rather than apply more, so what was applied is counted once.
# The consumer's own pending entries are read first (claimed from a dead owner), then new
# ones. Every entry applied is acknowledged and deleted in the same script; entries left to
# the controller (bans, trunk authentications, calls whose Call-ID is hashed into its keys:
# Redis has no sha256) are not. Returns {entries read, tallies {kind, label, label, n …},
# hot counters {key, kind, scope, value, window_s, value now …} (those at their threshold),
# entries left {id, event …}, applied events}.
# Lengths are bytes here (characters in protocol.py); numbers are JSON's.
EDGE_EVENTS_LUA = r"""
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local limit, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local instance, cap, retention, live_ttl = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local version, thresholds, detectors = ARGV[9], cjson.decode(ARGV[10]), cjson.decode(ARGV[11])
local want_events, edge, batch_token, settled = ARGV[12] == '1', ARGV[13], ARGV[14], ARGV[15]
-- timeline events are published only when someone listens (a channel or a pattern subscriber)
listened = redis.call('PUBSUB', 'NUMSUB', 'cf:events')[2] > 0 or redis.call('PUBSUB', 'NUMPAT') > 0

-- the summary of this consumer's previous batch, kept until it says it settled it: a reply
-- lost (Redis stopped right after the script) is handed over again instead of a new batch
local kept = redis.call('HGET', KEYS[2], consumer)
if kept then
  local previous = cjson.decode(kept)
  if previous.token ~= settled then return previous.reply end
end

local FINAL = {failed = true, ended = true}
local DIALOG = {confirmed = 'answered', ended = 'ended', failed = 'failed'}
local KINDS = {window = true, live = true, distinct = true}
local RECORD = {}
for _, k in ipairs({'outcome', 'rule', 'applied_rules', 'target', 'policy_version', 'decision', 'from_uri',
                    'to_uri', 'ruri', 'caller', 'callee', 'dialled', 'src', 'transport', 'tenant', 'trunk',
                    'user_agent', 'tx', 'decided_by', 'end_reason', 'end_code', 'ended_at_ms'}) do
  RECORD[k] = true
end

local floor, find, sub = math.floor, string.find, string.sub
local function text(v, n) if type(v) == 'string' then return sub(v, 1, n) end return '' end
local function short(v, n) return type(v) == 'string' and #v <= n end
local function int(v) return type(v) == 'number' and v == floor(v) end
local function token(v) return #v <= 48 and find(v, '^[a-z0-9][a-z0-9%-]*$') ~= nil end
local function digits(v) return string.format('%d', v) end
local function field(v)  -- a hash field's text (calls.py _field); nil for null
  local t = type(v)
  if t == 'string' then return v end
  if t == 'number' and v == floor(v) then return digits(v) end
  if v == nil or v == cjson.null then return nil end
  return cjson.encode(v)
end
local function list(t, n)  -- a JSON array (cjson: keys 1..#t; an object's keys are strings, #t 0)
  return type(t) == 'table' and (#t > 0 or next(t) == nil) and #t <= n
end
local function plain(call_id)  -- calls.py call_key_id: the Call-ID itself, else a digest
  return #call_id <= 128 and find(call_id, '^[%w%-_%.@%+!%%%*~:]+$') ~= nil
end
local function keys_of(call_id) return {'cf:{' .. call_id .. '}:call', 'cf:{' .. call_id .. '}:timeline'} end
local function live_key(scope, value) return 'cf:live:{' .. scope .. ':' .. value .. '}' end

local tallies = {}
local function tally(kind, a, b)
  local key = kind .. '\0' .. a .. '\0' .. b
  tallies[key] = (tallies[key] or 0) + 1
end

local entries = {}
local function read(from, n)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, from)
  if reply and reply[1] then
    for _, entry in ipairs(reply[1][2]) do entries[#entries + 1] = entry end
  end
end
read('0', limit)
if #entries < limit then read('>', limit - #entries) end

local done, left, shorts, changes, ended, events, mismatched, indexing = {}, {}, {}, {}, {}, {}, {}, {}
local function apply(entry)
  if not entry[2] then  -- deleted meanwhile
    done[#done + 1] = entry[1]
    return
  end
  local raw
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'e' then raw = entry[2][i + 1] end
  end
  local ok, m = false, nil
  if raw then ok, m = pcall(cjson.decode, raw) end
  local kind = ok and type(m) == 'table' and m.event or nil  -- (an array has none)
  local call_id = ok and type(m) == 'table' and text(m.call_id, 512) or ''
  local of_a_call = kind == 'decided' or kind == 'dialog' or kind == 'fallback'
  if kind == 'ban' or kind == 'auth' or (of_a_call and call_id ~= '' and not plain(call_id)) then
    left[#left + 1] = entry[1]
    left[#left + 1] = raw
  else
    done[#done + 1] = entry[1]
    if not ok or type(m) ~= 'table' or (next(m) ~= nil and list(m, math.huge)) then  -- not an object
      tally('bad', 'bad-json', '')
    elseif kind == 'decided' then
      local r, tl, scopes, counters = m.record, m.timeline, m.live_scopes, m.counters
      local usable = call_id ~= '' and type(r) == 'table' and (r.state == 'routing' or r.state == 'failed')
        and type(tl) == 'table' and tl.event == 'decided' and short(r.outcome, 512) and short(r.rule, 512)
        and short(r.policy_version, 512) and int(r.created_at_ms) and r.created_at_ms > 0
        and type(scopes) == 'table' and list(counters, 64)
      if usable then
        local n = 0
        for k, v in pairs(scopes) do
          n = n + 1
          if not (short(k, 32) and short(v, 512)) then usable = false end
        end
        usable = usable and n <= 8
      end
      if usable then
        for _, c in ipairs(counters) do
          if not (list(c, 7) and #c == 7 and short(c[1], 128) and KINDS[c[2]] and short(c[3], 64)
                  and short(c[4], 512) and int(c[5]) and c[5] >= 0 and c[5] <= 31 * 86400
                  and (c[5] > 0 or c[2] == 'live') and type(c[6]) == 'boolean' and short(c[7], 512)) then
            usable = false
          end
        end
      end
      if not usable then
        tally('bad', 'bad-decided-event', '')
      else
        local fields = {}
        for k, v in pairs(r) do
          if RECORD[k] then fields[k] = field(v) end
        end
        fields.controller, fields.call_id, fields.live_scopes = instance, call_id, cjson.encode(scopes)
        tl.call_id, tl.controller = call_id, instance
        local event = cjson.encode(tl)
        local ts = tl.ts == nil and digits(now) or (field(tl.ts) or 'None')
        local created = digits(r.created_at_ms)
        -- 1: created now; 2: created by a batch cut between its two pipelines (Journal.apply),
        -- its indexes and counters still to write; 0: a replay
        local made = record(keys_of(call_id), {r.state, 'decided', ts, event, cap,
                                               FINAL[r.state] and retention or live_ttl, fields, created})
        if indexing[call_id] then made = 0 end  -- delivered twice in this batch: the first one does it all
        if made ~= 0 then indexing[call_id] = true end
        changes[#changes + 1] = {kind = 'decided', call_id = call_id, created = made ~= 0, state = r.state,
                                 at = r.created_at_ms, scopes = scopes, counters = counters}
        if made == 1 then
          tally('decision', r.outcome, r.rule)
          tally('edge', r.outcome, '')
          if version ~= '' and r.policy_version ~= version then
            tally('mismatch', r.policy_version, '')
            mismatched[r.policy_version] = mismatched[r.policy_version] or call_id
          end
          if want_events then events[#events + 1] = event end
        end
      end
    elseif kind == 'dialog' then
      local state = DIALOG[m.state]
      if state == nil or call_id == '' then
        tally('bad', 'bad-dialog-event', '')
      else
        local reason, fallen = text(m.reason, 64), text(m.fallback, 64)
        if not token(reason) then reason = 'unknown' end
        if not token(fallen) then fallen = '' end
        local code = (int(m.code) and m.code >= 0 and m.code < 700) and m.code or 0
        local ts = (int(m.ts) and m.ts > 0) and m.ts or now
        local fields = {call_id = call_id}
        if state == 'answered' then
          fields.answered_at_ms = digits(ts)
        else
          fields.ended_at_ms, fields.end_reason = digits(ts), reason
          if code ~= 0 then fields.end_code = digits(code) end
        end
        local event = cjson.encode({event = state, ts = ts, reason = reason, code = code,
                                    fallback = fallen ~= '' and fallen or cjson.null, call_id = call_id})
        local reply = transition(keys_of(call_id), {state, state, digits(ts), event, cap,
                                                    FINAL[state] and retention or 0, live_ttl, fields})
        local applied = reply[2] == 1
        changes[#changes + 1] = {kind = 'dialog', call_id = call_id, state = state, ts = ts,
                                 created = applied and reply[1] == '', scopes = reply[3]}
        if FINAL[state] then ended[call_id] = true end
        if applied then
          tally('dialog', m.state, reason)
          if want_events then events[#events + 1] = event end
          local answered = tonumber(reply[5])
          if state == 'ended' and answered and reply[4] ~= '' and ts - answered >= 0 then
            shorts[#shorts + 1] = {src = reply[4], talked = ts - answered, ts = ts}
          end
        end
      end
    elseif kind == 'fallback' then
      local reason, mode = text(m.reason, 64), m.mode
      if call_id == '' or not token(reason) or (mode ~= 'open' and mode ~= 'closed' and mode ~= 'rejected') then
        tally('bad', 'bad-fallback-event', '')
      else
        local ts = (int(m.ts) and m.ts > 0) and m.ts or now
        local fields = {state = mode == 'open' and 'routing' or 'failed', tx = text(m.tx, 32),
                        from_tag = text(m.from_tag, 128), decided_by = 'edge-fallback',
                        outcome = mode == 'rejected' and 'reject' or 'fallback',
                        rule = '', fallback_mode = mode, edge = edge, call_id = call_id}
        local event = cjson.encode({event = 'fallback', ts = ts, reason = reason, mode = mode, call_id = call_id})
        local result = fallback(keys_of(call_id), {fields, 'fallback', digits(ts), event, cap, live_ttl,
                                                   digits(ts), reason})
        changes[#changes + 1] = {kind = 'fallback', call_id = call_id, created = result == 1, at = ts}
        if result ~= 0 then
          tally('fallback', reason, '')
          if want_events then events[#events + 1] = event end
        end
      end
    else
      tally('bad', 'bad-event', '')
    end
  end
end
for _, entry in ipairs(entries) do
  local ok, problem = pcall(apply, entry)
  if not ok then  -- a bug, or Redis refusing a write: counted, never a batch applied forever
    tally('bad', 'apply-error', tostring(problem))
  end
end

-- what spans slots: the live and recent indexes, the counters (as Journal.apply's second pipeline)
local hot, seen = {}, {}
local function index(c)
  local call_id = c.call_id
  if c.kind == 'dialog' then
    if FINAL[c.state] then
      redis.call('ZREM', 'cf:live', call_id)
      local ok, scopes = pcall(cjson.decode, c.scopes ~= '' and c.scopes or '{}')
      if ok and type(scopes) == 'table' then
        for scope, value in pairs(scopes) do redis.call('ZREM', live_key(tostring(scope), tostring(value)), call_id) end
      end
    elseif c.created and not ended[call_id] then
      redis.call('ZADD', 'cf:live', c.ts, call_id)
      redis.call('ZADD', 'cf:recent', c.ts, call_id)
    end
  elseif c.created then
    redis.call('ZADD', 'cf:recent', c.at, call_id)
    if c.kind == 'fallback' then
      if not ended[call_id] then redis.call('ZADD', 'cf:live', c.at, call_id) end
    else
      if not FINAL[c.state] and not ended[call_id] then
        redis.call('ZADD', 'cf:live', c.at, call_id)
        for scope, value in pairs(c.scopes) do
          redis.call('ZADD', live_key(scope, value), c.at, call_id)
          redis.call('EXPIRE', live_key(scope, value), live_ttl)
        end
      end
      local mine = {}
      for _, r in ipairs(c.counters) do
        local key, kind, scope, value, window = r[1], r[2], r[3], r[4], r[5]
        if r[6] and kind ~= 'live' then
          local bucket = digits(floor(c.at / (window * 1000)))
          local name = '{' .. scope .. ':' .. value .. '}:' .. digits(window) .. ':' .. bucket
          if kind == 'distinct' then
            if r[7] ~= '' then
              redis.call('PFADD', 'cf:hll:' .. name, r[7])
              redis.call('EXPIRE', 'cf:hll:' .. name, 2 * window + 1)
            end
          elseif not mine[name] then
            mine[name] = true
            if redis.call('INCR', 'cf:rate:' .. name) == 1 then  -- (the bucket's expiry: set once, at its start)
              redis.call('EXPIRE', 'cf:rate:' .. name, 2 * window + 1)
            end
          end
        end
        local at = thresholds[key]
        local probe = key .. '\0' .. kind .. '\0' .. scope .. '\0' .. value .. '\0' .. digits(window)
        if at and at > 0 and not seen[probe] then
          seen[probe] = true
          hot[#hot + 1] = r
        end
      end
      redis.call('HSET', 'cf:{' .. call_id .. '}:call', 'indexed', '1')  -- its second phase is done
    end
  end
end
for _, c in ipairs(changes) do
  local ok, problem = pcall(index, c)
  if not ok then tally('bad', 'apply-error', tostring(problem)) end
end

-- answered calls that ended sooner than a short_calls detector's limit count for their source
local function count_short(call)
  local ip = (string.match(call.src, '^(.*):[^:]*$') or call.src):gsub('^%[+', ''):gsub('%]+$', '')
  local windows = {}
  for _, d in ipairs(detectors) do
    local name, limit, window = d[1], d[2], d[3]
    if call.talked < limit then
      local counter = 'cf:rate:{short:source:' .. ip .. '}:' .. digits(window) .. ':'
      if not windows[window] then
        windows[window] = true
        local bucket = counter .. digits(math.floor(call.ts / (window * 1000)))
        if redis.call('INCR', bucket) == 1 then redis.call('EXPIRE', bucket, 2 * window + 1) end
      end
      local key = 'risk:' .. name
      local probe = key .. '\0window\0short:source\0' .. ip .. '\0' .. digits(window)
      if thresholds[key] and thresholds[key] > 0 and not seen[probe] then
        seen[probe] = true
        hot[#hot + 1] = {key, 'window', 'short:source', ip, window}
      end
    end
  end
end
for _, call in ipairs(shorts) do
  local ok, problem = pcall(count_short, call)
  if not ok then tally('bad', 'apply-error', tostring(problem)) end
end

-- the counters of the calls just counted, read as CallStore.read_counter_values reads them
local marked = {}
local function mark(r)
  local key, kind, scope, value, window = r[1], r[2], r[3], r[4], r[5]
  local count
  if kind == 'live' then
    count = redis.call('ZCARD', scope == 'global' and 'cf:live' or live_key(scope, value))
  else
    local span = window * 1000
    local bucket = math.floor(now / span)
    local weight = 1 - (now - bucket * span) / span
    local name = '{' .. scope .. ':' .. value .. '}:' .. digits(window) .. ':'
    if kind == 'distinct' then
      local current = redis.call('PFCOUNT', 'cf:hll:' .. name .. digits(bucket))
      local union = redis.call('PFCOUNT', 'cf:hll:' .. name .. digits(bucket), 'cf:hll:' .. name .. digits(bucket - 1))
      count = math.floor(current + math.max(0, union - current) * weight)
    else
      local current = tonumber(redis.call('GET', 'cf:rate:' .. name .. digits(bucket)) or '0') or 0
      local previous = tonumber(redis.call('GET', 'cf:rate:' .. name .. digits(bucket - 1)) or '0') or 0
      count = math.floor(current + previous * weight)
    end
  end
  if count >= thresholds[key] then
    for _, v in ipairs({key, kind, scope, value, window, count}) do marked[#marked + 1] = v end
  end
end
for _, r in ipairs(hot) do
  local ok, problem = pcall(mark, r)
  if not ok then tally('bad', 'apply-error', tostring(problem)) end
end

if #done > 0 then
  redis.call('XACK', stream, group, unpack(done))
  redis.call('XDEL', stream, unpack(done))
end
local flat = {}
for key, n in pairs(tallies) do
  local kind, a, b = string.match(key, '^(.-)%z(.-)%z(.*)$')
  if kind == 'mismatch' then b = mismatched[a] end
  for _, v in ipairs({kind, a, b, n}) do flat[#flat + 1] = v end
end
local reply = {#entries, flat, marked, left, events, batch_token}
redis.call('HSET', KEYS[2], consumer, cjson.encode({token = batch_token, reply = reply}))
redis.call('EXPIRE', KEYS[2], 3600)
return reply
"""
_APPLY_EDGE_EVENTS = Script(FIELDS_LUA + RECORD_LUA + TRANSITION_LUA + FALLBACK_LUA + EDGE_EVENTS_LUA)


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


@dataclass(slots=True)
class StreamBatch:
    """What applying a batch of an edge's stream inside Redis did (EDGE_EVENTS_LUA)."""
    read: int  # entries taken from the stream
    tallies: list[tuple[str, str, str, int]]  # (decision|edge|dialog|fallback|mismatch|bad, label, label, n)
    hot: list[tuple[CounterProbe, int]]  # counters of the calls counted, at or over their threshold
    left: list[tuple[str, Any]]  # (entry id, event) for the controller to apply, not acknowledged yet
    events: list[str]  # timeline events applied (JSON, with call_id), when asked for


class Journal:
    def __init__(self, store: CallStore):
        self.store = store
        self._boot = f"{time.time_ns():x}"
        self._batches = 0
        self._settled: dict[str, str] = {}  # stream -> token of the last batch applied there and settled

    @property
    def applies_streams(self) -> bool:
        """Whether Redis applies the edges' streams itself (apply_stream): one Redis or a
        Sentinel-managed one, not a Cluster (a batch's calls are in many slots)."""
        return self.store.target.mode != "cluster"

    async def apply_stream(self, stream: str, summaries: str, group: str, consumer: str, count: int, *, now_ms: int,
                           instance: str, policy_version: str, thresholds: dict[str, int],
                           short_calls: list[tuple[str, int, int]],
                           events: bool, edge: str) -> StreamBatch:
        """Take up to `count` entries of an edge's stream (the consumer's own pending ones
        first) and apply them inside Redis, as `apply` does, acknowledged in the same script:
        one round trip per batch. Raises RedisError when Redis is unreachable. Runs once the
        outage queue holds nothing: the script cannot tell which calls it will read, and a
        change held there (a decision made while Redis was down) comes before the edge's
        next events about its call."""
        store = self.store
        await store.outage.written()
        self._batches += 1
        token = f"{consumer}:{self._boot}:{self._batches}"
        (reply,) = await store.batch.run([("EVALSHA", _APPLY_EDGE_EVENTS, [stream, summaries], [
            group, consumer, count, now_ms, instance, store.timeline_max_events, store.call_retention_s,
            store.live_call_ttl_s, policy_version, _json(thresholds), _json(short_calls), 1 if events else 0,
            edge, token, self._settled.get(stream, "")])])
        if isinstance(reply, Exception):
            raise reply
        read, tallies, hot, left, applied, done = reply
        self._settled[stream] = _text(done)  # said at the next batch: Redis may forget this one then
        return StreamBatch(
            int(read),
            [(_text(tallies[i]), _text(tallies[i + 1]), _text(tallies[i + 2]), int(tallies[i + 3]))
             for i in range(0, len(tallies), 4)],
            [(CounterProbe(_text(hot[i]), _text(hot[i + 1]), _text(hot[i + 2]), _text(hot[i + 3]), int(hot[i + 4])),
              int(hot[i + 5])) for i in range(0, len(hot), 6)],
            [(_text(left[i]), left[i + 1]) for i in range(0, len(left), 2)],
            [_text(e) for e in applied])


    async def apply(self, changes: list[Change], ack: Iterable[tuple] = ()) -> list[Applied]:
        """Apply `changes` in order (two pipelines), then run `ack` (commands, e.g. XACK) in the
        second pipeline. Raises RedisError when Redis is unreachable (nothing is acknowledged
        then; applying again is harmless). The changes of a call with changes held in the
        outage queue (decided while Redis was down) are applied after those are written."""
        store = self.store
        if store.outage.depth:
            await store.outage.written(change.call_id for change in changes)
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
        indexed: set[str] = set()  # calls whose indexes and counters this batch writes
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
                if change.call_id in indexed:  # delivered twice in this batch: the first one does it all
                    reply = 0
                if reply in (1, 2):
                    indexed.add(change.call_id)
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
