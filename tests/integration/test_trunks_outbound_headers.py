"""callfabric's own header names (controller/actions.py TRUSTED_HEADER_NAMES: X-Callfabric-*, the
context handed to a human X-Summary / X-Intent / X-Sentiment and their -Ref forms) never reach a
carrier, on the real edge: a media node (what Asterisk sends for a human handoff or POST /v1/calls)
dialling a number through an outbound trunk, and a caller the policy routes to a trunk with those
headers in its answer. The carrier is a SIPp UAS whose scenario fails the call as soon as any of
these names is in a request it receives (the INVITE, the ACK, an INFO and the BYE of the dialog);
its message trace is checked too. Only trusted destinations get them: another address in
TRUSTED_DEST_NET (the PBX of a human desk) gets the context and X-Callfabric-Call-Id, any other
destination none."""
from __future__ import annotations

import asyncio
import shutil
import socket

import pytest

from controller.actions import RESERVED_HEADER_PREFIX, TRUSTED_HEADER_NAMES, is_trusted_header
from controller.edge.trunks import build_table, write_table
from controller.localstack.sipp import SippUAS, run_uac
from controller.policy import policy_from_texts

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="kamailio and sipp binaries are required")

NODE_IP = "127.0.0.5"  # the media node (a dispatcher destination), on a port of its own
DESK_IP = "127.0.0.7"  # the human desk's PBX: TRUSTED_DEST_NET
STRANGER_IP = "127.0.0.8"  # any other SIP destination
POLICY = """\
node_sets:
  media: {dispatcher_set: 1}
agents:
  intake: {node_set: media, endpoint: "127.0.0.1:4000"}
trunks:
  callers: {inbound: {sources: ["127.0.0.1"], media: never, srtp: off}}
  busy:
    outbound: {address: "{busy}", media: never, failover: [carrier]}
  carrier:
    outbound: {address: "{carrier}", media: never}
destinations:
  pstn: {trunk: busy, number: "+442079460999"}
default:
  actions: [route_agent: intake]
"""
# what a media node sends (Asterisk: PJSIP_HEADER(add, …) of controller/media/headers.py) and
# a caller's own header, which a carrier may get; odd case and spacing included
SENT = [("X-Callfabric-Call-Id", "call-4711"), ("x-callfabric-agent ", "intake"), ("X-Summary", "Wants a refund"),
        ("X-SUMMARY-REF", "http://127.0.0.1:8080/v1/calls/call-4711/context/summary"), ("x-Intent", "refund"),
        ("X-Sentiment-Ref", "http://127.0.0.1:8080/v1/calls/call-4711/context/sentiment"), ("X-Lang", "en")]


