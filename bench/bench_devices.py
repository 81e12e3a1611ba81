"""Scaling over devices, in one run: the same load on an instance with 1 GPU and on one
with 2 GPUs (same settings, same HTTP processes, same load processes; only ``devices``
differs), alternated ``--repeat`` times, then the batched engine alone (bench_mel.py) on
each device at once against one device alone.

    source .device/setup && python3 bench/bench_devices.py --json $OUT/devices.json
    python3 bench/bench_devices.py --fake --duration 2 --warmup 0.5 --streams 4 \\
        --file-streams 2 --file-seconds 2 --repeat 1 --http-workers 2 --procs 1
                                                      # CPU smoke run (fake devices)

Loads, each measured for --duration after --warmup:
  files    --file-streams clients posting 10 s files back to back (/audio/stream): audio-s/s
  streams  --streams N real-time streams (1 s chunks, session API): per-chunk p50/p99 and
           audio-s/s sustained, for each N (64, 128, 256 by default)
For each load: audio-s/s on 1 and 2 GPUs, their ratio (each repeat, then median and
spread), per-chunk p99, and each GPU's utilisation (NVML) and the workers' busy fraction:
the GPU is the limit where a GPU is busy most of the time, elsewhere the HTTP side or the
load is (a real-time load's audio-s/s is capped at N by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shmmel import control
from shmmel.loadgen.audioload import AudioLoad, run_audio
from shmmel.loadgen.bench import host_info
from shmmel.loadgen.gpu import GpuSampler
from shmmel.loadgen.targets import spawned

ROOT = Path(__file__).resolve().parents[1]


def busy(instance: str) -> dict[int, float]:
    """Seconds of compute per device so far (sum over its workers)."""
    out: dict[int, float] = {}
    for w in control.status(instance)["workers"]:
        if w["kind"] in ("cpu", "cuda") and w["device"] >= 0:
            out[w["device"]] = out.get(w["device"], 0.0) + w["busy_s"]
    return out


def measure(target: Any, load: AudioLoad, devices: list[int], fake: bool) -> dict[str, Any]:
    """One load on a running instance: the loadgen's figures plus per-device GPU samples
    and the workers' busy fraction per device."""
    samplers = [GpuSampler(None if fake else d) for d in devices]
    before = busy(target.instance)
    t0 = time.monotonic()
    for s in samplers:
        s.__enter__()
    try:
        r = run_audio(target.url, load, label=f"{len(devices)} dev", gpu_index=None,
                      token=target.token)
    finally:
        for s in samplers:
            s.__exit__(None, None, None)
    wall = time.monotonic() - t0
    after = busy(target.instance)
    phase = load.phases[0]
    p = r[phase]
    row: dict[str, Any] = {"errors": p["error_count"], "mel_check": r.get("mel_check")}
    if phase == "files":
        row["audio_s_per_s"] = p["audio_s_per_s"]["total"]
        row["file_ms"] = p["file_ms"]
    else:
        row["audio_s_per_s"] = p["audio_s_per_s"]
        row["chunk_ms"] = p["chunk_ms"]
        row["first_chunk_ms"] = p["first_chunk_ms"]
    row["workers_busy"] = {str(d): round((after.get(d, 0) - before.get(d, 0)) / wall, 2)
                           for d in devices}  # busy seconds per second (workers summed)
    row["gpu"] = {str(d): s.summary() for d, s in zip(devices, samplers) if s.samples}
    return row


