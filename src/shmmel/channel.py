"""The request/response channel over an instance's slots.

Producer side (HTTP processes, benchmarks): claim a slot, write the payload straight into it,
submit it to a worker, wait on the slot's reply semaphore, read the reply in place, release.
Worker side (:class:`Inbox`): wait on the doorbell, take every slot submitted to this worker
(one wake-up can take many, which is what lets audio batch across streams), answer each.

Only the claim takes the instance lock (a kernel record lock, dropped if its holder dies).
Everything after is single-writer per slot state (see :mod:`shmmel.layout`).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import posix_ipc

from . import layout as L
from .errors import RequestTimeout, ServiceUnavailable, WorkerDied
from .shm import Shm

WAIT_SLICE = 0.05  # seconds between liveness checks while waiting for a reply


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Reply:
    status: int
    data: bytes
    r0: int = 0
    r1: int = 0
    f0: float = 0.0
    f1: float = 0.0


class Slot:
    """A claimed slot. Use as a context manager; ``release()`` is idempotent."""

    __slots__ = ("shm", "index", "rec", "buf", "seq", "worker", "gen", "_owned", "_pid")

    def __init__(self, shm: Shm, index: int, pid: int) -> None:
        self.shm, self.index, self._pid = shm, index, pid
        self.rec = shm.slots[index : index + 1]  # a 1-row view: field writes go to shared memory
        self.buf = shm.payload[index]            # uint8 view of the payload area
        self.seq = 0
        self.worker = -1
        self.gen = 0
        self._owned = True

    @property
    def capacity(self) -> int:
        return self.shm.slot_bytes

    def view(self, n: int | None = None) -> memoryview:
        """Writable memoryview of the payload area (first ``n`` bytes)."""
        off = self.index * self.shm.slot_bytes
        return self.shm.data_view[off : off + (self.shm.slot_bytes if n is None else n)]

    def submit(self, worker: int, gen: int, op: int, req_len: int, seq: int,
               args: tuple[int, ...] = (), stream: int = -1) -> None:
        r = self.rec
        a = tuple(args) + (0,) * (4 - len(args))
        r["op"], r["worker"], r["gen"], r["req_len"], r["stream"] = op, worker, gen, req_len, stream
        r["arg0"], r["arg1"], r["arg2"], r["arg3"] = a
        r["seq"], r["resp_seq"], r["resp_len"], r["status"] = seq, 0, 0, 0
        r["t_submit"] = time.monotonic()
        r["state"] = L.S_SUBMITTED  # publish last; the doorbell post is the barrier
        self.seq, self.worker, self.gen = seq, worker, gen
        self.shm.doorbells[worker].release()

    def wait(self, timeout: float) -> None:
        """Block until the worker answered this slot's current request.

        Raises WorkerDied (503) within about WAIT_SLICE after the supervisor reaps a dead
        worker, and RequestTimeout (504) after ``timeout``; in the second case the slot is
        orphaned, since the live worker may still write into it.
        """
        sem = self.shm.replies[self.index]
        rec = self.rec[0]
        w = self.shm.workers[self.worker]
        deadline = time.monotonic() + timeout
        while True:
            if rec["state"] == L.S_DONE and rec["resp_seq"] == self.seq:
                return
            now = time.monotonic()
            if w["gen"] != self.gen or w["state"] == L.W_DEAD:
                if rec["state"] == L.S_DONE and rec["resp_seq"] == self.seq:
                    return
                self.release()  # the worker is gone: nobody else writes this slot any more
                raise WorkerDied("the worker handling this request died")
            if now >= deadline:
                self.orphan()
                raise RequestTimeout(f"no answer from worker {self.worker} within {timeout:g} s")
            try:
                sem.acquire(min(WAIT_SLICE, deadline - now))
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass

    def reply(self, copy: bool = True) -> Reply:
        r = self.rec[0]
        n = int(r["resp_len"])
        data = bytes(self.view(n)) if copy else b""
        return Reply(int(r["status"]), data, int(r["r0"]), int(r["r1"]), float(r["f0"]),
                     float(r["f1"]))

    def timings(self) -> tuple[float, float, float]:
        r = self.rec[0]
        return float(r["t_submit"]), float(r["t_taken"]), float(r["t_done"])

    def release(self) -> None:
        if self._owned:
            self._owned = False
            self.rec["state"] = L.S_FREE

    def orphan(self) -> None:
        """Give the slot to the supervisor, which frees it once its worker is done with it."""
        if self._owned:
            self._owned = False
            self.rec["owner"] = 0

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Producer:
    """The HTTP side of the channel (one per process; thread safe)."""

    def __init__(self, shm: Shm, queue_depth: int) -> None:
        self.shm = shm
        self.queue_depth = queue_depth
        self.pid = os.getpid()
        self._counter = itertools.count(1)
        self._cursor = 0
        self._clock = threading.Lock()

    def next_seq(self) -> int:
        with self._clock:
            return ((self.pid & 0xFFFFFFFF) << 32) | (next(self._counter) & 0xFFFFFFFF)

    def claim(self) -> Slot:
        slots = self.shm.slots
        n = len(slots)
        with self.shm.lock():
            free = np.flatnonzero(slots["state"] == L.S_FREE)
            if free.size == 0:
                raise ServiceUnavailable("all shared-memory slots are busy")
            # rotate the start so slots wear evenly and recently freed ones cool down
            pos = int(np.searchsorted(free, self._cursor))
            j = int(free[pos % free.size])
            self._cursor = (j + 1) % n
            slots["owner"][j] = self.pid
            slots["state"][j] = L.S_CLAIMED
        sem = self.shm.replies[j]
        while True:  # drain a late post left by an abandoned request
            try:
                sem.acquire(0)
            except posix_ipc.BusyError:
                break
        return Slot(self.shm, j, self.pid)

    def queue_depths(self) -> np.ndarray:
        s = self.shm.slots
        st = s["state"]
        active = (st == L.S_SUBMITTED) | (st == L.S_TAKEN)
        return np.bincount(s["worker"][active], minlength=len(self.shm.workers))

    def pick_worker(self, kinds: Iterable[int] | None = None) -> tuple[int, int]:
        """The least loaded ready worker (of ``kinds``), as (index, generation)."""
        w = self.shm.workers
        ready = w["state"] == L.W_READY
        if kinds is not None:
            ready &= np.isin(w["kind"], list(kinds))
        idx = np.flatnonzero(ready)
        if idx.size == 0:
            raise ServiceUnavailable("no live worker")
        depth = self.queue_depths()[idx]
        best = int(np.argmin(depth))
        if depth[best] >= self.queue_depth:
            raise ServiceUnavailable("all worker queues are full")
        k = int(idx[best])
        return k, int(w["gen"][k])

    def call(self, op: int, payload: bytes, *, args: tuple[int, ...] = (), timeout: float,
             worker: tuple[int, int] | None = None, stream: int = -1) -> Reply:
        """One round trip: payload in, Reply out."""
        if len(payload) > self.shm.slot_bytes:
            raise ValueError("payload larger than a slot")
        k, gen = worker if worker is not None else self.pick_worker()
        with self.claim() as slot:
            slot.view(len(payload))[:] = payload
            slot.submit(k, gen, op, len(payload), self.next_seq(), args, stream)
            slot.wait(timeout)
            return slot.reply()


class Inbox:
    """The worker side of the channel."""

    def __init__(self, shm: Shm, index: int, gen: int) -> None:
        self.shm, self.index, self.gen = shm, index, gen
        self.doorbell = shm.doorbells[index]
        self._slots = shm.slots

    def wait(self, timeout: float) -> bool:
        try:
            self.doorbell.acquire(timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def pending(self) -> list[int]:
        """Slots submitted to this worker generation, oldest first; marks them TAKEN."""
        s = self._slots
        mine = np.flatnonzero((s["state"] == L.S_SUBMITTED) & (s["worker"] == self.index)
                              & (s["gen"] == self.gen))
        if mine.size == 0:
            return []
        if mine.size > 1:
            mine = mine[np.argsort(s["t_submit"][mine], kind="stable")]
        now = time.monotonic()
        s["t_taken"][mine] = now
        s["state"][mine] = L.S_TAKEN
        return mine.tolist()

    def answer(self, j: int, status: int, resp_len: int, r0: int = 0, r1: int = 0,
               f0: float = 0.0, f1: float = 0.0) -> None:
        rec = self._slots[j : j + 1]
        rec["status"], rec["resp_len"] = status, resp_len
        rec["r0"], rec["r1"], rec["f0"], rec["f1"] = r0, r1, f0, f1
        rec["resp_seq"] = rec["seq"]
        rec["t_done"] = time.monotonic()
        rec["state"] = L.S_DONE
        self.shm.replies[j].release()
