"""Soak test: mixed text and audio load for a long time, watching every process's memory.

    python bench/soak.py                          # start a CPU instance, 600 s, 3 clients
    python bench/soak.py --duration 3600 --worker-kind cuda --clients 4
    python bench/soak.py --instance default       # target a running instance (not stopped)

Every ``--interval`` seconds it reads the pids from ``shmmel status --json`` (supervisor,
gunicorn arbiter, gunicorn workers, compute workers; a respawned process is a new series)
and samples, from /proc/<pid>: RSS (statm), and from /proc/<pid>/status RssAnon (heap and
other private memory: what a leak grows) and RssShmem (pages of the shared-memory segments
the process has touched: grows to the segments' size, then stays). With pynvml it also
samples GPU memory (the device, and per process where the driver reports it).

Writes ``<out>/samples.csv`` (one row per process per sample), ``<out>/summary.json``
(per process: RSS and RssAnon at the end of warm-up and at the end, growth in %, the
least-squares slope after warm-up; request counts, errors and latency percentiles) and,
with matplotlib, ``<out>/rss.png``. Exit status 1 when a process's RSS grew by more than
``--max-growth`` percent after warm-up, or requests failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the instance ------------------------------------------------------------------------

def shmmel_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "shmmel"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("shmmel")
    return [found] if found else [sys.executable, "-m", "shmmel_cli.main"]


def cli(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*shmmel_cmd(), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"shmmel {' '.join(args)} failed ({proc.returncode}): "
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def status(instance: str) -> dict:
    return json.loads(cli("status", "--instance", instance, "--json", timeout=30))


def roles(info: dict) -> dict[str, int]:
    """Process role -> pid, as the instance reports them now."""
    out = {"supervisor": info["pid"], "gunicorn": info["gunicorn_pid"]}
    for i, h in enumerate(sorted(info["http"], key=lambda h: h["pid"])):
        out[f"http{i}"] = h["pid"]
    for w in info["workers"]:
        if w["pid"]:
            out[f"worker{w['index']}"] = w["pid"]
    return out


def kill_leftovers(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- memory ------------------------------------------------------------------------------

def memory_kib(pid: int) -> dict[str, int] | None:
    """rss (statm), anon and shmem (status) in KiB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            rss = int(fh.read().split()[1]) * PAGE // 1024
        out = {"rss": rss, "anon": -1, "shmem": -1}
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    out["anon"] = int(line.split()[1])
                elif line.startswith("RssShmem:"):
                    out["shmem"] = int(line.split()[1])
        return out
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


