"""Test audio for the benches and ``shmmel gen-audio``: 16 kHz mono, float32 in [-1, 1].

Deterministic for a given seed. ``speech`` is speech-like, not speech: a glottal pulse train
with a wandering pitch, shaped by three moving formant resonators, in syllables of 100-300 ms
separated by short pauses, with a little breath noise.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Literal

import numpy as np

RATE = 16000
Kind = Literal["tone", "chirp", "noise", "speech", "silence"]
Format = Literal["wav", "s16le", "f32le"]
KINDS: tuple[str, ...] = ("tone", "chirp", "noise", "speech", "silence")


def tone(seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirp(seconds: float, f0: float = 100.0, f1: float = 7000.0, amp: float = 0.5) -> np.ndarray:
    """A logarithmic sweep from f0 to f1 Hz."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    k = (f1 / f0) ** (1 / max(seconds, 1e-9))
    phase = 2 * np.pi * f0 * (k ** t - 1) / np.log(k) if f1 != f0 else 2 * np.pi * f0 * t
    return (amp * np.sin(phase)).astype(np.float32)


def noise(seconds: float, seed: int = 0, color: Literal["white", "pink"] = "white",
          amp: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    x = rng.standard_normal(n)
    if color == "pink" and n:
        spec = np.fft.rfft(x)
        f = np.maximum(np.fft.rfftfreq(n, 1 / RATE), 1.0)
        x = np.fft.irfft(spec / np.sqrt(f), n)
    x /= max(1e-9, float(np.max(np.abs(x)))) if n else 1.0
    return (amp * x).astype(np.float32)


def _resonate(x: np.ndarray, freq: np.ndarray, bw: float) -> np.ndarray:
    """A two-pole resonator whose centre moves sample by sample (block-wise, 10 ms)."""
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    r = np.exp(-np.pi * bw / RATE)
    for s in range(0, len(x), 160):
        c = 2 * r * np.cos(2 * np.pi * freq[s] / RATE)
        for i in range(s, min(s + 160, len(x))):
            y0 = x[i] + c * y1 - r * r * y2
            y[i] = y0
            y2, y1 = y1, y0
    return y


def speech(seconds: float, seed: int = 0, amp: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    out = np.zeros(n)
    pos = int(rng.uniform(0.05, 0.2) * RATE)
    while pos < n:
        length = min(n - pos, int(rng.uniform(0.1, 0.3) * RATE))
        if length <= 0:
            break
        t = np.arange(length) / RATE
        f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
        phase = np.cumsum(f0 / RATE)
        pulses = np.diff(np.floor(phase), prepend=0.0)            # one impulse a period
        src = pulses + 0.02 * rng.standard_normal(length)          # plus breath
        seg = np.zeros(length)
        for lo, hi, bw in ((300, 900, 80), (900, 2400, 120), (2400, 3200, 160)):
            a, b = rng.uniform(lo, hi, 2)
            seg += _resonate(src, np.linspace(a, b, length), bw)
        env = np.sin(np.pi * np.arange(length) / length) ** 0.7
        out[pos:pos + length] = seg * env
        pos += length + int(rng.uniform(0.03, 0.25) * RATE)
    peak = float(np.max(np.abs(out))) if n else 0.0
    return (amp * out / peak if peak else out).astype(np.float32)


def generate(kind: Kind, seconds: float, seed: int = 0, freq: float = 440.0) -> np.ndarray:
    if kind == "tone":
        return tone(seconds, freq)
    if kind == "chirp":
        return chirp(seconds)
    if kind == "noise":
        return noise(seconds, seed)
    if kind == "speech":
        return speech(seconds, seed)
    if kind == "silence":
        return np.zeros(int(seconds * RATE), np.float32)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def to_s16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")


def write(path: str | Path, audio: np.ndarray, fmt: Format = "wav") -> int:
    """Write ``audio`` (float32): a 16-bit PCM WAV, or raw s16le / f32le. Returns bytes."""
    path = Path(path)
    if fmt == "wav":
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(to_s16(audio).tobytes())
    elif fmt == "s16le":
        path.write_bytes(to_s16(audio).tobytes())
    elif fmt == "f32le":
        path.write_bytes(audio.astype("<f4").tobytes())
    else:
        raise ValueError(f"format must be wav, s16le or f32le, got {fmt!r}")
    return path.stat().st_size
