"""A call's media, as data: what the controller created on which Asterisk node (bridges,
the agent leg, forks, humans), kept in Redis so that another controller (or this one after a
restart) can carry on. Every object we create gets an id derived from the call's token, so
an ARI event about it leads back to the call without asking anyone."""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

# The call's media states. `ending` waits for the channels we hung up to be gone; while
# `referring`, the caller is out of our application (in the dialplan, being transferred).
CALL_STATES = ("setup", "active", "transferring", "referring", "ending", "ended")
LEG_STATES = ("starting", "up", "stopping", "gone", "failed")


def call_token(call_id: str) -> str:
    """Short, id-safe handle of a call (Asterisk ids are limited and a Call-ID is free text)."""
    return hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def object_id(token: str, kind: str, n: int | str = 1) -> str:
    """`cf-<token>-<kind>-<n>`: channel, snoop, bridge and playback ids of a call."""
    return f"cf-{token}-{kind}-{n}"


def session_uuid(channel_id: str) -> str:
    """AudioSocket needs a UUID per connection; derived from the channel id, so it is stable."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"callfabric:{channel_id}"))


def parse_object_id(object_id_: str) -> tuple[str, str, str] | None:
    """(token, kind, n) of an id we made, else None."""
    parts = object_id_.split("-", 3)
    if len(parts) != 4 or parts[0] != "cf" or len(parts[1]) != 16:
        return None
    return parts[1], parts[2], parts[3]


@dataclass(slots=True)
class AgentLeg:
    name: str
    channel: str
    endpoint: str
    transport: str
    codec: str
    state: str = "starting"
    started_ms: int = 0
    up_ms: int = 0
    local_rtp: str = ""  # where Asterisk expects the agent's audio (rtp: UNICASTRTP_LOCAL_ADDRESS:PORT)
    session: str = ""  # AudioSocket session UUID (the first thing the agent's server receives)


@dataclass(slots=True)
class ForkLeg:
    fork_id: str
    target: str
    endpoint: str
    transport: str
    codec: str
    direction: str
    snoop: str
    channel: str
    bridge: str
    state: str = "starting"
    started_ms: int = 0
    up_ms: int = 0
    reason: str = ""
    session: str = ""
    last_tx: int = 0  # RTP packets Asterisk sent to the target at the last health check
    last_rx: int = 0
    mode: str = "snoop"  # snoop (Asterisk: snoop + ExternalMedia) | edge (the edge's rtpengine copies the RTP)
    edge_tag: str = ""  # edge: rtpengine's tag of the subscription
    rtpengine: str = ""  # edge: the NG address of the rtpengine holding it


@dataclass(slots=True)
class HumanLeg:
    leg_id: str
    destination: str
    uri: str
    channel: str
    mode: str  # conference | handoff | listen
    state: str = "starting"
    started_ms: int = 0
    up_ms: int = 0
    reason: str = ""
    snoop: str = ""  # listen: the snoop on the caller the human hears the call through
    bridge: str = ""  # listen: the bridge of that snoop and the human


@dataclass(slots=True)
class RecordingLeg:
    """A recording of the call: a snoop on the caller (`in`: the caller's voice, `out`: what the
    caller hears — the agent and anyone else —, `both`: the conversation) recorded by Asterisk
    as `name`.wav, then fetched from the node."""

    recording_id: str
    name: str  # the node's stored recording (and the local file's name)
    channels: str  # both | caller | agent
    snoop: str
    format: str = "wav"
    state: str = "starting"  # starting | recording | stopping | saving | done | failed
    started_ms: int = 0
    ended_ms: int = 0
    duration_ms: int = 0
    size_bytes: int = 0
    location: str = ""  # local (the recording_dir of the controller that fetched it) | node
    path: str = ""
    reason: str = ""


@dataclass(slots=True)
class ReferLeg:
    """A cold transfer by SIP REFER: the caller is sent to `to` by the far end (their carrier,
    their phone); its outcome is the NOTIFY sipfrag's status. When it is refused and `fallback`
    holds, the caller is bridged with `to` through an outbound call instead (a human leg)."""

    transfer_id: str
    to: str  # the Refer-To URI (with its headers)
    fallback: bool = True
    state: str = "referring"  # referring | completed | failed
    status: int = 0  # the SIP status of the REFER's outcome (200: accepted and the new call answered)
    reason: str = ""
    fallback_leg: str = ""  # the human leg that bridges the caller with `to` after a refusal
    started_ms: int = 0
    ended_ms: int = 0


@dataclass(slots=True)
class Gather:
    """Digits being collected from a leg (the caller, or a human) until `max_digits`, the
    finish key or `timeout_ms` without a digit; what happens then (`then` branches, a
    `webhook`) travels with it so any controller can finish it."""

    gather_id: str
    leg: str  # "caller" or a human leg id
    max_digits: int
    finish_key: str  # "" for none
    timeout_ms: int  # without a digit (the first one counts from the prompt's end)
    then: list[dict[str, Any]] = field(default_factory=list)
    webhook: str = ""
    prompt: str = ""  # media played before
    prompt_playback: str = ""  # its playback id, while it plays
    digits: str = ""
    started_ms: int = 0
    waiting_since_ms: int = 0  # the timeout counts from here (0: the prompt is still playing)


@dataclass(slots=True)
class CallMedia:
    call_id: str
    token: str
    node: str
    caller_channel: str
    bridge: str
    state: str = "setup"
    agent: AgentLeg | None = None
    old_agents: list[AgentLeg] = field(default_factory=list)  # legs being replaced (transfer)
    forks: dict[str, ForkLeg] = field(default_factory=dict)
    humans: dict[str, HumanLeg] = field(default_factory=dict)
    sequence: int = 0  # makes every id of the call unique
    started_ms: int = 0
    max_duration_s: int | None = None
    direction: str = "inbound"  # outbound: originated by the API
    pending_agent: str = ""  # outbound: the agent that joins when the call is answered
    gather: Gather | None = None
    recordings: dict[str, RecordingLeg] = field(default_factory=dict)
    refers: dict[str, ReferLeg] = field(default_factory=dict)

    def next_id(self, kind: str) -> str:
        self.sequence += 1
        return object_id(self.token, kind, self.sequence)

    def our_channels(self) -> list[str]:
        """Channels we created for this call (not the caller's), alive or not."""
        out = [a.channel for a in ([self.agent] if self.agent else []) + self.old_agents]
        for fork in self.forks.values():
            out += [c for c in (fork.snoop, fork.channel) if c]
        out += [h.channel for h in self.humans.values()]
        out += [h.snoop for h in self.humans.values() if h.snoop]
        out += [r.snoop for r in self.recordings.values()]
        return out

    def bridges(self) -> list[str]:
        return ([self.bridge] + [f.bridge for f in self.forks.values() if f.bridge]
                + [h.bridge for h in self.humans.values() if h.bridge])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CallMedia":
        data = dict(data)
        agent = data.pop("agent", None)
        old_agents = data.pop("old_agents", [])
        forks = data.pop("forks", {})
        humans = data.pop("humans", {})
        gather = data.pop("gather", None)
        recordings = data.pop("recordings", {})
        refers = data.pop("refers", {})
        media = cls(**data)
        media.refers = {k: ReferLeg(**v) for k, v in refers.items()}
        media.gather = Gather(**gather) if gather else None
        media.recordings = {k: RecordingLeg(**v) for k, v in recordings.items()}
        media.agent = AgentLeg(**agent) if agent else None
        media.old_agents = [AgentLeg(**a) for a in old_agents]
        media.forks = {k: ForkLeg(**v) for k, v in forks.items()}
        media.humans = {k: HumanLeg(**v) for k, v in humans.items()}
        return media
