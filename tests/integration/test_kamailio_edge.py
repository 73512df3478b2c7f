"""The Kamailio SIP edge (kamailio/kamailio.cfg) with real Kamailio, real SIPp and a fake
decider speaking the evapi decision protocol (kamailio/PROTOCOL.md)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from controller.localstack.kamailio import options_ping
from tests.support.kamailio import FrozenClient, netstring, wait_clients
from controller.localstack.sipp import run_uac

pytestmark = pytest.mark.skipif(
    shutil.which("kamailio") is None or shutil.which("sipp") is None,
    reason="kamailio and sipp binaries are required")

BUDGET_MS = 200
# A transaction still unanswered this long after its budget is stuck. Tests tell "fell back
# on the budget" from "stuck"; how close to the budget (tm ticks of 62.5 ms) is bench/edge.py's.
STUCK_S = 3.0
# "did not wait for the budget" is checked against a budget far longer than any scheduling delay
LONG_BUDGET_MS = 3000


# --------------------------------------------------------------------------- helpers
class RawUAC:
    """Minimal UDP SIP caller for timing-sensitive checks (no SIPp start-up jitter)."""

    def __init__(self, port: int, src_ip: str = "127.0.0.1") -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((src_ip, 0))
        self.lport = self.sock.getsockname()[1]
        self.src_ip = src_ip

    def invite(self, headers: dict[str, str] | None = None, max_forwards: int = 70,
               timeout: float = 5.0, raw_headers: bytes = b"", from_name: bytes = b"",
               call_id: str | None = None, tag: str | None = None) -> dict:
        """raw_headers: extra header lines as bytes (CRLF-terminated), sent as they are."""
        call_id = call_id or uuid.uuid4().hex + "@raw"
        branch = "z9hG4bK" + uuid.uuid4().hex
        tag = tag or uuid.uuid4().hex[:8]
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        msg = (f"INVITE sip:agent@127.0.0.1:{self.port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {self.src_ip}:{self.lport};branch={branch};rport\r\n"
               f"Max-Forwards: {max_forwards}\r\n").encode() + (
               b"From: " + from_name + f"<sip:+15550001111@{self.src_ip}>;tag={tag}\r\n".encode()) + (
               f"To: <sip:agent@127.0.0.1>\r\n"
               f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
               f"Contact: <sip:raw@{self.src_ip}:{self.lport}>\r\n{extra}").encode() + (
               raw_headers + b"Content-Length: 0\r\n\r\n")
        t0 = time.monotonic()
        self.sock.sendto(msg, ("127.0.0.1", self.port))
        res: dict = {"call_id": call_id, "t100": None, "final": None, "tfinal": None}
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except OSError:
                break
            text = data.decode(errors="replace")
            status = text.split("\r\n", 1)[0]
            code = int(status.split()[1])
            if code == 100 and res["t100"] is None:
                res["t100"] = time.monotonic() - t0
            elif code >= 200:
                res.update(final=status, code=code, tfinal=time.monotonic() - t0, raw=text)
                to = [ln for ln in text.split("\r\n") if ln.lower().startswith("to:")][0]
                ack = (f"ACK sip:agent@127.0.0.1:{self.port} SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP {self.src_ip}:{self.lport};branch={branch};rport\r\n"
                       f"Max-Forwards: 70\r\nFrom: <sip:+15550001111@{self.src_ip}>;tag={tag}\r\n"
                       f"{to}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
                if code >= 300:
                    self.sock.sendto(ack.encode(), ("127.0.0.1", self.port))
                break
        return res

    def close(self) -> None:
        self.sock.close()


def fallback_of(invite) -> str | None:
    vals = invite.header("X-Callfabric-Fallback")
    return vals[0] if vals else None


def dispatch(set_id: int, hdrs: str = ""):
    return lambda d: {"action": "dispatch", "set": set_id, "hdrs": hdrs}


DECIDER_SCRIPT = r"""
import json, socket, sys
port, set_id = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
buf = b""
while True:
    data = s.recv(65536)
    if not data:
        break
    buf += data
    while True:
        buf = buf.lstrip()
        c = buf.find(b":")
        if c <= 0:
            break
        n = int(buf[:c])
        if len(buf) < c + 2 + n:
            break
        ev = json.loads(buf[c + 1:c + 1 + n])
        buf = buf[c + 2 + n:]
        if ev.get("event") == "decide":
            ans = json.dumps({"tx": ev["tx"], "action": "dispatch", "set": set_id,
                              "hdrs": "X-Decider: subprocess\r\n"}).encode()
            s.sendall(str(len(ans)).encode() + b":" + ans + b",")
