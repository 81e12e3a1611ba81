"""The CUDA engine (CuPy). CuPy is imported inside ``CudaEngine.__init__`` only, so
importing this module never initialises CUDA.

One ``process`` call is one host-to-device copy, one kernel launch over every item's
frames, one device-to-host copy. Inputs, descriptors and output share pinned host
staging buffers and device buffers that only grow; stream state stays on the host.

Host staging layout of one call (device buffer ``_dev_in`` mirrors it byte for byte):

    [descriptors: n x 16 int64][tile starts: n + 1 int32][pad to 256]
    [pre/post samples: float32, per item][pad to 256][bodies: raw chunk bytes, 16-aligned]

Output (``_dev_out`` / ``_host_out``): [frames: float32, per item (k, n_mels)][pad][max: n uint32]
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from . import _kernels as K
from .engine import Computed, Engine
from .spec import MEL_CHOICES, hann_window, sparse_filters
from .stream import Segment


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def _decode_max(bits: np.ndarray) -> np.ndarray:
    """uint32 order-preserving images -> float32, a new array (inverse of the kernel's
    ordered_bits: a set top bit is cleared, a clear one means every bit was flipped). As
    int32 that is ``s ^ (~(s >> 31) | INT32_MIN)``: four array operations, where the
    select it replaces took seven; a worker decodes one batch's maxima per launch."""
    s = bits.view(np.int32)
    return (s ^ (~(s >> 31) | _INT32_MIN)).view(np.float32)


_INT32_MIN = np.int32(-(1 << 31))


