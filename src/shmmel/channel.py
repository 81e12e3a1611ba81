"""The request/response channel over an instance's slots.

Producer side (HTTP processes, benchmarks): claim a slot, write the payload straight into it,
submit it to a worker, wait on the slot's reply semaphore, read the reply in place, release.
The worker side is :class:`shmmel.inbox.Inbox`; the choice of worker is
:class:`shmmel.routing.Routing`, the producer's base class.

Each producer process owns a partition of the slots (its row of the HTTP table), so a claim
is a deque pop and a release a deque append: no lock, Python's or the kernel's, on the
request path. Everything else is single-writer per slot state (see :mod:`shmmel.layout`).
Hot paths read slot headers with precompiled ``struct`` codecs on the mapping (several
times faster than numpy field access per request) and write them with single aligned stores.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import posix_ipc

from . import layout as L
from .config import SPARE_CORES_MIN, host_cores
from .osutil import pid_alive
from .errors import RequestTimeout, ServiceUnavailable, WorkerDied, WorkerStalled
from .routing import Routing
from .shm import Shm

WAIT_SLICE = 0.05  # seconds between liveness checks while waiting for a reply
# A producer alone in flight in its process, on a host with cores to spare (spare_cores),
# polls the slot this long for the reply before sleeping on the reply semaphore: a short
# request's reply usually comes within tens of microseconds, even behind a few others, and
# a futex sleep and wake-up costs as much again (more from an idle core); and the worker's
# post to a producer that is not asleep is no syscall, which shortens every request behind
# it. The poll holds the GIL, so it only runs when no other request of this process awaits
# a reply (see Slot.wait), and lasts at most this much.
REPLY_SPIN = 50e-6

# the codecs and word indexes live beside the dtypes, in layout (reads only: see there)
_SO, _WO = L.SLOT_OFF, L.WORKER_OFF
_W_STATE_GEN = L.W_STATE_GEN
I4, I8 = L.SLOT_W4, L.SLOT_W8
_ST, _OP, _WK, _GEN = I4["state"], I4["op"], I4["worker"], I4["gen"]
_REQLEN, _STREAM = I4["req_len"], I4["stream"]
_SEQ, _RSEQ, _OWNER, _ARG0 = I8["seq"], I8["resp_seq"], I8["owner"], I8["arg0"]
_R0, _R1, _F0, _F1, _TSUB = I8["r0"], I8["r1"], I8["f0"], I8["f1"], I8["t_submit"]
# a whole reply in one read: resp_len, status, (stream and args skipped), r0, r1, f0, f1 and
# the three time stamps
_REPLY = struct.Struct(f"<II{_SO['r0'] - _SO['resp_len'] - 8}xqqddddd")
assert _SO["status"] == _SO["resp_len"] + 4 and _SO["r0"] + 32 == _SO["t_submit"]
assert _SO["resp_len"] + _REPLY.size == _SO["t_done"] + 8  # r0 .. t_done contiguous
_SIZE = L.SLOT.itemsize
_SO_RESP_LEN = _SO["resp_len"]
_S_DONE, _S_CLAIMED, _S_PARKED, _S_SUBMITTED = L.S_DONE, L.S_CLAIMED, L.S_PARKED, L.S_SUBMITTED
_ARGS0 = (0, 0, 0, 0)
_tuple_new = tuple.__new__  # builds a Reply without the named tuple's Python __new__
_monotonic = time.monotonic


_spare = [False, 0.0]  # (answer, when to look again)


def _runnable() -> float:
    """Threads runnable on the host right now (the 4th field of /proc/loadavg), or the
    1-minute load average where that cannot be read."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return float(f.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return os.getloadavg()[0]


def spare_cores(now: float) -> bool:
    """Whether this host has cores to spare for polling instead of sleeping: at least 4 that
    this process may use (``config.SPARE_CORES_MIN``, ``config.host_cores``: the affinity
    mask, at most the cgroup's CPU quota), and fewer threads runnable than three quarters of
    them, the pollers included (looked at most once a second; the instant count, not the
    load average, which lags a finished load by a minute). The runnable count is the whole
    host's (/proc/loadavg), not this container's: on a shared host others' load turns the
    polls off too, which errs on the side of sleeping. A quarter of the cores idle leaves
    room for whatever else becomes runnable before the next look, while 8 polling producers
    and 2 workers on 16 cores still count as spare (at half, their own polls turned them off
    every other second). A poll on a busy or small host takes the CPU from the process it
    waits for (on the 2-core machine a worker's 500 us spin took a sequential client's p50
    from 0.44-0.8 ms to 1.2-1.4 ms)."""
    if now >= _spare[1]:
        _spare[1] = now + 1.0
        cores = host_cores()  # a container's share (affinity, CPU quota), not the host's
        try:
            _spare[0] = cores >= SPARE_CORES_MIN and _runnable() < cores * 0.75
        except OSError:
            _spare[0] = False
    return _spare[0]


