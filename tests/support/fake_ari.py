"""FakeAri: an in-memory Asterisk (22.10.1) behind ARI, for testing the controller's ARI code.

Every HTTP request is checked against the real ARI description (tests/support/ari_spec.py);
a request the spec does not allow is answered like Asterisk would (400 bad parameter, 404
unknown resource, 405 wrong method) and recorded in ``fake.rejected``; an allowed one is
recorded in order in ``fake.requests``. Every event the fake emits and every JSON body it
returns is validated against the spec's models; if the fake itself produces something
invalid it raises ``FakeAriBug`` (and ``stop()`` re-raises any such bug seen in a handler).

Behaviour follows the Asterisk 22.10.1 sources (res/ari/resource_*.c, res/stasis/*.c,
res/res_ari.c, res/ari/ari_websockets.c): see the notes next to each handler. In short:

- events go to the apps *subscribed* to a channel/bridge: the channel's Stasis app (from
  StasisStart to StasisEnd), the app that originated it (from the POST to its destruction), apps that called /applications/{app}/subscription, and ``subscribeAll`` apps;
  a bridge is followed by the Stasis apps of the channels in it, so ``BridgeCreated`` reaches
  only subscribeAll apps (nothing is subscribed to a bridge that was just created);
- app_send_end_msg() unsubscribes the Stasis app before StasisEnd, so after StasisEnd an app
  only hears about a channel it is otherwise subscribed to: ChannelDestroyed follows StasisEnd
  for channels the app originated (originate/create/externalMedia), not for inbound or snoop
  channels (subscribe explicitly with /applications/{app}/subscription to get their cause);
- a second websocket for the same app replaces the first (the old one gets
  ApplicationReplaced); an app without a websocket misses its events (they land in
  ``fake.events_dropped``) but its channels stay in Stasis (resync with GET /channels);
- channels created by externalMedia / originate / snoop / create enter Stasis
  asynchronously (``stasis_delay``): until their StasisStart, bridge operations on them get
  422 "Channel not in Stasis application", as on a real Asterisk.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import random
import re
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSCloseCode, WSMsgType, web

from tests.support.ari_spec import SPEC, Operation, SpecError

__all__ = [
    "CAUSE_TEXT",
    "FakeAri",
    "FakeAriBug",
    "FakeBridge",
    "FakeChannel",
    "RecordedRequest",
    "ari_timestamp",
]

# main/channel.c causes[] (ast_cause2str), include/asterisk/causes.h
CAUSE_TEXT = {
    1: "Unallocated (unassigned) number", 2: "No route to specified transmit network",
    3: "No route to destination", 5: "Misdialed trunk prefix", 6: "Channel unacceptable",
    7: "Call awarded and being delivered in an established channel", 8: "Pre-empted",
    14: "Number ported elsewhere", 16: "Normal Clearing", 17: "User busy", 18: "No user responding",
    19: "User alerting, no answer", 20: "Subscriber absent", 21: "Call Rejected", 22: "Number changed",
    23: "Redirected to new destination", 26: "Answered elsewhere", 27: "Destination out of order",
    28: "Invalid number format", 29: "Facility rejected", 30: "Response to STATus ENQuiry",
    31: "Normal, unspecified", 34: "Circuit/channel congestion", 38: "Network out of order",
    41: "Temporary failure", 42: "Switching equipment congestion", 43: "Access information discarded",
    44: "Requested channel not available", 50: "Facility not subscribed", 52: "Outgoing call barred",
    54: "Incoming call barred", 57: "Bearer capability not authorized", 58: "Bearer capability not available",
    65: "Bearer capability not implemented", 66: "Channel not implemented", 69: "Facility not implemented",
    81: "Invalid call reference value", 88: "Incompatible destination", 95: "Invalid message unspecified",
    96: "Mandatory information element is missing", 97: "Message type nonexist.", 98: "Wrong message",
    99: "Info. element nonexist or not implemented", 100: "Invalid information element contents",
    101: "Message not compatible with call state", 102: "Recover on timer expiry",
    103: "Mandatory IE length error", 111: "Protocol error, unspecified", 127: "Interworking, unspecified",
}
# resource_channels.c convert_reason_to_hangup_code()
HANGUP_REASONS = {"normal": 16, "busy": 17, "congestion": 34, "no_answer": 19, "timeout": 18, "rejected": 21,
                  "unallocated": 1, "normal_unspecified": 31, "number_incomplete": 28, "codec_mismatch": 58,
                  "interworking": 127, "failure": 38, "answered_elsewhere": 26}
AST_SOFTHANGUP_EXPLICIT = 1 << 5     # the "cause" of the ChannelHangupRequest an ARI DELETE produces
_DIALSTATUS = {17: "BUSY", 18: "NOANSWER", 19: "NOANSWER", 21: "CHANUNAVAIL", 34: "CONGESTION", 38: "CONGESTION",
               41: "CONGESTION", 42: "CONGESTION", 44: "CHANUNAVAIL", 1: "CHANUNAVAIL", 3: "CHANUNAVAIL",
               20: "CHANUNAVAIL", 27: "CHANUNAVAIL"}
_RTP_TECHS = {"PJSIP", "UnicastRTP"}                 # channel techs with RTP glue (rtp_statistics)
# RTPstat fields Asterisk 22.10.1 sends that its own ARI description does not list (media
# experience scores, recorded in ari_conversations/rtp_statistics.json)
RTP_MES_FIELDS = ("txmes", "rxmes", "local_maxmes", "local_minmes", "local_normdevmes", "local_stdevmes",
                  "remote_maxmes", "remote_minmes", "remote_normdevmes", "remote_stdevmes")
# indications.conf tone names of our config set's zones, and ast_playtones_start()'s tone strings
_TONE_NAMES = {"dial", "busy", "ring", "congestion", "callwaiting", "dialrecall", "record", "info", "stutter"}
# (parts ast_tone_zone_part_parse() reads, separated by "|" — or "," when there is no "|")
_TONE_PART = r"!?(\d+([+*]\d+)?|M\d+([+*]M\d+)?)(/\d+)?"
_TONE_STRING = re.compile(rf"{_TONE_PART}(\|{_TONE_PART})*|{_TONE_PART}(,{_TONE_PART})*")
# The prompts Debian's asterisk-core-sounds-en-wav installs (/usr/share/asterisk/sounds/en),
# the sounds a media node with our config set has: a sound: playback of any other name fails
CORE_SOUNDS = frozenset(Path(__file__).with_name("core_sounds_en.txt").read_text().split())
AST_MAX_PUBLIC_UNIQUEID = 149


class FakeAriBug(AssertionError):
    """The fake produced an event or response body that the ARI description forbids."""


class _AriError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def ari_timestamp(when: float | None = None) -> str:
    """Asterisk's ISO-8601 format (AST_ISO8601_FORMAT "%FT%T.%q%z"): 2026-11-26T10:00:00.123+0000."""
    dt = datetime.fromtimestamp(time.time() if when is None else when, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


@dataclass
class RecordedRequest:
    method: str
    path: str                      # relative to /ari, e.g. /channels/1700000000.1/answer
    query: dict[str, str]
    body: Any
    status: int = 0                # HTTP status answered
    reason: str = ""               # why it was rejected / the error message
    operation: str = ""            # "channels.answer"

    def __iter__(self):            # method, path, query, body = rec
        return iter((self.method, self.path, self.query, self.body))


@dataclass
class FakeChannel:
    id: str
    model: dict                    # the ARI Channel (without channelvars)
    kind: str                      # inbound | outbound | external | snoop
    tech: str
    variables: dict[str, str] = field(default_factory=dict)
    app: str | None = None         # Stasis app while in Stasis
    in_stasis: bool = False
    args: list[str] = field(default_factory=list)
    bridge_id: str | None = None
    request: dict | None = None    # the ARI request args that created it (originate/create/externalMedia/snoop)
    dialstring: str | None = None  # created by ARI, dialable
    dialing: bool = False
    dial_caller: str | None = None
    rtp: dict[str, Any] = field(default_factory=dict)
    sip_headers: dict[str, str] = field(default_factory=dict)
    snoop_of: str | None = None
    snoops: list[str] = field(default_factory=list)
    reportable: set[str] = field(default_factory=set)
    hangup_cause: int | None = None
    muted: str | None = None
    held: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    audio: str = "none"            # what the channel's far end sends: talking | silence | none (no packets)
    talk_detect_ms: int | None = None   # TALK_DETECT(set)=<silence ms>: talk events on
    talking_since: float | None = None

    @property
    def name(self) -> str:
        return self.model["name"]

    @property
    def state(self) -> str:
        return self.model["state"]


@dataclass
class FakeBridge:
    id: str
    model: dict
    variables: dict[str, str] = field(default_factory=dict)
    reportable: set[str] = field(default_factory=set)
    moh: str | None = None


@dataclass
class _Conn:
    ws: web.WebSocketResponse
    apps: list[str]
    subscribe_all: bool
    queue: asyncio.Queue
    request: web.Request
    writer: asyncio.Task | None = None
    received: list[str] = field(default_factory=list)


@dataclass
class _App:
    name: str
    conn: _Conn | None = None
    subscribe_all: bool = False
    channels: Counter = field(default_factory=Counter)
    bridges: Counter = field(default_factory=Counter)
    endpoints: set[str] = field(default_factory=set)
    allowed: list[dict] = field(default_factory=list)
    disallowed: list[dict] = field(default_factory=list)


def _cid_parse(text: str | None) -> tuple[str, str]:
    """ast_callerid_parse(): '"Name" <num>' / 'Name <num>' / 'num' -> (name, number)."""
    if not text:
        return "", ""
    m = re.match(r'^\s*"?([^"<]*?)"?\s*<([^>]*)>\s*$', text)
    if m:
        return m.group(1).strip(), m.group(2).strip()
    if re.fullmatch(r"[0-9+*#()\- ]+", text.strip()):
        return "", re.sub(r"[()\- ]", "", text.strip())
    return text.strip(), ""


def _silent_wav(seconds: float, rate: int = 8000) -> bytes:
    """What Asterisk's wav format writes: 16-bit mono PCM at 8 kHz (here: silence)."""
    data = b"\x00\x00" * int(seconds * rate)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(data)) + data)


def _split_args(app_args: str | None) -> list[str]:
    """Stasis(app,a,b): the dialplan argument split of appArgs."""
    return app_args.split(",") if app_args else []


