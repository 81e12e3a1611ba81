"""Engines turn planned segments into log10 mel frames; the base class owns streams.

``Engine.process`` validates every item, plans each stream's segment (see
:mod:`.stream`), hands the segments to the subclass's ``_compute`` in one call (one
kernel launch on the GPU), then advances the streams. A stream is only advanced once
the computation has succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from .batch import check_out, plan_batch, shape_result
from .spec import HOP_LENGTH, LOG_FLOOR, N_FFT, check_audio, hann_window, sparse_filters
from .stream import FrameBatch, Segment, StreamState, _Cursor, plan

Item = tuple[StreamState, "np.ndarray | None", bool]
Computed = tuple[np.ndarray, "float | None"]  # (k, n_mels) float32 log10 frames, their max
Outs = Sequence["np.ndarray | None"]


def _out_view(out: np.ndarray | None, k: int, n_mels: int, position: int) -> np.ndarray | None:
    """The (k, n_mels) frame-major view at the start of a caller's ``out`` buffer."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"item {position}: out must be a C-contiguous float32 numpy array")
    if not out.flags.writeable:
        raise ValueError(f"item {position}: out is read-only")
    if out.size < k * n_mels:
        raise ValueError(f"item {position}: out holds {out.size} floats, {k * n_mels} needed")
    return out.reshape(-1)[: k * n_mels].reshape(k, n_mels)


