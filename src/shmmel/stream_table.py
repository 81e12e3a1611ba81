"""The shared stream table (``layout.STREAM`` rows): the one writer of its entries.

A session stream (``POST /audio/streams``) or a transcription job (on a whisper worker) is
pinned to the worker that holds its state (an upload's mel stream is kept by its worker under
the upload's slot instead, see :mod:`shmmel.audio_calls`); its entry carries that worker's
generation, so a dead worker's entries are seen stale. No operation on the request path
takes a cross-process lock:

* **open** (:meth:`StreamTable.allocate`): the entries are partitioned by producer row
  (``layout.stream_partition``) like the slots, and only the partition's process takes its
  FREE (or stale) entries, under a thread lock held across no syscall (from the choice
  of worker to the publish, so a process's concurrent opens see each other's). The entry is
  reserved first and the open streams counted after (publish, then check), so opens racing in
  several processes at the limit are refused rather than admitted past it.
* **lookup** (:meth:`StreamTable.find`): any process reads the entry (state, token, worker
  and its generation) and writes its idle clock, one aligned store. The stream id's token
  carries the entry's use count (``layout.stream_token``), so a reused entry never reads as
  the old stream; the worker checks the token of every request once more.
* **one request at a time**: the worker that holds a stream serves it, one request at a
  time (a lease per request, see ``MelJobs``), and answers ``R_BUSY`` (409) to a second one.
* **close**: the worker frees the entry when it drops the stream (finished, closed, idle).

The supervisor frees, under the instance lock (a rare event, shared with ``claim_row``), the
reserved and stale entries of partitions whose process died; a live process reuses its own
stale entries. Every shared word is written with one aligned store (numpy item assignment).
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import layout as L
from .errors import ServiceUnavailable, StreamBusy, StreamLost, UnknownStream
from .osutil import pid_alive
from .shm import Shm

__all__ = ["Handle", "StreamBusy", "StreamLost", "StreamTable", "UnknownStream"]


@dataclass
class Handle:
    index: int
    token: int
    worker: int
    gen: int
    n_mels: int
    held: bool = False  # allocated by this handle: its process marks the entry busy
    # an upload's stream (layout.PUSH_SLOT): no table entry (index -1), kept by its worker
    # under the upload's slot; its padding here, and whether its first push has gone
    slot_keyed: bool = False
    padding: int = 0
    opened: bool = True

    @property
    def stream_id(self) -> str:
        return f"{self.index}-{self.token:016x}"


# choose(table) -> (worker, generation), called under the process's table lock before the
# entry is taken: the process's own earlier opens are counted, opens racing in other
# processes may place their streams without seeing each other's
Chooser = Callable[[np.ndarray], tuple[int, int]]


def _counts(t: np.ndarray, workers: np.ndarray) -> tuple[np.ndarray, int]:
    """(indexes of the open entries whose worker still runs the generation that holds
    them, how many entries are reserved): one pass over the state column."""
    used = np.flatnonzero(t["state"])  # ST_FREE is 0
    states = t["state"][used]
    idx = used[states == L.ST_OPEN]
    wk = t["worker"][idx].astype(np.int64)
    ok = wk < len(workers)
    idx, wk = idx[ok], wk[ok]
    return idx[t["gen"][idx] == workers["gen"][wk]], int((states == L.ST_RESERVED).sum())


def live_mask(t: np.ndarray, workers: np.ndarray) -> np.ndarray:
    """Open entries whose worker still runs the generation that holds them."""
    live = np.zeros(len(t), bool)
    live[_counts(t, workers)[0]] = True
    return live


class StreamTable:
    """One process's view of the table; ``row`` (its producer row) lets it open streams."""

    def __init__(self, shm: Shm, row: int | None = None) -> None:
        self.shm = shm
        self.t = shm.streams
        self.limit = int(shm.header["max_streams"])
        self.part = (None if row is None
                     else L.stream_partition(row, len(self.t), shm.partitions))
        self._idle: collections.deque[int] = collections.deque()  # candidates, this partition
        # Word indexes for find and release, on every request of a session (through the
        # shared segment's typed views, like the channel's slot words): a structured field
        # view (t["state"]) is made anew on each access, and find made nine of them
        # (py-spy on the GPU host: find and release held the GIL ~19 us a chunk)
        lay, f = shm.layout, L.STREAM.fields
        assert lay.streams_off % 8 == 0 and L.STREAM.itemsize % 8 == 0
        self._u32, self._u64, self._i64, self._f64 = shm.u32, shm.u64, shm.i64, shm.f64
        self._w4, self._w8 = lay.streams_off >> 2, lay.streams_off >> 3  # entry 0's words
        self._n4, self._n8 = L.STREAM.itemsize >> 2, L.STREAM.itemsize >> 3  # per entry
        self._state4, self._worker4, self._gen4, self._mels4 = (
            f[n][1] >> 2 for n in ("state", "worker", "gen", "n_mels"))
        self._token8, self._last8, self._busy8 = (
            f[n][1] >> 3 for n in ("token", "last_used", "busy"))
        self._wgen4 = (lay.workers_off + L.WORKER.fields["gen"][1]) >> 2  # worker 0's gen
        self._wn4 = L.WORKER.itemsize >> 2
        self._n_workers = lay.n_workers
        self._lock = threading.Lock()  # this process's takes: numpy and stores, no syscall
        if self.part is not None:  # a dead predecessor's reservations (the row is ours now)
            s = self.t[self.part.start : self.part.stop]
            for j in np.flatnonzero(s["state"] == L.ST_RESERVED).tolist():
                s["state"][j] = L.ST_FREE

    def __len__(self) -> int:
        return len(self.t)

    # -- HTTP side ------------------------------------------------------------------------
    def in_use(self) -> int:
        """Entries counted against max_streams: reserved ones and live open ones."""
        live, reserved = _counts(self.t, self.shm.workers)
        return len(live) + reserved

    def over_limit(self) -> bool:
        """Whether more entries are in use than max_streams allows. The entries not FREE
        bound that from above (one cheap pass); only past the limit are a dead worker's
        stale entries told apart (the exact count)."""
        return (np.count_nonzero(self.t["state"]) > self.limit
                and self.in_use() > self.limit)

    def _take(self) -> int:
        """A FREE or stale entry of this partition, now RESERVED (under ``_lock``)."""
        t = self.t
        while True:
            try:
                i = self._idle.pop()
            except IndexError:
                part = self.part
                assert part is not None, "a StreamTable without a producer row cannot open"
                s = t[part.start : part.stop]
                stale = (s["state"] == L.ST_OPEN) & ~live_mask(s, self.shm.workers)
                free = np.flatnonzero((s["state"] == L.ST_FREE) | stale) + part.start
                if free.size == 0:
                    raise ServiceUnavailable(
                        f"too many open streams: this HTTP process holds its maximum of "
                        f"{len(part)} (max_streams {self.limit} in all)") from None
                self._idle.extend(free[::-1].tolist())  # lowest first
                continue
            state = int(t["state"][i])
            if state == L.ST_FREE or (state == L.ST_OPEN and not self._live(i)):
                t["state"][i] = L.ST_RESERVED
                return i

    def _live(self, i: int) -> bool:
        k = int(self.t["worker"][i])
        w = self.shm.workers
        return k < len(w) and int(w["gen"][k]) == int(self.t["gen"][i])

    def allocate(self, n_mels: int, padding: int, choose: Chooser, pid: int) -> Handle:
        """A free entry of this process's partition for the worker ``choose`` picks, busy
        with process ``pid``; 503 past max_streams (or when the partition is full). The
        worker frees it when it drops the state."""
        t = self.t
        rand = secrets.randbits(L.TOKEN_RANDOM_BITS)  # getrandom, a syscall: before the lock
        # This process's opens go one at a time from the choice to the publish (numpy and
        # stores, no syscall), so each one's choice counts the streams the ones before it
        # placed: without it, threads opening at once picked the same least-loaded worker.
        with self._lock:
            k, gen = choose(t)
            i = self._take()
            if self.over_limit():  # ours is counted: racing opens refuse each other
                t["state"][i] = L.ST_FREE
                self._idle.append(i)
                raise ServiceUnavailable(f"too many open streams (max {self.limit})")
            token = L.stream_token(int(t["token"][i]), rand)
            # the token first: a reader that sees the old token after reading the other
            # fields read the old stream's fields (see find)
            t["token"][i] = token
            t["worker"][i], t["gen"][i], t["n_mels"][i] = k, gen, n_mels
            t["last_used"][i], t["frames"][i], t["samples"][i] = time.monotonic(), 0, 0
            t["busy"][i], t["padding"][i] = pid, padding
            t["state"][i] = L.ST_OPEN  # publish last
        return Handle(i, token, k, gen, n_mels, held=True)

    def find(self, stream_id: str, idle_timeout: float) -> Handle:
        """Look up a session stream from any process: one read of its entry (404 if there is
        no such open stream, 503 if its worker restarted). Restarts its idle clock; whether
        another request is using it is the worker's to say (409)."""
        try:
            a, b = stream_id.split("-", 1)
            i, token = int(a), int(b, 16)
        except ValueError:
            raise UnknownStream(f"no stream {stream_id!r}") from None
        if not 0 <= i < len(self.t):
            raise UnknownStream(f"no stream {stream_id!r}")
        u32, u64 = self._u32, self._u64
        e4, e8 = self._w4 + i * self._n4, self._w8 + i * self._n8
        state, tok = u32[e4 + self._state4], u64[e8 + self._token8]
        k, gen, n_mels = u32[e4 + self._worker4], u32[e4 + self._gen4], u32[e4 + self._mels4]
        # read again: the fields above belong to this token's stream if it is still there
        if (state != L.ST_OPEN or tok != token or u64[e8 + self._token8] != token
                or u32[e4 + self._state4] != L.ST_OPEN):
            raise UnknownStream(f"no stream {stream_id!r} (never opened, expired after "
                                f"{idle_timeout:g} s idle, or closed)")
        if k >= self._n_workers or u32[self._wgen4 + k * self._wn4] != gen:
            raise StreamLost("the worker holding this stream restarted; open a new stream")
        self._f64[e8 + self._last8] = time.monotonic()  # one aligned store
        return Handle(i, token, k, gen, n_mels)

    def release(self, h: Handle) -> None:
        """Done with it for now (the idle clock restarts; an entry this handle allocated is
        not busy any more); a no-op once the entry is reused."""
        e8 = self._w8 + h.index * self._n8
        if self._u64[e8 + self._token8] == h.token:
            self._f64[e8 + self._last8] = time.monotonic()
            if h.held:
                self._i64[e8 + self._busy8] = 0
                h.held = False

    def padding(self, i: int) -> int:
        return int(self.t["padding"][i])

    def counts(self, i: int) -> tuple[int, int]:
        """(frames, samples) of entry ``i`` so far."""
        return int(self.t["frames"][i]), int(self.t["samples"][i])

    # -- worker side ----------------------------------------------------------------------
    def token(self, i: int) -> int:
        return int(self.t["token"][i])

    def account(self, i: int, frames: int, samples: int) -> None:
        t = self.t  # the holding worker alone writes these words
        t["frames"][i] = int(t["frames"][i]) + frames
        t["samples"][i] = int(t["samples"][i]) + samples

    def idle(self, i: int, now: float, limit: float) -> bool:
        """Unused for ``limit`` seconds: not busy (or busy with a dead process)."""
        busy = int(self.t["busy"][i])
        return (busy == 0 or not pid_alive(busy)) and now - float(self.t["last_used"][i]) > limit

    # -- anyone ---------------------------------------------------------------------------
    def free(self, i: int, token: int | None = None) -> None:
        """The entry is free again (its state was dropped, or never made). With ``token``,
        only while the entry still holds that stream: once it was freed and reused, the
        old stream's holder must not free the new one's (check, then store: safe, because
        only a FREE entry is ever taken again)."""
        if token is None or int(self.t["token"][i]) == token:
            self.t["state"][i] = L.ST_FREE

    def open_count(self) -> int:
        """Open streams on live workers (what max_streams limits, less reservations)."""
        return len(_counts(self.t, self.shm.workers)[0])

    # -- supervisor -----------------------------------------------------------------------
    def sweep(self) -> int:
        """Free the reserved and stale entries of partitions whose process is gone (a live
        process reuses its own stale entries); how many. Under the instance lock, which
        ``claim_row`` takes to give a row to a new process: the two never meet."""
        t, h, shm = self.t, self.shm.http, self.shm
        n = 0
        with shm.lock():
            for r in range(shm.partitions):
                pid = int(h["pid"][r])
                if pid and pid_alive(pid):
                    continue
                part = L.stream_partition(r, len(t), shm.partitions)
                s = t[part.start : part.stop]
                gone = (s["state"] == L.ST_RESERVED) | (
                    (s["state"] == L.ST_OPEN) & ~live_mask(s, shm.workers))
                for j in np.flatnonzero(gone).tolist():
                    s["state"][j] = L.ST_FREE
                    n += 1
        return n