class FakeAri:
    """An aiohttp server on 127.0.0.1 playing Asterisk's ARI (base path /ari)."""

    def __init__(self, username: str = "callfabric", password: str = "secret", *,
                 asterisk_id: str = "02:42:ac:11:00:02", system_name: str = "media-1",
                 stasis_delay: float = 0.01, ring_delay: float = 0.01, playback_duration: float = 0.05,
                 media_address: str = "127.0.0.1", inbound_context: str = "from-kamailio",
                 channelvars: Iterable[str] = (), endpoints: Iterable[str] = ("PJSIP/kamailio",),
                 websocket_clients: Iterable[str] = (), version: str = "22.10.1") -> None:
        self.username, self.password = username, password
        self.asterisk_id, self.system_name, self.version = asterisk_id, system_name, version
        self.stasis_delay, self.ring_delay, self.playback_duration = stasis_delay, ring_delay, playback_duration
        self.media_address, self.inbound_context = media_address, inbound_context
        self.channelvars = list(channelvars)       # ari.conf [general] channelvars: shown in Channel.channelvars
        self.endpoint_names = list(endpoints)
        self.websocket_clients = set(websocket_clients)
        # --- observable state
        self.requests: list[RecordedRequest] = []
        self.rejected: list[RecordedRequest] = []
        self.events_sent: list[dict] = []
        self.events_dropped: list[dict] = []
        self.bugs: list[str] = []
        self.originations: list[dict] = []        # args of every originate/create, in order
        self.global_vars: dict[str, str] = {}
        self.missing_media: set[str] = set()      # media URIs whose playback fails
        self.sounds: set[str] = set(CORE_SOUNDS)  # sound: names installed on this node (others fail)
        self._chans: dict[str, FakeChannel] = {}
        self.destroyed: dict[str, FakeChannel] = {}
        self._bridges: dict[str, FakeBridge] = {}
        self.playbacks: dict[str, dict] = {}
        self._pb_target: dict[str, tuple[str, str]] = {}
        self._pb_tasks: dict[str, asyncio.Task] = {}
        self._stalled: set[str] = set()           # channel playbacks waiting for their channel's answer
        self.live_recordings: dict[str, dict] = {}     # name -> LiveRecording (queued / recording)
        self.stored_recordings: dict[str, tuple[str, bytes]] = {}   # name -> (format, file bytes)
        self._rec_started: dict[str, float] = {}
        self.recording_formats = {"wav", "gsm", "ulaw", "alaw", "sln", "sln16", "g722", "wav16"}
        self._apps: dict[str, _App] = {}
        self._conns: list[_Conn] = []
        # --- machinery
        self._uid = itertools.count(1)
        self._name_seq = itertools.count(1)
        self._snoop_seq = itertools.count(0)
        self._rtp_port = itertools.count(10000, 2)
        self._epoch = int(time.time())
        self._started = ari_timestamp()
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._tick: asyncio.Event | None = None
        self._unfrozen: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handlers: dict[tuple[str, str], Callable[[dict], Any]] = self._handler_table()
        self.rtp_glue_ops = {("channels", "rtpstatistics"): {403}}   # statuses Asterisk returns beyond the spec

    # ================================================================== lifecycle
    async def start(self) -> FakeAri:
        self._loop = asyncio.get_running_loop()
        self._tick = asyncio.Event()
        self._unfrozen = asyncio.Event()
        self._unfrozen.set()
        app = web.Application()
        app.router.add_route("GET", "/ari/events", self._events_entry)
        app.router.add_route("*", "/ari/{tail:.*}", self._http_entry)
        app.router.add_route("*", "/ari", self._http_entry)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self, *, check: bool = True) -> None:
        """Stop serving; re-raise any FakeAriBug seen in a handler unless check=False."""
        for conn in list(self._conns):
            if conn.request.transport is not None:
                conn.request.transport.abort()
        for task in list(self._tasks) + list(self._pb_tasks.values()):
            task.cancel()
        for ch in self._chans.values():
            for t in ch.timers:
                t.cancel()
        await asyncio.gather(*self._tasks, *self._pb_tasks.values(), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if check and self.bugs:
            raise FakeAriBug("FakeAri produced invalid output:\n" + "\n".join(self.bugs))

    async def __aenter__(self) -> FakeAri:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop(check=exc[0] is None)

    @property
    def port(self) -> int:
        assert self._port is not None, "FakeAri not started"
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ari"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ari/events"

    # ================================================================== observable state
    @property
    def channels(self) -> dict[str, dict]:
        """Live channels as ARI Channel dicts (id -> snapshot)."""
        return {cid: self._snapshot(ch) for cid, ch in self._chans.items()}

    @property
    def bridges(self) -> dict[str, dict]:
        return {bid: copy.deepcopy(b.model) for bid, b in self._bridges.items()}

    def channel(self, channel_id: str) -> FakeChannel:
        """The fake's record of a channel, live or destroyed (variables, request args, ...)."""
        ch = self._chans.get(channel_id) or self.destroyed.get(channel_id)
        if ch is None:
            raise KeyError(f"FakeAri: no channel {channel_id!r} (live: {sorted(self._chans)})")
        return ch

    def bridge(self, bridge_id: str) -> FakeBridge:
        return self._bridges[bridge_id]

    def events(self, type: str | None = None, *, app: str | None = None, channel_id: str | None = None) -> list[dict]:
        """Delivered events, filtered by type / application / channel.id."""
        out = []
        for e in self.events_sent:
            if type and e["type"] != type:
                continue
            if app and e["application"] != app:
                continue
            if channel_id and (e.get("channel") or {}).get("id") != channel_id:
                continue
            out.append(e)
        return out

    def event_types(self, *, app: str | None = None, channel_id: str | None = None) -> list[str]:
        return [e["type"] for e in self.events(app=app, channel_id=channel_id)]

    def requests_to(self, method: str, path_regex: str) -> list[RecordedRequest]:
        rx = re.compile(path_regex)
        return [r for r in self.requests if r.method == method.upper() and rx.fullmatch(r.path)]

    def app_connected(self, app: str) -> bool:
        a = self._apps.get(app)
        return bool(a and a.conn is not None and not a.conn.ws.closed)

    # ================================================================== waiting
    def _notify(self) -> None:
        if self._tick is not None:
            ev, self._tick = self._tick, asyncio.Event()
            ev.set()

    async def _wait(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = check()
            if result is not None and result is not False:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"FakeAri: timed out after {timeout}s waiting for {what}")
            tick = self._tick
            try:
                await asyncio.wait_for(tick.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_for_app(self, app: str, timeout: float = 5.0) -> None:
        await self._wait(lambda: self.app_connected(app), timeout, f"a websocket for app {app!r}")

    async def wait_for_event(self, type: str, *, app: str | None = None, channel_id: str | None = None,
                             predicate: Callable[[dict], bool] | None = None, since: int = 0,
                             timeout: float = 5.0) -> dict:
        def check():
            for e in self.events_sent[since:]:
                if e["type"] == type and (app is None or e["application"] == app) \
                        and (channel_id is None or (e.get("channel") or {}).get("id") == channel_id) \
                        and (predicate is None or predicate(e)):
                    return e
            return None
        return await self._wait(check, timeout, f"event {type} (app={app}, channel={channel_id})")

    async def wait_for_request(self, method: str, path_regex: str, *, since: int = 0,
                               timeout: float = 5.0) -> RecordedRequest:
        rx = re.compile(path_regex)

        def check():
            for r in self.requests[since:]:
                if r.method == method.upper() and rx.fullmatch(r.path) and r.status:
                    return r
            return None
        return await self._wait(check, timeout, f"request {method} {path_regex}")

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until the scheduled asynchronous steps (StasisStart of new channels, ringing,
        playbacks) have run."""
        await self._wait(lambda: not self._tasks, timeout, "pending FakeAri steps")

    # ================================================================== scenario controls
    def freeze(self, frozen: bool = True) -> None:
        """Hold every HTTP request (not the websocket) until freeze(False)."""
        if frozen:
            self._unfrozen.clear()
        else:
            self._unfrozen.set()

    async def inbound_call(self, app: str, args: Iterable[str] = (), *, caller_number: str = "+15550001111",
                           caller_name: str = "", callee: str = "+15550002222", sip_call_id: str | None = None,
                           endpoint: str = "kamailio", channel_id: str | None = None,
                           sip_headers: dict[str, str] | None = None, variables: dict[str, str] | None = None,
                           if_app_missing: str = "raise") -> str:
        """A SIP call from the edge reaches Stasis(app,args...): a PJSIP channel in state Ring and a
        StasisStart. If ``app`` has no websocket, Asterisk's Stasis() fails: raise (default) or,
        with if_app_missing="fail", create and destroy the channel (no StasisStart)."""
        self._require_started()
        args = [str(a) for a in args]
        active = self.app_connected(app)
        if not active and if_app_missing == "raise":
            raise RuntimeError(f"FakeAri.inbound_call: app {app!r} has no websocket connected; a real Asterisk's "
                               f"Stasis() would fail (STASISSTATUS=FAILED). Connect first or await wait_for_app().")
        ch = self._new_channel(
            kind="inbound", tech="PJSIP", name=f"PJSIP/{endpoint}-{next(self._name_seq):08x}", state="Ring",
            caller=(caller_name, caller_number), protocol_id=sip_call_id or f"{uuid.uuid4()}@edge.invalid",
            dialplan=(self.inbound_context, callee, 1, "", ""), channel_id=channel_id)
        ch.sip_headers = dict(sip_headers or {})
        ch.variables.update(variables or {})
        ch.model["dialplan"].update(app_name="Stasis", app_data=",".join([app, *args]))
        self._emit("ChannelDialplan", self._chan_recipients(ch), channel=self._snapshot(ch),
                   dialplan_app="Stasis", dialplan_app_data=",".join([app, *args]))
        if active:
            self._stasis_start(ch, app, args)
        else:
            self._hangup(ch, 16, request=None)
        return ch.id

    async def caller_hangup(self, channel_id: str, cause: int = 16, *, tech_cause: int | None = None) -> None:
        """The far end hangs up (BYE / CANCEL / error): ChannelHangupRequest(cause), [ChannelLeftBridge],
        StasisEnd, then ChannelDestroyed(cause) for the apps still subscribed (see _hangup).
        ``tech_cause``: chan_pjsip's off-nominal SIP code (e.g. 503), shown as tech_cause."""
        self._hangup(self._live(channel_id), cause, request="remote", tech_cause=tech_cause)

    async def answer_outbound(self, channel_id: str) -> None:
        """The called party of an originate / dial answers: Up, Dial ANSWER, StasisStart (originate)."""
        ch = await self._dialing(channel_id)
        if not ch.dialing:
            raise RuntimeError(f"FakeAri.answer_outbound: {channel_id} is not being dialed (state {ch.state})")
        ch.dialing = False
        self._cancel_timers(ch)
        self._set_state(ch, "Up")
        self._emit_dial(ch, "ANSWER")
        req = ch.request or {}
        if not ch.in_stasis and req.get("app"):
            if self.app_connected(req["app"]):
                self._stasis_start(ch, req["app"], _split_args(req.get("appArgs")))
            else:
                self._hangup(ch, 16, request=None)

    async def fail_outbound(self, channel_id: str, cause: int = 17, *, tech_cause: int | None = None) -> None:
        """The called party rejects / is unreachable: Dial(BUSY|NOANSWER|CONGESTION|CHANUNAVAIL),
        [StasisEnd], ChannelDestroyed(cause[, tech_cause=SIP code]) to the originating app."""
        ch = await self._dialing(channel_id)
        if not ch.dialing:
            raise RuntimeError(f"FakeAri.fail_outbound: {channel_id} is not being dialed (state {ch.state})")
        self._fail_dial(ch, cause, tech_cause)

    async def _dialing(self, channel_id: str) -> FakeChannel:
        ch = self._live(channel_id)
        if not ch.dialing and ch.dialstring is not None and ch.state == "Down":
            try:       # originate starts dialing asynchronously, right after its HTTP response
                await self._wait(lambda: ch.dialing or ch.id not in self._chans, 1.0, "dialing to start")
            except TimeoutError:
                pass
        return self._live(channel_id)

    async def ring_outbound(self, channel_id: str) -> None:
        """180 Ringing now (normally automatic after ring_delay)."""
        self._ringing(self._live(channel_id))

    async def dialplan_set(self, channel_id: str, name: str, value: str) -> None:
        """The dialplan (an application such as Transfer) sets a channel variable: ChannelVarset
        to the apps subscribed to the channel."""
        ch = self._live(channel_id)
        ch.variables[name] = value
        self._emit("ChannelVarset", self._chan_recipients(ch), variable=name, value=value, channel=self._snapshot(ch))

    async def dialplan_stasis(self, channel_id: str, app: str, args: Iterable[str] = ()) -> None:
        """The dialplan runs Stasis(app,args...) on a channel that left the application."""
        ch = self._live(channel_id)
        if ch.in_stasis:
            raise RuntimeError(f"FakeAri.dialplan_stasis: {channel_id} is still in Stasis")
        self._stasis_start(ch, app, [str(a) for a in args])

    async def send_dtmf(self, channel_id: str, digit: str, duration_ms: int = 100) -> None:
        ch = self._live(channel_id)
        self._emit("ChannelDtmfReceived", self._chan_recipients(ch), digit=digit, duration_ms=duration_ms,
                   channel=self._snapshot(ch))

    def set_audio(self, channel_id: str, audio: str) -> None:
        """What the channel's far end sends from now on: "talking" (voice), "silence" (packets
        of silence) or "none" (no packets at all). With TALK_DETECT set, talking raises
        ChannelTalkingStarted, silence ChannelTalkingFinished after the silence threshold, and
        no packets raise nothing: Asterisk's DSP only judges frames it reads (recorded in
        ari_conversations/talk_detect.json: an agent that stops sending never "finishes")."""
        if audio not in ("talking", "silence", "none"):
            raise ValueError(f"audio must be talking, silence or none, not {audio!r}")
        ch = self._live(channel_id)
        ch.audio = audio
        self._talk(ch)

    def _talk(self, ch: FakeChannel) -> None:
        if ch.talk_detect_ms is None or ch.state != "Up":   # no media before the channel is up
            return
        if ch.audio == "talking" and ch.talking_since is None:
            ch.talking_since = time.monotonic()
            self._emit("ChannelTalkingStarted", self._chan_recipients(ch), channel=self._snapshot(ch))
        elif ch.audio == "silence" and ch.talking_since is not None:
            def finished() -> None:
                if ch.id in self._chans and ch.audio == "silence" and ch.talking_since is not None:
                    duration = round((time.monotonic() - ch.talking_since) * 1000)
                    ch.talking_since = None
                    self._emit("ChannelTalkingFinished", self._chan_recipients(ch), duration=duration,
                               channel=self._snapshot(ch))
            ch.timers.append(self._loop.call_later(ch.talk_detect_ms / 1000, finished))

    def set_rtp(self, channel_id: str, **counters: Any) -> None:
        """Set RTPstat fields (txcount=, rxcount=, rxploss=, rxjitter=...) returned by rtp_statistics."""
        ch = self._live(channel_id)
        props = SPEC.models["RTPstat"].properties
        for key, value in counters.items():
            if key not in props or key == "channel_uniqueid":
                raise KeyError(f"RTPstat has no settable field {key!r}")
            ch.rtp[key] = float(value) if props[key].type == "double" else int(value)

    async def drop_websockets(self, *, abrupt: bool = False) -> None:
        """The server closes every events websocket (1001 Going Away, or a TCP abort if abrupt);
        apps are deactivated (their events are missed) until a client connects again."""
        conns = list(self._conns)
        for conn in conns:
            if abrupt and conn.request.transport is not None:
                conn.request.transport.abort()
            else:
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"Asterisk going away")
        await self._wait(lambda: not any(c in self._conns for c in conns), 5.0, "websockets to close")

    async def restart(self) -> None:
        """Asterisk restarts: websockets dropped, every channel, bridge and playback gone (no events)."""
        await self.drop_websockets(abrupt=True)
        for ch in self._chans.values():
            self._cancel_timers(ch)
        for task in self._pb_tasks.values():
            task.cancel()
        self._chans.clear()
        self._bridges.clear()
        self.playbacks.clear()
        self._pb_tasks.clear()
        for a in self._apps.values():
            a.channels.clear()
            a.bridges.clear()
        self._apps.clear()
        self._started = ari_timestamp()

    def end_recordings(self) -> None:
        """Every live recording finishes now, as when its maxDurationSeconds passes."""
        for name in list(self.live_recordings):
            self._finish_recording(name, "done")

    def emit_event(self, app: str, event: dict) -> dict:
        """Send an event to ``app`` (timestamp/application/asterisk_id filled in if absent).
        Raises FakeAriBug if it is not a valid ARI message."""
        evt = dict(event)
        evt.setdefault("timestamp", ari_timestamp())
        evt.setdefault("application", app)
        evt.setdefault("asterisk_id", self.asterisk_id)
        self._deliver(app, evt)
        return evt

    def send_raw(self, app: str, text: str) -> None:
        """Send an arbitrary (unvalidated) text frame to ``app``'s websocket: garbage-from-ARI tests."""
        a = self._apps.get(app)
        if not a or a.conn is None:
            raise RuntimeError(f"FakeAri.send_raw: app {app!r} has no websocket")
        a.conn.queue.put_nowait(text)

    # ================================================================== internals: model
    def _require_started(self) -> None:
        if self._loop is None:
            raise RuntimeError("FakeAri not started")

    def _bug(self, message: str) -> FakeAriBug:
        self.bugs.append(message)
        return FakeAriBug(message)

    def _new_id(self) -> str:
        return f"{self._epoch}.{next(self._uid)}"

    def _new_channel(self, *, kind: str, tech: str, name: str, state: str, caller=("", ""), connected=("", ""),
                     protocol_id: str = "", dialplan=("default", "s", 1, "", ""), channel_id: str | None = None,
                     language: str = "en") -> FakeChannel:
        cid = channel_id or self._new_id()
        if cid in self._chans:
            raise _AriError(409, "Channel with given unique ID already exists")
        ctx, exten, prio, app_name, app_data = dialplan
        model = {
            "id": cid, "name": name, "state": state, "protocol_id": protocol_id,
            "caller": {"name": caller[0], "number": caller[1]},
            "connected": {"name": connected[0], "number": connected[1]},
            "accountcode": "",
            "dialplan": {"context": ctx, "exten": exten, "priority": prio, "app_name": app_name, "app_data": app_data},
            "creationtime": ari_timestamp(), "language": language,
        }
        ch = FakeChannel(id=cid, model=model, kind=kind, tech=tech)
        self._chans[cid] = ch
        self._emit("ChannelCreated", self._all_apps(), channel=self._snapshot(ch))
        return ch

    def _snapshot(self, ch: FakeChannel, *, all_vars: bool = False) -> dict:
        snap = copy.deepcopy(ch.model)
        if all_vars:
            shown = dict(ch.variables)
        else:
            shown = {n: ch.variables.get(n, "") for n in self.channelvars}
            shown.update({n: ch.variables.get(n, "") for n in ch.reportable})
        if shown:
            snap["channelvars"] = shown
        return snap

    def _bridge_snapshot(self, br: FakeBridge) -> dict:
        snap = copy.deepcopy(br.model)
        if br.reportable:
            snap["bridgevars"] = {n: br.variables.get(n, "") for n in br.reportable}
        return snap

    def _live(self, channel_id: str) -> FakeChannel:
        ch = self._chans.get(channel_id)
        if ch is None:
            raise KeyError(f"FakeAri: no live channel {channel_id!r} (live: {sorted(self._chans)})")
        return ch

    # ================================================================== internals: events
    def _app(self, name: str) -> _App:
        if name not in self._apps:
            self._apps[name] = _App(name)
        return self._apps[name]

    def _all_apps(self) -> list[str]:
        return [a.name for a in self._apps.values() if a.subscribe_all]

    def _chan_recipients(self, ch: FakeChannel) -> list[str]:
        out = [a.name for a in self._apps.values() if a.channels[ch.id] > 0 or a.subscribe_all]
        if ch.in_stasis and ch.app and ch.app not in out:
            out.append(ch.app)
        return out

    def _bridge_recipients(self, br: FakeBridge) -> list[str]:
        out = []
        for cid in br.model["channels"]:
            ch = self._chans.get(cid)
            if ch and ch.in_stasis and ch.app and ch.app not in out:
                out.append(ch.app)
        for a in self._apps.values():
            if (a.bridges[br.id] > 0 or a.subscribe_all) and a.name not in out:
                out.append(a.name)
        return out

    def _emit(self, type_: str, recipients: Iterable[str], **fields: Any) -> None:
        ts = ari_timestamp()
        seen: list[str] = []
        for app in recipients:
            if app in seen:
                continue
            seen.append(app)
            evt = {"type": type_, "timestamp": ts, **copy.deepcopy(fields), "application": app,
                   "asterisk_id": self.asterisk_id}
            self._deliver(app, evt)

    def _deliver(self, app: str, evt: dict) -> None:
        try:
            SPEC.validate_model("Message", evt)
        except SpecError as exc:
            raise self._bug(f"invalid event {evt.get('type')!r} for app {app!r}: {exc}") from None
        a = self._apps.get(app)
        if a is not None and not self._filter_allows(a, evt["type"]):
            return
        if a is None or a.conn is None or a.conn.ws.closed:
            self.events_dropped.append(evt)
            return
        self.events_sent.append(evt)
        a.conn.queue.put_nowait(json.dumps(evt))
        self._notify()

    @staticmethod
    def _filter_allows(a: _App, type_: str) -> bool:
        if a.allowed and not any(f.get("type") == type_ for f in a.allowed):
            return False
        return not any(f.get("type") == type_ for f in a.disallowed)

    # ================================================================== internals: scheduling
    def _soon(self, delay: float, fn: Callable, *args: Any) -> None:
        async def run():
            try:
                if delay > 0:
                    await asyncio.sleep(delay)
                fn(*args)
            except FakeAriBug:
                pass                               # already in self.bugs
            except Exception as exc:               # a fake bug: keep it loud
                self.bugs.append(f"scheduled step {getattr(fn, '__name__', fn)} failed: {exc!r}")
            finally:
                self._tasks.discard(task)
                self._notify()
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)

    def _cancel_timers(self, ch: FakeChannel) -> None:
        for t in ch.timers:
            t.cancel()
        ch.timers.clear()

    # ================================================================== internals: channel life
    def _set_state(self, ch: FakeChannel, state: str) -> None:
        if ch.model["state"] != state:
            ch.model["state"] = state
            self._emit("ChannelStateChange", self._chan_recipients(ch), channel=self._snapshot(ch))
            self._talk(ch)

    def _stasis_start(self, ch: FakeChannel, app: str, args: list[str]) -> None:
        if ch.id not in self._chans:
            return                                   # hung up before it reached Stasis
        ch.model["dialplan"].update(app_name="Stasis", app_data=",".join([app, *args]))
        ch.app, ch.in_stasis, ch.args = app, True, list(args)
        self._app(app).channels[ch.id] += 1
        self._emit("StasisStart", [app], args=list(args), channel=self._snapshot(ch))

    def _stasis_end(self, ch: FakeChannel) -> None:
        if not ch.in_stasis:
            return
        app = ch.app
        self._emit("StasisEnd", [app], channel=self._snapshot(ch))
        ch.in_stasis = False
        self._app(app).channels[ch.id] -= 1

    def _hangup(self, ch: FakeChannel, cause: int, *, request: str | None, tech_cause: int | None = None) -> None:
        """request: 'ari' (DELETE: ast_softhangup), 'remote' (BYE: ast_queue_hangup_with_cause) or None.

        Recipients follow Asterisk's subscription refcounts (res/stasis/app.c): app_send_end_msg()
        unsubscribes the Stasis app *before* publishing StasisEnd, so ChannelDestroyed only reaches
        apps still subscribed: the originating app of an originate/create/externalMedia channel,
        explicit /applications/{app}/subscription subscribers and subscribeAll apps -- not the Stasis
        app of an inbound or snoop channel.
        """
        if ch.id not in self._chans:
            return
        recips = self._chan_recipients(ch)
        self._cancel_timers(ch)
        ch.hangup_cause = cause
        extra = {"tech_cause": tech_cause} if tech_cause else {}
        if request == "ari":
            self._emit("ChannelHangupRequest", recips, cause=AST_SOFTHANGUP_EXPLICIT, soft=True,
                       channel=self._snapshot(ch))
        elif request == "remote":
            self._emit("ChannelHangupRequest", recips, cause=cause, **extra, channel=self._snapshot(ch))
        if ch.dialing:
            ch.dialing = False
            self._emit_dial(ch, "CANCEL" if request == "ari" else _DIALSTATUS.get(cause, "CHANUNAVAIL"))
        for pb_id, (kind, target) in list(self._pb_target.items()):
            if kind == "channel" and target == ch.id:
                self._finish_playback(pb_id, "done")
        for name, rec in list(self.live_recordings.items()):  # ast_play_and_record_full() returns on hangup
            if rec["target_uri"] == f"channel:{ch.id}":
                self._finish_recording(name, "done")
        if ch.bridge_id:
            if (ch.request or {}).get("app"):
                # recorded (ari_conversations/*.json): a channel the app created, hung up while in a
                # bridge, leaves the app subscribed to that bridge: its BridgeDestroyed still reaches
                # the app, while a bridge only inbound channels ever left is destroyed unheard
                self._app(ch.request["app"]).bridges[ch.bridge_id] += 1
            self._leave_bridge(ch)
        self._stasis_end(ch)
        self._emit("ChannelDestroyed", self._chan_recipients(ch), cause=cause,
                   cause_txt=CAUSE_TEXT.get(cause, "Unknown"), **extra, channel=self._snapshot(ch))
        del self._chans[ch.id]
        self.destroyed[ch.id] = ch
        for a in self._apps.values():
            a.channels.pop(ch.id, None)
        if ch.snoop_of and ch.snoop_of in self._chans:
            self._chans[ch.snoop_of].snoops.remove(ch.id)
        for sid in list(ch.snoops):                  # the audiohook is gone: snoop channels hang up too
            snoop = self._chans.get(sid)
            if snoop:
                self._soon(0, self._hangup_soft, snoop, 16)

    def _hangup_soft(self, ch: FakeChannel, cause: int) -> None:
        self._hangup(ch, cause, request=None)

    def _emit_dial(self, ch: FakeChannel, status: str) -> None:
        fields: dict[str, Any] = {"peer": self._snapshot(ch), "dialstatus": status}
        if ch.dialstring is not None:
            fields["dialstring"] = ch.dialstring
        if ch.dial_caller and ch.dial_caller in self._chans:
            fields["caller"] = self._snapshot(self._chans[ch.dial_caller])
        recips = self._chan_recipients(ch)
        if ch.dial_caller and ch.dial_caller in self._chans:
            recips += self._chan_recipients(self._chans[ch.dial_caller])
        self._emit("Dial", recips, **fields)

    def _start_dialing(self, ch: FakeChannel, timeout: int | None) -> None:
        ch.dialing = True
        self._emit_dial(ch, "")
        self._soon(self.ring_delay, self._ringing, ch)
        if timeout and timeout > 0:
            ch.timers.append(self._loop.call_later(timeout, self._dial_timeout, ch))

    def _ringing(self, ch: FakeChannel) -> None:
        if ch.id in self._chans and ch.dialing and ch.state != "Ringing":
            self._set_state(ch, "Ringing")
            self._emit_dial(ch, "RINGING")

    def _dial_timeout(self, ch: FakeChannel) -> None:
        if ch.id in self._chans and ch.dialing:
            try:
                self._fail_dial(ch, 19)
            except FakeAriBug:
                pass

    def _fail_dial(self, ch: FakeChannel, cause: int, tech_cause: int | None = None) -> None:
        ch.dialing = False
        self._emit_dial(ch, _DIALSTATUS.get(cause, "CHANUNAVAIL"))
        self._hangup(ch, cause, request=None, tech_cause=tech_cause)

    # ================================================================== internals: bridges
    def _retech(self, br: FakeBridge) -> None:
        if br.model["bridge_type"] == "holding":
            br.model["technology"] = "holding_bridge"
        elif br.model.get("video_mode") == "sfu":
            br.model["technology"] = "softmix"
        else:
            br.model["technology"] = "simple_bridge" if len(br.model["channels"]) <= 2 else "softmix"

    def _enter_bridge(self, ch: FakeChannel, br: FakeBridge) -> None:
        # a channel added to the bridge it is in leaves and enters again (ari_conversations/refusals.json)
        if ch.bridge_id:
            self._leave_bridge(ch)
        br.model["channels"].append(ch.id)
        ch.bridge_id = br.id
        self._retech(br)
        self._emit("ChannelEnteredBridge", self._bridge_recipients(br), bridge=self._bridge_snapshot(br),
                   channel=self._snapshot(ch))

    def _leave_bridge(self, ch: FakeChannel) -> None:
        br = self._bridges.get(ch.bridge_id or "")
        ch.bridge_id = None
        if br is None:
            return
        recips = self._bridge_recipients(br)
        br.model["channels"].remove(ch.id)
        self._retech(br)
        self._emit("ChannelLeftBridge", recips, bridge=self._bridge_snapshot(br), channel=self._snapshot(ch))

    # ================================================================== internals: playbacks
    def _media_outcome(self, uri: str) -> str:
        """How Asterisk's res_stasis_playback plays one media URI (recorded from 22.10.1,
        tests/media/ari_conversations/playback.json): "play" for a while then done, "loop"
        until stopped (tones), "fail" (PlaybackFinished failed: a sound that is not
        installed, a tone that is neither a zone's name nor a tone string), or "lost" (an
        unknown scheme, a stored recording that does not exist, a number that is none:
        PlaybackStarted, then no event at all and the playback is gone)."""
        scheme, _, rest = uri.partition(":")
        if uri in self.missing_media:
            return "fail"
        if scheme == "sound":
            return "play" if rest in self.sounds or rest.startswith(("http://", "https://")) else "fail"
        if scheme == "tone":
            name = rest.split(";")[0]
            return "loop" if name in _TONE_NAMES or _TONE_STRING.fullmatch(name) else "fail"
        if scheme == "recording":  # res_stasis_playback.c skips a missing one like an unknown scheme
            return "play" if rest in self.stored_recordings else "lost"
        if scheme == "number":  # and a number sscanf("%30d") cannot read
            return "play" if re.match(r"\s*[-+]?\d", rest) else "lost"
        if scheme in ("digits", "characters"):
            return "play"
        return "lost"

    def _start_playback(self, pb_id: str, kind: str, target: str, media: list[str], lang: str) -> dict:
        pb = {"id": pb_id, "media_uri": media[0], "target_uri": f"{kind}:{target}", "language": lang,
              "state": "queued"}
        if len(media) > 1:
            pb["next_media_uri"] = media[1]
        self.playbacks[pb_id] = pb
        self._pb_target[pb_id] = (kind, target)

        async def run():
            try:
                await asyncio.sleep(0)
                for i, uri in enumerate(media):
                    pb["media_uri"] = uri
                    if i + 1 < len(media):
                        pb["next_media_uri"] = media[i + 1]
                    else:
                        pb.pop("next_media_uri", None)
                    pb["state"] = "playing"
                    self._emit("PlaybackStarted", self._pb_recipients(pb_id), playback=dict(pb))
                    outcome = self._media_outcome(uri)
                    if outcome == "lost":         # res_stasis_playback: no handler, the playback is dropped
                        self.playbacks.pop(pb_id, None)
                        self._pb_target.pop(pb_id, None)
                        self._pb_tasks.pop(pb_id, None)
                        return
                    if outcome == "fail" and i + 1 == len(media):
                        self._finish_playback(pb_id, "failed", from_task=True)
                        return
                    if outcome == "loop":
                        await asyncio.Event().wait()   # a tone plays until the playback is stopped
                    elif outcome == "play":
                        if kind == "channel" and target in self._chans and self._chans[target].state != "Up":
                            self._stalled.add(pb_id)   # ends (done) when the channel is answered (refusals.json)
                            self._pb_tasks.pop(pb_id, None)
                            return
                        await asyncio.sleep(self.playback_duration)
                    if i + 1 < len(media):
                        pb["state"] = "continuing"
                        self._emit("PlaybackContinuing", self._pb_recipients(pb_id), playback=dict(pb))
                self._finish_playback(pb_id, "done", from_task=True)
            except FakeAriBug:
                pass
        self._pb_tasks[pb_id] = asyncio.get_running_loop().create_task(run())
        return pb

    def _pb_recipients(self, pb_id: str) -> list[str]:
        kind, target = self._pb_target[pb_id]
        if kind == "channel":
            ch = self._chans.get(target)
            return self._chan_recipients(ch) if ch else []
        br = self._bridges.get(target)
        return self._bridge_recipients(br) if br else []

    def _finish_playback(self, pb_id: str, state: str, from_task: bool = False) -> None:
        pb = self.playbacks.get(pb_id)
        if pb is None:
            return
        task = self._pb_tasks.pop(pb_id, None)
        if task is not None and not from_task:
            task.cancel()
        pb["state"] = state
        pb.pop("next_media_uri", None)
        recips = self._pb_recipients(pb_id)
        del self.playbacks[pb_id]
        del self._pb_target[pb_id]
        self._emit("PlaybackFinished", recips, playback=dict(pb))

    # ================================================================== HTTP plumbing
    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, pwd = base64.b64decode(header[6:]).decode().partition(":")
            except Exception:
                return False
            return (user, pwd) == (self.username, self.password)
        key = request.query.get("api_key")              # res_ari.c parse_api_keys(): ?api_key=user:password
        if key is not None:
            user, _, pwd = key.partition(":")
            return (user, pwd) == (self.username, self.password)
        return False

    @staticmethod
    def _rel_path(request: web.Request) -> str:
        raw = request.raw_path.split("?", 1)[0]
        return raw.removeprefix("/ari")

    def _record_reject(self, method, path, query, body, status, reason) -> web.Response:
        self.rejected.append(RecordedRequest(method, path, query, body, status, reason))
        self._notify()
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="Asterisk REST Interface"'
        return web.json_response({"message": reason}, status=status, headers=headers)

    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, str]], str | None]:
        """(json body or None, extra form params, error). res_ari.c: form-urlencoded bodies are merged
        into the query parameters; a JSON body is read only with Content-Type application/json."""
        raw = await request.read()
        if not raw:
            return None, [], None
        ctype = request.content_type
        if ctype == "application/json":
            try:
                return json.loads(raw), [], None
            except ValueError:
                return None, [], "Error parsing request body"
        if ctype == "application/x-www-form-urlencoded":
            return None, parse_qsl(raw.decode(), keep_blank_values=True), None
        return None, [], (f"request body with Content-Type {ctype!r} is ignored by Asterisk (it reads a JSON body "
                          f"only with Content-Type: application/json)")

    async def _http_entry(self, request: web.Request) -> web.StreamResponse:
        await self._unfrozen.wait()
        method, path = request.method.upper(), self._rel_path(request)
        query_pairs = list(request.query.items())
        body, form, body_err = await self._read_body(request)
        query_pairs += form
        query = {k: v for k, v in query_pairs}
        if not self._authorized(request):
            return self._record_reject(method, path, query, body, 401, "Authentication required")
        if body_err:
            return self._record_reject(method, path, query, body, 400, body_err)
        try:
            op, path_params = SPEC.validate_request(method, path, query_pairs, body)
        except SpecError as exc:
            return self._record_reject(method, path, query, body, exc.status, exc.reason)
        if op.is_websocket:
            return self._record_reject(method, path, query, body, 400,
                                       "GET /events must be a websocket upgrade request")
        args = SPEC.request_args(op, path_params, query_pairs, body)
        args["__body__"] = body
        rec = RecordedRequest(method, path, query, body, operation=f"{op.resource}.{op.nickname}")
        self.requests.append(rec)
        headers: dict[str, str] = {}
        handler = self._handlers.get((op.resource, op.nickname))
        try:
            if handler is None:
                raise _AriError(501, f"Not implemented by FakeAri: {op.key} ({op.resource}.{op.nickname})")
            result = handler(args)
            if asyncio.iscoroutine(result):
                result = await result
            status, payload = result[0], result[1]
            if len(result) > 2:
                headers = result[2]
        except _AriError as exc:
            status, payload = exc.status, {"message": exc.message}
        except FakeAriBug as exc:
            status, payload = 500, {"message": f"FakeAri bug: {exc}"}
        rec.status = status
        rec.reason = payload.get("message", "") if isinstance(payload, dict) and status >= 400 else ""
        self._check_response(op, status, payload)
        self._notify()
        if payload is None:
            return web.Response(status=status, headers=headers)
        if isinstance(payload, bytes):  # a stored recording's file
            return web.Response(body=payload, status=status, headers=headers)
        return web.json_response(payload, status=status, headers=headers)

    def _check_response(self, op: Operation, status: int, payload: Any) -> None:
        try:
            if 200 <= status < 300:
                if op.response_class == "void":
                    if status != 204 or payload is not None:
                        raise SpecError(f"void operation answered {status} with a body")
                elif op.response_class == "RTPstat":
                    SPEC.validate_value("RTPstat", {k: v for k, v in payload.items() if k not in RTP_MES_FIELDS})
                else:
                    SPEC.validate_value(op.response_class, payload)
            else:
                if not (isinstance(payload, dict) and set(payload) == {"message"}
                        and isinstance(payload["message"], str)):
                    raise SpecError(f"error body must be {{'message': str}}, got {payload!r}")
                allowed = set(op.error_codes) | {400, 500, 501} | self.rtp_glue_ops.get((op.resource, op.nickname),
                                                                                       set())
                if status not in allowed:
                    raise SpecError(f"status {status} is not documented for {op.key} "
                                    f"(documented: {sorted(op.error_codes)})")
        except SpecError as exc:
            self._bug(f"invalid response to {op.key} ({status}): {exc}")

    # ================================================================== events websocket
    async def _events_entry(self, request: web.Request) -> web.StreamResponse:
        path = self._rel_path(request)
        query_pairs = list(request.query.items())
        query = dict(query_pairs)
        if not self._authorized(request):
            return self._record_reject("GET", path, query, None, 401, "Authentication required")
        try:
            op, pp = SPEC.validate_request("GET", path, query_pairs, None)
        except SpecError as exc:
            reason = exc.reason
            if "missing required query parameter 'app'" in reason:
                reason = "HTTP request is missing param: [app]"
            return self._record_reject("GET", path, query, None, exc.status, reason)
        args = SPEC.request_args(op, pp, query_pairs, None)
        apps = [a.strip() for a in args["app"]]
        if any(not a for a in apps):
            return self._record_reject("GET", path, query, None, 400, "Invalid application name")
        ws = web.WebSocketResponse(timeout=2.0, autoping=True)
        if not ws.can_prepare(request).ok:
            return self._record_reject("GET", path, query, None, 400, "GET /ari/events needs a websocket upgrade")
        await ws.prepare(request)
        self.requests.append(RecordedRequest("GET", path, query, None, 101, operation="events.eventWebsocket"))
        conn = _Conn(ws=ws, apps=apps, subscribe_all=bool(args.get("subscribeAll", False)),
                     queue=asyncio.Queue(), request=request)
        conn.writer = asyncio.get_running_loop().create_task(self._writer(conn))
        self._conns.append(conn)
        for name in apps:
            a = self._app(name)
            old = a.conn
            if old is not None and old is not conn and not old.ws.closed:
                # res/stasis/app.c app_update(): the previous handler gets ApplicationReplaced
                self._deliver(name, {"type": "ApplicationReplaced", "timestamp": ari_timestamp(),
                                     "application": name, "asterisk_id": self.asterisk_id})
            a.conn = conn
            a.subscribe_all = conn.subscribe_all
        self._notify()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    conn.received.append(msg.data)
        finally:
            for name in apps:
                a = self._apps.get(name)
                if a is not None and a.conn is conn:
                    a.conn = None               # stasis_app_unregister(): deactivated, ALL subscription dropped
                    a.subscribe_all = False
            conn.queue.put_nowait(None)
            if conn in self._conns:
                self._conns.remove(conn)
            self._notify()
        return ws

    async def _writer(self, conn: _Conn) -> None:
        while True:
            text = await conn.queue.get()
            if text is None or conn.ws.closed:
                return
            try:
                await conn.ws.send_str(text)
            except Exception:          # peer gone: the read loop will clean up
                return

    # ================================================================== handler helpers
    def _chan_or_404(self, cid: str, message: str = "Channel not found") -> FakeChannel:
        ch = self._chans.get(cid)
        if ch is None:
            raise _AriError(404, message)
        return ch

    def _control(self, cid: str) -> FakeChannel:
        """resource_channels.c find_control(): 404 unknown channel, 409 not in Stasis."""
        ch = self._chan_or_404(cid)
        if not ch.in_stasis:
            raise _AriError(409, "Channel not in Stasis application")
        return ch

    def _control_state_ok(self, cid: str) -> FakeChannel:
        """find_control() + channel_state_invalid(): 412 for Down / Rsrved / Ringing (outbound not up)."""
        ch = self._control(cid)
        if ch.state in ("Down", "Rsrved", "Ringing"):
            raise _AriError(412, "Channel in invalid state")
        return ch

    def _bridge_or_404(self, bid: str) -> FakeBridge:
        br = self._bridges.get(bid)
        if br is None:
            raise _AriError(404, "Bridge not found")
        return br

    def _set_vars(self, ch_or_br, variables: dict | None) -> None:
        for name, value in (variables or {}).items():
            if not name.strip():
                continue
            if isinstance(value, dict):
                if value.get("report_events"):
                    ch_or_br.reportable.add(name.strip())
                value = value["value"]
            ch_or_br.variables[name.strip()] = value

    # ================================================================== handlers
    def _handler_table(self) -> dict[tuple[str, str], Callable[[dict], Any]]:
        h = {}
        for name in dir(self):
            if name.startswith("_h_"):
                resource, _, nick = name[3:].partition("__")
                h[(resource, nick)] = getattr(self, name)
        return h

    # ---- asterisk
    def _h_asterisk__getInfo(self, a):
        info = {
            "build": {"os": "Linux", "kernel": "6.1.0", "options": "BUILD_NATIVE, OPTIONAL_API", "machine": "x86_64",
                      "date": "2026-06-25 00:00:00 UTC", "user": "root"},
            "system": {"version": self.version, "entity_id": self.asterisk_id},
            "config": {"name": self.system_name, "default_language": "en", "max_channels": 0,
                       "max_open_files": 0, "max_load": 0.0, "setid": {"user": "asterisk", "group": "asterisk"}},
            "status": {"startup_time": self._started, "last_reload_time": self._started},
        }
        only = a.get("only")
        if only:
            info = {k: v for k, v in info.items() if k in only}
        return 200, info

    def _h_asterisk__ping(self, a):
        return 200, {"asterisk_id": self.asterisk_id, "ping": "pong", "timestamp": ari_timestamp()}

    def _h_asterisk__getGlobalVar(self, a):
        return 200, {"value": self.global_vars.get(a["variable"], "")}

    def _h_asterisk__setGlobalVar(self, a):
        self.global_vars[a["variable"]] = a.get("value", "")
        return 204, None

    # ---- applications
    def _app_json(self, app: _App) -> dict:
        return {"name": app.name,
                "channel_ids": [c for c, n in app.channels.items() if n > 0 and c in self._chans],
                "bridge_ids": [b for b, n in app.bridges.items() if n > 0 and b in self._bridges],
                "endpoint_ids": sorted(app.endpoints), "device_names": [],
                "events_allowed": list(app.allowed), "events_disallowed": list(app.disallowed)}

    def _h_applications__list(self, a):
        return 200, [self._app_json(x) for x in self._apps.values()]

    def _app_or_404(self, name: str) -> _App:
        app = self._apps.get(name)
        if app is None:
            raise _AriError(404, "Application does not exist.")
        return app

    def _h_applications__get(self, a):
        return 200, self._app_json(self._app_or_404(a["applicationName"]))

    def _sources(self, sources: list[str]) -> list[tuple[str, str]]:
        out = []
        for src in sources:
            scheme, sep, ident = src.partition(":")
            if not sep or scheme not in ("channel", "bridge", "endpoint", "deviceState"):
                raise _AriError(400, f"Invalid event source URI scheme: {src}")
            if scheme == "channel" and ident and ident not in self._chans:
                raise _AriError(422, f"Event source '{src}' not found")
            if scheme == "bridge" and ident and ident not in self._bridges:
                raise _AriError(422, f"Event source '{src}' not found")
            out.append((scheme, ident))
        return out

    def _h_applications__subscribe(self, a):
        app = self._app_or_404(a["applicationName"])
        for scheme, ident in self._sources(a["eventSource"]):
            if scheme == "channel":
                if ident:
                    app.channels[ident] += 1
                else:
                    app.subscribe_all = True
            elif scheme == "bridge":
                if ident:
                    app.bridges[ident] += 1
                else:
                    app.subscribe_all = True
            elif scheme == "endpoint":
                app.endpoints.add(ident)
        return 200, self._app_json(app)

    def _h_applications__unsubscribe(self, a):
        app = self._app_or_404(a["applicationName"])
        for scheme, ident in self._sources(a["eventSource"]):
            counter = app.channels if scheme == "channel" else app.bridges if scheme == "bridge" else None
            if counter is not None and ident:
                if counter[ident] <= 0:
                    raise _AriError(409, "Application not subscribed to event source.")
                counter[ident] -= 1
            elif scheme == "endpoint":
                if ident not in app.endpoints:
                    raise _AriError(409, "Application not subscribed to event source.")
                app.endpoints.discard(ident)
        return 200, self._app_json(app)

    def _h_applications__filter(self, a):
        app = self._app_or_404(a["applicationName"])
        flt = a.get("filter") or {}
        app.allowed, app.disallowed = list(flt.get("allowed", [])), list(flt.get("disallowed", []))
        return 200, self._app_json(app)

    # ---- endpoints
    def _endpoint_json(self, name: str) -> dict:
        tech, _, res = name.partition("/")
        ids = [c.id for c in self._chans.values() if c.tech == tech and c.name.startswith(f"{tech}/{res}-")]
        return {"technology": tech, "resource": res, "state": "online", "channel_ids": ids}

    def _h_endpoints__list(self, a):
        return 200, [self._endpoint_json(n) for n in self.endpoint_names]

    def _h_endpoints__listByTech(self, a):
        found = [self._endpoint_json(n) for n in self.endpoint_names if n.split("/")[0] == a["tech"]]
        if not found:
            raise _AriError(404, "Endpoints not found")
        return 200, found

    def _h_endpoints__get(self, a):
        name = f"{a['tech']}/{a['resource']}"
        if name not in self.endpoint_names:
            raise _AriError(404, "Endpoints not found")
        return 200, self._endpoint_json(name)

    # ---- events
    def _h_events__userEvent(self, a):
        app = self._app_or_404(a["application"])
        fields: dict[str, Any] = {"eventname": a["eventName"], "userevent": dict(a.get("variables") or {})}
        for src in a.get("source") or []:
            scheme, _, ident = src.partition(":")
            if scheme == "channel" and ident in self._chans:
                fields["channel"] = self._snapshot(self._chans[ident])
            elif scheme == "bridge" and ident in self._bridges:
                fields["bridge"] = self._bridge_snapshot(self._bridges[ident])
            else:
                raise _AriError(422, "Event source not found.")
        self._emit("ChannelUserevent", [app.name], **fields)
        return 204, None

    # ---- channels: queries
    def _h_channels__list(self, a):
        return 200, [self._snapshot(c) for c in self._chans.values()]

    def _h_channels__get(self, a):
        return 200, self._snapshot(self._chan_or_404(a["channelId"]))

    def _read_var(self, ch: FakeChannel, name: str) -> str | None:
        """A variable's value (None: 404 "Provided variable was not found"); a dialplan function
        the fake cannot read raises 500 "Unable to read provided function", as ast_func_read2()
        failing does on Asterisk: a missing header, an unknown item or function, a write-only
        one (TALK_DETECT, PJSIP_HEADER(add,…)) — recorded in ari_conversations/variables.json."""
        if not name.endswith(")"):
            return ch.variables.get(name)
        m = re.fullmatch(r"PJSIP_HEADER\(read,([^,)]+)(?:,\d+)?\)", name)
        value = None
        if m and ch.tech == "PJSIP":
            value = next((v for k, v in ch.sip_headers.items() if k.lower() == m.group(1).lower()), None)
        elif (m := re.fullmatch(r"CALLERID\((num|name)\)", name)):
            value = ch.model["caller"]["number" if m.group(1) == "num" else "name"]
        elif name == "CHANNEL(name)":
            value = ch.name
        elif name == "CHANNEL(uniqueid)":
            value = ch.id
        elif name in ("CHANNEL(pjsip,call-id)", "CHANNEL(callid)") and ch.tech == "PJSIP":
            value = ch.model["protocol_id"]
        if value is None:
            raise _AriError(500, "Unable to read provided function")
        return value

    def _h_channels__getChannelVar(self, a):
        ch = self._chan_or_404(a["channelId"], "Provided channel was not found")
        if not a["variable"]:
            raise _AriError(400, "Variable name is required")
        value = self._read_var(ch, a["variable"])
        if value is None:
            raise _AriError(404, "Provided variable was not found")
        return 200, {"value": value}

    def _h_channels__getChannelVars(self, a):
        ch = self._chan_or_404(a["channelId"], "Provided channel was not found")
        out = {}
        for name in a["variables"]:
            value = self._read_var(ch, name)
            if value is None:
                raise _AriError(404, "Provided variable was not found")
            out[name] = value
        return 200, {"variables": out}

    def _h_channels__setChannelVar(self, a):
        if not a["variable"]:
            raise _AriError(400, "Variable name is required")
        ch = self._control(a["channelId"])
        value = a.get("value", "")
        if a["variable"] == "TALK_DETECT(set)":   # func_talkdetect.c: dsp_silence_threshold[,talking threshold]
            ch.talk_detect_ms = int((value or "2500").split(",")[0] or 2500)
            self._talk(ch)
        elif a["variable"] == "TALK_DETECT(remove)":
            ch.talk_detect_ms, ch.talking_since = None, None
        ch.variables[a["variable"]] = value
        if a.get("report_events"):
            ch.reportable.add(a["variable"])
        self._emit("ChannelVarset", self._chan_recipients(ch), variable=a["variable"], value=value,
                   channel=self._snapshot(ch))
        return 204, None

    def _h_channels__setChannelVars(self, a):
        ch = self._control(a["channelId"])
        before = dict(ch.variables)
        self._set_vars(ch, a["variables"])
        for name, value in ch.variables.items():
            if before.get(name) != value:
                self._emit("ChannelVarset", self._chan_recipients(ch), variable=name, value=value,
                           channel=self._snapshot(ch))
        return 204, None

    def _h_channels__rtpstatistics(self, a):
        # resource_channels.c ast_ari_channels_rtpstatistics(): a tech without RTP glue is 403;
        # UnicastRTP has glue, but chan_rtp hands out its RTP instance only to channels made
        # with its `g` option, which externalMedia never sets: 404 "RTP info not found"
        # (recorded in ari_conversations/rtp_statistics.json).
        ch = self._chan_or_404(a["channelId"])
        if ch.tech not in _RTP_TECHS:
            raise _AriError(403, "Unsupported channel type")      # no RTP glue (Snoop, AudioSocket, WebSocket)
        if ch.tech == "UnicastRTP" or ch.state != "Up":   # chan_pjsip: no RTP instance before the answer
            raise _AriError(404, "RTP info not found")
        stats: dict[str, Any] = {}
        for name, prop in SPEC.models["RTPstat"].properties.items():
            stats[name] = 0.0 if prop.type == "double" else 0
        stats["local_ssrc"] = (hash(ch.id) & 0x7FFFFFFF)
        stats["remote_ssrc"] = (hash(ch.id[::-1]) & 0x7FFFFFFF)
        stats.update({name: 0 if name in ("txmes", "rxmes") else 0.0 for name in RTP_MES_FIELDS})
        stats.update(ch.rtp)
        stats["channel_uniqueid"] = ch.id
        return 200, stats

    # ---- channels: call control
    def _h_channels__answer(self, a):
        ch = self._control_state_ok(a["channelId"])
        for pb_id in [p for p in self._stalled if self._pb_target.get(p) == ("channel", ch.id)]:
            self._stalled.discard(pb_id)
            self._finish_playback(pb_id, "done")
        self._set_state(ch, "Up")
        return 204, None

    def _h_channels__hangup(self, a):
        ch = self._chan_or_404(a["channelId"])
        if a.get("reason") and a.get("reason_code"):
            raise _AriError(400, "The reason and reason_code can't both be specified")
        if a.get("reason_code"):
            try:
                cause = int(a["reason_code"].strip())
            except ValueError:
                raise _AriError(400, "Invalid reason for hangup reason code provided") from None
        elif a.get("reason"):
            cause = HANGUP_REASONS[a["reason"]]
        else:
            cause = 16
        self._hangup(ch, cause, request="ari")
        return 204, None

    def _noop_control(self, a):
        self._control_state_ok(a["channelId"])
        return 204, None

    _h_channels__ring = _h_channels__ringStop = _h_channels__progress = _noop_control
    _h_channels__startMoh = _h_channels__stopMoh = _h_channels__startSilence = _h_channels__stopSilence = _noop_control

    def _h_channels__mute(self, a):
        ch = self._control_state_ok(a["channelId"])
        ch.muted = a.get("direction", "both")
        return 204, None

    def _h_channels__unmute(self, a):
        ch = self._control_state_ok(a["channelId"])
        ch.muted = None
        return 204, None

    def _h_channels__hold(self, a):
        ch = self._control_state_ok(a["channelId"])
        ch.held = True
        return 204, None

    def _h_channels__unhold(self, a):
        ch = self._control_state_ok(a["channelId"])
        ch.held = False
        return 204, None

    def _h_channels__sendDTMF(self, a):
        self._control_state_ok(a["channelId"])
        if not a.get("dtmf"):
            raise _AriError(400, "DTMF is required")
        return 204, None

    def _h_channels__continueInDialplan(self, a):
        """stasis_app_control_continue(): the channel leaves its bridge and the application, and
        goes on in the dialplan at the given place (see dialplan_set / dialplan_stasis)."""
        ch = self._control_state_ok(a["channelId"])
        if ch.bridge_id:
            self._leave_bridge(ch)
        self._stasis_end(ch)
        where = ch.model["dialplan"]
        where.update(app_name="", app_data="")
        if a.get("context"):
            where.update(context=a["context"], exten=a.get("extension") or where["exten"],
                         priority=int(a.get("priority") or 1))
        elif a.get("extension"):
            where.update(exten=a["extension"], priority=int(a.get("priority") or 1))
        return 204, None

    def _h_channels__move(self, a):
        ch = self._control(a["channelId"])
        self._stasis_end(ch)
        self._stasis_start(ch, a["app"], _split_args(a.get("appArgs")))
        return 204, None

    def _h_channels__redirect(self, a):
        self._control_state_ok(a["channelId"])
        if not a.get("endpoint"):
            raise _AriError(400, "Endpoint parameter not provided")
        return 204, None

    # ---- recordings (res/ari/resource_channels.c record, resource_recordings.c, res_stasis_recording.c)
    def _h_channels__record(self, a):
        ch = self._control(a["channelId"])
        name, fmt = a["name"], a["format"]
        if a.get("maxDurationSeconds", 0) < 0 or a.get("maxSilenceSeconds", 0) < 0:
            raise _AriError(400, "max_duration_seconds cannot be negative")
        if fmt not in self.recording_formats:
            raise _AriError(422, "specified format is unknown on this system")
        if ".." in name.split("/") or name.startswith("/"):
            raise _AriError(400, "Recording name invalid")
        exists = a.get("ifExists", "fail")
        if name in self.live_recordings or (exists == "fail" and name in self.stored_recordings):
            raise _AriError(409, f"Recording '{name}' already exists and can not be overwritten")
        rec = {"name": name, "format": fmt, "state": "queued", "target_uri": f"channel:{ch.id}"}
        self.live_recordings[name] = rec
        self._rec_started[name] = time.monotonic()
        self._soon(0, self._recording_starts, name, ch.id, int(a.get("maxDurationSeconds", 0)))
        return 201, dict(rec), {"Location": f"/recordings/live/{name}"}

    def _recording_starts(self, name: str, channel_id: str, max_s: int) -> None:
        """record_file(): fails in a bridge; else the channel is answered and recording starts."""
        rec, ch = self.live_recordings.get(name), self._chans.get(channel_id)
        if rec is None or ch is None:
            return
        if ch.bridge_id:
            self._finish_recording(name, "failed", cause="Cannot record channel while in bridge")
            return
        if ch.state != "Up":
            self._set_state(ch, "Up")
        rec["state"] = "recording"
        self._rec_started[name] = time.monotonic()
        self._emit("RecordingStarted", self._chan_recipients(ch), recording=dict(rec))
        if max_s:
            self._soon(max_s, self._finish_recording, name, "done")

    def _finish_recording(self, name: str, state: str, cause: str = "") -> None:
        rec = self.live_recordings.pop(name, None)
        if rec is None:
            return
        elapsed = time.monotonic() - self._rec_started.pop(name, time.monotonic())
        channel_id = rec["target_uri"].split(":", 1)[1]
        ch = self._chans.get(channel_id)
        rec["state"] = state
        if state == "failed":
            rec["cause"] = cause
        else:
            rec["duration"] = int(elapsed)
            self.stored_recordings[name] = (rec["format"], _silent_wav(elapsed) if rec["format"] == "wav" else b"")
        kind = {"done": "RecordingFinished", "canceled": "RecordingFinished", "failed": "RecordingFailed"}[state]
        self._emit(kind, self._chan_recipients(ch) if ch else [], recording=dict(rec))

    def _h_recordings__listStored(self, a):
        return 200, [{"name": n, "format": f} for n, (f, _) in sorted(self.stored_recordings.items())]

    def _stored_or_404(self, name: str) -> tuple[str, bytes]:
        if name not in self.stored_recordings:
            raise _AriError(404, "Recording not found")
        return self.stored_recordings[name]

    def _h_recordings__getStored(self, a):
        fmt, _ = self._stored_or_404(a["recordingName"])
        return 200, {"name": a["recordingName"], "format": fmt}

    def _h_recordings__getStoredFile(self, a):
        fmt, data = self._stored_or_404(a["recordingName"])
        return 200, data, {"Content-Type": f"audio/{fmt}"}

    def _h_recordings__deleteStored(self, a):
        self._stored_or_404(a["recordingName"])
        del self.stored_recordings[a["recordingName"]]
        return 204, None

    def _live_or_404(self, name: str) -> dict:
        if name not in self.live_recordings:
            raise _AriError(404, "Recording not found")
        return self.live_recordings[name]

    def _h_recordings__getLive(self, a):
        return 200, dict(self._live_or_404(a["recordingName"]))

    def _h_recordings__stop(self, a):
        self._live_or_404(a["recordingName"])
        self._finish_recording(a["recordingName"], "done")
        return 204, None

    def _h_recordings__cancel(self, a):
        self._live_or_404(a["recordingName"])
        self._finish_recording(a["recordingName"], "canceled")
        self.stored_recordings.pop(a["recordingName"], None)
        return 204, None

    # ---- channels: creation
    def _check_ids(self, *ids: str | None) -> None:
        for i in ids:
            if i and len(i) > AST_MAX_PUBLIC_UNIQUEID:
                raise _AriError(400, f"Uniqueid length exceeds maximum of {AST_MAX_PUBLIC_UNIQUEID}")

    def _dial_target(self, endpoint: str) -> tuple[str, str]:
        tech, sep, device = endpoint.partition("/")
        if not tech or not sep or not device:
            raise _AriError(400, "Invalid endpoint specified")
        if tech != "PJSIP":
            raise _AriError(501, f"FakeAri only dials PJSIP endpoints, not {tech!r}")
        return tech, device

    def _originate(self, a: dict, channel_id: str | None):
        self._check_ids(channel_id, a.get("otherChannelId"))
        if not a.get("endpoint"):
            raise _AriError(400, "Endpoint must be specified")
        if a.get("originator") and a.get("formats"):
            raise _AriError(400, "Originator and formats can't both be specified")
        tech, device = self._dial_target(a["endpoint"])
        if not a.get("app") and not a.get("extension"):
            raise _AriError(400, "Application or extension must be specified")
        if a.get("originator") and a["originator"] not in self._chans:
            raise _AriError(400, "Provided originator channel was not found")
        if channel_id and channel_id in self._chans:
            raise _AriError(409, "Channel with given unique ID already exists")
        cid = _cid_parse(a.get("callerId"))
        ch = self._new_channel(kind="outbound", tech=tech, name=f"PJSIP/{device.split('/')[0]}-"
                               f"{next(self._name_seq):08x}", state="Down", caller=cid, connected=cid,
                               protocol_id=f"{uuid.uuid4()}", channel_id=channel_id)
        ch.request = {k: v for k, v in a.items()}
        ch.dialstring = device
        self._set_vars(ch, a.get("variables"))
        self.originations.append(dict(ch.request, channelId=ch.id))
        if a.get("app"):
            self._app(a["app"]).channels[ch.id] += 1     # stasis_app_subscribe_channel() before dialing
        snapshot = self._snapshot(ch)
        timeout = a.get("timeout", 30)
        self._soon(0, self._start_dialing, ch, None if timeout == -1 else (timeout if timeout > 0 else 30))
        return 200, snapshot

    def _h_channels__originate(self, a):
        return self._originate(a, a.get("channelId"))

    def _h_channels__originateWithId(self, a):
        return self._originate(a, a["channelId"])

    def _h_channels__create(self, a):
        self._check_ids(a.get("channelId"), a.get("otherChannelId"))
        if a.get("originator") and a.get("formats"):
            raise _AriError(400, "Originator and formats can't both be specified")
        if not a.get("endpoint"):
            raise _AriError(400, "Endpoint must be specified")
        tech, device = self._dial_target(a["endpoint"])
        if a.get("channelId") and a["channelId"] in self._chans:
            raise _AriError(409, "Channel with given unique ID already exists")
        ch = self._new_channel(kind="outbound", tech=tech, name=f"PJSIP/{device.split('/')[0]}-"
                               f"{next(self._name_seq):08x}", state="Down", protocol_id=f"{uuid.uuid4()}",
                               channel_id=a.get("channelId"))
        ch.request = dict(a)
        ch.dialstring = device
        self._set_vars(ch, a.get("variables"))
        self.originations.append(dict(ch.request, channelId=ch.id))
        self._app(a["app"]).channels[ch.id] += 1
        snapshot = self._snapshot(ch)
        self._soon(self.stasis_delay, self._stasis_start, ch, a["app"], _split_args(a.get("appArgs")))
        return 200, snapshot

    def _h_channels__dial(self, a):
        ch = self._control(a["channelId"])
        if ch.state not in ("Down", "Rsrved"):
            raise _AriError(409, "Channel is not in the 'Down' state")
        if ch.dialstring is None:
            raise _AriError(409, "Dialing a channel not created by ARI")
        caller = self._chans.get(a.get("caller") or "")
        if caller is not None:
            ch.dial_caller = caller.id
            ch.model["connected"] = dict(caller.model["caller"])
            ch.model["language"] = caller.model["language"]
        timeout = a.get("timeout", 0)
        self._start_dialing(ch, timeout if timeout > 0 else None)
        return 204, None

    def _h_channels__externalMedia(self, a):
        # resource_channels.c ast_ari_channels_external_media()
        if not a.get("app"):
            raise _AriError(400, "app cannot be empty")
        transport, encap = a.get("transport") or "udp", a.get("encapsulation") or "rtp"
        if transport == "websocket" and encap != "none":
            raise _AriError(400, "encapsulation must be 'none' for websocket transport")
        if encap == "rtp" and transport != "udp":
            raise _AriError(400, "transport must be 'udp' for rtp encapsulation")
        if encap == "audiosocket" and transport != "tcp":
            raise _AriError(400, "transport must be 'tcp' for audiosocket encapsulation")
        ctype = a.get("connection_type") or "client"
        if transport != "websocket" and ctype == "server":
            raise _AriError(400, "'server' connection_type can only be used with the websocket transport")
        host = a.get("external_host")
        if not host:
            if ctype == "client":
                raise _AriError(400, "external_host is required for all but websocket server connections")
            host = "INCOMING"
        if transport == "websocket":
            if ctype == "client" and host not in self.websocket_clients:
                raise _AriError(400, "external_host must be a valid websocket_client connection id.")
        elif not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+):[0-9]+", host):
            raise _AriError(400, "external_host must be <host>:<port> for all transports other than websocket")
        if not a.get("format"):
            raise _AriError(400, "format cannot be empty")
        self._check_ids(a.get("channelId"))
        if encap == "audiosocket" and transport == "tcp" and not a.get("data"):
            raise _AriError(400, "data can not be empty")
        if a.get("channelId") and a["channelId"] in self._chans:
            raise _AriError(409, "Channel with given unique ID already exists")
        if encap == "rtp":
            name, tech, dialstring = (f"UnicastRTP/{host}-0x{random.getrandbits(44):011x}", "UnicastRTP",
                                      f"{host}/c({a['format']})")
        elif encap == "audiosocket":
            try:
                uuid.UUID(a["data"])
            except ValueError:     # chan_audiosocket: "Failed to parse UUID" -> the request fails
                raise _AriError(500, "Allocation failed") from None
            name, tech, dialstring = f"AudioSocket/{host}-{a['data']}", "AudioSocket", f"{host}/{a['data']}"
        elif encap == "none" and transport == "websocket":
            name, tech, dialstring = (f"WebSocket/{host}/0x{random.getrandbits(44):011x}", "WebSocket",
                                      host + (f"/{a['transport_data']}" if a.get("transport_data") else ""))
        else:
            raise _AriError(501, "The encapsulation and/or transport is not supported")
        ch = self._new_channel(kind="external", tech=tech, name=name, state="Down", channel_id=a.get("channelId"))
        ch.request, ch.dialstring = dict(a), dialstring
        self._set_vars(ch, a.get("variables"))
        if encap == "rtp":                   # chan_rtp.c unicast_rtp_request()
            ch.variables["UNICASTRTP_LOCAL_ADDRESS"] = self.media_address
            ch.variables["UNICASTRTP_LOCAL_PORT"] = str(next(self._rtp_port))
        self._app(a["app"]).channels[ch.id] += 1
        body = self._snapshot(ch)
        if ch.variables:                     # the response carries *all* channel variables
            body["channelvars"] = dict(ch.variables)
        self._soon(self.stasis_delay, self._external_up, ch, a["app"], _split_args(a.get("data")))
        return 200, body

    def _external_up(self, ch: FakeChannel, app: str, args: list[str]) -> None:
        if ch.id not in self._chans:
            return
        ch.dialing = True
        self._emit_dial(ch, "")
        ch.dialing = False
        self._set_state(ch, "Up")            # rtp_call()/audiosocket_call() queue an ANSWER at once
        self._emit_dial(ch, "ANSWER")
        if self.app_connected(app):
            self._stasis_start(ch, app, args)
        else:
            self._hangup(ch, 16, request=None)

    def _snoop(self, a: dict, snoop_id: str | None):
        spy, whisper = a.get("spy", "none"), a.get("whisper", "none")
        if spy == "none" and whisper == "none":
            raise _AriError(400, "Direction must be specified for at least spy or whisper")
        if not a.get("app"):
            raise _AriError(400, "Application name is required")
        target = self._chan_or_404(a["channelId"], "Provided channel was not found")
        if snoop_id and snoop_id in self._chans:
            raise _AriError(500, "Snoop channel could not be created")
        ch = self._new_channel(kind="snoop", tech="Snoop", name=f"Snoop/{target.id}-{next(self._snoop_seq):08x}",
                               state="Up", channel_id=snoop_id)
        ch.request, ch.snoop_of = dict(a), target.id
        target.snoops.append(ch.id)
        self._soon(self.stasis_delay, self._stasis_start, ch, a["app"], _split_args(a.get("appArgs")))
        return 200, self._snapshot(ch)

    def _h_channels__snoopChannel(self, a):
        return self._snoop(a, a.get("snoopId"))

    def _h_channels__snoopChannelWithId(self, a):
        return self._snoop(a, a["snoopId"])

    # ---- channels/bridges: playback
    def _play(self, a: dict, kind: str, target: str, lang: str, pb_id: str | None):
        if a.get("skipms", 0) < 0:
            raise _AriError(400, "skipms cannot be negative")
        if a.get("offsetms", 0) < 0:
            raise _AriError(400, "offsetms cannot be negative")
        pb_id = pb_id or str(uuid.uuid4())
        if pb_id in self.playbacks:
            raise _AriError(500, "Failed to queue media for playback")
        pb = self._start_playback(pb_id, kind, target, list(a["media"]), a.get("lang") or lang)
        return 201, dict(pb), {"Location": f"/playbacks/{pb_id}"}

    def _h_channels__play(self, a):
        ch = self._control_state_ok(a["channelId"])
        return self._play(a, "channel", ch.id, ch.model["language"], a.get("playbackId"))

    def _h_channels__playWithId(self, a):
        ch = self._control_state_ok(a["channelId"])
        return self._play(a, "channel", ch.id, ch.model["language"], a["playbackId"])

    def _h_bridges__play(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        return self._play(a, "bridge", br.id, "en", a.get("playbackId"))

    def _h_bridges__playWithId(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        return self._play(a, "bridge", br.id, "en", a["playbackId"])

    def _h_playbacks__get(self, a):
        pb = self.playbacks.get(a["playbackId"])
        if pb is None:
            raise _AriError(404, "Playback not found")
        return 200, dict(pb)

    def _h_playbacks__stop(self, a):
        if a["playbackId"] not in self.playbacks:
            raise _AriError(404, "Playback not found")
        self._finish_playback(a["playbackId"], "done")
        return 204, None

    def _h_playbacks__control(self, a):
        pb = self.playbacks.get(a["playbackId"])
        if pb is None:
            raise _AriError(404, "Playback not found")
        if pb["state"] not in ("playing", "continuing"):
            raise _AriError(409, "Playback not in a controllable state")
        return 204, None

    # ---- bridges
    def _create_bridge(self, a: dict, bridge_id: str | None, variables: dict | None):
        # res_stasis.c bridge_create_common()
        if bridge_id and bridge_id in self._bridges:
            raise _AriError(409, f"Bridge with id '{bridge_id}' already exists")
        caps, video = set(), "talker"
        for t in (a.get("type") or "mixing").split(","):
            t = t.strip()
            if t in ("mixing", "holding"):
                caps.add(t)
            elif t == "video_sfu":
                video = "sfu"
            elif t == "video_single":
                video = "single"
        if not caps or caps == {"mixing", "holding"}:
            raise _AriError(500, f"Unable to create bridge. Possible duplicate bridge id '{bridge_id or ''}'")
        btype = caps.pop()
        bid = bridge_id or str(uuid.uuid4())
        br = FakeBridge(id=bid, model={
            "id": bid, "technology": "holding_bridge" if btype == "holding" else "simple_bridge",
            "bridge_type": btype, "bridge_class": "stasis", "creator": "Stasis", "name": a.get("name") or "",
            "channels": [], "creationtime": ari_timestamp(), "video_mode": video})
        self._bridges[bid] = br
        self._retech(br)
        self._emit("BridgeCreated", self._all_apps(), bridge=self._bridge_snapshot(br))
        self._set_vars(br, variables)
        return 200, self._bridge_snapshot(br)

    def _h_bridges__create(self, a):
        # Asterisk 22.10.1 quirk (resource_bridges.c ast_ari_bridges_create()): the *whole* JSON body is
        # passed to json_to_ast_variables(), not body["variables"]: every top-level key becomes a bridge
        # variable, and {"variables": {...}} fails with 400 *after* the bridge was created (it leaks).
        body = a.get("__body__")
        status, snapshot = self._create_bridge(a, a.get("bridgeId"), None)
        if body:
            br = self._bridges[snapshot["id"]]
            for value in body.values():
                if isinstance(value, dict) and not isinstance(value.get("value"), str):
                    raise _AriError(400, "Each object value in 'variables' must include string field 'value' "
                                         "(POST /bridges reads the whole JSON body as the variables; the bridge "
                                         f"{br.id} was created anyway; use POST /bridges/{{bridgeId}} for variables)")
                if not isinstance(value, (str, dict)):
                    raise _AriError(400, "Each value in 'variables' must be a string or an object with 'value' "
                                         "and optional 'report_events'")
            self._set_vars(br, body)
            snapshot = self._bridge_snapshot(br)
        return status, snapshot

    def _h_bridges__createWithId(self, a):
        return self._create_bridge(a, a["bridgeId"], a.get("variables"))

    def _h_bridges__list(self, a):
        return 200, [self._bridge_snapshot(b) for b in self._bridges.values()]

    def _h_bridges__get(self, a):
        return 200, self._bridge_snapshot(self._bridge_or_404(a["bridgeId"]))

    def _h_bridges__destroy(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        for cid in list(br.model["channels"]):
            ch = self._chans.get(cid)
            if ch is not None:
                self._leave_bridge(ch)
        for pb_id, (kind, target) in list(self._pb_target.items()):
            if kind == "bridge" and target == br.id:
                self._finish_playback(pb_id, "done")
        # its channels left first (and with them their apps' subscriptions): BridgeDestroyed
        # reaches only apps still subscribed to the bridge (recorded in ari_conversations/)
        recips = self._bridge_recipients(br)
        del self._bridges[br.id]
        for app in self._apps.values():
            app.bridges.pop(br.id, None)
        self._emit("BridgeDestroyed", recips + [x for x in self._all_apps() if x not in recips],
                   bridge=self._bridge_snapshot(br))
        return 204, None

    def _channel_list(self, names: list[str]) -> list[FakeChannel]:
        """resource_bridges.c control_list_create(): 400 unknown channel, 422 not in Stasis."""
        out = []
        for cid in names:
            if not cid:
                continue
            ch = self._chans.get(cid)
            if ch is None:
                raise _AriError(400, "Channel not found")
            if not ch.in_stasis:
                raise _AriError(422, "Channel not in Stasis application")
            out.append(ch)
        if not out:
            raise _AriError(400, "Missing parameter channel")
        return out

    def _h_bridges__addChannel(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        for ch in self._channel_list(a["channel"]):
            self._enter_bridge(ch, br)
        return 204, None

    def _h_bridges__removeChannel(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        chans = self._channel_list(a["channel"])
        for ch in chans:
            if ch.bridge_id != br.id:
                raise _AriError(422, "Channel not in this bridge")
        for ch in chans:
            self._leave_bridge(ch)
        return 204, None

    def _h_bridges__startMoh(self, a):
        self._bridge_or_404(a["bridgeId"]).moh = a.get("mohClass", "default")
        return 204, None

    def _h_bridges__stopMoh(self, a):
        self._bridge_or_404(a["bridgeId"]).moh = None
        return 204, None

    def _h_bridges__getBridgeVar(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        if a["variable"] not in br.variables:
            raise _AriError(404, "Provided variable was not found")
        return 200, {"value": br.variables[a["variable"]]}

    def _h_bridges__setBridgeVar(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        br.variables[a["variable"]] = a.get("value", "")
        if a.get("report_events"):
            br.reportable.add(a["variable"])
        return 204, None

    def _h_bridges__getBridgeVars(self, a):
        br = self._bridge_or_404(a["bridgeId"])
        missing = [v for v in a["variables"] if v not in br.variables]
        if missing:
            raise _AriError(404, "Provided variable was not found")
        return 200, {"variables": {v: br.variables[v] for v in a["variables"]}}

    def _h_bridges__setBridgeVars(self, a):
        self._set_vars(self._bridge_or_404(a["bridgeId"]), a["variables"])
        return 204, None
