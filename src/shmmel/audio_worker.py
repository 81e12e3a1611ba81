"""Worker side of audio streams: per-stream mel state, batched across streams.

The stream table in shared memory says which worker holds a stream; the state itself (a few
hundred samples and counters, see :mod:`shmmel.mel`) lives here, in the worker that owns it.
Every PUSH taken in one wake-up goes to the engine in one ``process()`` call, so a CUDA
worker computes the frames of many streams in one kernel launch.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import layout as L
from .channel import Inbox
from .config import Config
from .shm import Shm

log = logging.getLogger("shmmel.audio")

DTYPES = {L.FMT_S16LE: np.dtype("<i2"), L.FMT_F32LE: np.dtype("<f4")}


class AudioStreams:
    def __init__(self, config: Config, shm: Shm, index: int, gen: int, engine: Any) -> None:
        self.config, self.shm, self.index, self.gen, self.engine = config, shm, index, gen, engine
        self.states: dict[int, tuple[int, Any]] = {}  # table index -> (token, StreamState)
        self._next_expiry = 0.0
        self._samples = 0  # samples turned into frames since take_samples()

    def _bad(self, inbox: Inbox, j: int, status: int, message: str) -> int:
        data = message.encode()[: self.shm.slot_bytes]
        self.shm.payload[j, : len(data)] = memoryview(data)
        inbox.answer(j, status, len(data))
        return 1

    def _drop(self, k: int) -> None:
        if self.states.pop(k, None) is not None:
            t = self.shm.streams[k : k + 1]
            t["state"] = L.ST_FREE
            self.shm.workers["streams"][self.index] = len(self.states)

    def serve(self, taken: list[int], inbox: Inbox) -> int:
        """Answer OPEN/PUSH/CLOSE slots; all PUSHes go to the engine as one batch."""
        table = self.shm.streams
        errors = 0
        batch: list[tuple[Any, np.ndarray, bool]] = []
        batch_slots: list[tuple[int, int, bool]] = []
        for j in taken:
            op, n, k, arg0, arg1, arg2, _ = inbox.request(j)
            if not 0 <= k < len(table):
                errors += self._bad(inbox, j, L.R_ERROR, f"stream index {k} out of range")
                continue
            token = int(table["token"][k])
            if op == L.OP_AUDIO_OPEN:
                try:
                    st = self.engine.new_stream(n_mels=arg0)
                except ValueError as exc:
                    errors += self._bad(inbox, j, L.R_BAD_INPUT, str(exc))
                    continue
                self.states[k] = (token, st)
                self.shm.workers["streams"][self.index] = len(self.states)
                inbox.answer(j, L.R_OK, 0)
                continue
            entry = self.states.get(k)
            if entry is None or entry[0] != token:
                errors += self._bad(inbox, j, L.R_BAD_INPUT, "unknown or expired stream")
                continue
            if op == L.OP_AUDIO_CLOSE:
                self._drop(k)
                inbox.answer(j, L.R_OK, 0)
                continue
            fmt, final = arg0, bool(arg1)
            dt = DTYPES.get(fmt)
            if dt is None or n % dt.itemsize:
                errors += self._bad(inbox, j, L.R_BAD_INPUT, "bad sample format or byte count")
                continue
            chunk = np.frombuffer(self.shm.payload[j, :n], dtype=dt)
            if fmt == L.FMT_F32LE and not np.isfinite(chunk).all():
                errors += self._bad(inbox, j, L.R_BAD_INPUT, "float audio contains NaN or Inf")
                continue
            batch.append((entry[1], chunk, final))
            batch_slots.append((j, k, final))
        if batch:
            try:
                results = self.engine.process(batch)
            except ValueError as exc:  # a stream-level problem: fail the batch's requests
                for j, _k, _f in batch_slots:
                    errors += self._bad(inbox, j, L.R_BAD_INPUT, str(exc))
                return errors
            for (j, k, final), (_st, chunk, _f), fb in zip(batch_slots, batch, results):
                frames = np.ascontiguousarray(fb.log10, dtype=np.float32)
                nbytes = frames.nbytes
                self.shm.payload[j, :nbytes] = frames.reshape(-1).view(np.uint8)
                t = table[k : k + 1]
                t["frames"] += frames.shape[0]
                t["samples"] += chunk.shape[0]
                self._samples += chunk.shape[0]
                if final:
                    self._drop(k)
                inbox.answer(j, L.R_OK, nbytes, r0=fb.start, r1=frames.shape[0],
                             f0=fb.running_max, f1=1.0 if final else 0.0)
        return errors

    def take_samples(self) -> int:
        n, self._samples = self._samples, 0
        return n

    def expire(self, now: float) -> None:
        """Drop streams idle longer than stream_idle_timeout (checked about once a second)."""
        if now < self._next_expiry or not self.states:
            return
        self._next_expiry = now + 1.0
        table = self.shm.streams
        limit = self.config.stream_idle_timeout
        for k in list(self.states):
            if table["busy"][k] == 0 and now - table["last_used"][k] > limit:
                log.info("worker %d: stream %d idle for %.0f s, dropped", self.index, k, limit)
                self._drop(k)

    def close(self) -> None:
        for k in list(self.states):
            self._drop(k)
