"""``bench audio``: concurrent audio streams, in two phases over the same streams.

* **chunks** - each stream opens a session (``POST /audio/streams``), sends its file in
  1-second chunks (``POST /audio/streams/{id}``, keep-alive, binary records back), paced in
  real time or as fast as answers come, then finishes it (``DELETE``), and starts again.
  Per-chunk latency is measured from the chunk's intended send time (real-time pacing:
  ``file start + i x chunk``), so a slow answer delays nothing unnoticed. The first chunk
  of each file gives the first-frame latency.
* **files** - each stream posts the whole file to ``/audio/stream?format=binary`` (one
  request, Content-Length), back to back: end-to-end latency, real-time factor
  (audio seconds / latency) and audio seconds per second of wall time.

The first file of each process is checked against ``shmmel.mel.log_mel_spectrogram``.
"""

from __future__ import annotations

import http.client
import json
import math
import statistics
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rich.console import Console

from . import signals
from .hist import encode, merge, new_hist, record_s, summary_ms
from .runner import run_processes
from .text import auth_headers
from .textload import host_port, split, throughput

Pace = Literal["realtime", "fast"]
RECORD = struct.Struct("<4sIiqIIff")  # shmmel.wire.RECORD
L16 = "audio/L16;rate=16000"
BINARY = "application/octet-stream"
DISTINCT_SIGNALS = 16  # different audio files a load sends (see _phase)


@dataclass(frozen=True)
class AudioLoad:
    streams: int = 8
    duration: float = 10.0        # per phase
    warmup: float = 1.0
    pace: Pace = "realtime"
    file_seconds: float = 10.0
    chunk_seconds: float = 1.0
    procs: int = 1
    signal: str = "speech"
    n_mels: int = 80
    verify: bool = True
    bare: bool = False            # the baseline answers zeros: do not parse
    phases: tuple[str, ...] = ("chunks", "files")


def parse_records(data: bytes) -> tuple[list[np.ndarray], float | None]:
    """Binary records -> (provisional frame blocks, final max or None)."""
    blocks, final_max, pos = [], None, 0
    while pos < len(data):
        magic, flags, _w, _off, k, n_mels, _rmax, fmax = RECORD.unpack_from(data, pos)
        if magic != b"SMEL":
            raise ValueError(f"bad record magic {magic!r} at byte {pos}")
        pos += RECORD.size
        if flags & 2:
            (n,) = struct.unpack_from("<I", data, pos)
            raise ValueError(data[pos + 4: pos + 4 + n].decode(errors="replace"))
        blocks.append(np.frombuffer(data, "<f4", k * n_mels, pos).reshape(k, n_mels))
        pos += 4 * k * n_mels
        if flags & 1:
            final_max = None if math.isnan(fmax) else float(fmax)
    return blocks, final_max


def mel_difference(audio: np.ndarray, blocks: list[np.ndarray], final_max: float | None,
                   n_mels: int) -> float:
    """max |received - log_mel_spectrogram(audio)| once the final floor is applied."""
    from ..mel import final_floor, log_mel_spectrogram

    ref = log_mel_spectrogram(audio, n_mels)
    got = np.concatenate(blocks) if blocks else np.empty((0, n_mels), np.float32)
    if final_max is not None:
        got = np.maximum(got, final_floor(final_max))
    if got.T.shape != ref.shape:
        return math.inf
    return float(np.max(np.abs(got.T - ref))) if ref.size else 0.0


