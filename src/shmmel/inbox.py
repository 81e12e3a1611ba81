"""The worker side of the channel (the producer side is :mod:`shmmel.channel`).

A worker waits on its doorbell, takes every slot submitted to it in one vectorised compare
(one wake-up can take many requests: that is how audio batches across streams into one
kernel launch), marks them TAKEN and answers each: the reply's words with single aligned
stores through the typed views, DONE last, then the slot's reply semaphore. A reply may also
come in parts (:meth:`Inbox.publish`).
"""

from __future__ import annotations

import struct
import time

import numpy as np
import posix_ipc

from . import layout as L
from .shm import Shm

# the codecs and word indexes live beside the dtypes, in layout (reads only: see there)
_SO = L.SLOT_OFF
_REQ_B, _U32 = L.REQ_TAIL, L.U32
I4, I8 = L.SLOT_W4, L.SLOT_W8
_ST, _RESPLEN, _STATUS = I4["state"], I4["resp_len"], I4["status"]
_SEQ, _RSEQ = I8["seq"], I8["resp_seq"]
_R0, _R1, _F0, _F1 = I8["r0"], I8["r1"], I8["f0"], I8["f1"]
_TSUB, _TTAKEN, _TDONE = I8["t_submit"], I8["t_taken"], I8["t_done"]
_QUEUED_MIN = np.uint32(L.S_QUEUED_MIN)
_S_DONE = L.S_DONE
_SIZE = L.SLOT.itemsize
_SO_OP = _SO["op"]
# a submitted request in one read, from op: op, (worker), gen, (seq, resp_seq, owner),
# req_len, resp_len, status, stream, arg0..arg3
_REQUEST = struct.Struct(f"<I4xI{_SO['req_len'] - _SO['gen'] - 4}xIIIiqqqq")
assert _SO["worker"] == _SO["op"] + 4 and _SO["gen"] == _SO["op"] + 8
_monotonic = time.monotonic


class Inbox:
    """The worker side of the channel."""

    def __init__(self, shm: Shm, index: int, gen: int) -> None:
        self.shm, self.index, self.gen = shm, index, gen
        self.doorbell = shm.doorbells[index]
        self._states = shm.slots["state"]
        self._submitted = L.S_SUBMITTED | index
        self._submitted_u32 = np.uint32(self._submitted)
        self._match = np.empty(len(self._states), bool)  # the scan's result, reused
        self._taken = L.S_TAKEN | index
        self._slots_off = shm.layout.slots_off
        self._u32, self._u64, self._i64, self._f64 = shm.u32, shm.u64, shm.i64, shm.f64
        self._replies = shm.replies

    def wait(self, timeout: float) -> bool:
        try:
            self.doorbell.acquire(timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def _scan(self) -> np.ndarray:
        """The slot states equal to "submitted to this worker" (into a buffer kept for it)."""
        return np.equal(self._states, self._submitted_u32, out=self._match)

    def has_pending(self) -> bool:
        return bool(np.count_nonzero(self._scan()))

    def queued_anywhere(self) -> int:
        """Slots submitted to or taken by any worker (this one's included): 0 when the whole
        instance is idle."""
        return int(np.count_nonzero(np.greater_equal(self._states, _QUEUED_MIN,
                                                     out=self._match)))

    def pending(self) -> list[int]:
        """Slots submitted to this worker generation, oldest first; marks them TAKEN."""
        return [j for j, _req in self.take(time.monotonic())]

    def take(self, now: float) -> list[tuple[int, tuple[int, int, int, int, int, int, int]]]:
        """:meth:`pending` with each request read (as :meth:`request` gives it) in the same
        pass: [(slot, (op, req_len, stream, arg0..arg3))], oldest first; marks them TAKEN,
        stamped ``now``."""
        mine = np.equal(self._states, self._submitted_u32, out=self._match).nonzero()[0]
        if not mine.size:
            return []
        ctl, u32, f64, gen, taken = self.shm.ctl_view, self._u32, self._f64, self.gen, self._taken
        first = self._slots_off
        out = []
        for j in mine.tolist():
            off = first + j * _SIZE
            op, g, req_len, _n, _s, stream, a0, a1, a2, a3 = _REQUEST.unpack_from(
                ctl, off + _SO_OP)
            if g != gen:
                continue  # queued on a dead generation; its producer frees it
            f64[(off >> 3) + _TTAKEN] = now
            u32[(off >> 2) + _ST] = taken
            out.append((j, (op, req_len, stream, a0, a1, a2, a3)))
        if len(out) > 1:
            first, w8_size = first >> 3, _SIZE >> 3
            out.sort(key=lambda t: f64[first + t[0] * w8_size + _TSUB])
        return out

    def request(self, j: int) -> tuple[int, int, int, int, int, int, int]:
        """(op, req_len, stream, arg0, arg1, arg2, arg3) of slot ``j``."""
        ctl, off = self.shm.ctl_view, self._slots_off + j * L.SLOT.itemsize
        op = _U32.unpack_from(ctl, off + _SO["op"])[0]
        req_len, _, _, stream, a0, a1, a2, a3 = _REQ_B.unpack_from(ctl, off + _SO["req_len"])
        return op, req_len, stream, a0, a1, a2, a3

    def publish(self, j: int, data: bytes, pos: int) -> int:
        """Append a part of slot ``j``'s reply at byte ``pos`` and tell its producer (one
        aligned store of the progress word, then a post); returns the new end."""
        end = pos + len(data)
        self.shm.payload[j, pos:end] = memoryview(data)
        self.shm.i64[((self._slots_off + j * L.SLOT.itemsize) >> 3) + _R0] = end
        self.shm.replies[j].release()
        return end

    def fail(self, j: int, status: int, message: str) -> int:
        """Answer slot ``j`` with an error status and ``message`` (UTF-8); returns 1 (an
        error, for the caller's count)."""
        data = message.encode()[: self.shm.slot_bytes]
        self.shm.payload[j, : len(data)] = memoryview(data)
        self.answer(j, status, len(data))
        return 1

    def answer(self, j: int, status: int, resp_len: int, r0: int = 0, r1: int = 0,
               f0: float = 0.0, f1: float = 0.0) -> None:
        off = self._slots_off + j * _SIZE
        w4, w8 = off >> 2, off >> 3
        u32, i64, f64, u64 = self._u32, self._i64, self._f64, self._u64
        u32[w4 + _RESPLEN] = resp_len
        u32[w4 + _STATUS] = status
        i64[w8 + _R0] = r0
        i64[w8 + _R1] = r1
        f64[w8 + _F0] = f0
        f64[w8 + _F1] = f1
        u64[w8 + _RSEQ] = u64[w8 + _SEQ]
        f64[w8 + _TDONE] = _monotonic()
        u32[w4 + _ST] = _S_DONE
        self._replies[j].release()

