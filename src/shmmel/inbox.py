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
_TTAKEN, _TDONE = I8["t_taken"], I8["t_done"]
_S_DONE = L.S_DONE
_SIZE = L.SLOT.itemsize
_SO_OP = _SO["op"]
# a submitted request in one read, from op: op, (worker), gen, (seq, resp_seq, owner),
# req_len, (resp_len, status), stream, arg0..arg3, (r0, r1, f0, f1), t_submit
_REQUEST = struct.Struct(f"<I4xI{_SO['req_len'] - _SO['gen'] - 4}xI8xiqqqq"
                         f"{_SO['t_submit'] - _SO['r0']}xd")
assert _SO["worker"] == _SO["op"] + 4 and _SO["gen"] == _SO["op"] + 8
assert _SO["stream"] == _SO["req_len"] + 12
assert L.R_OK == 0  # answer() tests the status as a truth value
_R_OK = L.R_OK
assert _SO["r0"] == _SO["arg3"] + 8 and _SO["t_submit"] + 8 - _SO["op"] == _REQUEST.size
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
        # per slot, computed once: the (4-byte, 8-byte) word index of its header, for the
        # single stores; what take needs (the request's offset, the t_taken and state
        # words); and what ok needs (resp_len, status, resp_seq, seq, t_done, state)
        offs = [self._slots_off + j * _SIZE for j in range(len(self._states))]
        self._words = [(o >> 2, o >> 3) for o in offs]
        self._take_at = [(o + _SO_OP, (o >> 3) + _TTAKEN, (o >> 2) + _ST) for o in offs]
        self._ok_at = [((o >> 2) + _RESPLEN, (o >> 2) + _STATUS, (o >> 3) + _RSEQ,
                        (o >> 3) + _SEQ, (o >> 3) + _TDONE, (o >> 2) + _ST) for o in offs]

    def wait(self, timeout: float) -> bool:
        try:
            self.doorbell.acquire(timeout)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False

    def pending(self) -> list[int]:
        """Slots submitted to this worker generation, oldest first; marks them TAKEN."""
        return [j for _t, j, _req in self.take(time.monotonic())]

    def take(self, now: float) -> list[tuple[float, int, tuple[int, ...]]]:
        """:meth:`pending` with each request read (as :meth:`request` gives it) in the same
        pass: [(t_submit, slot, (op, req_len, stream, arg0..arg3))], oldest first; marks
        them TAKEN, stamped ``now``."""
        mine = np.equal(self._states, self._submitted_u32, out=self._match).nonzero()[0]
        if not mine.size:
            return []
        ctl, u32, f64, gen, taken = self.shm.ctl_view, self._u32, self._f64, self.gen, self._taken
        at, unpack = self._take_at, _REQUEST.unpack_from
        out = []
        for j in mine.tolist():
            off, t_taken, state = at[j]
            op, g, req_len, stream, a0, a1, a2, a3, t_sub = unpack(ctl, off)
            if g != gen:
                continue  # queued on a dead generation; its producer frees it
            f64[t_taken] = now
            u32[state] = taken
            out.append((t_sub, j, (op, req_len, stream, a0, a1, a2, a3)))
        if len(out) > 1:
            out.sort()  # by t_submit (slots are unique, so a tie compares slot numbers)
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
        self.shm.i64[self._words[j][1] + _R0] = end
        self.shm.replies[j].release()
        return end

    def fail(self, j: int, status: int, message: str) -> int:
        """Answer slot ``j`` with an error status and ``message`` (UTF-8); returns 1 (an
        error, for the caller's count)."""
        data = message.encode()[: self.shm.slot_bytes]
        self.shm.payload[j, : len(data)] = memoryview(data)
        self.answer(j, status, len(data))
        return 1

    def done(self, j: int, resp_len: int, status: int = _R_OK) -> None:
        """The end of every answer: resp_len and status (two stores), resp_seq from seq,
        t_done, DONE, the post; the word indexes computed once per slot. A short request's
        whole answer (r0..f1 are zero since submit): see :meth:`answer`."""
        resp_len_at, status_at, rseq_at, seq_at, done_at, state_at = self._ok_at[j]
        u32, u64 = self._u32, self._u64
        u32[resp_len_at] = resp_len
        u32[status_at] = status
        u64[rseq_at] = u64[seq_at]
        self._f64[done_at] = _monotonic()
        u32[state_at] = _S_DONE
        self._replies[j].release()

    def answer(self, j: int, status: int, resp_len: int, r0: int = 0, r1: int = 0,
               f0: float = 0.0, f1: float = 0.0) -> None:
        """Answer slot ``j``: the reply's words, then DONE, then its post. ``r0``..``f1``
        are written only for an error or when one of them is not zero: the producer zeroes
        them at submit (Slot.submit), so a plain OK answer is five stores (an error also
        resets the progress word of parts published before it, as it always did). The
        producer reads none of the reply's words before DONE but r0, the progress word of a
        partial reply, so their order before it does not matter."""
        if status or r0 or r1 or f0 or f1:  # status: R_OK is 0
            w8 = self._words[j][1]
            i64, f64 = self._i64, self._f64
            i64[w8 + _R0] = r0
            i64[w8 + _R1] = r1
            f64[w8 + _F0] = f0
            f64[w8 + _F1] = f1
        self.done(j, resp_len, status)

