"""Batches on the CUDA engine (``CudaEngine.log_mel_batch``).

Every clip is an offline clip, so the kernel reads Whisper's reflect padding from the
clip itself (descriptor flag ``D_REFLECT``): no edge arrays, no per-clip copies.

* **Device clips** (CuPy; torch and other ``__dlpack__`` / ``__cuda_array_interface__``
  arrays) are read where they lie, one launch: see :mod:`.cuda_device`.
* **Host clips** go through :class:`HostBatches`: the batch is cut into groups of about
  ``GROUP_BYTES``; for each, the clips are copied (by a few threads, GIL released) into
  one of three pinned buffers, uploaded on a copy stream, computed and normalised (a
  second launch) on the engine's stream, and only the frames come back, on a third
  stream, into a pinned buffer and from there into the result, while the next group is
  already uploading. Input that is already in pinned or registered memory is uploaded
  from where it is, and an ``out`` in pinned or registered memory receives the frames by
  DMA directly: no host copy at all.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kernels as K
from .batch import BatchPlan, check_out, plan_batch, shape_result
from .cuda_device import _describe, _launch_all, device_batch, is_device
from .spec import check_audio

if TYPE_CHECKING:
    from .cuda import CudaEngine

GROUP_BYTES = 32 << 20  # input and output bytes per pipeline group
DEPTH = 3  # pipeline slots: uploads run up to two groups ahead of the downloads
PARALLEL_BYTES = 4 << 20  # host copies at least this large are split over threads
CACHED = 8  # device batches whose descriptors stay on the device


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def log_mel_batch(engine: CudaEngine, clips: Any, n_mels: int, padding: int, pad_or_trim: bool, out: Any) -> Any:
    first = clips if hasattr(clips, "ndim") else (clips[0] if len(clips) else None)
    if first is not None and is_device(engine, first):
        return device_batch(engine, clips, n_mels, padding, pad_or_trim, out)
    plan = plan_batch(clips, n_mels, padding, pad_or_trim, finite=False)  # checked on the GPU
    _check_unread_tails(plan)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise ValueError("out must be a numpy array for host clips")
        check_out(plan, out)
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        flat = out.reshape(-1)
    else:
        flat = np.empty(int(plan.offsets[-1]), np.float32)
    bad = engine._batches.run(plan, flat)
    if bad.size:
        _raise_bad(plan, int(bad[0]))
    return out if out is not None else shape_result(plan, flat)


def _check_unread_tails(plan: BatchPlan) -> None:
    """The kernel flags NaN/Inf in the samples it reads; a clip's last up to 119 samples
    (and a clip too short for a frame) are read by no frame, so they are checked here."""
    tail = 400
    if plan.two_d:
        if plan.clips.dtype == np.float32 and plan.size:
            used = int(plan.used[0])
            edge = plan.clips[:, max(0, used - tail) : used]
            if not np.isfinite(edge).all():
                i = int(np.flatnonzero(~np.isfinite(edge).all(axis=1))[0])
                _raise_bad(plan, i)
        return
    for i, clip in enumerate(plan.clips):
        if clip.dtype == np.float32:
            used = int(plan.used[i])
            if not np.isfinite(clip[max(0, used - tail) : used]).all():
                _raise_bad(plan, i)


def _raise_bad(plan: BatchPlan, i: int) -> None:
    """ValueError for clip i, worded (with the first bad sample) as the host check words it."""
    try:
        check_audio(plan.clips[i][: int(plan.used[i])])
    except ValueError as exc:
        raise ValueError(f"clip {i}: {exc}") from None
    raise ValueError(f"clip {i}: audio contains NaN or Inf")


# -- host arrays ----------------------------------------------------------------------------


class _Slot:
    """One pipeline stage: pinned staging and device buffers (grow only) and its events."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.in_cap = self.out_cap = 0
        self.host_in = self.host_out = self.dev_in = self.dev_out = None
        self._pinned: list[Any] = []
        self.h2d_done, self.kernel_done, self.d2h_done = (cp.cuda.Event(disable_timing=True) for _ in range(3))

    def reserve(self, in_bytes: int, out_bytes: int) -> None:
        cp = self.cp
        if in_bytes > self.in_cap:
            self.in_cap = _align(max(in_bytes, 1 << 20), 1 << 16)
            memory = cp.cuda.alloc_pinned_memory(self.in_cap)
            self.host_in = np.frombuffer(memory, np.uint8, self.in_cap)
            self.dev_in = cp.empty(self.in_cap, cp.uint8)
        if out_bytes > self.out_cap:
            self.out_cap = _align(max(out_bytes, 1 << 20), 1 << 16)
            memory = cp.cuda.alloc_pinned_memory(self.out_cap)
            self.host_out = np.frombuffer(memory, np.uint8, self.out_cap)
            self.dev_out = cp.empty(self.out_cap, cp.uint8)


