"""Kamailio's embedded Python (app_python3, loaded when EDGE_POLICY is defined): the edge's
own decisions, made by controller/edge/local.py with the policy the controller writes.

kamailio.cfg calls `python_exec("decide", EDGE_POLICY)` with the decide event in $var(json).
Returns 1 with the answer in $var(msg) and the controller's `decided` event in $var(edev),
or -1 with the reason the controller decides instead in $var(edge_why).

The callfabric package is found next to this directory (the repository, or the image
layout /opt/callfabric/{controller,kamailio}) or in CALLFABRIC_HOME."""
import os
import sys

_HOME = os.environ.get("CALLFABRIC_HOME") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _HOME not in sys.path:
    sys.path.insert(0, _HOME)

import KSR  # noqa: E402  (provided by app_python3)

try:
    from controller.edge.local import EdgeDecider
except Exception as exc:  # a broken install must not take SIP down: every call goes to a controller
    EdgeDecider = None
    KSR.err(f"edge decisions off: cannot load callfabric from {_HOME}: {type(exc).__name__}: {exc}\n")

_LOG = {"info": KSR.info, "warn": KSR.warn, "error": KSR.err}


def _log(level, message):
    _LOG.get(level, KSR.err)(message + "\n")


def _hot(key):
    return KSR.htable.sht_get("cfhot", key) is not None


class EdgeScript:
    def __init__(self):
        self.decider = None

    def child_init(self, rank):
        return 0

    def decide(self, msg, path):
        if EdgeDecider is None:
            KSR.pv.sets("$var(edge_why)", "no-code")
            return -1
        decider = self.decider
        if decider is None or decider.path != path:
            decider = self.decider = EdgeDecider(path, _log)
        outcome = decider.decide(KSR.pv.get("$var(json)") or "", _hot)
        if outcome.deferred:
            KSR.pv.sets("$var(edge_why)", outcome.deferred)
            return -1
        KSR.pv.sets("$var(msg)", outcome.answer)
        KSR.pv.sets("$var(edev)", outcome.event)
        return 1


def mod_init():
    return EdgeScript()