class _Stream(threading.Thread):
    """One stream of one phase; figures go into the process's shared Result under a lock."""

    def __init__(self, phase: str, k: int, load: AudioLoad, host: str, port: int,
                 audio: np.ndarray, t0: float, res: dict, lock: threading.Lock,
                 verify: bool, progress, token: str = "") -> None:
        super().__init__(daemon=True)
        self.auth = auth_headers(token)
        self.phase, self.k, self.load, self.audio = phase, k, load, audio
        self.host, self.port, self.t0, self.res, self.lock = host, port, t0, res, lock
        self.verify, self.progress = verify, progress
        self.pcm = audio.astype("<i2").tobytes()
        step = int(signals.RATE * load.chunk_seconds) * 2
        self.chunks = [self.pcm[i:i + step] for i in range(0, len(self.pcm), step)]
        self.start_at = t0 + load.warmup
        self.end_at = self.start_at + load.duration

    def error(self, why: str, intended: float) -> None:
        if self.start_at <= intended < self.end_at:
            with self.lock:
                self.res["errors"][why] += 1
                self.progress[1] += 1

    def request(self, conn: http.client.HTTPConnection, method: str, path: str,
                body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        conn.request(method, path, body=body, headers={**headers, **self.auth})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            while time.monotonic() < self.t0:
                time.sleep(0.005)
            if self.phase == "chunks":
                self.run_chunks(conn)
            else:
                self.run_files(conn)
        finally:
            conn.close()

    def record(self, name: str, intended: float, latency: float) -> None:
        if self.start_at <= intended < self.end_at:
            with self.lock:
                record_s(self.res["hist"][name], latency)

    def run_chunks(self, conn: http.client.HTTPConnection) -> None:
        load, n = self.load, len(self.chunks)
        realtime = load.pace == "realtime"
        # streams start spread over one chunk interval
        base = self.t0 + self.k * load.chunk_seconds / max(1, load.streams)
        first_file = True
        hdr = {"Content-Type": L16, "Accept": BINARY}
        while time.monotonic() < self.end_at:
            now = time.monotonic()
            if realtime:
                time.sleep(max(0.0, base - now))
            else:
                base = now
            try:
                status, body = self.request(conn, "POST", f"/audio/streams?n_mels={load.n_mels}",
                                            b"", {"Content-Type": "application/json"})
                if status != 201:
                    self.error(f"HTTP {status}", time.monotonic())
                    time.sleep(0.1)
                    continue
                sid = json.loads(body)["stream_id"]
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                self.error("open", time.monotonic())
                continue
            blocks, ok = [], True
            for i, chunk in enumerate(self.chunks):
                intended = base + i * load.chunk_seconds if realtime else time.monotonic()
                time.sleep(max(0.0, intended - time.monotonic()))
                try:
                    status, body = self.request(conn, "POST", f"/audio/streams/{sid}", chunk, hdr)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    self.error("connection", intended)
                    ok = False
                    break
                done = time.monotonic()
                if status != 200:
                    self.error(f"HTTP {status}", intended)
                    ok = False
                    break
                self.record("chunk", intended, done - intended)
                if i == 0:
                    self.record("first_chunk", intended, done - intended)
                if self.start_at <= intended < self.end_at:
                    with self.lock:
                        self.res["chunks"] += 1
                        self.res["audio_s"] += len(chunk) / 2 / signals.RATE
                        self.res["chunk_bins"].append(int(done - self.start_at))
                        self.progress[0] += 1
                if self.verify and first_file and not load.bare:
                    blocks += parse_records(body)[0]
            intended = base + n * load.chunk_seconds if realtime else time.monotonic()
            if ok:
                try:
                    sent = time.monotonic()
                    status, body = self.request(conn, "DELETE", f"/audio/streams/{sid}", None,
                                                {"Accept": BINARY})
                    done = time.monotonic()
                    if status != 200:
                        self.error(f"HTTP {status}", intended)
                    else:
                        self.record("finish", intended, done - sent)
                        if self.verify and first_file and not load.bare:
                            more, final_max = parse_records(body)
                            diff = mel_difference(self.audio, blocks + more, final_max,
                                                  load.n_mels)
                            with self.lock:
                                self.res["verify"].append({"phase": "chunks", "stream": self.k,
                                                           "max_abs_diff": diff})
                            first_file = False
                except (OSError, http.client.HTTPException):
                    conn.close()
                    self.error("connection", intended)
            base += n * load.chunk_seconds

    def run_files(self, conn: http.client.HTTPConnection) -> None:
        load = self.load
        first_file = True
        hdr = {"Content-Type": L16, "Accept": BINARY}
        path = f"/audio/stream?format=binary&n_mels={load.n_mels}"
        seconds = len(self.pcm) / 2 / signals.RATE
        while True:
            sent = time.monotonic()
            if sent >= self.end_at:
                break
            try:
                status, body = self.request(conn, "POST", path, self.pcm, hdr)
            except (OSError, http.client.HTTPException):
                conn.close()
                self.error("connection", sent)
                continue
            done = time.monotonic()
            if status != 200:
                self.error(f"HTTP {status}", sent)
                continue
            self.record("file", sent, done - sent)
            if self.start_at <= sent < self.end_at:
                with self.lock:
                    self.res["files"] += 1
                    self.res["rtf"].append(seconds / max(1e-9, done - sent))
                    self.progress[0] += 1
                    if done < self.end_at:
                        self.res["audio_bins"].append((int(done - self.start_at), seconds))
                        self.res["audio_s"] += seconds
            if self.verify and first_file and not load.bare:
                try:
                    blocks, final_max = parse_records(body)
                    diff = mel_difference(self.audio, blocks, final_max, load.n_mels)
                except ValueError:
                    diff = math.inf
                with self.lock:
                    self.res["verify"].append({"phase": "files", "stream": self.k,
                                               "max_abs_diff": diff})
                first_file = False


def _phase(url: str, load: AudioLoad, phase: str, label: str,
           console: Console | None, token: str = "") -> dict:
    host, port = host_port(url)
    procs = max(1, min(load.procs, load.streams))
    per = split(load.streams, procs)
    firsts = [sum(per[:i]) for i in range(procs)]
    # DISTINCT_SIGNALS different files, stream k sending number k % DISTINCT_SIGNALS: a 10 s
    # speech-like file takes ~0.2 s to make, so one a stream kept 1,000 streams waiting for
    # minutes before the first request
    audios = [signals.to_s16(signals.generate(load.signal, load.file_seconds, seed=k))
              for k in range(min(load.streams, DISTINCT_SIGNALS))]
    t0 = time.monotonic() + 0.5

    def target(i: int, progress) -> dict:
        res = {"hist": {n: new_hist() for n in ("chunk", "first_chunk", "finish", "file")},
               "errors": Counter(), "chunks": 0, "files": 0, "audio_s": 0.0, "rtf": [],
               "chunk_bins": [], "audio_bins": [], "verify": []}
        lock = threading.Lock()
        threads = [_Stream(phase, k, load, host, port, audios[k % len(audios)], t0, res, lock,
                           load.verify and j == 0, progress, token)
                   for j, k in enumerate(range(firsts[i], firsts[i] + per[i]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res["hist"] = {n: encode(h) for n, h in res["hist"].items()}
        res["errors"] = dict(res["errors"])
        return res

    unit = "chunks" if phase == "chunks" else "files"
    parts = run_processes(target, procs, label=f"{label} {phase}", t0=t0, warmup=load.warmup,
                          duration=load.duration, unit=unit, console=console,
                          timeout=60 + 2 * load.file_seconds)
    errors: Counter = Counter()
    for p in parts:
        errors.update(p["errors"])
    hists = {n: merge(p["hist"][n] for p in parts) for n in parts[0]["hist"]}
    out: dict = {"errors": dict(errors), "error_count": sum(errors.values()),
                 "verify": [v for p in parts for v in p["verify"]], "_hists": hists}
    if phase == "chunks":
        bins = [0] * max(1, int(load.duration))
        for p in parts:
            for b in p["chunk_bins"]:
                if 0 <= b < len(bins):
                    bins[b] += 1
        out.update(chunks=sum(p["chunks"] for p in parts),
                   chunk_ms=summary_ms(hists["chunk"]),
                   first_chunk_ms=summary_ms(hists["first_chunk"]),
                   finish_ms=summary_ms(hists["finish"]),
                   chunks_per_s=throughput(bins, load.duration),
                   audio_s_per_s=round(sum(p["audio_s"] for p in parts) / load.duration, 2))
    else:
        bins_f = [0.0] * max(1, int(load.duration))
        for p in parts:
            for b, s in p["audio_bins"]:
                if 0 <= b < len(bins_f):
                    bins_f[b] += s
        rtf = [r for p in parts for r in p["rtf"]]
        out.update(files=sum(p["files"] for p in parts), file_ms=summary_ms(hists["file"]),
                   rtf={"p50": round(statistics.median(rtf), 1) if rtf else None,
                        "min": round(min(rtf), 1) if rtf else None},
                   audio_s_per_s={"total": round(sum(p["audio_s"] for p in parts)
                                                 / load.duration, 1),
                                  "mean": round(statistics.fmean(bins_f), 1),
                                  "stdev": round(statistics.pstdev(bins_f), 1)})
    return out


def run_audio(url: str, load: AudioLoad, *, label: str = "audio",
              console: Console | None = None, gpu_index: int | None = None,
              token: str = "") -> dict:
    from .gpu import GpuSampler

    out: dict = {"load": {"url": url, "streams": load.streams, "pace": load.pace,
                          "file_s": load.file_seconds, "chunk_s": load.chunk_seconds,
                          "duration_s": load.duration, "warmup_s": load.warmup,
                          "procs": max(1, min(load.procs, load.streams)),
                          "signal": load.signal, "n_mels": load.n_mels}}
    for phase in load.phases:
        with GpuSampler(gpu_index) as gpu:
            out[phase] = _phase(url, load, phase, label, console, token)
        if gpu.samples:
            out[phase]["gpu"] = gpu.summary()
    verify = [v for ph in load.phases for v in out[ph]["verify"]]
    if load.verify and not load.bare:
        worst = max((v["max_abs_diff"] for v in verify), default=math.inf)
        out["mel_check"] = {"files": len(verify), "max_abs_diff": worst,
                            "ok": bool(verify) and worst <= 1e-3}
    out["error_count"] = sum(out[ph]["error_count"] for ph in load.phases)
    return out
