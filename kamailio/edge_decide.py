"""Kamailio's embedded Python (app_python3, loaded when EDGE_POLICY is defined): the edge's
own decisions, made by controller/edge/local.py with the policy the controller writes.

kamailio.cfg calls `python_exec("decide", EDGE_POLICY)` for an initial INVITE. The request's
fields are read here from the message itself when route[JSAFE] found it plain printable ASCII
($var(jsafe) = 1: the fields are then exactly what the decide event would carry), else from
the decide event JSON route[BUILD_DECIDE] put in $var(json). Returns 1 with the answer in
$var(a_*) (as route[VALIDATE_ANSWER] sets them for route[APPLY_ANSWER]) and the
controller's `decided` event in $var(edev), or -1 with the reason the controller decides
instead in $var(edge_why).

The callfabric package is found next to this directory (the repository, or the image
layout /opt/callfabric/{controller,kamailio}) or in CALLFABRIC_HOME."""
import os
import sys

_HOME = os.environ.get("CALLFABRIC_HOME") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _HOME not in sys.path:
    sys.path.insert(0, _HOME)

import KSR  # noqa: E402  (provided by app_python3)

try:
    from controller.edge.local import EdgeDecider, caller_headers
except Exception as exc:  # a broken install must not take SIP down: every call goes to a controller
    EdgeDecider = None
    KSR.err(f"edge decisions off: cannot load callfabric from {_HOME}: {type(exc).__name__}: {exc}\n")

_LOG = {"info": KSR.info, "warn": KSR.warn, "error": KSR.err}
# decide event field -> the pseudo-variable route[BUILD_DECIDE] prints it from
_FIELDS = (("call_id", "$ci"), ("from_uri", "$fu"), ("from_user", "$fU"), ("from_tag", "$ft"), ("to_uri", "$tu"),
           ("to_user", "$tU"), ("ruri", "$ru"), ("ruri_user", "$rU"), ("src_ip", "$si"), ("user_agent", "$ua"),
           ("trunk", "$var(trunk)"))


def _log(level, message):
    _LOG.get(level, KSR.err)(message + "\n")


def _hot(key):
    return KSR.htable.sht_get("cfhot", key) is not None


def _request(header_names):
    """The decide event's fields, read from the request (plain ASCII: no escaping to undo)."""
    get = KSR.pv.get
    request = {name: get(pv) or "" for name, pv in _FIELDS}
    request["tx"] = get("$var(tx)")
    request["src_port"] = get("$sp")
    request["transport"] = (get("$pr") or "").lower()
    request["headers"] = caller_headers(get("$mb"), header_names) if header_names else {}
    return request


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
        if KSR.pv.get("$var(jsafe)") == 1:
            decider.refresh()
            outcome = decider.decide(_request(decider.header_names), _hot)
        else:
            outcome = decider.decide(KSR.pv.get("$var(json)") or "", _hot)
        if outcome.deferred:
            KSR.pv.sets("$var(edge_why)", outcome.deferred)
            return -1
        sets, seti = KSR.pv.sets, KSR.pv.seti
        for pv, value in outcome.kamailio_vars:
            if type(value) is int:
                seti(pv, value)
            else:
                sets(pv, value)
        sets("$var(edev)", outcome.event)
        return 1


def mod_init():
    return EdgeScript()
