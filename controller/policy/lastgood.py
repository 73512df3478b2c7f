"""The last policy this deployment served, kept so that a controller never starts without a
policy it served before. A controller that starts while a broken file sits in the policy
directory would otherwise have no policy at all: every call would get the edge's fallback, and
a number the policy blocks (a premium-rate range) would be routed.

Every version a controller starts serving from its files is kept — in Redis (shared by every
controller, `cf:policy:last-good`) and in a local file (`policy_last_good_file`) — as the
validated policy's canonical JSON (policy/canonical.py) behind one header line:

    {"by":"<instance>","saved_ms":<unix ms>,"sha256":"<of the document>","version":"<version>"}
    <canonical JSON document>

At start, when the files are refused, the newest copy that reads back serves (restore), and the
controller says so loudly: an error in the log, `callfabric_policy_last_good` = 1, the
`policy` section of /healthz. Saving and restoring do I/O only through the callables given
(Redis) and a worker thread (the file): this module imports no other boundary."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from controller.policy import Policy, canonical
from controller.policy.model import PolicySource

log = logging.getLogger("callfabric.policy")


@dataclass(frozen=True, slots=True)
class Saved:
    version: str
    saved_ms: int
    by: str
    document: bytes  # canonical JSON
    where: str = ""  # "redis" | "file <path>" once read back

    def pack(self) -> bytes:
        header = {"by": self.by, "saved_ms": self.saved_ms, "sha256": hashlib.sha256(self.document).hexdigest(),
                  "version": self.version}
        return json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n" + self.document

    def source(self) -> PolicySource:
        """The policy (canonical.DocumentInvalid when the copy is not one)."""
        source = canonical.decode(self.document)
        if source.version != self.version:
            raise canonical.DocumentInvalid("the copy's version is not its header's")
        return source


def unpack(data: bytes, where: str) -> Saved:
    header_line, newline, document = data.partition(b"\n")
    try:
        header = json.loads(header_line)
        saved = Saved(str(header["version"]), int(header["saved_ms"]), str(header["by"]), document, where)
        intact = header["sha256"] == hashlib.sha256(document).hexdigest()
    except (ValueError, KeyError, TypeError):
        raise canonical.DocumentInvalid("not a last good policy copy") from None
    if not newline or not intact:
        raise canonical.DocumentInvalid("the copy is damaged (its checksum does not match)")
    return saved


def _write_file(path: str, data: bytes) -> None:
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _read_file(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


class LastGood:
    """Keeps the serving policy (`keep`) and gives back the newest copy (`restore`)."""

    def __init__(self, instance_id: str, path: str = "", *,
                 redis_save: Callable[[bytes], Awaitable[None]] | None = None,
                 redis_load: Callable[[], Awaitable[bytes | None]] | None = None,
                 on_write: Callable[[str, bool], None] = lambda where, ok: None):
        self.instance_id = instance_id
        self.path = path
        self._redis_save = redis_save
        self._redis_load = redis_load
        self._on_write = on_write  # (where: redis|file, ok)
        self.kept: str | None = None  # the version last kept everywhere it could be
        self._lock = asyncio.Lock()

    async def keep(self, policy: Policy) -> None:
        """Keep `policy` (a version served from the files) in Redis and in the file."""
        async with self._lock:
            if policy.version == self.kept:
                return
            try:
                document = await asyncio.to_thread(canonical.encode, policy.source)
            except canonical.DocumentInvalid as exc:
                log.error("policy %s cannot be kept as the last good one: %s", policy.version, exc)
                self._on_write("encode", False)
                return
            data = Saved(policy.version, int(time.time() * 1000), self.instance_id, document).pack()
            kept = True
            if self._redis_save is not None:
                try:
                    await self._redis_save(data)
                    self._on_write("redis", True)
                except Exception as exc:  # Redis down or refusing: the file still has it
                    kept = False
                    self._on_write("redis", False)
                    log.warning("could not keep policy %s as the last good one in Redis: %s", policy.version, exc)
            if self.path:
                try:
                    await asyncio.to_thread(_write_file, self.path, data)
                    self._on_write("file", True)
                except OSError as exc:
                    kept = False
                    self._on_write("file", False)
                    log.warning("could not keep policy %s as the last good one in %s: %s", policy.version, self.path,
                                exc)
            if kept:
                self.kept = policy.version

    async def restore(self) -> tuple[Saved, Policy] | None:
        """The newest copy that reads back, compiled; None when there is none."""
        copies: list[Saved] = []
        if self._redis_load is not None:
            try:
                data = await self._redis_load()
                if data is not None:
                    copies.append(unpack(data, "redis"))
            except Exception as exc:
                log.warning("the last good policy in Redis is unusable: %s", exc)
        if self.path:
            try:
                data = await asyncio.to_thread(_read_file, self.path)
                if data is not None:
                    copies.append(unpack(data, f"file {self.path}"))
            except (OSError, canonical.DocumentInvalid) as exc:
                log.warning("the last good policy in %s is unusable: %s", self.path, exc)
        for saved in sorted(copies, key=lambda s: s.saved_ms, reverse=True):
            try:
                policy = await asyncio.to_thread(lambda: Policy(saved.source()))
            except Exception as exc:  # a copy written by another callfabric version, damaged …
                log.warning("the last good policy from %s cannot be used: %s", saved.where, exc)
                continue
            self.kept = None  # keep the files' version again once they load
            return saved, policy
        return None
