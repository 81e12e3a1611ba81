"""Batches on the CUDA engine (``CudaEngine.log_mel_batch``).

Every clip is an offline clip, so the kernel reads Whisper's reflect padding from the
clip itself (descriptor flag ``D_REFLECT``): no edge arrays, no per-clip copies.

* **Device clips** (CuPy; torch and other ``__dlpack__`` / ``__cuda_array_interface__``
  arrays, taken zero-copy on the engine's stream) are read where they lie: one descriptor
  upload, one frames launch, one normalise launch, the result a new device array (or
  ``out``). Nothing goes through the host but the descriptors (128 bytes a clip).
* **Host clips** go through :class:`HostBatches`: the batch is cut into groups of about
  ``GROUP_BYTES``; for each, the clips are copied (by a few threads, GIL released) into
  one of three pinned buffers, uploaded on a copy stream, computed and normalised on the
  engine's stream, and only the frames come back, into a pinned buffer and from there
  into the result, while the next group is already uploading. Input that is already in
  pinned or registered memory is uploaded from where it is, and an ``out`` in pinned or
  registered memory receives the frames by DMA directly: no host copy at all.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kernels as K
from .batch import BatchPlan, check_out, plan_batch, shape_result
from .spec import check_audio

if TYPE_CHECKING:
    from .cuda import CudaEngine

GROUP_BYTES = 32 << 20  # input and output bytes per pipeline group
DEPTH = 3  # pipeline slots: uploads run up to two groups ahead of the downloads
PARALLEL_BYTES = 4 << 20  # host copies at least this large are split over threads
_KDL_CUDA = 2


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


# -- device arrays ----------------------------------------------------------------------


def as_device(engine: CudaEngine, x: Any) -> Any:
    """``x`` as a CuPy array on the engine's device without a copy, or None if ``x`` is
    not a device array. Work queued on the producer's stream is ordered before the
    engine's stream (DLPack's stream handshake; torch's current stream explicitly)."""
    cp = engine._cp
    if isinstance(x, np.ndarray):
        return None
    if isinstance(x, cp.ndarray):
        array = x
    elif hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        kind, _ = x.__dlpack_device__()
        if int(kind) != _KDL_CUDA:
            return None
        with engine._device, engine._stream:
            array = cp.from_dlpack(x)
    elif hasattr(x, "__cuda_array_interface__"):
        with engine._device, engine._stream:
            array = cp.asarray(x)
    else:
        return None
    if array.device.id != engine.device:
        raise ValueError(f"audio is on CUDA device {array.device.id}, the engine on {engine.device}")
    return array


def is_device(engine: CudaEngine, x: Any) -> bool:
    """True for a CUDA device array (CuPy, DLPack kDLCUDA, or a CUDA array interface)."""
    if isinstance(x, np.ndarray):
        return False
    if isinstance(x, engine._cp.ndarray) or hasattr(x, "__cuda_array_interface__"):
        return True
    device = getattr(x, "__dlpack_device__", None)
    return device is not None and int(device()[0]) == _KDL_CUDA


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _caller_stream(engine: CudaEngine, like: Any) -> Any:
    """The stream the caller works on: torch's current stream for torch input, else
    CuPy's current stream (the legacy default stream unless the caller chose one)."""
    cp = engine._cp
    if _is_torch(like):
        import torch

        handle = torch.cuda.current_stream(like.device).cuda_stream
        stream = engine._external.get(handle)
        if stream is None:
            stream = engine._external[handle] = cp.cuda.ExternalStream(handle)
        return stream
    with engine._device:
        return cp.cuda.get_current_stream()


