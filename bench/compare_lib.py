"""Helpers of bench/compare.py: wrk runs parsed, ``shmmel up``/``down`` instances, the
bare app, run summaries, ``shmmel bench`` in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shmmel.loadgen import targets

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The bare app's GIL switch interval in µs (0: Python's stock 5 ms); BARE_SWITCH_US=200
# compares against shmmel's http_switch_interval_us on both sides.
BARE_SWITCH_US = int(os.environ.get("BARE_SWITCH_US") or 0)
BODY_256 = json.dumps({"message": "x" * 256, "op": "reverse"})


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- wrk ------------------------------------------------------------------------------------
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")


def wrk(url: str, lua: str, env: dict[str, str], threads: int, conns: int, seconds: float,
        label: str, out: Path) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "5s",
           "--latency", "-s", str(HERE / lua), url]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                       timeout=seconds + 60)
    with open(out / "wrk.log", "a") as f:
        f.write(f"=== {label} ({time.strftime('%H:%M:%S', time.localtime(t0))})\n"
                f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    s = p.stdout
    rps = re.search(r"Requests/sec:\s*([\d.]+)", s)
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", s, re.M))
    n = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", s)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", s)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", s)
    statuses = re.search(r"statuses: \{(.*)\}", s)
    r = {"label": label, "rps": float(rps.group(1)) if rps else 0.0,
         "requests": int(n.group(1)) if n else 0,
         "p50_ms": _ms(pct.get("50", "")), "p90_ms": _ms(pct.get("90", "")),
         "p99_ms": _ms(pct.get("99", "")),
         "non_2xx": int(non2xx.group(1)) if non2xx else 0,
         "socket_errors": [int(x) for x in sock.groups()] if sock else [0, 0, 0, 0],
         "timeouts": int(sock.group(4)) if sock else 0, "rc": p.returncode,
         "cmd": " ".join(cmd), "started": t0}
    if statuses:
        pairs = [kv.split("=") for kv in statuses.group(1).split(", ") if kv]
        r["statuses"] = {k: int(v) for k, v in pairs}
    if n:
        mult = {"B": 1, "KB": 1024, "MB": 1 << 20, "GB": 1 << 30}.get(n.group(5), 1)
        r["bytes_per_response"] = round(float(n.group(4)) * mult / max(1, r["requests"]))
    log(f"  {label}: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.2f} ms,"
        f" n {r['requests']:,}, non-2xx {r['non_2xx']}, socket errors {r['socket_errors']}")
    return r


def process_wrk(url: str, conns: int, seconds: float, label: str, out: Path,
                threads: int = 4) -> dict:
    return wrk(url + "/process", "wrk_process.lua", {"BODY": BODY_256}, min(threads, conns),
               conns, seconds, label, out)


# -- instances ------------------------------------------------------------------------------
class Instance:
    """``shmmel up`` in a subprocess (the CLI of ``code``: a checkout with src/ and cli/),
    ``shmmel down`` on the way out; the log under ``out``."""

    count = 0

    def __init__(self, out: Path, http: int, threads: int, workers: int, kind: str,
                 code: Path | None = None, env: dict[str, str] | None = None,
                 tag: str = "s") -> None:
        Instance.count += 1
        self.name = f"cmp{os.getpid() % 100000}{tag}{Instance.count}"
        self.log = out / f"instance-{self.name}.log"
        self.env = {**os.environ, "SHMMEL_HTTP_THREADS": str(threads),
                    "SHMMEL_WHISPER_WORKERS": "0", "SHMMEL_LOG_FILE": str(self.log),
                    **(env or {})}
        if code is not None:  # an older checkout; else the code on PYTHONPATH
            pp = [str(code / "src"), str(code / "cli"), os.environ.get("PYTHONPATH", "")]
            self.env["PYTHONPATH"] = ":".join(p for p in pp if p)
        self.args = ["-w", str(workers), "--http-workers", str(http), "--worker-kind", kind]
        self.desc = {"instance": self.name, "http_workers": http, "http_threads": threads,
                     "workers": workers, "kind": kind, "code": str(code or "PYTHONPATH")}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shmmel_cli.main", *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def __enter__(self) -> Instance:
        t0 = time.monotonic()
        p = self.cli("up", "-i", self.name, "--port", "0", *self.args)
        self.up_s = time.monotonic() - t0
        self.up_done = time.monotonic()
        self.up_wall = time.time()
        m = re.search(r"up at (http://\S+)", p.stdout)
        if p.returncode != 0 or not m:
            raise SystemExit(f"shmmel up failed ({p.returncode}): {p.stdout}{p.stderr}")
        self.url = m.group(1)
        log(f"  up {self.name} ({self.desc}) in {self.up_s:.2f} s at {self.url}")
        return self

    def http_counts(self) -> dict[int, int]:
        """Requests served so far by each HTTP process (pid -> count), from ``status``."""
        return {int(r["pid"]): int(r.get("requests", 0)) for r in self.status().get("http", [])}

    def status(self) -> dict:
        p = self.cli("status", "-i", self.name, "--json")
        try:
            return json.loads(p.stdout)
        except ValueError:
            return {"error": p.stdout + p.stderr}

    def __exit__(self, *exc: object) -> None:
        self.final_status = self.status()
        p = self.cli("down", "-i", self.name)
        if p.returncode != 0:
            log(f"  down {self.name} failed: {p.stdout}{p.stderr}")
            with contextlib.suppress(Exception):
                targets.stop_instance(self.name)
        left = [n for n in os.listdir("/dev/shm") if self.name in n]
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        self.health = {"no_heartbeat_kills": text.count("no heartbeat"),
                       "tracebacks": text.count("Traceback"),
                       "restarts": sum(int(w.get("restarts", 0))
                                       for w in self.final_status.get("workers", [])),
                       "shm_left": left}
        if any(v for v in self.health.values()):
            log(f"  health of {self.name}: {self.health}")
        # requests each HTTP process served: how evenly the connections spread
        self.health["http_requests"] = [int(r.get("requests", 0))
                                        for r in self.final_status.get("http", [])]


def per_run(before: dict[int, int], after: dict[int, int]) -> list[int]:
    """Requests each HTTP process served between two ``http_counts``."""
    return [n - before.get(pid, 0) for pid, n in after.items()]


def imbalance(counts: list[int]) -> float:
    """Busiest over least busy HTTP process (inf where one served nothing)."""
    return round(max(counts) / min(counts), 2) if counts and min(counts) else float("inf")


def _children(ppid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{d}/stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == ppid:
                    kids.append(int(d))
    return kids


def accepting(pid: int) -> bool:
    """Whether a gunicorn gthread worker polls its listener: its epoll set holds the
    listener besides its wake-up pipe (it registers the listener last, in run())."""
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                    info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                    if info.count("tfd:") >= 2:
                        return True
    return False


def wait_accepting(master: int, n: int, timeout: float = 30.0) -> float:
    """Wait until ``n`` children of the gunicorn ``master`` accept; seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if sum(accepting(k) for k in _children(master)) >= n:
            break
        time.sleep(0.02)
    return round(time.monotonic() - t0, 2)


