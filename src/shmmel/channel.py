"""The request/response channel over an instance's slots.

Producer side (HTTP processes, benchmarks): claim a slot, write the payload straight into it,
submit it to a worker, wait on the slot's reply semaphore, read the reply in place, release.
Worker side (:class:`Inbox`): wait on the doorbell, take every slot submitted to this worker
(one wake-up can take many, which is what lets audio batch across streams), answer each.

Only a claim from the shared pool takes the instance lock (a kernel record lock, dropped if
its holder dies); a process keeps the slots it released in a small local pool, so the common
claim is a list pop. Everything else is single-writer per slot state (see
:mod:`shmmel.layout`). Hot paths read and write slot headers with precompiled ``struct``
codecs on the mapping, which is several times faster than numpy field access per request.
"""

from __future__ import annotations

import itertools
import os
import struct
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

_SO = {name: L.SLOT.fields[name][1] for name in L.SLOT.names}
_WO = {name: L.WORKER.fields[name][1] for name in L.WORKER.names}
# op, worker, gen, seq, resp_seq | req_len, resp_len, status, stream, arg0..arg3
_REQ_A = struct.Struct("<IIIQQ")
_REQ_B = struct.Struct("<IIIiqqqq")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_LEN_STATUS = struct.Struct("<II")        # resp_len, status
_RESULTS = struct.Struct("<qqdd")         # r0, r1, f0, f1
_W_STATE_GEN = struct.Struct("<II")       # worker state, gen
assert _SO["op"] + _REQ_A.size == _SO["owner"] and _SO["resp_seq"] == _SO["seq"] + 8
assert _SO["req_len"] + _REQ_B.size == _SO["r0"]
assert _SO["status"] == _SO["resp_len"] + 4 and _SO["f1"] == _SO["r0"] + 24
assert _WO["gen"] == _WO["state"] + 4


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
    # time.monotonic() stamps: submitted, taken by the worker, answered, reply read
    times: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def server_timing(self) -> str:
        """A Server-Timing header value: queue wait, worker compute, whole IPC round trip."""
        sub, taken, done, read = self.times
        return (f"queue;dur={(taken - sub) * 1e3:.3f}, worker;dur={(done - taken) * 1e3:.3f}, "
                f"ipc;dur={(read - sub) * 1e3:.3f}")


