"""Devices: which GPU each mel worker uses, how many workers there are, per-device figures.

Settings (see docs/DESIGN.md, "Devices")::

    devices = "all"            # or "0,1" / [0, 1]: the CUDA ordinals the mel workers use
    workers_per_device = 0     # 0: `workers` mel workers spread round robin over the devices;
                               # n > 0: n workers on each device (`workers` is then derived,
                               # and used as given only where no GPU is found)
    fake_devices = 0           # test hook: CPU (NumPy) workers report device ordinals

Mel worker row ``k`` goes to ``devices[k % len(devices)]`` (every device gets one before any
gets two). The choice is made in the worker after fork (CUDA never starts in the supervisor):
:func:`create_worker_engine`. Only when ``workers_per_device`` is set with
``devices = "all"`` does the supervisor need the device count before it sizes the shared
memory; it asks a short-lived child process (:func:`probe_device_count`), never CUDA itself.

Utilisation comes from NVML (``pip install nvidia-ml-py``) where it is importable, read by the
process that reports it (``shmmel status``, ``/metrics``); CUDA ordinals are mapped to NVML
devices through ``CUDA_VISIBLE_DEVICES`` when it is set, else taken as NVML indexes (CUDA's
default order equals NVML's PCI order on hosts of identical GPUs, such as 2 x H200).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import layout as L
from .errors import BootError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("shmmel.devices")

MAX_ORDINAL = 63


def create_worker_engine(want: str, index: int, devices: tuple[int, ...] | None = None,
                         fake_devices: int = 0,
                         on_device: Callable[[int], None] | None = None,
                         sync: str = "auto") -> tuple[Any, int, int]:
    """Return (engine, kind, device) for mel worker ``index``, in the worker after fork.

    The engine itself comes from :func:`shmmel.mel.create_engine` (the one place engines
    are chosen and built); this adds the service's policy around it. ``cpu`` builds the
    NumPy engine. ``cuda`` must get a GPU or raises BootError. ``auto`` takes a GPU where
    CuPy finds one and falls back to NumPy where there is none; unlike the library's
    ``create_engine("auto")``, a GPU that is present but fails raises BootError, so the
    supervisor reports and skips that device instead of serving it silently on the CPU.
    Worker ``index`` goes to ``devices[index % len(devices)]`` (``devices`` None: all
    visible ones, round robin); ``on_device`` hears the ordinal before the engine is built,
    so a device that cannot boot is shown in status.

    ``fake_devices`` (a test hook): NumPy engines that report device ordinals as if there
    were that many GPUs, so placement runs without any.
    """
    from . import mel

    if fake_devices:
        device = device_for(index, devices, fake_devices)
        if on_device is not None:
            on_device(device)
        if device >= fake_devices:
            raise BootError(f"device {device} is not present ({fake_devices} fake devices)")
        return mel.create_engine("cpu"), L.K_CPU, device
    if want == "cpu":
        return mel.create_engine("cpu"), L.K_CPU, -1
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - ImportError, CUDARuntimeError, driver errors
        if want == "cuda":
            raise BootError(f"worker_kind=cuda but CUDA is unavailable: {exc}") from None
        return mel.create_engine("cpu"), L.K_CPU, -1
    if count == 0:
        if want == "cuda":
            raise BootError("worker_kind=cuda but no CUDA device is visible")
        return mel.create_engine("cpu"), L.K_CPU, -1
    device = device_for(index, devices, count)
    if on_device is not None:
        on_device(device)
    if device >= count:
        raise BootError(f"device {device} is not present ({count} CUDA devices visible)")
    try:
        set_cuda_sync(device, sync)  # before the engine makes the device's context current
        return mel.create_engine("cuda", device), L.K_CUDA, device
    except Exception as exc:  # noqa: BLE001
        raise BootError(f"CUDA engine failed on device {device}: {exc}") from None


# CUctx_flags' scheduling bits (cuda.h): how a host thread waits in a synchronize
CUDA_SYNC_FLAGS = {"auto": 0x0, "spin": 0x1, "yield": 0x2, "blocking": 0x4}
_SCHED_MASK = 0x7


def set_cuda_sync(device: int, policy: str) -> None:
    """Set how this process's threads wait for ``device`` (``cuda_sync``): the scheduling
    flags of its primary context, the one CuPy's runtime calls use. Call it before the
    engine is made (the GPU test reads the flags back from a worker's engine).

    CUDA's ``auto`` spins while the process's contexts are fewer than the host's cores: a
    CUDA worker then holds a whole core in every stream synchronize (11.7 % of a worker's
    samples under the chunk load, docs/PERFORMANCE.md), which on a host the HTTP processes
    already fill is CPU they lack. ``yield`` spins with sched_yield between polls;
    ``blocking`` sleeps on the driver's interrupt (the core is free; the wake-up comes
    later than a spin's). ``auto`` leaves the flags as they are.

    The driver API through ctypes because CuPy's runtime wrapper has no
    cudaSetDeviceFlags; the driver library is present wherever CuPy finds a GPU."""
    if policy == "auto":
        return
    lib, dev, old = _primary_context(device, f"cuda_sync={policy}")
    rc = lib.cuDevicePrimaryCtxSetFlags_v2(dev, (old & ~_SCHED_MASK) | CUDA_SYNC_FLAGS[policy])
    if rc != 0:
        raise BootError(f"cuda_sync={policy}: cuDevicePrimaryCtxSetFlags failed on device "
                        f"{device} (CUresult {rc})")


def cuda_sync_flags(device: int) -> int:
    """The scheduling bits of ``device``'s primary context (tests; 0: CUDA's auto)."""
    return _primary_context(device, "cuda_sync_flags")[2] & _SCHED_MASK


def _primary_context(device: int, what: str) -> tuple[Any, Any, int]:
    """(the driver library, ``device``'s CUdevice, its primary context's flags), through
    ctypes; BootError naming ``what`` and the failed call otherwise."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), int(device))),
                       ("cuDevicePrimaryCtxGetState", (dev, ctypes.byref(flags), ctypes.byref(active)))):
        rc = getattr(lib, call)(*args)
        if rc != 0:
            raise BootError(f"{what}: {call} failed on device {device} (CUresult {rc})")
    return lib, dev, flags.value


