"""Whisper-compatible entry points over any engine, and engine selection."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from .cuda import CudaEngine
from .engine import Engine, NumpyEngine
from .spec import N_FRAMES, N_SAMPLES, check_audio, check_n_mels, check_padding, pad_or_trim
from .stream import FrameBatch

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def default_engine() -> NumpyEngine:
    """The NumPy engine used where no engine is given (one per process, cached)."""
    return NumpyEngine()


def normalise(log10: np.ndarray, top: float | None) -> np.ndarray:
    """Whisper's ``(max(l, top - 8) + 4) / 4`` in float32, same shape as ``log10``."""
    if top is None:
        return log10.astype(np.float32, copy=True)
    return FrameBatch(0, log10, top, True).provisional()


def log10_mel(
    audio: np.ndarray, n_mels: int = 80, padding: int = 0, engine: Engine | None = None
) -> tuple[np.ndarray, float | None]:
    """Raw ``log10(max(mel, 1e-10))`` frames of ``audio`` (1-D float32, or int16 read as
    int16/32768) with ``padding`` zeros appended: (T, n_mels) float32, C-contiguous,
    T = (len + padding) // 160, and their max (None when T == 0)."""
    audio = check_audio(audio)
    engine = engine if engine is not None else default_engine()
    stream = engine.new_stream(check_n_mels(n_mels), check_padding(padding))
    batch = engine.process([(stream, audio, True)])[0]
    return batch.log10, (batch.running_max if batch.log10.shape[0] else None)


