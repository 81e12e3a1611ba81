"""Engines turn planned segments into log10 mel frames; the base class owns streams.

``Engine.process`` validates every item, plans each stream's segment (see
:mod:`.stream`), hands the segments to the subclass's ``_compute`` in one call (one
kernel launch on the GPU), then advances the streams. A stream is only advanced once
the computation has succeeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np

from .spec import HOP_LENGTH, LOG_FLOOR, N_FFT, check_audio, hann_window, sparse_filters
from .stream import FrameBatch, Segment, StreamState, _Cursor, plan

Item = tuple[StreamState, "np.ndarray | None", bool]
Computed = tuple[np.ndarray, "float | None"]  # (k, n_mels) float32 log10 frames, their max


class Engine:
    """Computes log10 mel frames for many streams at once. Not thread-safe: one engine
    per worker thread."""

    kind: ClassVar[Literal["cpu", "cuda"]]

    def new_stream(self, n_mels: int = 80, padding: int = 0) -> StreamState:
        return StreamState(n_mels, padding)

    def process(self, items: Sequence[Item]) -> list[FrameBatch]:
        """Push each item's chunk (1-D int16 or float32; None or empty for none) into its
        stream and, where ``final``, finish the stream. Returns one FrameBatch per item,
        in order. Holds no reference to the chunks once it returns. A stream may appear
        more than once; its items apply in order. Raises ValueError (and changes no
        stream) if any item is invalid."""
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

        computed = self._compute([(segment, state.n_mels) for state, segment, _ in work])

        batches = []
        for (state, segment, cursor), (frames, batch_max) in zip(work, computed):
            state._cursor = cursor
            if batch_max is not None and batch_max > state.running_max:
                state.running_max = batch_max
            batches.append(FrameBatch(segment.first_frame, frames, state.running_max, cursor.closed))
        return batches

    def _compute(self, work: list[tuple[Segment, int]]) -> list[Computed]:
        raise NotImplementedError

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

    def _compute(self, work: list[tuple[Segment, int]]) -> list[Computed]:
        return [self._frames(segment, n_mels) for segment, n_mels in work]

    def _frames(self, segment: Segment, n_mels: int) -> Computed:
        n = segment.n_frames
        out = np.empty((n, n_mels), np.float32)
        if n == 0:
            return out, None
        samples = segment.samples()
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
