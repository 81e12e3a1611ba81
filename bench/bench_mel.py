"""Mel engine benchmark, one run, side by side: one clip against openai-whisper's
``log_mel_spectrogram`` on torch/CUDA; host batches (numpy in, numpy out); device batches
against torchaudio; kernel variants; streaming chunks; the NumPy engine. Prints JSON
lines and a summary table; writes everything to --json.

    source .device/setup && python3 bench/bench_mel.py --json $OUT/bench_mel.json
    python3 bench/bench_mel.py --only single,host,device --json $OUT/b.json      # a second pass
    python3 bench/bench_mel.py --only profile        # where a device batch call spends host time
    ncu --clock-control none -k regex:shmmel python3 bench/bench_mel.py --ncu   # one batch

Wall figures are medians of --repeat calls after warm-ups, each call ending with its
result on the host (or, for device results, a synchronize). Device figures are CUDA
events on the producing stream.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from shmmel import mel

HBM_BYTES_PER_S = 4.8e12  # H200 SXM 141 GB HBM3e, NVIDIA's datasheet figure


def wall(fn: Callable[[], Any], repeat: int, warm: int = 3) -> dict[str, float]:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def cupy_events(fn: Callable[[], Any], stream: Any, repeat: int) -> float:
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


def torch_events(fn: Callable[[], Any], repeat: int) -> float:
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


# -- the peers ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _whisper_filters(device: str, n_mels: int) -> Any:
    import torch

    # whisper loads librosa's filterbank from mel_filters.npz; shmmel's mel_filters() is
    # that filterbank (tests/test_mel.py pins it to librosa's values)
    return torch.from_numpy(np.array(mel.mel_filters(n_mels))).to(device)


def whisper_log_mel_spectrogram(audio: Any, n_mels: int = 80, padding: int = 0, device: Any = None) -> Any:
    """openai/whisper ``whisper/audio.py`` ``log_mel_spectrogram`` (commit 06dc24a),
    reproduced line for line (openai-whisper is not installed on the GPU host)."""
    import torch
    import torch.nn.functional as F

    if not torch.is_tensor(audio):
        audio = torch.from_numpy(audio)
    if device is not None:
        audio = audio.to(device)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(mel.N_FFT).to(audio.device)
    stft = torch.stft(audio, mel.N_FFT, mel.HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = _whisper_filters(str(audio.device), n_mels)
    mel_spec = filters @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec


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


# -- sections --------------------------------------------------------------------------------


def single_clip(engine: Any, rng: np.random.Generator, repeat: int) -> dict[str, Any]:
    """One clip host numpy -> host numpy, and torch CUDA tensor -> torch CUDA tensor."""
    import torch

    out: dict[str, Any] = {}
    plain = mel.CudaEngine(0, clip_graphs=False)
    for seconds in (1, 10, 30):
        x = (rng.standard_normal(seconds * 16000) * 0.1).astype(np.float32)
        tx = torch.from_numpy(x).cuda()
        row = {
            "shmmel_host": wall(lambda: mel.log_mel_spectrogram(x, engine=engine), repeat),
            "shmmel_host_batch_path": wall(lambda: mel.log_mel_batch([x], engine=engine)[0], repeat),
            "shmmel_host_no_graph": wall(lambda: mel.log_mel_spectrogram(x, engine=plain), repeat),
            "whisper_host": wall(lambda: whisper_log_mel_spectrogram(torch.from_numpy(x), device="cuda").cpu(), repeat),
        }

        def shmmel_dev() -> None:
            mel.log_mel_spectrogram(tx, engine=engine)
            torch.cuda.synchronize()

        def whisper_dev() -> None:
            whisper_log_mel_spectrogram(tx)
            torch.cuda.synchronize()

        row["shmmel_device"] = wall(shmmel_dev, repeat)
        row["whisper_device"] = wall(whisper_dev, repeat)
        ours = mel.log_mel_spectrogram(x, engine=engine)
        row["same_bits_batch_path_no_graph"] = bool(
            np.array_equal(ours, mel.log_mel_batch([x], engine=engine)[0])
            and np.array_equal(ours, mel.log_mel_spectrogram(x, engine=plain)))
        theirs = whisper_log_mel_spectrogram(torch.from_numpy(x), device="cuda").cpu().numpy()
        row["max_abs_diff_vs_whisper"] = float(np.abs(ours - theirs).max())
        for side in ("host", "device"):
            row[f"speedup_{side}"] = row[f"whisper_{side}"]["median_s"] / row[f"shmmel_{side}"]["median_s"]
        out[f"{seconds}s"] = row
        print(json.dumps({"single_clip": seconds, **row}), flush=True)
    plain.close()
    return out


def host_batch(engine: Any, rng: np.random.Generator, clips: int, seconds: int, repeat: int) -> dict[str, Any]:
    n = seconds * mel.SAMPLE_RATE
    pcm = rng.integers(-12000, 12000, size=(clips, n), dtype=np.int16)
    f32 = pcm.astype(np.float32) / np.float32(32768)
    audio_s = clips * seconds
    shape = (clips, 80, n // mel.HOP_LENGTH)
    out_plain = np.empty(shape, np.float32)
    pinned_in = engine.empty_pinned(pcm.shape, np.int16)
    pinned_in[:] = pcm
    pinned_out = engine.empty_pinned(shape, np.float32)
    cases = {
        "int16_fresh_out": lambda: mel.log_mel_batch(pcm, engine=engine),
        "int16_out": lambda: mel.log_mel_batch(pcm, engine=engine, out=out_plain),
        "int16_pinned_in_out": lambda: mel.log_mel_batch(pinned_in, engine=engine, out=pinned_out),
        "int16_pinned_out": lambda: mel.log_mel_batch(pcm, engine=engine, out=pinned_out),
        "float32_out": lambda: mel.log_mel_batch(f32, engine=engine, out=out_plain),
        "float32_fresh_out": lambda: mel.log_mel_batch(f32, engine=engine),
    }
    row: dict[str, Any] = {"clips": clips, "seconds": seconds}
    for name, fn in cases.items():
        t = wall(fn, repeat, warm=2)
        row[name] = {**t, "audio_per_s": audio_s / t["median_s"]}
        print(json.dumps({"host_batch": name, **row[name]}), flush=True)
    # the copy ceilings on this host for the same bytes, pinned, one direction at a time
    import cupy as cp

    dev = cp.empty(pcm.nbytes, cp.uint8)
    dev_out = cp.empty(out_plain.nbytes, cp.uint8)
    stream = engine.stream
    rt = cp.cuda.runtime
    row["h2d_pinned_GBps"] = pcm.nbytes / cupy_events(
        lambda: rt.memcpyAsync(dev.data.ptr, pinned_in.ctypes.data, pcm.nbytes, rt.memcpyHostToDevice, stream.ptr),
        stream, 5) / 1e9
    row["d2h_pinned_GBps"] = out_plain.nbytes / cupy_events(
        lambda: rt.memcpyAsync(pinned_out.ctypes.data, dev_out.data.ptr, out_plain.nbytes, rt.memcpyDeviceToHost,
                               stream.ptr), stream, 5) / 1e9
    t = wall(lambda: np.copyto(out_plain, pinned_out), 3, warm=1)
    row["host_memcpy_1thread_GBps"] = out_plain.nbytes / t["median_s"] / 1e9
    # what the host allows: pageable -> pinned copies by several threads (GIL released),
    # page-locking the caller's buffer instead, and the GPU reading pageable memory itself
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    def threaded_copy(threads: int) -> None:
        piece = -(-pcm.nbytes // threads)
        src, dst = pcm.ctypes.data, pinned_in.ctypes.data
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: ctypes.memmove(dst + i * piece, src + i * piece,
                                                   max(0, min(piece, pcm.nbytes - i * piece))), range(threads)))

    for threads in (1, 4, 8, 16):
        t = wall(lambda: threaded_copy(threads), 3, warm=1)
        row[f"host_to_pinned_{threads}threads_GBps"] = pcm.nbytes / t["median_s"] / 1e9
    t0 = time.perf_counter()
    rt.hostRegister(out_plain.ctypes.data, out_plain.nbytes, 0)
    t1 = time.perf_counter()
    rt.hostUnregister(out_plain.ctypes.data)
    row["host_register_ms"] = {"register": (t1 - t0) * 1e3, "unregister": (time.perf_counter() - t1) * 1e3,
                               "bytes": out_plain.nbytes}
    try:
        row["pageable_memory_access"] = rt.deviceGetAttribute(88, 0)  # cudaDevAttrPageableMemoryAccess
    except Exception as exc:  # noqa: BLE001
        row["pageable_memory_access"] = repr(exc)
    with mel.CudaEngine(0, copy_threads=16) as wide:
        t = wall(lambda: mel.log_mel_batch(pcm, engine=wide, out=out_plain), repeat, warm=2)
        row["int16_out_16_copy_threads"] = {**t, "audio_per_s": audio_s / t["median_s"]}

    print(json.dumps({"copy_ceilings": {k: row[k] for k in row if "GBps" in k or "register" in k or "pageable" in k},
                      "int16_out_16_copy_threads": row["int16_out_16_copy_threads"]}), flush=True)
    return row


def device_batch(engine: Any, rng: np.random.Generator, clips: int, seconds: int, repeat: int,
                 peer: Any) -> dict[str, Any]:
    import cupy as cp

    n = seconds * mel.SAMPLE_RATE
    frames = n // mel.HOP_LENGTH
    pcm = rng.integers(-12000, 12000, size=(clips, n), dtype=np.int16)
    f32 = pcm.astype(np.float32) / np.float32(32768)
    audio_s = clips * seconds
    out_bytes = clips * frames * 80 * 4
    row: dict[str, Any] = {"clips": clips, "audio_s": audio_s}
    ours = None
    for name, host in (("device_int16", pcm), ("device_float32", f32)):
        x = cp.asarray(host)
        out = cp.empty((clips, 80, frames), cp.float32)
        cp.cuda.Device().synchronize()
        t = cupy_events(lambda: mel.log_mel_batch(x, engine=engine, out=out), engine.stream, repeat)
        in_call = []  # the launch alone inside the same call (engine.timing events around it)
        for _ in range(repeat):
            mel.log_mel_batch(x, engine=engine, out=out)
            engine.synchronize()
            in_call.append(cp.cuda.get_elapsed_time(*engine.batch_events) / 1e3)
        t_raw = cupy_events(lambda: engine.log10_mel_device(x, layout="mels"), engine.stream, repeat)
        kernel = engine.replay_last_launch(20) / 1e3
        moved = host.nbytes + 3 * out_bytes  # read input, write frames, normalise r+w
        row[name] = {"s": t, "audio_per_s": audio_s / t, "frames_only_s": t_raw, "kernel_replayed_s": kernel,
                     "launch_in_call_s": statistics.median(in_call),
                     "bandwidth_fraction": moved / t / HBM_BYTES_PER_S,
                     "kernel_bandwidth_fraction": (host.nbytes + out_bytes) / kernel / HBM_BYTES_PER_S}
        if name == "device_float32":
            ours = out
    if peer is not None:
        import torch

        tx = torch.as_tensor(f32, device="cuda")
        t = torch_events(lambda: peer(tx), repeat)
        row["torchaudio"] = {"s": t, "audio_per_s": audio_s / t}
        theirs = peer(tx).cpu().numpy()
        row["max_abs_diff_vs_torchaudio"] = float(np.abs(cp.asnumpy(ours) - theirs).max())
        row["speedup_int16"] = t / row["device_int16"]["s"]
        row["speedup_float32"] = t / row["device_float32"]["s"]
        del tx
        torch.cuda.empty_cache()
    del ours
    cp.get_default_memory_pool().free_all_blocks()
    print(json.dumps({"device_batch": row}), flush=True)
    return row


VARIANTS = {  # CudaEngine keyword arguments over the defaults (see mel/_kernels.py)
    "default": {},
    "normalise_in_last_block": {"norm_lag": 0},
    "separate_normalise": {"fuse_normalise": False},
    "window_table_twiddles_all": {"window": "table", "twiddle_step": 1},
    "twiddle_step_4": {"twiddle_step": 4},
    "plain_shared_layout": {"conflict_free": False},
    "issue16_h4_build": {"norm_lag": 0, "window": "table", "twiddle_step": 1, "conflict_free": False},
    "norm_lag_4096": {"norm_lag": 4096},
    "norm_group_1": {"norm_group": 1},
    "launch_bound_7": {"min_blocks": 7},
    "one_mel_chain": {"mel_ilp": False},
    "direct_dft": {"dft": "direct"},
}


def kernel_variants(rng: np.random.Generator, clips: int, seconds: int, repeat: int) -> dict[str, Any]:
    """Other builds of the kernel on the same int16 device batch: the whole
    ``log_mel_batch`` call (CUDA events) and its launch replayed (counters zeroed), the
    registers and spill of each build, and the largest difference of its output from the
    default build's and from the NumPy engine's on one 30 s clip of noise."""
    import cupy as cp

    x = cp.asarray(rng.integers(-12000, 12000, size=(clips, seconds * 16000), dtype=np.int16))
    frames = seconds * 16000 // mel.HOP_LENGTH
    out = cp.empty((clips, 80, frames), cp.float32)
    clip = (rng.standard_normal(mel.N_SAMPLES) * 0.1).astype(np.float32)
    cpu = mel.log_mel_spectrogram(clip)
    default = None
    res: dict[str, Any] = {}
    for name, kwargs in VARIANTS.items():
        try:
            eng = mel.CudaEngine(0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a build that does not compile is a result too
            res[name] = {"error": repr(exc)[:300]}
            continue
        with eng:
            k = eng._frames_kernel
            t = cupy_events(lambda: mel.log_mel_batch(x, engine=eng, out=out), eng.stream, repeat)
            row = {"batch_ms": t * 1e3, "kernel_replayed_ms": eng.replay_last_launch(20),
                   "regs": getattr(k, "num_regs", None), "local_bytes": getattr(k, "local_size_bytes", None)}
            got = mel.log_mel_spectrogram(clip, engine=eng)
            row["max_abs_diff_vs_numpy"] = float(np.abs(got - cpu).max())
            if default is None:
                default = got
            row["max_abs_diff_vs_first"] = float(np.abs(got - default).max())
        res[name] = row
        print(json.dumps({"kernel_variant": name, **row}), flush=True)
    return res


def profile_device_batch(engine: Any, rng: np.random.Generator, clips: int, seconds: int) -> None:
    """Where the host's time goes in a device batch call (cProfile, 100 calls)."""
    import cProfile
    import pstats

    import cupy as cp

    x = cp.asarray(rng.integers(-12000, 12000, size=(clips, seconds * 16000), dtype=np.int16))
    out = cp.empty((clips, 80, seconds * 100), cp.float32)
    for _ in range(3):
        mel.log_mel_batch(x, engine=engine, out=out)
    engine.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        mel.log_mel_batch(x, engine=engine, out=out)
    host_us = (time.perf_counter() - t0) * 1e4
    engine.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(100):
        mel.log_mel_batch(x, engine=engine, out=out)
    profile.disable()
    engine.synchronize()
    print(json.dumps({"device_batch_host_us_per_call": host_us}), flush=True)
    pstats.Stats(profile).sort_stats("tottime").print_stats(22)