class Slot:
    """A claimed slot. Use as a context manager; ``release()`` is idempotent."""

    __slots__ = ("producer", "shm", "index", "off", "buf", "seq", "worker", "gen", "_owned")

    def __init__(self, producer: Producer, index: int) -> None:
        self.producer, self.shm, self.index = producer, producer.shm, index
        self.off = producer.slots_off + index * L.SLOT.itemsize
        self.buf = self.shm.payload[index]  # uint8 view of the payload area
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

    @property
    def owned(self) -> bool:
        """False once released or orphaned: the slot must not be written any more."""
        return self._owned

    def submit(self, worker: int, gen: int, op: int, req_len: int, seq: int,
               args: tuple[int, ...] = (), stream: int = -1) -> None:
        if not self._owned:
            raise ServiceUnavailable("this request's slot was given up after a timeout")
        ctl, off = self.shm.ctl_view, self.off
        a = tuple(args) + (0,) * (4 - len(args))
        _REQ_A.pack_into(ctl, off + _SO["op"], op, worker, gen, seq, 0)
        _REQ_B.pack_into(ctl, off + _SO["req_len"], req_len, 0, 0, stream, *a)
        _F64.pack_into(ctl, off + _SO["t_submit"], time.monotonic())
        _U32.pack_into(ctl, off, L.S_SUBMITTED | worker)  # publish last; the post is a barrier
        self.seq, self.worker, self.gen = seq, worker, gen
        self.shm.doorbells[worker].release()

    def _answered(self) -> bool:
        ctl, off = self.shm.ctl_view, self.off
        return (_U32.unpack_from(ctl, off)[0] == L.S_DONE
                and _U64.unpack_from(ctl, off + _SO["resp_seq"])[0] == self.seq)

    def wait(self, timeout: float) -> None:
        """Block until the worker answered this slot's current request.

        Raises WorkerDied (503) within about WAIT_SLICE after the supervisor reaps a dead
        worker, and RequestTimeout (504) after ``timeout``; in the second case the slot is
        orphaned, since the live worker may still write into it.
        """
        sem = self.shm.replies[self.index]
        ctl = self.shm.ctl_view
        w_off = self.producer.workers_off + self.worker * L.WORKER.itemsize + _WO["state"]
        deadline = time.monotonic() + timeout
        while True:
            try:
                sem.acquire(WAIT_SLICE)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass
            if self._answered():
                return
            state, gen = _W_STATE_GEN.unpack_from(ctl, w_off)
            if gen != self.gen or state == L.W_DEAD:
                if self._answered():
                    return
                # the worker is gone, so nobody else writes this slot: it stays ours, for
                # the caller to reuse or release
                raise WorkerDied("the worker handling this request died")
            if time.monotonic() >= deadline:
                self.orphan()
                raise RequestTimeout(f"no answer from worker {self.worker} within {timeout:g} s")

    def reply(self, copy: bool = True) -> Reply:
        ctl, off = self.shm.ctl_view, self.off
        n, status = _LEN_STATUS.unpack_from(ctl, off + _SO["resp_len"])
        r0, r1, f0, f1 = _RESULTS.unpack_from(ctl, off + _SO["r0"])
        times = (*self.timings(), time.monotonic())
        return Reply(status, bytes(self.view(n)) if copy else b"", r0, r1, f0, f1, times)

    def timings(self) -> tuple[float, float, float]:
        """(submitted, taken, done) as time.monotonic() stamps."""
        ctl, off = self.shm.ctl_view, self.off
        return tuple(_F64.unpack_from(ctl, off + _SO[k])[0]  # type: ignore[return-value]
                     for k in ("t_submit", "t_taken", "t_done"))

    def release(self) -> None:
        if self._owned:
            self._owned = False
            self.producer._give_back(self.index)

    def orphan(self) -> None:
        """Give the slot to the supervisor, which frees it once its worker is done with it."""
        if self._owned:
            self._owned = False
            _I64.pack_into(self.shm.ctl_view, self.off + _SO["owner"], 0)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Producer:
    """The HTTP side of the channel (one per process; thread safe)."""

    CLAIM_BATCH = 4
    DEPTH_TTL = 0.001  # seconds

    def __init__(self, shm: Shm, queue_depth: int, pool_max: int = 4) -> None:
        self.shm = shm
        self.queue_depth = queue_depth
        self.pool_max = pool_max
        self.pid = os.getpid()
        self.slots_off = shm.layout.slots_off
        self.workers_off = shm.layout.workers_off
        self._states = shm.slots["state"]
        self._counter = itertools.count(1)
        self._pool: list[int] = []
        self._plock = threading.Lock()
        self._rr = 0
        self._depths = np.zeros(len(shm.workers), np.int64)
        self._depths_at = -1.0

    def next_seq(self) -> int:
        # itertools.count is atomic under the GIL; pid in the high half makes it unique
        return ((self.pid & 0xFFFFFFFF) << 32) | (next(self._counter) & 0xFFFFFFFF)

    def claim(self) -> Slot:
        with self._plock:
            if self._pool:
                j = self._pool.pop()
                _U32.pack_into(self.shm.ctl_view, self.slots_off + j * L.SLOT.itemsize,
                               L.S_CLAIMED)
            else:
                j = self._claim_shared()
        return Slot(self, j)

    def _claim_shared(self) -> int:
        slots = self.shm.slots
        with self.shm.lock():
            free = np.flatnonzero(self._states == L.S_FREE)[: self.CLAIM_BATCH]
            if free.size == 0:
                raise ServiceUnavailable("all shared-memory slots are busy")
            slots["owner"][free] = self.pid
            self._states[free[:1]] = L.S_CLAIMED
            self._states[free[1:]] = L.S_PARKED
        for j in free.tolist():  # drain a late post left by an abandoned request
            sem = self.shm.replies[j]
            while True:
                try:
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    break
        self._pool.extend(free[1:].tolist())
        return int(free[0])

    def _give_back(self, j: int) -> None:
        off = self.slots_off + j * L.SLOT.itemsize
        with self._plock:
            if len(self._pool) < self.pool_max:
                _U32.pack_into(self.shm.ctl_view, off, L.S_PARKED)
                self._pool.append(j)
                return
        _U32.pack_into(self.shm.ctl_view, off, L.S_FREE)

    def queue_depths(self) -> np.ndarray:
        return L.queue_depths(self._states, len(self.shm.workers))

    def _cached_depths(self, fresh: bool = False) -> np.ndarray:
        """Queue depths, recomputed at most every DEPTH_TTL seconds unless ``fresh``."""
        now = time.monotonic()
        if fresh or now - self._depths_at > self.DEPTH_TTL:
            self._depths, self._depths_at = self.queue_depths(), now
        return self._depths

    def ready_workers(self, kinds: Iterable[int] | None = None) -> list[tuple[int, int]]:
        """(index, generation) of every ready worker (of ``kinds``)."""
        ctl, off, size = self.shm.ctl_view, self.workers_off, L.WORKER.itemsize
        kind_set = None if kinds is None else set(kinds)
        out = []
        for k in range(len(self.shm.workers)):
            base = off + k * size
            state, gen = _W_STATE_GEN.unpack_from(ctl, base + _WO["state"])
            if state == L.W_READY and (
                    kind_set is None or _U32.unpack_from(ctl, base + _WO["kind"])[0] in kind_set):
                out.append((k, gen))
        return out

    def pick_worker(self, kinds: Iterable[int] | None = None) -> tuple[int, int]:
        """A ready worker (of ``kinds``) for one request, as (index, generation).

        Round robin over ready workers, skipping any whose queue holds ``queue_depth``
        requests (depths are cached for DEPTH_TTL: one bincount per millisecond instead of one
        per request). Raises ServiceUnavailable when no worker is ready or all are full.
        """
        ready = self.ready_workers(kinds)
        if not ready:
            raise ServiceUnavailable("no live worker")
        self._rr += 1
        first = self._rr % len(ready)
        for fresh in (False, True):
            depths = self._cached_depths(fresh)
            for i in range(len(ready)):
                k, gen = ready[(first + i) % len(ready)]
                if depths[k] < self.queue_depth:
                    return k, gen
        raise ServiceUnavailable("all worker queues are full")

    def least_loaded(self, kinds: Iterable[int] | None = None) -> tuple[int, int]:
        """The ready worker (of ``kinds``) holding the fewest audio streams, ties by queue."""
        ready = self.ready_workers(kinds)
        if not ready:
            raise ServiceUnavailable("no live worker")
        depths = self._cached_depths(fresh=True)
        streams = self.shm.workers["streams"]
        k, gen = min(ready, key=lambda kg: (int(streams[kg[0]]), int(depths[kg[0]])))
        if depths[k] >= self.queue_depth:
            raise ServiceUnavailable("all worker queues are full")
        return k, gen

    def call(self, op: int, payload: bytes, *, args: tuple[int, ...] = (), timeout: float,
             worker: tuple[int, int] | None = None, stream: int = -1,
             kinds: Iterable[int] | None = None) -> Reply:
        """One round trip: payload in, Reply out, on ``worker`` or a ready worker of ``kinds``
        (None: any; text and mel audio pass ``layout.MEL_KINDS``)."""
        if len(payload) > self.shm.slot_bytes:
            raise ValueError("payload larger than a slot")
        k, gen = worker if worker is not None else self.pick_worker(kinds)
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
        self._states = shm.slots["state"]
        self._submitted = L.S_SUBMITTED | index
        self._taken = L.S_TAKEN | index
        self._slots_off = shm.layout.slots_off

    def wait(self, timeout: float) -> bool:
        try:
            self.doorbell.acquire(timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def has_pending(self) -> bool:
        return bool((self._states == self._submitted).any())

    def pending(self) -> list[int]:
        """Slots submitted to this worker generation, oldest first; marks them TAKEN."""
        mine = np.flatnonzero(self._states == self._submitted)
        if mine.size == 0:
            return []
        ctl, size = self.shm.ctl_view, L.SLOT.itemsize
        now = time.monotonic()
        out = []
        for j in mine.tolist():
            off = self._slots_off + j * size
            if _U32.unpack_from(ctl, off + _SO["gen"])[0] != self.gen:
                continue  # queued on a dead generation; its producer frees it
            _F64.pack_into(ctl, off + _SO["t_taken"], now)
            _U32.pack_into(ctl, off, self._taken)
            out.append(j)
        if len(out) > 1:
            ts = self.shm.slots["t_submit"]
            out.sort(key=lambda j: ts[j])
        return out

    def request(self, j: int) -> tuple[int, int, int, int, int, int, int]:
        """(op, req_len, stream, arg0, arg1, arg2, arg3) of slot ``j``."""
        ctl, off = self.shm.ctl_view, self._slots_off + j * L.SLOT.itemsize
        op = _U32.unpack_from(ctl, off + _SO["op"])[0]
        req_len, _, _, stream, a0, a1, a2, a3 = _REQ_B.unpack_from(ctl, off + _SO["req_len"])
        return op, req_len, stream, a0, a1, a2, a3

    def answer(self, j: int, status: int, resp_len: int, r0: int = 0, r1: int = 0,
               f0: float = 0.0, f1: float = 0.0) -> None:
        ctl = self.shm.ctl_view
        off = self._slots_off + j * L.SLOT.itemsize
        _LEN_STATUS.pack_into(ctl, off + _SO["resp_len"], resp_len, status)
        _RESULTS.pack_into(ctl, off + _SO["r0"], r0, r1, f0, f1)
        _U64.pack_into(ctl, off + _SO["resp_seq"], _U64.unpack_from(ctl, off + _SO["seq"])[0])
        _F64.pack_into(ctl, off + _SO["t_done"], time.monotonic())
        _U32.pack_into(ctl, off, L.S_DONE)
        self.shm.replies[j].release()
