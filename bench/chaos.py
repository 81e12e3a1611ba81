"""Chaos run: keep-alive /process load while workers are killed, stopped and crash-looped.

    python bench/chaos.py                           # own CPU instance, 60 s, 32 connections
    python bench/chaos.py --duration 120 --workers 4 --connections 64 --seed 7
    python bench/chaos.py --json out.json

Starts an instance (through ``python -m shmmel_cli.main``, so ``PYTHONPATH`` selects the code
under test), puts ``--connections`` keep-alive clients on ``POST /process``, and at random
instants (every ``--every`` seconds on average) does one of:

- kill:   SIGKILL a random compute worker;
- stop:   SIGSTOP a random worker for 2-6 s, then SIGCONT (a hung worker);
- loop:   SIGKILL the same worker 5 times, each as soon as it is back (a crash loop).

Prints, per second and in total: requests answered 200, 503 (a clean refusal), other
statuses, errors (connection reset or refused: the service dropped a request), hung (an
answer that took > 2 s), lost (no answer within the client timeout), and whether the
instance was still up at the end. Exit status 1 when a request was lost or the instance died.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

HUNG_S = 2.0


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shmmel_cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise SystemExit(f"shmmel {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total: dict[str, int] = {}
        self.worst = 0.0

    def add(self, key: str, seconds: float) -> None:
        with self.lock:
            self.total[key] = self.total.get(key, 0) + 1
            if seconds > HUNG_S:
                self.total["hung"] = self.total.get("hung", 0) + 1
            self.worst = max(self.worst, seconds)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.total)


def client(port: int, stop: threading.Event, counts: Counts, timeout: float) -> None:
    body = json.dumps({"message": "chaos"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn.request("POST", "/process", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            key = str(resp.status)
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
        except TimeoutError:
            key = "lost"
            conn.close()
        except (OSError, http.client.HTTPException):
            key = "error"
            conn.close()
            time.sleep(0.01)
        counts.add(key, time.monotonic() - t0)
    conn.close()


def workers(instance: str, env: dict[str, str]) -> list[dict]:
    proc = cli("status", "--instance", instance, "--json", env=env, check=False)
    if proc.returncode != 0:
        return []
    return [w for w in json.loads(proc.stdout)["workers"] if w.get("kind") in ("cpu", "cuda")]


def chaos(instance: str, env: dict[str, str], stop: threading.Event, every: float,
          rng: random.Random, log: list[str]) -> None:
    t0 = time.monotonic()
    while not stop.wait(rng.expovariate(1.0 / every)):
        ws = [w for w in workers(instance, env) if w["pid"] and w["state"] == "ready"]
        if not ws:
            continue
        w = rng.choice(ws)
        action = rng.choice(("kill", "stop", "loop"))
        at = time.monotonic() - t0
        log.append(f"{at:6.1f} s  {action:4s} worker {w['index']} (pid {w['pid']})")
        with contextlib.suppress(ProcessLookupError):
            if action == "kill":
                os.kill(w["pid"], signal.SIGKILL)
            elif action == "stop":
                os.kill(w["pid"], signal.SIGSTOP)
                stop.wait(rng.uniform(2.0, 6.0))
                os.kill(w["pid"], signal.SIGCONT)
            else:
                pid = w["pid"]
                for _ in range(5):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 40
                    while not stop.is_set() and time.monotonic() < deadline:
                        again = [x for x in workers(instance, env) if x["index"] == w["index"]]
                        if again and again[0]["pid"] not in (0, pid) \
                                and again[0]["state"] == "ready":
                            pid = again[0]["pid"]
                            break
                        stop.wait(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--http-workers", type=int, default=2)
    ap.add_argument("--worker-kind", default="cpu")
    ap.add_argument("--every", type=float, default=3.0, help="mean seconds between events")
    ap.add_argument("--timeout", type=float, default=35.0, help="client timeout (lost)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    instance = f"chaos{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    env.setdefault("SHMMEL_LOG_FILE", f"/tmp/{instance}.log")
    cli("up", "--instance", instance, "--port", "0", "--workers", str(a.workers),
        "--http-workers", str(a.http_workers), "--worker-kind", a.worker_kind, env=env)
    info = json.loads(cli("status", "--instance", instance, "--json", env=env).stdout)
    port = info["port"]
    counts, stop, log = Counts(), threading.Event(), []
    threads = [threading.Thread(target=client, args=(port, stop, counts, a.timeout), daemon=True)
               for _ in range(a.connections)]
    for t in threads:
        t.start()
    chaos_stop = threading.Event()
    ct = threading.Thread(target=chaos, args=(instance, env, chaos_stop, a.every,
                                              random.Random(a.seed), log), daemon=True)
    ct.start()
    t0 = time.monotonic()
    per_second: list[dict[str, int]] = []
    prev: dict[str, int] = {}
    while time.monotonic() - t0 < a.duration:
        time.sleep(1.0)
        now = counts.snapshot()
        per_second.append({k: now.get(k, 0) - prev.get(k, 0) for k in now})
        prev = now
        print(f"{time.monotonic() - t0:6.1f} s  " + "  ".join(
            f"{k}={v}" for k, v in sorted(per_second[-1].items())), file=sys.stderr, flush=True)
    chaos_stop.set()
    ct.join(60)
    stop.set()
    for t in threads:
        t.join(a.timeout + 5)
    alive = cli("status", "--instance", instance, "--json", env=env, check=False).returncode == 0
    cli("down", "--instance", instance, env=env, check=False)
    total = counts.snapshot()
    zero_seconds = sum(1 for s in per_second if not s.get("200"))
    result = {
        "duration_s": a.duration, "connections": a.connections, "workers": a.workers,
        "events": log, "ok": total.get("200", 0), "503": total.get("503", 0),
        "other_status": {k: v for k, v in total.items()
                         if k.isdigit() and k not in ("200", "503")},
        "errors": total.get("error", 0), "hung": total.get("hung", 0),
        "lost": total.get("lost", 0), "worst_s": round(counts.worst, 2),
        "seconds_with_no_200": zero_seconds, "instance_up_at_end": alive,
    }
    print("\n".join(log))
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if alive and not result["lost"] else 1


if __name__ == "__main__":
    sys.exit(main())
