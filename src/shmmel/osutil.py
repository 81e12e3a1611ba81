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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 8 << 20  # bytes: a buffer up to this size comes from the heap, reused


def keep_freed_memory(megabytes: int) -> bool:
    """Make this process's C heap keep up to ``megabytes`` of freed memory for reuse, and
    serve buffers of up to MMAP_THRESHOLD from it (glibc ``mallopt``: M_TRIM_THRESHOLD,
    M_MMAP_THRESHOLD); whether it was applied.

    Why: a request for a 10 s upload allocates and frees buffers of 100 KB to a few MB (a
    NumPy worker's STFT temporaries, an HTTP process's records and joined answer). glibc
    gives blocks that size fresh mappings (above its mmap threshold, 128 KiB at first) or
    trims them back off its heaps once freed, so each request faulted its pages in again: a
    NumPy worker took ~1,350 page faults a 10 s file, 1 with this (its CPU a file 8.0 ->
    4.7 ms on the 2-core machine), and on the GPU host the files rate rose from 0.75 to
    0.83-0.93 of the bare app's (docs/PERFORMANCE.md). Not applied with ``megabytes`` 0,
    without glibc, or when the environment sets MALLOC_TRIM_THRESHOLD_ or
    MALLOC_MMAP_THRESHOLD_ (the operator's choice stands)."""
    if megabytes <= 0 or any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                       "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        mallopt(M_TRIM_THRESHOLD, min(megabytes, 2047) << 20) == 1
