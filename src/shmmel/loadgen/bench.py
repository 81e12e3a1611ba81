"""The benches as library calls: pick the target, run the load, add the baseline, sweep.

``text_bench`` and ``audio_bench`` return plain data (what ``--json`` prints) plus the merged
HdrHistograms under ``hists`` for the .hgrm and PNG exports.
"""

from __future__ import annotations

import contextlib
import platform
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from . import report, targets
from .audioload import AudioLoad, run_audio
from .textload import TextLoad, run_burst, run_text


@dataclass(frozen=True)
class Source:
    """Where the load goes: ``url``, else ``spawn`` (config flags: a fresh instance, stopped
    afterwards), else the running ``instance``."""

    url: str | None = None
    instance: str = "default"
    spawn: dict[str, Any] | None = None
    log_dir: str | None = None
    http_workers: int | None = None     # for the baseline when the target is a bare URL
    http_threads: int = 16
    config_file: str | None = None      # spawn: settings of the spawned instance
    token: str = field(default="", repr=False)  # auth_token of the url / instance


@contextlib.contextmanager
def open_target(src: Source, **overrides: Any) -> Iterator[targets.Target]:
    if src.url:
        t = targets.Target(src.url, None, src.http_workers or 2, src.http_threads,
                           token=src.token)
    elif src.spawn is not None:
        with targets.spawned({**src.spawn, **overrides}, src.log_dir, src.config_file) as t:
            yield t
        return
    else:
        d = targets.describe(src.instance)
        t = targets.Target(d.url, d.instance, src.http_workers or d.http_workers,
                           src.http_threads, d.workers, d.worker_kind, token=src.token)
    targets.check_reachable(t)
    yield t


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    """"workers=1,2,4,8" -> ("workers", [1, 2, 4, 8])."""
    name, _, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    try:
        vals = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not name or not vals:
        raise ValueError(f"--sweep wants NAME=V1,V2,..., e.g. workers=1,2,4,8; got {spec!r}")
    return name, vals


def host_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


@dataclass
class Outcome:
    data: dict[str, Any]
    hists: dict[str, Any] = field(default_factory=dict)
    checks: list[report.Check] = field(default_factory=list)


def _strip(r: dict, hists: dict, prefix: str) -> dict:
    h = r.pop("_hist", None)
    if h is not None:
        hists[prefix] = h
    for phase in ("chunks", "files"):
        if phase in r:
            for name, hh in r[phase].pop("_hists", {}).items():
                hists[f"{prefix} {name}"] = hh
    return r


def text_bench(src: Source, load: TextLoad, *, burst: int = 0, baseline: bool = False,
               console: Console | None = None) -> Outcome:
    hists: dict[str, Any] = {}
    with open_target(src) as t:
        ours = _strip(run_text(t.url, load, label="shmmel", console=console, token=t.token),
                      hists, "shmmel")
        if burst:
            ours["burst"] = run_burst(t.url, burst, load.procs, console=console, token=t.token)
    data: dict[str, Any] = {"bench": "text", "host": host_info(), "target": t.as_json(),
                            "shmmel": ours}
    if baseline:
        with targets.baseline(t.http_workers, t.http_threads) as b:
            bare = _strip(run_text(b.url, load, label="baseline", console=console), hists,
                          "baseline")
        data["baseline"] = {"target": b.as_json(), **bare}
        data["vs_baseline"] = {
            "throughput": report.ratio(ours["throughput"]["mean"], bare["throughput"]["mean"]),
            **{f"latency {p}": report.ratio(ours["latency_ms"].get(p), bare["latency_ms"].get(p))
               for p in ("p50", "p99")}}
    checks = report.text_checks(ours, t.workers)
    data["checks"] = report.checks_json(checks)
    return Outcome(data, hists, checks)


def audio_bench(src: Source, load: AudioLoad, *, baseline: bool = False,
                gpu_index: int | None = 0, console: Console | None = None) -> Outcome:
    hists: dict[str, Any] = {}
    with open_target(src) as t:
        ours = _strip(run_audio(t.url, load, label="shmmel", console=console,
                                gpu_index=gpu_index, token=t.token), hists, "shmmel")
    data: dict[str, Any] = {"bench": "audio", "host": host_info(), "target": t.as_json(),
                            "shmmel": ours}
    if baseline:
        bare_load = AudioLoad(**{**asdict(load), "bare": True, "verify": False})
        with targets.baseline(t.http_workers, t.http_threads) as b:
            bare = _strip(run_audio(b.url, bare_load, label="baseline", console=console,
                                    gpu_index=None), hists, "baseline")
        data["baseline"] = {"target": b.as_json(), **bare}
        vs: dict[str, Any] = {}
        if "chunks" in ours:
            for p in ("p50", "p99"):
                vs[f"chunk latency {p}"] = report.ratio(ours["chunks"]["chunk_ms"].get(p),
                                                        bare["chunks"]["chunk_ms"].get(p))
        if "files" in ours:
            vs["file throughput"] = report.ratio(ours["files"]["audio_s_per_s"]["total"],
                                                 bare["files"]["audio_s_per_s"]["total"])
            vs["file latency p50"] = report.ratio(ours["files"]["file_ms"].get("p50"),
                                                  bare["files"]["file_ms"].get("p50"))
        data["vs_baseline"] = vs
    checks = report.audio_checks(ours)
    data["checks"] = report.checks_json(checks)
    return Outcome(data, hists, checks)


def sweep(kind: str, src: Source, name: str, values: list[int], load: TextLoad | AudioLoad,
          console: Console | None = None, gpu_index: int | None = 0) -> list[dict[str, Any]]:
    """One spawned instance per value of setting ``name``; a row of figures per point."""
    rows = []
    base = src.spawn or {}
    for v in values:
        point = Source(spawn={**base, name: v}, log_dir=src.log_dir,
                       config_file=src.config_file)
        if kind == "text":
            r = text_bench(point, load, console=console).data["shmmel"]  # type: ignore[arg-type]
            rows.append({name: v, "req_per_s": r["throughput"]["mean"],
                         "stdev": r["throughput"]["stdev"],
                         "p50_ms": r["latency_ms"].get("p50"),
                         "p99_ms": r["latency_ms"].get("p99"), "errors": r["error_count"]})
        else:
            r = audio_bench(point, load, gpu_index=gpu_index,  # type: ignore[arg-type]
                            console=console).data["shmmel"]
            row: dict[str, Any] = {name: v, "errors": r["error_count"]}
            if "files" in r:
                row.update(rtf_p50=r["files"]["rtf"]["p50"],
                           audio_s_per_s=r["files"]["audio_s_per_s"]["total"],
                           file_p50_ms=r["files"]["file_ms"].get("p50"))
            if "chunks" in r:
                row.update(chunk_p99_ms=r["chunks"]["chunk_ms"].get("p99"))
            rows.append(row)
    return rows
