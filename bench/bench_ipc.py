"""Bare IPC round trip: enqueue -> worker -> reply, no HTTP.

Creates a private instance (shared memory + semaphores), forks real shmmel workers (the same
``worker_main`` the supervisor runs, NumPy engine), then P producer processes each run
sequential OP_PING round trips with a small payload and record latencies in HdrHistogram;
the histograms are merged. A raw two-semaphore ping-pong between two processes is measured
first, as the floor any design built on these semaphores can reach.

    python bench/bench_ipc.py --producers 1 8 --seconds 5 --workers 2 --spin-us 0 100 \
        --reply-spin-us 0 50

``--spin-us``: the workers' ``worker_spin_us`` (poll for more work after serving);
``--reply-spin-us``: the producers' poll for the reply before sleeping on its semaphore
(``Producer(reply_spin=...)``, default ``channel.REPLY_SPIN``). Both poll only on a host
with cores to spare (``channel.spare_cores``: 4 or more, runnable threads under three
quarters of them), so on a small or busy host every case runs without polling.

Besides the latencies each case reports ``per_batch`` (requests per worker scan), the CPU
time per round trip of the workers (``worker_cpu_us``, from /proc, spinning included) and of
the producers (``producer_cpu_us``, polling and the histogram included), and their sleeps
per round trip (``worker_sleeps``, ``producer_sleeps``: voluntary context switches; near 0
where the polls catch the posts, about 1 where every request sleeps on a semaphore). On a
host where the workers are the bottleneck (8 producers, 2 workers) their CPU per round trip
sets the queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import sys
import time
import uuid

import posix_ipc
from hdrh.histogram import HdrHistogram

from shmmel import layout as L
from shmmel.channel import REPLY_SPIN, Producer
from shmmel.config import Config
from shmmel.shm import Shm, unlink_instance
from shmmel.worker import worker_main

US = 1_000  # histogram unit: nanoseconds


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, 10_000_000_000, 3)


def summarise(h: HdrHistogram, seconds: float) -> dict[str, float]:
    return {
        "count": h.get_total_count(),
        "per_s": round(h.get_total_count() / seconds),
        "p50_us": h.get_value_at_percentile(50) / US,
        "p90_us": h.get_value_at_percentile(90) / US,
        "p99_us": h.get_value_at_percentile(99) / US,
        "p999_us": h.get_value_at_percentile(99.9) / US,
        "max_us": h.get_max_value() / US,
    }


def sem_pingpong(seconds: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:8]
    a = posix_ipc.Semaphore(f"/shmmel-bench-{tag}-a", posix_ipc.O_CREX, initial_value=0)
    b = posix_ipc.Semaphore(f"/shmmel-bench-{tag}-b", posix_ipc.O_CREX, initial_value=0)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    a.acquire()
                    b.release()
            finally:
                os._exit(0)
        h = new_hist()
        end = time.perf_counter() + seconds
        t_start = time.perf_counter()
        while True:
            t0 = time.perf_counter_ns()
            a.release()
            b.acquire()
            h.record_value(max(1, time.perf_counter_ns() - t0))
            if time.perf_counter() > end:
                break
        elapsed = time.perf_counter() - t_start
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return summarise(h, elapsed)
    finally:
        for s in (a, b):
            s.unlink()
            s.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (clock ticks, from /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sleeps(pid: int) -> int:
    """Voluntary context switches of process ``pid`` so far (from /proc)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def producer(instance: str, seconds: float, payload: bytes, wfd: int,
             reply_spin: float) -> None:
    shm = Shm.attach(instance)
    prod = Producer(shm, queue_depth=1 << 16, reply_spin=reply_spin)
    h = new_hist()
    for _ in range(200):  # warm-up
        prod.call(L.OP_PING, payload, timeout=5)
    end = time.perf_counter() + seconds
    t_start = time.perf_counter()
    cpu0, csw0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    while True:
        t0 = time.perf_counter_ns()
        prod.call(L.OP_PING, payload, timeout=5)
        h.record_value(max(1, time.perf_counter_ns() - t0))
        if time.perf_counter() > end:
            break
    elapsed = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    csw = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - csw0
    os.write(wfd, (json.dumps({"hist": h.encode().decode(), "elapsed": elapsed, "cpu": cpu,
                               "csw": csw}) + "\n").encode())


