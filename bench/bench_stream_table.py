"""Stream opens and lookups per second: the stream table now against an older revision's.

``--procs`` processes x ``--threads`` threads each open a stream, look it up by its id (as a
session chunk does, from any process) and free it, as fast as they can, for ``--seconds``;
the old table (``git show REV:src/shmmel/stream_table.py``; by default the last revision
whose opens and lookups took the instance's ``fcntl`` lock) and the current one alternate
``--reps`` times over the same shared memory. Prints cycles per second and the per-cycle
p50/p99 of each, and the ratio new / old of each round.

    python bench/bench_stream_table.py --procs 2 --threads 4 --seconds 2 --reps 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import numpy as np

from shmmel import layout as L
from shmmel.channel import claim_row
from shmmel.config import Config
from shmmel.shm import Shm
from shmmel.stream_table import StreamTable

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "0f964eb"  # before issue 12's stream table: allocate and find under the fcntl lock


def old_table_class(rev: str):
    """The StreamTable class of ``rev`` (a git revision, or a file holding its source)."""
    if Path(rev).is_file():  # where there is no git (a copy of the tree)
        src = Path(rev).read_text()
    else:
        src = subprocess.run(["git", "-C", str(ROOT), "show",
                              f"{rev}:src/shmmel/stream_table.py"],
                             capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("shmmel._old_stream_table")
    mod.__package__ = "shmmel"
    sys.modules[mod.__name__] = mod  # for its dataclass
    exec(compile(src, f"{rev}:stream_table.py", "exec"), mod.__dict__)  # noqa: S102
    return mod.StreamTable


def run_proc(instance: str, which: str, rev: str, threads: int, seconds: float, q) -> None:
    shm = Shm.attach(instance)
    row = claim_row(shm)
    pid = os.getpid()
    if which == "old":
        table = old_table_class(rev)(shm)
        table.t = shm.streams[: int(shm.header["max_streams"])]  # its layout's table size
        lookup = lambda sid: table.find(sid, pid, 60.0)  # noqa: E731
    else:
        table = StreamTable(shm, row)
        lookup = lambda sid: table.find(sid, 60.0)  # noqa: E731
    choose = lambda t: (0, 1)  # noqa: E731
    counts, lat = [0] * threads, [[] for _ in range(threads)]
    start = time.monotonic() + 0.2
    stop = start + seconds

    def loop(i: int) -> None:
        while time.monotonic() < start:
            time.sleep(0.001)
        while True:
            if time.monotonic() >= stop:
                break
            t0 = time.perf_counter()
            h = table.allocate(80, 0, choose, pid)  # as POST /audio/streams: open, release
            table.release(h)
            found = lookup(h.stream_id)  # as a chunk: look up, (push), release
            table.release(found)
            table.free(h.index)  # as the worker when the stream ends
            lat[i].append(time.perf_counter() - t0)
            counts[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    shm.http["pid"][row] = 0
    q.put((sum(counts), np.concatenate([np.array(x) for x in lat]) * 1e6))
    shm.close()


def one(instance: str, which: str, a) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=run_proc, args=(instance, which, a.rev, a.threads, a.seconds, q))
          for _ in range(a.procs)]
    for p in ps:
        p.start()
    got = [q.get(timeout=a.seconds + 60) for _ in ps]
    for p in ps:
        p.join()
    n = sum(g[0] for g in got)
    us = np.concatenate([g[1] for g in got])
    return {"cycles_per_s": n / a.seconds, "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rev", default=OLD_REV,
                    help="the old table: a git revision, or a file with its stream_table.py")
    a = ap.parse_args(argv)
    config = Config(instance=f"bst{uuid.uuid4().hex[:8]}", workers=2, slots=32,
                    slot_bytes=16 * 1024, max_streams=1024, http_workers=max(1, a.procs))
    shm = Shm.create(config)
    try:
        shm.workers["gen"][0] = 1
        shm.workers["state"][0] = L.W_READY
        print(f"{a.procs} processes x {a.threads} threads, open + lookup + close, "
              f"{a.seconds:g} s a run; old = {a.rev}")
        ratios = []
        for rep in range(a.reps):
            res = {}
            for which in ("old", "new"):
                shm.streams["state"] = L.ST_FREE
                res[which] = r = one(config.instance, which, a)
                print(f"  #{rep + 1} {which}: {r['cycles_per_s']:,.0f} cycles/s, "
                      f"p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us", flush=True)
            ratios.append(res["new"]["cycles_per_s"] / res["old"]["cycles_per_s"])
            print(f"  #{rep + 1} new / old: {ratios[-1]:.2f}x")
        print(f"new / old cycles/s: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(mean {np.mean(ratios):.2f}, spread {min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        shm.close()
        shm.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