class ReplyError(Exception):
    """A worker answered with a non-OK status (``status``: layout.R_*)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def claim_row(shm: Shm) -> int:
    """Claim a row of the HTTP table for this process (rows of dead processes are reused):
    its index is this process's slot partition. The one cross-process lock of a producer's
    life, taken once at its start."""
    pid = os.getpid()
    with shm.lock():
        h = shm.http
        for r in np.flatnonzero(h["pid"] != 0).tolist():
            if not pid_alive(int(h["pid"][r])):
                h["pid"][r] = 0
        free = np.flatnonzero(h["pid"][: shm.partitions] == 0)
        if free.size == 0:
            raise ServiceUnavailable(f"all {shm.partitions} producer rows are in use "
                                     "(http_workers plus spares): no slot partition left")
        r = int(free[0])
        h["pid"][r] = pid
        h["started"][r] = time.monotonic()  # counters (and metrics row r) carry on
        # a dead predecessor's idle slots are free at once (not at the supervisor's next
        # sweep, which takes this lock too); its in-flight ones stay the supervisor's
        part = L.partition_range(r, shm.layout.n_slots, shm.partitions)
        s = shm.slots[part.start : part.stop]
        idle = np.isin(s["state"], (L.S_PARKED, L.S_CLAIMED, L.S_DONE))
        for j in np.flatnonzero(idle & (s["owner"] != 0)).tolist():
            if not pid_alive(int(s["owner"][j])):
                s["state"][j] = L.S_FREE
    return r


def reclaim_slots(shm: Shm) -> int:
    """Free the slots whose producer died or gave them up (owner 0, orphaned after a
    timeout or a stall) once nobody can write them any more: idle, answered, or their worker
    gone. The supervisor's sweep; returns how many. Under the instance lock, since a
    producer taking over a dead process's row (:func:`claim_row`) frees the same slots; the
    request path never takes it."""
    s, w = shm.slots, shm.workers
    n = 0
    with shm.lock():
        for j in np.flatnonzero(s["state"] != L.S_FREE).tolist():
            owner = int(s["owner"][j])
            if owner and pid_alive(owner):
                continue
            state = int(s["state"][j])
            k = int(s["worker"][j])
            worker_gone = k >= len(w) or int(w["gen"][k]) != int(s["gen"][j])
            if state in (L.S_CLAIMED, L.S_PARKED, L.S_DONE) or worker_gone:
                s["state"][j] = L.S_FREE
                n += 1
    return n


class Reply(NamedTuple):
    """A worker's answer, as read from the slot (a named tuple: built once per request,
    several times cheaper than a frozen dataclass)."""

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

    __slots__ = ("producer", "shm", "index", "off", "w4", "w8", "seq", "worker", "gen",
                 "_owned", "_drain", "t_sub")

    def __init__(self, producer: Producer, index: int) -> None:
        self.producer, self.shm, self.index = producer, producer.shm, index
        # byte offset of the header, its 4- and 8-byte word indexes (computed once per slot)
        self.off, self.w4, self.w8 = producer._where[index]
        self.seq = self.gen = 0
        self.t_sub = 0.0  # time.monotonic() at submit
        self.worker = -1
        self._owned = True
        self._drain = False  # a reply caught by polling left its post on the semaphore

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
        shm, w4, w8 = self.shm, self.w4, self.w8
        u32, i64 = shm.u32, shm.i64
        u32[w4 + _OP] = op
        u32[w4 + _WK] = worker
        u32[w4 + _GEN] = gen
        u32[w4 + _REQLEN] = req_len
        shm.i32[w4 + _STREAM] = stream
        shm.u64[w8 + _SEQ] = seq
        # resp_seq, resp_len and status are not cleared: they are read only once the state
        # is DONE with resp_seq equal to this request's seq (unique), i.e. once the worker
        # has written them for this request. r0..f1 are: the worker writes them only for
        # an error or when one is not zero (Inbox.answer), and r0 is the progress word of
        # a partial reply
        i64[w8 + _R0] = 0
        i64[w8 + _R1] = 0
        i64[w8 + _F0] = 0  # 0.0 (all bits zero), through the same view
        i64[w8 + _F1] = 0
        if not args:
            args = _ARGS0
        elif len(args) != 4:
            args = (*args, *_ARGS0)[:4]

        a = w8 + _ARG0
        i64[a], i64[a + 1], i64[a + 2], i64[a + 3] = args  # four single stores
        self.t_sub = now = _monotonic()
        shm.f64[w8 + _TSUB] = now
        u32[w4 + _ST] = _S_SUBMITTED | worker  # publish last; the post is a barrier
        self.seq, self.worker, self.gen = seq, worker, gen
        shm.doorbells[worker].release()

    def _answered(self) -> bool:
        shm = self.shm
        return shm.u32[self.w4 + _ST] == L.S_DONE and shm.u64[self.w8 + _RSEQ] == self.seq

    def wait(self, timeout: float, seen: int | None = None) -> None:
        """Block until the worker answered this slot's current request (or, with ``seen``,
        until it published more than ``seen`` bytes of a partial reply: see :meth:`parts`).

        Raises WorkerDied (503) within about WAIT_SLICE after the supervisor reaps a dead
        worker, WorkerStalled (503) when it stops beating for stall_timeout, and
        RequestTimeout (504) after ``timeout``; in the last two cases the slot is orphaned,
        since the live worker may still write into it.
        """
        producer = self.producer
        if self._drain:  # this slot's previous reply was caught by polling (a stream's
            self._take_post()  # slot carries many requests): its post goes first
        waiting = producer._waiting
        waiting.append(self.index)  # list append/remove: atomic under the GIL
        try:
            t = self.t_sub  # spare_cores(t), inline while its answer is current; first,
            if (_spare[0] if t < _spare[1] else spare_cores(t)) and seen is None and \
                    len(waiting) == 1 and producer.reply_spin:  # so a small host skips the rest
                # on a host with cores to spare (as looked at submit), alone in flight: poll
                # for a reply that usually comes within microseconds (REPLY_SPIN), whatever
                # the worker's queue (a few short requests ahead still answer within it, and
                # a long one costs the poll, on a core nobody else wanted); its post is
                # drained at release
                shm = self.shm
                u32, u64, st, rseq, seq = shm.u32, shm.u64, self.w4 + _ST, self.w8 + _RSEQ, \
                    self.seq
                clock = time.perf_counter
                until = clock() + producer.reply_spin
                while clock() < until:
                    if u32[st] == _S_DONE and u64[rseq] == seq:
                        self._drain = True
                        return
            self._sleep_until_answered(timeout, seen)
        finally:
            waiting.remove(self.index)

    def _sleep_until_answered(self, timeout: float, seen: int | None) -> None:
        shm = self.shm
        sem = shm.replies[self.index]
        deadline = _monotonic() + timeout
        u32, u64, st, rseq, seq = shm.u32, shm.u64, self.w4 + _ST, self.w8 + _RSEQ, self.seq
        try:
            sem.acquire(WAIT_SLICE)
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            pass
        if u32[st] == _S_DONE and u64[rseq] == seq:  # the usual case: answered at once
            return
        i64, r0 = shm.i64, self.w8 + _R0
        ctl, f64 = shm.ctl_view, shm.f64
        w_off = self.producer.workers_off + self.worker * L.WORKER.itemsize
        beat = (w_off + _WO["heartbeat"]) >> 3
        stall = self.producer.stall_timeout
        while True:
            if (u32[st] == _S_DONE and u64[rseq] == seq) or (seen is not None
                                                             and i64[r0] > seen):
                return
            state, gen = _W_STATE_GEN.unpack_from(ctl, w_off + _WO["state"])
            if gen != self.gen or state == L.W_DEAD:
                if self._answered():
                    return
                # the worker is gone, so nobody else writes this slot: it stays ours, for
                # the caller to reuse or release
                self.producer.forget_workers()  # a re-send must not pick it again
                raise WorkerDied("the worker handling this request died")
            now = time.monotonic()
            if now - f64[beat] > stall and self.producer.others_beating(self.worker):
                # stopped or stuck while others beat: it may still wake and write this slot,
                # so give the slot to the supervisor (freed once answered or the worker is
                # replaced) and tell the caller now rather than at heartbeat_timeout (when
                # every worker is silent, the host is starved: wait on)
                self.orphan()
                self.producer.forget_workers()
                raise WorkerStalled(f"worker {self.worker} stopped responding "
                                    f"(no heartbeat for {now - f64[beat]:.1f} s)")
            if now >= deadline:
                self.orphan()
                raise RequestTimeout(f"no answer from worker {self.worker} within {timeout:g} s")
            try:
                sem.acquire(WAIT_SLICE)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass

    def parts(self, timeout: float) -> Iterator[bytes]:
        """The reply as the worker publishes it: each newly published run of bytes, until
        the final answer (the worker advances ``r0``, the bytes published so far, with one
        aligned store per part, and posts the reply semaphore; parts never overlap, so no
        handshake is needed). A non-OK final status raises ReplyError after what came."""
        deadline = time.monotonic() + timeout
        i64, r0 = self.shm.i64, self.w8 + _R0
        pos = 0
        while True:
            self.wait(max(0.0, deadline - time.monotonic()), seen=pos)
            done = self._answered()
            end = self.reply(copy=False) if done else None
            upto = end.r0 if end is not None and end.status == L.R_OK else i64[r0]
            if upto > pos:
                yield bytes(self.view(upto)[pos:])
                pos = upto
            if end is not None:
                if end.status != L.R_OK:
                    raise ReplyError(end.status, self.reply().data.decode(errors="replace"))
                return

    def reply(self, copy: bool = True) -> Reply:
        shm = self.shm
        n, status, r0, r1, f0, f1, t_sub, t_taken, t_done = \
            _REPLY.unpack_from(shm.ctl_view, self.off + _SO_RESP_LEN)
        if copy:
            start = self.index * shm.slot_bytes
            data = bytes(shm.data_view[start : start + n])
        else:
            data = b""
        return _tuple_new(Reply, (status, data, r0, r1, f0, f1,
                                  (t_sub, t_taken, t_done, _monotonic())))

    def release(self) -> None:
        if self._owned:
            self._owned = False
            if self._drain:  # the post of a reply caught by polling (see wait): take it
                self._take_post()  # now, or the slot's next wait would wake at once
            self.shm.u32[self.w4 + _ST] = _S_PARKED  # Producer._give_back, inline
            self.producer._idle.append(self.index)


    def _take_post(self) -> None:
        self._drain = False
        try:  # not contextlib.suppress: this runs on the polled request's path
            self.shm.replies[self.index].acquire(0)
        except posix_ipc.BusyError:
            pass  # not posted yet: the slot's next wait takes it (its seq tells it apart)

    def orphan(self) -> None:
        """Give the slot to the supervisor, which frees it once its worker is done with it."""
        if self._owned:
            self._owned = False
            self.shm.i64[self.w8 + _OWNER] = 0

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Producer(Routing):
    """The HTTP side of the channel (one per process; thread safe, and lock free per request).

    A producer owns one row of the HTTP table and with it a partition of the slots
    (``layout.partition_range``) that no other process claims: a claim is a ``deque.pop``
    and a release a ``deque.append`` (both atomic under the GIL), with no lock of any kind.
    Only when the deque runs dry does the producer adopt the FREE slots of its partition
    (slots the supervisor freed after an orphaning, or never used yet), under a thread lock
    held across no syscall. Its choice of worker (``pick_worker``, ``least_loaded``,
    ``candidates``) is its base class's, :class:`shmmel.routing.Routing`.
    """

    def __init__(self, shm: Shm, queue_depth: int, stall_timeout: float = 1.0,
                 row: int | None = None, reply_spin: float = REPLY_SPIN) -> None:
        super().__init__(shm, queue_depth, stall_timeout, claim_row(shm) if row is None else row)
        self.reply_spin = reply_spin
        self.pid = os.getpid()
        part = L.partition_range(self.row, shm.layout.n_slots, shm.partitions)
        self.first, self.stop = part.start, part.stop
        self.slots_off = shm.layout.slots_off
        self._counter = itertools.count(1)
        self._idle: collections.deque[int] = collections.deque()
        self._adopt_lock = threading.Lock()
        self._seq_high = (self.pid & 0xFFFFFFFF) << 32
        # (header offset, its 4- and 8-byte word indexes) of every slot, for Slot()
        self._where = [(o, o >> 2, o >> 3) for o in
                       range(self.slots_off, self.slots_off + shm.layout.n_slots * _SIZE, _SIZE)]
        self._adopt()

    def next_seq(self) -> int:
        # itertools.count is atomic under the GIL; pid in the high half makes it unique
        return self._seq_high | (next(self._counter) & 0xFFFFFFFF)

    @property
    def capacity(self) -> int:
        return self.stop - self.first

    def claim(self) -> Slot:
        try:
            j = self._idle.pop()
        except IndexError:
            j = self._adopt(need=True)
        slot = Slot(self, j)
        self.shm.u32[slot.w4 + _ST] = _S_CLAIMED
        return slot

    def _adopt(self, need: bool = False) -> int:
        """Take the FREE slots of this partition into the deque (as PARKED); with ``need``,
        return one of them (ServiceUnavailable when the partition has none)."""
        with self._adopt_lock:  # numpy and stores only: no syscall under it
            if need:
                with contextlib.suppress(IndexError):
                    return self._idle.pop()  # another thread adopted meanwhile
            states = self._states[self.first : self.stop]
            free = (np.flatnonzero(states == L.S_FREE) + self.first).tolist()
            u32, i64, size = self.shm.u32, self.shm.i64, L.SLOT.itemsize
            for j in free:
                off = self.slots_off + j * size
                i64[(off >> 3) + _OWNER] = self.pid
                u32[(off >> 2) + _ST] = L.S_PARKED
        for j in free:  # a late post of an abandoned request must not wake the next one
            sem = self.shm.replies[j]
            with contextlib.suppress(posix_ipc.BusyError):
                while True:
                    sem.acquire(0)
        if need:
            if not free:
                raise ServiceUnavailable(
                    f"all {self.capacity} shared-memory slots of this HTTP process are busy")
            j = free.pop()
            self._idle.extend(free)
            return j
        self._idle.extend(free)
        return -1

    def _give_back(self, j: int) -> None:
        self.shm.u32[(self.slots_off + j * L.SLOT.itemsize) >> 2] = L.S_PARKED
        self._idle.append(j)

    def call(self, op: int, payload: bytes, *, args: tuple[int, ...] = (), timeout: float,
             worker: tuple[int, int] | None = None, stream: int = -1,
             kinds: Iterable[int] | None = None) -> Reply:
        """One round trip: payload in, Reply out, on ``worker`` or a ready worker of ``kinds``
        (None: any; text and mel audio pass ``layout.MEL_KINDS``).

        A stateless call (no ``worker`` given) whose worker dies or stalls before answering
        is sent once more to another worker: the op has no state on the worker, so running it
        again is safe. A pinned call (a stream's worker) raises instead.
        """
        n, size = len(payload), self.shm.slot_bytes
        if n > size:
            raise ValueError("payload larger than a slot")
        k, gen = worker if worker is not None else self.pick_worker(kinds)
        left = timeout
        for attempt in (0, 1):
            slot = self.claim()
            try:
                start = slot.index * size
                self.shm.data_view[start : start + n] = payload
                slot.submit(k, gen, op, n, self._seq_high | (next(self._counter) & 0xFFFFFFFF),
                            args, stream)
                try:
                    slot.wait(left)
                    return slot.reply()
                except (WorkerDied, WorkerStalled) as exc:
                    if worker is not None or attempt:
                        raise
                    lost = exc
                    left = max(0.0, timeout - (_monotonic() - slot.t_sub))
            finally:
                slot.release()
            try:
                k, gen = self.pick_worker(kinds)  # a stalled or dead worker is not picked
            except ServiceUnavailable:
                raise lost from None
        raise AssertionError("unreachable")


def call_parts(producer: Producer, op: int, payload: bytes, *, args: tuple[int, ...],
               timeout: float, kinds: Iterable[int] | None = None) -> Iterator[bytes]:
    """One request whose reply comes in parts, over one slot (see Slot.parts); the slot
    is released when the iterator ends or is closed."""
    k, gen = producer.pick_worker(kinds)
    slot = producer.claim()
    try:
        slot.view(len(payload))[:] = payload
        slot.submit(k, gen, op, len(payload), producer.next_seq(), args)
        yield from slot.parts(timeout)
    finally:
        slot.release()
