"""Logs as one JSON object per line (time, level, logger, message, and the call it is about
when there is one), or plain text for people at a terminal; a level per module."""
from __future__ import annotations

import json
import logging
import re
import time

_CALL = re.compile(r"\bcall (\S+): ")  # a message about a call says "call <id>: …"


def _call_id(record: logging.LogRecord, message: str) -> str | None:
    """The call a message is about: the argument that fills "call %s" in its template, else
    "call <id>: " in the text (never a word of prose: "every call gets …" names no call)."""
    template = record.msg if isinstance(record.msg, str) else ""
    at = template.find("call %s")
    if at >= 0 and isinstance(record.args, tuple):
        index = template.count("%", 0, at) - 2 * template.count("%%", 0, at)
        if index < len(record.args):
            return str(record.args[index])
    found = _CALL.search(message)
    return found.group(1) if found else None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": message}
        call_id = getattr(record, "call_id", None)
        if call_id is None:
            call_id = _call_id(record, message)
        if call_id:
            entry["call_id"] = call_id
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "json", levels: dict[str, str] | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name, module_level in (levels or {}).items():
        logging.getLogger(name).setLevel(getattr(logging, str(module_level).upper(), logging.INFO))
