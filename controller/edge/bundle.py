"""The policy as the edge loads it: the controller validates and compiles the YAML, then
writes this file (settings `edge_policy_file`); Kamailio's embedded Python reads it (kamailio
EDGE_POLICY) and decides the common calls itself. Written atomically (rename), so a reader
sees the old file or the new one, never half of one.

Format: a magic line, a JSON header line (format, code fingerprint, policy version), then the
validated PolicySource pickled. Loading accepts only the policy model's own classes, so the
file cannot make the edge run anything else. The code fingerprint makes an edge whose copy of
callfabric differs from the controller's refuse the file (the controller decides meanwhile)
rather than misread it. Standard library only."""
from __future__ import annotations

import hashlib
import importlib
import io
import ipaddress
import json
import os
import pickle
import tempfile
from pathlib import Path

from controller.policy.model import PolicySource

MAGIC = b"callfabric-edge-policy\n"
FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]
# The code that reads the bundle and decides with it: both sides must run the same.
_DECIDING_CODE = sorted((_PACKAGE / "policy").glob("*.py")) + [
    _PACKAGE / "actions.py",
    *(_PACKAGE / "edge" / name for name in ("protocol.py", "verdict.py", "local.py", "bundle.py"))]
_ALLOWED_MODULES = ("controller.policy.model", "controller.policy.actionset", "controller.policy.numbers")
_ALLOWED_IP = {"IPv4Network", "IPv6Network", "IPv4Address", "IPv6Address"}


class BundleError(Exception):
    """The file is not a policy this edge can use (the message says why)."""


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in _DECIDING_CODE:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()[:16]


CODE = code_fingerprint()


def dump(source: PolicySource) -> bytes:
    header = json.dumps({"format": FORMAT, "code": CODE, "version": source.version}).encode()
    return MAGIC + header + b"\n" + pickle.dumps(source, protocol=pickle.HIGHEST_PROTOCOL)


def write(path: str | os.PathLike[str], source: PolicySource) -> None:
    """Replace the file at `path` in one rename (blocking: call it off the event loop)."""
    target = Path(path)
    data = dump(source)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


class _PolicyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        elif module == "ipaddress" and name in _ALLOWED_IP:
            return getattr(ipaddress, name)
        raise BundleError(f"refers to {module}.{name}, which is not part of a policy")


def load(data: bytes) -> PolicySource:
    if not data.startswith(MAGIC):
        raise BundleError("not a callfabric edge policy file")
    header_line, _, body = data[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        raise BundleError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BundleError(f"format {header.get('format') if isinstance(header, dict) else '?'}, "
                          f"this edge reads format {FORMAT}")
    if header.get("code") != CODE:
        raise BundleError(f"written by callfabric code {header.get('code')!r}, this edge runs {CODE!r}: "
                          "install the same callfabric version at the edge and the controller")
    try:
        source = _PolicyUnpickler(io.BytesIO(body)).load()
    except BundleError:
        raise
    except Exception as exc:  # a truncated or corrupted file: any unpickling error
        raise BundleError(f"corrupted ({type(exc).__name__}: {exc})") from None
    if not isinstance(source, PolicySource):
        raise BundleError(f"holds a {type(source).__name__}, not a policy")
    return source


def read(path: str | os.PathLike[str]) -> PolicySource:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read it: {exc.strerror or exc}") from None
    return load(data)