def parse_devices(text: str) -> tuple[int, ...] | None:
    """``"all"`` -> None; ``"0,1"`` -> (0, 1). ValueError (saying why) otherwise."""
    t = str(text).strip().lower()
    if t == "all":
        return None
    try:
        out = tuple(int(p) for p in t.replace(" ", "").split(","))
    except ValueError:
        raise ValueError('use "all" or CUDA device ordinals separated by commas, e.g. "0,1"') \
            from None
    if any(not 0 <= d <= MAX_ORDINAL for d in out):
        raise ValueError(f"device ordinals must be 0..{MAX_ORDINAL}")
    if len(set(out)) != len(out):
        raise ValueError("a device is listed twice (use workers_per_device for more workers "
                         "on one device)")
    return out


def device_for(index: int, listed: tuple[int, ...] | None, count: int) -> int:
    """The device of mel worker row ``index``: round robin over the listed devices (or over
    all ``count`` visible ones)."""
    if listed:
        return listed[index % len(listed)]
    return index % count


def probe_device_count(timeout: float) -> int:
    """How many CUDA devices a child process sees (0 without CuPy or a driver). The
    supervisor must not initialise CUDA itself: its workers are forked from it."""
    code = ("import cupy\n"
            "print(cupy.cuda.runtime.getDeviceCount())")
    try:
        proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not count CUDA devices: %s", exc)
        return 0
    if proc.returncode != 0:
        return 0
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def settle_workers(config: Config) -> Config:
    """The config the supervisor runs: with ``workers_per_device`` set, ``workers`` becomes
    devices x workers_per_device (``workers`` stays as given when no device is found)."""
    per = config.workers_per_device
    if per <= 0 or config.worker_kind == "cpu" and not config.fake_devices:
        return config
    listed = config.device_list
    if listed is not None:
        n = len(listed)
    elif config.fake_devices:
        n = config.fake_devices
    else:
        n = probe_device_count(config.boot_timeout)
        if n == 0:
            log.warning("workers_per_device=%d but no CUDA device is visible: %d CPU "
                        "workers (the workers setting)", per, config.workers)
            return config
    from .errors import BootError, ConfigError

    sources = {**config.sources, "workers": "workers_per_device"}
    try:
        return config.replace(workers=n * per, sources=sources)
    except ConfigError as exc:  # e.g. 8 devices x 64 workers
        raise BootError(f"workers_per_device={per} on {n} devices: {exc}") from None


