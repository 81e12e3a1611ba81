"""Whisper log-mel spectrograms: offline, streaming, on the CPU (NumPy) or GPU (CuPy).

    from shmmel import mel
    spec = mel.log_mel_spectrogram(audio)            # (80, T) float32, like Whisper
    spec = mel.log_mel_spectrogram("clip.wav")       # a 16 kHz mono WAV file
    specs = mel.log_mel_batch(clips, pad_or_trim=True, engine=engine)  # (B, 80, 3000)
    engine = mel.create_engine("auto")               # CUDA if available, else NumPy
    stream = engine.new_stream(n_mels=80)
    batches = engine.process([(stream, chunk, False), ...])   # many streams, one call

Importing this package never imports CuPy or touches CUDA. See docs/MEL.md.
"""

from __future__ import annotations

from .api import (
    MelStream,
    create_engine,
    cuda_available,
    cuda_engine,
    default_engine,
    is_device_array,
    load_wav,
    log10_mel,
    log_mel_batch,
    log_mel_spectrogram,
    log_mel_windows,
    normalise,
)
from .cuda import CudaEngine
from .engine import Engine, NumpyEngine
from .spec import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    mel_filters,
    pad_or_trim,
)
from .stream import FrameBatch, StreamState, final_floor


__all__ = [
    "CHUNK_LENGTH",
    "CudaEngine",
    "Engine",
    "FrameBatch",
    "HOP_LENGTH",
    "MelStream",
    "N_FFT",
    "N_FRAMES",
    "N_SAMPLES",
    "NumpyEngine",
    "SAMPLE_RATE",
    "StreamState",
    "create_engine",
    "cuda_available",
    "cuda_engine",
    "default_engine",
    "is_device_array",
    "load_wav",
    "log_mel_batch",
    "final_floor",
    "log10_mel",
    "log_mel_spectrogram",
    "log_mel_windows",
    "mel_filters",
    "normalise",
    "pad_or_trim",
]
