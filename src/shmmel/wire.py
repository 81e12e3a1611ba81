"""Output encodings of mel frames (the response side of the audio API).

* ``application/x-ndjson`` - one JSON object per line, as frames are computed::

    {"window": 0, "offset": 0, "frames": 37, "running_max": -1.83, "mel": [[...80...], ...]}
    ...
    {"window": 0, "offset": 300, "frames": 2, "running_max": -1.5, "mel": [...],
     "final": true, "final_max": -1.5, "floor": -0.875, "total_frames": 302}

  A stream cut short by a shutdown of the service ends with a normal final line (for the
  audio received so far) that also carries ``"reason": "shutdown"``.
  ``mel`` is frame-major (frames x n_mels) and *provisionally* normalised with the running
  max; apply ``max(value, floor)`` with the final line's ``floor`` (float32) to get exactly
  Whisper's output. An error after the response started arrives as a last line
  ``{"error": ..., "detail": ...}``.

* ``application/octet-stream`` - a sequence of records, little-endian::

    magic "SMEL" | u32 flags (1 final, 2 error) | i32 window | i64 offset | u32 frames |
    u32 n_mels | f32 running_max | f32 final_max (NaN unless final)      (36 bytes)
    then frames x n_mels float32, provisional as above (for an error record: u32 length and
    a UTF-8 JSON error body instead)

* ``application/json`` and ``application/x-npy`` - the whole result at the end, normalised
  exactly like Whisper: shape (n_mels, T), or (windows, n_mels, 3000) with ``windows=true``.
"""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np

from .errors import http_status
from .mel import FrameBatch, final_floor
from .mel.stream import normalise_into

NDJSON, JSON, BINARY, NPY = ("application/x-ndjson", "application/json",
                             "application/octet-stream", "application/x-npy")
FORMATS = {"ndjson": NDJSON, "json": JSON, "binary": BINARY, "npy": NPY}
STREAMING = (NDJSON, BINARY)
RECORD = struct.Struct("<4sIiqIIff")
F_FINAL, F_ERROR = 1, 2


def floor_of(final_max: float | None) -> float | None:
    return None if final_max is None else float(final_floor(final_max))


def ndjson_line(window: int, offset: int, provisional: np.ndarray, running_max: float,
                final_max: float | None = None, total: int | None = None,
                final: bool = False, reason: str | None = None) -> bytes:
    rec: dict = {"window": window, "offset": offset, "frames": int(provisional.shape[0]),
                 "running_max": None if math.isinf(running_max) else running_max,
                 "mel": provisional.tolist()}
    if final:
        rec.update(final=True, final_max=final_max, floor=floor_of(final_max),
                   total_frames=total)
        if reason:
            rec["reason"] = reason
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def batch_record(window: int, fb: FrameBatch) -> bytes:
    """``fb`` as one binary record. Frames a worker normalised already (``fb.normalised``)
    are joined to the header in one copy that keeps the GIL; raw ones are normalised
    straight into the record's buffer (:func:`~shmmel.mel.stream.normalise_into`: one
    allocation and one copy out instead of four temporaries)."""
    k, n_mels = fb.log10.shape
    final_max = math.nan if math.isinf(fb.running_max) else fb.running_max
    head = (b"SMEL", F_FINAL if fb.final else 0, window, fb.start, k, n_mels, fb.running_max,
            final_max)
    if fb.normalised:
        # bytes.join copies with the GIL held below 1 MiB; numpy's copies of over 500
        # elements let it go, and under load each let-go is a wait to get it back
        return b"".join((RECORD.pack(*head),
                         fb.log10 if fb.log10.flags.c_contiguous else fb.log10.tobytes()))
    buf = np.empty(RECORD.size + 4 * k * n_mels, np.uint8)  # private memory, not shared
    RECORD.pack_into(buf, 0, *head)
    if k:
        normalise_into(fb.log10, fb.running_max, buf[RECORD.size:].view("<f4").reshape(k, n_mels))
    return buf.tobytes()


