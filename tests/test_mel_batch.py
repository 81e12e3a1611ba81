"""The batch API, WAV-file input and process(out=) on the NumPy engine (the CUDA engine's
versions are in test_mel_gpu.py)."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from shmmel import mel

from .test_mel import make_signal, ref_log_mel


def clips_of(lengths: list[int]) -> list[np.ndarray]:
    out = []
    for i, n in enumerate(lengths):
        clip = make_signal(("speech", "noise", "tone")[i % 3], n, seed=i)
        out.append((clip * 30000).astype(np.int16) if i % 2 else clip)
    return out


def test_batch_list_equals_each_clip() -> None:
    clips = clips_of([0, 150, 16000, 16001, 40321])
    got = mel.log_mel_batch(clips, padding=300)
    assert isinstance(got, list) and len(got) == len(clips)
    for spec, clip in zip(got, clips):
        want = mel.log_mel_spectrogram(clip, padding=300)
        assert spec.shape == want.shape and np.array_equal(spec, want)


def test_batch_pad_or_trim_is_whispers_30s_window() -> None:
    clips = clips_of([1000, mel.N_SAMPLES, mel.N_SAMPLES + 5000])
    got = mel.log_mel_batch(clips, 128, pad_or_trim=True)
    assert got.shape == (3, 128, mel.N_FRAMES) and got.dtype == np.float32
    for spec, clip in zip(got, clips):
        assert np.array_equal(spec, mel.log_mel_spectrogram(mel.pad_or_trim(clip), 128))
    assert np.abs(got[0] - ref_log_mel(mel.pad_or_trim(clips[0]), 128)).max() < 1e-4


def test_batch_2d_array_and_out() -> None:
    batch = np.stack(clips_of([8000, 8000, 8000])[0::2])  # two float32 clips
    got = mel.log_mel_batch(batch)
    assert got.shape == (2, 80, 50)
    out = np.full((2, 80, 50), np.nan, np.float32)
    assert mel.log_mel_batch(batch, out=out) is out
    assert np.array_equal(out, got)
    assert np.array_equal(got[1], mel.log_mel_spectrogram(batch[1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"out": np.zeros((2, 80, 49), np.float32)}, "shape"),
        ({"out": np.zeros((2, 80, 50), np.float64)}, "float32"),
        ({"out": np.zeros((2, 50, 80), np.float32).transpose(0, 2, 1)}, "contiguous"),
        ({"padding": 10, "pad_or_trim": True}, "not both"),
        ({"n_mels": 64}, "n_mels"),
    ],
)
def test_batch_bad_arguments(kwargs: dict, message: str) -> None:
    batch = np.zeros((2, 8000), np.float32)
    with pytest.raises(ValueError, match=message):
        mel.log_mel_batch(batch, **kwargs)


def test_batch_bad_clips() -> None:
    with pytest.raises(ValueError, match="clip 1: .*float32 or int16"):
        mel.log_mel_batch([np.zeros(10, np.float32), np.zeros(10, np.float64)])
    with pytest.raises(ValueError, match="clip 0: .*NaN"):
        mel.log_mel_batch([np.array([0.0, np.nan], np.float32)])
    with pytest.raises(ValueError, match="2-D"):
        mel.log_mel_batch(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="one array result"):
        mel.log_mel_batch([np.zeros(800, np.float32)], out=np.zeros((1, 80, 5), np.float32))
    assert mel.log_mel_batch([]) == []


def _write_wav(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> None:
    if samples.dtype == np.int16:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(samples.astype("<i2").tobytes())
        return
    data = samples.astype("<f4").tobytes()  # IEEE float (format 3), written by hand
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_wav_file_input(tmp_path: Path) -> None:
    pcm = (make_signal("speech", 23456, seed=4) * 30000).astype(np.int16)
    _write_wav(tmp_path / "a.wav", pcm)
    got = mel.log_mel_spectrogram(tmp_path / "a.wav")
    assert np.array_equal(got, mel.log_mel_spectrogram(pcm))
    assert np.array_equal(mel.log_mel_spectrogram(str(tmp_path / "a.wav"), 128), mel.log_mel_spectrogram(pcm, 128))
    f32 = make_signal("tone", 5000, seed=1)
    _write_wav(tmp_path / "f.wav", f32)
    loaded = mel.load_wav(tmp_path / "f.wav")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, f32)
    assert np.array_equal(mel.log_mel_spectrogram(tmp_path / "f.wav"), mel.log_mel_spectrogram(f32))


def test_wav_file_errors(tmp_path: Path) -> None:
    pcm = np.zeros(1000, np.int16)
    _write_wav(tmp_path / "stereo.wav", pcm, channels=2)
    _write_wav(tmp_path / "44k.wav", pcm, rate=44100)
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    for name, message in [("stereo.wav", "channels"), ("44k.wav", "sample rate"), ("junk.wav", "RIFF")]:
        with pytest.raises(ValueError, match=message):
            mel.log_mel_spectrogram(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        mel.log_mel_spectrogram(tmp_path / "missing.wav")
    _write_wav(tmp_path / "short.wav", pcm)
    data = (tmp_path / "short.wav").read_bytes()
    (tmp_path / "short.wav").write_bytes(data[:-100])  # data chunk cut short
    with pytest.raises(ValueError, match="shorter"):
        mel.log_mel_spectrogram(tmp_path / "short.wav")


# -- process(out=): frames written into the caller's buffers ---------------------------------


def test_process_out_writes_into_the_callers_buffers() -> None:
    engine = mel.NumpyEngine()
    audio = make_signal("speech", 30000, seed=2)
    a, b = engine.new_stream(), engine.new_stream(128)
    plain_a, plain_b = engine.new_stream(), engine.new_stream(128)
    slots = np.full((2, 200 * 128), np.nan, np.float32)
    for lo, hi, final in [(0, 7000, False), (7000, 30000, True)]:
        items = [(a, audio[lo:hi], final), (b, audio[lo:hi], final)]
        got = engine.process(items, out=[slots[0], slots[1]])
        want = engine.process([(plain_a, audio[lo:hi], final), (plain_b, audio[lo:hi], final)])
        for g, w, slot in zip(got, want, slots):
            assert np.shares_memory(g.log10, slot) and g.log10.base is not None
            assert np.array_equal(g.log10, w.log10) and g.start == w.start
            assert np.array_equal(slot[: w.log10.size], w.log10.reshape(-1))
            assert g.running_max == w.running_max


def test_process_out_may_be_the_chunks_own_memory() -> None:
    """A shared-memory slot holds the chunk and then receives its frames."""
    engine = mel.NumpyEngine()
    audio = make_signal("noise", 9000, seed=5)
    slot = np.zeros(9000, np.float32)
    slot[:] = audio
    batch = engine.process([(engine.new_stream(), slot, True)], out=[slot])[0]
    assert np.array_equal(batch.log10, mel.log10_mel(audio)[0])


def test_process_out_errors_change_no_stream() -> None:
    engine = mel.NumpyEngine()
    stream = engine.new_stream()
    chunk = np.zeros(16000, np.float32)
    cases = [
        ([np.zeros(10, np.float32)], "floats"),
        ([np.zeros(100 * 80, np.float64)], "float32"),
        ([None, None], "entries"),
    ]
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.process([(stream, chunk, False)], out=out)
    assert stream.samples_in == 0
    readonly = np.zeros(100 * 80, np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        engine.process([(stream, chunk, False)], out=[readonly])
    batch = engine.process([(stream, chunk, False)], out=[None])[0]
    assert batch.log10.shape == (99, 80) and stream.samples_in == 16000


def test_is_device_array_without_cuda() -> None:
    assert not mel.is_device_array(np.zeros(3, np.float32))
    assert not mel.is_device_array([1, 2])