class CudaEngine(Engine):
    """Mel frames on one CUDA device. Not thread-safe; one per worker process."""

    kind: ClassVar[Literal["cpu", "cuda"]] = "cuda"

    def __init__(
        self, device: int = 0, *, timing: bool = False, frames_per_block: int = K.FRAMES_PER_BLOCK,
        min_blocks: int = K.MIN_BLOCKS, mel_ilp: bool = True, copy_threads: int | None = None,
        pageable_direct_bytes: int = 16 << 20, dft: str = K.DFT, fuse_normalise: bool = True,
        clip_graphs: bool = True, norm_lag: int = K.NORM_LAG, window: str = K.WINDOW,
        twiddle_step: int = K.TWIDDLE_STEP, conflict_free: bool = K.CONFLICT_FREE, norm_group: int = K.NORM_GROUP,
    ) -> None:
        import cupy as cp  # here, never at module import: the supervisor must not touch CUDA

        self._cp = cp
        self.device = int(device)
        self.timing = timing
        self.frames_per_block = int(frames_per_block)
        # batches: the frames kernel normalises each clip itself (its last block), or a
        # second launch does (the same bits either way)
        self.fuse_normalise = bool(fuse_normalise)
        # fused normalisation: spread over the blocks that follow a clip's tiles by at
        # least this many (and by at least the clip's own tile count); 0: the clip's
        # last block normalises all of it
        self.norm_lag = int(norm_lag)
        self.copy_threads = copy_threads  # host copies of large batches (None: up to 8)
        # batches whose pageable input/output is at most this many bytes are copied by
        # the driver (cudaMemcpyAsync on pageable memory) instead of through staging
        self.pageable_direct_bytes = int(pageable_direct_bytes)
        self.last_kernel_ms: float | None = None  # process(): the kernel alone, if timing
        self.last_gpu_ms: float | None = None  # process(): copy in + kernel + copy out
        self._closed = False
        self._device = cp.cuda.Device(self.device)
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._copy_stream = cp.cuda.Stream(non_blocking=True)  # batch uploads
            self._d2h_stream = cp.cuda.Stream(non_blocking=True)  # batch downloads
            source = K.kernel_source(
                self.frames_per_block, min_blocks, mel_ilp, dft, window, twiddle_step, conflict_free, norm_group
            )
            module = cp.RawModule(code=source, options=("-std=c++17",))
            self._frames_kernel = module.get_function("shmmel_mel_frames")
            self._normalise_items_kernel = module.get_function("shmmel_normalise_items")
            self._decode_kernel = module.get_function("shmmel_decode_max")
            self._window = cp.asarray(hann_window().astype(np.float32))
            self._twiddle = cp.asarray(K.twiddles())
            self._tables: dict[int, tuple[Any, Any]] = {}
            for n_mels in MEL_CHOICES:
                starts, lengths, offsets, packed = sparse_filters(n_mels)
                table = np.stack([starts, lengths, offsets], axis=1).astype(np.int32)
                self._tables[n_mels] = (cp.asarray(table.reshape(-1)), cp.asarray(packed))
            self._events = tuple(cp.cuda.Event() for _ in range(4))
            self.batch_events = (cp.cuda.Event(), cp.cuda.Event())  # device batches, if timing
        self._in_cap = self._out_cap = 0
        self._pinned_in = self._pinned_out = None  # pinned host memory (kept alive here)
        self._host_in = self._host_out = None  # numpy uint8 views of it
        self._dev_in = self._dev_out = None  # CuPy uint8 arrays (memory pool)
        self._last_launch: tuple[Any, ...] | None = None
        self._last_done: tuple[int, int] | None = None  # the last launch's tile counters and ticket
        self._registered: list[tuple[int, int, int, np.ndarray]] = []  # host lo, hi, device lo
        self._batches: Any = None  # cuda_batch.HostBatches, made on first use
        self._clip: Any = None  # cuda_clip.OneClip, made on first use
        self._clip_graphs = bool(clip_graphs)
        self._external: dict[int, Any] = {}  # CuPy wrappers of foreign streams, by handle
        self._last_body_pointers: Any = None  # device batches: what the kernel read (tests)

    # -- buffers -------------------------------------------------------------------

    def _reserve(self, in_bytes: int, out_bytes: int) -> None:
        """Grow (never shrink) the staging and device buffers to hold one call."""
        cp = self._cp
        if in_bytes > self._in_cap:
            cap = _align(max(in_bytes, 2 * self._in_cap, 1 << 20), 1 << 16)
            self._dev_in = None
            self._pinned_in = cp.cuda.alloc_pinned_memory(cap)
            self._host_in = np.frombuffer(self._pinned_in, np.uint8, cap)
            self._dev_in = cp.empty(cap, cp.uint8)
            self._in_cap = cap
        if out_bytes > self._out_cap:
            cap = _align(max(out_bytes, 2 * self._out_cap, 1 << 20), 1 << 16)
            self._dev_out = None
            self._pinned_out = cp.cuda.alloc_pinned_memory(cap)
            self._host_out = np.frombuffer(self._pinned_out, np.uint8, cap)
            self._dev_out = cp.empty(cap, cp.uint8)
            self._out_cap = cap

    # -- the launch ----------------------------------------------------------------

    def norm_lag_for(self, tile_starts: np.ndarray) -> int:
        """The lag (in blocks) of the spread normalisation for a launch with these tile
        starts: at least every item's tile count (so a block only waits for tiles of
        lower index) and ``norm_lag`` where there are that many tiles; 0 (the last
        block normalises) where ``norm_lag`` is 0."""
        n_tiles = int(tile_starts[-1])
        if self.norm_lag <= 0 or n_tiles == 0:
            return 0
        return max(int(np.diff(tile_starts).max()), min(self.norm_lag, n_tiles))

    def _launch(
        self, desc: Any, tile_starts: Any, n_items: int, n_tiles: int, item_max: Any, bad: Any = None,
        done: Any = None, lag: int = 0,
    ) -> None:
        """The frames kernel on the current stream; ``bad`` (n uint32, or None): set to 1
        for an item whose float samples hold a NaN or Inf; ``done`` (n + 1 zeroed uint32,
        or None): count each item's finished tiles (word D_MAX_INDEX) and normalise the
        items, spread over ``lag`` more blocks (see ``norm_lag_for``; 0: each item in its
        last block); with lag > 0 word n hands out the blocks' logical indexes."""
        tables = self._tables
        args = (
            desc, tile_starts, np.int32(n_items), self._window, self._twiddle,
            tables[80][0], tables[80][1], tables[128][0], tables[128][1], item_max,
            bad if bad is not None else np.uint64(0), done if done is not None else np.uint64(0),
        )
        grid = n_tiles + (lag if done is not None else 0)
        self._last_launch = ((grid,), (20 * self.frames_per_block,), args)
        self._last_done = (done.data.ptr, 4 * (n_items + 1)) if done is not None else None
        self._frames_kernel(*self._last_launch)

    def replay_last_launch(self, times: int) -> float:
        """Benchmark aid: launch the last kernel again ``times`` times back to back on the
        engine's stream (it rewrites the same values; a normalising launch's tile counters
        and block ticket are zeroed before each) and return the mean GPU time of one launch in ms, free of
        the host's launch latency."""
        start, end = self._events[1], self._events[2]
        with self._device, self._stream:
            start.record(self._stream)
            for _ in range(times):
                if self._last_done is not None:
                    self._cp.cuda.runtime.memsetAsync(self._last_done[0], 0, self._last_done[1], self._stream.ptr)
                self._frames_kernel(*self._last_launch)
            end.record(self._stream)
            end.synchronize()
        return self._cp.cuda.get_elapsed_time(start, end) / times

    def _compute(self, work: list[tuple[Segment, int]], views: list[np.ndarray | None]) -> list[Computed]:
        if self._closed:
            raise RuntimeError("CudaEngine is closed")
        cp = self._cp
        results: list[Computed] = [
            (v if v is not None else np.empty((0, m), np.float32), None) for (_, m), v in zip(work, views)
        ]
        active = [i for i, (segment, _) in enumerate(work) if segment.n_frames > 0]
        if not active:
            return results
        n = len(active)

        # where each item's frames go: a registered (mapped) out view is written by the
        # kernel itself; the others go through the staging buffer
        direct: dict[int, int] = {}
        for i in active:
            view = views[i]
            if view is not None:
                dev = self._mapped_pointer(view.ctypes.data, view.nbytes)
                if dev is not None:
                    direct[i] = dev

        # layout
        desc_off, tiles_off = 0, n * K.D_FIELDS * 8
        f32_off = _align(tiles_off + (n + 1) * 4)
        f32_pos, raw_pos, out_pos = [], [], []
        f32_n = 0
        for i in active:
            segment = work[i][0]
            f32_pos.append(f32_n)
            f32_n += _align(segment.pre.size + segment.post.size, 4)
        raw_off = _align(f32_off + 4 * f32_n)
        raw_n = out_n = 0
        for i in active:
            segment, n_mels = work[i]
            raw_pos.append(raw_off + raw_n)
            raw_n += _align(segment.body.nbytes, 16)
            out_pos.append(out_n)
            if i not in direct:
                out_n += segment.n_frames * n_mels
        in_bytes = raw_off + raw_n
        max_off = _align(4 * out_n)
        out_bytes = max_off + 4 * n
        self._reserve(in_bytes, out_bytes)

        # fill the pinned staging buffer
        host = self._host_in
        dev_base = self._dev_in.data.ptr
        out_base = self._dev_out.data.ptr
        desc = host[desc_off:tiles_off].view(np.int64).reshape(n, K.D_FIELDS)
        desc[:, K.D_MAX_INDEX + 1 :] = 0  # the fields the rows below do not set
        f32 = host[f32_off : f32_off + 4 * f32_n].view(np.float32)
        tile_starts = [0]  # each item's first tile (a running sum in Python: n is small)
        fpb = self.frames_per_block
        for j, i in enumerate(active):
            segment, n_mels = work[i]
            p0, npre, npost = f32_pos[j], segment.pre.size, segment.post.size
            f32[p0 : p0 + npre] = segment.pre
            f32[p0 + npre : p0 + npre + npost] = segment.post
            body = segment.body
            host[raw_pos[j] : raw_pos[j] + body.nbytes].view(body.dtype)[:] = body
            desc[j, : K.D_MAX_INDEX + 1] = (
                dev_base + f32_off + 4 * p0,  # D_PRE
                dev_base + raw_pos[j],  # D_BODY
                dev_base + f32_off + 4 * (p0 + npre),  # D_POST
                direct.get(i, out_base + 4 * out_pos[j]),  # D_OUT
                npre, body.size, segment.zeros, npost,  # D_*_LEN
                int(body.dtype == np.int16), n_mels, segment.n_frames,  # D_BODY_I16 .. D_N_FRAMES
                n_mels, 1, j,  # D_OUT_FS, D_OUT_MS, D_MAX_INDEX
            )
            tile_starts.append(tile_starts[-1] - (-segment.n_frames // fpb))
        host[tiles_off : tiles_off + (n + 1) * 4].view(np.int32)[:] = tile_starts
        n_tiles = tile_starts[n]

        runtime = cp.cuda.runtime
        stream = self._stream
        timing = self.timing
        with self._device, stream:
            if timing:
                self._events[0].record(stream)
            runtime.memcpyAsync(dev_base, host.ctypes.data, in_bytes, runtime.memcpyHostToDevice, stream.ptr)
            runtime.memsetAsync(out_base + max_off, 0, 4 * n, stream.ptr)
            # the kernel's pointers as plain 64-bit values: slicing and viewing three CuPy
            # arrays for them took about as much host time as the launch itself
            args = (np.uint64(dev_base + desc_off), np.uint64(dev_base + tiles_off), n,
                    n_tiles, np.uint64(out_base + max_off))
            if timing:
                self._events[1].record(stream)
            self._launch(*args)
            if timing:
                self._events[2].record(stream)
            if out_n:  # only the staged frames, and the maxima
                runtime.memcpyAsync(
                    self._host_out.ctypes.data, out_base, 4 * out_n, runtime.memcpyDeviceToHost, stream.ptr
                )
            runtime.memcpyAsync(
                self._host_out.ctypes.data + max_off, out_base + max_off, 4 * n,
                runtime.memcpyDeviceToHost, stream.ptr,
            )
            if timing:
                self._events[3].record(stream)
            stream.synchronize()
        if timing:
            self.last_kernel_ms = cp.cuda.get_elapsed_time(self._events[1], self._events[2])
            self.last_gpu_ms = cp.cuda.get_elapsed_time(self._events[0], self._events[3])

        staged = self._host_out[: 4 * out_n].view(np.float32)
        maxima = _decode_max(self._host_out[max_off : max_off + 4 * n].view(np.uint32))
        for j, i in enumerate(active):
            segment, n_mels = work[i]
            view = views[i]
            if i not in direct:
                block = staged[out_pos[j] : out_pos[j] + segment.n_frames * n_mels].reshape(-1, n_mels)
                if view is None:
                    view = block.copy()
                else:
                    view[...] = block
            results[i] = (view, float(maxima[j]))
        return results

    # -- host memory the device reads and writes directly ------------------------------

    def register_host(self, array: np.ndarray) -> None:
        """Page-lock ``array``'s memory (cudaHostRegister, mapped) until ``close``.

        For long-lived buffers such as shared-memory reply slots: a ``process(..., out=)``
        view inside it is written by the kernel itself (no staging, no copy), and a batch
        ``out=`` or a 2-D batch input inside it moves by DMA with no host copy."""
        cp = self._cp
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or array.nbytes == 0:
            raise ValueError("register_host needs a non-empty C-contiguous numpy array")
        ptr = array.ctypes.data
        runtime = cp.cuda.runtime
        with self._device:
            runtime.hostRegister(ptr, array.nbytes, 1 | 2)  # portable | mapped
            dev = int(runtime.pointerGetAttributes(ptr).devicePointer)
        self._registered.append((ptr, ptr + array.nbytes, dev, array))

    def empty_pinned(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        """A numpy array in pinned host memory (CuPy's pinned pool): batch input or ``out=``
        there moves by DMA with no host copy. Freed back to the pool with the array."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        memory = self._cp.cuda.alloc_pinned_memory(max(1, count * dtype.itemsize))
        return np.frombuffer(memory, dtype, count).reshape(shape)

    def _mapped_pointer(self, ptr: int, nbytes: int) -> int | None:
        """The device address of host range [ptr, ptr + nbytes) if this engine registered it."""
        for lo, hi, dev, _ in self._registered:
            if lo <= ptr and ptr + nbytes <= hi:
                return dev + (ptr - lo)
        return None

    def _is_pinned(self, ptr: int, nbytes: int) -> bool:
        """Whether host range [ptr, ptr + nbytes) is page-locked (pinned or registered)."""
        if nbytes == 0:
            return False
        if self._mapped_pointer(ptr, nbytes) is not None:
            return True
        runtime = self._cp.cuda.runtime
        try:
            first = runtime.pointerGetAttributes(ptr)
            last = runtime.pointerGetAttributes(ptr + nbytes - 1)
        except Exception:  # noqa: BLE001 - older drivers raise for pageable memory
            return False
        return first.type == 1 and last.type == 1  # cudaMemoryTypeHost

    # -- batches (host or device arrays) ------------------------------------------------

    def log_mel_batch(
        self, clips: Any, n_mels: int = 80, *, padding: int = 0, pad_or_trim: bool = False,
        out: Any = None,
    ) -> Any:
        """Whisper's log-mel of many clips, each normalised with its own max (see
        :mod:`.batch` and ``Engine.log_mel_batch``). Host clips (NumPy) go through a
        pipeline of pinned buffers reused across calls (copy in, kernel, copy out of only
        the frames overlap); the result is NumPy, or written into ``out``. Device clips
        (CuPy, torch CUDA tensors, anything with ``__dlpack__`` or
        ``__cuda_array_interface__`` on this engine's device) are read in place, one
        launch, and the result stays on the device: CuPy, or torch for torch input."""
        from . import cuda_batch

        if self._closed:
            raise RuntimeError("CudaEngine is closed")
        if self._batches is None:
            self._batches = cuda_batch.HostBatches(self)
        return cuda_batch.log_mel_batch(self, clips, n_mels, padding, pad_or_trim, out)

    def log_mel_clip(self, audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> np.ndarray:
        """Whisper's normalised log-mel of one host clip, (n_mels, T) float32: one upload,
        one launch, one download (see :mod:`.cuda_clip`); the bits of ``log_mel_batch``."""
        from . import cuda_clip

        if self._closed:
            raise RuntimeError("CudaEngine is closed")
        if self._clip is None:
            self._clip = cuda_clip.OneClip(self, self._clip_graphs)
        return self._clip.run(audio, n_mels, padding)

    def log10_mel_device(
        self,
        audio: Any,
        n_mels: int = 80,
        padding: int = 0,
        *,
        layout: Literal["frames", "mels"] = "frames",
    ) -> tuple[Any, Any]:
        """Offline log10 mel of a batch already on this device, in one launch.

        ``audio``: CuPy array (B, L), int16 or float32 (finiteness is not checked here).
        Returns the raw log10 frames, (B, T, n_mels) for ``"frames"`` or (B, n_mels, T)
        for ``"mels"``, and the per-clip max (B,) float32 (-inf where T == 0), as CuPy
        arrays queued on the engine's stream (``synchronize()`` before using them
        elsewhere). Bit-identical to ``process`` on the same clips."""
        from . import cuda_device

        cp = self._cp
        out, bits = cuda_device.device_frames(self, audio, n_mels, padding, layout)
        with self._device, self._stream:
            maxima = cp.empty(bits.size, cp.float32)
            if bits.size:
                self._decode_kernel(((bits.size + 255) // 256,), (256,), (bits, maxima, np.int32(bits.size)))
            if out.size == 0:
                maxima.fill(-np.inf)
        return out, maxima

    def log_mel_device(self, audio: Any, n_mels: int = 80, padding: int = 0) -> Any:
        """Whisper's normalised log-mel of a (B, L) CuPy batch: (B, n_mels, T) float32
        CuPy, each clip normalised with its own max. Same as ``log_mel_batch``."""
        return self.log_mel_batch(audio, n_mels, padding=padding)

    @property
    def stream(self) -> Any:
        """The engine's CUDA stream (CuPy); device-resident results are queued on it."""
        return self._stream

    def synchronize(self) -> None:
        """Wait for the engine's CUDA stream (for the device-resident methods)."""
        self._stream.synchronize()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.synchronize()
            self._copy_stream.synchronize()
            self._d2h_stream.synchronize()
            with self._device:
                for lo, _hi, _dev, _array in self._registered:
                    self._cp.cuda.runtime.hostUnregister(lo)
        finally:
            self._registered.clear()
            if self._batches is not None and self._batches.pool is not None:
                self._batches.pool.shutdown()
            self._batches = None
            self._clip = None
            self._dev_in = self._dev_out = None
            self._host_in = self._host_out = None
            self._pinned_in = self._pinned_out = None