def _anycase(text: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


# any of the trusted names at the start of a header line, in any case, with blanks before the colon
# (POSIX ERE: SIPp's regex; built from the one list the controller and the edge share)
FORBIDDEN = ("[[:space:]](" + _anycase(RESERVED_HEADER_PREFIX) + "[^:[:space:]]*|"
             + "|".join(_anycase(n) for n in TRUSTED_HEADER_NAMES) + ")[[:blank:]]*:")


def _recv(method: str, attrs: str = "", strict: bool = True, dialog: bool = False) -> str:
    """Receive `method`; `strict`: `leak<method>` tells whether it carried a trusted name;
    `dialog`: keep its From and To (for a request of the callee's own)."""
    check = (f'      <ereg regexp="{FORBIDDEN}" search_in="msg" assign_to="leak{method.lower()}"/>\n'
             if strict else "")
    if dialog:
        check += ('      <ereg regexp=".*" search_in="hdr" header="From:" check_it="true" assign_to="from_hdr"/>\n'
                  '      <ereg regexp=".*" search_in="hdr" header="To:" check_it="true" assign_to="to_hdr"/>\n')
    if not check:
        return f'  <recv request="{method}"{attrs}/>\n'
    return f'  <recv request="{method}"{attrs}>\n    <action>\n{check}    </action>\n  </recv>\n'


def _checked(method: str, strict: bool) -> str:
    return f'  <nop hide="true" test="leak{method.lower()}" next="leaked"/>\n' if strict else ""


SDP = """      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=carrier 1 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
"""


def _reply(status: str, dialog: bool = False, sdp: bool = False) -> str:
    tag, route = (";tag=[pid]SIPpTag01[call_number]", "\n      [last_Record-Route:]") if dialog else ("", "")
    body = SDP if sdp else "      Content-Length: 0\n"
    return f"""  <send>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:]{tag}{route}
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port]>
{body}
    ]]>
  </send>
"""


CALLEE_INFO = """  <send retrans="500">
    <![CDATA[
      INFO [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: [$to_hdr];tag=[pid]SIPpTag01[call_number]
      To: [$from_hdr]
      [last_Call-ID:]
      CSeq: 1 INFO
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
"""


def uas_scenario(strict: bool, info: bool = True, sdp: bool = False) -> str:
    """Answers the INVITE (with an SDP answer: `sdp`); with `info`, once the ACK is in, sends an
    INFO of its own, then takes the caller's INFO (which waits for it: the edge's workers could
    otherwise relay the ACK and the INFO out of order); then the BYE. `strict` (a carrier): a
    request carrying any trusted name is answered 599 and the call goes no further (the
    caller's call fails)."""
    leaked = f'  <nop hide="true" next="end"/>\n  <label id="leaked"/>\n{_reply("599 Leaked callfabric header")}' \
        if strict else ""
    in_dialog = f'{CALLEE_INFO}{_recv("INFO", "", strict)}{_checked("INFO", strict)}{_reply("200 OK")}' if info else ""
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="{'strict carrier' if strict else 'desk'}">
{_recv("INVITE", ' rrs="true"', strict, dialog=info)}{_checked("INVITE", strict)}{_reply("200 OK", dialog=True, sdp=sdp)}\
{_recv("ACK", "", strict)}{_checked("ACK", strict)}{in_dialog}{_recv("BYE", "", strict)}{_checked("BYE", strict)}\
{_reply("200 OK")}{leaked}  <label id="end"/>
  <timewait milliseconds="500"/>
</scenario>
"""


def _in_dialog(method: str, cseq: int, headers: str) -> str:
    return f"""  <send{' retrans="500"' if method != "ACK" else ""}>
    <![CDATA[
      {method} [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      [routes]
      From: <sip:+442079460002@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: [$callee]
      Call-ID: [call_id]
      CSeq: {cseq} {method}
      Max-Forwards: 70
{headers}
      Content-Length: 0

    ]]>
  </send>
"""


def uac_scenario(target: str) -> str:
    """A media node (or a caller) sending INVITE sip:[service]@`target` to the edge, then ACK,
    INFO (after the callee's own INFO), BYE, each with the SENT headers."""
    headers = "\n".join(f"      {name}: {value}" for name, value in SENT)
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="with callfabric headers">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@{target} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:+442079460002@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@{target.split(";")[0]}>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:node@[local_ip]:[local_port]>
      Max-Forwards: 70
{headers}
      Content-Length: 0

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rrs="true">
    <action>
      <ereg regexp=".*" search_in="hdr" header="To:" check_it="true" assign_to="callee"/>
    </action>
  </recv>
{_in_dialog("ACK", 1, headers)}  <recv request="INFO"/>
{_reply("200 OK")}{_in_dialog("INFO", 2, headers)}  <recv response="200"/>
{_in_dialog("BYE", 3, headers)}  <recv response="200"/>
</scenario>
"""


def trusted_names(message) -> list[str]:
    return [name for name, _ in message.headers if is_trusted_header(name)]


@pytest.fixture
def edge(tmp_path, procs):
    strict, lenient = _write(tmp_path / "strict.xml", uas_scenario(True)), _write(tmp_path / "desk.xml", uas_scenario(False))
    carrier = procs.add(SippUAS(tmp_path, str(strict), "carrier").start())
    # the `busy` trunk answers 503: the call fails over to `carrier`, so a failover branch is checked too
    busy = procs.add(SippUAS(tmp_path, "uas_503.xml", "busy").start())
    desk = procs.add(SippUAS(tmp_path, str(lenient), "desk", ip=DESK_IP).start())
    stranger = procs.add(SippUAS(tmp_path, str(strict), "stranger", ip=STRANGER_IP).start())
    policy = policy_from_texts({"p.yaml": POLICY.replace("{busy}", busy.addr).replace("{carrier}", carrier.addr)})
    trunks = tmp_path / "trunks"
    write_table(str(trunks), build_table(policy.source, "callfabric", environ={}))
    kamailio = procs.kamailio({1: [f"{NODE_IP}:{node_port()}"]}, trunks_dir=trunks,
                              extra_defines={"TRUSTED_DEST_NET": f'"{DESK_IP}/32"'})
    answers = {"pstn": {"action": "relay", "uris": list(policy.source.destinations["pstn"].uris)},
               "desk": {"action": "relay", "uris": [f"sip:desk@{desk.addr}"]},
               "someone": {"action": "relay", "uris": [f"sip:someone@{stranger.addr}"]}}
    # what a policy's answer adds (the controller's own name, the context for a human, another header)
    hdrs = "".join(f"{n}: {v}\r\n" for n, v in (("X-Callfabric-Agent", "desk"), ("X-Summary", "VIP caller"),
                                                  ("X-Intent-Ref", "http://127.0.0.1/x"), ("X-Vip", "yes")))
    decider = procs.decider(kamailio, lambda event: {**answers[event["ruri_user"]], "hdrs": hdrs})
    return kamailio, decider, carrier, busy, desk, stranger


def node_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((NODE_IP, 0))
        return probe.getsockname()[1]


def _write(path, text):
    path.write_text(text)
    return path


def call(tmp_path, kamailio, service: str, target: str | None = None):
    """From the media node to sip:`service`@`target` (through the edge); without a target, a
    caller's call to the edge, decided by the policy."""
    edge = f"127.0.0.1:{kamailio.sip_port}"
    scenario = _write(tmp_path / f"uac-{service}-{target is None}.xml", uac_scenario(target or edge))
    node = kamailio.ds_sets[1][0].split(":")
    where = {"source_ip": node[0], "source_port": int(node[1])} if target else {}
    return run_uac(tmp_path, kamailio.sip_port, str(scenario), service=service, timeout_s=15, **where)


def received(uas: SippUAS) -> list:
    return [m for m in uas.messages() if m.direction == "in"]


def methods(messages) -> list[str]:
    """The methods of the requests among `messages`, once each (UDP retransmissions)."""
    return sorted({m.first_line.split()[0] for m in messages if not m.first_line.startswith("SIP/2.0")})


def names(message) -> set[str]:
    return {n.strip().lower() for n in trusted_names(message)}


async def test_a_media_nodes_call_through_a_trunk_carries_none_of_callfabrics_headers(tmp_path, edge):
    kamailio, decider, carrier, busy, *_ = edge
    edge_addr = f"127.0.0.1:{kamailio.sip_port}"
    result = await asyncio.to_thread(call, tmp_path, kamailio, "+442079460999", f"{edge_addr};cf-trunk=busy")
    # the strict carrier answered the INVITE, the INFO and the BYE: it saw none of the names
    assert result.successful == 1 and result.failed == 0, result.output
    assert not decider.decides
    got = await asyncio.to_thread(received, carrier)
    assert methods(got) == ["ACK", "BYE", "INFO", "INVITE"]
    for message in got:  # its requests, and the reply to its own INFO
        assert not trusted_names(message), message.raw
        if not message.first_line.startswith("SIP/2.0"):
            assert message.header("X-Lang") == ["en"]  # the node's other headers do go through
    # the first trunk (503) did not get them either
    (first,) = await asyncio.to_thread(busy.invites)
    assert not trusted_names(first) and first.header("X-Lang") == ["en"], first.raw


async def test_a_caller_routed_to_a_trunk_carries_none_of_the_answers_callfabric_headers(tmp_path, edge):
    kamailio, decider, carrier, busy, *_ = edge
    result = await asyncio.to_thread(call, tmp_path, kamailio, "pstn")
    assert result.successful == 1 and result.failed == 0, result.output
    assert [d["ruri_user"] for d in decider.decides] == ["pstn"]
    got = await asyncio.to_thread(received, carrier)
    assert methods(got) == ["ACK", "BYE", "INFO", "INVITE"]
    for message in got + await asyncio.to_thread(busy.invites):
        assert not trusted_names(message), message.raw
    assert got[0].header("X-Vip") == ["yes"] and got[0].header("X-Lang") == ["en"]


async def test_only_a_trusted_destination_gets_the_context_and_the_call_reference(tmp_path, edge):
    kamailio, _, _, _, desk, stranger = edge
    # a media node calls the desk's PBX (TRUSTED_DEST_NET) and another SIP destination
    for service, uas in (("desk", desk), ("someone", stranger)):
        result = await asyncio.to_thread(call, tmp_path, kamailio, service, uas.addr)
        assert result.successful == 1, result.output
    invite, *in_dialog = await asyncio.to_thread(received, desk)
    assert names(invite) == {"x-callfabric-call-id", "x-summary", "x-summary-ref", "x-intent", "x-sentiment-ref"}
    assert invite.header("X-Callfabric-Call-Id") == ["call-4711"] and invite.header("X-Lang") == ["en"]
    assert in_dialog and all(not names(m) for m in in_dialog)  # in-dialog requests never carry them
    # callers routed there by the policy: the desk gets its context (never the controller's own
    # names), the other destination none
    for service in ("desk", "someone"):
        result = await asyncio.to_thread(call, tmp_path, kamailio, service)
        assert result.successful == 1, result.output
    invite = [m for m in await asyncio.to_thread(received, desk) if m.first_line.startswith("INVITE")][-1]
    assert names(invite) == {"x-summary", "x-intent-ref"} and invite.header("X-Summary") == ["VIP caller"]
    for message in await asyncio.to_thread(received, stranger):
        assert not trusted_names(message), message.raw
    assert len(await asyncio.to_thread(stranger.invites)) == 2