class Engine:
    """Computes log10 mel frames for many streams at once. Not thread-safe: one engine
    per worker thread."""

    kind: ClassVar[Literal["cpu", "cuda"]]

    def new_stream(self, n_mels: int = 80, padding: int = 0) -> StreamState:
        return StreamState(n_mels, padding)

    def process(self, items: Sequence[Item], out: Outs | None = None) -> list[FrameBatch]:
        """Push each item's chunk (1-D int16 or float32; None or empty for none) into its
        stream and, where ``final``, finish the stream. Returns one FrameBatch per item,
        in order. Holds no reference to the chunks once it returns. A stream may appear
        more than once; its items apply in order. Raises ValueError (and changes no
        stream) if any item is invalid.

        ``out``: None, or one entry per item, each None or a C-contiguous float32 numpy
        array (any shape, e.g. a shared-memory reply slot viewed as float32). An item's
        frames are written frame-major at the start of its ``out`` and its
        ``FrameBatch.log10`` is that (k, n_mels) view; ValueError (nothing changed) if
        one is too small. An ``out`` may be the memory the item's chunk is read from:
        every chunk is read before any frame is written."""
        if out is not None and len(out) != len(items):
            raise ValueError(f"out has {len(out)} entries for {len(items)} items")
        cursors: dict[int, _Cursor] = {}
        work: list[tuple[StreamState, Segment, _Cursor]] = []
        for position, (state, chunk, final) in enumerate(items):
            if not isinstance(state, StreamState):
                raise ValueError(f"item {position}: expected a StreamState, got {type(state).__name__}")
            try:
                audio = check_audio(chunk, allow_none=True)
                cursor = cursors.get(id(state), state._cursor)
                segment, cursors[id(state)] = plan(cursor, state.padding, audio, bool(final))
            except ValueError as exc:
                raise ValueError(f"item {position}: {exc}") from None
            work.append((state, segment, cursors[id(state)]))
        views = [
            _out_view(out[i] if out is not None else None, segment.n_frames, state.n_mels, i)
            for i, (state, segment, _) in enumerate(work)
        ]

        computed = self._compute([(segment, state.n_mels) for state, segment, _ in work], views)

        batches = []
        for (state, segment, cursor), (frames, batch_max) in zip(work, computed):
            state._cursor = cursor
            if batch_max is not None and batch_max > state.running_max:
                state.running_max = batch_max
            batches.append(FrameBatch(segment.first_frame, frames, state.running_max, cursor.closed))
        return batches

    def _compute(self, work: list[tuple[Segment, int]], views: list[np.ndarray | None]) -> list[Computed]:
        """(frames, max) per segment; frames go into ``views[i]`` where it is not None."""
        raise NotImplementedError

    def log_mel_batch(
        self, clips: Any, n_mels: int = 80, *, padding: int = 0, pad_or_trim: bool = False,
        out: np.ndarray | None = None,
    ) -> Any:
        """Whisper's log-mel of many clips in one call (see :mod:`.batch`): a 2-D array
        (B, L) or a sequence of 1-D clips; each clip normalised with its own max. Returns
        (B, n_mels, T) float32 (a 2-D input, or ``pad_or_trim``: Whisper's 30 s window,
        T = 3000) written into ``out`` if given, else a list of (n_mels, T_i) arrays.
        This engine computes clip by clip; the CUDA engine overrides it with one launch."""
        plan = plan_batch(clips, n_mels, padding, pad_or_trim)
        if out is not None:
            check_out(plan, out)
            flat = out.reshape(-1)
        else:
            flat = np.empty(int(plan.offsets[-1]), np.float32)
        for i, clip in enumerate(plan.clips):
            stream = self.new_stream(n_mels, int(plan.zeros[i]))
            batch = self.process([(stream, clip[: int(plan.used[i])], True)])[0]
            view = flat[plan.offsets[i] : plan.offsets[i + 1]].reshape(n_mels, -1)
            view[...] = batch.provisional().T
        return out if out is not None else shape_result(plan, flat)

    def close(self) -> None:
        """Release the engine's resources; safe to call twice."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NumpyEngine(Engine):
    """The CPU engine: float64 rfft (pocketfft, one row at a time), float64 power and
    mel sums in a fixed order over each filter's support, log10, rounded once to
    float32. No step depends on how many frames are computed together, so any
    chunking of a stream gives the same bits as one offline call."""

    kind: ClassVar[Literal["cpu", "cuda"]] = "cpu"

    def __init__(self, block_frames: int = 1024) -> None:
        self._block = max(1, int(block_frames))
        self._window = hann_window()
        self._gather: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _filters(self, n_mels: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_mels, W) bin indices and float64 weights, zero-weight padded to the widest
        filter support W."""
        if n_mels not in self._gather:
            starts, lengths, offsets, packed = sparse_filters(n_mels)
            width = int(lengths.max())
            index = np.zeros((n_mels, width), np.intp)
            weight = np.zeros((n_mels, width), np.float64)
            for m in range(n_mels):
                n = int(lengths[m])
                index[m, :n] = starts[m] + np.arange(n)
                weight[m, :n] = packed[offsets[m] : offsets[m] + n]
            self._gather[n_mels] = (np.ascontiguousarray(index.T), np.ascontiguousarray(weight.T))
        return self._gather[n_mels]

    def _compute(self, work: list[tuple[Segment, int]], views: list[np.ndarray | None]) -> list[Computed]:
        # every chunk is read (samples() copies) before any out is written
        samples = [segment.samples() if segment.n_frames else None for segment, _ in work]
        return [self._frames(s, segment, n_mels, view) for s, (segment, n_mels), view in zip(samples, work, views)]

    def _frames(
        self, samples: np.ndarray | None, segment: Segment, n_mels: int, view: np.ndarray | None
    ) -> Computed:
        n = segment.n_frames
        out = view if view is not None else np.empty((n, n_mels), np.float32)
        if n == 0:
            return out, None
        frames = np.lib.stride_tricks.sliding_window_view(samples, N_FFT)[::HOP_LENGTH]
        index, weight = self._filters(n_mels)
        for lo in range(0, n, self._block):
            hi = min(n, lo + self._block)
            spectrum = np.fft.rfft(frames[lo:hi] * self._window, axis=-1)
            power = spectrum.real**2 + spectrum.imag**2
            mel = power[:, index[0]] * weight[0]
            for j in range(1, index.shape[0]):
                mel += power[:, index[j]] * weight[j]
            out[lo:hi] = np.log10(np.maximum(mel, LOG_FLOOR))
        return out, float(out.max())
