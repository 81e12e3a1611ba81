"""Latency histograms: one HdrHistogram per process and per figure, merged in the parent.

Values are microseconds (1 µs .. 100 s, 3 significant digits). A process ships its
histograms as HdrHistogram's compressed encoding; the parent adds them with
``decode_and_add``, which keeps every recorded value (no averaging of percentiles).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, DIGITS = 1, 100_000_000, 3
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def new_hist() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def record_s(h: HdrHistogram, seconds: float) -> None:
    """Record a duration given in seconds (clamped into the histogram's range)."""
    h.record_value(min(HIGHEST_US, max(LOWEST_US, round(seconds * 1e6))))


def encode(h: HdrHistogram) -> str:
    return h.encode().decode("ascii")


def merge(encoded: Iterable[str]) -> HdrHistogram:
    out = new_hist()
    for e in encoded:
        if e:
            out.decode_and_add(e.encode("ascii"))
    return out


def key(p: float) -> str:
    """50 -> "p50", 99.9 -> "p99.9"."""
    return f"p{p:g}"


def summary_ms(h: HdrHistogram) -> dict[str, float | int]:
    """count, min, p50 .. p99.9, max and mean in milliseconds (empty histogram: count 0)."""
    n = h.get_total_count()
    if n == 0:
        return {"count": 0}
    out: dict[str, float | int] = {"count": n, "min": h.get_min_value() / 1e3}
    for p in PERCENTILES:
        out[key(p)] = h.get_value_at_percentile(p) / 1e3
    out["max"] = h.get_max_value() / 1e3
    out["mean"] = round(h.get_mean_value() / 1e3, 4)
    return out


def hgrm_text(h: HdrHistogram) -> str:
    """The classic .hgrm percentile distribution (values in milliseconds), as plotted by
    HdrHistogram's plotFiles.html."""
    buf = io.BytesIO()
    h.output_percentile_distribution(buf, 1000.0)
    return buf.getvalue().decode()
