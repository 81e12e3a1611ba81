"""Stream bookkeeping shared by every engine: which frames a chunk completes, and the
samples each engine must read to compute them.

The signal an STFT frame reads is Whisper's padded signal ``xp``: 200 reflected samples,
the audio ``x`` (plus ``padding`` zeros), 200 reflected samples. Frame ``t`` reads
``xp[160 t : 160 t + 400]``. A stream keeps only the tail of ``xp`` that frames not yet
emitted still need (under 400 samples), or, before frame 0 can be computed, the first
samples of ``x`` (at most 200). Nothing in a stream's state grows with its length.

For each (stream, chunk) the planner returns a :class:`Segment`: the samples from
``xp[160 * first_frame]`` onward, as up to four pieces (``pre`` float32 from the host,
``body`` the caller's chunk as given, ``zeros`` a count, ``post`` float32), and the
number of frames to compute from it. Engines read frame ``i`` of a segment at
``[160 i, 160 i + 400)`` of the pieces laid end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .spec import (
    DYNAMIC_RANGE,
    HOP_LENGTH,
    N_FFT,
    PAD,
    as_float32,
    check_n_mels,
    check_padding,
)

_EMPTY = np.empty(0, np.float32)
_EMPTY.flags.writeable = False
_HEAD = PAD + 1  # frame 0 reads x[0..200]: the reflection needs x[1..200]


@dataclass
class FrameBatch:
    """Frames a push or finish produced, frame-major.

    ``log10`` holds raw ``log10(max(mel, 1e-10))`` values of frames ``start`` to
    ``start + k - 1``; ``running_max`` is the float32 max over every frame the stream has
    emitted so far (this batch included), ``-inf`` before the first frame. With
    ``final`` it is the stream's final max. With ``normalised``, ``log10`` holds the
    :meth:`provisional` values already (a mel worker made them, see layout.PUSH_PROVISIONAL).
    """

    start: int
    log10: np.ndarray  # (k, n_mels) float32, C-contiguous
    running_max: float
    final: bool
    normalised: bool = False

    def provisional(self) -> np.ndarray:
        """(k, n_mels) float32 normalised as Whisper does, with ``running_max`` in place
        of the final max. Exact for the final batch; an earlier batch becomes exact after
        ``np.maximum(provisional, final_floor(final_max))``. Normalised already: ``log10``
        itself, not a copy."""
        if self.normalised:
            return self.log10
        if self.log10.shape[0] == 0:
            return self.log10.copy()
        return normalise_into(self.log10, self.running_max, None)


def normalise_into(log10: np.ndarray, running_max: float,
                   out: np.ndarray | None) -> np.ndarray:
    """``log10`` (raw frames) provisionally normalised with ``running_max`` into ``out`` (a
    new array if None; ``log10`` itself works): ``(max(x, running_max - 8) + 4) / 4`` in
    float32. The one formula for every place that does it (the HTTP side's records, a mel
    worker's PUSH_PROVISIONAL replies), so they give the same bits (``* 0.25`` rounds as
    ``/ 4``: a power of two). Three NumPy calls, each releasing the GIL (over 500 elements),
    which is why a worker, whose process has no other thread wanting it, does it for the
    HTTP side where it can."""
    floor = np.float32(running_max) - np.float32(DYNAMIC_RANGE)
    out = np.maximum(log10, floor, out=out)
    out += _FOUR
    out *= _QUARTER
    return out


_FOUR, _QUARTER = np.float32(4.0), np.float32(0.25)


def final_floor(final_max: float) -> np.float32:
    """The smallest normalised value once the final max is known:
    ``((final_max - 8) + 4) / 4`` in float32. ``max(provisional, final_floor(final_max))``
    equals the offline output exactly, because the normalisation is monotone."""
    floor = np.float32(final_max) - np.float32(DYNAMIC_RANGE)
    return (floor + np.float32(4.0)) / np.float32(4.0)


class _Cursor(NamedTuple):
    """Where a stream stands; replaced (never mutated) when a chunk is planned."""

    samples_in: int = 0  # real samples received
    frames_emitted: int = 0
    started: bool = False  # xp's reflected head exists (x[200] has arrived)
    carry: np.ndarray = _EMPTY  # started: xp[160*frames_emitted:]; else x
    closed: bool = False


@dataclass(frozen=True)
class Segment:
    """The samples from ``xp[160 * first_frame]`` on, for ``n_frames`` frames."""

    first_frame: int
    n_frames: int
    pre: np.ndarray  # float32
    body: np.ndarray  # the chunk, int16 or float32, unconverted
    zeros: int
    post: np.ndarray  # float32

    def samples(self) -> np.ndarray:
        """The segment as one float32 array (what the NumPy engine frames)."""
        parts = [self.pre, as_float32(self.body), np.zeros(self.zeros, np.float32), self.post]
        return np.concatenate(parts)


class StreamState:
    """One audio stream's state, on the host: a sample remainder (under 400 samples),
    counters and the running max. Engines create and advance it; callers only read it."""

    __slots__ = ("n_mels", "padding", "running_max", "_cursor")

    def __init__(self, n_mels: int = 80, padding: int = 0) -> None:
        self.n_mels = check_n_mels(n_mels)
        self.padding = check_padding(padding)
        self.running_max = float("-inf")
        self._cursor = _Cursor()

    @property
    def frames_emitted(self) -> int:
        return self._cursor.frames_emitted

    @property
    def samples_in(self) -> int:
        return self._cursor.samples_in

    @property
    def closed(self) -> bool:
        return self._cursor.closed

    def __repr__(self) -> str:
        return (
            f"StreamState(n_mels={self.n_mels}, padding={self.padding}, "
            f"samples_in={self.samples_in}, frames_emitted={self.frames_emitted}, "
            f"running_max={self.running_max}, closed={self.closed})"
        )


def _last_real(cursor: _Cursor, chunk: np.ndarray, count: int) -> np.ndarray:
    """The last ``count`` samples of x (float32), zero-extended at the front if x is
    shorter. Before the stream starts its carry is x itself; after, the carry ends with
    at least 240 samples of x (``count`` is at most 201)."""
    take = min(count, chunk.size)
    tail = as_float32(chunk[chunk.size - take :])
    if take < count:
        before = cursor.carry[max(0, cursor.carry.size - (count - take)) :]
        tail = np.concatenate([before, tail])
    if tail.size < count:
        tail = np.concatenate([np.zeros(count - tail.size, np.float32), tail])
    return tail


def plan(
    cursor: _Cursor, padding: int, chunk: np.ndarray, final: bool
) -> tuple[Segment, _Cursor]:
    """Which frames ``chunk`` (and, if ``final``, the end of the stream) completes.

    Frame ``t`` is computed once ``xp[:160 t + 400]`` is known, i.e. after
    ``160 t + 200`` samples of x (and x[200] for frame 0, so 201 samples), and at the
    end for the frames that read the right-hand padding. ``chunk`` is a validated 1-D
    int16/float32 array; it is referenced by the returned Segment, not copied.
    """
    if cursor.closed:
        raise ValueError("stream is closed (finish() was already called)")
    total = cursor.samples_in + chunk.size
    first = cursor.frames_emitted

    if cursor.started:
        pre = cursor.carry
    elif total >= _HEAD or final:
        # x[1..200] is known (or, at the end, never will be: zero-extend). xp[j] = x[200 - j].
        raw = np.concatenate([cursor.carry, as_float32(chunk[: max(0, _HEAD - cursor.carry.size)])])
        if raw.size < _HEAD:
            raw = np.concatenate([raw, np.zeros(_HEAD - raw.size, np.float32)])
        pre = np.concatenate([raw[PAD:0:-1], cursor.carry])
    else:  # not enough samples for frame 0 yet: keep x
        carry = np.concatenate([cursor.carry, as_float32(chunk)])
        segment = Segment(first, 0, _EMPTY, chunk[:0], 0, _EMPTY)
        return segment, _Cursor(total, first, False, carry, False)

    if final:
        # xp[L + 200 + j] = xp_x[L - 2 - j] over x padded with `padding` zeros (L its
        # length), zero-extended where L - 2 - j < 0.
        tail = np.concatenate([_last_real(cursor, chunk, _HEAD), np.zeros(min(padding, _HEAD), np.float32)])
        tail = tail[tail.size - _HEAD :]
        post = np.ascontiguousarray(tail[PAD - 1 :: -1])
        n_frames = (total + padding) // HOP_LENGTH - first
        segment = Segment(first, n_frames, pre, chunk, padding, post)
        return segment, _Cursor(total, first + n_frames, True, _EMPTY, True)

    known = pre.size + chunk.size  # xp[160*first : 200 + total]
    n_frames = max(0, (known - N_FFT) // HOP_LENGTH + 1)
    keep_from = n_frames * HOP_LENGTH
    if keep_from >= pre.size:
        carry = as_float32(chunk[keep_from - pre.size :], copy=True)
    else:
        carry = np.concatenate([pre[keep_from:], as_float32(chunk)])
    segment = Segment(first, n_frames, pre, chunk, 0, _EMPTY)
    return segment, _Cursor(total, first + n_frames, True, carry, False)
