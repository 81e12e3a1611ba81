"""Choose and build a worker's compute engine (in the worker, after fork)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import layout as L
from .config import WorkerKind
from .errors import BootError


def create_worker_engine(want: WorkerKind, index: int, devices: tuple[int, ...] | None = None,
                         fake_devices: int = 0,
                         on_device: Callable[[int], None] | None = None) -> tuple[Any, int, int]:
    """Return (engine, kind, device) for mel worker ``index``.

    ``cpu`` builds the NumPy engine. ``cuda`` must get a GPU or raises BootError (the
    supervisor stops when no mel worker can boot). ``auto`` takes a GPU where CuPy finds one
    and falls back to NumPy where there is none. Worker ``index`` goes to
    ``devices[index % len(devices)]`` (``devices`` None: all visible ones, round robin);
    ``on_device`` hears the ordinal before the engine is built, so a device that cannot
    boot is shown in status. A GPU that is present but fails (or a listed ordinal that is
    not present) raises BootError in both modes: that worker is skipped while another serves.

    ``fake_devices`` (a test hook): NumPy engines that report device ordinals as if there
    were that many GPUs, so placement runs without any.
    """
    from . import mel
    from .devices import device_for

    if fake_devices:
        device = device_for(index, devices, fake_devices)
        if on_device is not None:
            on_device(device)
        if device >= fake_devices:
            raise BootError(f"device {device} is not present ({fake_devices} fake devices)")
        return mel.NumpyEngine(), L.K_CPU, device
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
    device = device_for(index, devices, count)
    if on_device is not None:
        on_device(device)
    if device >= count:
        raise BootError(f"device {device} is not present ({count} CUDA devices visible)")
    try:
        return mel.CudaEngine(device=device), L.K_CUDA, device
    except Exception as exc:  # noqa: BLE001
        raise BootError(f"CUDA engine failed on device {device}: {exc}") from None
