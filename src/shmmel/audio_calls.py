"""The HTTP side of audio streams: their calls to the mel workers, through one slot.

A session stream is pinned to the worker that holds its state (chosen at open by device load,
see :mod:`shmmel.devices`); its entry lives in the shared
:class:`~shmmel.stream_table.StreamTable`, in this process's partition of it when this process
opened it. Every call on a stream carries its token (the worker refuses a stale one) and every
push a lease, so the worker serves one request of a stream at a time.

An upload's streams skip the table: a whole upload that fits one slot is one message
(:meth:`AudioCalls.oneshot`); a larger one is a stream its worker keeps under the upload's
slot (:meth:`AudioCalls.upload_stream`, ``layout.PUSH_SLOT``), opened by its first push. The
upload holds that slot from its first push to its last, so the slot names the stream, and
nothing is placed, counted or freed in shared memory: the table's placement (a scan of every
entry under the process's lock) was the largest cost of a 10 s upload in an HTTP process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from . import layout as L
from .channel import Producer, Reply, Slot
from .config import Config
from .devices import pinned_streams
from .errors import (BadRequest, ServiceUnavailable, ShmmelError, StreamBusy, UnknownStream,
                     WorkerDied)
from .mel import HOP_LENGTH, FrameBatch
from .stream_table import Handle, StreamTable

OUT_MARGIN = 4096  # bytes kept free in a slot for the frames a push completes beyond its own
KINDS_TTL = 0.05  # s: how long the kinds of worker audio goes to are taken as last seen


def check_reply(slot: Slot, status: int) -> None:
    """A worker's refusal of bad input becomes BadRequest (400), of a stream another request
    holds StreamBusy (409), of a stream it does not hold UnknownStream (404), any other
    failure an error; the reply's bytes are the worker's message."""
    if status != L.R_OK:
        msg = slot.reply().data.decode(errors="replace")
        if status == L.R_BAD_INPUT:
            raise BadRequest(msg)
        if status == L.R_BUSY:
            raise StreamBusy(msg)
        if status == L.R_NO_STREAM:
            raise UnknownStream(msg)
        raise RuntimeError(f"worker error: {msg}")


class AudioCalls:
    def __init__(self, config: Config, producer: Producer) -> None:
        self.config, self.producer, self.shm = config, producer, producer.shm
        self.table = StreamTable(self.shm, producer.row)
        self.pid = os.getpid()
        self._kinds_seen: tuple[int, ...] = tuple(L.MEL_KINDS)
        self._kinds_at = -1.0
        self._push_samples: dict[tuple[int, int], int] = {}  # (fmt, n_mels) -> samples

    def push_samples(self, fmt: int, n_mels: int) -> int:
        """Samples one push of ``fmt`` takes: they and the frames they complete (a few
        beyond their own, from the stream's carry and its end) fit one slot. For s16le at
        80 mels that is ~4 s; float32 at 128 mels, a quarter of the slot's bytes."""
        n = self._push_samples.get((fmt, n_mels))
        if n is None:
            room = self.shm.slot_bytes - OUT_MARGIN
            n = self._push_samples[fmt, n_mels] = min(room // L.FMT_WIDTH[fmt],
                                                      room // (4 * n_mels) * HOP_LENGTH)
        return n

    # -- open / find / release ---------------------------------------------------------
    def open(self, slot: Slot, n_mels: int, padding: int) -> Handle:
        """Open a stream on the least loaded (CUDA, where there is one) worker.

        ``padding`` is kept in the table and sent as zero samples by :meth:`finish`, in
        pieces whose frames fit a slot (a worker never answers more than one slot holds).
        """
        h = self._allocate(n_mels, padding)
        try:
            self.call(slot, h, L.OP_AUDIO_OPEN, 0, (n_mels,))
        except BaseException as exc:
            self.drop_entry(h, exc)
            raise
        return h

    def upload_stream(self, n_mels: int, padding: int) -> Handle:
        """A stream for one upload, on the least busy (CUDA, where there is one) worker: kept
        there under the slot the upload holds (``PUSH_SLOT``), with no table entry and no
        round trip of its own (its first push opens it, see :meth:`push`). ``padding`` is
        sent as zero samples by :meth:`finish`."""
        if n_mels not in (80, 128):
            raise BadRequest("n_mels must be 80 or 128")
        k, gen = self._pick(self.producer.pick_worker)
        return Handle(-1, self.producer.next_seq(), k, gen, n_mels, slot_keyed=True,
                      padding=padding, opened=False)

    def _allocate(self, n_mels: int, padding: int) -> Handle:
        """A table entry on the least loaded (CUDA, where there is one) worker."""
        if n_mels not in (80, 128):
            raise BadRequest("n_mels must be 80 or 128")
        return self.table.allocate(n_mels, padding, self._place, self.pid)

    def _place(self, t: np.ndarray) -> tuple[int, int]:
        """The worker for a new stream, given the table (its open streams per worker)."""
        pinned = pinned_streams(self.shm.workers, t)
        return self._pick(lambda kinds: self.producer.least_loaded(kinds, streams=pinned))

    def _pick(self, pick: Callable[[tuple[int, ...]], tuple[int, int]]) -> tuple[int, int]:
        """``pick(kinds)`` with the kinds as last seen (:meth:`_kinds`); when no worker of
        them is found, once more with the kinds looked at again."""
        try:
            return pick(self._kinds())
        except ServiceUnavailable:
            self._kinds_at = -1.0
            return pick(self._kinds())

    def _kinds(self) -> tuple[int, ...]:
        """The worker kinds audio goes to: CUDA where a CUDA worker is ready, else any mel
        worker; looked at again after KINDS_TTL (or when no worker of them was found)."""
        now = time.monotonic()
        if now - self._kinds_at > KINDS_TTL:
            w = self.shm.workers
            cuda = bool(((w["state"] == L.W_READY) & (w["kind"] == L.K_CUDA)).any())
            self._kinds_seen = (L.K_CUDA,) if cuda else tuple(L.MEL_KINDS)
            self._kinds_at = now
        return self._kinds_seen

    def drop_entry(self, h: Handle, exc: BaseException) -> None:
        """After a failed open (or opening push): free the entry when its worker answered
        (a refusal: it holds no state) or died; when it stalled or timed out it may still
        make the state, so the entry stays, not busy, and goes when that idles out (or the
        worker is replaced)."""
        if isinstance(exc, ShmmelError) and not isinstance(
                exc, (WorkerDied, BadRequest, StreamBusy, UnknownStream)):
            self.release(h)
        else:
            self.table.free(h.index, h.token)

    def allocate(self, k: int, gen: int, n_mels: int, padding: int) -> Handle:
        """A table entry for worker ``k`` (generation ``gen``), busy with this process."""
        return self.table.allocate(n_mels, padding, lambda t: (k, gen), self.pid)

    def find(self, stream_id: str) -> Handle:
        """Look up a session stream (its worker answers 409 if another request holds it)."""
        return self.table.find(stream_id, self.config.stream_idle_timeout)

    def release(self, h: Handle) -> None:
        self.table.release(h)

    def abort(self, slot: Slot | None, h: Handle) -> None:
        """Drop the stream's state on its worker (client gone or error); best effort. An
        upload's stream is dropped through its own slot; once that slot is orphaned (or the
        stream never opened) its state is left to the worker (replaced by the slot's next
        upload, else idle expiry)."""
        if h.slot_keyed:
            if h.opened and slot is not None and slot.owned:
                try:
                    self.call(slot, h, L.OP_AUDIO_CLOSE, 0, (0, L.PUSH_SLOT))
                except ShmmelError:
                    pass
            return
        try:
            if slot is None or not slot.owned:  # orphaned after a timeout: use another
                with self.producer.claim() as s:
                    self.call(s, h, L.OP_AUDIO_CLOSE, 0, ())
            else:
                self.call(slot, h, L.OP_AUDIO_CLOSE, 0, ())
        except ShmmelError:  # the worker is gone or busy: idle expiry or the supervisor
            self.release(h)  # frees the entry (expiry skips busy entries: mark it idle)

    # -- pushes ------------------------------------------------------------------------------
    def call(self, slot: Slot, h: Handle, op: int, nbytes: int, args: tuple[int, ...],
             lease: int = 0) -> Reply:
        """One round trip of ``op`` on the stream's worker through ``slot`` (``nbytes`` of
        payload already in it; ``args`` up to two, then the stream's token and ``lease``);
        its reply (without the payload bytes). A refusal becomes BadRequest, StreamBusy or
        UnknownStream, any other failure an error."""
        a = (*args, 0, 0)[:2]
        slot.submit(h.worker, h.gen, op, nbytes, self.producer.next_seq(),
                    (a[0], a[1], h.token, lease), h.index)
        slot.wait(self.config.request_timeout)
        r = slot.reply(copy=False)
        check_reply(slot, r.status)
        return r

    def fits_oneshot(self, nbytes: int, fmt: int, n_mels: int, padding: int) -> bool:
        """Whether a whole upload of ``nbytes`` goes to a worker as one message: its
        samples and every frame they make (padding included) fit one slot."""
        samples = nbytes // L.FMT_WIDTH[fmt]
        frames = (samples + padding) // HOP_LENGTH + 1
        return nbytes <= self.shm.slot_bytes and frames * n_mels * 4 <= self.shm.slot_bytes

    def oneshot(self, slot: Slot, data: memoryview | bytes, fmt: int, n_mels: int,
                padding: int, copy: bool = True, provisional: bool = False) -> FrameBatch:
        """A whole upload in one round trip: no stream entry, padding sent as a count, every
        frame back in the same slot (see :meth:`fits_oneshot`); without ``copy`` the frames
        are a view of the slot, valid until its next request or its release. With
        ``provisional`` the worker normalises them (``FrameBatch.normalised``), for a caller
        that only wants :meth:`FrameBatch.provisional` (layout.ONESHOT_PROVISIONAL)."""
        if n_mels not in (80, 128):
            raise BadRequest("n_mels must be 80 or 128")
        deadline = time.monotonic() + self.config.request_timeout
        k, gen = self._pick(self.producer.pick_worker)
        for attempt in (0, 1):
            slot.view(len(data))[:] = data  # again on a retry: the dead worker may have written
            slot.submit(k, gen, L.OP_AUDIO_ONESHOT, len(data), self.producer.next_seq(),
                        (fmt, n_mels, padding, L.ONESHOT_PROVISIONAL if provisional else 0))
            try:
                slot.wait(max(0.0, deadline - time.monotonic()))
                break
            except WorkerDied:  # stateless: once more on another worker (the slot is ours)
                if attempt:
                    raise
                self._kinds_at = -1.0  # the dead one may have been the last CUDA worker
                try:
                    k, gen = self.producer.pick_worker(self._kinds())
                except ServiceUnavailable:
                    raise WorkerDied("the worker handling this request died") from None
        r = slot.reply(copy=False)
        check_reply(slot, r.status)
        frames = np.frombuffer(slot.view(r.r1 * n_mels * 4), "<f4").reshape(r.r1, n_mels)
        return FrameBatch(r.r0, frames.copy() if copy else frames, r.f0, True, provisional)

    def finish(self, slot: Slot, h: Handle, extra_padding: int = 0,
               copy: bool = True, provisional: bool = False) -> FrameBatch:
        """End the stream: its padding (and ``extra_padding``) as zeros, then the last frames
        and the final max. The worker frees the table entry."""
        pad = (h.padding if h.slot_keyed else self.table.padding(h.index)) + extra_padding
        return self.push(slot, h, bytes(2 * pad), L.FMT_S16LE, final=True, copy=copy,
                         provisional=provisional)

    @staticmethod
    def _upload_flags(h: Handle) -> int:
        """A push's flags for an upload's stream: named by its slot (``PUSH_SLOT``), opened
        by its first piece (``PUSH_OPEN``, with its n_mels); 0 for a session stream."""
        if not h.slot_keyed:
            return 0
        return L.PUSH_SLOT | (0 if h.opened else L.PUSH_OPEN | h.n_mels << L.PUSH_MELS_SHIFT)

    def _push_in_slot(self, slot: Slot, h: Handle, size: int, fmt: int, final: bool,
                      copy: bool, provisional: bool) -> FrameBatch:
        """:meth:`push` of ``size`` bytes the caller read into the slot: one piece, one round
        trip (a session chunk on every request: without the loop over pieces, whose own
        lines py-spy on the GPU host had at ~15 us of held GIL a chunk)."""
        width = L.FMT_WIDTH[fmt]
        if size % width:
            raise BadRequest(f"{size} bytes is not a whole number of {width}-byte samples")
        if size > self.push_samples(fmt, h.n_mels) * width:
            raise ValueError("samples already in the slot go as one piece")
        flags = L.PUSH_LAST_PIECE | (L.PUSH_FINAL if final else 0) | \
            (L.PUSH_PROVISIONAL if provisional else 0) | self._upload_flags(h)
        r = self.call(slot, h, L.OP_AUDIO_PUSH, size, (fmt, flags), self.producer.next_seq())
        h.opened = True
        k, n_mels = r.r1, h.n_mels
        if k:
            frames = np.frombuffer(slot.view(k * n_mels * 4), "<f4").reshape(k, n_mels)
            if copy:  # the slot's next request would overwrite them
                frames = frames.copy()
        else:
            frames = np.empty((0, n_mels), np.float32)
        return FrameBatch(r.r0, frames, r.f0, final, provisional)

    def push(self, slot: Slot, h: Handle, data: memoryview | bytes | int, fmt: int,
             final: bool, copy: bool = True, provisional: bool = False) -> FrameBatch:
        """Send ``data`` (whole samples of ``fmt``) through ``slot``, in pieces that fit;
        return the frames it completed as one batch (raw log10, frame-major). The pieces
        share one lease (the first piece's seq): the worker refuses another request's
        pieces on this stream (409) until the last one. Without ``copy``, frames that came
        in one piece are a view of the slot, valid until its next request or its release
        (for a caller that encodes them at once). An upload's stream
        (:meth:`upload_stream`) is named by the slot (``PUSH_SLOT``) and opened by its
        first piece (``PUSH_OPEN``). ``data`` an int: that many bytes already in the slot
        (read there by the caller), one piece. With ``provisional``, data that goes as one
        piece comes back normalised by the worker (``FrameBatch.normalised``: for a caller
        that only wants :meth:`FrameBatch.provisional`; layout.PUSH_PROVISIONAL); pieces of
        a longer one come back raw, as their batch is normalised with the last one's max."""
        if type(data) is int:
            return self._push_in_slot(slot, h, data, fmt, final, copy, provisional)
        width = L.FMT_WIDTH[fmt]
        size = len(data)
        if size % width:
            raise BadRequest(f"{size} bytes is not a whole number of {width}-byte samples")
        step = self.push_samples(fmt, h.n_mels) * width
        view = memoryview(data)
        norm = provisional and size <= step
        parts: list[np.ndarray] = []
        start, running_max, pos = -1, float("-inf"), 0
        lease = self.producer.next_seq()
        while True:
            piece = view[pos : pos + step]
            n = len(piece)
            pos += n
            slot.view(n)[:] = piece
            last = pos >= size
            is_final = final and last
            flags = (L.PUSH_FINAL if is_final else 0) | (L.PUSH_LAST_PIECE if last else 0) | \
                (L.PUSH_PROVISIONAL if norm else 0) | self._upload_flags(h)
            r = self.call(slot, h, L.OP_AUDIO_PUSH, n, (fmt, flags), lease)
            h.opened = True
            k = r.r1
            if k:
                frames = np.frombuffer(slot.view(k * h.n_mels * 4), "<f4").reshape(k, h.n_mels)
                # the slot's next request would overwrite them: a copy, except for the
                # last piece's frames when they are concatenated below or a view will do
                parts.append(frames if last and (parts or not copy) else frames.copy())
                if start < 0:
                    start = r.r0
            else:
                start = r.r0 if start < 0 else start
            running_max = r.f0
            if last:
                break
        log10 = np.concatenate(parts) if len(parts) > 1 else (
            parts[0] if parts else np.empty((0, h.n_mels), np.float32))
        return FrameBatch(max(start, 0), log10, running_max, final, norm)