def service_runs(args: argparse.Namespace) -> dict[str, Any]:
    loads: list[tuple[str, AudioLoad]] = [(
        f"files {args.file_seconds:g} s x {args.file_streams}",
        AudioLoad(streams=args.file_streams, duration=args.duration, warmup=args.warmup,
                  pace="fast", file_seconds=args.file_seconds, procs=args.procs,
                  phases=("files",)))]
    for n in args.streams:
        loads.append((f"streams {n} real-time", AudioLoad(
            streams=n, duration=args.duration, warmup=args.warmup, pace="realtime",
            file_seconds=args.file_seconds, procs=args.procs, phases=("chunks",))))
    sets = {1: [0], 2: [0, 1]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in loads}
    for rep in range(args.repeat):
        for n_dev in (1, 2) if rep % 2 == 0 else (2, 1):  # alternate the order
            flags = {"devices": ",".join(map(str, sets[n_dev])),
                     "workers_per_device": args.workers_per_device,
                     "worker_kind": "cpu" if args.fake else "cuda",
                     "http_workers": args.http_workers, "http_threads": args.http_threads,
                     "max_streams": max(1024, 2 * max(args.streams, default=0)),
                     "whisper_workers": 0}
            if args.fake:
                flags["fake_devices"] = 2
            with spawned(flags, args.log_dir) as t:
                for name, load in loads:
                    row = measure(t, load, sets[n_dev], args.fake)
                    row.update(repeat=rep, gpus=n_dev)
                    runs[name].append(row)
                    print(json.dumps({"load": name, **row}), flush=True)
    summary = {}
    for name, rows in runs.items():
        ratios = []
        for rep in range(args.repeat):
            one = [r for r in rows if r["repeat"] == rep and r["gpus"] == 1]
            two = [r for r in rows if r["repeat"] == rep and r["gpus"] == 2]
            if one and two and one[0]["audio_s_per_s"]:
                ratios.append(round(two[0]["audio_s_per_s"] / one[0]["audio_s_per_s"], 3))
        summary[name] = {
            "audio_s_per_s_1gpu": [r["audio_s_per_s"] for r in rows if r["gpus"] == 1],
            "audio_s_per_s_2gpu": [r["audio_s_per_s"] for r in rows if r["gpus"] == 2],
            "ratio_2_over_1": ratios,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_spread": round(max(ratios) - min(ratios), 3) if ratios else None,
            "chunk_p99_ms": {f"{r['gpus']} gpu": r.get("chunk_ms", {}).get("p99")
                             for r in rows if "chunk_ms" in r},
        }
    return {"runs": runs, "summary": summary}


def mel_runs(args: argparse.Namespace) -> dict[str, Any]:
    """bench_mel.py on device 0 alone, then on devices 0 and 1 at once (one process each,
    CUDA_VISIBLE_DEVICES picks the device)."""
    out_dir = Path(args.mel_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    script = ROOT / "bench" / "bench_mel.py"

    def launch(dev: int, tag: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(dev)}
        return subprocess.Popen([sys.executable, str(script), "--json",
                                 str(out_dir / f"mel-{tag}-dev{dev}.json"), *args.mel_args],
                                env=env, stdout=subprocess.DEVNULL)

    result: dict[str, Any] = {}
    for tag, devs in (("alone", [0]), ("both", [0, 1])):
        t0 = time.monotonic()
        procs = [launch(d, tag) for d in devs]
        codes = [p.wait() for p in procs]
        result[tag] = {"devices": devs, "exit_codes": codes,
                       "wall_s": round(time.monotonic() - t0, 1),
                       "json": [str(out_dir / f"mel-{tag}-dev{d}.json") for d in devs]}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=lambda s: [int(v) for v in s.split(",")],
                    default=[64, 128, 256], help="real-time stream counts, e.g. 64,128,256")
    ap.add_argument("--file-streams", type=int, default=64)
    ap.add_argument("--file-seconds", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--procs", type=int, default=max(1, min(8, (os.cpu_count() or 4) // 4)))
    ap.add_argument("--workers-per-device", type=int, default=2)
    ap.add_argument("--http-workers", type=int, default=8)
    ap.add_argument("--http-threads", type=int, default=16)
    ap.add_argument("--fake", action="store_true",
                    help="CPU workers on 2 fake devices (a smoke run of this script)")
    ap.add_argument("--no-mel", action="store_true", help="skip bench_mel.py per device")
    ap.add_argument("--no-service", action="store_true", help="only bench_mel.py per device")
    ap.add_argument("--mel-args", nargs=argparse.REMAINDER, default=["--no-variants"],
                    help="arguments for bench_mel.py (last on the line)")
    ap.add_argument("--mel-dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.fake:
        args.no_mel = True
    data: dict[str, Any] = {"bench": "devices", "host": host_info(), "args": {
        k: v for k, v in vars(args).items()}}
    if not args.no_service:
        data["service"] = service_runs(args)
        print(json.dumps({"summary": data["service"]["summary"]}, indent=2))
    if not args.no_mel:
        data["mel"] = mel_runs(args)
        print(json.dumps({"mel": data["mel"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    bad = sum(r["errors"] for rows in data.get("service", {}).get("runs", {}).values()
              for r in rows)
    bad += sum(c != 0 for tag in data.get("mel", {}).values() for c in tag["exit_codes"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