def error_record(media: str, exc: BaseException) -> bytes:
    """An error in-band, for a response already streaming: the status phrase and detail of
    errors.http_status (the same mapping as the app's answers), as ``media`` carries it."""
    _code, phrase, detail = http_status(exc)
    return error_bytes(media, phrase, detail)


def error_bytes(media: str, title: str, detail: str) -> bytes:
    body = json.dumps({"error": title, "detail": detail}).encode()
    if media == BINARY:
        return RECORD.pack(b"SMEL", F_ERROR, -1, 0, 0, 0, math.nan, math.nan) + \
            struct.pack("<I", len(body)) + body
    return body + b"\n"


def whole_json(mel: np.ndarray, maxima: list[float | None]) -> bytes:
    """mel: (n_mels, T) or (windows, n_mels, 3000), already normalised."""
    out = {"shape": list(mel.shape), "max": maxima if mel.ndim == 3 else maxima[0],
           "mel": mel.tolist()}
    return json.dumps(out, separators=(",", ":")).encode()


def whole_npy(mel: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(mel, "<f4"), allow_pickle=False)
    return buf.getvalue()


class Encoder:
    """Turns the frames of an upload into the response body, window by window.

    ``frames(window, fb, samples)`` gets each batch of frames (a FrameBatch; ``fb.final`` at
    the end of a window) and returns the bytes to send now; ``result()`` the bytes to send
    at the end (the whole answer, for JSON and .npy). ``keeps_frames``: whether it keeps
    ``fb.log10`` past the call (then it must be its own copy, not a view of a slot).
    ``provisional``: whether it only wants :meth:`FrameBatch.provisional` of each batch,
    so a push of one piece may come back normalised by the worker (``fb.normalised``)."""

    keeps_frames = True
    provisional = False

    def frames(self, window: int, fb: FrameBatch, samples: int, reason: str | None) -> bytes:
        raise NotImplementedError

    def result(self) -> bytes:
        return b""


class StreamEncoder(Encoder):
    """NDJSON lines or binary records, provisionally normalised, as frames are computed."""

    keeps_frames = False  # encodes each batch at once: the frames may be a view of a slot
    provisional = True

    def __init__(self, media: str) -> None:
        self.media = media

    def frames(self, window: int, fb: FrameBatch, samples: int, reason: str | None) -> bytes:
        if not fb.final and fb.log10.shape[0] == 0:
            return b""
        if self.media == BINARY:
            return batch_record(window, fb)
        final_max = None if math.isinf(fb.running_max) else fb.running_max
        total = fb.start + fb.log10.shape[0]
        return ndjson_line(window, fb.start, fb.provisional(), fb.running_max, final_max,
                           total, fb.final, reason if fb.final else None)


class WholeEncoder(Encoder):
    """JSON or .npy of the whole result, normalised exactly, at the end."""

    def __init__(self, media: str, n_mels: int, windows: bool) -> None:
        self.media, self.n_mels, self.windows = media, n_mels, windows
        self.parts: dict[int, list[np.ndarray]] = {}
        self.maxima: dict[int, float | None] = {}

    def frames(self, window: int, fb: FrameBatch, samples: int, reason: str | None) -> bytes:
        self.parts.setdefault(window, []).append(fb.log10)
        if fb.final:
            self.maxima[window] = None if math.isinf(fb.running_max) else fb.running_max
        return b""

    def result(self) -> bytes:
        mels, maxima = [], []
        for w in sorted(self.parts):
            parts, final_max = self.parts[w], self.maxima.get(w)
            log10 = np.concatenate(parts) if parts else np.empty((0, self.n_mels), np.float32)
            fb = FrameBatch(0, log10, float("-inf") if final_max is None else final_max, True)
            mels.append(np.ascontiguousarray(fb.provisional().T))
            maxima.append(final_max)
        mel = np.stack(mels) if self.windows else mels[0]
        return whole_npy(mel) if self.media == NPY else whole_json(mel, maxima)


def encoder(media: str, n_mels: int, windows: bool) -> Encoder:
    return StreamEncoder(media) if media in STREAMING else WholeEncoder(media, n_mels, windows)