class _SmallUploads:
    """Descriptors of device batches: a ring of pinned + device buffers, so one call
    costs one asynchronous upload and one memset (no pageable copy, no allocation)."""

    def __init__(self, cp: Any, size: int = 4) -> None:
        self.cp = cp
        self.ring = [_Slot(cp) for _ in range(size)]
        self.next = 0
        # descriptors kept on the device by key (a 2-D batch's addresses and shapes fully
        # determine them, so a hit is always current): key -> (desc, tiles, bits, done, tiles, lag)
        self.cached: dict[Any, tuple[Any, Any, Any, Any, int, int]] = {}

    def keep(self, key: Any, stream: Any, desc: np.ndarray, tiles: np.ndarray,
             lag: int) -> tuple[Any, Any, Any, Any, int, int]:
        """A device copy of ``desc`` and ``tiles`` of its own (with room for the max bits
        and counters), kept under ``key``; the oldest of ``CACHED`` entries goes first."""
        cp = self.cp
        if len(self.cached) >= CACHED:
            self.cached.pop(next(iter(self.cached)))
        m = max(desc.shape[0], 1)
        with stream:
            words = cp.zeros(2 * m + 1, cp.uint32)  # max bits, then tile counters and the block ticket
            entry = (cp.asarray(desc), cp.asarray(tiles), words[:m], words[m:], int(tiles[-1]), lag)
        self.cached[key] = entry
        return entry

    def upload(self, stream: Any, desc: np.ndarray, tiles: np.ndarray) -> tuple[Any, Any, Any, Any]:
        """(device desc int64, tiles int32, zeroed max bits uint32, zeroed tile counters
        and block ticket uint32, n + 1) queued on ``stream``."""
        cp = self.cp
        runtime = cp.cuda.runtime
        slot = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        slot.h2d_done.synchronize()  # this entry's previous upload has left its pinned buffer
        n = desc.shape[0]
        tiles_off = desc.nbytes
        bits_off = _align(tiles_off + tiles.nbytes)
        m = max(n, 1)
        slot.reserve(bits_off + 4 * (2 * m + 1), 0)
        host = slot.host_in
        host[:tiles_off].view(np.int64)[:] = desc.reshape(-1)
        host[tiles_off : tiles_off + tiles.nbytes].view(np.int32)[:] = tiles
        dev = slot.dev_in.data.ptr
        runtime.memcpyAsync(dev, host.ctypes.data, tiles_off + tiles.nbytes, runtime.memcpyHostToDevice, stream.ptr)
        runtime.memsetAsync(dev + bits_off, 0, 4 * (2 * m + 1), stream.ptr)
        slot.h2d_done.record(stream)
        return (slot.dev_in[:tiles_off].view(cp.int64), slot.dev_in[tiles_off : tiles_off + tiles.nbytes].view(cp.int32),
                slot.dev_in[bits_off : bits_off + 4 * m].view(cp.uint32),
                slot.dev_in[bits_off + 4 * m : bits_off + 8 * m + 4].view(cp.uint32))


