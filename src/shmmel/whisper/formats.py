"""OpenAI's transcription response formats, from a :class:`~shmmel.whisper.http.WhisperJob`'s
windows: ``json``, ``text``, ``srt``, ``vtt``, ``verbose_json``; and the Server-Sent Events of
``stream=true`` (``transcript.text.delta`` ... ``transcript.text.done``).

Pure functions of plain data, tested in-process (tests/test_openai.py).
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

from . import N_FRAMES

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MEDIA = {"json": "application/json", "verbose_json": "application/json",
         "text": "text/plain; charset=utf-8", "srt": "application/x-subrip; charset=utf-8",
         "vtt": "text/vtt; charset=utf-8"}


def timestamp(seconds: float, sep: str) -> str:
    """``HH:MM:SS,mmm`` (srt, ``sep=","``) or ``HH:MM:SS.mmm`` (vtt)."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(segments: list[dict[str, Any]]) -> str:
    return "".join(f"{i}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n"
                   f"{s['text'].strip()}\n\n" for i, s in enumerate(segments, 1))


def vtt(segments: list[dict[str, Any]]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n{s['text'].strip()}\n\n"
        for s in segments)


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: UTF-8 bytes over their zlib-compressed size."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def usage(duration: float) -> dict[str, Any]:
    """OpenAI's duration usage (whisper-1 is billed by the second, rounded up)."""
    return {"type": "duration", "seconds": math.ceil(duration)}


def verbose_segments(windows: list[dict[str, Any]], scores: list[dict[str, float]]
                     ) -> list[dict[str, Any]]:
    """OpenAI's segment objects. ``seek`` is the window's first mel frame (as Whisper's);
    avg_logprob, no_speech_prob, temperature and compression_ratio are the window's."""
    out: list[dict[str, Any]] = []
    for w, sc in zip(windows, scores):
        ratio = compression_ratio(w["text"])
        for s in w["segments"]:
            out.append({"id": len(out), "seek": w["window"] * N_FRAMES, "start": s["start"],
                        "end": s["end"], "text": s["text"], "tokens": s["tokens"],
                        "temperature": sc.get("temperature", 0.0),
                        "avg_logprob": sc.get("avg_logprob", 0.0),
                        "compression_ratio": ratio,
                        "no_speech_prob": sc.get("no_speech_prob", 0.0)})
    return out


def render(fmt: str, result: dict[str, Any], windows: list[dict[str, Any]],
           scores: list[dict[str, float]]) -> tuple[str, bytes]:
    """(content type, body) of a whole transcript in ``fmt``; ``result`` is
    ``WhisperJob.result()``."""
    text, duration = result["text"], result["duration"]
    if fmt == "text":
        body = text + "\n"
    elif fmt == "srt":
        body = srt(result["segments"])
    elif fmt == "vtt":
        body = vtt(result["segments"])
    elif fmt == "verbose_json":
        body = json.dumps({"task": "transcribe", "language": "english", "duration": duration,
                           "text": text, "segments": verbose_segments(windows, scores),
                           "usage": usage(duration)})
    else:
        body = json.dumps({"text": text, "usage": usage(duration)})
    return MEDIA[fmt], body.encode()


def sse(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``event`` as JSON (OpenAI sends data lines only)."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class Deltas:
    """Text deltas whose concatenation is exactly the final text (``"".join(segment
    texts).strip()``, as :meth:`WhisperJob.result` makes it), one per decoded window."""

    def __init__(self) -> None:
        self.raw = ""
        self.sent = ""

    def add(self, window_text: str) -> str:
        self.raw += window_text
        now = self.raw.strip()
        delta, self.sent = now[len(self.sent):], now
        return delta

    def delta_event(self, segments: list[dict[str, Any]]) -> bytes:
        delta = self.add("".join(s["text"] for s in segments))
        return sse({"type": "transcript.text.delta", "delta": delta}) if delta else b""

    def done_event(self) -> bytes:
        return sse({"type": "transcript.text.done", "text": self.sent})
