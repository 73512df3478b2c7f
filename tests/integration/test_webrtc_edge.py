"""Browsers calling through the real edge: headless Chromium opens the controller's /phone page
(JsSIP bundled at setup) with a fake microphone, calls over a secure WebSocket to Kamailio, whose
rtpengine turns the browser's ICE + DTLS-SRTP + rtcp-mux into plain RTP toward an echo agent (a
SIPp media node): the page hears its own voice back. The WebSocket handshake is refused without
a valid, unexpired phone token or from another site's page, and a token calls only its callee.
With a real Asterisk (tests/integration/test_webrtc_asterisk.py) the fork sink gets the browser's
audio too."""
from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import ssl
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from controller.api.phone import BUNDLE, PhonePage, make_token, phone_routes
from controller.app import MEDIA, build_app
from controller.config import Settings
from controller.localstack.asterisk import Asterisk, asterisk_binary
from controller.localstack.browser import CHROMIUM_BIN, Chromium, write_tone_wav
from controller.localstack.kamailio import free_port
from controller.localstack.rtpengine import Rtpengine
from controller.localstack.sip_ua import ulaw_silent
from controller.localstack.sipp import SippUAS
from controller.localstack.tls import LocalCa
from tests.integration.test_media_anchor import echo_port, received_invites, sdp_address

SECRET = "phone-secret-for-tests"
EDGE_READY = all(shutil.which(b) for b in ("kamailio", "sipp", "rtpengine", "openssl")) and bool(
    list(Path("/usr/lib").glob("*/kamailio/modules/websocket.so")))
pytestmark = pytest.mark.skipif(not EDGE_READY, reason="kamailio with its tls and websocket modules (Debian: "
                                "kamailio-tls-modules, kamailio-websocket-modules), sipp, rtpengine and openssl are required")
BROWSER = pytest.mark.skipif(
    not Path(CHROMIUM_BIN).exists() or not BUNDLE.exists(),
    reason="chromium (Debian: chromium) and the /phone bundle (npm ci + build in controller/api/phone, done by "
           ".ci/install-system-packages) are required")


@pytest.fixture
async def webrtc_edge(tmp_path, procs):
    """TLS + WSS + rtpengine edge, an echoing media node, the /phone page on its own origin."""
    ca = await asyncio.to_thread(LocalCa.create, tmp_path / "pki")
    cert, key = await asyncio.to_thread(ca.issue, "edge")
    page_port, wss_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{page_port}"

    def start():
        rtp = procs.add(Rtpengine(tmp_path).start())
        media = procs.add(SippUAS(tmp_path, "uas_answer.xml", "media", ["-mp", str(echo_port()), "-rtp_echo"]).start())
        kamailio = procs.kamailio({1: [media.addr]}, tls=(cert, key, ca.cert), extra_defines={
            "RTPENGINE_SOCK": rtp.sock, "WSS_PORT": str(wss_port), "PHONE_SECRET": f'"{SECRET}"',
            "WS_ORIGIN_RE": '"^' + re.escape(origin).replace("\\", "\\\\") + '$"'})
        decider = procs.decider(kamailio, lambda e: {"action": "dispatch", "set": 1})
        return rtp, media, kamailio, decider
    rtp, media, kamailio, decider = await asyncio.to_thread(start)
    app = web.Application()
    app.add_routes(phone_routes(PhonePage(f"wss://127.0.0.1:{wss_port}/")))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", page_port).start()
    yield {"ca": ca, "cert": cert, "rtp": rtp, "media": media, "kamailio": kamailio, "decider": decider,
           "origin": origin, "wss": f"wss://127.0.0.1:{wss_port}/", "tmp": tmp_path}
    await runner.cleanup()


def client_ssl(ca: LocalCa) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


async def handshake(edge, token: str | None, origin: str | None = None) -> int | aiohttp.ClientWebSocketResponse:
    """A WebSocket to the edge as a page of `origin` would open it: the socket, or the refusal's status."""
    url = edge["wss"] + (f"?token={token}" if token is not None else "")
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, protocols=("sip",), ssl=await asyncio.to_thread(client_ssl, edge["ca"]),
                                      headers={"Origin": origin or edge["origin"]})
    except aiohttp.WSServerHandshakeError as exc:
        await session.close()
        return exc.status
    ws._cf_session = session
    return ws


async def close(ws) -> None:
    await ws.close()
    await ws._cf_session.close()


