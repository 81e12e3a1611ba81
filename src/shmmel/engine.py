"""Choose and build a worker's compute engine (in the worker, after fork)."""

from __future__ import annotations

from typing import Any

from . import layout as L
from .config import WorkerKind
from .errors import BootError


def create_worker_engine(want: WorkerKind, index: int) -> tuple[Any, int, int]:
    """Return (engine, kind, device) for worker ``index``.

    ``cpu`` builds the NumPy engine. ``cuda`` must get a GPU or raises BootError (the
    supervisor then stops with that message). ``auto`` takes a GPU where CuPy finds one and
    falls back to NumPy otherwise. Workers spread over GPUs round-robin by index.
    """
    from . import mel

    if want == "cpu":
        return mel.NumpyEngine(), L.K_CPU, -1
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - ImportError, CUDARuntimeError, driver errors
        if want == "cuda":
            raise BootError(f"worker_kind=cuda but CUDA is unavailable: {exc}") from None
        return mel.NumpyEngine(), L.K_CPU, -1
    if count == 0:
        if want == "cuda":
            raise BootError("worker_kind=cuda but no CUDA device is visible")
        return mel.NumpyEngine(), L.K_CPU, -1
    device = index % count
    try:
        return mel.CudaEngine(device=device), L.K_CUDA, device
    except Exception as exc:  # noqa: BLE001
        if want == "cuda":
            raise BootError(f"CUDA engine failed on device {device}: {exc}") from None
        return mel.NumpyEngine(), L.K_CPU, -1
