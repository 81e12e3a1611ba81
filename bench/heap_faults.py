"""Page faults and CPU a file of the HTTP processes and the compute workers, with the freed
heap kept for reuse (``malloc_keep_mb`` 128, the default) and without (0), alternated:
``shmmel bench audio --pace fast --phases files`` on a spawned instance, minor faults, CPU
and resident memory read from /proc/PID/stat before and after.

    python3 bench/heap_faults.py [--rounds 2] [--kind cpu] [--http 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_cpu import group_times
from compare_lib import Instance


def faults_rss(pids: list[int]) -> tuple[int, list[int]]:
    """Minor faults (summed) and resident MiB (each) of ``pids``."""
    faults, rss = 0, []
    for p in pids:
        x = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        faults += int(x[7])
        rss.append(int(x[21]) * os.sysconf("SC_PAGE_SIZE") >> 20)
    return faults, rss


def stat(pids: list[int]) -> tuple[int, list[int], float]:
    """Minor faults, resident MiB (each), CPU seconds (user + system) of ``pids``."""
    return (*faults_rss(pids), sum(group_times(pids)[:2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/heap_faults")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kind", default="cpu")
    ap.add_argument("--http", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--streams", type=int, default=8)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(a.rounds):
        for name, env in (("128", {}), ("0", {"SHMMEL_MALLOC_KEEP_MB": "0"})):
            with Instance(out, a.http, 16, a.workers, a.kind, env=env) as inst:
                st = inst.status()
                hp = [h["pid"] for h in st["http"]]
                wp = [w["pid"] for w in st["workers"] if w["kind"] == a.kind]
                c0, h0, w0 = inst.http_counts(), stat(hp), stat(wp)
                subprocess.run([sys.executable, "-m", "shmmel_cli.main", "bench", "audio",
                                "--url", inst.url, "--streams", str(a.streams), "--pace", "fast",
                                "--phases", "files", "-d", "6", "--warmup", "1", "--no-verify",
                                "--gpu-index", "-1", "--http-workers", str(a.http)],
                               capture_output=True, check=False)
                c1, h1, w1 = inst.http_counts(), stat(hp), stat(wp)
            n = max(1, sum(c1.values()) - sum(c0.values()))
            print(f"malloc_keep_mb {name}: {n} requests; HTTP faults/request "
                  f"{(h1[0] - h0[0]) / n:.0f}, CPU {(h1[2] - h0[2]) * 1e6 / n:.0f} us, RSS "
                  f"{h1[1]} MiB; workers faults/request {(w1[0] - w0[0]) / n:.0f}, CPU "
                  f"{(w1[2] - w0[2]) * 1e6 / n:.0f} us, RSS {w1[1]} MiB", flush=True)


if __name__ == "__main__":
    main()
