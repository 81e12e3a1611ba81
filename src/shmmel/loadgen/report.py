"""Targets, the final rich tables, and the exports (.hgrm, PNG percentile plot)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from rich.table import Table
from rich.text import Text

from .hist import hgrm_text


@dataclass(frozen=True)
class Check:
    figure: str
    value: float | None
    unit: str
    target: str
    met: bool | None      # None: not measured in this run / not applicable


def _lt(figure: str, value: float | None, limit: float, unit: str = "ms") -> Check:
    return Check(figure, value, unit, f"< {limit:g} {unit}",
                 None if value is None else value < limit)


def _ge(figure: str, value: float | None, limit: float, unit: str) -> Check:
    return Check(figure, value, unit, f"≥ {limit:,.0f} {unit}",
                 None if value is None else value >= limit)


def text_checks(r: dict, workers: int | None) -> list[Check]:
    lat = r["latency_ms"]
    out = [_lt("latency p50", lat.get("p50"), 5), _lt("latency p95", lat.get("p95"), 15),
           _lt("latency p99", lat.get("p99"), 25)]
    tput = r["throughput"]["mean"]
    if workers:
        need = 2500 * workers
        out.append(Check("throughput (mean of 1 s intervals)", tput, "req/s",
                         f"≥ {need:,} req/s ({workers} workers; 10k@4, 20k@8)",
                         tput >= need if r["load"]["mode"] == "closed" else None))
    conns = r["load"]["connections"]
    # a target about 100 clients says nothing about a run that chose fewer: n/a, not missed
    out.append(Check("concurrent clients", conns, "conns", "≥ 100",
                     True if conns >= 100 else None))
    out.append(Check("errors", r["error_count"], "", "0", r["error_count"] == 0))
    comp = r.get("components_ms") or {}
    if "ipc" in comp:
        out.append(_lt("IPC round trip p50 (Server-Timing ipc)", comp["ipc"].get("p50"), 1))
    if "queue" in comp:
        out.append(_lt("queue (semaphore) wait p95", comp["queue"].get("p95"), 0.1))
    if "burst" in r:
        b = r["burst"]
        out.append(Check(f"burst of {b['requests']:,}: answered, no error", b["answered"], "req",
                         f"{b['requests']:,}, 0 errors", b["ok"]))
    return out


def audio_checks(r: dict) -> list[Check]:
    out = []
    if "chunks" in r:
        c = r["chunks"]
        out += [_lt("first chunk p95", c["first_chunk_ms"].get("p95"), 50),
                _lt("per-chunk p50", c["chunk_ms"].get("p50"), 10),
                _lt("per-chunk p95", c["chunk_ms"].get("p95"), 20),
                _lt("per-chunk p99", c["chunk_ms"].get("p99"), 30)]
        ok = c["error_count"] == 0 and c["chunks"] > 0
        streams = r["load"]["streams"]
        out.append(Check("concurrent streams (no error)", streams, "streams", "≥ 8",
                         ok if streams >= 8 else None))
    if "files" in r:
        f = r["files"]
        secs = r["load"]["file_s"]
        e2e = _lt(f"{secs:g} s file end to end p95", f["file_ms"].get("p95"), 100)
        out.append(e2e if secs == 10 else Check(e2e.figure, e2e.value, "ms",
                                                 "< 100 ms (for 10 s files)", None))
        out.append(Check("real-time factor (median)", f["rtf"]["p50"], "×", "> 10×",
                         None if f["rtf"]["p50"] is None else f["rtf"]["p50"] > 10))
        out.append(_ge("audio seconds per second", f["audio_s_per_s"]["total"], 480, "s/s"))
    if "mel_check" in r:
        m = r["mel_check"]
        out.append(Check(f"mel = log_mel_spectrogram ({m['files']} files)", m["max_abs_diff"],
                         "max |Δ|", "≤ 1e-3", m["ok"]))
    out.append(Check("errors", r["error_count"], "", "0", r["error_count"] == 0))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if v and abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def checks_table(title: str, checks: list[Check]) -> Table:
    t = Table("figure", "value", "target", "", title=title, title_justify="left")
    t.columns[1].no_wrap = True
    for c in checks:
        mark = {True: Text("met", "green"), False: Text("missed", "red"),
                None: Text("n/a", "dim")}[c.met]
        t.add_row(c.figure, f"{_fmt(c.value)} {c.unit}".strip(), c.target, mark)
    return t


def latency_table(title: str, rows: dict[str, dict]) -> Table:
    cols = ["count", "min", "p50", "p90", "p95", "p99", "p99.9", "max"]
    t = Table("ms", *cols, title=title, title_justify="left")
    t.columns[0].no_wrap = True
    for name, s in rows.items():
        t.add_row(name, *(_fmt(s.get(k)) for k in cols))
    return t


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def checks_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


def write_hgrm(path: str | Path, hist: HdrHistogram) -> None:
    Path(path).write_text(hgrm_text(hist))


PLOT_PERCENTILES = (0, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999)


def write_plot(path: str | Path, series: dict[str, HdrHistogram], title: str) -> str | None:
    """A percentile plot (log x axis of 1/(1-p), like HdrHistogram's plotter). Returns a
    message instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'shmmel[bench]'): no PNG written"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, h in series.items():
        if h.get_total_count() == 0:
            continue
        xs = [1 / (1 - p / 100) for p in PLOT_PERCENTILES]
        ys = [h.get_value_at_percentile(p) / 1e3 for p in PLOT_PERCENTILES]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ticks = [1 / (1 - p / 100) for p in (0, 90, 99, 99.9, 99.99, 99.999)]
    ax.set_xticks(ticks, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
