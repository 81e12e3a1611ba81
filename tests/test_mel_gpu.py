"""Mel engine on the GPU (CuPy): accuracy against the float64 reference, streaming and
multi-stream batches equal offline bit for bit. Skipped where CuPy or a device is absent."""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytest

from shmmel import mel

from .test_mel import (  # the helpers are shared with the CPU tests
    LENGTHS,
    SHORT_LENGTHS,
    SIGNALS,
    assert_stream_equals_offline,
    make_signal,
    random_chunks,
    ref_log_mel,
    stream_frames,
)

pytestmark = pytest.mark.gpu

if importlib.util.find_spec("cupy") is None:
    pytest.skip("CuPy is not installed (GPU tests need cupy and a CUDA device)", allow_module_level=True)
if not mel.cuda_available():
    pytest.skip("CuPy sees no CUDA device", allow_module_level=True)

import cupy as cp  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> mel.CudaEngine:
    with mel.CudaEngine(0) as gpu:
        yield gpu


def accuracy(engine: mel.Engine) -> tuple[float, float]:
    """(max, 99.99th percentile) of |output - float64 reference| over the test signals."""
    errors = []
    for kind in SIGNALS:
        for n_mels in (80, 128):
            for n in LENGTHS + SHORT_LENGTHS + [mel.N_SAMPLES]:
                audio = make_signal(kind, n, seed=n)
                if kind == "speech" and n == 16000:
                    audio = (audio * 32767).astype(np.int16)
                got = mel.log_mel_spectrogram(audio, n_mels=n_mels, engine=engine)
                want = ref_log_mel(audio, n_mels)
                assert got.shape == want.shape
                errors.append(np.abs(got - want).ravel())
    error = np.concatenate(errors)
    return float(error.max()), float(np.percentile(error, 99.99))


def test_gpu_matches_float64_reference(engine: mel.CudaEngine) -> None:
    worst, p9999 = accuracy(engine)
    print(f"GPU vs float64 reference: max {worst:.3g}, 99.99th percentile {p9999:.3g}")
    assert worst <= 1e-3 and p9999 <= 2e-4


def test_gpu_close_to_cpu(engine: mel.CudaEngine) -> None:
    audio = make_signal("speech", 80000, seed=1)
    gpu = mel.log_mel_spectrogram(audio, engine=engine)
    cpu = mel.log_mel_spectrogram(audio)
    assert np.abs(gpu - cpu).max() <= 1e-3


@pytest.mark.parametrize("kind", SIGNALS)
def test_gpu_stream_equals_offline_bit_for_bit(engine: mel.CudaEngine, kind: str) -> None:
    for i, n in enumerate(LENGTHS):
        assert_stream_equals_offline(engine, make_signal(kind, n, seed=i), seed=i)
    assert_stream_equals_offline(engine, make_signal(kind, 41000, seed=3), seed=4, n_mels=128, padding=777)
    pcm = (make_signal(kind, 23456, seed=2) * 30000).astype(np.int16)
    assert_stream_equals_offline(engine, pcm, seed=5)


@pytest.mark.parametrize("n", SHORT_LENGTHS + [399, 400, 401, 520, 521])
def test_gpu_short_streams(engine: mel.CudaEngine, n: int) -> None:
    audio = make_signal("noise", n, seed=n)
    offline, top = mel.log10_mel(audio, engine=engine)
    frames, stream_top, _ = stream_frames(engine, audio, [1] * n, empty_pushes=False)
    assert np.array_equal(frames, offline) and stream_top == top
    assert_stream_equals_offline(engine, audio, seed=n, padding=170)


