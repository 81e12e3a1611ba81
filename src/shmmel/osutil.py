"""Small operating-system helpers shared by the supervisor, workers, HTTP side and CLI."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import struct
import termios
from typing import Any


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


def unread_bytes(sock: Any) -> int:
    """Bytes received by the kernel on ``sock`` and not read yet (FIONREAD); 0 where that
    cannot be asked (a closed socket's fileno is -1: ValueError)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0