def stream_chunks(engine: Any, rng: np.random.Generator) -> dict[str, Any]:
    """One 1 s int16 chunk per process(): one stream, and 64 streams in one call; with
    plain results and with out= into registered slots (the worker's lean path)."""
    chunk = rng.integers(-12000, 12000, size=mel.SAMPLE_RATE, dtype=np.int16)
    slots = np.zeros((64, 100 * 80), np.float32)
    engine.register_host(slots)
    res = {}
    for n_streams in (1, 64):
        for mode in ("plain", "out_registered"):
            streams = [engine.new_stream() for _ in range(n_streams)]
            outs = list(slots[:n_streams]) if mode != "plain" else None
            kernel, gpu, walls = [], [], []
            for i in range(60):
                t0 = time.perf_counter()
                engine.process([(s, chunk, False) for s in streams], out=outs)
                walls.append(time.perf_counter() - t0)
                if i >= 10:
                    kernel.append(engine.last_kernel_ms * 1e3)
                    gpu.append(engine.last_gpu_ms * 1e3)
            res[f"x{n_streams}_{mode}"] = {
                "kernel_replayed_us": engine.replay_last_launch(200) * 1e3,
                "kernel_us": statistics.median(kernel), "gpu_us": statistics.median(gpu),
                "wall_us": statistics.median(walls[10:]) * 1e6,
            }
    print(json.dumps({"stream_chunks": res}), flush=True)
    return res


