"""GPU utilisation and memory sampled through NVML while a bench runs (optional: needs
``pynvml`` from nvidia-ml-py and a GPU; otherwise the sampler records nothing)."""

from __future__ import annotations

import statistics
import threading
from typing import Any


class GpuSampler:
    def __init__(self, index: int | None = 0, interval: float = 0.1) -> None:
        self.index, self.interval = index, interval
        self.samples: list[tuple[int, int]] = []   # (utilisation %, memory used bytes)
        self.name = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def __enter__(self) -> GpuSampler:
        if self.index is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            name = pynvml.nvmlDeviceGetName(handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - no library, no driver, no device: no samples
            return self
        self._nvml = pynvml

        def loop() -> None:
            while not self._stop.wait(self.interval):
                try:
                    u = pynvml.nvmlDeviceGetUtilizationRates(handle)
                    m = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    self.samples.append((int(u.gpu), int(m.used)))
                except Exception:  # noqa: BLE001
                    return

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def summary(self) -> dict[str, Any]:
        util = [u for u, _ in self.samples]
        mem = [m for _, m in self.samples]
        return {"name": self.name, "samples": len(self.samples),
                "util_mean_pct": round(statistics.fmean(util), 1),
                "util_max_pct": max(util), "mem_max_mib": round(max(mem) / 2**20)}