def load_wav(path: str | os.PathLike[str]) -> np.ndarray:
    """The samples of a 16 kHz mono WAV file (16-bit PCM -> int16, 32-bit float ->
    float32), read with :mod:`shmmel.audio_io`'s header parser. Other rates, channel
    counts or encodings raise ValueError (shmmel does not resample or decode)."""
    from .. import audio_io
    from .. import layout as L

    with open(path, "rb") as f:
        try:
            info = audio_io.read_wav_header(f.read)
        except audio_io.BadAudio as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None
        data = info.rest + f.read()
    if info.data_bytes is not None:
        if len(data) < info.data_bytes:
            raise ValueError(f"{os.fspath(path)}: WAV data is shorter than its header says")
        data = data[: info.data_bytes]
    dtype = np.dtype("<i2") if info.fmt == L.FMT_S16LE else np.dtype("<f4")
    usable = len(data) - len(data) % dtype.itemsize
    return np.frombuffer(data, dtype, usable // dtype.itemsize).astype(dtype.newbyteorder("="))


def is_device_array(audio: object) -> bool:
    """True for a CUDA array (CuPy, torch CUDA tensor, any DLPack kDLCUDA or
    ``__cuda_array_interface__`` object); never imports CuPy."""
    if isinstance(audio, np.ndarray):
        return False
    if hasattr(audio, "__cuda_array_interface__"):
        return True
    device = getattr(audio, "__dlpack_device__", None)
    return device is not None and int(device()[0]) == 2


@lru_cache(maxsize=None)
def cuda_engine(device: int = 0) -> CudaEngine:
    """The CUDA engine used for device arrays where no engine is given (one per device
    and process, cached; created on first use, so CUDA starts only then)."""
    return CudaEngine(device)


def _device_of(audio: Any) -> int:
    device = getattr(audio, "__dlpack_device__", None)
    if device is not None:
        return int(device()[1])
    return int(getattr(getattr(audio, "device", None), "id", 0))


def log_mel_spectrogram(
    audio: np.ndarray | str | os.PathLike[str] | Any,
    n_mels: int = 80,
    padding: int = 0,
    engine: Engine | None = None,
) -> Any:
    """Whisper's ``log_mel_spectrogram``: (n_mels, T) float32, normalised with the max
    over the whole input.

    ``audio``: a 1-D float32 or int16 numpy array; a path to a 16 kHz mono WAV file
    (Whisper takes a file name too; see :func:`load_wav`); or a 1-D CUDA array (CuPy,
    torch, DLPack), which is read in place on its device and gives a device result of
    the same kind (CuPy; a torch tensor for torch input) with no host round trip. With a
    CUDA engine, host input takes one upload, one launch and one download of the frames.
    """
    if isinstance(audio, (str, os.PathLike)):
        audio = load_wav(audio)
    if engine is None and is_device_array(audio):
        engine = cuda_engine(_device_of(audio))
    if isinstance(engine, CudaEngine):
        if getattr(audio, "ndim", 1) != 1:
            raise ValueError(f"audio must be 1-D (mono PCM), got shape {tuple(audio.shape)}")
        if isinstance(audio, np.ndarray):
            return engine.log_mel_clip(audio, n_mels, padding)
        return engine.log_mel_batch([audio], n_mels, padding=padding)[0]
    frames, top = log10_mel(audio, n_mels, padding, engine)
    return np.ascontiguousarray(normalise(frames, top).T)


def log_mel_batch(
    clips: Any,
    n_mels: int = 80,
    *,
    padding: int = 0,
    pad_or_trim: bool = False,
    out: Any = None,
    engine: Engine | None = None,
) -> Any:
    """Whisper's log-mel of many clips in one call, each normalised with its own max.

    ``clips``: a 2-D array (B, L) or a sequence of 1-D clips of any lengths (int16 or
    float32), on the host or, for the CUDA engine, on its device. ``pad_or_trim``:
    Whisper's 30 s window (each clip ``pad_or_trim``-ed to 480000 samples, T = 3000).
    Returns a (B, n_mels, T) array for a 2-D input or with ``pad_or_trim`` (written into
    ``out`` if given: host numpy for host clips, a device array for device clips), else a
    list of (n_mels, T_i) arrays. Device clips give device results (CuPy; torch for torch
    input). Without an engine: the CUDA engine for device clips, else the NumPy one."""
    if engine is None:
        first = clips if hasattr(clips, "ndim") else (clips[0] if len(clips) else None)
        engine = cuda_engine(_device_of(first)) if is_device_array(first) else default_engine()
    return engine.log_mel_batch(clips, n_mels, padding=padding, pad_or_trim=pad_or_trim, out=out)


def log_mel_windows(
    audio: np.ndarray, n_mels: int = 80, engine: Engine | None = None
) -> np.ndarray:
    """(n_windows, n_mels, 3000) float32: ``audio`` cut into consecutive 30 s windows (the
    last one zero-padded; one window for empty input), each computed as Whisper does for
    a 30 s clip: ``log_mel_spectrogram(pad_or_trim(window))``, normalised on its own.
    All windows go to the engine in one ``process`` call."""
    audio = check_audio(audio)
    check_n_mels(n_mels)
    engine = engine if engine is not None else default_engine()
    n_windows = max(1, -(-audio.size // N_SAMPLES))
    items = []
    for i in range(n_windows):
        window = pad_or_trim(audio[i * N_SAMPLES : (i + 1) * N_SAMPLES])
        items.append((engine.new_stream(n_mels), window, True))
    out = np.empty((n_windows, n_mels, N_FRAMES), np.float32)
    for i, batch in enumerate(engine.process(items)):
        out[i] = batch.provisional().T
    return out


class MelStream:
    """One stream on one engine: ``push`` chunks as they arrive, ``finish`` at the end."""

    def __init__(self, engine: Engine | None = None, n_mels: int = 80, padding: int = 0) -> None:
        self.engine = engine if engine is not None else default_engine()
        self.state = self.engine.new_stream(n_mels, padding)

    def push(self, chunk: np.ndarray | None) -> FrameBatch:
        return self.engine.process([(self.state, chunk, False)])[0]

    def finish(self, chunk: np.ndarray | None = None) -> FrameBatch:
        return self.engine.process([(self.state, chunk, True)])[0]


@lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True if CuPy is installed and sees at least one CUDA device.

    The device count is read in a child Python process, so the calling process never
    initialises CUDA (safe in a supervisor that forks workers later). Where CuPy is not
    installed the answer is immediate; otherwise the child costs about a second, once:
    the result is cached for the life of the process."""
    if importlib.util.find_spec("cupy") is None:
        return False
    probe = "import cupy; print(cupy.cuda.runtime.getDeviceCount())"
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("CUDA probe failed: %s", exc)
        return False
    count = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
    return bool(count) and count[0].isdigit() and int(count[0]) > 0


def create_engine(kind: Literal["auto", "cpu", "cuda"] = "auto", device: int = 0) -> Engine:
    """An engine of ``kind``. ``"auto"`` tries the CUDA engine on ``device`` (in this
    process: call it after fork) and falls back to NumPy if CuPy is missing or no device
    answers; ``"cuda"`` raises instead of falling back."""
    if kind == "cpu":
        return NumpyEngine()
    if kind not in ("auto", "cuda"):
        raise ValueError(f"engine kind must be 'auto', 'cpu' or 'cuda', got {kind!r}")
    from .cuda import CudaEngine

    if kind == "cuda":
        return CudaEngine(device)
    if importlib.util.find_spec("cupy") is None:
        return NumpyEngine()
    try:
        return CudaEngine(device)
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning("CUDA engine unavailable on device %s (%s); using the NumPy engine", device, exc)
        return NumpyEngine()