class HostBatches:
    """Host-to-host batches through two pipeline slots, reused across calls."""

    def __init__(self, engine: CudaEngine) -> None:
        self.engine = engine
        self.slots = tuple(_Slot(engine._cp) for _ in range(DEPTH))
        self.small = _SmallUploads(engine._cp)
        self.order_events = tuple(engine._cp.cuda.Event(disable_timing=True) for _ in range(2))
        threads = engine.copy_threads or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="shmmel-copy") if threads > 1 else None
        self.threads = threads

    # host copies: ctypes.memmove releases the GIL, so pieces run in parallel
    def copy(self, pairs: list[tuple[int, int, int]]) -> None:
        """Copy (dst address, src address, nbytes) ranges, split over the threads."""
        total = sum(n for _, _, n in pairs)
        if self.pool is None or total < PARALLEL_BYTES:
            for dst, src, n in pairs:
                ctypes.memmove(dst, src, n)
            return
        piece = -(-total // self.threads)
        jobs: list[list[tuple[int, int, int]]] = [[]]
        room = piece
        for dst, src, n in pairs:
            while n:
                take = min(n, room)
                jobs[-1].append((dst, src, take))
                dst, src, n, room = dst + take, src + take, n - take, room - take
                if room == 0:
                    jobs.append([])
                    room = piece
        list(self.pool.map(_copy_all, [j for j in jobs if j]))

    def run(self, plan: BatchPlan, flat: np.ndarray) -> np.ndarray:
        """Compute ``plan`` into ``flat``; returns the indices of clips with NaN or Inf."""
        engine, cp = self.engine, self.engine._cp
        runtime = cp.cuda.runtime
        n, n_mels = plan.size, plan.n_mels
        if n == 0 or int(plan.offsets[-1]) == 0:
            return np.zeros(0, np.int64)
        nbytes = plan.itemsizes() * plan.used
        small = int(nbytes.sum()) <= engine.pageable_direct_bytes  # let the driver copy
        groups, lo, acc = [], 0, 0
        for i in range(n):
            acc += int(nbytes[i]) + 4 * int(plan.offsets[i + 1] - plan.offsets[i])
            if acc >= GROUP_BYTES or i == n - 1:
                groups.append((lo, i + 1))
                lo, acc = i + 1, 0
        # input already in pinned/registered memory (a 2-D C-contiguous array, untrimmed)
        # is uploaded from where it lies; an out there receives the frames directly
        if plan.two_d:
            rows_base, row = plan.clips.ctypes.data, plan.clips.strides[0]
            pinned_rows = bool((plan.used == plan.clips.shape[1]).all()) and engine._is_pinned(
                rows_base, plan.clips.nbytes)

            def source(i: int) -> int:
                return rows_base + row * i
        else:
            pinned_rows = False

            def source(i: int) -> int:
                return plan.clips[i].ctypes.data
        direct_out = engine._is_pinned(flat.ctypes.data, flat.nbytes) or small
        i16 = plan.int16()
        bad = np.zeros(n, np.uint32)
        pending: list[tuple[_Slot, int, int, int, int, int]] = []
        copy_stream, stream, d2h_stream = engine._copy_stream, engine._stream, engine._d2h_stream
        with engine._device:
            for g, (g0, g1) in enumerate(groups):
                slot = self.slots[g % DEPTH]  # idle: its group g - DEPTH was drained
                sub = BatchPlan(None, plan.used[g0:g1], plan.zeros[g0:g1], plan.frames[g0:g1],
                                plan.offsets[g0 : g1 + 1] - plan.offsets[g0], n_mels, False)
                k = g1 - g0
                tiles_off = k * K.D_FIELDS * 8
                body_off = _align(tiles_off + 4 * (k + 1))
                if pinned_rows:
                    body_pos = row * np.arange(k, dtype=np.int64)
                    body_bytes = row * k
                else:
                    sizes = -(-nbytes[g0:g1] // 16) * 16
                    body_pos = np.zeros(k, np.int64)
                    body_pos[1:] = np.cumsum(sizes)[:-1]
                    body_bytes = int(sizes.sum())
                frames_bytes = 4 * int(sub.offsets[-1])
                bits_off = _align(frames_bytes)
                bad_off = bits_off + 4 * k
                slot.reserve(body_off + body_bytes, bad_off + 4 * k)
                dev_in, dev_out, host = slot.dev_in.data.ptr, slot.dev_out.data.ptr, slot.host_in
                desc, tiles = _describe(engine, sub, dev_in + body_off + body_pos, i16[g0:g1],
                                        dev_out + 4 * sub.offsets[:-1])
                host[:tiles_off].view(np.int64)[:] = desc.reshape(-1)
                host[tiles_off : tiles_off + 4 * (k + 1)].view(np.int32)[:] = tiles
                if not pinned_rows and not small:
                    base = host.ctypes.data + body_off
                    self.copy([(base + int(body_pos[j]), source(g0 + j), int(nbytes[g0 + j]))
                               for j in range(k) if nbytes[g0 + j]])
                copy_stream.wait_event(slot.kernel_done)  # its device input is free again
                if small and not pinned_rows:  # the driver stages pageable memory itself
                    runtime.memcpyAsync(dev_in, host.ctypes.data, body_off, runtime.memcpyHostToDevice,
                                        copy_stream.ptr)
                    for j in range(k):
                        if nbytes[g0 + j]:
                            runtime.memcpyAsync(dev_in + body_off + int(body_pos[j]), source(g0 + j),
                                                int(nbytes[g0 + j]), runtime.memcpyHostToDevice, copy_stream.ptr)
                elif pinned_rows:
                    runtime.memcpyAsync(dev_in, host.ctypes.data, body_off, runtime.memcpyHostToDevice,
                                        copy_stream.ptr)
                    runtime.memcpyAsync(dev_in + body_off, source(g0), body_bytes,
                                        runtime.memcpyHostToDevice, copy_stream.ptr)
                else:
                    runtime.memcpyAsync(dev_in, host.ctypes.data, body_off + body_bytes,
                                        runtime.memcpyHostToDevice, copy_stream.ptr)
                slot.h2d_done.record(copy_stream)
                stream.wait_event(slot.h2d_done)
                runtime.memsetAsync(dev_out + bits_off, 0, 8 * k, stream.ptr)  # max bits, bad flags
                with stream:  # the normalisation as a second launch: measured faster here
                    _launch_all(  # than in the frames kernel (each group's last clip its tail)
                        engine, slot.dev_in[:tiles_off].view(cp.int64),
                        slot.dev_in[tiles_off : tiles_off + 4 * (k + 1)].view(cp.int32), k, int(tiles[-1]),
                        slot.dev_out[bits_off:bad_off].view(cp.uint32), True,
                        slot.dev_out[bad_off : bad_off + 4 * k].view(cp.uint32),
                    )
                slot.kernel_done.record(stream)
                # downloads on their own stream: the next group's kernel need not wait
                # for them (the slot is reused only after _drain waited for d2h_done)
                d2h_stream.wait_event(slot.kernel_done)
                host_out = slot.host_out.ctypes.data
                runtime.memcpyAsync(host_out + bad_off, dev_out + bad_off, 4 * k, runtime.memcpyDeviceToHost,
                                    d2h_stream.ptr)
                first = int(plan.offsets[g0])
                target = flat.ctypes.data + 4 * first if direct_out else host_out
                if frames_bytes:
                    runtime.memcpyAsync(target, dev_out, frames_bytes, runtime.memcpyDeviceToHost, d2h_stream.ptr)
                slot.d2h_done.record(d2h_stream)
                pending.append((slot, first, frames_bytes, g0, k, bad_off))
                if len(pending) >= DEPTH - 1:
                    self._drain(pending.pop(0), flat, direct_out, bad)
            while pending:
                self._drain(pending.pop(0), flat, direct_out, bad)
        return np.flatnonzero(bad)

    def _drain(
        self, job: tuple[_Slot, int, int, int, int, int], flat: np.ndarray, direct: bool, bad: np.ndarray
    ) -> None:
        slot, first, nbytes, g0, k, bad_off = job
        slot.d2h_done.synchronize()
        bad[g0 : g0 + k] = slot.host_out[bad_off : bad_off + 4 * k].view(np.uint32)
        if not direct and nbytes:
            self.copy([(flat.ctypes.data + 4 * first, slot.host_out.ctypes.data, nbytes)])


def _copy_all(pairs: list[tuple[int, int, int]]) -> None:
    for dst, src, n in pairs:
        ctypes.memmove(dst, src, n)