def ncu_target() -> None:
    """One 512 x 30 s int16 device batch after a warm-up on another size, for ncu."""
    import cupy as cp

    engine = mel.CudaEngine(0)
    x = cp.asarray(np.random.default_rng(0).integers(-12000, 12000, size=(512, 480000), dtype=np.int16))
    engine.synchronize()
    mel.log_mel_batch(x, engine=engine)
    engine.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--single-repeat", type=int, default=50)
    parser.add_argument("--cpu-clips", type=int, default=4)
    parser.add_argument("--no-variants", action="store_true")
    parser.add_argument("--only", default="single,host,device,variants,chunks,numpy",
                        help="comma-separated sections (single, host, device, variants, profile, chunks, numpy); "
                             "default: all but profile")
    parser.add_argument("--ncu", action="store_true", help="one batch for Nsight Compute, nothing else")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.ncu:
        return ncu_target()

    import cupy as cp
    import torch
    import torchaudio

    engine = mel.CudaEngine(0, timing=True)
    props = cp.cuda.runtime.getDeviceProperties(0)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "gpu": props["name"].decode(),
        "cpu": platform.processor() or platform.machine(), "cupy": cp.__version__, "numpy": np.__version__,
        "torch": torch.__version__, "torchaudio": torchaudio.__version__, "hbm_bytes_per_s": HBM_BYTES_PER_S,
    }
    try:
        with open("/proc/cpuinfo") as f:
            results["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rng = np.random.default_rng(0)
    only = set(args.only.split(","))
    if "single" in only:
        results["single_clip"] = single_clip(engine, rng, args.single_repeat)
    if "host" in only:
        results["host_batch"] = host_batch(engine, rng, args.clips, args.seconds, args.repeat)
    if "device" in only:
        results["device_batch"] = device_batch(engine, rng, args.clips, args.seconds, args.repeat,
                                               torchaudio_whisper())
    if "variants" in only and not args.no_variants:
        results["kernel_variants"] = kernel_variants(rng, args.clips, args.seconds, args.repeat)
    if "profile" in only:
        profile_device_batch(engine, rng, args.clips, args.seconds)
    if "chunks" in only:
        results["stream_chunks"] = stream_chunks(engine, rng)
    if "numpy" in only:
        cpu_engine = mel.NumpyEngine()
        pcm = rng.integers(-12000, 12000, size=(args.cpu_clips, args.seconds * 16000), dtype=np.int16)
        t = wall(lambda: mel.log_mel_batch(pcm, engine=cpu_engine), 3, warm=1)
        results["numpy_engine"] = {"clips": args.cpu_clips, **t, "audio_per_s": args.cpu_clips * args.seconds / t["median_s"]}
    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    summary(results)


def summary(r: dict[str, Any]) -> None:
    print(f"\n{r['gpu']} | {r['cpu']} | torch {r['torch']} | cupy {r['cupy']} | {r['date']}")
    if "single_clip" in r:
        print("one clip, median ms (host numpy -> host numpy | torch CUDA -> torch CUDA)")
    for k, row in r.get("single_clip", {}).items():
        print(f"  {k:>4}: batch path {row['shmmel_host_batch_path']['median_s'] * 1e3:.3f}, without CUDA graph "
              f"{row['shmmel_host_no_graph']['median_s'] * 1e3:.3f}, same bits {row['same_bits_batch_path_no_graph']}")
        print(f"  {k:>4}: shmmel {row['shmmel_host']['median_s'] * 1e3:.3f} | whisper {row['whisper_host']['median_s'] * 1e3:.3f}"
              f" ({row['speedup_host']:.2f}x)   device: shmmel {row['shmmel_device']['median_s'] * 1e3:.3f} | whisper"
              f" {row['whisper_device']['median_s'] * 1e3:.3f} ({row['speedup_device']:.2f}x)  max|d| {row['max_abs_diff_vs_whisper']:.2g}")
    if "host_batch" in r:
        summary_host(r["host_batch"])
    if "device_batch" in r:
        summary_device(r["device_batch"])
    if "kernel_variants" in r:
        print("kernel variants, batch / frames kernel ms (registers, spill bytes):")
        for k, v in r["kernel_variants"].items():
            if "error" in v:
                print(f"  {k}: {v['error']}")
            else:
                print(f"  {k}: {v['batch_ms']:.3f} / {v['kernel_replayed_ms']:.3f} ({v['regs']}, {v['local_bytes']})"
                      f"  max|d| vs first {v['max_abs_diff_vs_first']:.2g}, vs numpy {v['max_abs_diff_vs_numpy']:.2g}")
    for k, v in r.get("stream_chunks", {}).items():
        print(f"chunk 1 s {k}: kernel {v['kernel_replayed_us']:.1f} us, gpu {v['gpu_us']:.1f} us, wall {v['wall_us']:.0f} us")
    if "numpy_engine" in r:
        print(f"numpy engine: {r['numpy_engine']['audio_per_s']:,.0f} audio-s/s")


def summary_host(hb: dict[str, Any]) -> None:
    print(f"host batch {hb['clips']} x {hb['seconds']} s, audio-s/s:")
    for k, v in hb.items():
        if isinstance(v, dict) and "audio_per_s" in v:
            print(f"  {k:>22}: {v['audio_per_s']:>12,.0f}  ({v['median_s'] * 1e3:.1f} ms, {v['min_s'] * 1e3:.1f}..{v['max_s'] * 1e3:.1f})")
    print(f"  copy ceilings GB/s: H2D pinned {hb['h2d_pinned_GBps']:.1f}, D2H pinned {hb['d2h_pinned_GBps']:.1f}, "
          f"host memcpy 1 thread {hb['host_memcpy_1thread_GBps']:.1f}; pageable -> pinned by 1/4/8/16 threads "
          + " / ".join(f"{hb[f'host_to_pinned_{t}threads_GBps']:.1f}" for t in (1, 4, 8, 16))
          + f"; cudaHostRegister of {hb['host_register_ms']['bytes'] / 1e6:.0f} MB "
          f"{hb['host_register_ms']['register']:.1f} ms (unregister {hb['host_register_ms']['unregister']:.1f} ms)")


def summary_device(db: dict[str, Any]) -> None:
    print(f"device batch: int16 {db['device_int16']['audio_per_s']:,.0f} ({db['device_int16']['s'] * 1e3:.2f} ms, launch "
          f"in the call {db['device_int16']['launch_in_call_s'] * 1e3:.2f} ms, frames kernel replayed "
          f"{db['device_int16']['kernel_replayed_s'] * 1e3:.2f} ms) | float32 {db['device_float32']['audio_per_s']:,.0f}"
          f" | torchaudio {db['torchaudio']['audio_per_s']:,.0f} ({db['torchaudio']['s'] * 1e3:.2f} ms) | speed-up "
          f"{db['speedup_int16']:.2f}x / {db['speedup_float32']:.2f}x | max|d| {db['max_abs_diff_vs_torchaudio']:.2g}")


if __name__ == "__main__":
    main()