def test_gpu_one_process_call_for_many_streams(engine: mel.CudaEngine) -> None:
    """One process() (one launch) over many streams equals each stream's offline result."""
    rng = np.random.default_rng(7)
    audios, streams = [], []
    for i in range(48):
        n = int(rng.integers(0, 60000))
        audio = make_signal(SIGNALS[i % len(SIGNALS)], n, seed=i)
        if i % 3 == 0:
            audio = (audio * 20000).astype(np.int16)
        audios.append(audio)
        streams.append(engine.new_stream(80 if i % 2 else 128, padding=int(rng.integers(0, 500))))
    cuts = [sorted(rng.integers(0, a.size + 1, size=3).tolist()) for a in audios]
    got: list[list[np.ndarray]] = [[] for _ in audios]
    for step in range(4):
        items = []
        for i, (stream, audio) in enumerate(zip(streams, audios)):
            bounds = [0] + cuts[i] + [audio.size]
            items.append((stream, audio[bounds[step] : bounds[step + 1]], step == 3))
        for i, batch in enumerate(engine.process(items)):
            got[i].append(batch.log10)
            assert batch.final == (step == 3)
    for i, (stream, audio) in enumerate(zip(streams, audios)):
        offline, top = mel.log10_mel(audio, stream.n_mels, stream.padding, engine=engine)
        assert np.array_equal(np.concatenate(got[i]), offline), i
        assert stream.running_max == (top if top is not None else -np.inf)


def test_gpu_device_batch_equals_process(engine: mel.CudaEngine) -> None:
    clips = np.stack([make_signal(k, 50000, seed=i) for i, k in enumerate(SIGNALS)])
    pcm = (clips * 30000).astype(np.int16)
    for host in (clips, pcm):
        device = cp.asarray(host)
        cp.cuda.Device().synchronize()
        frames, maxima = engine.log10_mel_device(device, padding=300)
        normalised = engine.log_mel_device(device, n_mels=128)
        engine.synchronize()
        for i in range(host.shape[0]):
            want, top = mel.log10_mel(host[i], padding=300, engine=engine)
            assert np.array_equal(cp.asnumpy(frames[i]), want)
            assert float(maxima[i]) == top
            spec = mel.log_mel_spectrogram(host[i], n_mels=128, engine=engine)
            assert np.array_equal(cp.asnumpy(normalised[i]), spec)


def test_gpu_windows_and_factory(engine: mel.CudaEngine) -> None:
    audio = make_signal("speech", mel.N_SAMPLES + 1000)
    windows = mel.log_mel_windows(audio, engine=engine)
    assert windows.shape == (2, 80, 3000)
    np.testing.assert_allclose(windows, mel.log_mel_windows(audio), atol=1e-3)
    auto = mel.create_engine("auto")
    assert auto.kind == "cuda"
    auto.close()
    auto.close()


def test_gpu_random_chunk_sizes_long(engine: mel.CudaEngine) -> None:
    audio = make_signal("speech", 16000 * 20 + 123, seed=11)
    for seed in range(3):
        assert_stream_equals_offline(engine, audio, seed=100 + seed)
    sizes = random_chunks(audio.size, np.random.default_rng(3))
    assert len(sizes) > 5


# -- batches, device arrays, out= ------------------------------------------------------------


