"""The ``switch`` item of bench/compare.py: the HTTP processes' GIL switch interval
(``http_switch_interval_us``) against Python's stock 5 ms, on shmmel and on the bare app.

Four servers up at once (shmmel at 200 µs, the default on a host of 4 or more cores;
shmmel at 0 = Python's 5 ms, the default on a smaller one; the bare app stock and at 200 µs), ``--reps`` rounds of one
``/process`` run each at ``--conns``, the order rotating every round, for each of
``--configs``; each shmmel run as a ratio to both bare runs of its round.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_lib import Instance, bare, process_wrk, rotating, summary_runs  # noqa: E402

from shmmel.config import SPARE_CORES_MIN, default_switch_interval_us  # noqa: E402


def item_switch(a, out: Path) -> dict:
    us = default_switch_interval_us(SPARE_CORES_MIN)  # the short interval, set on both
    res: dict = {"interval_us": us, "configs": []}
    for http, workers in a.configs:
        with Instance(out, http, a.threads, workers, a.kind,
                      env={"SHMMEL_HTTP_SWITCH_INTERVAL_US": str(us)}) as short, \
                Instance(out, http, a.threads, workers, a.kind,
                         env={"SHMMEL_HTTP_SWITCH_INTERVAL_US": "0"}, tag="w") as stock, \
                bare(out, http, a.threads, switch_us=0) as b0, \
                bare(out, http, a.threads, switch_us=us) as b1:
            urls = {"shmmel": short.url, "shmmel_5ms": stock.url, "bare_5ms": b0.url,
                    "bare": b1.url}
            for who, url in urls.items():
                process_wrk(url, a.conns, 1, f"switch {who} warm-up", out)
            def run(who: str, i: int, urls: dict = urls, tag: str = f"h{http} w{workers}") -> dict:
                return process_wrk(urls[who], a.conns, a.dur, f"switch {tag} {who} #{i + 1}", out)
            runs = rotating(list(urls), a.reps, run)
            row: dict = {"http_workers": http, "workers": workers, "conns": a.conns}
            row.update((who, summary_runs(rs)) for who, rs in runs.items())
            for mine in ("shmmel", "shmmel_5ms"):
                for anchor in ("bare", "bare_5ms"):
                    row[f"{mine}/{anchor}"] = {
                        "rps": [round(x["rps"] / y["rps"], 3) for x, y in zip(runs[mine], runs[anchor])],
                        "p99": [round(x["p99_ms"] / y["p99_ms"], 3) for x, y in zip(runs[mine], runs[anchor])]}
        row["health"] = {"shmmel": short.health, "shmmel_5ms": stock.health}
        res["configs"].append(row)
    return res
