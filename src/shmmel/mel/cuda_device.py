"""Device batches on the CUDA engine: CuPy arrays, torch CUDA tensors and anything with
``__dlpack__`` / ``__cuda_array_interface__`` on the engine's device, read where they lie.

One descriptor upload and one launch (each clip normalised in the frames kernel, spread
over the blocks that follow its tiles); the result is a new device array (CuPy, or torch for torch input) or the
caller's ``out``. The engine's stream waits for the caller's stream first, and the
caller's stream waits for the engine's work. A 2-D batch into an ``out`` keeps its
descriptors on the device (``_SmallUploads.keep``): the same call again is one memset
and one launch. ``_describe`` and ``_launch_all`` also serve the host batches.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kernels as K
from .batch import BatchPlan, check_out, plan_batch, shape_result

if TYPE_CHECKING:
    from .cuda import CudaEngine

_KDL_CUDA = 2


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

        current = torch.cuda.current_stream(like.device)
        handle = current.cuda_stream
        stream = engine._external.get(handle)
        if stream is None:
            stream = engine._external[handle] = _wrap_stream(cp, current, handle,
                                                             like.device.index)
        return stream
    with engine._device:
        return cp.cuda.get_current_stream()


def _wrap_stream(cp: Any, current: Any, handle: int, device: int | None) -> Any:
    """A CuPy stream for torch's ``current`` stream. CuPy 14 deprecates ``ExternalStream``
    for ``Stream.from_external`` (the CUDA stream protocol, ``__cuda_stream__``, which torch
    streams carry); older CuPy has only the former, given the device so CuPy can check it."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(current, "__cuda_stream__"):
        return from_external(current)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ExternalStream is deprecated", DeprecationWarning)
        return cp.cuda.ExternalStream(handle, -1 if device is None else device)


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
    engine: CudaEngine, desc: Any, tiles: Any, n: int, n_tiles: int, bits: Any, normalise: bool, bad: Any = None,
    done: Any = None, lag: int = 0,
) -> None:
    """Frames and (optionally) per-clip normalisation on the current stream: in the frames
    kernel where the engine fuses it and ``done`` (n + 1 zeroed uint32: tile counters, block ticket) is given
    (spread over ``lag`` more blocks, see ``CudaEngine.norm_lag_for``), else a second
    launch."""
    if n_tiles == 0:
        return
    fused = normalise and engine.fuse_normalise and done is not None
    engine._launch(desc, tiles, n, n_tiles, bits, bad, done if fused else None, lag)
    if normalise and not fused:
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


def device_batch(engine: CudaEngine, clips: Any, n_mels: int, padding: int, pad_or_trim: bool, out: Any) -> Any:
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
    small = engine._batches.small
    key = None
    if hasattr(clips, "ndim"):
        arrays = as_device(engine, clips)
        out_array = as_device(engine, out) if out is not None else None
        if arrays is not None and out_array is not None:
            # a 2-D batch into out: its descriptors follow from the two arrays' addresses,
            # shapes and strides, so the same call again reuses them on the device, its
            # checks already passed; only the max bits and counters are zeroed
            key = (arrays.data.ptr, arrays.shape, arrays.strides, arrays.dtype.char, out_array.data.ptr,
                   out_array.shape, out_array.strides, out_array.dtype.char, n_mels, padding, pad_or_trim)
            hit = small.cached.get(key)
            if hit is not None:
                _launch_cached(engine, hit, arrays.shape[0], after, caller)
                return out
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
        lag = engine.norm_lag_for(tiles)
        if key is not None and plan.two_d and batch.data.ptr == arrays.data.ptr:
            _launch_cached(engine, small.keep(key, engine._stream, desc, tiles, lag), n, after, caller)
            return out
        d_desc, d_tiles, bits, done = small.upload(engine._stream, desc, tiles)
        _launch_timed(engine, d_desc, d_tiles, n, int(tiles[-1]), bits, done, lag)
        after.record(engine._stream)
        caller.wait_event(after)
        if out is not None:
            return out
        if _is_torch(like):
            import torch

            return shape_result(plan, flat, torch.from_dlpack)
        return shape_result(plan, flat)


def _launch_cached(engine: CudaEngine, entry: tuple[Any, Any, Any, Any, int, int], n: int, after: Any,
                   caller: Any) -> None:
    """Launch a device batch from descriptors kept on the device (see _SmallUploads.keep)."""
    d_desc, d_tiles, bits, done, n_tiles, lag = entry
    with engine._device, engine._stream:
        # bits, done (tile counters and the block ticket): 2 m + 1 words
        engine._cp.cuda.runtime.memsetAsync(bits.data.ptr, 0, 4 * (2 * max(n, 1) + 1), engine._stream.ptr)
        _launch_timed(engine, d_desc, d_tiles, n, n_tiles, bits, done, lag)
        after.record(engine._stream)
        caller.wait_event(after)


def _launch_timed(engine: CudaEngine, desc: Any, tiles: Any, n: int, n_tiles: int, bits: Any, done: Any,
                  lag: int) -> None:
    """Frames and normalisation of a device batch; with ``engine.timing``, between the
    engine's ``batch_events`` (the GPU time of the launch itself, for the benchmark)."""
    if engine.timing:
        engine.batch_events[0].record(engine._stream)
    _launch_all(engine, desc, tiles, n, n_tiles, bits, True, done=done, lag=lag)
    if engine.timing:
        engine.batch_events[1].record(engine._stream)
