"""Real ARI conversations, recorded from a real Asterisk and replayed against the fake.

A scenario is data: ARI requests (with ids we choose, `$caller` for the inbound channel),
waits, and observations of the caller's RTP. `record` runs each scenario on a real Asterisk
(our asterisk/ config set; a SIP caller with real RTP calls it directly, an echo agent
answers ExternalMedia) and writes what happened — every request with Asterisk's status and
body, every event of our application in order, the RTP counts — to
tests/media/ari_conversations/<scenario>.json. tests/media/test_ari_conversations.py replays
the requests against the fake ARI and checks it answers and emits what Asterisk did (the way
panoramisk's tests replay recorded AMI).

    CALLFABRIC_ASTERISK=/opt/asterisk/sbin/asterisk python3 -m tests.support.ari_conversations [scenario …]
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

APP = "callfabric"
RECORDINGS = Path(__file__).resolve().parents[1] / "media" / "ari_conversations"
# Events that say nothing about the behaviour under test (Asterisk's internal bookkeeping).
IGNORED_EVENTS = {"ChannelVarset", "ChannelConnectedLine", "ChannelDialplan", "ChannelCallerId"}


def _bridge_setup(agent: bool = True) -> list[dict]:
    steps = [
        {"request": "POST", "path": "/channels/$caller/answer"},
        {"request": "POST", "path": "/bridges", "params": {"type": "mixing", "bridgeId": "rec-bridge"}},
        {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "$caller"}},
    ]
    if agent:
        steps += [
            {"request": "POST", "path": "/channels/externalMedia",
             "params": {"channelId": "rec-agent", "app": APP, "external_host": "127.0.0.1:$agent_port",
                        "format": "ulaw", "encapsulation": "rtp", "transport": "udp", "direction": "both"}},
            {"wait": 0.3},
            {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "rec-agent"}},
        ]
    return steps


_TEARDOWN = [{"request": "DELETE", "path": "/bridges/rec-bridge"},
             {"request": "DELETE", "path": "/channels/$caller"}, {"wait": 0.5}]

SCENARIOS: dict[str, list[dict]] = {
    # Which channels have RTP statistics: the caller's (PJSIP) does, an ExternalMedia channel
    # (UnicastRTP created without chan_rtp's glue option) does not, a snoop has no RTP glue.
    "rtp_statistics": [
        *_bridge_setup(),
        {"wait": 1.0},
        {"request": "GET", "path": "/channels/$caller/rtp_statistics"},
        {"request": "GET", "path": "/channels/rec-agent/rtp_statistics"},
        {"request": "POST", "path": "/channels/$caller/snoop/rec-snoop", "params": {"spy": "in", "app": APP}},
        {"wait": 0.3},
        {"request": "GET", "path": "/channels/rec-snoop/rtp_statistics"},
        {"request": "GET", "path": "/channels/rec-gone/rtp_statistics"},
        {"request": "DELETE", "path": "/channels/rec-snoop"},
        {"request": "DELETE", "path": "/channels/rec-agent"},
        *_TEARDOWN,
    ],
    # Playbacks: a sound that exists plays to the end; a missing one, an unknown tone and an
    # unknown scheme are all accepted (201) and fail only in events, or in none at all.
    "playback": [
        *_bridge_setup(agent=False),
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb1", "params": {"media": "sound:beep"}},
        {"wait": 1.0},
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb2", "params": {"media": "sound:no-such-sound"}},
        {"wait": 0.5},
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb3", "params": {"media": "tone:ring"}},
        {"wait": 0.5},
        {"request": "GET", "path": "/playbacks/rec-pb3"},
        {"request": "DELETE", "path": "/playbacks/rec-pb3"},
        {"wait": 0.3},
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb4", "params": {"media": "tone:no-such-tone"}},
        {"wait": 0.5},
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb5", "params": {"media": "nosuchscheme:x"}},
        {"wait": 0.5},
        {"request": "GET", "path": "/playbacks/rec-pb5"},
        {"request": "POST", "path": "/channels/$caller/play/rec-pb6", "params": {"media": "sound:no-such-sound"}},
        {"wait": 0.5},
        {"request": "POST", "path": "/bridges/rec-bridge/play/rec-pb7",
         "params": {"media": "sound:no-such-sound,sound:beep"}},
        {"wait": 1.0},
        *_TEARDOWN,
    ],
    # Channel variables and dialplan functions: what reads, what is refused and how.
    "variables": [
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "NO_SUCH_VARIABLE"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "CALLERID(num)"}},
        {"request": "GET", "path": "/channels/$caller/variable",
         "params": {"variable": "PJSIP_HEADER(read,X-Callfabric-Agent)"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "PJSIP_HEADER(read,X-Nope)"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "CHANNEL(no-such-item)"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "NO_SUCH_FUNCTION(x)"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "TALK_DETECT(set)"}},
        {"request": "POST", "path": "/channels/$caller/variable", "params": {"variable": "CF_TEST", "value": "1"}},
        {"request": "GET", "path": "/channels/$caller/variable", "params": {"variable": "CF_TEST"}},
        {"request": "POST", "path": "/channels/$caller/variable",
         "params": {"variable": "TALK_DETECT(set)", "value": "500"}},
        {"request": "POST", "path": "/channels/$caller/variable",
         "params": {"variable": "NO_SUCH_FUNCTION(x)", "value": "1"}},
        {"request": "DELETE", "path": "/channels/$caller"}, {"wait": 0.5},
    ],
    # Talk detection on the caller and on the agent leg, and what happens when the agent goes
    # silent (sends no packets at all): the caller's RTP, and the agent's talk events.
    "talk_detect": [
        *_bridge_setup(),
        {"request": "POST", "path": "/channels/$caller/variable",
         "params": {"variable": "TALK_DETECT(set)", "value": "300"}},
        {"request": "POST", "path": "/channels/rec-agent/variable",
         "params": {"variable": "TALK_DETECT(set)", "value": "300"}},
        {"wait": 1.0},
        {"caller_rtp": 1.0},
        {"agent": "silent"},
        {"wait": 1.0},
        {"caller_rtp": 1.0},
        {"agent": "echo"},
        {"wait": 1.0},
        {"caller_rtp": 1.0},
        {"request": "DELETE", "path": "/channels/rec-agent"},
        *_TEARDOWN,
    ],
    # What Asterisk refuses, and how: unknown objects, bad parameters, repeated requests.
    "refusals": [
        {"request": "GET", "path": "/channels/$caller/rtp_statistics"},
        {"request": "POST", "path": "/bridges", "params": {"type": "mixing", "bridgeId": "rec-bridge"}},
        {"request": "POST", "path": "/bridges", "params": {"type": "mixing", "bridgeId": "rec-bridge"}},
        {"request": "POST", "path": "/bridges/rec-nope/addChannel", "params": {"channel": "$caller"}},
        {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "rec-nope"}},
        {"request": "POST", "path": "/bridges/rec-bridge/removeChannel", "params": {"channel": "$caller"}},
        {"request": "POST", "path": "/channels/rec-nope/answer"},
        {"request": "DELETE", "path": "/channels/rec-nope"},
        {"request": "DELETE", "path": "/bridges/rec-nope"},
        {"request": "POST", "path": "/bridges/rec-nope/play/rec-pb1", "params": {"media": "sound:beep"}},
        {"request": "POST", "path": "/channels/$caller/play/rec-pb2", "params": {"media": "sound:beep"}},
        {"request": "POST", "path": "/channels/externalMedia",
         "params": {"channelId": "rec-agent", "app": APP, "external_host": "no-port-here",
                    "format": "ulaw", "encapsulation": "rtp", "transport": "udp"}},
        {"request": "POST", "path": "/channels/externalMedia",
         "params": {"channelId": "rec-agent", "app": APP, "external_host": "127.0.0.1:$agent_port",
                    "format": "ulaw", "encapsulation": "rtp", "transport": "tcp"}},
        {"request": "POST", "path": "/channels/$caller/snoop/rec-snoop", "params": {"app": APP}},
        {"request": "POST", "path": "/channels/$caller/answer"},
        {"request": "POST", "path": "/channels/$caller/answer"},
        {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "$caller"}},
        {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "$caller"}},
        {"request": "POST", "path": "/channels/$caller/play/rec-pb3", "params": {"media": "sound:beep"}},
        {"wait": 1.0},
        *_TEARDOWN,
    ],
    # Bridge first, then answer: a ringing caller joins the bridge with the agent leg, and is
    # answered once the agent is there (none of the caller's first audio is lost).
    "bridge_then_answer": [
        {"request": "POST", "path": "/bridges", "params": {"type": "mixing", "bridgeId": "rec-bridge"}},
        {"request": "POST", "path": "/channels/externalMedia",
         "params": {"channelId": "rec-agent", "app": APP, "external_host": "127.0.0.1:$agent_port",
                    "format": "ulaw", "encapsulation": "rtp", "transport": "udp", "direction": "both"}},
        {"wait": 0.3},
        {"request": "POST", "path": "/bridges/rec-bridge/addChannel", "params": {"channel": "$caller,rec-agent"}},
        {"wait": 0.3},
        {"request": "GET", "path": "/channels/$caller"},
        {"request": "POST", "path": "/channels/$caller/answer"},
        {"wait": 0.3},
        {"caller_rtp": 1.0},
        {"request": "DELETE", "path": "/channels/rec-agent"},
        *_TEARDOWN,
    ],
    # Dead air: the agent sends nothing for 3 s; what still reaches the caller (the edge
    # endpoint's rtp_keepalive).
    "dead_air": [
        *_bridge_setup(),
        {"wait": 0.5},
        {"caller_rtp": 1.0},
        {"agent": "silent"},
        {"caller_rtp": 3.0},
        {"agent": "echo"},
        {"caller_rtp": 1.0},
        {"request": "DELETE", "path": "/channels/rec-agent"},
        *_TEARDOWN,
    ],
    # Keeping RTP flowing toward the caller while the agent is silent: startSilence on a
    # bridged caller, and what the agent's audio does to it.
    "silence": [
        *_bridge_setup(),
        {"agent": "silent"},
        {"wait": 0.5},
        {"caller_rtp": 1.0},
        {"request": "POST", "path": "/channels/$caller/silence"},
        {"wait": 0.3},
        {"caller_rtp": 1.0},
        {"agent": "echo"},
        {"wait": 0.3},
        {"caller_rtp": 1.0},
        {"agent": "silent"},
        {"wait": 0.3},
        {"caller_rtp": 1.0},
        {"request": "DELETE", "path": "/channels/$caller/silence"},
        {"request": "DELETE", "path": "/channels/rec-agent"},
        *_TEARDOWN,
    ],
}


def substitute(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, real in names.items():
            value = value.replace(name, real)
        return value
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    return value


def normalise(value: Any, names: dict[str, str]) -> Any:
    """Undo `substitute` (real ids back to their names) and drop what changes run to run."""
    if isinstance(value, str):
        for name, real in sorted(names.items(), key=lambda kv: -len(kv[1])):
            if real:
                value = value.replace(real, name)
        return value
    if isinstance(value, dict):
        return {k: normalise(v, names) for k, v in value.items()
                if k not in ("timestamp", "asterisk_id", "creationtime")}
    if isinstance(value, list):
        return [normalise(v, names) for v in value]
    return value


class _Echo(asyncio.DatagramProtocol):
    def __init__(self):
        self.echo = True
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.echo and len(data) >= 12:
            self.transport.sendto(data, addr)


async def record_scenario(name: str, steps: list[dict], asterisk, agent: _Echo, agent_port: int) -> dict:
    from controller.localstack.sip_ua import SipCaller
    from controller.media.ari import basic_authorization

    auth = {"Authorization": basic_authorization(asterisk.ari_user, asterisk.ari_password)}
    log: list[dict] = []
    events: asyncio.Queue = asyncio.Queue()
    async with aiohttp.ClientSession(headers=auth) as session:
        ws = await session.ws_connect(asterisk.ari_url.replace("http", "ws") + "/events",
                                      params={"app": APP, "subscribeAll": "false"})

        async def read_events():
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    events.put_nowait(json.loads(message.data))
        async with session.get(asterisk.ari_url + "/asterisk/info") as response:
            version = (await response.json())["system"]["version"]
        reader = asyncio.create_task(read_events())
        names: dict[str, str] = {"$agent_port": str(agent_port)}
        started = asyncio.Event()
        done = asyncio.Event()

        def drain(step: int) -> None:
            while not events.empty():
                event = events.get_nowait()
                if event.get("type") == "StasisStart" and "$caller" not in names:
                    names["$caller"] = event["channel"]["id"]
                    started.set()
                log.append({"step": step, "event": event})

        async def scenario(seen: list) -> None:  # seen[0]: the caller's CallResult (RTP it receives)
            deadline = time.monotonic() + 10
            while not started.is_set():
                await asyncio.sleep(0.05)
                drain(-1)
                assert time.monotonic() < deadline, "the call never reached Stasis"
            for index, step in enumerate(steps):
                if "request" in step:
                    params = substitute(step.get("params"), names)
                    async with session.request(step["request"], asterisk.ari_url + substitute(step["path"], names),
                                               params=params, json=step.get("body")) as response:
                        text = await response.text()
                    body = json.loads(text) if text and text[0] in "{[" else text
                    log.append({"step": index, "request": step, "status": response.status, "body": body})
                    await asyncio.sleep(0.05)
                elif "wait" in step:
                    await asyncio.sleep(step["wait"])
                elif "agent" in step:
                    agent.echo = step["agent"] == "echo"
                elif "caller_rtp" in step:
                    result = seen[0]
                    before, voiced, types = len(result.received_at), result.voiced, Counter(result.payload_types)
                    await asyncio.sleep(step["caller_rtp"])
                    log.append({"step": index, "caller_rtp": {
                        "seconds": step["caller_rtp"], "packets": len(result.received_at) - before,
                        "voiced": result.voiced - voiced,
                        "payload_types": {str(k): v for k, v in (result.payload_types - types).items()}}})
                drain(index)
            done.set()

        caller = SipCaller(asterisk.sip_port)
        agent.echo = True
        duration = 2 + sum(s.get("wait", 0) + s.get("caller_rtp", 0) + (0.1 if "request" in s else 0) for s in steps)
        seen: list = []
        calling = asyncio.create_task(caller.call("18005550199", hold_s=duration,
                                                  headers={"X-Callfabric-Agent": "intake"}, observe=seen.append))
        await scenario(seen)
        result = await calling
        await asyncio.sleep(0.5)
        drain(len(steps))
        reader.cancel()
        await ws.close()
    names.pop("$agent_port")
    return {"scenario": name, "asterisk": version, "sip_status": result.status,
            "steps": steps, "log": normalise(log, names)}


async def record(which: list[str]) -> None:
    from controller.localstack.asterisk import Asterisk
    from controller.localstack.kamailio import free_port

    workdir = Path(tempfile.mkdtemp(prefix="callfabric-ari-record-"))
    asterisk = Asterisk(workdir, edge_port=free_port(socket.SOCK_DGRAM))
    await asyncio.to_thread(asterisk.start)
    loop = asyncio.get_running_loop()
    agent_port = free_port(socket.SOCK_DGRAM)
    transport, agent = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", agent_port))
    try:
        RECORDINGS.mkdir(parents=True, exist_ok=True)
        for name in which:
            recording = await record_scenario(name, SCENARIOS[name], asterisk, agent, agent_port)
            path = RECORDINGS / f"{name}.json"
            await asyncio.to_thread(path.write_text, json.dumps(recording, indent=1, sort_keys=True) + "\n")
            print(f"{name}: {sum(1 for e in recording['log'] if 'request' in e)} requests, "
                  f"{sum(1 for e in recording['log'] if 'event' in e)} events -> {path}")
    finally:
        transport.close()
        await asyncio.to_thread(asterisk.stop)
        await asyncio.to_thread(shutil.rmtree, workdir, True)


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:] or list(SCENARIOS)))