# -- per-device figures (status, /metrics) --------------------------------------------------

def pinned_streams(workers: np.ndarray, streams: np.ndarray) -> np.ndarray:
    """Open stream-table entries per worker row, counting only those of the worker's current
    generation (a dead worker's entries are stale until the supervisor frees them)."""
    n = len(workers)
    open_ = streams["state"] != L.ST_FREE
    wk = streams["worker"][open_].astype(np.int64)
    gen = streams["gen"][open_]
    ok = wk < n
    wk, gen = wk[ok], gen[ok]
    live = gen == workers["gen"][wk]
    return np.bincount(wk[live], minlength=n)[:n]


def device_rows(workers: np.ndarray, mel_rows: int, depths: np.ndarray,
                pinned: np.ndarray, utilisation: dict[int, float] | None = None
                ) -> list[dict[str, Any]]:
    """One row per device a mel worker was given: its workers, how many are ready, memory
    in use (the workers' CuPy pools), utilisation (NVML, else None), streams pinned to it,
    requests queued on it. ``state`` is "serving" while a worker of it is ready, else "down".
    """
    by_device: dict[int, list[int]] = {}
    for k in range(min(mel_rows, len(workers))):
        d = int(workers["device"][k])
        if d >= 0:
            by_device.setdefault(d, []).append(k)
    rows = []
    for d in sorted(by_device):
        ks = by_device[d]
        ready = sum(int(workers["state"][k]) == L.W_READY for k in ks)
        rows.append({
            "device": d, "workers": ks, "ready": ready,
            "state": "serving" if ready else "down",
            "memory_bytes": int(sum(int(workers["gpu_bytes"][k]) for k in ks)),
            "utilisation": None if utilisation is None else utilisation.get(d),
            "streams": int(sum(int(pinned[k]) for k in ks)),
            "queue_depth": int(sum(int(depths[k]) for k in ks)),
        })
    return rows


class Nvml:
    """GPU utilisation through NVML, where nvidia-ml-py is installed and a driver answers;
    NVML starts on first use (never at import), one per owner (a collector, a snapshot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mod: Any = None
        self._tried = False

    def _init(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                with contextlib.suppress(Exception):  # ImportError, NVMLError (no driver)
                    import pynvml

                    pynvml.nvmlInit()
                    self._mod = pynvml
        return self._mod

    def utilisation(self, ordinals: list[int]) -> dict[int, float] | None:
        """{CUDA ordinal: busy fraction 0..1 over NVML's last sample period}, or None."""
        nv = self._init() if ordinals else None
        if nv is None:
            return None
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                   if v.strip()]
        out: dict[int, float] = {}
        for d in ordinals:
            with contextlib.suppress(Exception):
                ref = visible[d] if d < len(visible) else str(d)
                handle = (nv.nvmlDeviceGetHandleByIndex(int(ref)) if ref.isdigit()
                          else nv.nvmlDeviceGetHandleByUUID(ref))
                out[d] = nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
        return out

