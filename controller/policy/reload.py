"""Hot reload: a new policy version replaces the serving one in a single reference swap, or
is refused (logged, reported) while the last good version keeps serving. Files are read
and compiled in a worker thread, never on the event loop."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from controller.policy import Policy, PolicyInvalid, PolicyIssue, load_policy

log = logging.getLogger("callfabric.policy")


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    trigger: str  # "start" | "file" | "signal" | "api" | "last-good" (restored: lastgood.py)
    accepted: bool
    version: str  # the version serving after this reload
    previous: str | None
    issues: tuple[PolicyIssue, ...] = ()

    @property
    def changed(self) -> bool:
        return self.accepted and self.version != self.previous


def directory_signature(directory: str) -> tuple:
    """Cheap change detector: names, sizes and mtimes of the policy files (and list files)."""
    entries = []
    root = Path(directory)
    try:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    except OSError:
        return ("unreadable",)
    return tuple(entries)


class PolicyHolder:
    """Serves the current policy; `policy` is replaced atomically (one attribute store).
    `origin` says where it came from ("files", or the last good copy it was restored from
    when the files were refused at start) and `files_issues` why the files on disk are refused
    (empty while they load)."""

    def __init__(self, directory: str | os.PathLike[str], on_outcome: Callable[[ReloadOutcome], None] | None = None):
        self.directory = str(directory)
        self.policy: Policy | None = None
        self.origin = ""
        self.files_issues: tuple[PolicyIssue, ...] = ()
        self._on_outcome = on_outcome
        self._lock = asyncio.Lock()
        self._signature: tuple | None = None

    async def reload(self, trigger: str) -> ReloadOutcome:
        async with self._lock:
            previous = self.policy.version if self.policy else None
            signature = await asyncio.to_thread(directory_signature, self.directory)
            try:
                policy = await asyncio.to_thread(load_policy, self.directory)
            except PolicyInvalid as exc:
                outcome = ReloadOutcome(trigger, False, previous or "", previous, tuple(exc.issues))
                self.files_issues = tuple(i for i in exc.issues if i.severity == "error")
                errors = [str(i) for i in self.files_issues]
                log.error("policy reload (%s) refused, still serving %s: %d error(s)\n%s",
                          trigger, previous or "nothing", len(errors), "\n".join(errors))
            else:
                self.policy, self.origin, self.files_issues = policy, "files", ()
                outcome = ReloadOutcome(trigger, True, policy.version, previous, policy.warnings)
                if outcome.changed:
                    log.info("policy %s loaded (%s), was %s", policy.version, trigger, previous or "none")
            self._signature = signature
        if self._on_outcome:
            self._on_outcome(outcome)
        return outcome

    async def restore(self, policy: Policy, origin: str) -> ReloadOutcome:
        """Serve `policy`, a copy of one served before (policy/lastgood.py), while the files are
        refused; the next reload that accepts the files replaces it."""
        async with self._lock:
            if self.policy is not None:
                raise RuntimeError("a policy is serving already")
            self.policy, self.origin = policy, origin
            outcome = ReloadOutcome("last-good", True, policy.version, None, self.files_issues)
        if self._on_outcome:
            self._on_outcome(outcome)
        return outcome

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the directory and reload when a file changes (cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            signature = await asyncio.to_thread(directory_signature, self.directory)
            if signature != self._signature:
                await self.reload("file")


def reload_on_sighup(holder: PolicyHolder) -> None:
    """SIGHUP reloads the policy (the classic operator gesture); call from the running loop."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def on_signal() -> None:
        task = loop.create_task(holder.reload("signal"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_signal)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (embedded, tests)
        log.info("SIGHUP policy reload unavailable here (not the main thread); file watch still works")
