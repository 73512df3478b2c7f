"""The policy as the edge loads it: the controller validates and compiles the YAML, then
writes this file (settings `edge_policy_file`); Kamailio's embedded Python reads it (kamailio
EDGE_POLICY) and decides the common calls itself, and applies its rejects when a call takes the
fallback. Written atomically (rename), so a reader sees the old file or the new one, never half
of one.

Data, never code, and only the controllers' data:

    callfabric-edge-policy 2
    hmac-sha256 <64 hex digits>
    {"code":"<deciding code fingerprint>","format":2,"version":"<policy version>"}
    <the validated policy as canonical JSON (controller/policy/canonical.py)>

The MAC is HMAC-SHA256, with a key both sides hold in a file (the controller's
`edge_policy_key_file`, Kamailio's EDGE_POLICY_KEY), over every byte after its line; nothing
of the file is parsed before it verifies. The edge compiles the decoded policy with the same
code as the controller. The code fingerprint makes an edge whose copy of callfabric differs
from the controller's refuse the file (the controller decides meanwhile) rather than misread
it. Standard library only."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from controller.policy import canonical
from controller.policy.model import PolicySource

MAGIC = b"callfabric-edge-policy 2\n"
FORMAT = 2
MAC_PREFIX = b"hmac-sha256 "
MIN_KEY_BYTES = 32
_PACKAGE = Path(__file__).resolve().parents[1]
# The code that reads the bundle and decides with it: both sides must run the same.
_DECIDING_CODE = sorted((_PACKAGE / "policy").glob("*.py")) + [
    _PACKAGE / "actions.py",
    *(_PACKAGE / "edge" / name for name in ("protocol.py", "verdict.py", "local.py", "bundle.py"))]


class BundleError(Exception):
    """The file is not a policy this edge can use; `reason` is a metric label, the message
    says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in _DECIDING_CODE:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"missing")
    return digest.hexdigest()[:16]


CODE = code_fingerprint()


# -- the key ----------------------------------------------------------------------------------
def read_key(path: str | os.PathLike[str]) -> bytes:
    """The key in a key file (surrounding whitespace ignored), at least MIN_KEY_BYTES long."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise BundleError("no-key", f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise BundleError("no-key", f"the key file {path} holds {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
    return key


def create_key(path: str | os.PathLike[str], mode: int = 0o640) -> bool:
    """Write a new random key (64 hex digits) unless the file exists; True if written."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    os.chmod(target, mode)  # whatever the umask took away
    return True


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


# -- writing ----------------------------------------------------------------------------------
def dump(source: PolicySource, key: bytes) -> bytes:
    """The signed file for `source` (canonical.DocumentInvalid if it has no JSON form)."""
    header = json.dumps({"format": FORMAT, "code": CODE, "version": source.version}, sort_keys=True,
                        separators=(",", ":")).encode()
    payload = header + b"\n" + canonical.encode(source)
    return MAGIC + MAC_PREFIX + _mac(key, payload) + b"\n" + payload


def write(path: str | os.PathLike[str], source: PolicySource, key: bytes) -> None:
    """Replace the file at `path` in one rename (blocking: call it off the event loop)."""
    target = Path(path)
    data = dump(source, key)
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


# -- reading ----------------------------------------------------------------------------------
def load(data: bytes, key: bytes) -> PolicySource:
    if not data.startswith(MAGIC):
        raise BundleError("format", "not a callfabric edge policy file of format 2 (an unsigned or older file)")
    mac_line, newline, payload = data[len(MAGIC):].partition(b"\n")
    if not newline or not mac_line.startswith(MAC_PREFIX):
        raise BundleError("unsigned", "the file carries no MAC")
    if not hmac.compare_digest(mac_line[len(MAC_PREFIX):], _mac(key, payload)):
        raise BundleError("bad-mac", "its MAC does not verify: not written with this edge's key (tampered, or the "
                          "controller and the edge hold different keys)")
    header_line, _, body = payload.partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        raise BundleError("format", "unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BundleError("format", f"format {header.get('format') if isinstance(header, dict) else '?'}, "
                          f"this edge reads format {FORMAT}")
    if header.get("code") != CODE:
        raise BundleError("code", f"written by callfabric code {header.get('code')!r}, this edge runs {CODE!r}: "
                          "install the same callfabric version at the edge and the controller")
    try:
        source = canonical.decode(body)
    except canonical.DocumentInvalid as exc:
        raise BundleError("invalid", f"not a valid policy: {exc}") from None
    if source.version != header.get("version"):
        raise BundleError("invalid", "the policy's version is not the header's")
    return source


def read(path: str | os.PathLike[str], key: bytes) -> PolicySource:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError("unreadable", f"cannot read it: {exc.strerror or exc}") from None
    return load(data, key)
