"""Check `shmmel bench text` against wrk: same server, same connections, same duration,
alternating runs; their throughputs must agree within 10 %.

    python bench/check_vs_wrk.py --spawn --workers 4 --http-workers 4 --connections 100 \
        --duration 5 --rounds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from shmmel.loadgen import targets
from shmmel.loadgen.runner import default_procs
from shmmel.loadgen.text import build_requests
from shmmel.loadgen.textload import TextLoad, host_port, run_text

LUA = Path(__file__).with_name("wrk_process.lua")


def run_wrk(url: str, body: str, threads: int, conns: int, seconds: float) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not on PATH (apt-get install wrk, or .device/setup)")
    cmd = [wrk, f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(LUA),
           url + "/process"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BODY": body},
                          timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s*([\d.]+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", proc.stdout)
    errors = re.search(r"Socket errors:.*", proc.stdout)
    return {"req_per_s": float(m.group(1)), "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(0) if errors else None, "cmd": " ".join(cmd),
            "stdout": proc.stdout}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--spawn", action="store_true")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--http-workers", type=int, default=None)
    ap.add_argument("--worker-kind", default="cpu")
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--wrk-threads", type=int, default=4)
    ap.add_argument("--procs", type=int, default=None)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    if not a.url and not a.spawn:
        ap.error("give --url or --spawn")
    flags = {"workers": a.workers, "worker_kind": a.worker_kind}
    if a.http_workers:
        flags["http_workers"] = a.http_workers
    procs = a.procs or default_procs(a.connections)
    ctx = targets.spawned(flags) if a.spawn else None
    target = ctx.__enter__() if ctx else targets.Target(a.url)
    try:
        host, port = host_port(target.url)
        req = build_requests(f"{host}:{port}", [256], ["reverse"], count=1)[0]
        body = req.split(b"\r\n\r\n", 1)[1].decode()
        load = TextLoad(connections=a.connections, duration=a.duration, warmup=0.0,
                        sizes=(256,), procs=procs, timing_fraction=0)
        run_wrk(target.url, body, a.wrk_threads, a.connections, 2)  # warm-up, discarded
        rounds = []
        for i in range(a.rounds):  # alternate who goes first
            if i % 2:
                ours = run_text(target.url, load, label=f"round {i + 1}")
            w = run_wrk(target.url, body, a.wrk_threads, a.connections, a.duration)
            if not i % 2:
                ours = run_text(target.url, load, label=f"round {i + 1}")
            rounds.append({"wrk": w["req_per_s"], "wrk_non_2xx": w["non_2xx"],
                           "wrk_socket_errors": w["socket_errors"],
                           "shmmel_bench": ours["throughput"]["total_per_s"],
                           "shmmel_bench_errors": ours["error_count"]})
            print(f"round {i + 1}: wrk {w['req_per_s']:,.0f} req/s, shmmel bench "
                  f"{ours['throughput']['total_per_s']:,.0f} req/s", flush=True)
    finally:
        if ctx:
            ctx.__exit__(*sys.exc_info())
    wrk_mean = statistics.fmean(r["wrk"] for r in rounds)
    ours_mean = statistics.fmean(r["shmmel_bench"] for r in rounds)
    diff = (ours_mean - wrk_mean) / wrk_mean
    result = {"target": target.url, "workers": a.workers, "http_workers": target.http_workers,
              "worker_kind": target.worker_kind, "connections": a.connections,
              "wrk_threads": a.wrk_threads, "bench_procs": procs, "duration_s": a.duration,
              "rounds": rounds, "wrk_mean": round(wrk_mean, 1),
              "shmmel_bench_mean": round(ours_mean, 1), "difference": round(diff, 4),
              "agree_within_10pct": abs(diff) <= 0.10, "wrk_cmd": w["cmd"]}
    print(json.dumps(result, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["agree_within_10pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