async def sip_invite(ws, to: str) -> str:
    """An INVITE over the WebSocket (as JsSIP sends it); the first final status line."""
    call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\na=rtcp-mux\r\na=setup:actpass\r\n")
    await ws.send_str(
        f"INVITE sip:{to}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/WSS abc.invalid;branch=z9hG4bK{call_id[:10]}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:browser@127.0.0.1>;tag={tag}\r\nTo: <sip:{to}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:x@abc.invalid;transport=ws>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
    while True:
        message = await ws.receive_str(timeout=5)
        first = message.split("\r\n", 1)[0]
        if first.startswith("SIP/2.0 ") and int(first.split()[1]) >= 200:
            return first


async def test_the_websocket_needs_a_valid_phone_token_from_an_allowed_page(webrtc_edge):
    edge = webrtc_edge
    good, _ = make_token(SECRET, "intake", 60)
    assert await handshake(edge, None) == 403  # no token
    assert await handshake(edge, make_token("another-secret-entirely", "intake", 60)[0]) == 403
    assert await handshake(edge, make_token(SECRET, "intake", -5)[0]) == 403  # expired
    assert await handshake(edge, good.replace(".intake.", ".billing.")) == 403  # signature of another callee
    assert await handshake(edge, good, origin="https://evil.example") == 403  # another site's page
    ws = await handshake(edge, good)
    assert not isinstance(ws, int), ws
    try:
        # the token calls `intake` only
        assert await sip_invite(ws, "billing") == "SIP/2.0 403 Forbidden (this phone token calls intake only)"
    finally:
        await close(ws)
    assert not edge["decider"].decides
    metric = edge["kamailio"].metric
    counts = {why: await asyncio.to_thread(metric, "kamailio_callfabric_phone_total", f'result="{why}"')
              for why in ("no-token", "bad-token", "expired", "bad-origin", "connected", "wrong-callee")}
    assert counts == {"no-token": 1, "bad-token": 2, "expired": 1, "bad-origin": 1, "connected": 1, "wrong-callee": 1}


@BROWSER
async def test_a_browser_calls_an_echo_agent_and_hears_itself(webrtc_edge):
    edge = webrtc_edge
    microphone = await asyncio.to_thread(write_tone_wav, edge["tmp"] / "mic.wav")
    browser = await Chromium(edge["tmp"], microphone=microphone, trusted_certs=(edge["cert"],)).start()
    try:
        token, _ = make_token(SECRET, "intake", 120)
        await browser.open(f"{edge['origin']}/phone#token={token}")
        assert await browser.evaluate("cfPhone.state.to") == "intake"
        await browser.evaluate("cfPhone.call()")
        await browser.wait_for("cfPhone.state.status === 'up' || cfPhone.state.status === 'failed'", timeout=20)
        assert await browser.evaluate("cfPhone.state.status") == "up", await browser.evaluate("cfPhone.state")
        # the page hears its own microphone back (through rtpengine, the echoing agent, rtpengine)
        await browser.wait_for("cfPhone.state.heardMs >= 1000", timeout=20)
        state = await browser.evaluate("cfPhone.state")
        assert state["peakLevel"] > 0.02, state
        await browser.evaluate("cfPhone.hangup()")
        await browser.wait_for("cfPhone.state.status === 'ended'", timeout=10)
    finally:
        await browser.stop()
    decide = edge["decider"].decides[-1]
    assert (decide["transport"], decide["ruri_user"]) == ("wss", "intake")
    # the media node got plain RTP/AVP from rtpengine: no ICE, no DTLS, no rtcp-mux
    invite = [i for i in await asyncio.to_thread(received_invites, edge["media"]) if decide["call_id"] in i][-1]
    _, _, sdp = invite.partition("\n\n")
    address, port = sdp_address(sdp)
    rtp = edge["rtp"]
    assert address == "127.0.0.1" and rtp.port_min <= port < rtp.port_min + rtp.ports
    assert re.search(r"m=audio \d+ RTP/AVP ", sdp)
    assert not re.search(r"a=(candidate|ice-ufrag|fingerprint|setup|rtcp-mux)", sdp), sdp


# -- with a real Asterisk --------------------------------------------------------------------------

ASTERISK_POLICY = """\
node_sets:
  media: {{dispatcher_set: 1}}
agents:
  intake: {{node_set: media, endpoint: "127.0.0.1:{agent}", transport: rtp, codec: ulaw}}
fork_targets:
  stt: {{endpoint: "127.0.0.1:{stt}", transport: rtp, codec: ulaw, direction: in}}
rules:
  - name: browsers
    match: {{transport: wss, ruri: intake}}
    actions: [route_agent: intake, fork: stt]
default:
  actions: [reject: 404]
"""


class VoicedSink(asyncio.DatagramProtocol):
    """A fork target that counts the RTP packets carrying sound (µ-law, not silence)."""

    def __init__(self):
        self.received = self.voiced = 0

    def datagram_received(self, data, addr):
        if len(data) > 12 and data[0] >> 6 == 2:
            self.received += 1
            self.voiced += not ulaw_silent(data[12 + 4 * (data[0] & 0x0F):])


@BROWSER
@pytest.mark.skipif(asterisk_binary() is None,
                    reason="no asterisk binary: install Asterisk or set CALLFABRIC_ASTERISK")
async def test_a_browser_talks_to_an_agent_on_a_real_asterisk_and_the_fork_hears_it(tmp_path, procs, redis_url):
    spec = importlib.util.spec_from_file_location(
        "media_agent", Path(__file__).resolve().parents[2] / "examples" / "media_agent.py")
    media_agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(media_agent)
    loop = asyncio.get_running_loop()
    agent, sink = media_agent.RtpAgent(echo=True), VoicedSink()
    ports = {}
    transports = []
    for name, protocol in (("agent", agent), ("stt", sink)):
        transport, _ = await loop.create_datagram_endpoint(lambda p=protocol: p, local_addr=("127.0.0.1", 0))
        transports.append(transport)
        ports[name] = transport.get_extra_info("sockname")[1]
    ca = await asyncio.to_thread(LocalCa.create, tmp_path / "pki")
    cert, key = await asyncio.to_thread(ca.issue, "edge")
    page_port, wss_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{page_port}"

    def start():
        rtp = procs.add(Rtpengine(tmp_path).start())
        kamailio = procs.kamailio({}, tls=(cert, key, ca.cert), extra_defines={
            "RTPENGINE_SOCK": rtp.sock, "WSS_PORT": str(wss_port), "PHONE_SECRET": f'"{SECRET}"',
            "WS_ORIGIN_RE": '"^' + re.escape(origin).replace("\\", "\\\\") + '$"'})
        asterisk = procs.add(Asterisk(tmp_path, edge_port=kamailio.sip_port))
        kamailio.write_dispatcher_list({1: [f"127.0.0.1:{asterisk.sip_port}"]})
        kamailio.jsonrpc("dispatcher.reload")
        asterisk.start()
        policy_dir = tmp_path / "policy"
        policy_dir.mkdir()
        (policy_dir / "p.yaml").write_text(ASTERISK_POLICY.format(**ports))
        return kamailio, asterisk, policy_dir
    kamailio, asterisk, policy_dir = await asyncio.to_thread(start)
    settings = Settings(policy_dir=str(policy_dir), redis_url=redis_url, instance_id="webrtc-real",
                        edge_evapi=[f"127.0.0.1:{kamailio.evapi_port}"], http_listen=f"127.0.0.1:{page_port}",
                        ari_nodes=[asterisk.ari_node()], phone_ws_url=f"wss://127.0.0.1:{wss_port}/",
                        phone_token_secret=SECRET)
    app = await asyncio.to_thread(build_app, settings)  # (it compiles the API's schemas: file reads)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", page_port).start()
    microphone = await asyncio.to_thread(write_tone_wav, tmp_path / "mic.wav")
    browser = None
    try:
        deadline = time.monotonic() + 20
        while not app[MEDIA].metrics.registry.get_sample_value("callfabric_ari_connected", {"node": "media1"}):
            assert time.monotonic() < deadline, "the controller did not connect to Asterisk's ARI"
            await asyncio.sleep(0.1)
        browser = await Chromium(tmp_path, microphone=microphone, trusted_certs=(cert,)).start()
        token, _ = make_token(SECRET, "intake", 120)
        await browser.open(f"{origin}/phone#token={token}")
        await browser.evaluate("cfPhone.call()")
        await browser.wait_for("cfPhone.state.status === 'up' || cfPhone.state.status === 'failed'", timeout=20)
        assert await browser.evaluate("cfPhone.state.status") == "up", await browser.evaluate("cfPhone.state")
        # the agent echoes: the page hears its microphone back through rtpengine and Asterisk
        await browser.wait_for("cfPhone.state.heardMs >= 1000", timeout=20)
        assert (await browser.evaluate("cfPhone.state"))["peakLevel"] > 0.02
        # and the fork target gets the browser's voice (sound, not silence)
        for _ in range(100):
            if sink.voiced >= 50:
                break
            await asyncio.sleep(0.1)
        assert sink.voiced >= 50 and agent.received >= 50, (sink.received, sink.voiced, agent.received)
        await browser.evaluate("cfPhone.hangup()")
        await browser.wait_for("cfPhone.state.status === 'ended'", timeout=10)
    finally:
        if browser is not None:
            await browser.stop()
        await runner.cleanup()
        for transport in transports:
            transport.close()