def channel_round_trip(n_producers: int, seconds: float, workers: int,
                       payload_bytes: int, spin_us: int, reply_spin_us: int) -> dict[str, float]:
    config = Config(instance=f"bench{uuid.uuid4().hex[:8]}", workers=workers, slots=128,
                    worker_kind="cpu", worker_spin_us=spin_us, whisper_workers=0)
    shm = Shm.create(config)
    pids: list[int] = []
    try:
        parent = os.getpid()
        for k in range(workers):
            shm.workers["gen"][k] = 1
            shm.workers["state"][k] = L.W_BOOTING
            pid = os.fork()
            if pid == 0:
                worker_main(config, shm, k, 1, parent)
            pids.append(pid)
        deadline = time.monotonic() + 30
        while (shm.workers["state"] != L.W_READY).any():
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not boot")
            time.sleep(0.01)
        r, w = os.pipe()
        prods = []
        served0 = int(shm.workers["served"].sum())
        batches0 = int(shm.workers["batches"].sum())
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        csw0 = sum(sleeps(pid) for pid in pids)
        payload = os.urandom(payload_bytes)
        for _ in range(n_producers):
            pid = os.fork()
            if pid == 0:
                try:
                    producer(config.instance, seconds, payload, w, reply_spin_us / 1e6)
                finally:
                    os._exit(0)
            prods.append(pid)
        os.close(w)
        for pid in prods:
            os.waitpid(pid, 0)
        worker_cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
        worker_csw = sum(sleeps(pid) for pid in pids) - csw0
        with os.fdopen(r) as fh:
            lines = [json.loads(line) for line in fh]
        merged = new_hist()
        for line in lines:
            merged.decode_and_add(line["hist"])
        elapsed = max(line["elapsed"] for line in lines)
        out = summarise(merged, elapsed)
        # requests per worker batch (one scan's take) and CPU per round trip, warm-up included
        served = int(shm.workers["served"].sum()) - served0
        batches = int(shm.workers["batches"].sum()) - batches0
        out["per_batch"] = round(served / max(batches, 1), 2)
        out["worker_cpu_us"] = round(worker_cpu / max(served, 1) * 1e6, 2)
        out["producer_cpu_us"] = round(sum(line["cpu"] for line in lines)
                                       / max(out["count"], 1) * 1e6, 2)
        out["worker_sleeps"] = round(worker_csw / max(served, 1), 3)
        out["producer_sleeps"] = round(sum(line["csw"] for line in lines)
                                       / max(out["count"], 1), 3)
        return out
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
        shm.close()
        unlink_instance(config.instance)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--producers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--payload", type=int, default=64, help="bytes per request")
    ap.add_argument("--spin-us", type=int, nargs="+", default=[Config.worker_spin_us],
                    help="worker_spin_us values to compare")
    ap.add_argument("--reply-spin-us", type=int, nargs="+", default=[round(REPLY_SPIN * 1e6)],
                    help="the producers' reply poll (us) to compare")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "date": time.strftime("%Y-%m-%d"), "workers": args.workers,
               "payload": args.payload, "semaphore_pingpong": sem_pingpong(min(args.seconds, 3))}
    for spin in args.spin_us:
        for rspin in args.reply_spin_us:
            for p in args.producers:
                results[f"producers_{p} spin_{spin}us reply_spin_{rspin}us"] = \
                    channel_round_trip(p, args.seconds, args.workers, args.payload, spin, rspin)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"# IPC round trip, {results['date']}, {results['cpus']} CPUs, Python "
          f"{results['python']}, {args.workers} workers, {args.payload} B payload")
    print("| case | round trips/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | per batch "
          "| worker CPU µs | producer CPU µs | worker sleeps | producer sleeps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if isinstance(r, dict):
            print(f"| {key} | {r['per_s']:,} | {r['p50_us']:.1f} | {r['p90_us']:.1f} | "
                  f"{r['p99_us']:.1f} | {r['p999_us']:.1f} | {r['max_us']:.0f} | "
                  f"{r.get('per_batch', '')} | {r.get('worker_cpu_us', '')} | "
                  f"{r.get('producer_cpu_us', '')} | {r.get('worker_sleeps', '')} | "
                  f"{r.get('producer_sleeps', '')} |")


if __name__ == "__main__":
    main()
