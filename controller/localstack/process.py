"""Starting the local components (Redis, Kamailio, SIPp, Asterisk) as child processes."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Linux only: the kernel signals the child when the thread that forked it exits, so a
    # test run killed with SIGKILL leaves no servers listening behind it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen in a new session (our Ctrl-C does not reach it; we stop it ourselves). From the
    main thread the child also dies with this process; from a worker thread it does not (the
    signal would fire when that thread ends, not when we do)."""
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def stop_group(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left of it after `grace_s` (the
    child's own children too), and reap the child."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
