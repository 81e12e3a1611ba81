"""``bench audio --transcribe``: 30 s windows through ``POST /audio/transcribe``.

``streams`` client threads each post one 30 s window (raw s16le) back to back, keep-alive,
with ``?format=ndjson`` so that each window's record carries its ``batch`` (how many windows
shared its ``generate`` call) and ``tokens``. A window counts when it was sent inside the
measured interval (``warmup`` .. ``warmup + duration``); windows per second are the answers
completed in each whole 1 s interval. The latency of a window is upload, mel, features to a
whisper worker, batched ``generate`` and reply.

With ``openai`` the same window goes to OpenAI's ``POST /v1/audio/transcriptions`` as an
mp3 (encoded once with PyAV, 44.1 kHz mono) in a multipart form, ``response_format=
verbose_json``: the latency then includes the server's mp3 decode and resampling, which is
also timed on its own here (``decode_ms``: the same file decoded in this process).

The window is made by ``signals`` (or read from a file: the first 30 s, zero-padded).
Synthetic speech is not speech: Whisper tends to decode it to the maximum length, a worst
case; the mean tokens per window is reported so that runs stay comparable.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import wave
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..errors import ShmmelError
from . import signals
from .bench import Outcome, Source, host_info, open_target
from .hist import encode, merge, new_hist, record_s, summary_ms
from .report import Check, checks_json
from .runner import run_processes
from .text import auth_headers
from .textload import host_port, throughput

WINDOW_SECONDS = 30
N_SAMPLES = WINDOW_SECONDS * signals.RATE
PATH = "/audio/transcribe?format=ndjson"
OPENAI_PATH = "/v1/audio/transcriptions"
L16 = "audio/L16;rate=16000"
BOUNDARY = "shmmel-bench-3f9c2a"
MAX_BATCH = 64  # config: whisper_max_batch is 1..64


class TranscribeUnavailable(ShmmelError):
    """The instance answers 501: no [whisper] extra, or whisper_workers = 0."""


@dataclass(frozen=True)
class TranscribeLoad:
    streams: int = 4              # concurrent clients, one window in flight each
    duration: float = 30.0
    warmup: float = 5.0
    signal: str = "speech"
    seed: int = 0
    file: str | None = None       # WAV (16 kHz mono 16-bit) or raw s16le instead of signal
    timeout: float = 300.0        # one request
    openai: bool = False          # the window as an mp3 to /v1/audio/transcriptions


def window_pcm(load: TranscribeLoad) -> bytes:
    """Exactly one 30 s window of 16 kHz s16le: the file's first 30 s or the signal,
    zero-padded."""
    if load.file:
        path = Path(load.file)
        if path.suffix.lower() == ".wav":
            with wave.open(str(path)) as w:
                shape = (w.getframerate(), w.getnchannels(), w.getsampwidth())
                if shape != (signals.RATE, 1, 2):
                    raise ValueError(f"{path}: need 16 kHz mono 16-bit PCM, got {shape[0]} Hz, "
                                     f"{shape[1]} channels, {8 * shape[2]}-bit")
                pcm = np.frombuffer(w.readframes(min(w.getnframes(), N_SAMPLES)), "<i2")
        else:
            pcm = np.frombuffer(path.read_bytes()[: 2 * N_SAMPLES], "<i2")
    else:
        if load.signal not in signals.KINDS:
            raise ValueError(f"signal must be one of {', '.join(signals.KINDS)}")
        pcm = signals.to_s16(signals.generate(load.signal, WINDOW_SECONDS, seed=load.seed))  # type: ignore[arg-type]
    pcm = pcm[:N_SAMPLES]
    return np.concatenate([pcm, np.zeros(N_SAMPLES - pcm.size, "<i2")]).astype("<i2").tobytes()


def openai_request(pcm: bytes) -> tuple[bytes, str, bytes]:
    """(multipart body, its Content-Type, the mp3 in it) for /v1/audio/transcriptions."""
    from ..decode import encode_audio

    mp3 = encode_audio(np.frombuffer(pcm, "<i2"), 44100, "mp3", "libmp3lame", 1)
    b = BOUNDARY.encode()
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
             % (b, k, v) for k, v in ((b"model", b"whisper-1"),
                                      (b"response_format", b"verbose_json"))]
    parts.append(b"--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                 b"filename=\"window.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n" % b
                 + mp3 + b"\r\n--%s--\r\n" % b)
    return b"".join(parts), f"multipart/form-data; boundary={BOUNDARY}", mp3


def parse_openai(body: bytes) -> list[dict]:
    """A verbose_json answer -> one record a 30 s window (segments grouped by ``seek``)."""
    res = json.loads(body)
    windows: dict[int, list[int]] = {}
    for seg in res.get("segments") or []:
        windows.setdefault(int(seg["seek"]), []).extend(seg["tokens"])
    if "text" not in res:
        raise ValueError("no transcript in the answer")
    return [{"tokens": t} for t in windows.values()] or [{"tokens": []}]


def decode_ms(mp3: bytes, repeat: int = 20) -> dict[str, float]:
    """Median, min and max of decoding ``mp3`` to 16 kHz mono here, as the server does."""
    from ..decode import decode_audio

    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        decode_audio(mp3)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median": round(float(np.median(times)), 2), "min": round(min(times), 2),
            "max": round(max(times), 2), "repeat": repeat}


def check_available(url: str, timeout: float = 30.0, token: str = "") -> None:
    """Raise TranscribeUnavailable if the instance answers 501 (it does before reading the
    body, so an empty request is enough)."""
    host, port = host_port(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", PATH, b"", {"Content-Type": L16, **auth_headers(token)})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ShmmelError(f"{url}: {exc}") from None
    finally:
        conn.close()
    if resp.status == 501:
        try:
            why = json.loads(body).get("description") or json.loads(body).get("detail")
        except (ValueError, AttributeError):
            why = None
        raise TranscribeUnavailable(f"{url} cannot transcribe (HTTP 501): "
                                    f"{why or body[:200].decode(errors='replace')}")


def parse_windows(body: bytes) -> list[dict]:
    """The NDJSON answer -> its window records; raise ValueError on an error line."""
    out = []
    for line in body.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "error" in rec:
            raise ValueError(f"{rec['error']}: {rec.get('detail', '')}")
        if "window" in rec:
            out.append(rec)
    if not out:
        raise ValueError("no window record in the answer")
    return out


class _Client(threading.Thread):
    def __init__(self, host: str, port: int, body: bytes, load: TranscribeLoad, t0: float,
                 res: dict, lock: threading.Lock, progress: Any, token: str = "",
                 ctype: str = L16) -> None:
        super().__init__(daemon=True)
        self.auth = auth_headers(token)
        self.ctype = ctype
        self.path, self.parse = ((OPENAI_PATH, parse_openai) if load.openai
                                 else (PATH, parse_windows))
        self.host, self.port, self.body, self.load = host, port, body, load
        self.t0, self.res, self.lock, self.progress = t0, res, lock, progress
        self.start_at = t0 + load.warmup
        self.end_at = self.start_at + load.duration

    def measured(self, sent: float) -> bool:
        return self.start_at <= sent < self.end_at

    def error(self, why: str, sent: float) -> None:
        if self.measured(sent):
            with self.lock:
                self.res["errors"][why] += 1
                self.progress[1] += 1

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.load.timeout)
        hdr = {"Content-Type": self.ctype, **self.auth}
        time.sleep(max(0.0, self.t0 - time.monotonic()))
        try:
            while (sent := time.monotonic()) < self.end_at:
                try:
                    conn.request("POST", self.path, self.body, hdr)
                    resp = conn.getresponse()
                    raw = resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    self.error("connection", sent)
                    time.sleep(0.1)
                    continue
                done = time.monotonic()
                if resp.status != 200:
                    self.error(f"HTTP {resp.status}", sent)
                    time.sleep(0.1)
                    continue
                try:
                    windows = self.parse(raw)
                except ValueError:
                    self.error("stream error", sent)
                    continue
                if not self.measured(sent):
                    continue
                with self.lock:
                    record_s(self.res["hist"], done - sent)
                    self.res["windows"] += len(windows)
                    self.res["batches"] += [int(w["batch"]) for w in windows if "batch" in w]
                    self.res["tokens"] += [len(w.get("tokens", ())) for w in windows]
                    if done < self.end_at:
                        self.res["bins"].append(int(done - self.start_at))
                    self.progress[0] += 1
        finally:
            conn.close()


def _stats(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "max": None}
    return {"mean": round(float(np.mean(values)), 2), "max": int(max(values))}


def run_transcribe(url: str, load: TranscribeLoad, *, label: str = "transcribe",
                   console: Console | None = None, token: str = "") -> dict:
    """The load against ``url``; plain data plus the merged histogram under ``_hist``."""
    if load.streams < 1 or load.duration <= 0 or load.warmup < 0:
        raise ValueError("streams must be >= 1, duration > 0 and warmup >= 0")
    body, ctype, mp3 = window_pcm(load), L16, b""
    if load.openai:
        body, ctype, mp3 = openai_request(body)
    check_available(url, token=token)
    host, port = host_port(url)
    t0 = time.monotonic() + 0.3

    def target(_i: int, progress: Any) -> dict:
        res: dict = {"hist": new_hist(), "errors": Counter(), "windows": 0, "batches": [],
                     "tokens": [], "bins": []}
        lock = threading.Lock()
        clients = [_Client(host, port, body, load, t0, res, lock, progress, token, ctype)
                   for _ in range(load.streams)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        res["hist"], res["errors"] = encode(res["hist"]), dict(res["errors"])
        return res

    (part,) = run_processes(target, 1, label=label, t0=t0, warmup=load.warmup,
                            duration=load.duration, unit="windows", console=console,
                            timeout=load.timeout + 30)
    h = merge([part["hist"]])
    bins = [0] * max(1, int(load.duration))
    for b in part["bins"]:
        if 0 <= b < len(bins):
            bins[b] += 1
    errors = part["errors"]
    extra = {"mp3_bytes": len(mp3), "decode_ms": decode_ms(mp3)} if load.openai else {}
    return {"load": {"url": url, **{k: v for k, v in asdict(load).items() if k != "timeout"},
                     "window_s": WINDOW_SECONDS}, **extra,
            "windows": part["windows"], "windows_per_s": throughput(bins, load.duration),
            "latency_ms": summary_ms(h), "batch": _stats(part["batches"]),
            "tokens": _stats(part["tokens"]), "errors": errors,
            "error_count": sum(errors.values()), "_hist": h}


def checks(r: dict) -> list[Check]:
    """No published targets for transcription yet: what was measured, and no errors."""
    n, tp = r["windows"], r["windows_per_s"]["mean"]
    return [Check("windows transcribed", n, "", "≥ 1", n >= 1),
            Check("windows per second (mean of 1 s intervals)", tp, "win/s", "-", None),
            Check("errors", r["error_count"], "", "0", r["error_count"] == 0)]


def spawn_flags(flags: dict[str, Any], streams: int) -> dict[str, Any]:
    """One whisper worker (``targets.spawned`` defaults to none) whose batches can hold a
    window from every client."""
    batch = max(int(flags.get("whisper_max_batch") or 1), min(MAX_BATCH, streams))
    return {**flags, "whisper_workers": flags.get("whisper_workers") or 1,
            "whisper_max_batch": batch}


def transcribe_bench(src: Source, load: TranscribeLoad, *,
                     console: Console | None = None) -> Outcome:
    if src.spawn is not None:
        src = Source(spawn=spawn_flags(src.spawn, load.streams), log_dir=src.log_dir,
                     config_file=src.config_file)
    with open_target(src) as t:
        ours = run_transcribe(t.url, load, label="shmmel transcribe", console=console,
                              token=t.token)
    hist = ours.pop("_hist")
    data: dict[str, Any] = {"bench": "transcribe", "host": host_info(), "target": t.as_json(),
                            "shmmel": ours}
    cs = checks(ours)
    data["checks"] = checks_json(cs)
    return Outcome(data, {"shmmel": hist}, cs)
