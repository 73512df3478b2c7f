"""One list of the header names callfabric sets or trusts (controller/actions.py), and the edge
strips exactly those: kamailio.cfg's TRUSTED_HDR_RE must be the regex generated from the list,
and every place the config strips or skips callfabric's headers must use it."""
import re
from pathlib import Path

import pytest

from controller.actions import TRUSTED_HEADER_NAMES, is_trusted_header, trusted_header_regex
from controller.edge import protocol

CFG = Path(__file__).resolve().parents[2] / "kamailio" / "kamailio.cfg"


def cfg_text() -> str:
    return CFG.read_text()


def test_the_edge_strips_the_controllers_list():
    defined = re.findall(r'^#!define TRUSTED_HDR_RE "(.*)"$', cfg_text(), re.M)
    assert defined == [trusted_header_regex()], "kamailio.cfg TRUSTED_HDR_RE differs from controller/actions.py"


def test_every_strip_and_skip_in_the_config_uses_the_list():
    text = cfg_text()
    # callers' requests and every relayed reply; the decide's header list skips the same names
    assert "remove_hf_re(TRUSTED_HDR_RE);" in text
    assert text.count("$var(hn) =~ TRUSTED_HDR_RE") == 2
    # the prefix alone is only used where a trusted destination gets the rest of the names: a
    # media node's X-Callfabric-Call-Id and context, the answer's lines but the controller's own
    # (X-Callfabric-* go to media nodes only); everything else leaves without any of the names
    assert text.count('remove_hf_exp("^X-Callfabric-", "^X-Callfabric-Call-Id$")') == 1
    assert text.count('$var(hre) = "^X-Callfabric-";') == 1
    assert text.count("$var(hre) = TRUSTED_HDR_RE;") == 1
    assert 'remove_hf_re("^X-Callfabric-")' not in text
    onreply = text[text.index("\nonreply_route {"):]
    assert onreply[:onreply.index("\n}")].count("remove_hf_re(TRUSTED_HDR_RE)") == 1


@pytest.mark.parametrize("name", ["X-Callfabric-Agent", "x-callfabric-fallback", "X-CALLFABRIC-RULE", "X-Summary",
                                  "x-summary", "X-INTENT", "x-Sentiment", "X-Summary-Ref", " X-Intent ",
                                  "x-sentiment-ref"])
def test_trusted_names_any_case(name):
    assert is_trusted_header(name)
    assert re.match(trusted_header_regex(), name.strip(), re.I)


@pytest.mark.parametrize("name", ["X-Tenant", "X-Summarize", "X-Summary2", "Summary", "X-Lang", "X-Callfabric",
                                  "P-Asserted-Identity"])
def test_other_names_are_the_callers(name):
    assert not is_trusted_header(name)
    assert not re.match(trusted_header_regex(), name, re.I)


def test_the_context_names_are_the_handoff_headers():
    assert {"x-summary", "x-intent", "x-sentiment"} <= set(TRUSTED_HEADER_NAMES)


def test_the_controller_drops_trusted_names_an_edge_let_through():
    message = {"event": "decide", "tx": "1:2", "call_id": "c", "headers": {
        "X-Summary": ["forged"], "x-INTENT": ["forged"], "X-Callfabric-Agent": ["evil"], "X-Lang": ["fr"]}}
    assert protocol.parse_decide(message).call.headers == {"X-Lang": ["fr"]}
