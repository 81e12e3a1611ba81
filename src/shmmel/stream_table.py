"""The shared stream table (``layout.STREAM`` rows): the one writer of its entries.

A stream (a session stream, a full-duplex ``/audio/stream`` upload, a transcription job) is
pinned to the worker that holds its state; its entry carries that worker's generation, so a
dead worker's entries are seen stale and swept. HTTP processes allocate, find, release and
free entries; workers account frames and free the entries of the states they drop; the
supervisor sweeps stale ones. All of them go through :class:`StreamTable`: nothing else
writes an entry. Allocation and lookup take the instance lock (a stream's open, and a
session chunk's lookup, where the busy mark must be tested and set at once); the per-chunk
pushes themselves take none.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layout as L
from .errors import ServiceUnavailable, StreamBusy, StreamLost, UnknownStream
from .osutil import pid_alive
from .shm import Shm

__all__ = ["Handle", "StreamTable", "StreamBusy", "StreamLost", "UnknownStream"]


@dataclass
class Handle:
    index: int
    token: int
    worker: int
    gen: int
    n_mels: int

    @property
    def stream_id(self) -> str:
        return f"{self.index}-{self.token:016x}"


# choose(table) -> (worker, generation): called under the table's lock, so opens racing in
# other threads and processes see each other's entries when they place a stream
Chooser = Callable[[np.ndarray], tuple[int, int]]


class StreamTable:
    def __init__(self, shm: Shm) -> None:
        self.shm = shm
        self.t = shm.streams

    def __len__(self) -> int:
        return len(self.t)

    # -- HTTP side ------------------------------------------------------------------------
    def allocate(self, n_mels: int, padding: int, choose: Chooser, pid: int) -> Handle:
        """A free entry for the worker ``choose`` picks, busy with process ``pid``; 503 when
        the table is full. The worker frees it when it drops the state."""
        t = self.t
        with self.shm.lock():
            free = np.flatnonzero(t["state"] == L.ST_FREE)
            if free.size == 0:
                raise ServiceUnavailable(f"too many open streams (max {len(t)})")
            k, gen = choose(t)
            i = int(free[0])
            token = secrets.randbits(63) | 1
            e = t[i : i + 1]
            e["worker"], e["gen"], e["n_mels"], e["token"] = k, gen, n_mels, token
            e["last_used"], e["frames"], e["samples"], e["busy"] = time.monotonic(), 0, 0, pid
            e["padding"] = padding
            e["state"] = L.ST_OPEN
        return Handle(i, token, k, gen, n_mels)

    def find(self, stream_id: str, pid: int, idle_timeout: float) -> Handle:
        """Look up a session stream and mark it busy with ``pid`` (409 if another request
        holds it, 503 if its worker restarted, 404 if there is no such open stream)."""
        try:
            a, b = stream_id.split("-", 1)
            i, token = int(a), int(b, 16)
        except ValueError:
            raise UnknownStream(f"no stream {stream_id!r}") from None
        t, w = self.t, self.shm.workers
        if not 0 <= i < len(t):
            raise UnknownStream(f"no stream {stream_id!r}")
        with self.shm.lock():
            e = t[i]
            if e["state"] != L.ST_OPEN or int(e["token"]) != token:
                raise UnknownStream(f"no stream {stream_id!r} (never opened, expired after "
                                    f"{idle_timeout:g} s idle, or closed)")
            k, gen = int(e["worker"]), int(e["gen"])
            if int(w["gen"][k]) != gen:
                raise StreamLost("the worker holding this stream restarted; open a new stream")
            busy = int(e["busy"])
            if busy == pid or (busy and pid_alive(busy)):
                raise StreamBusy("another request is using this stream")
            t["busy"][i] = pid
        return Handle(i, token, k, gen, int(e["n_mels"]))

    def release(self, h: Handle) -> None:
        """Not busy any more (the idle clock restarts); a no-op once the entry is reused."""
        t = self.t
        if int(t["token"][h.index]) == h.token:
            t["last_used"][h.index] = time.monotonic()
            t["busy"][h.index] = 0

    def padding(self, i: int) -> int:
        return int(self.t["padding"][i])

    def counts(self, i: int) -> tuple[int, int]:
        """(frames, samples) of entry ``i`` so far."""
        return int(self.t["frames"][i]), int(self.t["samples"][i])

    # -- worker side ----------------------------------------------------------------------
    def token(self, i: int) -> int:
        return int(self.t["token"][i])

    def account(self, i: int, frames: int, samples: int) -> None:
        e = self.t[i : i + 1]
        e["frames"] += frames
        e["samples"] += samples

    def idle(self, i: int, now: float, limit: float) -> bool:
        """Unused for ``limit`` seconds: not busy (or busy with a dead process)."""
        busy = int(self.t["busy"][i])
        return (busy == 0 or not pid_alive(busy)) and now - float(self.t["last_used"][i]) > limit

    # -- anyone ---------------------------------------------------------------------------
    def free(self, i: int) -> None:
        """The entry is free again (its state was dropped, or never made)."""
        self.t["state"][i] = L.ST_FREE

    def open_count(self) -> int:
        return int((self.t["state"] != L.ST_FREE).sum())

    # -- supervisor -----------------------------------------------------------------------
    def sweep(self) -> int:
        """Free the entries whose worker died (its generation moved on); how many."""
        t, w = self.t, self.shm.workers
        n = 0
        for i in np.flatnonzero(t["state"] != L.ST_FREE).tolist():
            k = int(t["worker"][i])
            if k >= len(w) or int(w["gen"][k]) != int(t["gen"][i]):
                t["state"][i] = L.ST_FREE
                n += 1
        return n
