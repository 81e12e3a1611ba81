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
from compare_lib import Instance, bare, process_wrk  # noqa: E402

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
            servers = [("shmmel", short.url), ("shmmel_5ms", stock.url), ("bare_5ms", b0.url),
                       ("bare", b1.url)]
            for who, url in servers:
                process_wrk(url, a.conns, 1, f"switch {who} warm-up", out)
            runs: dict = {who: [] for who, _ in servers}
            for i in range(a.reps):
                k = i % len(servers)
                for who, url in servers[k:] + servers[:k]:
                    runs[who].append(process_wrk(url, a.conns, a.dur,
                                                 f"switch h{http} w{workers} {who} #{i + 1}", out))
            row: dict = {"http_workers": http, "workers": workers, "conns": a.conns}
            for who, rs in runs.items():
                row[who] = {"rps": [r["rps"] for r in rs], "p99_ms": [r["p99_ms"] for r in rs],
                            "p50_ms": [r["p50_ms"] for r in rs],
                            "non_2xx": sum(r["non_2xx"] for r in rs),
                            "timeouts": sum(r["timeouts"] for r in rs)}
            for mine in ("shmmel", "shmmel_5ms"):
                for anchor in ("bare", "bare_5ms"):
                    row[f"{mine}/{anchor}"] = {
                        "rps": [round(x["rps"] / y["rps"], 3) for x, y in zip(runs[mine], runs[anchor])],
                        "p99": [round(x["p99_ms"] / y["p99_ms"], 3) for x, y in zip(runs[mine], runs[anchor])]}
        row["health"] = {"shmmel": short.health, "shmmel_5ms": stock.health}
        res["configs"].append(row)
    return res
