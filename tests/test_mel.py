"""Mel engine (CPU): spec, accuracy against an independent float64 reference, streaming
equals offline bit for bit, validation. GPU tests live in test_mel_gpu.py and reuse the
reference and signals defined here."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from shmmel import mel

# -- an independent float64 reference of Whisper's log_mel_spectrogram ------------------


def ref_slaney_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised slaney-scale triangles, float64, written from the formula:
    mel(f) = 3 f / 200 below 1 kHz, 15 + 27 ln(f / 1000) / ln 6.4 above."""

    def hz_to_mel(f: float) -> float:
        return 3.0 * f / 200.0 if f < 1000.0 else 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)

    def mel_to_hz(m: float) -> float:
        return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)

    top = hz_to_mel(8000.0)
    edges = [mel_to_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    freqs = [8000.0 * k / 200 for k in range(201)]
    out = np.zeros((n_mels, 201))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            rise = (f - lo) / (mid - lo)
            fall = (hi - f) / (hi - mid)
            out[m, k] = max(0.0, min(rise, fall)) * 2.0 / (hi - lo)
    return out


_REF_FILTERS: dict[int, np.ndarray] = {}


def ref_log10_frames(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """(T, n_mels) float64 log10(max(mel, 1e-10)); short inputs zero-extended where the
    reflection has no sample (shmmel's documented definition)."""
    x = audio.astype(np.float64) / (32768.0 if audio.dtype == np.int16 else 1.0)
    x = np.concatenate([x, np.zeros(padding)])
    n = x.size

    def at(i: int) -> float:
        return x[i] if 0 <= i < n else 0.0

    left = np.array([at(200 - j) for j in range(200)])
    right = np.array([at(n - 2 - j) for j in range(200)])
    xp = np.concatenate([left, x, right])
    t = n // 160
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([xp[160 * i : 160 * i + 400] for i in range(t)]) if t else np.zeros((0, 400))
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    if n_mels not in _REF_FILTERS:
        _REF_FILTERS[n_mels] = ref_slaney_filters(n_mels)
    return np.log10(np.maximum(power @ _REF_FILTERS[n_mels].T, 1e-10))


def ref_log_mel(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
    """(n_mels, T) float64, normalised as Whisper does."""
    log = ref_log10_frames(audio, n_mels, padding)
    if log.size:
        log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).T


# -- test signals --------------------------------------------------------------------------


def make_signal(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    if kind == "noise":
        x = 0.3 * rng.standard_normal(n)
    elif kind == "tone":
        x = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.25 * np.sin(2 * np.pi * 3150.0 * t + 1.0)
    elif kind == "silence":
        x = np.zeros(n)
    elif kind == "square":
        x = np.clip(3.0 * np.sign(np.sin(2 * np.pi * 210.0 * t)), -1.0, 1.0)
    elif kind == "chirp":
        x = 0.7 * np.sin(2 * np.pi * (50.0 * t + 0.5 * 7900.0 / max(t[-1] if n else 1.0, 1e-3) * t**2))
    elif kind == "speech":
        f0 = 120.0 + 30.0 * np.sin(2 * np.pi * 3.0 * t)  # FM pitch
        phase = 2 * np.pi * np.cumsum(f0) / 16000.0
        voiced = sum(np.sin(h * phase) / h for h in range(1, 25))
        envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0.0, None) ** 2  # syllable bursts
        x = 0.3 * envelope * voiced + 0.01 * rng.standard_normal(n)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


SIGNALS = ["noise", "tone", "silence", "square", "chirp", "speech"]
SHORT_LENGTHS = [0, 1, 100, 159, 160, 200, 201, 359, 360, 361]
LENGTHS = [16000, 16001, 160 * 57 + 39, 160 * 61 + 40, 160 * 64 + 159, 48000]


def random_chunks(n: int, rng: np.random.Generator, small: bool = False) -> list[int]:
    """Chunk sizes summing to n: 1-sample runs, odd sizes, occasional large ones."""
    sizes = []
    while n > 0:
        choice = rng.integers(0, 4)
        size = (1, int(rng.integers(1, 400)), int(rng.integers(1, 3000)), int(rng.integers(1, 20000)))[
            0 if small and choice else choice
        ]
        size = min(n, size)
        sizes.append(size)
        n -= size
    return sizes


def stream_frames(
    engine: mel.Engine, audio: np.ndarray, sizes: list[int], n_mels: int = 80, padding: int = 0,
    empty_pushes: bool = True,
) -> tuple[np.ndarray, float | None, list[mel.FrameBatch]]:
    stream = engine.new_stream(n_mels, padding)
    batches, pos = [], 0
    for size in sizes:
        batches.append(engine.process([(stream, audio[pos : pos + size], False)])[0])
        pos += size
        if empty_pushes and size % 7 == 0:
            batches.append(engine.process([(stream, None, False)])[0])
    batches.append(engine.process([(stream, None, True)])[0])
    expected_start = 0
    for batch in batches:
        assert batch.start == expected_start
        assert batch.log10.dtype == np.float32 and batch.log10.flags.c_contiguous
        assert batch.log10.shape[1] == n_mels
        expected_start += batch.log10.shape[0]
    frames = np.concatenate([b.log10 for b in batches])
    final = batches[-1]
    assert final.final and stream.closed
    return frames, (final.running_max if frames.shape[0] else None), batches


def assert_stream_equals_offline(engine: mel.Engine, audio: np.ndarray, seed: int, **kw) -> None:
    offline, top = mel.log10_mel(audio, engine=engine, **kw)
    rng = np.random.default_rng(seed)
    sizes = random_chunks(audio.size, rng, small=audio.size < 2000)
    frames, stream_top, batches = stream_frames(engine, audio, sizes, **kw)
    assert frames.shape == offline.shape
    assert np.array_equal(frames, offline), f"chunks {sizes[:20]}"
    assert stream_top == top
    if top is not None:  # provisional values + the final floor == offline output
        restored = np.concatenate(
            [np.maximum(b.provisional(), mel.final_floor(top)) for b in batches]
        )
        expected = mel.log_mel_spectrogram(audio, engine=engine, **kw).T
        assert np.array_equal(restored, expected)


# -- constants, filters, helpers -----------------------------------------------------------


def test_constants() -> None:
    assert (mel.SAMPLE_RATE, mel.N_FFT, mel.HOP_LENGTH) == (16000, 400, 160)
    assert (mel.CHUNK_LENGTH, mel.N_SAMPLES, mel.N_FRAMES) == (30, 480000, 3000)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_slaney_formula(n_mels: int) -> None:
    filters = mel.mel_filters(n_mels)
    assert filters.shape == (n_mels, 201) and filters.dtype == np.float32
    assert mel.mel_filters(n_mels) is filters  # cached
    assert not filters.flags.writeable
    np.testing.assert_allclose(filters, ref_slaney_filters(n_mels), rtol=2e-6, atol=1e-9)
    # each row is a triangle of unit area in Hz; where it spans many 40 Hz bins (the top
    # third), sampling it at the bins keeps that: sum * 40 ~ 1
    areas = filters.astype(np.float64).sum(axis=1) * 40.0
    np.testing.assert_allclose(areas[-(n_mels // 3) :], 1.0, atol=0.05)


def test_mel_filters_known_librosa_values() -> None:
    # librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)[0, 1], as in Whisper's
    # mel_filters.npz; 128-mel value derived from the same formula
    assert abs(float(mel.mel_filters(80)[0, 1]) - 0.02486259) < 5e-9
    assert mel.mel_filters(80)[0, 0] == 0 and mel.mel_filters(80)[79, 200] == 0
    assert abs(float(mel.mel_filters(128)[0, 1]) - 0.012373986) < 1e-8


def test_pad_or_trim() -> None:
    x = np.arange(10, dtype=np.float32)
    assert np.array_equal(mel.pad_or_trim(x, 4), x[:4])
    padded = mel.pad_or_trim(x, 12)
    assert padded.shape == (12,) and np.array_equal(padded[:10], x) and not padded[10:].any()
    assert mel.pad_or_trim(np.zeros(5, np.int16)).shape == (mel.N_SAMPLES,)
    batch = mel.pad_or_trim(np.ones((2, 7), np.float32), 5)
    assert batch.shape == (2, 5)


# -- accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SIGNALS)
def test_cpu_matches_float64_reference(kind: str) -> None:
    worst = 0.0
    for n_mels in (80, 128):
        for n in (16000 + 39, 160 * 40, 160 * 33 + 1, 160 * 37 + 159):
            audio = make_signal(kind, n, seed=n)
            got = mel.log_mel_spectrogram(audio, n_mels=n_mels)
            want = ref_log_mel(audio, n_mels)
            assert got.shape == want.shape == (n_mels, n // 160)
            assert got.dtype == np.float32 and got.flags.c_contiguous
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("n", SHORT_LENGTHS)
def test_short_inputs_have_defined_output(n: int) -> None:
    audio = make_signal("noise", n, seed=n)
    got = mel.log_mel_spectrogram(audio)
    assert got.shape == (80, n // 160)
    np.testing.assert_allclose(got, ref_log_mel(audio), atol=1e-4)
    frames, top = mel.log10_mel(audio)
    assert frames.shape == (n // 160, 80)
    assert (top is None) == (n < 160)


def test_int16_input_is_scaled_by_32768() -> None:
    pcm = (make_signal("speech", 16000 + 77) * 32767).astype(np.int16)
    as_float = pcm.astype(np.float32) / np.float32(32768)
    assert np.array_equal(mel.log_mel_spectrogram(pcm), mel.log_mel_spectrogram(as_float))
    np.testing.assert_allclose(mel.log_mel_spectrogram(pcm), ref_log_mel(pcm), atol=1e-4)


def test_padding_appends_zeros() -> None:
    audio = make_signal("chirp", 5000)
    got = mel.log_mel_spectrogram(audio, padding=1234)
    assert got.shape == (80, (5000 + 1234) // 160)
    assert np.array_equal(got, mel.log_mel_spectrogram(np.concatenate([audio, np.zeros(1234, np.float32)])))
    np.testing.assert_allclose(got, ref_log_mel(audio, padding=1234), atol=1e-4)


def test_silence_is_the_log_floor() -> None:
    frames, top = mel.log10_mel(np.zeros(3200, np.float32))
    assert top == -10.0 and np.all(frames == -10.0)
    assert np.all(mel.log_mel_spectrogram(np.zeros(3200, np.float32)) == np.float32(-1.5))


def test_thirty_second_window_is_3000_frames() -> None:
    spec = mel.log_mel_spectrogram(mel.pad_or_trim(make_signal("tone", 20000)))
    assert spec.shape == (80, mel.N_FRAMES)


def test_log_mel_windows() -> None:
    audio = make_signal("speech", mel.N_SAMPLES + 16000 + 5)
    windows = mel.log_mel_windows(audio)
    assert windows.shape == (2, 80, 3000) and windows.dtype == np.float32
    assert np.array_equal(windows[0], mel.log_mel_spectrogram(audio[: mel.N_SAMPLES]))
    assert np.array_equal(windows[1], mel.log_mel_spectrogram(mel.pad_or_trim(audio[mel.N_SAMPLES :])))
    assert mel.log_mel_windows(np.zeros(0, np.float32), n_mels=128).shape == (1, 128, 3000)


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SIGNALS)
def test_stream_equals_offline_bit_for_bit(kind: str) -> None:
    engine = mel.NumpyEngine(block_frames=97)  # blocks that cut frames at odd places
    for i, n in enumerate(LENGTHS[:4] if kind != "speech" else LENGTHS):
        assert_stream_equals_offline(engine, make_signal(kind, n, seed=i), seed=i)
    default = mel.default_engine()
    assert_stream_equals_offline(default, make_signal(kind, 41000, seed=5), seed=9, n_mels=128, padding=777)


@pytest.mark.parametrize("n", SHORT_LENGTHS + [399, 400, 401, 519, 520, 521])
def test_short_streams_one_sample_at_a_time(n: int) -> None:
    engine = mel.default_engine()
    audio = make_signal("noise", n, seed=n)
    offline, top = mel.log10_mel(audio)
    frames, stream_top, _ = stream_frames(engine, audio, [1] * n, empty_pushes=False)
    assert np.array_equal(frames, offline) and stream_top == top
    for seed in range(3):
        assert_stream_equals_offline(engine, audio, seed=seed)
        assert_stream_equals_offline(engine, audio, seed=seed, padding=seed * 150)


def test_int16_stream_mixed_with_float32_chunks() -> None:
    pcm = (make_signal("speech", 20000, seed=3) * 20000).astype(np.int16)
    audio = pcm.astype(np.float32) / np.float32(32768)
    offline, top = mel.log10_mel(pcm)
    engine = mel.default_engine()
    stream = engine.new_stream()
    out, pos = [], 0
    for i, size in enumerate(random_chunks(pcm.size, np.random.default_rng(1))):
        chunk = pcm[pos : pos + size] if i % 2 else audio[pos : pos + size]
        out.append(engine.process([(stream, chunk, False)])[0].log10)
        pos += size
    last = engine.process([(stream, None, True)])[0]
    assert np.array_equal(np.concatenate(out + [last.log10]), offline)
    assert last.running_max == top


def test_frames_are_emitted_as_soon_as_computable() -> None:
    engine = mel.default_engine()
    stream = engine.new_stream()
    audio = make_signal("noise", 1000)
    assert engine.process([(stream, audio[:200], False)])[0].log10.shape[0] == 0
    assert engine.process([(stream, audio[200:201], False)])[0].log10.shape[0] == 1  # frame 0 at 201
    assert engine.process([(stream, audio[201:359], False)])[0].log10.shape[0] == 0
    assert engine.process([(stream, audio[359:360], False)])[0].log10.shape[0] == 1  # frame t at 160t+200
    assert engine.process([(stream, audio[360:1000], False)])[0].log10.shape[0] == 4
    final = engine.process([(stream, None, True)])[0]
    assert final.start == 6 and final.log10.shape[0] == 0  # 1000 // 160 == 6 frames in all
    assert final.final and stream.frames_emitted == 6 and stream.samples_in == 1000


def test_stream_state_stays_small() -> None:
    engine = mel.default_engine()
    stream = engine.new_stream(padding=mel.N_SAMPLES)
    rng = np.random.default_rng(0)
    for _ in range(60):
        size = int(rng.integers(1, 9000))
        engine.process([(stream, make_signal("noise", size), False)])
        assert stream._cursor.carry.size < 600
    assert engine.process([(stream, None, True)])[0].log10.shape[1] == 80


def test_provisional_and_final_floor() -> None:
    audio = make_signal("speech", 64000, seed=2)
    audio[:16000] *= 1e-3  # quiet start: its running max is well below the final max
    expected = mel.log_mel_spectrogram(audio).T
    frames, top, batches = stream_frames(mel.default_engine(), audio, [16000, 16000, 32000])
    assert batches[0].running_max < top
    assert not np.array_equal(batches[0].provisional(), expected[: batches[0].log10.shape[0]])
    restored = np.concatenate([np.maximum(b.provisional(), mel.final_floor(top)) for b in batches])
    assert np.array_equal(restored, expected)
    assert np.array_equal(batches[-1].provisional(), expected[batches[-1].start :])
    assert mel.final_floor(top).dtype == np.float32


def test_many_streams_in_one_process_call() -> None:
    engine = mel.NumpyEngine()
    audios = [make_signal(k, 9000 + 37 * i, seed=i) for i, k in enumerate(SIGNALS)]
    streams = [engine.new_stream(80 if i % 2 else 128, padding=i * 100) for i in range(len(audios))]
    got: list[list[np.ndarray]] = [[] for _ in audios]
    for lo, hi in [(0, 333), (333, 4000), (4000, 20000)]:
        items = []
        for i, (stream, audio) in enumerate(zip(streams, audios)):
            items.append((stream, audio[lo:hi], hi == 20000))
            if i == 0:  # the same stream twice in one call: applied in order
                items[-1] = (stream, audio[lo : (lo + hi) // 2], False)
                items.append((stream, audio[(lo + hi) // 2 : hi], hi == 20000))
        for (stream, _, _), batch in zip(items, engine.process(items)):
            got[streams.index(stream)].append(batch.log10)
    for i, (stream, audio) in enumerate(zip(streams, audios)):
        offline, _ = mel.log10_mel(audio, stream.n_mels, stream.padding)
        assert np.array_equal(np.concatenate(got[i]), offline)


def test_mel_stream_wrapper() -> None:
    audio = make_signal("tone", 7000)
    stream = mel.MelStream(n_mels=128)
    first = stream.push(audio[:3000])
    last = stream.finish(audio[3000:])
    assert last.final and np.array_equal(np.concatenate([first.log10, last.log10]), mel.log10_mel(audio, 128)[0])
    with pytest.raises(ValueError, match="closed"):
        stream.push(audio[:10])
    with pytest.raises(ValueError, match="closed"):
        stream.finish()


def test_empty_stream() -> None:
    batch = mel.MelStream().finish()
    assert batch.log10.shape == (0, 80) and batch.running_max == -math.inf and batch.final
    assert batch.provisional().shape == (0, 80)
    spec = mel.log_mel_spectrogram(np.zeros(0, np.float32))
    assert spec.shape == (80, 0) and mel.log10_mel(np.zeros(0, np.int16))[1] is None


def test_process_does_not_keep_input_arrays() -> None:
    engine = mel.default_engine()
    stream = engine.new_stream()
    buffer = make_signal("noise", 5000)
    engine.process([(stream, buffer, False)])
    expected, _ = mel.log10_mel(np.concatenate([buffer, buffer[:1000]]))
    kept = buffer.copy()
    buffer[:] = 123.0  # the caller reuses its (shared-memory) buffer
    rest = engine.process([(stream, kept[:1000], True)])[0]
    assert np.array_equal(rest.log10, expected[rest.start :])


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros((2, 100), np.float32), "1-D"),
        (np.zeros(100, np.float64), "float32 or int16"),
        (np.zeros(100, np.int32), "float32 or int16"),
        (np.array([0.0, np.nan, 0.0], np.float32), "NaN or Inf"),
        (np.array([0.0, 1.0, -np.inf], np.float32), "NaN or Inf"),
        ([0.0, 1.0], "numpy array"),
    ],
)
def test_bad_audio_is_rejected(audio: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mel.log_mel_spectrogram(audio)  # type: ignore[arg-type]
    engine = mel.default_engine()
    stream = engine.new_stream()
    with pytest.raises(ValueError, match=message):
        engine.process([(stream, audio, False)])  # type: ignore[list-item]
    assert stream.samples_in == 0


def test_huge_finite_values_are_not_mistaken_for_inf() -> None:
    audio = np.full(1000, 3e38, np.float32)  # the float32 sum overflows; every sample is finite
    assert mel.log10_mel(audio)[0].shape == (6, 80)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_mels"):
        mel.log_mel_spectrogram(np.zeros(400, np.float32), n_mels=64)
    with pytest.raises(ValueError, match="n_mels"):
        mel.mel_filters(40)
    with pytest.raises(ValueError, match="padding"):
        mel.log_mel_spectrogram(np.zeros(400, np.float32), padding=-1)
    with pytest.raises(ValueError, match="padding"):
        mel.NumpyEngine().new_stream(padding=-5)
    with pytest.raises(ValueError, match="kind"):
        mel.create_engine("tpu")  # type: ignore[arg-type]


def test_invalid_item_changes_no_stream() -> None:
    engine = mel.default_engine()
    good, bad = engine.new_stream(), engine.new_stream()
    with pytest.raises(ValueError, match="item 1"):
        engine.process([(good, np.zeros(1000, np.float32), False), (bad, np.zeros(5, np.float64), False)])
    assert good.samples_in == 0 and good.frames_emitted == 0


# -- engine selection ------------------------------------------------------------------------


FAKE_CUPY = """\
import os

def _record(what):
    with open(os.environ["FAKE_CUPY_LOG"], "a") as f:
        f.write(what + "\\n")

_record("import")

def __getattr__(name):
    _record(name)
    raise AttributeError(name)
"""


def test_import_does_not_touch_cuda(tmp_path) -> None:
    """A fake ``cupy`` ahead of any real one on the path records its import and every
    attribute asked of it: importing shmmel, its mel package and the supervisor's modules,
    and making a NumPy engine, must not touch it (CUDA only ever starts in a worker)."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    log = tmp_path / "cupy.log"
    env = {**os.environ, "FAKE_CUPY_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, shmmel, shmmel.mel, shmmel.supervisor; from shmmel import mel; "
            "mel.NumpyEngine(); print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "False"
    assert not log.exists(), log.read_text()
    # the fake is what an import of cupy finds there: this test can fail
    code = "import cupy; cupy.cuda"
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
    assert log.read_text().split() == ["import", "cuda"]


def test_create_engine_cpu_and_auto_without_gpu() -> None:
    assert mel.create_engine("cpu").kind == "cpu"
    if not mel.cuda_available():
        assert isinstance(mel.create_engine("auto"), mel.NumpyEngine)
    with mel.create_engine("cpu") as engine:
        assert mel.log_mel_spectrogram(np.zeros(800, np.float32), engine=engine).shape == (80, 5)


def test_decode_max_is_the_inverse_of_the_kernels_ordered_bits():
    from shmmel.mel.cuda import _decode_max

    v = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -1e-45, -8.0,
                  12.25], np.float32)
    b = v.view(np.uint32)
    encoded = np.where(b & 0x80000000, ~b, b | 0x80000000).astype(np.uint32)  # ordered_bits
    got = _decode_max(encoded)
    assert got.dtype == np.float32 and got.view(np.uint32).tolist() == b.tolist()
    assert not np.shares_memory(got, encoded)  # the staging buffer it is read from is reused
    # every image, not only those of floats the kernel makes (a zeroed max word, say), as
    # the select it replaced decoded it
    u = np.concatenate([np.random.default_rng(5).integers(0, 1 << 32, 100_000, dtype=np.uint64),
                        [0, 1, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFF]]).astype(np.uint32)
    old = np.where((u & 0x80000000) == 0, ~u, u & 0x7FFFFFFF).astype(np.uint32)
    assert np.array_equal(_decode_max(u).view(np.uint32), old)


def test_int16_to_float32_is_the_exact_scaled_cast_and_copies_when_asked():
    from shmmel.mel.spec import as_float32

    x = np.concatenate([np.random.default_rng(6).integers(-32768, 32768, 10_000),
                        [-32768, -1, 0, 1, 32767]]).astype(np.int16)
    got = as_float32(x)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32),
                          (x.astype(np.float32) * np.float32(1 / 32768)).view(np.uint32))
    f = got[:100]
    assert as_float32(f) is f
    c = as_float32(f, copy=True)
    assert np.array_equal(c, f) and not np.shares_memory(c, f)
