"""SIP test UAs through the edge (the README's list): callfabric's SIPp scenarios follow the
Record-Route and their calls end; a stock `sipp -sn uac` sends its ACK and BYE straight to its
peer, and the edge's answer to that BYE says why it is refused. Real Kamailio (our config, no
controller: its fallback routes to the media set) and real SIPp on free loopback ports."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from controller.localstack.kamailio import Kamailio
from controller.localstack.sipp import SippUAS, run_uac

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(any(shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
                                    for b in ("kamailio", "sipp")), reason="kamailio and sipp are required")


@pytest.fixture
def edge(tmp_path):
    uas = SippUAS(tmp_path, "uas_answer.xml", "media").start()
    kamailio = Kamailio(tmp_path, {1: [uas.addr]})
    try:
        kamailio.start()
        yield kamailio
    finally:
        kamailio.stop()
        uas.stop()


def test_callfabrics_scenarios_follow_the_record_route(edge, tmp_path):
    result = run_uac(tmp_path, edge.sip_port, "uac_call.xml", service="18005550000", hold_ms=200)
    assert result.successful == 1, result.output[-1500:]


def test_a_stock_sipp_uac_is_told_why_its_bye_is_refused(edge, tmp_path):
    trace = tmp_path / "stock.log"
    done = subprocess.run(["sipp", "-sn", "uac", "-s", "18005550000", f"127.0.0.1:{edge.sip_port}", "-i", "127.0.0.1",
                           "-p", "0", "-m", "1", "-d", "100", "-timeout", "15", "-timeout_error", "-nostdin",
                           "-trace_msg", "-message_file", str(trace)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode != 0                    # the stock scenario does not complete through the edge
    messages = trace.read_text(errors="replace")
    assert "SIP/2.0 200 OK" in messages            # answered: the INVITE went through
    assert "SIP/2.0 404 Not here: in-dialog requests must follow the Record-Route (RFC 3261 12.2.1.1)" in messages


def test_the_readme_names_the_test_uas_that_work_through_the_edge():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### SIP test clients", 1)[1].split("\n#", 1)[0]
    for named in ("controller/localstack/scenarios/uac_call.xml", "sipp -sn uac", "Record-Route", "callfabric up --check"):
        assert named in section, named
