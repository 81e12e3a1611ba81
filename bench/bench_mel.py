"""Mel engine benchmark: CUDA engine (host and device input), torchaudio on the same
batch, per-chunk GPU latency, NumPy engine. Prints a markdown table and writes JSON.

    source .device/setup && python3 bench/bench_mel.py --json $OUT/bench_mel.json

Throughput is seconds of audio per second of wall (host path) or of GPU time between
CUDA events on the engine's stream (device path, torchaudio). Medians of --repeat runs
after two warm-ups.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

from shmmel import mel

HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 80 GB HBM3, NVIDIA's datasheet figure


def wall_median(fn: Callable[[], Any], repeat: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cupy_event_median(fn: Callable[[], Any], stream: Any, repeat: int) -> float:
    import cupy as cp

    fn(), fn()
    stream.synchronize()
    times = []
    for _ in range(repeat):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


def torch_event_median(fn: Callable[[], Any], repeat: int) -> float:
    import torch

    fn(), fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def torchaudio_whisper(n_mels: int = 80) -> Callable[[Any], Any]:
    """torchaudio's MelSpectrogram + Whisper's log10/clamp/normalise (per-clip max)."""
    import torch
    import torchaudio

    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, hop_length=160, n_mels=n_mels, power=2.0,
        mel_scale="slaney", norm="slaney", center=True, pad_mode="reflect",
    ).cuda()

    def run(x: Any) -> Any:
        spec = transform(x)[..., :-1]
        log = spec.clamp(min=1e-10).log10()
        top = log.amax(dim=(-2, -1), keepdim=True)
        return (torch.maximum(log, top - 8.0) + 4.0) / 4.0

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="1,64,512")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cpu-clips", type=int, default=8)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import cupy as cp

    engine = mel.CudaEngine(0, timing=True)
    stream = engine.stream
    props = cp.cuda.runtime.getDeviceProperties(0)
    results: dict[str, Any] = {
        "gpu": props["name"].decode(),
        "cpu": platform.processor() or platform.machine(),
        "cupy": cp.__version__,
        "numpy_version": np.__version__,
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "rows": [],
    }
    try:
        with open("/proc/cpuinfo") as f:
            results["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    peer = None
    if not args.no_torch:
        import torch
        import torchaudio

        results["torch"], results["torchaudio"] = torch.__version__, torchaudio.__version__
        peer = torchaudio_whisper()

    n = args.seconds * mel.SAMPLE_RATE
    frames = n // mel.HOP_LENGTH
    rng = np.random.default_rng(0)
    for b in [int(c) for c in args.clips.split(",")]:
        audio_s = b * args.seconds
        pcm = rng.integers(-12000, 12000, size=(b, n), dtype=np.int16)
        f32 = pcm.astype(np.float32) / np.float32(32768)
        out_bytes = b * frames * 80 * 4
        row: dict[str, Any] = {"clips": b, "audio_s": audio_s}

        for name, host in (("host_int16", pcm), ("host_float32", f32)):
            def run_host(host: np.ndarray = host) -> None:
                engine.process([(engine.new_stream(), host[i], True) for i in range(b)])

            t = wall_median(run_host, args.repeat)
            row[name] = {"s": t, "audio_per_s": audio_s / t, "kernel_ms": engine.last_kernel_ms,
                         "gpu_ms": engine.last_gpu_ms}

        for name, host in (("device_int16", pcm), ("device_float32", f32)):
            x = cp.asarray(host)
            cp.cuda.Device().synchronize()
            t = cupy_event_median(lambda x=x: engine.log_mel_device(x), stream, args.repeat)
            t_raw = cupy_event_median(lambda x=x: engine.log10_mel_device(x, layout="mels"), stream, args.repeat)
            moved = host.nbytes + out_bytes + 2 * out_bytes  # read input, write frames, normalise r+w
            row[name] = {"s": t, "audio_per_s": audio_s / t, "frames_only_s": t_raw,
                         "bytes": moved, "bandwidth_fraction": moved / t / HBM_BYTES_PER_S,
                         "frames_only_bandwidth_fraction": (host.nbytes + out_bytes) / t_raw / HBM_BYTES_PER_S}
            if name == "device_float32":
                ours = engine.log_mel_device(x)
                engine.synchronize()
            del x

        if peer is not None:
            import torch

            tx = torch.as_tensor(f32, device="cuda")
            t = torch_event_median(lambda: peer(tx), args.repeat)
            row["torchaudio"] = {"s": t, "audio_per_s": audio_s / t}
            theirs = peer(tx).cpu().numpy()
            row["max_abs_diff_vs_torchaudio"] = float(np.abs(cp.asnumpy(ours) - theirs).max())
            row["speedup_device_float32"] = t / row["device_float32"]["s"]
            row["speedup_device_int16"] = t / row["device_int16"]["s"]
            del tx
            torch.cuda.empty_cache()
        del ours
        cp.get_default_memory_pool().free_all_blocks()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    # one 1-second chunk per process(): one stream, and 64 streams in one call.
    # kernel_us / gpu_us: CUDA events around the launch / around copy in..copy out of one
    # call (they include the host's launch latency); kernel_replayed_us: the same launch
    # repeated 200 times back to back, per launch (the kernel's own GPU time)
    chunk = rng.integers(-12000, 12000, size=mel.SAMPLE_RATE, dtype=np.int16)
    for n_streams in (1, 64):
        streams = [engine.new_stream() for _ in range(n_streams)]
        kernel, gpu, wall = [], [], []
        for i in range(60):
            t0 = time.perf_counter()
            engine.process([(s, chunk, False) for s in streams])
            wall.append(time.perf_counter() - t0)
            if i >= 10:
                kernel.append(engine.last_kernel_ms * 1e3)
                gpu.append(engine.last_gpu_ms * 1e3)
        results[f"chunk_1s_x{n_streams}"] = {
            "kernel_replayed_us": engine.replay_last_launch(200) * 1e3,
            "kernel_us": statistics.median(kernel), "gpu_us": statistics.median(gpu),
            "wall_us": statistics.median(wall[10:]) * 1e6,
        }
        print(json.dumps({f"chunk_1s_x{n_streams}": results[f"chunk_1s_x{n_streams}"]}), flush=True)

    # NumPy engine on this host's CPU, one thread (pocketfft is single-threaded)
    cpu_engine = mel.NumpyEngine()
    pcm = rng.integers(-12000, 12000, size=(args.cpu_clips, n), dtype=np.int16)
    t = wall_median(lambda: cpu_engine.process([(cpu_engine.new_stream(), pcm[i], True) for i in range(len(pcm))]), 3)
    results["numpy"] = {"clips": args.cpu_clips, "s": t, "audio_per_s": args.cpu_clips * args.seconds / t}
    print(json.dumps({"numpy": results["numpy"]}), flush=True)

    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