def _describe(
    engine: CudaEngine, plan: BatchPlan, body_ptrs: np.ndarray, i16: np.ndarray, out_ptrs: np.ndarray,
    layout: str = "mels",
) -> tuple[np.ndarray, np.ndarray]:
    """(B, D_FIELDS) int64 descriptors of offline clips and (B + 1,) int32 tile starts."""
    n = plan.size
    desc = np.zeros((n, K.D_FIELDS), np.int64)
    desc[:, K.D_BODY] = body_ptrs
    desc[:, K.D_OUT] = out_ptrs
    desc[:, K.D_PRE_LEN] = desc[:, K.D_POST_LEN] = 200
    desc[:, K.D_BODY_LEN] = plan.used
    desc[:, K.D_ZERO_LEN] = plan.zeros
    desc[:, K.D_BODY_I16] = i16
    desc[:, K.D_N_MELS] = plan.n_mels
    desc[:, K.D_N_FRAMES] = plan.frames
    if layout == "mels":
        desc[:, K.D_OUT_FS], desc[:, K.D_OUT_MS] = 1, plan.frames
    else:
        desc[:, K.D_OUT_FS], desc[:, K.D_OUT_MS] = plan.n_mels, 1
    desc[:, K.D_MAX_INDEX] = np.arange(n)
    desc[:, K.D_REFLECT] = 1
    tiles = np.zeros(n + 1, np.int64)
    np.cumsum(-(-plan.frames // engine.frames_per_block), out=tiles[1:])
    return desc, tiles.astype(np.int32)


def _launch_all(
    engine: CudaEngine, desc: Any, tiles: Any, n: int, n_tiles: int, bits: Any, normalise: bool, bad: Any = None
) -> None:
    """Frames, then (optionally) per-clip normalisation, on the current stream."""
    if n_tiles == 0:
        return
    engine._launch(desc, tiles, n, n_tiles, bits, bad)
    if normalise:
        grid_y = min(n, 65535)
        grid_x = max(1, min(64, (132 * 8) // grid_y))
        engine._normalise_items_kernel((grid_x, grid_y), (256,), (desc, bits, np.int32(n)))


def device_frames(engine: CudaEngine, audio: Any, n_mels: int, padding: int, layout: str) -> tuple[Any, Any]:
    """Raw log10 frames of a (B, L) device batch, (B, T, n_mels) or (B, n_mels, T), and the
    per-clip max as order-preserving uint32 bits; queued on the engine's stream."""
    cp = engine._cp
    array = as_device(engine, audio)
    if array is None:
        raise ValueError("expected a (B, L) int16/float32 array on the engine's device")
    with engine._device, engine._stream:
        array = cp.ascontiguousarray(array)
    plan = plan_batch(array, n_mels, padding, False, on_device=True)
    b, t = plan.size, (array.shape[1] + padding) // 160
    with engine._device, engine._stream:
        out = cp.empty((b, t, n_mels) if layout == "frames" else (b, n_mels, t), cp.float32)
        bits = cp.zeros(b, cp.uint32)
        if out.size:
            rows = np.arange(b, dtype=np.int64)
            desc, tiles = _describe(
                engine, plan, array.data.ptr + rows * array.strides[0], int(array.dtype == np.int16),
                out.data.ptr + rows * (t * n_mels * 4), layout,
            )
            _launch_all(engine, cp.asarray(desc), cp.asarray(tiles), b, int(tiles[-1]), bits, False)
    return out, bits


def log_mel_batch(engine: CudaEngine, clips: Any, n_mels: int, padding: int, pad_or_trim: bool, out: Any) -> Any:
    first = clips if hasattr(clips, "ndim") else (clips[0] if len(clips) else None)
    if first is not None and is_device(engine, first):
        return _device_batch(engine, clips, n_mels, padding, pad_or_trim, out)
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


def _device_batch(engine: CudaEngine, clips: Any, n_mels: int, padding: int, pad_or_trim: bool, out: Any) -> Any:
    """Device clips read in place; the result is a new device array (or ``out``). The
    engine's stream waits for the caller's stream first, and the caller's stream waits
    for the engine's work before anything the caller queues next."""
    cp = engine._cp
    like = clips if hasattr(clips, "ndim") else clips[0]
    caller = _caller_stream(engine, like)
    before, after = engine._batches.order_events
    with engine._device:
        before.record(caller)
        engine._stream.wait_event(before)
    if hasattr(clips, "ndim"):
        arrays = as_device(engine, clips)
    else:
        arrays = []
        for i, clip in enumerate(clips):
            array = as_device(engine, clip)
            if array is None:
                raise ValueError(f"clip {i}: not on the engine's device (clip 0 is)")
            arrays.append(array)
    plan = plan_batch(arrays, n_mels, padding, pad_or_trim, on_device=True)
    n = plan.size
    with engine._device, engine._stream:
        if plan.two_d:
            batch = cp.ascontiguousarray(plan.clips)  # a no-op for a contiguous batch
            body = batch.data.ptr + batch.strides[0] * np.arange(n, dtype=np.int64)
        else:
            rows = [cp.ascontiguousarray(c) for c in plan.clips]  # no-ops for contiguous clips
            body = np.array([r.data.ptr for r in rows], np.int64)
        if out is not None:
            out_array = as_device(engine, out)
            if out_array is None:
                raise ValueError("out must be a device array for device clips")
            check_out(plan, out_array)
            flat = out_array.reshape(-1)
        else:
            flat = cp.empty(int(plan.offsets[-1]), cp.float32)
        desc, tiles = _describe(engine, plan, body, plan.int16(), flat.data.ptr + 4 * plan.offsets[:-1])
        engine._last_body_pointers = body
        d_desc, d_tiles, bits = engine._batches.small.upload(engine._stream, desc, tiles)
        _launch_all(engine, d_desc, d_tiles, n, int(tiles[-1]), bits, True)
        after.record(engine._stream)
        caller.wait_event(after)
        if out is not None:
            return out
        if _is_torch(like):
            import torch

            return shape_result(plan, flat, torch.from_dlpack)
        return shape_result(plan, flat)


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

    def upload(self, stream: Any, desc: np.ndarray, tiles: np.ndarray) -> tuple[Any, Any, Any]:
        """(device desc int64, tiles int32, zeroed max bits uint32) queued on ``stream``."""
        cp = self.cp
        runtime = cp.cuda.runtime
        slot = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        slot.h2d_done.synchronize()  # this entry's previous upload has left its pinned buffer
        n = desc.shape[0]
        tiles_off = desc.nbytes
        bits_off = _align(tiles_off + tiles.nbytes)
        slot.reserve(bits_off + 4 * max(n, 1), 0)
        host = slot.host_in
        host[:tiles_off].view(np.int64)[:] = desc.reshape(-1)
        host[tiles_off : tiles_off + tiles.nbytes].view(np.int32)[:] = tiles
        dev = slot.dev_in.data.ptr
        runtime.memcpyAsync(dev, host.ctypes.data, tiles_off + tiles.nbytes, runtime.memcpyHostToDevice, stream.ptr)
        runtime.memsetAsync(dev + bits_off, 0, 4 * max(n, 1), stream.ptr)
        slot.h2d_done.record(stream)
        return (slot.dev_in[:tiles_off].view(cp.int64), slot.dev_in[tiles_off : tiles_off + tiles.nbytes].view(cp.int32),
                slot.dev_in[bits_off : bits_off + 4 * max(n, 1)].view(cp.uint32))


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
        copy_stream, stream = engine._copy_stream, engine._stream
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
                with stream:
                    _launch_all(
                        engine, slot.dev_in[:tiles_off].view(cp.int64),
                        slot.dev_in[tiles_off : tiles_off + 4 * (k + 1)].view(cp.int32), k, int(tiles[-1]),
                        slot.dev_out[bits_off:bad_off].view(cp.uint32), True,
                        slot.dev_out[bad_off : bad_off + 4 * k].view(cp.uint32),
                    )
                slot.kernel_done.record(stream)
                host_out = slot.host_out.ctypes.data
                runtime.memcpyAsync(host_out + bad_off, dev_out + bad_off, 4 * k, runtime.memcpyDeviceToHost,
                                    stream.ptr)
                first = int(plan.offsets[g0])
                target = flat.ctypes.data + 4 * first if direct_out else host_out
                if frames_bytes:
                    runtime.memcpyAsync(target, dev_out, frames_bytes, runtime.memcpyDeviceToHost, stream.ptr)
                slot.d2h_done.record(stream)
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
