"""The Whisper log-mel specification: constants, window, filterbank, input checks.

Everything an engine needs to agree with Whisper's ``log_mel_spectrogram`` lives here;
the engines (NumPy, CUDA) only differ in how they compute the same formula.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

import numpy as np

# hard-coded audio hyperparameters (Whisper's, unchanged)
SAMPLE_RATE: Final = 16000
N_FFT: Final = 400
HOP_LENGTH: Final = 160
CHUNK_LENGTH: Final = 30
N_SAMPLES: Final = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES: Final = N_SAMPLES // HOP_LENGTH  # 3000 frames in a mel spectrogram input
N_BINS: Final = N_FFT // 2 + 1  # 201 rfft bins
PAD: Final = N_FFT // 2  # 200 samples of reflect padding each side ("center=True")
MEL_CHOICES: Final = (80, 128)  # Whisper v1-v2 and v3 models
LOG_FLOOR: Final = 1e-10  # mel power is clamped to this before log10
DYNAMIC_RANGE: Final = 8.0  # log10 values below (max - 8) are raised to it
INT16_SCALE: Final = 1.0 / 32768.0  # int16 PCM -> float32, exact (a power of two)


def check_n_mels(n_mels: int) -> int:
    if n_mels not in MEL_CHOICES:
        raise ValueError(f"n_mels must be one of {MEL_CHOICES}, got {n_mels!r}")
    return int(n_mels)


def check_padding(padding: int) -> int:
    if int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    return int(padding)


def check_audio(audio: object, *, allow_none: bool = False, finite: bool = True) -> np.ndarray:
    """Return ``audio`` as a 1-D int16 or float32 array (no copy), or raise ValueError.

    Float input must be finite (unless ``finite=False``: the CUDA batch path checks on
    the device). The check costs one float32 sum in the common case: NaN or Inf anywhere
    makes the sum non-finite; only then is every sample examined.
    """
    if audio is None:
        if allow_none:
            return np.empty(0, np.float32)
        raise ValueError("audio must be an array, got None")
    if not isinstance(audio, np.ndarray):
        raise ValueError(f"audio must be a numpy array, got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono PCM), got shape {audio.shape}")
    if audio.dtype not in (np.float32, np.int16):
        raise ValueError(
            f"audio dtype must be float32 or int16, got {audio.dtype} "
            "(convert with .astype(np.float32))"
        )
    if finite and audio.dtype == np.float32 and audio.size:
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(audio)
        if not np.isfinite(total) and not np.isfinite(audio).all():
            bad = int(np.flatnonzero(~np.isfinite(audio))[0])
            raise ValueError(f"audio contains NaN or Inf (first at sample {bad})")
    return audio


def as_float32(audio: np.ndarray, copy: bool = False) -> np.ndarray:
    """int16 -> a new float32 array scaled by 1/32768 (exact: the cast and the power-of-two
    scale, in one ufunc pass); float32 passes through (a copy if ``copy``)."""
    if audio.dtype == np.int16:
        return np.multiply(audio, _INT16_SCALE_F32, dtype=np.float32)
    return audio.copy() if copy else audio


_INT16_SCALE_F32 = np.float32(INT16_SCALE)


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES, *, axis: int = -1) -> np.ndarray:
    """Pad with zeros or trim ``audio`` to ``length`` samples along ``axis`` (Whisper's)."""
    n = audio.shape[axis]
    if n > length:
        audio = audio.take(indices=range(length), axis=axis)
    elif n < length:
        widths = [(0, 0)] * audio.ndim
        widths[axis] = (0, length - n)
        audio = np.pad(audio, widths)
    return audio


@lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
    """Periodic Hann window of N_FFT samples, float64 (torch.hann_window's definition)."""
    n = np.arange(N_FFT, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
    window.flags.writeable = False
    return window


# Slaney mel scale (librosa, htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mels = hz / _F_SP
    log_part = hz >= _MIN_LOG_HZ
    mels[log_part] = _MIN_LOG_MEL + np.log(hz[log_part] / _MIN_LOG_HZ) / _LOGSTEP
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    hz = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """Mel filterbank, (n_mels, 201) float32: librosa.filters.mel(sr=16000, n_fft=400,
    n_mels=n_mels) with its defaults (fmin 0, fmax 8000, htk=False, norm='slaney'),
    computed here with librosa's order of operations and roundings. Read-only, cached."""
    check_n_mels(n_mels)
    fftfreqs = np.linspace(0.0, SAMPLE_RATE / 2, N_BINS)
    mel_edges = np.linspace(_hz_to_mel(np.array([0.0]))[0],
                            _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2)
    mel_f = _mel_to_hz(mel_edges)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, N_BINS), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))  # rounded to float32 here
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]  # float64 product, rounded to float32 again
    weights.flags.writeable = False
    return weights


@lru_cache(maxsize=None)
def sparse_filters(n_mels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The filterbank as (start bin, support length, weight offset) per mel row plus the
    packed nonzero weights. Engines sum each row over its support in a fixed order, so a
    frame's value never depends on how many frames are computed with it."""
    weights = mel_filters(n_mels)
    starts = np.zeros(n_mels, np.int32)
    lengths = np.zeros(n_mels, np.int32)
    offsets = np.zeros(n_mels, np.int32)
    packed: list[np.ndarray] = []
    offset = 0
    for m in range(n_mels):
        nz = np.flatnonzero(weights[m])
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
        starts[m], lengths[m], offsets[m] = lo, hi - lo, offset
        packed.append(weights[m, lo:hi])
        offset += hi - lo
    packed_weights = np.concatenate(packed).astype(np.float32)
    for array in (starts, lengths, offsets, packed_weights):
        array.flags.writeable = False
    return starts, lengths, offsets, packed_weights
