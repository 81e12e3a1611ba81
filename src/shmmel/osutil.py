"""Small operating-system helpers shared by the supervisor, workers, HTTP side and CLI."""

from __future__ import annotations

import ctypes
import os
import signal


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when the parent (the supervisor) dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the getppid() check in the loop remains
        pass
