"""bench/edge_floor.py, the edge script of bench/cost.py's `floor` mode: it must decide the
first call as kamailio/edge_decide.py does, then hand every later call that same outcome
without reading the request or deciding (else the floor it measures is not a floor)."""
from __future__ import annotations

import importlib.util
import json
import locale
import sys
import types
from pathlib import Path

import pytest

from controller.edge import bundle
from controller.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
KEY = b"f" * 32


class FakePV:
    """KSR.pv over a dict of the request's pseudo-variables; counts reads, keeps what is set."""

    def __init__(self, values: dict):
        self.values, self.reads, self.set = values, 0, {}

    def get(self, name):
        self.reads += 1
        return self.values.get(name)

    def sets(self, name, value):
        self.set[name] = value

    seti = sets


@pytest.fixture
def process_locale():
    """kamailio/edge_decide.py sets LC_CTYPE to "C" (as in Kamailio): undone for the tests after."""
    saved = locale.setlocale(locale.LC_CTYPE)
    yield
    locale.setlocale(locale.LC_CTYPE, saved)


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_script_decides_once_then_repeats_that_outcome_without_reading(tmp_path, monkeypatch,
                                                                                 process_locale):
    policy_path, key_path = tmp_path / "edge.policy", tmp_path / "edge.key"
    bundle.write(policy_path, load_policy(ROOT / "policies").source, KEY)
    key_path.write_bytes(KEY + b"\n")
    values = {"$def(EDGE_POLICY_KEY)": f'"{key_path}"', "$def(EDGE_POLICY_CACHE)": "", "$var(jsafe)": 1,
              "$ci": "first@test", "$fu": "sip:+12025550123@203.0.113.9", "$fU": "+12025550123", "$ft": "t1",
              "$tu": "sip:18005550101@edge", "$tU": "18005550101", "$ru": "sip:18005550101@edge",
              "$rU": "18005550101", "$si": "203.0.113.9", "$ua": None, "$var(trunk)": "", "$var(tx)": "1:1",
              "$sp": 5060, "$pr": "udp", "$mb": "INVITE sip:18005550101@edge SIP/2.0\r\n\r\n"}
    pv = FakePV(values)
    ksr = types.ModuleType("KSR")
    ksr.pv = pv
    ksr.info = ksr.warn = ksr.err = lambda message: None
    ksr.htable = types.SimpleNamespace(sht_get=lambda table, key: None, sht_inc=lambda table, key: 1)
    ksr.xhttp_prom = types.SimpleNamespace(counter_inc_l1=lambda *args: None)
    monkeypatch.setitem(sys.modules, "KSR", ksr)
    floor = load("edge_floor", ROOT / "bench" / "edge_floor.py").mod_init()
    shipped = load("edge_decide_shipped", ROOT / "kamailio" / "edge_decide.py").mod_init()

    assert floor.decide(None, str(policy_path)) == 1
    first = dict(pv.set)
    assert json.loads(first["$var(edev)"])["call_id"] == "first@test" and first["$var(a_action)"]
    values.update({"$ci": "second@test", "$var(tx)": "2:2", "$rU": "18005550000", "$tU": "18005550000"})
    pv.set, reads = {}, pv.reads
    assert floor.decide(None, str(policy_path)) == 1
    assert pv.reads == reads  # nothing read: no decision
    assert pv.set == first  # the first call's variables and event, again

    pv.set = {}
    assert shipped.decide(None, str(policy_path)) == 1  # the shipped script reads and decides the second call
    assert json.loads(pv.set["$var(edev)"])["call_id"] == "second@test"
