"""One host clip on the CUDA engine, in as few steps as the work allows.

``log_mel_spectrogram(x, engine=CudaEngine)`` for a NumPy clip is one host-to-device
copy (descriptor, tile starts, zeroed max/flag/counter/ticket words and the samples, laid out
in one pinned buffer), one launch of the frames kernel (which also normalises the clip,
in as many more blocks as it has tiles) and one device-to-host copy (the NaN flag and the frames), then a
synchronize. The batch path does the same work with more Python around it (plans,
groups, a memset, a second copy); the same kernel and descriptor give the same bits.

Buffer layout (the device buffer mirrors the pinned one byte for byte):

    [descriptor: 16 int64][tile starts: 2 int32][pad to 256][samples][pad to 256]
    [max bits, NaN flag, tile counter, block ticket: 4 uint32][frames: n_mels x T float32]

The upload covers everything up to the counters (so they arrive zeroed); the download
covers the counters and the frames. Clips of more than ``STAGE_BYTES`` (samples and
frames) skip the copies through the pinned buffer: the driver copies the samples in and
the frames out of the caller's (pageable) memory, the header and words still go through
the pinned buffer. With ``graphs`` the three operations of a staged clip are captured
once per clip shape as a CUDA graph and replayed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kernels as K
from .spec import HOP_LENGTH, check_audio, check_n_mels, check_padding

if TYPE_CHECKING:
    from .cuda import CudaEngine

_HEAD = 256  # descriptor and tile starts, padded
GRAPHS = 16  # captured clip shapes kept (oldest dropped first)
STAGE_BYTES = 256 << 10  # clips with fewer sample + frame bytes go through the pinned buffer


def _align(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


class OneClip:
    """Pinned and device buffers (grow only) for single clips, reused across calls."""

    def __init__(self, engine: CudaEngine, graphs: bool = False) -> None:
        self.engine = engine
        # graphs: the upload, launch and download captured once per clip shape and
        # replayed (one launch call instead of three); the buffers' addresses are baked
        # in, so growing the buffers drops them
        self.use_graphs = graphs
        self.graphs: dict[tuple[int, int, int, int], Any] = {}
        self.cap = 0
        self.host: np.ndarray | None = None
        self.dev: Any = None
        self._memory: Any = None
        desc = np.zeros(K.D_FIELDS, np.int64)
        desc[K.D_PRE_LEN] = desc[K.D_POST_LEN] = 200
        desc[K.D_OUT_FS] = 1
        desc[K.D_REFLECT] = 1
        self._template = desc

    def _reserve(self, nbytes: int) -> None:
        if nbytes <= self.cap:
            return
        cp = self.engine._cp
        cap = _align(max(nbytes, 2 * self.cap, 1 << 20), 1 << 16)
        self.graphs.clear()
        self.dev = None
        self._memory = cp.cuda.alloc_pinned_memory(cap)
        self.host = np.frombuffer(self._memory, np.uint8, cap)
        with self.engine._device:
            self.dev = cp.empty(cap, cp.uint8)
        self.cap = cap

    def run(self, audio: np.ndarray, n_mels: int, padding: int) -> np.ndarray:
        """Whisper's normalised log-mel of one host clip: (n_mels, T) float32."""
        engine = self.engine
        audio = np.ascontiguousarray(check_audio(audio, finite=False))  # NaN/Inf: the kernel
        n_mels, padding = check_n_mels(n_mels), check_padding(padding)
        n = audio.size
        frames = (n + padding) // HOP_LENGTH
        _check_tail(audio)
        if frames == 0:
            return np.empty((n_mels, 0), np.float32)
        samples_off = _HEAD
        words_off = _align(samples_off + audio.nbytes)
        frames_off = words_off + 16
        out_bytes = 4 * frames * n_mels
        self._reserve(frames_off + out_bytes)
        host, dev_base = self.host, self.dev.data.ptr
        assert host is not None
        n_tiles = -(-frames // engine.frames_per_block)
        desc = self._template.copy()
        desc[K.D_BODY] = dev_base + samples_off
        desc[K.D_OUT] = dev_base + frames_off
        desc[K.D_BODY_LEN] = n
        desc[K.D_ZERO_LEN] = padding
        desc[K.D_BODY_I16] = audio.dtype == np.int16
        desc[K.D_N_MELS] = n_mels
        desc[K.D_N_FRAMES] = desc[K.D_OUT_MS] = frames
        host[: 8 * K.D_FIELDS].view(np.int64)[:] = desc
        host[8 * K.D_FIELDS : 8 * K.D_FIELDS + 8].view(np.int32)[:] = (0, n_tiles)
        host[words_off:frames_off] = 0
        stream = engine._stream
        if audio.nbytes + out_bytes > STAGE_BYTES:
            # larger clips: the driver copies the samples in and the frames out directly
            # (pageable memory), no copy through the pinned buffer
            result = np.empty((n_mels, frames), np.float32)
            runtime = engine._cp.cuda.runtime
            h2d, d2h = runtime.memcpyHostToDevice, runtime.memcpyDeviceToHost
            with engine._device, stream:
                runtime.memcpyAsync(dev_base, host.ctypes.data, samples_off, h2d, stream.ptr)
                runtime.memcpyAsync(dev_base + samples_off, audio.ctypes.data, audio.nbytes, h2d, stream.ptr)
                runtime.memcpyAsync(dev_base + words_off, host.ctypes.data + words_off, 16, h2d, stream.ptr)
                self._launch(words_off, n_tiles)
                runtime.memcpyAsync(host.ctypes.data + words_off, dev_base + words_off, 16, d2h, stream.ptr)
                runtime.memcpyAsync(result.ctypes.data, dev_base + frames_off, out_bytes, d2h, stream.ptr)
                stream.synchronize()
        else:
            host[samples_off : samples_off + audio.nbytes] = audio.view(np.uint8)
            with engine._device, stream:
                key = (n, audio.dtype.itemsize, n_mels, padding)
                graph = self.graphs.get(key) if self.use_graphs else None
                if graph is not None:
                    graph.launch(stream)
                elif self.use_graphs and self._capture(key, frames_off, words_off, out_bytes, n_tiles):
                    self.graphs[key].launch(stream)
                else:
                    self._enqueue(frames_off, words_off, out_bytes, n_tiles)
                stream.synchronize()
            result = host[frames_off : frames_off + out_bytes].view(np.float32).reshape(n_mels, frames).copy()
        if host[words_off + 4 : words_off + 8].view(np.uint32)[0]:
            _raise_nonfinite(audio)
        return result

    def _capture(self, key: tuple[int, int, int, int], frames_off: int, words_off: int, out_bytes: int,
                 n_tiles: int) -> bool:
        """Capture the clip's three operations as a graph; False (and no more graphs)
        where this CuPy or driver cannot."""
        stream = self.engine._stream
        if len(self.graphs) >= GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        try:
            stream.begin_capture()
            try:
                self._enqueue(frames_off, words_off, out_bytes, n_tiles)
            finally:
                graph = stream.end_capture()
        except Exception:  # noqa: BLE001 - fall back to plain launches
            self.use_graphs = False
            return False
        self.graphs[key] = graph
        return True

    def _enqueue(self, frames_off: int, words_off: int, out_bytes: int, n_tiles: int) -> None:
        """Upload, launch, download on the current stream (the engine's)."""
        engine = self.engine
        runtime = engine._cp.cuda.runtime
        stream = engine._stream
        host, dev_base = self.host.ctypes.data, self.dev.data.ptr  # type: ignore[union-attr]
        runtime.memcpyAsync(dev_base, host, frames_off, runtime.memcpyHostToDevice, stream.ptr)
        self._launch(words_off, n_tiles)
        runtime.memcpyAsync(host + words_off, dev_base + words_off, 16 + out_bytes, runtime.memcpyDeviceToHost,
                            stream.ptr)

    def _launch(self, words_off: int, n_tiles: int) -> None:
        """The frames kernel (with normalisation) on the current stream: n_tiles blocks
        of frames, then n_tiles blocks that each normalise a share once all are counted
        (``done`` is the tile counter and, after it, the blocks' ticket: both zeroed by the upload)."""
        engine = self.engine
        tables = engine._tables
        dev_base = self.dev.data.ptr
        words = dev_base + words_off
        lag = n_tiles if engine.norm_lag > 0 else 0  # spread normalisation (see the kernel)
        engine._frames_kernel(
            (n_tiles + lag,), (20 * engine.frames_per_block,),
            (np.uint64(dev_base), np.uint64(dev_base + 8 * K.D_FIELDS), np.int32(1), engine._window,
             engine._twiddle, tables[80][0], tables[80][1], tables[128][0], tables[128][1],
             np.uint64(words), np.uint64(words + 4), np.uint64(words + 8)),
        )


def _check_tail(audio: np.ndarray) -> None:
    """A clip's last up to 119 samples (and a clip too short for a frame) are read by no
    frame, so the kernel cannot flag NaN/Inf there: checked here (400 samples)."""
    if audio.dtype == np.float32 and audio.size and not np.isfinite(audio[-400:]).all():
        _raise_nonfinite(audio)


def _raise_nonfinite(audio: np.ndarray) -> None:
    check_audio(audio)  # raises with the first bad sample
    raise ValueError("audio contains NaN or Inf")