@contextlib.contextmanager
def bare(out: Path, http: int, threads: int, switch_us: int | None = None):
    """The bare app, once all its processes accept: a stock gunicorn answers as soon as its
    first process boots, and keep-alive keeps a run's connections on the early ones, so its
    first run would measure its boot, not its speed."""
    with targets.baseline(http, threads, log_file=str(out / "bare.log"),
                          switch_interval_us=BARE_SWITCH_US if switch_us is None
                          else switch_us) as b:
        masters = [k for k in _children(os.getpid()) if b"baseline_app" in _cmdline(k)]
        waited = max((wait_accepting(m, http) for m in masters), default=0.0)
        log(f"  bare app at {b.url}: all {http} processes accepting {waited:.2f} s after ready")
        yield b


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def spread(xs: list[float]) -> float:
    """(max - min) / max: how much the repeats moved."""
    return (max(xs) - min(xs)) / max(xs) if xs and max(xs) else float("nan")


def rotating(names: list[str], reps: int, run: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """``reps`` rounds of ``run(name, round)`` for each of ``names`` (servers all up at
    once), the order rotating every round so a shared host's drift falls on all alike:
    {name: its results, round by round}."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            runs[n].append(run(n, i))
    return runs


def summary_runs(runs: list[dict]) -> dict:
    rps = [r["rps"] for r in runs]
    return {"rps": rps, "rps_mean": round(mean(rps), 1), "rps_spread": round(spread(rps), 3),
            "p50_ms": [r["p50_ms"] for r in runs], "p99_ms": [r["p99_ms"] for r in runs],
            "p99_mean": round(mean([r["p99_ms"] for r in runs]), 3),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "timeouts": sum(r["timeouts"] for r in runs),
            "requests": sum(r["requests"] for r in runs)}


# -- items ----------------------------------------------------------------------------------
def bench_cli(args: list[str], label: str, out: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "shmmel_cli.main", "bench", *args]
    log(f"  {label}: {' '.join(cmd[3:])}")
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=timeout)
    with open(out / "bench.log", "a") as f:
        f.write(f"=== {label}\n$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    return p.returncode, p.stdout + p.stderr


def _lat(d: dict, *keys: str) -> float | None:
    for k in keys:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else None
