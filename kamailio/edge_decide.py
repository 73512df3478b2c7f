"""Kamailio's embedded Python (app_python3, loaded when EDGE_POLICY is defined): the edge's
own decisions, made by controller/edge/local.py with the policy the controller writes.

kamailio.cfg calls `python_exec("decide", EDGE_POLICY)` for an initial INVITE. The request's
fields are read here from the message itself when route[JSAFE] found it plain printable ASCII
($var(jsafe) = 1: the fields are then exactly what the decide event would carry), else from
the decide event JSON route[BUILD_DECIDE] put in $var(json). Returns 1 with the answer in
$var(a_*) (as route[VALIDATE_ANSWER] sets them for route[APPLY_ANSWER]) and the
controller's `decided` event in $var(edev), or -1 with the reason the controller decides
instead in $var(edge_why), and, when the policy rejects the call whatever the controller knows
more, that reject in $var(floor_code) and $var(floor_reason) (route[FALLBACK] applies it if
the call takes the fallback). With EDGE_DECIDE 0 it calls `python_exec("floor", EDGE_POLICY)`:
only that reject.

The file is verified with the key in the file named by the define EDGE_POLICY_KEY ($def),
and the last one that verified is kept in EDGE_POLICY_CACHE (controller/edge/local.py);
a file that does not verify is refused, logged, and counted once per file state in
callfabric_edge_policy_refused_total{reason} (htable cfpolicy: whichever process sees it
first counts it).

The callfabric package is found next to this directory (the repository, or the image
layout /opt/callfabric/{controller,kamailio}) or in CALLFABRIC_HOME."""
import locale
import os
import sys

# Starting the interpreter set the C library's LC_CTYPE to the environment's locale (C.UTF-8 …)
# in every Kamailio process. Kamailio's regular expressions (=~, remove_hf_re, route[JSAFE]) are
# about bytes, as in a Kamailio without Python, and glibc's regexec in a multibyte locale turns
# each subject into wide characters first: a SIP worker spent ~10 % of its instructions there.
locale.setlocale(locale.LC_CTYPE, "C")

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


def _refused(state, reason):
    """Count a refused file once, whichever process sees it first (True for that one)."""
    if KSR.htable.sht_inc("cfpolicy", state) != 1:
        return False
    KSR.xhttp_prom.counter_inc_l1("callfabric_edge_policy_refused_total", 1, reason)
    return True


def _define(name):
    """A string define of kamailio.cfg (its quotes removed), None when empty."""
    value = KSR.pv.get(f"$def({name})")
    value = value.strip().strip('"') if isinstance(value, str) else ""
    return value or None


def _floor(outcome):
    """The reject the call gets if it takes the fallback, for route[DECIDE] ($var(floor_*))."""
    if outcome.floor is not None:
        KSR.pv.seti("$var(floor_code)", outcome.floor[0])
        KSR.pv.sets("$var(floor_reason)", outcome.floor[1])


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

    def _decider(self, path):
        decider = self.decider
        if decider is None or decider.path != path:
            decider = self.decider = EdgeDecider(path, _define("EDGE_POLICY_KEY"), _log, refused=_refused,
                                                 cache_path=_define("EDGE_POLICY_CACHE"))
        return decider

    def _read(self, decider):
        """The request: read from the message itself, or the decide event JSON."""
        if KSR.pv.get("$var(jsafe)") == 1:
            decider.refresh()
            return _request(decider.header_names)
        return KSR.pv.get("$var(json)") or ""

    def floor(self, msg, path):
        """EDGE_DECIDE 0: the controllers decide every call; only the reject it gets if it takes
        the fallback is looked up here."""
        if EdgeDecider is None:
            return -1
        decider = self._decider(path)
        _floor(decider.floor(self._read(decider)))
        return 1

    def decide(self, msg, path):
        if EdgeDecider is None:
            KSR.pv.sets("$var(edge_why)", "no-code")
            return -1
        decider = self._decider(path)
        outcome = decider.decide(self._read(decider), _hot)
        if outcome.deferred:
            KSR.pv.sets("$var(edge_why)", outcome.deferred)
            _floor(outcome)
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