class Gpu:
    """GPU memory through pynvml, where present; otherwise reports nothing."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                            for i in range(pynvml.nvmlDeviceGetCount())]
            self.name = ", ".join(str(pynvml.nvmlDeviceGetName(h)) for h in self.handles)
        except Exception:  # no pynvml, no driver, no GPU
            self.nvml, self.handles, self.name = None, [], "none"

    def sample(self) -> tuple[int, dict[int, int]]:
        """(MiB used on all devices, {pid: MiB} where the driver reports processes)."""
        if self.nvml is None:
            return -1, {}
        used, per_pid = 0, {}
        for h in self.handles:
            used += self.nvml.nvmlDeviceGetMemoryInfo(h).used >> 20
            with contextlib.suppress(Exception):
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.usedGpuMemory is not None:
                        per_pid[p.pid] = per_pid.get(p.pid, 0) + (p.usedGpuMemory >> 20)
        return used, per_pid


# -- load --------------------------------------------------------------------------------

@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, status: int | str, seconds: float, error: str | None = None) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1
            self.latencies.setdefault(kind, []).append(seconds)
            if error and len(self.errors) < 50:
                self.errors.append(f"{kind}: {error}")


def tone(seconds: float, rng: random.Random) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t)
    return (x * 32767).astype("<i2")


def wav_of(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    return buf.getvalue()


class Client(threading.Thread):
    """One closed-loop client: a text request or an audio request, then a short pause."""

    def __init__(self, n: int, host: str, port: int, stop: threading.Event, tally: Tally,
                 audio_share: float, think_s: float) -> None:
        super().__init__(name=f"soak-client-{n}", daemon=True)
        self.host, self.port, self.stop_ev, self.tally = host, port, stop, tally
        self.audio_share, self.think_s = audio_share, think_s
        self.rng = random.Random(n)
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def one(self, kind: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as exc:  # noqa: BLE001 - a soak counts every failure
            status, detail = "exc", f"{type(exc).__name__}: {exc}"
        ok = status in (200, 201)
        self.tally.add(kind, status, time.perf_counter() - t0, None if ok else str(detail)[:200])

    def text(self) -> tuple[int, bytes]:
        msg = "".join(self.rng.choice("abcdefgh éü€😀") for _ in range(self.rng.randint(0, 600)))
        op = self.rng.choice(["reverse", "upper", "prefix"])
        return self.request("POST", "/process", json.dumps({"message": msg, "op": op}).encode(),
                            {"Content-Type": "application/json"})

    def audio_whole(self) -> tuple[int, bytes]:
        x = tone(self.rng.uniform(0.2, 3.0), self.rng)
        fmt = self.rng.choice(["ndjson", "json", "npy", "binary"])
        n_mels = self.rng.choice([80, 128])
        if self.rng.random() < 0.5:
            body, ctype = wav_of(x), "audio/wav"
        else:
            body, ctype = x.tobytes(), "audio/L16;rate=16000"
        return self.request("POST", f"/audio/stream?format={fmt}&n_mels={n_mels}", body,
                            {"Content-Type": ctype})

    def audio_chunked(self) -> tuple[int, bytes]:
        x = tone(self.rng.uniform(0.5, 3.0), self.rng).tobytes()
        step = 32000 // 4  # 0.25 s pieces

        def pieces():
            for i in range(0, len(x), step):
                yield x[i : i + step]

        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", "/audio/stream?windows=" + self.rng.choice(["false", "true"]),
                         body=pieces(), headers={"Content-Type": "audio/L16;rate=16000"},
                         encode_chunked=True)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status == 200 and b'"error"' in data.rstrip(b"\n").rsplit(b"\n", 1)[-1]:
            return 599, data[-300:]  # an in-band error counts as a failure
        return resp.status, data[-300:]

    def audio_session(self) -> tuple[int, bytes]:
        status, body = self.request("POST", "/audio/streams?n_mels=80")
        if status != 201:
            return status, body
        sid = json.loads(body)["stream_id"]
        x = tone(self.rng.uniform(0.5, 2.0), self.rng).tobytes()
        pos = 0
        while pos < len(x):
            n = 2 * self.rng.randint(1, 8000)
            status, body = self.request("POST", f"/audio/streams/{sid}", x[pos : pos + n],
                                        {"Content-Type": "audio/L16;rate=16000"})
            if status != 200:
                self.request("DELETE", f"/audio/streams/{sid}")
                return status, body
            pos += n
        return self.request("DELETE", f"/audio/streams/{sid}")

    def run(self) -> None:
        while not self.stop_ev.is_set():
            if self.rng.random() < self.audio_share:
                kind = self.rng.choice(["audio_whole", "audio_whole", "audio_chunked",
                                        "audio_session"])
            else:
                kind = "text"
            self.one(kind, getattr(self, kind))
            self.stop_ev.wait(self.rng.expovariate(1 / self.think_s) if self.think_s else 0)
        if self.conn is not None:
            self.conn.close()


# -- the run -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 3:
        return math.nan
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else math.nan


def summarise(rows: list[dict], warmup: float, tally: Tally, args: argparse.Namespace,
              machine: dict, gpu_rows: list[dict]) -> dict:
    procs: dict[str, dict] = {}
    for key in sorted({(r["role"], r["pid"]) for r in rows}, key=lambda k: (k[0], k[1])):
        series = [r for r in rows if (r["role"], r["pid"]) == key]
        after = [r for r in series if r["t"] >= warmup] or series
        first, last = after[0], after[-1]
        # the end value is the mean of the last three samples (one noisy sample is not a trend)
        tail = after[-3:]
        end = {k: statistics.fmean(r[k] for r in tail) for k in ("rss", "anon", "shmem")}
        growth = {k: 100 * (end[k] - first[k]) / first[k] if first[k] > 0 else math.nan
                  for k in ("rss", "anon")}
        procs[f"{key[0]} ({key[1]})"] = {
            "role": key[0], "pid": key[1], "samples": len(series),
            "first_s": series[0]["t"], "last_s": series[-1]["t"],
            "rss_start_kib": first["rss"], "rss_end_kib": round(end["rss"]),
            "rss_peak_kib": max(r["rss"] for r in series),
            "anon_start_kib": first["anon"], "anon_end_kib": round(end["anon"]),
            "shmem_end_kib": round(end["shmem"]),
            "rss_growth_pct": round(growth["rss"], 2), "anon_growth_pct": round(growth["anon"], 2),
            "rss_slope_kib_per_h": round(slope_per_hour([r["t"] for r in after],
                                                         [r["rss"] for r in after]), 1),
        }
    lat = {k: {"n": len(v), "p50_ms": round(1e3 * percentile(v, 0.5), 2),
               "p99_ms": round(1e3 * percentile(v, 0.99), 2),
               "max_ms": round(1e3 * max(v), 2)} for k, v in tally.latencies.items()}
    failed = sum(n for k, n in tally.statuses.items() if k.split()[-1] not in ("200", "201"))
    worst = max((p["rss_growth_pct"] for p in procs.values()
                 if p["last_s"] - p["first_s"] >= 0.5 * args.duration), default=0.0)
    gpu = None
    if gpu_rows:
        after = [g for g in gpu_rows if g["t"] >= warmup] or gpu_rows
        gpu = {"device_used_mib_start": after[0]["used_mib"],
               "device_used_mib_end": after[-1]["used_mib"]}
    return {"machine": machine, "args": vars(args), "warmup_s": warmup,
            "processes": procs, "gpu": gpu, "requests": dict(tally.statuses),
            "failed_requests": failed, "first_errors": tally.errors[:20], "latency": lat,
            "worst_rss_growth_pct": worst,
            "pass": worst < args.max_growth and failed == 0}


def plot(rows: list[dict], warmup: float, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key in sorted({(r["role"], r["pid"]) for r in rows}):
        series = [r for r in rows if (r["role"], r["pid"]) == key]
        ts = [r["t"] / 60 for r in series]
        ax1.plot(ts, [r["rss"] / 1024 for r in series], label=f"{key[0]} ({key[1]})")
        ax2.plot(ts, [r["anon"] / 1024 for r in series], label=f"{key[0]}")
    for ax, what in ((ax1, "RSS (MiB)"), (ax2, "RssAnon (MiB)")):
        ax.axvline(warmup / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    ax2.set_xlabel("minutes (dotted: end of warm-up)")
    ax1.legend(fontsize=7, ncol=2, loc="center right")
    ax1.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    p.add_argument("--warmup", type=float, default=60,
                   help="seconds excluded from the growth figures (60)")
    p.add_argument("--interval", type=float, default=5, help="seconds between samples (5)")
    p.add_argument("--clients", type=int, default=3, help="concurrent closed-loop clients (3)")
    p.add_argument("--audio-share", type=float, default=0.4,
                   help="fraction of requests that are audio (0.4)")
    p.add_argument("--think", type=float, default=0.02,
                   help="mean pause between a client's requests, s (0.02)")
    p.add_argument("--instance", help="target this running instance instead of starting one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--http-workers", type=int, default=2)
    p.add_argument("--worker-kind", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-growth", type=float, default=5.0,
                   help="fail when a process's RSS grew more than this %% after warm-up (5)")
    p.add_argument("--label", default="", help="machine label for the report")
    p.add_argument("--out", default="soak-out", help="output directory (soak-out)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    own = args.instance is None
    instance = args.instance or f"soak{uuid.uuid4().hex[:8]}"
    seen: set[int] = set()
    stop = threading.Event()
    tally = Tally()
    rows: list[dict] = []
    gpu_rows: list[dict] = []
    gpu = Gpu()
    machine = {"label": args.label, "cpus": os.cpu_count(), "gpu": gpu.name,
               "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    clients: list[Client] = []
    try:
        if own:
            cli("up", "--instance", instance, "--port", "0", "--workers", str(args.workers),
                "--http-workers", str(args.http_workers), "--worker-kind", args.worker_kind)
        info = status(instance)
        seen |= set(roles(info).values())
        host, port = info["url"].split("//", 1)[1].rsplit(":", 1)
        print(f"soak: instance {instance} at {info['url']}, {args.clients} clients, "
              f"{args.duration:g} s, sampling every {args.interval:g} s -> {out}", flush=True)
        clients = [Client(i, host.strip("[]"), int(port), stop, tally, args.audio_share,
                          args.think) for i in range(args.clients)]
        t0 = time.monotonic()
        for c in clients:
            c.start()
        next_print = 0.0
        while (t := time.monotonic() - t0) < args.duration:
            info = status(instance)
            pids = roles(info)
            seen |= set(pids.values())
            used, per_pid = gpu.sample()
            if used >= 0:
                gpu_rows.append({"t": round(t, 2), "used_mib": used})
            for role, pid in pids.items():
                m = memory_kib(pid)
                if m is not None:
                    rows.append({"t": round(t, 2), "role": role, "pid": pid, **m,
                                 "gpu_mib": per_pid.get(pid, -1)})
            if t >= next_print:
                total = sum(tally.statuses.values())
                rss = sum(memory_kib(pid)["rss"] for pid in pids.values()
                          if memory_kib(pid)) // 1024
                print(f"  {t:6.0f} s  {total:7d} requests  RSS total {rss} MiB  "
                      f"slots free {info['slots']['free']}+{info['slots']['parked']}/"
                      f"{info['slots']['total']}  streams {info['streams']['open']}", flush=True)
                next_print = t + 60
            time.sleep(max(0.0, args.interval - (time.monotonic() - t0 - t)))
        stop.set()
        for c in clients:
            c.join(90)
        final = status(instance)
    finally:
        stop.set()
        if own:
            with contextlib.suppress(Exception):
                seen |= set(roles(status(instance)).values())
            with contextlib.suppress(Exception):
                cli("down", "--instance", instance)
            kill_leftovers({pid for pid in seen if pid and Path(f"/proc/{pid}").exists()})

    with (out / "samples.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["t", "role", "pid", "rss", "anon", "shmem", "gpu_mib"])
        w.writeheader()
        w.writerows(rows)
    summary = summarise(rows, args.warmup, tally, args, machine, gpu_rows)
    summary["final_status"] = {"slots": final["slots"], "streams": final["streams"],
                               "restarts": [w["restarts"] for w in final["workers"]]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    title = (f"shmmel soak {args.duration:g} s, {args.clients} clients, "
             f"{args.label or machine['cpus']} ")
    if plot(rows, args.warmup, out / "rss.png", title):
        summary["plot"] = str(out / "rss.png")
    print(f"{'process':24} {'RSS start':>10} {'RSS end':>10} {'growth':>8} "
          f"{'anon start':>10} {'anon end':>10} {'growth':>8}")
    for name, pr in summary["processes"].items():
        print(f"{name:24} {pr['rss_start_kib']:>8} K {pr['rss_end_kib']:>8} K "
              f"{pr['rss_growth_pct']:>7.2f}% {pr['anon_start_kib']:>8} K "
              f"{pr['anon_end_kib']:>8} K {pr['anon_growth_pct']:>7.2f}%")
    print(f"requests: {dict(sorted(tally.statuses.items()))}; failed {summary['failed_requests']}")
    print(f"worst RSS growth after warm-up {summary['worst_rss_growth_pct']:.2f}% "
          f"(target < {args.max_growth:g}%): {'PASS' if summary['pass'] else 'FAIL'}")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