"""


class SubprocessDecider:
    """A decider in its own process, so it can be frozen with SIGSTOP."""

    def __init__(self, port: int, set_id: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DECIDER_SCRIPT, str(port), str(set_id)],
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


# --------------------------------------------------------------------------- routing
def test_dispatch_per_set_with_headers_and_forged_header_stripped(procs, tmp_path):
    ua, ub = procs.uas(name="a"), procs.uas(name="b")
    k = procs.kamailio({1: [ua.addr], 2: [ub.addr]})

    def policy(d):
        target = 2 if d["headers"].get("X-Target") == ["b"] else 1
        return {"action": "dispatch", "set": target,
                "hdrs": f"X-Agent: agent-{target}\r\nX-Callfabric-Call: {d['call_id']}\r\n"}
    dec = procs.decider(k, policy)

    r = run_uac(tmp_path, k.sip_port, headers={
        "X-Target": "b", "X-Callfabric-Forged": "evil", "x-callfabric-lower": "evil",
        "P-Asserted-Identity": "<sip:+15551230000@carrier.example>", "Diversion": "<sip:+1999@x>"})
    assert r.rc == 0 and r.successful == 1, r.output
    r = run_uac(tmp_path, k.sip_port, headers={"X-Target": "a"})
    assert r.rc == 0 and r.successful == 1, r.output

    ua.stop(), ub.stop()
    (inv_b,), (inv_a,) = ub.invites()[:1], ua.invites()[:1]
    assert inv_b.header("X-Agent") == ["agent-2"] and inv_a.header("X-Agent") == ["agent-1"]
    assert inv_b.header("X-Callfabric-Call") == inv_b.header("Call-ID")
    assert not inv_b.header("X-Callfabric-Forged") and not inv_b.header("x-callfabric-lower")
    assert inv_b.header("X-Target") == ["b"]            # caller headers pass through
    assert fallback_of(inv_b) is None
    assert inv_b.header("Record-Route"), "edge must record-route"

    d = dec.decides[0]
    assert d["event"] == "decide" and ":" in d["tx"]
    assert d["from_user"] == "+15551230000" and d["from_name"] == "SIPp Caller"
    assert d["ruri_user"] == "agent" and d["transport"] == "udp" and d["src_ip"] == "127.0.0.1"
    assert isinstance(d["src_port"], int)
    assert d["headers"]["P-Asserted-Identity"] == ["<sip:+15551230000@carrier.example>"]
    assert d["headers"]["Diversion"] == ["<sip:+1999@x>"]
    assert d["headers"]["Subject"] == ["callfabric test"]
    assert not any(h.lower().startswith("x-callfabric") for h in d["headers"])


# --------------------------------------------------------------------------- decide encoding
SLOW = b"X-Force-Slow: \xc3\xa9\r\n"      # one non-ASCII byte sends the request down the jansson path


def _decide_for(raw: RawUAC, dec, **invite) -> dict:
    res = raw.invite(**invite)
    assert res.get("code") == 486, res
    tx = [d for d in dec.decides if d["call_id"] == res["call_id"]]
    assert len(tx) == 1, f"no decide for {res['call_id']} (invalid JSON?)"
    return tx[0]


def _comparable(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for key in ("tx", "call_id", "from_tag"):
        d.pop(key)
    d["headers"].pop("X-Force-Slow", None)
    return d


def test_decide_event_encoding_fast_and_slow_paths_agree(procs):
    """Plain-ASCII requests are printed with pv_printf, everything else goes through jansson
    (kamailio.cfg route[JSAFE]): both must give the same valid JSON, and the dialog events
    must carry the same call_id/from_tag/tx as the decide."""
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=BUDGET_MS)
    dec = procs.decider(k, lambda d: {"action": "reject", "code": 486, "reason": "Busy"})
    raw = RawUAC(k.sip_port)
    tricky = (b'X-Quote: say "hi" \\ bye\\\\\r\n'
              b'P-Asserted-Identity: "Alice \\"A\\"" <sip:+15551230000@carrier.example>\r\n'
              b'X-Json: {"a":[1,2]} \'single\'\r\n'
              b'User-Agent: UA "x"/1.0 \\\r\n'
              b'X-Empty: \r\n'
              b'Subject: callfabric test\r\n')
    name = b'"Bob \\"the\\" Builder" '
    try:
        fast = _decide_for(raw, dec, raw_headers=tricky, from_name=name,
                           call_id=uuid.uuid4().hex + '-q"b\\s@raw', tag="t1.~!")
        slow = _decide_for(raw, dec, raw_headers=tricky + SLOW, from_name=name,
                           call_id=uuid.uuid4().hex + '-q"b\\s@raw', tag="t2.~!")
        assert slow["headers"]["X-Force-Slow"] == ["\u00e9"]
        assert _comparable(fast) == _comparable(slow)
        assert fast["headers"] == {
            "X-Quote": ['say "hi" \\ bye\\\\'],
            "P-Asserted-Identity": ['"Alice \\"A\\"" <sip:+15551230000@carrier.example>'],
            "X-Json": ['{"a":[1,2]} \'single\''],
            "User-Agent": ['UA "x"/1.0 \\'],
            "X-Empty": [""],
            "Subject": ["callfabric test"]}
        assert fast["user_agent"] == 'UA "x"/1.0 \\'
        assert fast["from_name"] == 'Bob \\"the\\" Builder'
        assert fast["call_id"].endswith('-q"b\\s@raw') and fast["from_tag"] == "t1.~!"
        assert slow["call_id"].endswith('-q"b\\s@raw') and slow["from_tag"] == "t2.~!"
        assert "headers_truncated" not in fast and "headers_truncated" not in slow
        for d in (fast, slow):
            ev = dec.wait_for(lambda e: e.get("event") == "dialog" and e.get("tx") == d["tx"])
            assert ev, d["tx"]
            ev = ev[0]
            assert (ev["call_id"], ev["from_tag"]) == (d["call_id"], d["from_tag"])
            assert (ev["state"], ev["reason"], ev["code"], ev["fallback"]) == (
                "failed", "rejected", 486, "")

        # budget: 8 x (7 + 500) bytes fit in 4096, the 9th and 10th do not
        big = b"".join(f"X-Big-{i}: {'v' * 500}\r\n".encode() for i in range(10))
        for extra in (b"", SLOW):
            d = _decide_for(raw, dec, raw_headers=big + extra)
            assert sorted(_comparable(d)["headers"]) == [f"X-Big-{i}" for i in range(8)]
            assert d["headers_truncated"] is True
            assert d["from_name"] == ""                            # no display name

        # only the jansson path can take these
        d = _decide_for(raw, dec, from_name='"Jos\u00e9 \u00d1" '.encode(),
                        raw_headers="X-Utf8: \u00fcber \u2713\r\n".encode()
                        + b"X-Bad: \xff\xfe ok\r\nX-Tab: a\tb\r\n")
        assert d["from_name"] == "Jos\u00e9 \u00d1"
        assert d["headers"]["X-Utf8"] == ["\u00fcber \u2713"]
        assert d["headers"]["X-Bad"] == [""]                       # not UTF-8
        assert d["headers"]["X-Tab"] == ["a\tb"]
        d = _decide_for(raw, dec, raw_headers=b"User-Agent: \xc3(\r\n")
        assert d["user_agent"] == "" and d["headers"]["User-Agent"] == [""]
        d = _decide_for(raw, dec, raw_headers=b"X-Dup: 1\r\nX-Other: o\r\nX-Dup: 2\r\nx-dup: 3\r\n")
        assert d["headers"] == {"X-Dup": ["1", "2"], "X-Other": ["o"], "x-dup": ["3"]}
        d = _decide_for(raw, dec, raw_headers=b"X-Fold: a\r\n b\r\nX-After: z\r\n")
        assert d["headers"]["X-Fold"][0].startswith("a") and d["headers"]["X-Fold"][0].endswith("b")
        assert d["headers"]["X-After"] == ["z"]
        d = _decide_for(raw, dec, raw_headers=b"X-Nul: ab\x00cd\r\nX-After: z\xc3\r\n")
        assert d["headers"]["X-Nul"][0].startswith("ab") and d["headers"]["X-After"] == [""]
        d = _decide_for(raw, dec, raw_headers=b"X-Nul: ab\x00\xff\r\n")      # NUL hides the rest
        assert d["headers"]["X-Nul"][0].startswith("ab")
        for v in d["headers"]["X-Nul"]:
            v.encode("utf-8")
    finally:
        raw.close()
    assert k.alive() and options_ping(k.sip_port) == "SIP/2.0 200 OK"


def test_relay_uri_list_fails_over_on_503(procs, tmp_path):
    bad, good = procs.uas("uas_503.xml", "bad"), procs.uas(name="good")
    k = procs.kamailio({1: [good.addr]})
    dec = procs.decider(k, lambda d: {"action": "relay", "hdrs": "X-Route: pbx\r\n",
                                      "uris": [f"sip:human@{bad.addr}", f"sip:human@{good.addr}"]})
    r = run_uac(tmp_path, k.sip_port)
    assert r.rc == 0 and r.successful == 1, r.output
    bad.stop(), good.stop()
    assert len(bad.call_ids()) == 1
    inv = good.invites()[0]
    assert inv.first_line.startswith("INVITE sip:human@")          # R-URI rewritten
    assert inv.header("X-Route") == ["pbx"], "headers must be re-added on the failover branch"
    assert dec.wait_for(lambda e: e.get("state") == "ended")


def test_dispatch_set_fails_over_on_5xx_and_timeout(procs, tmp_path):
    bad, dead, good = (procs.uas("uas_503.xml", "bad"), procs.uas("uas_silent.xml", "dead"),
                       procs.uas(name="good"))
    k = procs.kamailio({1: [bad.addr, dead.addr, good.addr]}, fr_timeout_ms=500)
    procs.decider(k, dispatch(1, "X-Set: one\r\n"))
    r = run_uac(tmp_path, k.sip_port, calls=3, rate=10)
    assert r.rc == 0 and r.successful == 3, r.output
    good.stop(), bad.stop(), dead.stop()
    assert len(good.call_ids()) == 3
    assert bad.call_ids() and dead.call_ids()                       # both were tried
    assert all(i.header("X-Set") == ["one"] for i in good.invites())


def test_reject_with_code_reason_and_headers(procs, tmp_path):
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, lambda d: {"action": "reject", "code": 486, "reason": "Agent Busy",
                                      "hdrs": "X-Reject-Cause: policy-7\r\n"})
    r = run_uac(tmp_path, k.sip_port, "uac_reject.xml", code=486)
    assert r.rc == 0 and r.successful == 1, r.output
    final = [m for m in r.responses() if m.first_line.startswith("SIP/2.0 486")][0]
    assert final.first_line == "SIP/2.0 486 Agent Busy"
    assert final.header("X-Reject-Cause") == ["policy-7"]
    ev = dec.wait_for(lambda e: e.get("event") == "dialog")[0]
    assert (ev["state"], ev["reason"], ev["code"]) == ("failed", "rejected", 486)
    ua.stop()
    assert not ua.invites()


# --------------------------------------------------------------------------- fallback
def test_no_controller_fallback_open(procs, tmp_path):
    fb = procs.uas(name="fallback")
    k = procs.kamailio({1: [fb.addr]}, fallback="open", fallback_set=1)
    t0 = time.monotonic()
    r = run_uac(tmp_path, k.sip_port)
    assert r.rc == 0 and r.successful == 1, r.output
    assert time.monotonic() - t0 < 5
    fb.stop()
    assert fallback_of(fb.invites()[0]) == "no-controller"


def test_no_controller_fallback_closed_503_retry_after(procs):
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=LONG_BUDGET_MS)
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
    finally:
        raw.close()
    assert res["final"] == "SIP/2.0 503 Service Unavailable"
    assert "\r\nRetry-After: 5\r\n" in res["raw"]
    assert res["tfinal"] < LONG_BUDGET_MS / 2000      # no waiting when nobody is connected
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="no-controller"') == 1


def test_silent_decider_falls_back_within_budget_and_late_answer_is_harmless(procs, tmp_path):
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=BUDGET_MS)
    late = {"on": False}
    dec = procs.decider(k, lambda d: ("delay", 0.6, {"action": "dispatch", "set": 1})
                        if late["on"] else None)
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
        assert res["t100"] is not None and res["t100"] < res["tfinal"]  # 100 Trying before deciding
        assert res["final"] == "SIP/2.0 503 Service Unavailable"
        # tm timers count whole 62.5 ms ticks from the current one: a 200 ms budget is
        # 4 ticks and fires 187.5..250 ms after the suspend (plus scheduling)
        assert BUDGET_MS / 1000 - 0.0625 <= res["tfinal"] < BUDGET_MS / 1000 + STUCK_S, res
        late["on"] = True
        res = raw.invite()
        assert res["code"] == 503 and res["tfinal"] < BUDGET_MS / 1000 + STUCK_S
        time.sleep(0.8)                               # the late answer arrives now
    finally:
        raw.close()
    assert len(dec.decides) == 2
    assert k.alive() and options_ping(k.sip_port) == "SIP/2.0 200 OK"
    assert k.metric("kamailio_callfabric_answers_dropped_total", 'why="late-or-duplicate"') == 1
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="timeout"') == 2


def test_silent_decider_fallback_open_marks_media_node(procs, tmp_path):
    fb = procs.uas(name="fallback")
    k = procs.kamailio({1: [fb.addr]}, fallback="open", decision_timeout_ms=BUDGET_MS)
    dec = procs.decider(k, lambda d: None)
    r = run_uac(tmp_path, k.sip_port)
    assert r.rc == 0 and r.successful == 1, r.output
    fb.stop()
    assert fallback_of(fb.invites()[0]) == "timeout"
    ev = dec.wait_for(lambda e: e.get("state") == "ended")[0]
    assert ev["fallback"] == "timeout" and ev["reason"] == "bye-caller"


def test_fallback_action_open_takes_fallback_set_at_once(procs, tmp_path):
    fb, agent = procs.uas(name="fallback"), procs.uas(name="agent")
    k = procs.kamailio({1: [fb.addr], 2: [agent.addr]}, fallback="open", fallback_set=1,
                       decision_timeout_ms=3000)
    dec = procs.decider(k, lambda d: {"action": "fallback", "reason": "no-policy",
                                      "hdrs": "X-Not-Applied: 1\r\n"})
    r = run_uac(tmp_path, k.sip_port, hold_ms=100)
    assert r.rc == 0 and r.successful == 1, r.output
    evs = dec.wait_for(lambda e: e.get("event") == "dialog", count=2)
    assert [(e["state"], e["reason"]) for e in evs] == [("confirmed", "answered"),
                                                       ("ended", "bye-caller")]
    assert all(e["fallback"] == "controller-no-policy" for e in evs)
    # answered by the fallback node long before the 3 s decision budget
    assert evs[0]["ts"] / 1000 - dec.decide_rx[evs[0]["tx"]] < 1.0
    fb.stop(), agent.stop()
    inv = fb.invites()[0]
    assert fallback_of(inv) == "controller-no-policy"
    assert not inv.header("X-Not-Applied")                    # hdrs are not applied
    assert not agent.invites()
    assert k.metric("kamailio_callfabric_decide_total", 'result="fallback"') == 1
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="controller-no-policy"') == 1
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="timeout"') == 0


def test_fallback_action_closed_503_retry_after(procs):
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=LONG_BUDGET_MS)
    dec = procs.decider(k, lambda d: {"action": "fallback", "reason": "no-policy"})
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
    finally:
        raw.close()
    assert res["final"] == "SIP/2.0 503 Service Unavailable"
    assert "\r\nRetry-After: 5\r\n" in res["raw"]
    assert "X-Callfabric-Fallback" not in res["raw"]
    assert res["tfinal"] < LONG_BUDGET_MS / 2000              # at once, not on the budget
    ev = dec.wait_for(lambda e: e.get("event") == "dialog")[0]
    assert (ev["state"], ev["reason"], ev["code"], ev["fallback"]) == (
        "failed", "fallback-controller-no-policy", 503, "controller-no-policy")
    assert k.metric("kamailio_callfabric_decide_total", 'result="fallback"') == 1
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="controller-no-policy"') == 1


@pytest.mark.parametrize("answer,why", [
    (b"this is not json", "timeout"),                                         # no tx: wait
    (b'{"tx":"1:1","action":"dispatch","set":1,"set":2}', "timeout"),         # duplicate key: no tx
    ({"action": "teleport"}, "bad-answer"),
    ({"action": "dispatch", "set": "1"}, "bad-answer"),                        # wrong type
    ({"action": "dispatch", "set": 1, "hdrs": "X-A: b"}, "bad-answer"),        # no CRLF
    ({"action": "dispatch", "set": 1, "hdrs": "X-A: b\r\n\r\nINVITE x"}, "bad-answer"),
    ({"action": "dispatch", "set": 1, "hdrs": "Via: SIP/2.0/UDP evil\r\n"}, "bad-answer"),
    ({"action": "reject", "code": 200, "reason": "no"}, "bad-answer"),
    ({"action": "relay", "uris": []}, "bad-answer"),
    ({"action": "relay", "uris": ["http://x"]}, "bad-answer"),
    ({"action": "dispatch", "set": 1, "hdrs": "X-Big: " + "a" * 9000 + "\r\n"}, "answer-too-long"),
    # one JSON object per frame: an array holding a valid answer is not matched to the call
    (lambda d: json.dumps([{"tx": d["tx"], "action": "dispatch", "set": 1}]).encode(), "timeout"),
    (lambda d: b' \r\n{"tx": "%s", "action": "reject", "code": 486, "reason": 7}' % d["tx"].encode(),
     "bad-answer"),
])
def test_garbage_answers_fall_back_and_kamailio_survives(procs, answer, why):
    budget_ms = BUDGET_MS if why == "timeout" else LONG_BUDGET_MS
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=budget_ms)
    procs.decider(k, answer if callable(answer) else (lambda d: answer))
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
    finally:
        raw.close()
    assert res["code"] == 503 and res["tfinal"] < budget_ms / 1000 + STUCK_S
    if why != "timeout":
        assert res["tfinal"] < LONG_BUDGET_MS / 2000, "an invalid answer must not wait for the budget"
    assert k.metric("kamailio_callfabric_fallback_total", f'reason="{why}"') == 1
    assert k.alive() and options_ping(k.sip_port) == "SIP/2.0 200 OK"


NEW_FIELD_GARBAGE = [
    # explicit fallback: "reason" must match ^[a-z0-9][a-z0-9-]{0,31}$
    {"action": "fallback", "reason": "No-Policy"},                # upper case
    {"action": "fallback", "reason": "-no-policy"},
    {"action": "fallback", "reason": "no policy"},
    {"action": "fallback", "reason": "n" * 33},
    {"action": "fallback", "reason": ""},
    {"action": "fallback", "reason": 7},
    {"action": "fallback"},
    {"action": "fallback", "reason": "no-policy", "hdrs": "Via: x\r\n"},  # hdrs still validated
    # ring_timeout_ms / max_duration_s: JSON integers in range, nothing else
    {"action": "dispatch", "set": 1, "ring_timeout_ms": "1500"},
    {"action": "dispatch", "set": 1, "ring_timeout_ms": 999},
    {"action": "relay", "uris": ["sip:a@127.0.0.1:9"], "ring_timeout_ms": 600001},
    {"action": "dispatch", "set": 1, "ring_timeout_ms": 1500.0},
    {"action": "dispatch", "set": 1, "ring_timeout_ms": None},
    {"action": "dispatch", "set": 1, "ring_timeout_ms": True},
    {"action": "dispatch", "set": 1, "max_duration_s": 0},
    {"action": "relay", "uris": ["sip:a@127.0.0.1:9"], "max_duration_s": 86401},
    {"action": "dispatch", "set": 1, "max_duration_s": "60"},
    {"action": "dispatch", "set": 1, "max_duration_s": True},
    {"action": "dispatch", "set": 1, "max_duration_s": [60]},
    {"action": "dispatch", "set": 1, "max_duration_s": 2 ** 40},
    {"action": "dispatch", "set": True},                          # booleans are not integers
    {"action": "reject", "code": True, "reason": "x"},
    # JSON types of the other fields
    {"action": None},
    {"action": "dispatch", "set": 1, "hdrs": None},
    {"action": "dispatch", "set": 1, "hdrs": ["X-A: b\r\n"]},
    {"action": "dispatch", "set": False},
    {"action": "dispatch", "set": -1},
    {"action": "dispatch", "set": 1.0},
    {"action": "dispatch"},
    {"action": "relay", "uris": "sip:a@127.0.0.1:9"},
    {"action": "relay", "uris": [f"sip:a{i}@127.0.0.1:9" for i in range(9)]},
    {"action": "relay", "uris": ["sip:a@127.0.0.1:9", 7]},
    {"action": "relay", "uris": {"0": "sip:a@127.0.0.1:9"}},
    {"action": "reject", "code": 486, "reason": None},
    {"action": "reject", "code": 486.0, "reason": "x"},
    {"action": "reject", "code": 486},
]


def test_new_fields_garbage_falls_back_and_boundaries_are_accepted(procs):
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]}, fallback="closed", decision_timeout_ms=LONG_BUDGET_MS)
    valid = [{"action": "relay", "uris": [f"sip:agent@{ua.addr}"], "ring_timeout_ms": 1000,
              "max_duration_s": 86400},
             {"action": "dispatch", "set": 1, "ring_timeout_ms": 600000, "max_duration_s": 1},
             {"action": "relay", "uris": [f"sip:agent@{ua.addr}"] + [f"sip:x{i}@127.0.0.1:9" for i in range(7)]}]
    cases = NEW_FIELD_GARBAGE + valid

    procs.decider(k, lambda d: cases[int(d["headers"]["X-Case"][0])])
    raw = RawUAC(k.sip_port)
    try:
        for i, ans in enumerate(cases):
            res = raw.invite({"X-Case": str(i)})
            if ans in valid:
                assert res.get("code") == 200, (ans, res)
            else:
                assert res.get("code") == 503 and res["tfinal"] < LONG_BUDGET_MS / 2000, (ans, res)
                assert "\r\nRetry-After: 5\r\n" in res["raw"]
                assert k.metric("kamailio_callfabric_fallback_total",
                                'reason="bad-answer"') == i + 1, ans
    finally:
        raw.close()
    assert k.metric("kamailio_callfabric_decide_total", 'result="fallback"') == 0
    assert k.alive() and options_ping(k.sip_port) == "SIP/2.0 200 OK"


def test_oversized_frame_drops_connection_then_recovers(procs, tmp_path):
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]}, fallback="closed", decision_timeout_ms=BUDGET_MS)
    huge = {"action": "dispatch", "set": 1, "hdrs": "X-Huge: " + "a" * 40000 + "\r\n"}
    dec = procs.decider(k, lambda d: huge)
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
        assert res["code"] == 503 and res["tfinal"] < BUDGET_MS / 1000 + STUCK_S
        assert k.alive()
        dec.closed.wait(2)            # evapi closes a client whose frame exceeds its buffer
        wait_clients(k, 0)
        procs.decider(k, dispatch(1))
        r = run_uac(tmp_path, k.sip_port)
        assert r.rc == 0 and r.successful == 1, r.output
    finally:
        raw.close()


def test_two_controllers_share_decisions_each_call_decided_once(procs, tmp_path):
    """Issue 7: each decide goes to ONE connected controller (round robin, evapi unicast);
    dialog events follow the controller that decided the call while it is connected, else
    go to another one; a controller that disconnects gets no more decides: only the calls
    it held at that moment take the fallback."""
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]}, fallback="open", fallback_set=1,
                       decision_timeout_ms=BUDGET_MS)
    a = procs.decider(k, dispatch(1, "X-Decider: a\r\n"))
    b = procs.decider(k, lambda d: ("delay", 0.05, {"action": "dispatch", "set": 1,
                                                     "hdrs": "X-Decider: b\r\n"}))
    r = run_uac(tmp_path, k.sip_port, calls=40, rate=40, hold_ms=0)
    assert r.rc == 0 and r.successful == 40, r.output
    ids_a = {d["call_id"] for d in a.decides}
    ids_b = {d["call_id"] for d in b.decides}
    assert len(a.decides) == len(ids_a) and len(b.decides) == len(ids_b)
    assert not ids_a & ids_b and len(ids_a | ids_b) == 40          # each call decided exactly once
    assert 15 <= len(ids_a) <= 25, (len(ids_a), len(ids_b))         # round robin
    ended_a = {e["call_id"] for e in a.wait_for(lambda e: e.get("state") == "ended", count=len(ids_a))}
    ended_b = {e["call_id"] for e in b.wait_for(lambda e: e.get("state") == "ended", count=len(ids_b))}
    assert ended_a == ids_a and ended_b == ids_b                   # events follow the decider
    assert k.metric("kamailio_callfabric_answers_dropped_total", 'why="late-or-duplicate"') == 0
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="timeout"') == 0

    # b goes away in the middle of a load: the calls it held fall back (timeout), every
    # later call is decided by a, no call fails
    import threading
    box: dict = {}
    load = threading.Thread(target=lambda: box.update(r=run_uac(
        tmp_path, k.sip_port, calls=60, rate=30, hold_ms=0, timeout_s=30)))
    before_b = len(b.decides)
    load.start()
    b.wait_for(lambda e: e.get("event") == "decide", count=before_b + 10, timeout=10)
    b.stop()
    wait_clients(k, 1)
    with b.cond:
        in_flight = {d["tx"] for d in b.decides} - set(b.answered)
    load.join(40)
    assert box["r"].rc == 0 and box["r"].successful == 60, box["r"].output
    fell_back = k.metric("kamailio_callfabric_fallback_total", 'reason="timeout"')
    # unicast picks by a lock-free read of the controller list: a decide may race the
    # disconnect and be lost too (at most a couple)
    assert fell_back <= len(in_flight) + 2, (fell_back, in_flight)
    phase2 = [d["call_id"] for d in a.decides[len(ids_a):] + b.decides[before_b:]]
    assert len(phase2) == len(set(phase2)) and len(phase2) >= 60 - 2   # still once each
    print(f"two controllers: a decided {len(ids_a)}, b {len(ids_b)} of 40; b left with "
          f"{len(in_flight)} decides unanswered, {fell_back:.0f} calls fell back")
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="no-controller"') == 0
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="circuit-open"') == 0

    # a call up when its decider leaves: its "ended" event goes to the other one
    c = procs.decider(k, dispatch(1, "X-Decider: c\r\n"))
    box.clear()
    calls = threading.Thread(target=lambda: box.update(r=run_uac(
        tmp_path, k.sip_port, calls=2, rate=20, hold_ms=1500, timeout_s=15)))
    calls.start()
    c.wait_for(lambda e: e.get("state") == "confirmed")
    ids_c = {e["call_id"] for e in c.wait_for(lambda e: e.get("state") == "confirmed")}
    c.stop()
    calls.join(20)
    assert box["r"].successful == 2, box["r"].output
    (cid,) = ids_c
    assert a.wait_for(lambda e: e.get("state") == "ended" and e.get("call_id") == cid, timeout=5)
    assert k.alive()


# --------------------------------------------------------------------------- frozen decider
def test_frozen_decider_sigstop_falls_back_then_recovers(procs, tmp_path):
    fb, agent = procs.uas(name="fallback"), procs.uas(name="agent")
    k = procs.kamailio({1: [fb.addr], 2: [agent.addr]}, fallback="open",
                       decision_timeout_ms=BUDGET_MS)
    dec = procs.add(SubprocessDecider(k.evapi_port, 2))
    wait_clients(k, 1)
    r = run_uac(tmp_path, k.sip_port)
    assert r.rc == 0 and r.successful == 1, r.output

    os.kill(dec.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = run_uac(tmp_path, k.sip_port, calls=8, rate=20)
        assert r.rc == 0 and r.successful == 8, r.output
        assert time.monotonic() - t0 < 6
    finally:
        os.kill(dec.proc.pid, signal.SIGCONT)
    time.sleep(1.2)                                  # breaker probe interval (CB_PROBE_S=1)
    r = run_uac(tmp_path, k.sip_port, calls=3, rate=10)
    assert r.rc == 0 and r.successful == 3, r.output
    fb.stop(), agent.stop()
    assert len(fb.call_ids()) >= 8
    assert all(fallback_of(i) in ("timeout", "circuit-open") for i in fb.invites())
    recovered = [i for i in agent.invites() if i.header("X-Decider") == ["subprocess"]]
    assert len({i.header("Call-ID")[0] for i in recovered}) >= 3


def test_a_heartbeat_closes_the_breaker_and_its_gauge_without_a_call(procs, tmp_path):
    """A controller that stalled (its breaker open, the gauge at 1) and recovers says so with
    its heartbeat: the gauge is back at 0 before any new call probes it."""
    fb = procs.uas(name="fallback")
    k = procs.kamailio({1: [fb.addr]}, fallback="open", decision_timeout_ms=BUDGET_MS, cb_threshold=2)
    dec = procs.decider(k, lambda ev: None)  # reads, never answers: every decide times out
    r = run_uac(tmp_path, k.sip_port, calls=3, rate=10)
    assert r.successful == 3, r.output
    assert k.metric("kamailio_callfabric_breaker_open") == 1
    dec.send_raw(netstring(b'{"event":"alive"}'))
    deadline = time.monotonic() + 5
    while k.metric("kamailio_callfabric_breaker_open") != 0:
        assert time.monotonic() < deadline, "the heartbeat did not close the breaker"
        time.sleep(0.05)
    assert k.metric("kamailio_callfabric_answers_dropped_total", 'why="no-tx"') == 0  # not taken for an answer


def _flood(k, raw: "RawUAC", count: int, pad: dict[str, str]) -> None:
    hdrs = "".join(f"{n}: {v}\r\n" for n, v in pad.items())
    for i in range(count):
        branch = "z9hG4bK" + uuid.uuid4().hex
        raw.sock.sendto((f"INVITE sip:agent@127.0.0.1:{k.sip_port} SIP/2.0\r\n"
                         f"Via: SIP/2.0/UDP 127.0.0.1:{raw.lport};branch={branch}\r\n"
                         f"Max-Forwards: 70\r\nFrom: <sip:x@127.0.0.1>;tag={i}\r\n"
                         f"To: <sip:agent@127.0.0.1>\r\nCall-ID: flood-{i}-{branch}\r\n"
                         f"CSeq: 1 INVITE\r\n{hdrs}Content-Length: 0\r\n\r\n").encode(),
                        ("127.0.0.1", k.sip_port))
        time.sleep(0.002)                 # paced: keep the UDP receive buffer from dropping


PAD = {f"X-Pad-{i}": "p" * 200 for i in range(18)}          # ~4 KB per decide event


def test_frozen_decider_never_reading(procs):
    """Kamailio issue 4603: evapi writes to a client that stopped reading block the evapi
    dispatcher; once the worker->dispatcher socketpair is full the SIP workers block too
    (without the breaker ~5 MB of decide events stall even OPTIONS keepalives: an upstream
    bug, not asserted here). With the breaker of route[DECIDE] (after CB_THRESHOLD
    consecutive timeouts only one probe decide per second is written) the edge keeps
    answering, and the flood was short-circuited by it (counted below)."""
    k = procs.kamailio({1: ["127.0.0.1:9"]}, fallback="closed", decision_timeout_ms=BUDGET_MS, cb_threshold=5)
    frozen = procs.add(FrozenClient(k.evapi_port, rcvbuf=4096))
    wait_clients(k, 1)
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite(PAD)
        assert res["code"] == 503 and res["tfinal"] < BUDGET_MS / 1000 + STUCK_S
        _flood(k, raw, 1200, PAD)          # ~5 MB of decide events without the breaker
        assert options_ping(k.sip_port, 5.0) == "SIP/2.0 200 OK", "SIP workers stalled"
        res = raw.invite()
        assert res["code"] == 503 and res["tfinal"] < BUDGET_MS / 1000 + STUCK_S
    finally:
        raw.close()
        frozen.stop()
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="circuit-open"') > 500


# --------------------------------------------------------------------------- dialogs
def test_200_calls_in_a_row_all_routed(procs, tmp_path):
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, dispatch(1, "X-Agent: load\r\n"))
    r = run_uac(tmp_path, k.sip_port, calls=200, rate=100, limit=100, hold_ms=0, timeout_s=30)
    assert r.rc == 0 and r.successful == 200 and r.failed == 0, r.output
    assert len(dec.decides) == 200
    ended = dec.wait_for(lambda e: e.get("state") == "ended", count=200, timeout=5)
    assert len(ended) == 200
    ua.stop()
    assert len(ua.call_ids()) == 200
    assert k.metric("kamailio_callfabric_fallback_total", 'reason="timeout"') == 0


def test_dialog_events_bye_from_caller(procs, tmp_path):
    ua = procs.uas()
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, dispatch(1))
    r = run_uac(tmp_path, k.sip_port, hold_ms=300)
    assert r.rc == 0 and r.successful == 1, r.output
    evs = dec.wait_for(lambda e: e.get("event") == "dialog", count=2)
    assert [(e["state"], e["reason"], e["code"]) for e in evs] == [
        ("confirmed", "answered", 200), ("ended", "bye-caller", 0)]
    d = dec.decides[0]
    for e in evs:
        assert e["call_id"] == d["call_id"] and e["from_tag"] == d["from_tag"]
        assert e["tx"] == d["tx"] and e["fallback"] == ""
        assert abs(e["ts"] / 1000 - time.time()) < 30
    assert 250 <= evs[1]["ts"] - evs[0]["ts"] < 3000


def test_dialog_events_bye_from_callee(procs, tmp_path):
    ua = procs.uas("uas_answer_bye.xml")
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, dispatch(1))
    r = run_uac(tmp_path, k.sip_port, "uac_wait_bye.xml")
    assert r.rc == 0 and r.successful == 1, r.output
    evs = dec.wait_for(lambda e: e.get("event") == "dialog", count=2)
    assert [(e["state"], e["reason"]) for e in evs] == [("confirmed", "answered"),
                                                       ("ended", "bye-callee")]


def test_dialog_events_cancel_before_answer(procs, tmp_path):
    ua = procs.uas("uas_ring.xml")
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, dispatch(1))
    r = run_uac(tmp_path, k.sip_port, "uac_cancel.xml", hold_ms=200)
    assert r.rc == 0 and r.successful == 1, r.output
    ev = dec.wait_for(lambda e: e.get("event") == "dialog")[0]
    assert (ev["state"], ev["reason"], ev["code"]) == ("failed", "cancel", 487)
    ua.stop()
    assert ua.requests("CANCEL")


def test_cancel_while_decision_pending(procs):
    k = procs.kamailio({1: ["127.0.0.1:9"]}, decision_timeout_ms=1000)
    dec = procs.decider(k, lambda d: ("delay", 0.5, {"action": "dispatch", "set": 1}))
    raw = RawUAC(k.sip_port)
    try:
        call_id = uuid.uuid4().hex
        branch = "z9hG4bK" + uuid.uuid4().hex
        common = (f"Via: SIP/2.0/UDP 127.0.0.1:{raw.lport};branch={branch}\r\nMax-Forwards: 70\r\n"
                  f"From: <sip:c@127.0.0.1>;tag=cc1\r\nTo: <sip:agent@127.0.0.1>\r\n"
                  f"Call-ID: {call_id}\r\n")
        ruri = f"sip:agent@127.0.0.1:{k.sip_port}"
        raw.sock.sendto(f"INVITE {ruri} SIP/2.0\r\n{common}CSeq: 1 INVITE\r\nContact: <sip:c@127.0.0.1:{raw.lport}>\r\nContent-Length: 0\r\n\r\n".encode(), ("127.0.0.1", k.sip_port))
        dec.wait_for(lambda e: e.get("event") == "decide")
        raw.sock.sendto(f"CANCEL {ruri} SIP/2.0\r\n{common}CSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n".encode(), ("127.0.0.1", k.sip_port))
        codes = set()
        raw.sock.settimeout(1.0)
        while not {200, 487} <= codes:
            codes.add(int(raw.sock.recvfrom(65535)[0].split(b" ", 2)[1]))
        time.sleep(0.7)                                # the answer comes after the CANCEL
    finally:
        raw.close()
    ev = dec.wait_for(lambda e: e.get("event") == "dialog")[0]
    assert (ev["state"], ev["reason"]) == ("failed", "cancel")
    assert k.alive() and options_ping(k.sip_port) == "SIP/2.0 200 OK"


def test_ring_timeout_fails_over_on_every_branch(procs, tmp_path):
    r1, r2 = procs.uas("uas_ring.xml", "ring1"), procs.uas("uas_ring.xml", "ring2")
    good = procs.uas(name="good")
    fr_inv_ms = 30000                           # FR_INV_TIMEOUT_MS: default ring timeout
    k = procs.kamailio({1: [good.addr]}, fr_inv_timeout_ms=fr_inv_ms)
    uris = [f"sip:agent@{r1.addr}", f"sip:agent@{r2.addr}", f"sip:agent@{good.addr}"]

    def policy(d):
        if d["headers"].get("X-Ring") == ["default"]:
            return {"action": "relay", "uris": uris}
        return {"action": "relay", "uris": uris, "ring_timeout_ms": 1500}
    dec = procs.decider(k, policy)
    r = run_uac(tmp_path, k.sip_port, hold_ms=0, timeout_s=15)
    assert r.rc == 0 and r.successful == 1, r.output
    ev = dec.wait_for(lambda e: e.get("state") == "confirmed")[0]
    # two branches rang 1.5 s each (tm ticks: 62.5 ms), then the third answered
    rang = ev["ts"] / 1000 - dec.decide_rx[ev["tx"]]
    assert 2.7 < rang < 6, rang
    assert k.fr_inv_timeout_ms >= 10 * 1500      # the default (30 s) would ring 20x longer
    assert len(r1.call_ids()) == 1 and len(r2.call_ids()) == 1
    assert r1.requests("CANCEL") and r2.requests("CANCEL")   # tm cancels the rung-out branch

    # without ring_timeout_ms the first branch rings on (FR_INV_TIMEOUT_MS, 30 s)
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite({"X-Ring": "default"}, timeout=2.5)
    finally:
        raw.close()
    assert res["final"] is None, res
    assert len(r1.call_ids()) == 2 and len(r2.call_ids()) == 1


@pytest.mark.parametrize("action", ["dispatch", "relay"])
def test_max_duration_ends_call_with_bye_both_ways(procs, tmp_path, action):
    ua = procs.uas()                                  # answers, then waits for a BYE
    k = procs.kamailio({1: [ua.addr]})
    ans = ({"action": "dispatch", "set": 1} if action == "dispatch"
           else {"action": "relay", "uris": [f"sip:agent@{ua.addr}"]})
    dec = procs.decider(k, lambda d: {**ans, "max_duration_s": 2})
    r = run_uac(tmp_path, k.sip_port, "uac_wait_bye.xml", timeout_s=10)   # caller waits too
    assert r.rc == 0 and r.successful == 1, r.output
    assert [m for m in r.messages if m.direction == "in" and m.first_line.startswith("BYE ")]
    evs = dec.wait_for(lambda e: e.get("event") == "dialog", count=2)
    assert [(e["state"], e["reason"], e["code"]) for e in evs] == [
        ("confirmed", "answered", 200), ("ended", "timeout", 0)]
    assert evs[1]["tx"] == dec.decides[0]["tx"] and evs[1]["fallback"] == ""
    # dialog timer: 1 s ticks (expiry within (1, 2] s of the ACK that restarted it)
    assert 1.0 <= (evs[1]["ts"] - evs[0]["ts"]) / 1000 < 4
    ua.stop()
    # the callee got its BYE as well (5.6.3 race, see onreply_route in kamailio.cfg)
    assert len(ua.requests("BYE")) >= 1, k.log_tail(20)
    assert "not supported" not in k.log_text() and "invalid unref" not in k.log_text()
    time.sleep(0.3)
    assert len(dec.dialog_events()) == 2                      # no second "ended"
    assert k.metric("kamailio_callfabric_events_total", 'state="ended"') == 1
    assert k.jsonrpc("dlg.list") == []


def test_max_duration_is_not_extended_by_reinvite(procs, tmp_path):
    """max_duration_s caps the call: a re-INVITE does not restart the dialog timer
    (dialog 5.6 dlg_onroute() would, unless the dialog has "timeout-noreset")."""
    ua = procs.uas("uas_answer_reinvite.xml")
    k = procs.kamailio({1: [ua.addr]})
    dec = procs.decider(k, lambda d: {"action": "dispatch", "set": 1, "max_duration_s": 5})
    r = run_uac(tmp_path, k.sip_port, "uac_reinvite_wait_bye.xml", hold_ms=2500, timeout_s=14)
    assert r.rc == 0 and r.successful == 1, r.output
    ua.stop()
    assert len(ua.call_ids()) == 1 and len(ua.invites()) == 2 and ua.requests("BYE")
    evs = dec.wait_for(lambda e: e.get("event") == "dialog", count=2)
    assert [(e["state"], e["reason"]) for e in evs] == [("confirmed", "answered"),
                                                       ("ended", "timeout")]
    # dialog timer ticks are whole seconds: capped, the BYE comes 4..6 s after the ACK;
    # restarted by the re-INVITE (at 2.5 s) it would come 6.5..8.5 s after it. (The
    # re-INVITE must come before the earliest expiry: once the dialog is gone the edge
    # refuses in-dialog requests with 481.)
    assert 4.0 <= (evs[1]["ts"] - evs[0]["ts"]) / 1000 < 6.3


# --------------------------------------------------------------------------- edge hygiene
def test_blocklisted_source_gets_403_before_anything_else(procs):
    # (the media node elsewhere: a media node's address is never banned)
    k = procs.kamailio({1: ["127.0.0.250:9"]})
    dec = procs.decider(k, dispatch(1))
    k.jsonrpc("htable.sets", ["blocklist", "127.0.0.1", "fraud-score"])
    raw = RawUAC(k.sip_port)
    try:
        res = raw.invite()
        assert res["final"] == "SIP/2.0 403 Forbidden" and res["t100"] is None
        assert not dec.decides
        k.jsonrpc("htable.delete", ["blocklist", "127.0.0.1"])
        res = raw.invite()
        assert res["code"] != 403 and len(dec.decides) == 1
    finally:
        raw.close()


def test_max_forwards_exhausted_483_and_options_keepalive(procs):
    k = procs.kamailio({1: ["127.0.0.1:9"]})
    raw = RawUAC(k.sip_port)
    try:
        assert raw.invite(max_forwards=0)["final"] == "SIP/2.0 483 Too Many Hops"
    finally:
        raw.close()
    assert options_ping(k.sip_port) == "SIP/2.0 200 OK"


def test_every_callfabric_series_exists_at_zero_from_the_start(procs):
    """Every label value kamailio.cfg counts with a literal is exported at 0 before the first
    call: alerts see the series, and a test reading a wrong name fails instead of reading 0."""
    import re
    from pathlib import Path
    cfg = (Path(__file__).resolve().parents[2] / "kamailio" / "kamailio.cfg").read_text()
    cfg = re.sub(r"#!ifdef EDGE_POLICY.*?#!endif", "", cfg, flags=re.S)  # the edge's own decisions: not on here
    literal = set(re.findall(r'prom_counter_inc\("(\w+)", "1", "([a-z][a-z-]*)"\)', cfg))
    assert len(literal) >= 10
    k = procs.kamailio({1: ["127.0.0.1:9"]})
    for name, value in sorted(literal):
        label = re.search(rf'name={name}; label=(\w+)', cfg).group(1)
        assert k.metric(f"kamailio_{name}", f'{label}="{value}"') == 0, (name, value)


def test_management_endpoints(procs, tmp_path):
    ua, ub = procs.uas(name="a"), procs.uas(name="b")
    k = procs.kamailio({1: [ua.addr]}, log_level=int(os.environ.get("CF_KAM_LOG", "2")))
    dec = procs.decider(k, dispatch(2))
    sets = {s["SET"]["ID"] for s in k.jsonrpc("dispatcher.list")["RECORDS"]}
    assert sets == {1}
    k.write_dispatcher_list({1: [ua.addr], 2: [ub.addr]})
    k.jsonrpc("dispatcher.reload")
    assert {s["SET"]["ID"] for s in k.jsonrpc("dispatcher.list")["RECORDS"]} == {1, 2}

    # a long-lived call (both ends wait for a BYE), ended through dlg.end_dlg
    import threading
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=run_uac(
        tmp_path, k.sip_port, "uac_wait_bye.xml", timeout_s=15)))
    t.start()
    dec.wait_for(lambda e: e.get("state") == "confirmed")
    for _ in range(50):                               # wait for the ACK (state 4)
        dlgs = k.jsonrpc("dlg.list")
        if dlgs and dlgs[0]["state"] == 4:
            break
        time.sleep(0.05)
    assert len(dlgs) == 1 and dlgs[0]["state"] == 4, dlgs
    assert dlgs[0]["call-id"] == dec.decides[0]["call_id"]
    k.jsonrpc("dlg.end_dlg", [dlgs[0]["h_entry"], dlgs[0]["h_id"]])
    t.join(20)
    assert box["r"].rc == 0 and box["r"].successful == 1, box["r"].output
    assert k.jsonrpc("dlg.list") == []
    # 5.6.3 race (open problem, measured ~1 in 6 runs here): dlg_bye_all() runs dialog:end
    # after sending both BYEs; when a BYE reply wins the race the state is already DELETED and
    # no event runs, so "no event" cannot fail this test. What does arrive must be one
    # `terminated`, nothing else.
    evs = dec.wait_for(lambda e: e.get("state") == "ended", timeout=2.0, at_least=0)
    assert [e["reason"] for e in evs] in ([], ["terminated"]), evs
    metrics = k.metrics()
    assert "kamailio_dialog_active_dialogs" in metrics and "kamailio_tmx_" in metrics
    assert 'kamailio_callfabric_decide_total{result="dispatch"} 1' in metrics
    assert "uptime" in json.dumps(k.jsonrpc("core.uptime"))
    assert "kamailio" in k.kamcmd("core.version")
    assert k.jsonrpc("stats.get_statistics", ["all"])
    # /metrics and /health: HTTP_ALLOWED_NET (default 127.0.0.0/8); JSON-RPC only from
    # RPC_ALLOWED_NET (default 127.0.0.1/32): refused from another local address, logged
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", k.http_port, timeout=5,
                                      source_address=("127.0.0.2", 0))
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and b"kamailio_callfabric_decide_total" in resp.read()
    conn.request("POST", "/RPC", body=json.dumps({"jsonrpc": "2.0", "method": "core.uptime", "id": 1}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 403 and b"uptime" not in resp.read()
    conn.close()
    assert "JSON-RPC refused to 127.0.0.2" in k.log_text()
    assert dec.decides
