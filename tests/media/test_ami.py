"""AMI: a recorded Asterisk manager conversation replayed by a TCP server (the protocol
as Asterisk speaks it), the watcher logging in, counting security events and contact status."""
import asyncio

import pytest

from controller.media.ami import AmiNode, AmiWatcher, parse_ami_node
from controller.metrics import Metrics

BANNER = b"Asterisk Call Manager/9.0.0\r\n"
# Events as Asterisk 22 writes them (security events from res_security_log / the PJSIP stack).
RECORDED_EVENTS = [
    b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 12\r\nLastReload: 12\r\nStatus: Fully Booted\r\n\r\n",
    b"Event: InvalidAccountID\r\nPrivilege: security,all\r\nEventTV: 2026-11-26T10:00:00.000+0000\r\n"
    b"Severity: Error\r\nService: PJSIP\r\nEventVersion: 1\r\nAccountID: 1001\r\nSessionID: 1-abc@203.0.113.9\r\n"
    b"LocalAddress: IPV4/UDP/10.0.0.5/5060\r\nRemoteAddress: IPV4/UDP/203.0.113.9/5071\r\n\r\n",
    b"Event: ChallengeResponseFailed\r\nPrivilege: security,all\r\nService: PJSIP\r\nAccountID: 1001\r\n"
    b"RemoteAddress: IPV4/UDP/203.0.113.9/5071\r\nChallenge: 1234\r\n\r\n",
    b"Event: ChallengeSent\r\nPrivilege: security,all\r\nService: PJSIP\r\nAccountID: 1001\r\n"
    b"RemoteAddress: IPV4/UDP/203.0.113.9/5071\r\n\r\n",  # not a failure
    b"Event: ContactStatus\r\nPrivilege: system,all\r\nURI: sip:10.0.0.9:5060\r\nContactStatus: Unreachable\r\n"
    b"AOR: edge\r\nEndpointName: edge\r\nRoundtripUsec: 0\r\n\r\n",
    b"Event: Garbage\r\nno colon line\r\n\r\n",
]


class RecordedAmi:
    def __init__(self, secret: str):
        self.secret = secret
        self.logins: list[dict] = []
        self.server = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader, writer):
        writer.write(BANNER)
        buffer = b""
        while True:
            data = await reader.read(4096)
            if not data:
                return
            buffer += data
            while b"\r\n\r\n" in buffer:
                block, buffer = buffer.split(b"\r\n\r\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().split("\r\n") if ": " in line)
                action_id = fields.get("ActionID", "")
                if fields.get("Action", "").lower() == "login":
                    self.logins.append(fields)
                    ok = fields.get("Secret") == self.secret
                    writer.write(f"Response: {'Success' if ok else 'Error'}\r\nActionID: {action_id}\r\n"
                                 f"Message: Authentication {'accepted' if ok else 'failed'}\r\n\r\n".encode())
                    if ok:
                        for event in RECORDED_EVENTS:
                            writer.write(event)
                else:
                    writer.write(f"Response: Success\r\nActionID: {action_id}\r\nPing: Pong\r\n\r\n".encode())

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


async def test_watcher_logs_in_and_counts_security_events_and_contact_status():
    ami = RecordedAmi("s3cret")
    port = await ami.start()
    metrics = Metrics()
    seen = []
    watcher = AmiWatcher(AmiNode("media1", "127.0.0.1", port, "callfabric", "s3cret"), metrics, seen.append)
    watcher.start()
    try:
        await asyncio.wait_for(watcher.connected.wait(), 5)
        for _ in range(100):
            if len(seen) == 2 and metrics.registry.get_sample_value(
                    "callfabric_pjsip_contact_reachable", {"node": "media1", "endpoint": "edge"}) is not None:
                break
            await asyncio.sleep(0.02)
    finally:
        watcher.close()
        await ami.stop()
    assert ami.logins[0]["Username"] == "callfabric"
    assert [(e.event, e.remote_ip, e.remote_port, e.account) for e in seen] == [
        ("InvalidAccountID", "203.0.113.9", "5071", "1001"), ("ChallengeResponseFailed", "203.0.113.9", "5071", "1001")]
    get = metrics.registry.get_sample_value
    assert get("callfabric_asterisk_security_events_total", {"node": "media1", "event": "InvalidAccountID"}) == 1
    assert get("callfabric_asterisk_security_events_total", {"node": "media1", "event": "ChallengeSent"}) is None
    assert get("callfabric_pjsip_contact_reachable", {"node": "media1", "endpoint": "edge"}) == 0
    assert get("callfabric_ami_connected", {"node": "media1"}) == 1


async def test_wrong_secret_never_logs_in():
    ami = RecordedAmi("right")
    port = await ami.start()
    watcher = AmiWatcher(AmiNode("media1", "127.0.0.1", port, "callfabric", "wrong"), Metrics())
    watcher.start()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(watcher.connected.wait(), 0.5)
    finally:
        watcher.close()
        await ami.stop()


@pytest.mark.parametrize("text, ok", [("n1=tcp://u:p@10.0.0.5:5038", True), ("n1=tcp://u:p@h", True),
                                      ("tcp://u:p@h:5038", False), ("n1=http://u:p@h:5038", False)])
def test_parse_ami_node(text, ok):
    if ok:
        assert parse_ami_node(text).name == "n1"
    else:
        with pytest.raises(ValueError):
            parse_ami_node(text)
