"""bench/cost.py's `floor` mode: Kamailio's edge script (kamailio/edge_decide.py) deciding the
first call it sees, then answering every later call with that outcome (the same Kamailio
variables and `decided` event) without reading the request or deciding anything. Everything
but the decision runs as shipped — the config, the Python entry, the answer handed back, the
dialog tracking, the three events per call and their writer — so its Kamailio CPU per call,
against static routing's, is what the edge costs beside its decision.

Loaded by app_python3 as EDGE_SCRIPT; never deployed (the records it leaves are wrong: every
call is recorded as the first one)."""
import importlib.util
import os

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kamailio", "edge_decide.py")
_spec = importlib.util.spec_from_file_location("edge_decide", _SCRIPT)
edge_decide = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edge_decide)


class _Once:
    """An EdgeDecider that decides until one call is decided, then gives that outcome again."""

    def __init__(self, decider):
        self.decider = decider
        self.outcome = None

    def __getattr__(self, name):
        return getattr(self.decider, name)

    def decide(self, request, is_hot):
        if self.outcome is None:
            outcome = self.decider.decide(request, is_hot)
            if outcome.deferred:
                return outcome
            self.outcome = outcome
        return self.outcome


class CannedScript(edge_decide.EdgeScript):
    def __init__(self):
        super().__init__()
        self.once = None

    def _decider(self, path):
        decider = super()._decider(path)
        if self.once is None or self.once.decider is not decider:
            self.once = _Once(decider)
        return self.once

    def _read(self, decider):
        return None if decider.outcome is not None else super()._read(decider)


def mod_init():
    return CannedScript()
