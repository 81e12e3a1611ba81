"""``bench text``: the text load over several processes, merged into one report dict."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from rich.console import Console

from . import text
from .hist import merge, summary_ms
from .runner import run_processes


@dataclass(frozen=True)
class TextLoad:
    connections: int = 100
    duration: float = 10.0
    warmup: float = 2.0
    mode: text.Mode = "closed"
    rate: float = 0.0            # open loop: total requests per second
    sizes: tuple[int, ...] = (256,)
    ops: tuple[str, ...] = ("reverse",)
    procs: int = 1
    timing_fraction: float = 0.05  # parse Server-Timing on this fraction of answers
    seed: int = 0


def host_port(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def throughput(per_second: list[int], duration: float) -> dict[str, float]:
    """Mean and standard deviation of the answers per whole 1-second interval."""
    bins = per_second[: max(1, int(duration))]
    bins += [0] * (max(1, int(duration)) - len(bins))
    return {"mean": round(statistics.fmean(bins), 1),
            "stdev": round(statistics.pstdev(bins), 1) if len(bins) > 1 else 0.0,
            "intervals": len(bins), "per_second": bins}


def merge_results(parts: list[dict], duration: float) -> dict:
    per_second: list[int] = []
    for p in parts:
        for i, v in enumerate(p["per_second"]):
            if i >= len(per_second):
                per_second.append(0)
            per_second[i] += v
    statuses: Counter = Counter()
    errors: Counter = Counter()
    for p in parts:
        statuses.update({int(k): v for k, v in p["statuses"].items()})
        errors.update(p["errors"])
    lat = merge(p["latency"] for p in parts)
    unc = merge(p["uncorrected"] for p in parts)
    timing = {}
    for name in ("queue", "worker", "ipc", "http"):
        encs = [p["timing"][name] for p in parts if name in p["timing"]]
        if encs:
            timing[name] = summary_ms(merge(encs))
    done = sum(p["done"] for p in parts)
    return {"requests": done, "errors": dict(errors),
            "error_count": sum(errors.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "throughput": {"total_per_s": round(done / duration, 1),
                           **throughput(per_second, duration)},
            "latency_ms": summary_ms(lat), "uncorrected_ms": summary_ms(unc),
            "components_ms": timing, "_hist": lat}


def run_text(url: str, load: TextLoad, *, label: str = "text",
             console: Console | None = None, token: str = "") -> dict:
    """Run the text load against ``url``; the merged report (``_hist``: the HdrHistogram)."""
    host, port = host_port(url)
    requests = text.build_requests(f"{host}:{port}", list(load.sizes), list(load.ops),
                                   load.seed, token=token)
    procs = max(1, min(load.procs, load.connections))
    conns = split(load.connections, procs)
    firsts = [sum(conns[:i]) for i in range(procs)]
    every = 0 if load.timing_fraction <= 0 else max(1, round(1 / load.timing_fraction))
    t0 = time.monotonic() + 0.5 + 0.002 * load.connections

    def target(i: int, progress) -> dict:
        plan = text.Plan(host, port, requests, conns[i], t0, load.warmup, load.duration,
                         load.mode, first_conn=firsts[i], all_conns=load.connections,
                         total_rate=load.rate, timing_every=every)
        return text.run(plan, progress).to_wire()

    parts = run_processes(target, procs, label=label, t0=t0, warmup=load.warmup,
                          duration=load.duration, console=console)
    out = merge_results(parts, load.duration)
    out["load"] = {"url": url, "connections": load.connections, "procs": procs,
                   "mode": load.mode, "rate": load.rate if load.mode == "open" else None,
                   "duration_s": load.duration, "warmup_s": load.warmup,
                   "sizes": list(load.sizes), "ops": sorted(set(load.ops)),
                   "timing_fraction": load.timing_fraction}
    return out


def run_burst(url: str, n: int = 1000, procs: int = 1, timeout: float = 30.0,
              console: Console | None = None, token: str = "") -> dict:
    """``n`` requests, one per connection, all sent at the same instant (connections opened
    beforehand): every one must be answered, with no error, within ``timeout``."""
    host, port = host_port(url)
    requests = text.build_requests(f"{host}:{port}", [256], ["reverse"], 1, token=token)
    procs = max(1, min(procs, n))
    conns = split(n, procs)
    t0 = time.monotonic() + 1.0 + 0.003 * n

    def target(i: int, progress) -> dict:
        plan = text.Plan(host, port, requests, conns[i], t0, 0.0, timeout, "burst")
        return text.run(plan, progress).to_wire()

    parts = run_processes(target, procs, label="burst", t0=t0, warmup=0.0, duration=timeout,
                          console=console)
    out = merge_results(parts, timeout)
    lat = out["latency_ms"]
    return {"requests": n, "answered": out["requests"], "errors": out["errors"],
            "statuses": out["statuses"], "latency_ms": lat,
            "all_answered_in_ms": lat.get("max"),
            "ok": out["requests"] == n and out["error_count"] == 0}
