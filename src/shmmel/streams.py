"""HTTP side of audio streams: the shared stream table and pushes through a slot.

A stream is pinned to the worker that holds its state (chosen at open: the least loaded
CUDA worker, or any worker where none has a GPU). Its table entry carries that worker's
generation: if the worker dies, the entry is stale and the supervisor frees it.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

import numpy as np

from . import layout as L
from .channel import Producer, Slot
from .osutil import pid_alive
from .config import Config
from .devices import pinned_streams
from .errors import BadRequest, ServiceUnavailable, ShmmelError, WorkerDied
from .mel import HOP_LENGTH, FrameBatch

OUT_MARGIN = 4096  # bytes kept free in a slot for the frames a push completes beyond its own


class UnknownStream(ShmmelError):
    """404: no such stream (never opened, expired, or closed)."""


class StreamBusy(ShmmelError):
    """409: another request is using this stream right now."""


class StreamLost(ServiceUnavailable):
    """503: the worker holding the stream's state died; the stream cannot continue."""


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


class StreamTable:
    def __init__(self, config: Config, producer: Producer) -> None:
        self.config, self.producer, self.shm = config, producer, producer.shm
        self.pid = os.getpid()
        # samples per push: float32 in, at most ~3.2 output bytes per sample for 128 mels
        self.max_samples = (self.shm.slot_bytes - OUT_MARGIN) // 4

    # -- open / find / release ---------------------------------------------------------
    def open(self, slot: Slot, n_mels: int, padding: int) -> Handle:
        """Open a stream on the least loaded (CUDA, where there is one) worker.

        ``padding`` is kept in the table and sent as zero samples by :meth:`finish`, in
        pieces whose frames fit a slot (a worker never answers more than one slot holds).
        """
        if n_mels not in (80, 128):
            raise BadRequest("n_mels must be 80 or 128")
        w = self.shm.workers
        cuda_ready = bool(((w["state"] == L.W_READY) & (w["kind"] == L.K_CUDA)).any())
        h = self.allocate(-1, 0, n_mels, padding,
                          place=[L.K_CUDA] if cuda_ready else list(L.MEL_KINDS))
        try:
            self.call(slot, h, L.OP_AUDIO_OPEN, 0, (n_mels,))
        except BaseException:
            self.shm.streams["state"][h.index] = L.ST_FREE  # the worker holds no state for it
            raise
        return h

    def allocate(self, k: int, gen: int, n_mels: int, padding: int,
                 place: list[int] | None = None) -> Handle:
        """Take a free table entry for worker ``k`` (generation ``gen``), busy with this
        process; 503 when the table is full. The worker frees it when it drops the state.

        With ``place`` (worker kinds), the worker is chosen here, under the table's lock, by
        the streams the table holds per worker: opens racing in other threads and processes
        see each other's entries, so a burst of opens spreads over the devices."""
        t = self.shm.streams
        with self.shm.lock():
            free = np.flatnonzero(t["state"] == L.ST_FREE)
            if free.size == 0:
                raise ServiceUnavailable(f"too many open streams (max {len(t)})")
            if place is not None:
                k, gen = self.producer.least_loaded(
                    place, streams=pinned_streams(self.shm.workers, t))
            i = int(free[0])
            token = secrets.randbits(63) | 1
            e = t[i : i + 1]
            e["worker"], e["gen"], e["n_mels"], e["token"] = k, gen, n_mels, token
            e["last_used"], e["frames"], e["samples"], e["busy"] = time.monotonic(), 0, 0, self.pid
            e["padding"] = padding
            e["state"] = L.ST_OPEN
        return Handle(i, token, k, gen, n_mels)

    def find(self, stream_id: str) -> Handle:
        """Look up a session stream and mark it busy (409 if another request holds it)."""
        try:
            a, b = stream_id.split("-", 1)
            i, token = int(a), int(b, 16)
        except ValueError:
            raise UnknownStream(f"no stream {stream_id!r}") from None
        t, w = self.shm.streams, self.shm.workers
        if not 0 <= i < len(t):
            raise UnknownStream(f"no stream {stream_id!r}")
        with self.shm.lock():
            e = t[i]
            if e["state"] != L.ST_OPEN or int(e["token"]) != token:
                raise UnknownStream(f"no stream {stream_id!r} (never opened, expired after "
                                    f"{self.config.stream_idle_timeout:g} s idle, or closed)")
            k, gen = int(e["worker"]), int(e["gen"])
            if int(w["gen"][k]) != gen:
                raise StreamLost("the worker holding this stream restarted; open a new stream")
            busy = int(e["busy"])
            if busy and busy != self.pid and pid_alive(busy):
                raise StreamBusy("another request is using this stream")
            if busy == self.pid:
                raise StreamBusy("another request is using this stream")
            t["busy"][i] = self.pid
        return Handle(i, token, k, gen, int(e["n_mels"]))

    def release(self, h: Handle) -> None:
        t = self.shm.streams
        if int(t["token"][h.index]) == h.token:
            t["last_used"][h.index] = time.monotonic()
            t["busy"][h.index] = 0

    def abort(self, slot: Slot | None, h: Handle) -> None:
        """Drop the stream's state on its worker (client gone or error); best effort."""
        try:
            if slot is None or not slot.owned:  # orphaned after a timeout: use another
                with self.producer.claim() as s:
                    self.call(s, h, L.OP_AUDIO_CLOSE, 0, ())
            else:
                self.call(slot, h, L.OP_AUDIO_CLOSE, 0, ())
        except ShmmelError:  # the worker is gone or busy: idle expiry or the supervisor
            self.release(h)  # frees the entry (expiry skips busy entries: mark it idle)

    # -- pushes ------------------------------------------------------------------------------
    def call(self, slot: Slot, h: Handle, op: int, nbytes: int, args: tuple[int, ...]) -> None:
        """One round trip of ``op`` on the stream's worker through ``slot`` (``nbytes`` of
        payload already in it); a refusal becomes BadRequest, any other failure an error."""
        slot.submit(h.worker, h.gen, op, nbytes, self.producer.next_seq(), args, h.index)
        slot.wait(self.config.request_timeout)
        status = int(slot.reply(copy=False).status)
        if status != L.R_OK:
            msg = bytes(slot.view(int(self.shm.slots["resp_len"][slot.index]))).decode(
                errors="replace")
            if status == L.R_BAD_INPUT:
                raise BadRequest(msg)
            raise RuntimeError(f"worker error: {msg}")

    def fits_oneshot(self, nbytes: int, fmt: int, n_mels: int, padding: int) -> bool:
        """Whether a whole upload of ``nbytes`` goes to a worker as one message: its
        samples and every frame they make (padding included) fit one slot."""
        samples = nbytes // L.FMT_WIDTH[fmt]
        frames = (samples + padding) // HOP_LENGTH + 1
        return nbytes <= self.shm.slot_bytes and frames * n_mels * 4 <= self.shm.slot_bytes

    def oneshot(self, slot: Slot, data: memoryview | bytes, fmt: int, n_mels: int,
                padding: int) -> FrameBatch:
        """A whole upload in one round trip: no stream entry, padding sent as a count, every
        frame back in the same slot (see :meth:`fits_oneshot`)."""
        if n_mels not in (80, 128):
            raise BadRequest("n_mels must be 80 or 128")
        w = self.shm.workers
        cuda_ready = bool(((w["state"] == L.W_READY) & (w["kind"] == L.K_CUDA)).any())
        kinds = [L.K_CUDA] if cuda_ready else list(L.MEL_KINDS)
        deadline = time.monotonic() + self.config.request_timeout
        k, gen = self.producer.pick_worker(kinds)
        for attempt in (0, 1):
            slot.view(len(data))[:] = data  # again on a retry: the dead worker may have written
            slot.submit(k, gen, L.OP_AUDIO_ONESHOT, len(data), self.producer.next_seq(),
                        (fmt, n_mels, padding))
            try:
                slot.wait(max(0.0, deadline - time.monotonic()))
                break
            except WorkerDied:  # stateless: once more on another worker (the slot is ours)
                if attempt:
                    raise
                try:
                    k, gen = self.producer.pick_worker(kinds)
                except ServiceUnavailable:
                    raise WorkerDied("the worker handling this request died") from None
        r = slot.reply(copy=False)
        if r.status != L.R_OK:
            msg = bytes(slot.view(int(self.shm.slots["resp_len"][slot.index]))).decode(
                errors="replace")
            if r.status == L.R_BAD_INPUT:
                raise BadRequest(msg)
            raise RuntimeError(f"worker error: {msg}")
        frames = np.frombuffer(slot.view(r.r1 * n_mels * 4), "<f4").reshape(r.r1, n_mels)
        return FrameBatch(r.r0, frames.copy(), r.f0, True)

    def finish(self, slot: Slot, h: Handle, extra_padding: int = 0) -> FrameBatch:
        """End the stream: its padding (and ``extra_padding``) as zeros, then the last frames
        and the final max. The worker frees the table entry."""
        pad = int(self.shm.streams["padding"][h.index]) + extra_padding
        return self.push(slot, h, bytes(2 * pad), L.FMT_S16LE, final=True)

    def push(self, slot: Slot, h: Handle, data: memoryview | bytes, fmt: int,
             final: bool) -> FrameBatch:
        """Send ``data`` (whole samples of ``fmt``) through ``slot``, in pieces that fit;
        return the frames it completed as one batch (raw log10, frame-major)."""
        width = L.FMT_WIDTH[fmt]
        if len(data) % width:
            raise BadRequest(f"{len(data)} bytes is not a whole number of {width}-byte samples")
        step = self.max_samples * width
        view = memoryview(data)
        parts: list[np.ndarray] = []
        start, running_max, pos = -1, float("-inf"), 0
        while True:
            piece = view[pos : pos + step]
            pos += len(piece)
            last = pos >= len(view)
            is_final = final and last
            slot.view(len(piece))[:] = piece
            self.call(slot, h, L.OP_AUDIO_PUSH, len(piece), (fmt, int(is_final)))
            r = slot.reply(copy=False)
            k = r.r1
            if k:
                frames = np.frombuffer(slot.view(k * h.n_mels * 4), "<f4").reshape(k, h.n_mels)
                parts.append(frames.copy())
                if start < 0:
                    start = r.r0
            else:
                start = r.r0 if start < 0 else start
            running_max = r.f0
            if last:
                break
        log10 = np.concatenate(parts) if len(parts) > 1 else (
            parts[0] if parts else np.empty((0, h.n_mels), np.float32))
        return FrameBatch(max(start, 0), log10, running_max, final)
