"""Latency of a 30 s mp3 through OpenAI's route, and the decode's share of it.

One client, sequential requests, in rounds; each round sends the same 30 s of speech (the
speech fixtures 1 s apart, then silence) four ways, in turn, so that all four see the same
machine state:

- ``anchor``: 16 kHz s16 PCM to ``POST /audio/transcribe`` (no decoding at all);
- ``v1 wav``: the same PCM as a 16 kHz mono WAV file to ``/v1/audio/transcriptions``
  (multipart; FFmpeg's pcm_s16le decoder, no resampling);
- ``v1 mp3``: the same audio as a 44.1 kHz mono mp3 (128 kb/s) to ``/v1/audio/transcriptions``;
- ``v1 mp3 stereo``: 44.1 kHz stereo mp3 (down-mix too).

Ratios are each round's latency over that round's anchor, then the median over rounds. The
decode of each file is also timed alone in this process (the server runs the same code on
its request thread): ``decode share`` = that median over the median request latency.

    python bench/bench_openai.py --spawn --rounds 12
    python bench/bench_openai.py --url http://127.0.0.1:8000 --token T --rounds 12
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import time
import wave
from pathlib import Path

import numpy as np

from shmmel.decode import decode_audio, encode_audio
from shmmel.loadgen.bench import Source, open_target
from shmmel.loadgen.textload import host_port

ROOT = Path(__file__).resolve().parents[1]
N = 480_000
BOUNDARY = "bench-openai-7d1e"


def speech30() -> np.ndarray:
    parts = []
    for i in range(1, 5):
        with wave.open(str(ROOT / "tests" / "fixtures" / f"speech{i}.wav")) as w:
            parts += [np.frombuffer(w.readframes(w.getnframes()), "<i2"),
                      np.zeros(16000, np.int16)]
    pcm = np.concatenate(parts)[:N]
    return np.concatenate([pcm, np.zeros(N - pcm.size, np.int16)])


def form(name: str, data: bytes) -> bytes:
    b = BOUNDARY.encode()
    return (b"--%s\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%s\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" % (b, b, name.encode())
            + data + b"\r\n--%s--\r\n" % b)


def _ok(host: str, port: int, auth: dict[str, str]) -> bool:
    """A tiny /audio/transcribe answers 200."""
    c = http.client.HTTPConnection(host, port, timeout=60)
    try:
        c.request("POST", "/audio/transcribe", bytes(3200),
                  {"Content-Type": "audio/L16;rate=16000", **auth})
        r = c.getresponse()
        r.read()
        return r.status == 200
    finally:
        c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url")
    p.add_argument("--token", default="")
    p.add_argument("--spawn", action="store_true", help="start (and stop) an instance: 1 mel "
                   "worker (cpu), 1 whisper worker, 1 HTTP process")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pcm = speech30()
    wav = encode_audio(pcm, 16000, "wav", "pcm_s16le")
    mp3 = encode_audio(pcm, 44100, "mp3", "libmp3lame", 1)
    mp3s = encode_audio(pcm, 44100, "mp3", "libmp3lame", 2)
    ways = {"anchor": ("/audio/transcribe", pcm.tobytes(), "audio/L16;rate=16000", None),
            "v1 wav": ("/v1/audio/transcriptions", form("a.wav", wav), None, wav),
            "v1 mp3": ("/v1/audio/transcriptions", form("a.mp3", mp3), None, mp3),
            "v1 mp3 stereo": ("/v1/audio/transcriptions", form("s.mp3", mp3s), None, mp3s)}
    decode, decode_cpu = {}, {}
    for name, (_, _, _, f) in ways.items():
        if f is not None:
            times, cpu = [], []
            for _ in range(20):
                t, c = time.perf_counter(), time.process_time()
                decode_audio(f)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            decode[name], decode_cpu[name] = float(np.median(times)), float(np.median(cpu))
    # min_body_rate 0: the slow-client check closes a request still working 5 s after its
    # body arrived whole before it began (seen on a loaded machine; reported)
    src = (Source(spawn={"workers": 1, "worker_kind": "cpu", "http_workers": 1,
                         "whisper_workers": 1, "min_body_rate": 0}) if args.spawn
           else Source(url=args.url, token=args.token))
    lat: dict[str, list[float]] = {k: [] for k in ways}
    texts: dict[str, str] = {}
    with open_target(src) as t:
        host, port = host_port(t.url)
        auth = {"Authorization": f"Bearer {t.token or args.token}"} if (
            t.token or args.token) else {}
        conn = http.client.HTTPConnection(host, port, timeout=300)
        deadline = time.monotonic() + 120
        while True:  # the whisper worker loads its model after the mel workers are ready
            conn.request("GET", "/readyz")
            ready = json.loads(conn.getresponse().read()).get("whisper_ready", 0) >= 1
            # /readyz may say so a moment before the HTTP process sees the worker live
            if ready and _ok(host, port, auth):
                break
            if time.monotonic() > deadline:
                raise SystemExit("no whisper worker ready within 120 s")
            time.sleep(0.2)
        for r in range(args.rounds + 1):  # round 0 warms up
            for name, (path, body, ctype, _) in ways.items():
                hdr = {"Content-Type": ctype or f"multipart/form-data; boundary={BOUNDARY}",
                       **auth}
                t0 = time.perf_counter()
                conn.request("POST", path, body, hdr)
                resp = conn.getresponse()
                raw = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    raise SystemExit(f"{name}: HTTP {resp.status}: {raw[:300]!r}")
                texts[name] = json.loads(raw)["text"]
                if r:
                    lat[name].append(dt)
        conn.close()
    anchor = np.array(lat["anchor"])
    rows = {}
    for name in ways:
        v = np.array(lat[name])
        ratio = v / anchor
        rows[name] = {"median_ms": round(1e3 * float(np.median(v)), 1),
                      "min_ms": round(1e3 * float(v.min()), 1),
                      "max_ms": round(1e3 * float(v.max()), 1),
                      "ratio_to_anchor": round(float(np.median(ratio)), 3),
                      "ratio_min": round(float(ratio.min()), 3),
                      "ratio_max": round(float(ratio.max()), 3)}
        if name in decode:
            rows[name]["decode_ms"] = round(1e3 * decode[name], 1)
            rows[name]["decode_cpu_ms"] = round(1e3 * decode_cpu[name], 1)
            rows[name]["decode_share"] = round(decode[name] / float(np.median(v)), 4)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"Python {platform.python_version()}",
           "load_avg_at_end": os.getloadavg(), "rounds": args.rounds,
           "bytes": {"wav": len(wav), "mp3": len(mp3), "mp3_stereo": len(mp3s)},
           "same_text_as_anchor": {k: texts[k] == texts["anchor"] for k in ways},
           "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['machine']}; {args.rounds} rounds; load average at the end "
          f"{out['load_avg_at_end'][0]:.2f}")
    for name, row in rows.items():
        extra = (f"; decode alone {row['decode_ms']} ms (CPU {row['decode_cpu_ms']} ms) = "
                 f"{100 * row['decode_share']:.1f} %"
                 if "decode_ms" in row else "")
        print(f"{name:14s} median {row['median_ms']:7.1f} ms ({row['min_ms']}-{row['max_ms']})"
              f"  x{row['ratio_to_anchor']} anchor ({row['ratio_min']}-{row['ratio_max']})"
              f"{extra}; same text: {out['same_text_as_anchor'][name]}")


if __name__ == "__main__":
    main()
