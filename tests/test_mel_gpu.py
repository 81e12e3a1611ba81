"""Mel engine on the GPU (CuPy): accuracy against the float64 reference, streaming and
multi-stream batches equal offline bit for bit. Skipped where CuPy or a device is absent."""

from __future__ import annotations

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
