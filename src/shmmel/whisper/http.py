"""``POST /audio/transcribe``: audio in, Whisper's tokens and text out.

The audio goes through the upload pipeline (:mod:`shmmel.upload`), as
``/audio/stream?windows=true`` does: the body is cut into Whisper's 30 s windows, each its
own mel stream on a mel worker. Each
completed window's normalised (80, 3000) features leave through :class:`WhisperJob`: a
stream-calls entry pinned to a whisper worker, ``OP_WHISPER_FEATURES`` pieces that fit a
slot, then ``OP_WHISPER_DECODE``, whose reply is that window's tokens and segments (JSON).
The whisper worker batches windows of concurrent requests into one ``generate`` call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import falcon
import numpy as np

from .. import layout as L
from .. import wire
from ..audio_http import media_of, output_media
from ..upload import AudioBody, Spec, Upload, WindowSink
from ..channel import Producer, Slot
from ..config import Config
from ..errors import BadRequest, ServiceUnavailable, ShmmelError
from ..mel import SAMPLE_RATE
from ..audio_calls import AudioCalls
from ..stream_table import Handle
from . import INSTALL_HINT, N_MELS, WINDOW_BYTES, WINDOW_SECONDS, whisper_missing

log = logging.getLogger("shmmel.whisper")


def unavailable_reason(config: Config) -> str | None:
    """Why this instance cannot transcribe (the 501 detail), or None."""
    missing = whisper_missing()
    if missing is not None:
        return (f"transcription needs the optional [whisper] extra ({missing} is not "
                f"installed); {INSTALL_HINT}")
    if config.whisper_workers == 0:
        return ("transcription is off (whisper_workers = 0); set whisper_workers >= 1 "
                "(the [whisper] extra is needed: pip install 'shmmel[whisper]')")
    return None


class WhisperJob:
    """The HTTP side of one transcription: a job on a whisper worker, fed window by window
    through one slot, and the transcript assembled from the windows' replies."""

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls, slot: Slot,
                 emit: Callable[[dict[str, Any]], bytes] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.config, self.producer, self.calls, self.slot = config, producer, calls, slot
        self.emit = emit  # streaming: encode each window's record as it is decoded
        self.options = options  # {"prompt": str, "temperature": float}; None: greedy, none
        self.handle: Handle | None = None
        self.windows: list[dict[str, Any]] = []
        self.scores: list[dict[str, float]] = []  # per window: avg_logprob, no_speech_prob, ...
        self.duration = 0.0

    def open(self) -> None:
        try:
            k, gen = self.producer.least_loaded((L.K_WHISPER,))
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(f"no whisper worker can take it: {exc}") from None
        h = self.calls.allocate(k, gen, N_MELS, 0)
        try:
            opts = json.dumps(self.options).encode() if self.options else b""
            if len(opts) > self.slot.capacity:
                raise BadRequest("the prompt is too long")
            self.slot.view(len(opts))[:] = opts
            self.calls.call(self.slot, h, L.OP_WHISPER_OPEN, len(opts), ())
        except BaseException:
            self.calls.table.free(h.index, h.token)  # the worker holds nothing
            raise
        self.handle = h

    def close(self) -> None:
        """Drop the job on its worker (which frees the calls entry); best effort."""
        h, self.handle = self.handle, None
        if h is None:
            return
        try:
            if self.slot.owned:
                self.calls.call(self.slot, h, L.OP_WHISPER_CLOSE, 0, ())
            else:  # orphaned after a timeout (the worker may still write it): use another
                with self.producer.claim() as s:
                    self.calls.call(s, h, L.OP_WHISPER_CLOSE, 0, ())
        except ShmmelError:  # worker gone or busy: the supervisor or idle expiry frees it
            self.calls.release(h)

    def decode(self, features: np.ndarray) -> tuple[dict[str, Any], int]:
        """Send one window's features in slot-sized pieces, decode; return the reply and
        the size of the batch it was decoded in."""
        assert self.handle is not None
        h, slot = self.handle, self.slot
        data = memoryview(np.ascontiguousarray(features, "<f4")).cast("B")
        assert len(data) == WINDOW_BYTES
        step = slot.capacity - slot.capacity % 4
        for pos in range(0, len(data), step):
            piece = data[pos : pos + step]
            slot.view(len(piece))[:] = piece
            self.calls.call(slot, h, L.OP_WHISPER_FEATURES, len(piece), (pos,))
        self.calls.call(slot, h, L.OP_WHISPER_DECODE, 0, (WINDOW_BYTES,))
        reply = slot.reply()
        return json.loads(reply.data), int(reply.r1)

    def window(self, index: int, features: np.ndarray, samples: int) -> bytes:
        """The WindowSink hook: decode, put absolute times on the segments, record."""
        reply, batch = self.decode(features)
        offset = index * WINDOW_SECONDS
        dur = samples / SAMPLE_RATE
        segments = []
        for start, end, text, ids in reply["segments"]:
            end = dur if end is None else min(end, dur)
            segments.append({"start": round(offset + min(start, end), 3),
                             "end": round(offset + end, 3), "text": text, "tokens": ids})
        rec = {"window": index, "offset": offset, "duration": round(dur, 6),
               "text": "".join(s["text"] for s in segments).strip(),
               "tokens": reply["tokens"], "segments": segments, "batch": batch}
        self.windows.append(rec)
        self.scores.append({k: reply[k] for k in ("avg_logprob", "no_speech_prob",
                                                   "temperature") if k in reply})
        self.duration = offset + dur
        return self.emit(rec) if self.emit else b""

    def result(self) -> dict[str, Any]:
        segments = [s for w in self.windows for s in w["segments"]]  # "batch" stays out
        return {"text": "".join(s["text"] for s in segments).strip(),
                "tokens": [t for w in self.windows for t in w["tokens"]],
                "segments": segments, "windows": len(self.windows),
                "duration": round(self.duration, 6)}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class TranscribeResource:
    """POST /audio/transcribe"""

    OUTPUTS = (wire.JSON, wire.NDJSON)

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls) -> None:
        self.config, self.producer, self.calls = config, producer, calls
        self.unavailable = unavailable_reason(config)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.unavailable:
            raise falcon.HTTPNotImplemented(title="Not Implemented",
                                            description=self.unavailable)
        media = media_of(req)
        out = output_media(req, wire.JSON, self.OUTPUTS)
        body = AudioBody(req, media, self.config.max_body_bytes)
        slot = self.producer.claim()
        job = WhisperJob(self.config, self.producer, self.calls, slot,
                         _line if out == wire.NDJSON else None)
        up = Upload(self.calls, slot, Spec(body.fmt, N_MELS, windows=True),
                    WindowSink(job.window))
        try:
            job.open()
            head = up.start(body)
        except BaseException:
            self._end(up, job)
            raise
        resp.content_type = out
        if out == wire.NDJSON:
            header = self.calls.shm.header  # on shutdown: the last partial window

            def final() -> bytes:
                res = job.result()
                return _line({"final": True, "windows": res["windows"],
                              "duration": res["duration"], "text": res["text"]})

            resp.stream = up.stream(head, body, wire.NDJSON,
                                    lambda: header["state"] == L.INST_STOPPING,
                                    tail=final, on_close=job.close)
            return
        try:
            up.to_end(body)
        finally:
            self._end(up, job)
            body.reader.drain()  # if the answer ends before the upload did
        resp.media = job.result()

    @staticmethod
    def _end(up: Upload, job: WhisperJob) -> None:
        try:
            up.abort()
            job.close()
        finally:
            up.slot.release()


def add_routes(app: falcon.App, config: Config, producer: Producer, calls: AudioCalls) -> None:
    app.add_route("/audio/transcribe", TranscribeResource(config, producer, calls))