def per_clip(engine: mel.CudaEngine, clip: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """The streaming code path's result (process() + host normalisation) for one clip."""
    frames, top = mel.log10_mel(clip, n_mels, padding, engine=engine)
    return np.ascontiguousarray(mel.normalise(frames, top).T)


def mixed_clips(lengths: list[int]) -> list[np.ndarray]:
    clips = []
    for i, n in enumerate(lengths):
        clip = make_signal(SIGNALS[i % len(SIGNALS)], n, seed=i)
        clips.append((clip * 30000).astype(np.int16) if i % 2 else clip)
    return clips


def test_gpu_batch_equals_streaming_path(engine: mel.CudaEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Host batches (several pipeline groups) equal the process() path bit for bit."""
    from shmmel.mel import cuda_batch

    monkeypatch.setattr(cuda_batch, "GROUP_BYTES", 200_000)  # many groups, both slots reused
    monkeypatch.setattr(cuda_batch, "PARALLEL_BYTES", 50_000)  # threaded copies too
    clips = mixed_clips([0, 1, 200, 201, 16000, 16001, 48000, 99999, 5000, 70000, 12345])
    got = mel.log_mel_batch(clips, 128, padding=333, engine=engine)
    for spec, clip in zip(got, clips):
        assert np.array_equal(spec, per_clip(engine, clip, 128, 333))
    windows = mel.log_mel_batch(clips, pad_or_trim=True, engine=engine)
    assert windows.shape == (len(clips), 80, 3000)
    for spec, clip in zip(windows, clips):
        assert np.array_equal(spec, per_clip(engine, mel.pad_or_trim(clip)))
    single = mel.log_mel_spectrogram(clips[7], engine=engine)
    assert np.array_equal(single, per_clip(engine, clips[7]))


def test_gpu_batch_pinned_and_registered_buffers(engine: mel.CudaEngine) -> None:
    host = np.stack(mixed_clips([30000, 30000, 30000])[0::2])
    want = mel.log_mel_batch(host, engine=engine)
    pinned_in = engine.empty_pinned(host.shape, host.dtype)
    pinned_in[:] = host
    pinned_out = engine.empty_pinned(want.shape)
    pinned_out[:] = np.nan
    assert mel.log_mel_batch(pinned_in, out=pinned_out, engine=engine) is pinned_out
    assert np.array_equal(pinned_out, want)
    with mel.CudaEngine(0) as other:
        registered = np.full(want.shape, np.nan, np.float32)
        other.register_host(registered)
        other.log_mel_batch(host, out=registered)
        assert np.array_equal(registered, want)


def test_gpu_process_out_registered_slots(engine: mel.CudaEngine) -> None:
    """process(out=) into registered memory (the kernel writes the slots) and into plain
    memory (staged) both equal the plain process() frames; a slot may hold its chunk."""
    audio = [make_signal("speech", 40000, seed=s) for s in range(3)]
    with mel.CudaEngine(0) as gpu:
        slots = np.zeros((3, 40000), np.float32)  # like shared-memory reply slots
        gpu.register_host(slots)
        plain = [gpu.new_stream() for _ in audio]
        into = [gpu.new_stream() for _ in audio]
        staged = [gpu.new_stream() for _ in audio]
        loose = np.zeros((3, 40000), np.float32)
        for lo, hi, final in [(0, 9000, False), (9000, 40000, True)]:
            want = gpu.process([(s, a[lo:hi], final) for s, a in zip(plain, audio)])
            for k, a in enumerate(audio):
                slots[k, : hi - lo] = a[lo:hi]  # the chunk sits in the slot it is answered in
            got = gpu.process([(s, slots[k, : hi - lo], final) for k, s in enumerate(into)], out=list(slots))
            got2 = gpu.process([(s, a[lo:hi], final) for s, a in zip(staged, audio)], out=list(loose))
            for w, g, g2, slot in zip(want, got, got2, slots):
                assert np.shares_memory(g.log10, slot)
                assert np.array_equal(g.log10, w.log10) and np.array_equal(g2.log10, w.log10)
                assert g.running_max == w.running_max and g.start == w.start


def test_gpu_cupy_in_cupy_out(engine: mel.CudaEngine) -> None:
    clips = mixed_clips([16000, 48000, 30001])
    device = [cp.asarray(c) for c in clips]
    got = mel.log_mel_batch(device, engine=engine)
    engine.synchronize()
    for spec, clip in zip(got, clips):
        assert isinstance(spec, cp.ndarray)
        assert np.array_equal(cp.asnumpy(spec), per_clip(engine, clip))
    one = mel.log_mel_spectrogram(device[1], engine=engine)
    assert isinstance(one, cp.ndarray) and np.array_equal(cp.asnumpy(one), per_clip(engine, clips[1]))
    out = cp.full((2, 80, 3000), cp.nan, cp.float32)
    assert mel.log_mel_batch(device[:2], pad_or_trim=True, out=out, engine=engine) is out
    assert np.array_equal(cp.asnumpy(out[0]), per_clip(engine, mel.pad_or_trim(clips[0])))


def test_gpu_torch_in_torch_out_without_host_transfers(engine: mel.CudaEngine) -> None:
    """A torch CUDA tensor in and a torch CUDA tensor out: the kernel reads the tensor's own
    memory, the result is the engine's device memory (DLPack, no copy), and the CUDA
    trace of the call holds no device-to-host copy and no upload but the descriptors."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    clips = mixed_clips([48000, 48000])
    for host in clips:
        tensor = torch.from_numpy(host).cuda()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            spec = mel.log_mel_spectrogram(tensor, engine=engine)
            torch.cuda.synchronize()
        assert isinstance(spec, torch.Tensor) and spec.is_cuda and spec.shape == (80, 300)
        assert int(engine._last_body_pointers[0]) == tensor.data_ptr()
        names = [e.name for e in prof.events()]
        assert any("shmmel_mel_frames" in n for n in names), names  # the trace saw the kernel
        assert not [n for n in names if "DtoH" in n], names
        uploads = [n for n in names if "HtoD" in n]
        assert len(uploads) <= 2, uploads  # descriptors and tile starts, nothing else
        assert np.array_equal(spec.cpu().numpy(), per_clip(engine, host))
    stacked = np.stack(clips)  # float32 (the int16 clip's values unscaled)
    batch = torch.from_numpy(stacked).cuda()
    out = mel.log_mel_batch(batch, engine=engine)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 80, 300)
    assert np.array_equal(out[1].cpu().numpy(), per_clip(engine, stacked[1]))
    pcm = torch.from_numpy(clips[1]).cuda()
    out16 = mel.log_mel_batch([pcm, pcm[:20000]], engine=engine)
    assert np.array_equal(out16[1].cpu().numpy(), per_clip(engine, clips[1][:20000]))
    auto = mel.log_mel_spectrogram(batch[0])  # no engine: the cached CUDA engine of its device
    assert isinstance(auto, torch.Tensor) and auto.is_cuda


def test_gpu_batch_accuracy_30s_windows(engine: mel.CudaEngine) -> None:
    clips = [make_signal(k, mel.N_SAMPLES - 777 * i, seed=i) for i, k in enumerate(SIGNALS)]
    got = mel.log_mel_batch(clips, pad_or_trim=True, engine=engine)
    error = np.concatenate([np.abs(g - ref_log_mel(mel.pad_or_trim(c))).ravel() for g, c in zip(got, clips)])
    assert error.max() <= 1e-3 and np.percentile(error, 99.99) <= 2e-4


def test_gpu_batch_rejects_nan_found_on_the_device(engine: mel.CudaEngine) -> None:
    """Host float clips are checked for NaN/Inf by the kernel, not by a host pass."""
    clips = mixed_clips([50000, 3000, 150, 8000])
    bad = clips[0].copy()
    bad[41234] = np.nan
    with pytest.raises(ValueError, match="clip 1: audio contains NaN or Inf \\(first at sample 41234\\)"):
        mel.log_mel_batch([clips[1], bad, clips[2]], engine=engine)
    tiny = clips[2].copy()
    tiny[7] = -np.inf  # a clip too short for a frame: checked on the host
    with pytest.raises(ValueError, match="clip 0: .*first at sample 7"):
        mel.log_mel_batch([tiny], engine=engine)
    short = make_signal("noise", 3000, seed=3)
    short[150] = np.nan  # 3000 samples, 18 frames: read by the reflect path of the first tile
    with pytest.raises(ValueError, match="clip 0: .*first at sample 150"):
        mel.log_mel_batch([short], engine=engine)
    tail = np.stack([clips[0], clips[0]])
    tail[1, -5] = np.inf  # read by no frame (50000 % 160 = 80 samples past the last one)
    with pytest.raises(ValueError, match="clip 1: .*first at sample 49995"):
        mel.log_mel_batch(tail, engine=engine)
    with pytest.raises(ValueError, match="NaN"):
        mel.log_mel_spectrogram(bad, engine=engine)
    assert len(mel.log_mel_batch(clips, engine=engine)) == 4  # the engine is fine after


def test_gpu_kernel_variants_and_driver_copies_give_the_same_bits(engine: mel.CudaEngine) -> None:
    """The frame-major mel sum several frames at a time (mel_ilp) gives the bits of one
    chain at a time, the conflict-free shared-memory layout those of the plain one;
    staged and driver copies give the same batch."""
    clips = mixed_clips([48000, 16001, 777, 30000])
    want = mel.log_mel_batch(clips, 128, engine=engine)
    audio = make_signal("speech", 33333, seed=9)
    with mel.CudaEngine(0, mel_ilp=False) as chain:
        assert np.array_equal(mel.log10_mel(audio, engine=chain)[0], mel.log10_mel(audio, engine=engine)[0])
    for kwargs in ({"mel_ilp": False}, {"pageable_direct_bytes": 0}, {"conflict_free": False}):
        with mel.CudaEngine(0, **kwargs) as other:
            got = mel.log_mel_batch(clips, 128, engine=other)
            assert all(np.array_equal(g, w) for g, w in zip(got, want)), kwargs


@pytest.mark.parametrize("kwargs", [None, {"norm_lag": 0}, {"norm_lag": 1}, {"norm_group": 1}, {"norm_group": 7}])
def test_gpu_fused_normalise_gives_the_bits_of_the_separate_pass(engine: mel.CudaEngine,
                                                                  kwargs: dict[str, int] | None) -> None:
    """The frames kernel normalising each clip (device batches: spread over the blocks
    after its tiles, by the default lag or the least, in groups of chunks of the default
    size, 1 or 7, or in the clip's last block) equals
    the separate normalise launch (host batches, or fuse_normalise=False) bit for bit,
    many clips of many tiles, and again on the same buffers (counters zeroed per call)."""
    lengths = [480000, 16001, 777, 30000, 1, 0, 95999, 48000] * 5
    clips = mixed_clips(lengths)
    with mel.CudaEngine(0, fuse_normalise=False) as separate, \
            (mel.CudaEngine(0, **kwargs) if kwargs is not None else contextlib.nullcontext(engine)) as fused:
        for n_mels in (80, 128):
            want = mel.log_mel_batch(clips, n_mels, engine=separate)
            on_device = mel.log_mel_batch([cp.asarray(c) for c in clips], n_mels, engine=fused)
            assert all(np.array_equal(cp.asnumpy(g), w) for g, w in zip(on_device, want))
        batch = cp.asarray((make_signal("speech", 64000, seed=4) * 20000).astype(np.int16)[None].repeat(33, 0))
        want = cp.asnumpy(mel.log_mel_batch(batch, engine=separate))
        out = cp.empty_like(cp.asarray(want))
        for _ in range(3):  # the first call uploads, the others reuse descriptors kept on the device
            out.fill(cp.nan)
            mel.log_mel_batch(batch, engine=fused, out=out)
            assert np.array_equal(cp.asnumpy(out), want)


def test_gpu_spread_normalise_blocks_take_tickets(engine: mel.CudaEngine) -> None:
    """With the spread normalisation a block's logical index is a ticket from the word
    after the clips' tile counters (forward progress in any dispatch order), zeroed for
    every launch: after each call (device batches, with descriptors uploaded or kept on
    the device, a replay, one host clip, staged or not) every ticket was handed out once and every tile
    counted once."""
    from shmmel.mel import cuda_clip

    n, tiles = 5, -(-300 // engine.frames_per_block)
    batch = cp.asarray((make_signal("speech", 48000, seed=5) * 20000).astype(np.int16)[None].repeat(n, 0))
    out = cp.empty((n, 80, 300), cp.float32)
    for call in range(5):
        if call < 2:  # descriptors uploaded through the ring of small buffers
            mel.log_mel_batch(list(batch), engine=engine)
        elif call < 4:  # kept on the device, then reused
            mel.log_mel_batch(batch, engine=engine, out=out)
        else:
            engine.replay_last_launch(2)
        engine.synchronize()
        (grid,), _, args = engine._last_launch
        done = cp.asnumpy(args[-1])
        assert grid == n * tiles + engine.norm_lag_for(np.arange(n + 1) * tiles) > n * tiles
        assert done[:n].tolist() == [tiles] * n and int(done[n]) == grid, call
    for samples in (32000, 48000):  # staged (the second call replays its graph); pageable
        clip, tiles = make_signal("speech", samples, seed=6), -(-samples // 160 // engine.frames_per_block)
        for _ in range(2):
            mel.log_mel_spectrogram(clip, engine=engine)
            words_off = cuda_clip._align(cuda_clip._HEAD + clip.nbytes)
            words = engine._clip.host[words_off : words_off + 16].view(np.uint32)
            assert words[2:].tolist() == [tiles, 2 * tiles], samples


@pytest.mark.parametrize("build", [{"dft": "direct"}, {"window": "table", "twiddle_step": 1}])
def test_gpu_other_builds_within_bounds(build: dict[str, object]) -> None:
    """The folded direct DFT-20 build (the generated prime-factor one is the default), and
    the build with the window and every twiddle loaded, are accurate too, and stream bit
    for bit like offline on their own build."""
    with mel.CudaEngine(0, **build) as direct:
        worst, p9999 = accuracy(direct)
        assert worst <= 1e-3 and p9999 <= 2e-4
        assert_stream_equals_offline(direct, make_signal("chirp", 41000, seed=3), seed=4)


def test_gpu_one_clip_path_gives_the_batch_bits(engine: mel.CudaEngine) -> None:
    """log_mel_spectrogram of one host clip (one upload, one launch, one download, with or
    without a captured CUDA graph) equals the batch path bit for bit, and still finds
    NaN both where a frame reads it and in the unread tail."""
    clips = mixed_clips([16000, 480000, 777, 159, 0, 16001, 16000, 95999])
    with mel.CudaEngine(0, clip_graphs=False) as plain:
        for n_mels, padding in ((80, 0), (128, 0), (80, 4000)):
            for clip in clips + clips[:2]:  # repeated shapes replay their graphs
                want = mel.log_mel_batch([clip], n_mels, padding=padding, engine=engine)[0]
                for eng in (engine, plain):
                    got = mel.log_mel_spectrogram(clip, n_mels, padding, engine=eng)
                    assert got.shape == want.shape and got.dtype == np.float32
                    assert np.array_equal(got, want), (clip.size, n_mels, padding)
        bad = clips[0].copy()
        for where in (5000, bad.size - 3):
            bad[:] = clips[0]
            bad[where] = np.inf
            for eng in (engine, plain):
                with pytest.raises(ValueError, match=f"NaN or Inf \\(first at sample {where}\\)"):
                    mel.log_mel_spectrogram(bad, engine=eng)
        assert np.array_equal(mel.log_mel_spectrogram(clips[0], engine=engine),
                              mel.log_mel_batch([clips[0]], engine=plain)[0])
    assert engine._clip.use_graphs and engine._clip.graphs  # the default engine replayed graphs


def test_gpu_device_batch_descriptor_cache(engine: mel.CudaEngine) -> None:
    """A repeated 2-D device batch reuses its descriptors on the device: the result still
    follows the batch's current contents, other outs and other shapes."""
    pcm = (np.stack([make_signal(k, 48000, seed=i) for i, k in enumerate(SIGNALS)]) * 20000).astype(np.int16)
    x = cp.asarray(pcm)
    outs = [cp.empty((len(SIGNALS), 80, 300), cp.float32) for _ in range(2)]
    want = mel.log_mel_batch(pcm, engine=engine)
    for out in outs + outs:
        assert mel.log_mel_batch(x, engine=engine, out=out) is out
        assert np.array_equal(cp.asnumpy(out), want)
    x[:] = x[::-1].copy()  # same address, new contents
    got = mel.log_mel_batch(x, engine=engine, out=outs[0])
    assert np.array_equal(cp.asnumpy(got), want[::-1])
    half = mel.log_mel_batch(x[:, :24000], engine=engine)  # a strided view: another key
    assert np.array_equal(cp.asnumpy(half), mel.log_mel_batch(np.ascontiguousarray(pcm[::-1, :24000]), engine=engine))
