"""Many clips in one call: what each clip contributes and where its frames go.

A batch is a 2-D array (B, L) or a sequence of 1-D clips of any lengths, int16 or
float32, on the host (NumPy) or, for the CUDA engine, on its device. Clip ``i`` reads
``used[i]`` samples (all of them, or Whisper's 30 s window with ``pad_or_trim``) followed
by ``zeros[i]`` zeros, and gives ``frames[i] = (used + zeros) // 160`` frames, normalised
with its own max, as ``log_mel_spectrogram`` of that clip would.

Every clip's (n_mels, T_i) result lies in one C-contiguous float32 buffer, clip after
clip: a (B, n_mels, T) array when every T_i is equal (a 2-D input, or ``pad_or_trim``),
else a list of views into that buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spec import HOP_LENGTH, N_SAMPLES, check_audio, check_n_mels, check_padding


@dataclass(frozen=True)
class BatchPlan:
    clips: Any  # a list of 1-D arrays, or the 2-D input array itself (int16 or float32)
    used: np.ndarray  # (B,) int64 samples read from each clip
    zeros: np.ndarray  # (B,) int64 zeros appended
    frames: np.ndarray  # (B,) int64 frames per clip
    offsets: np.ndarray  # (B + 1,) int64: clip i's floats are flat[offsets[i]:offsets[i+1]]
    n_mels: int
    uniform: bool  # one (B, n_mels, T) array (else a list)

    @property
    def size(self) -> int:
        return len(self.used)

    @property
    def two_d(self) -> bool:
        return hasattr(self.clips, "ndim")

    def itemsizes(self) -> np.ndarray:
        if self.two_d:
            return np.full(self.size, self.clips.dtype.itemsize, np.int64)
        return np.array([c.dtype.itemsize for c in self.clips], np.int64)

    def int16(self) -> np.ndarray:
        """(B,) 1 where a clip is int16."""
        return (self.itemsizes() == 2).astype(np.int64)


def plan_batch(
    clips: Any,
    n_mels: int,
    padding: int,
    pad_or_trim: bool,
    *,
    on_device: bool = False,
    finite: bool = True,
) -> BatchPlan:
    """Validate a batch and lay out its output. Host clips get ``check_audio`` (1-D,
    int16/float32, finite unless ``finite=False``: the caller checks that on the device);
    device clips get the shape and dtype checks only."""
    check_n_mels(n_mels)
    check_padding(padding)
    if pad_or_trim and padding:
        raise ValueError("give padding or pad_or_trim, not both")
    two_d = hasattr(clips, "ndim") and hasattr(clips, "shape")
    if two_d:  # checked as a whole; its rows are never made into objects one by one
        if clips.ndim != 2:
            raise ValueError(f"a batch array must be 2-D (clips, samples), got shape {tuple(clips.shape)}")
        if on_device:
            _check_device_clip(clips.reshape(-1))
        else:
            clips = np.ascontiguousarray(clips)
            check_audio(clips.reshape(-1), finite=finite)
        rows: Any = clips
        lengths = np.full(clips.shape[0], clips.shape[1], np.int64)
    elif isinstance(clips, Sequence) and not isinstance(clips, (str, bytes)):
        rows = list(clips)
        for i, clip in enumerate(rows):
            try:
                if on_device:
                    _check_device_clip(clip)
                else:
                    rows[i] = np.ascontiguousarray(check_audio(clip, finite=finite))
            except ValueError as exc:
                raise ValueError(f"clip {i}: {exc}") from None
        lengths = np.array([int(c.shape[0]) for c in rows], np.int64)
    else:
        raise ValueError(f"clips must be a 2-D array or a sequence of 1-D arrays, got {type(clips).__name__}")
    if pad_or_trim:
        used = np.minimum(lengths, N_SAMPLES)
        zeros = N_SAMPLES - used
    else:
        used = lengths
        zeros = np.full(lengths.shape, padding, np.int64)
    frames = (used + zeros) // HOP_LENGTH
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(frames * n_mels, out=offsets[1:])
    return BatchPlan(rows, used, zeros, frames, offsets, n_mels, two_d or pad_or_trim)


def _check_device_clip(clip: Any) -> None:
    if getattr(clip, "ndim", None) != 1:
        raise ValueError(f"audio must be 1-D (mono PCM), got shape {getattr(clip, 'shape', None)}")
    if clip.dtype not in (np.float32, np.int16):
        raise ValueError(f"audio dtype must be float32 or int16, got {clip.dtype}")


def check_out(plan: BatchPlan, out: Any) -> None:
    """``out`` must be a C-contiguous float32 (B, n_mels, T) array (only for uniform batches)."""
    if not plan.uniform:
        raise ValueError("out= needs one array result: a 2-D batch or pad_or_trim=True")
    shape = (plan.size, plan.n_mels, int(plan.frames[0]) if plan.size else 0)
    if tuple(out.shape) != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")


def shape_result(plan: BatchPlan, flat: Any, wrap: Callable[[Any], Any] = lambda a: a) -> Any:
    """The caller's view of the flat output: one (B, n_mels, T) array, or a list."""
    if plan.uniform:
        t = int(plan.frames[0]) if plan.size else 0
        return wrap(flat[: plan.size * plan.n_mels * t].reshape(plan.size, plan.n_mels, t))
    return [
        wrap(flat[plan.offsets[i] : plan.offsets[i + 1]].reshape(plan.n_mels, int(plan.frames[i])))
        for i in range(plan.size)
    ]
