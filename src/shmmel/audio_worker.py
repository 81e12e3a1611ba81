"""Worker side of audio streams: per-stream mel state, batched across streams.

The stream table in shared memory says which worker holds a stream; the state itself (a few
hundred samples and counters, see :mod:`shmmel.mel`) lives here, in the worker that owns it.
Every PUSH taken in one wake-up goes to the engine in one ``process()`` call, so a CUDA
worker computes the frames of many streams in one kernel launch.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np

from . import layout as L
from .config import Config
from .inbox import Inbox
from .mel.stream import normalise_into
from .osutil import pid_alive
from .shm import Shm
from .stream_table import StreamTable

log = logging.getLogger("shmmel.audio")

DTYPES = {L.FMT_S16LE: np.dtype("<i2"), L.FMT_F32LE: np.dtype("<f4")}
ONESHOT, UPLOAD = -1, -2  # batch items that are no table entry: a one-shot, an upload's stream


class MelJobs:
    """A mel worker's streams: the state of each (``mel.StreamState``, keyed by its stream-table
    entry) and the batches of pushes, one engine call per wake-up."""

    def __init__(self, config: Config, shm: Shm, index: int, gen: int, engine: Any) -> None:
        self.config, self.shm, self.index, self.gen, self.engine = config, shm, index, gen, engine
        self.table = StreamTable(shm)
        self.states: dict[int, tuple[int, Any]] = {}  # table index -> (token, StreamState)
        # table index -> (lease, time of its last piece): the request whose pieces the stream
        # takes now (one request at a time; another one's push is refused, R_BUSY = 409)
        self.leases: dict[int, tuple[int, float]] = {}
        # slot index -> (token, StreamState, time of its last push): uploads' streams
        # (layout.PUSH_SLOT), one per slot at most; a state an upload left (its HTTP process
        # died, say) is replaced by the slot's next upload or dropped by idle expiry
        self.uploads: dict[int, tuple[int, Any, float]] = {}
        self._next_expiry = 0.0
        self._samples = 0  # samples turned into frames since take_samples()
        # each slot's payload as float32: the engine writes a reply's frames straight there
        self.out_views = shm.payload.view(np.float32)
        if hasattr(engine, "register_host"):
            # page-lock the data segment once: frames then go from the GPU into the reply
            # slot by DMA (or the kernel writes them there), with no staging copy
            try:
                engine.register_host(shm.payload)
            except Exception as exc:  # noqa: BLE001 - fall back to the engine's staging
                log.warning("worker %d: could not page-lock the data segment (%s); frames "
                            "are staged", index, exc)

    def _drop(self, k: int) -> None:
        self.leases.pop(k, None)
        entry = self.states.pop(k, None)
        if entry is not None:
            self.table.free(k, entry[0])
            self.shm.workers["streams"][self.index] = len(self.states)

    def serve(self, taken: list[tuple[int, tuple[int, ...]]], inbox: Inbox) -> int:
        """Answer OPEN/PUSH/CLOSE/ONESHOT slots (``(slot, decoded request)`` pairs, decoded
        once by the worker loop); all pushes go to the engine as one batch, whose frames the
        engine writes straight into each request's reply slot."""
        table = self.table
        errors = 0
        batch: list[tuple[Any, np.ndarray, bool]] = []
        # (slot, stream index or ONESHOT or UPLOAD, final, whether the push opened the stream,
        # whether its frames go back normalised: layout.PUSH_PROVISIONAL)
        batch_slots: list[tuple[int, int, bool, bool, bool]] = []
        pushed: set[int] = set()  # streams with a push in this batch (one per stream)
        now = -1.0
        for j, (op, n, k, arg0, arg1, arg2, arg3) in taken:
            if op == L.OP_AUDIO_ONESHOT:  # no table entry: state made, used, dropped here
                dt = DTYPES.get(arg0)
                if dt is None or n % dt.itemsize:
                    errors += inbox.fail(j, L.R_BAD_INPUT, "bad sample format or byte count")
                    continue
                try:
                    st = self.engine.new_stream(n_mels=arg1, padding=arg2)
                except ValueError as exc:
                    errors += inbox.fail(j, L.R_BAD_INPUT, str(exc))
                    continue
                batch.append((st, np.frombuffer(self.shm.payload[j, :n], dtype=dt), True))
                batch_slots.append((j, ONESHOT, True, False,
                                    bool(arg3 & L.ONESHOT_PROVISIONAL)))
                continue
            if arg1 & L.PUSH_SLOT and op in (L.OP_AUDIO_PUSH, L.OP_AUDIO_CLOSE):
                # an upload's stream, under its slot: no table entry, no lease (the upload
                # holds the slot, so one request at a time is given)
                if op == L.OP_AUDIO_CLOSE:
                    self.uploads.pop(j, None)
                    inbox.answer(j, L.R_OK, 0)
                    continue
                dt = DTYPES.get(arg0)
                if dt is None or n % dt.itemsize:
                    self.uploads.pop(j, None)
                    errors += inbox.fail(j, L.R_BAD_INPUT, "bad sample format or byte count")
                    continue
                if now < 0:
                    now = time.monotonic()
                if arg1 & L.PUSH_OPEN:
                    try:
                        st = self.engine.new_stream(n_mels=arg1 >> L.PUSH_MELS_SHIFT)
                    except ValueError as exc:
                        self.uploads.pop(j, None)
                        errors += inbox.fail(j, L.R_BAD_INPUT, str(exc))
                        continue
                else:
                    up = self.uploads.get(j)
                    if up is None or up[0] != arg2:
                        errors += inbox.fail(j, L.R_NO_STREAM,
                                             "no such stream (its upload is over)")
                        continue
                    st = up[1]
                self.uploads[j] = (arg2, st, now)
                batch.append((st, np.frombuffer(self.shm.payload[j, :n], dtype=dt),
                              bool(arg1 & L.PUSH_FINAL)))
                batch_slots.append((j, UPLOAD, bool(arg1 & L.PUSH_FINAL), False,
                                    bool(arg1 & L.PUSH_PROVISIONAL)))
                continue
            if not 0 <= k < len(table):
                errors += inbox.fail(j, L.R_ERROR, f"stream index {k} out of range")
                continue
            token = arg2  # the request's: a stale stream id never reaches a reused entry
            if op == L.OP_AUDIO_OPEN:
                try:
                    st = self.engine.new_stream(n_mels=arg0)
                except ValueError as exc:
                    errors += inbox.fail(j, L.R_BAD_INPUT, str(exc))
                    continue
                self.states[k] = (token, st)
                self.shm.workers["streams"][self.index] = len(self.states)
                inbox.answer(j, L.R_OK, 0)
                continue
            opens = op == L.OP_AUDIO_PUSH and bool(arg1 & L.PUSH_OPEN)
            entry = None if opens else self.states.get(k)
            if not opens and (entry is None or entry[0] != token):
                errors += inbox.fail(j, L.R_NO_STREAM, "no such stream (expired or closed)")
                continue
            if op == L.OP_AUDIO_CLOSE:
                self._drop(k)
                inbox.answer(j, L.R_OK, 0)
                continue
            fmt, final = arg0, bool(arg1 & L.PUSH_FINAL)
            dt = DTYPES.get(fmt)
            if dt is None or n % dt.itemsize:
                errors += inbox.fail(j, L.R_BAD_INPUT, "bad sample format or byte count")
                continue
            if opens:  # a push that opens its stream (a fresh entry: its token is the new one)
                if k in pushed:
                    errors += inbox.fail(j, L.R_BUSY, "another request is using this stream")
                    continue
                try:
                    entry = (token, self.engine.new_stream(n_mels=arg1 >> L.PUSH_MELS_SHIFT))
                except ValueError as exc:
                    errors += inbox.fail(j, L.R_BAD_INPUT, str(exc))
                    continue
                self.leases.pop(k, None)  # a lease of the entry's last stream is void
                self.states[k] = entry
                self.shm.workers["streams"][self.index] = len(self.states)
            if k in pushed or not self._lease(k, arg3, bool(arg1 & L.PUSH_LAST_PIECE)):
                errors += inbox.fail(j, L.R_BUSY, "another request is using this stream")
                continue
            assert entry is not None
            batch.append((entry[1], np.frombuffer(self.shm.payload[j, :n], dtype=dt), final))
            batch_slots.append((j, k, final, opens, bool(arg1 & L.PUSH_PROVISIONAL)))
            pushed.add(k)
        if batch:
            errors += self._compute(batch, batch_slots, inbox)
        return errors

    def _compute(self, batch: list[tuple[Any, np.ndarray, bool]],
                 batch_slots: list[tuple[int, int, bool, bool, bool]], inbox: Inbox) -> int:
        """One engine call for the batch; the engine checks the audio (once). A bad item
        (NaN in float audio, say) fails the whole call and changes no stream: then each item
        goes alone, so only the bad ones are refused. A refused push that opened its stream
        leaves no state (the HTTP side frees the entry, as after a refused OPEN)."""
        outs = [self.out_views[s[0]] for s in batch_slots]
        try:
            results = self.engine.process(batch, out=outs)
        except ValueError as exc:
            if len(batch) > 1:
                return sum(self._compute([b], [s], inbox) for b, s in zip(batch, batch_slots))
            j, k, _final, opened, _norm = batch_slots[0]
            if k == UPLOAD:  # its upload ends here
                self.uploads.pop(j, None)
            self.leases.pop(k, None)  # its request ends here
            if opened and self.states.pop(k, None) is not None:
                self.shm.workers["streams"][self.index] = len(self.states)
            return inbox.fail(batch_slots[0][0], L.R_BAD_INPUT,
                              re.sub(r"^item \d+: ", "", str(exc)))
        for (j, k, final, _o, norm), (_st, chunk, _f), fb in zip(batch_slots, batch, results):
            frames = fb.log10.shape[0]
            if norm and frames:  # in place, in the reply slot (the engine wrote them there)
                normalise_into(fb.log10, fb.running_max, fb.log10)
            self._samples += chunk.shape[0]
            if k >= 0:
                self.table.account(k, frames, chunk.shape[0])
                if final:
                    self._drop(k)
            elif k == UPLOAD and final:
                self.uploads.pop(j, None)
            inbox.answer(j, L.R_OK, frames * fb.log10.shape[1] * 4, r0=fb.start, r1=frames,
                         f0=fb.running_max, f1=1.0 if final else 0.0)
        return 0

    def _lease(self, k: int, lease: int, last: bool) -> bool:
        """Whether a piece of request ``lease`` may go to stream ``k`` now: no other request
        holds it (or its holder died, or sent no piece for request_timeout); the piece takes
        the lease, the last piece of its request gives it back."""
        now = time.monotonic()
        cur = self.leases.get(k)
        if (cur is not None and cur[0] != lease
                and now - cur[1] < self.config.request_timeout and pid_alive(cur[0] >> 32)):
            return False
        if last:
            self.leases.pop(k, None)
        else:
            self.leases[k] = (lease, now)
        return True

    def take_samples(self) -> int:
        n, self._samples = self._samples, 0
        return n

    def expire(self, now: float) -> None:
        """Drop streams idle longer than stream_idle_timeout (checked about once a second)."""
        if now < self._next_expiry or not (self.states or self.uploads):
            return
        self._next_expiry = now + 1.0
        limit = self.config.stream_idle_timeout
        for j in [j for j, up in self.uploads.items() if now - up[2] > limit]:
            log.info("worker %d: the upload in slot %d sent nothing for %.0f s, dropped",
                     self.index, j, limit)
            del self.uploads[j]
        for k in list(self.states):
            lease = self.leases.get(k)
            if lease is not None and now - lease[1] < limit:
                continue  # a request is sending its pieces
            if self.table.idle(k, now, limit):
                log.info("worker %d: stream %d idle for %.0f s, dropped", self.index, k, limit)
                self._drop(k)

    def close(self) -> None:
        self.uploads.clear()
        for k in list(self.states):
            self._drop(k)
