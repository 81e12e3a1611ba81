"""Issue 12's comparison in one call: shmmel against the bare gunicorn+Falcon app
(``shmmel.loadgen.baseline_app``, gthread, the same processes, threads and keep-alive),
each ratio taken against the bare app measured in the same run.

Items (``--items``, comma-separated; all by default):

* ``process``  wrk ``-t4 --timeout 5s`` on ``POST /process`` at ``--conns``: for each
  (HTTP processes, compute workers) in ``--configs``, ``shmmel up`` then ``--reps``
  consecutive runs (the first within ~0.1 s of ``up`` returning), and the bare app
  ``--reps`` times with the same processes and threads.
* ``balance``  accept balancing (``http_boot_wait``, ``http_accept_slack``) on and off:
  for the first of ``--configs``, ``--balance-trials`` fresh instances of each, alternating,
  ``--reps`` runs each from ``up``; each run's requests per HTTP process.
* ``linger``   ``http_linger_ms`` on and off and the bare app, all up at once, ``--reps``
  rounds rotating the order: /process at ``--conns`` and one sequential client.
* ``alternate`` the first of ``--configs`` and the bare app both up, ``--reps`` rounds of
  one run each, alternating (for a shared machine whose other load drifts).
* ``seq``      one sequential keep-alive client (wrk -t1 -c1) on /process: p50 each.
* ``oneshot``  1 s s16le one-shot ``POST /audio/stream?format=binary`` (32,000 bytes in,
  ~32 KB out) at ``--audio-conns`` with wrk (bench/wrk_oneshot.lua), for each count of
  ``--audio-workers``, against the bare app's 32 KB route.
* ``audio``    ``shmmel bench audio --streams 64 --pace fast --baseline``, ``--reps`` times.
* ``ipc``      ``bench/bench_ipc.py --producers 1 8``.
* ``soak``     ``--soak-seconds`` of keep-alive /process at ``--conns``: requests,
  non-2xx, timeouts, and the instance log's "no heartbeat" kills.
* ``sweep``    /process at ``--conns``: threads x workers (``--sweep-threads``,
  ``--sweep-workers``), one run each after a 1 s warm-up.
* ``flame``    py-spy flame graphs (SVG) and raw stacks of one HTTP process and one
  compute worker under the /process load; ``--before DIR`` adds the same for an older
  checkout (DIR/src, DIR/cli).
* ``switch``   the HTTP processes' GIL switch interval (``http_switch_interval_us``) and
  Python's stock 5 ms, on shmmel and on the bare app, four servers up at once, rotating
  (bench/compare_knobs.py).
* ``cpu``      CPU per request of each process group (HTTP processes, compute workers, wrk,
  the bare app's processes) and context switches, several servers up at once, rotating
  (``--cpu-servers``; bench/compare_cpu.py).
* ``audiocpu`` as ``cpu``, with ``bench audio --pace fast`` (``--audio-phase`` files or
  chunks, ``--streams-fast`` streams) as the load: CPU per file (or chunk) of each group,
  HTTP processes and workers ``--configs``' first (e.g. 8x2), ``--audio-kind`` workers.
* ``streams``  1,000 real-time session streams (``bench audio --pace realtime``), then,
  with ``max_streams`` 1,000, 1,000 streams held open (all opened first) while 200 more
  clients try to open streams in the middle window: the refusals' latency and the admitted
  streams' per-chunk p50/p99 before, during and after (``compare_audio.hold_streams``).

The bare app runs with Python's stock GIL switch interval (5 ms) unless ``BARE_SWITCH_US`` is
set in the environment (e.g. 200, shmmel's ``http_switch_interval_us`` default on a host of
4 or more cores; on a smaller one shmmel's default is Python's too).

Everything lands in ``--out`` (results.json after each item, logs, SVGs; the streams item also writes streams_over.md).
On the GPU host (results in $OUT/compare.tgz):

    source .device/setup && python3 bench/compare.py --out /tmp/cmp && tar czf $OUT/compare.tgz -C /tmp/cmp .

On a 2-core machine without a GPU (the issue's analogue):

    python bench/compare.py --out /tmp/cmp --configs 2x2 --conns 32 --kind cpu \
        --items process,seq,soak --soak-seconds 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from compare_audio import item_audio, item_oneshot, item_streams
from compare_cpu import item_audio_cpu, item_cpu
from compare_knobs import item_switch
from compare_lib import (
    BODY_256,
    HERE,
    Instance,
    bare,
    imbalance,
    log,
    per_run,
    process_wrk,
    rotating,
    summary_runs,
    wrk,
)


def item_process(a, out: Path) -> dict:
    res: dict = {"configs": []}
    bares: dict[int, dict] = {}
    for http, workers in a.configs:
        with Instance(out, http, a.threads, workers, a.kind) as inst:
            runs = process_runs(inst, a, out, f"shmmel h{http} w{workers}")
            first_gap = runs[0]["started"] - inst.up_wall
        if http not in bares:
            with bare(out, http, a.threads) as b:
                bruns = [process_wrk(b.url, a.conns, a.dur, f"bare h{http} #{i + 1}", out)
                         for i in range(a.reps)]
            bares[http] = summary_runs(bruns)
        s, bs = summary_runs(runs), bares[http]
        res["configs"].append({
            **inst.desc, "up_s": round(inst.up_s, 2),
            "first_run_started_after_up_s": round(first_gap, 2), "shmmel": s, "bare": bs,
            "ratio_rps": round(s["rps_mean"] / bs["rps_mean"], 3),
            "ratio_p99": round(s["p99_mean"] / bs["p99_mean"], 3), "health": inst.health,
            "runs": runs})
    return res


def process_runs(inst: Instance, a, out: Path, label: str) -> list[dict]:
    """``--reps`` consecutive /process runs on ``inst`` (the first as soon as it is up),
    with the requests each HTTP process served in each run (``per_process``) and the
    busiest over the least busy (``imbalance``)."""
    runs, before = [], {}
    for i in range(a.reps):
        r = process_wrk(inst.url, a.conns, a.dur, f"{label} #{i + 1}", out)
        after = inst.http_counts()
        r["per_process"] = per_run(before, after)
        r["imbalance"] = imbalance(r["per_process"])
        log(f"    per HTTP process: {r['per_process']} (imbalance {r['imbalance']})")
        before = after
        runs.append(r)
    return runs


def item_balance(a, out: Path) -> dict:
    """Accept balancing on and off (``http_boot_wait``, ``http_accept_slack``), fresh
    instances alternating, ``--reps`` runs each from ``up``: how evenly the connections
    spread over the HTTP processes, and the first run against the later ones."""
    http, workers = a.configs[0]
    off = {"SHMMEL_HTTP_BOOT_WAIT": "0", "SHMMEL_HTTP_ACCEPT_SLACK": "0"}
    res: dict = {"on": [], "off": []}
    for t in range(a.balance_trials):
        for mode in (("off", "on") if t % 2 == 0 else ("on", "off")):
            with Instance(out, http, a.threads, workers, a.kind,
                          env=off if mode == "off" else None) as inst:
                runs = process_runs(inst, a, out, f"balance {mode} h{http} w{workers} t{t + 1}")
            rps = [r["rps"] for r in runs]
            later = statistics.fmean(rps[1:]) if len(rps) > 1 else rps[0]
            res[mode].append({
                "rps": rps, "p99_ms": [r["p99_ms"] for r in runs],
                "first_over_later": round(rps[0] / later, 3) if later else None,
                "spread": round((max(rps) - min(rps)) / max(rps), 3) if max(rps) else None,
                "imbalance": [r["imbalance"] for r in runs],
                "per_process": [r["per_process"] for r in runs],
                "non_2xx": sum(r["non_2xx"] for r in runs),
                "timeouts": sum(r["timeouts"] for r in runs), "health": inst.health})
    return {"http_workers": http, "workers": workers, "conns": a.conns, **res}


def item_alternate(a, out: Path) -> dict:
    """Both servers up at once, runs alternating (who goes first alternates too), so that
    drift in other load on a shared machine hits both alike."""
    http, workers = a.configs[0]
    ours, theirs = [], []
    with Instance(out, http, a.threads, workers, a.kind) as inst, \
            bare(out, http, a.threads) as b:
        process_wrk(inst.url, a.conns, 1, "alternate shmmel warm-up", out)
        process_wrk(b.url, a.conns, 1, "alternate bare warm-up", out)
        for i in range(a.reps):
            pair = [("shmmel", inst.url, ours), ("bare", b.url, theirs)]
            for who, url, into in (pair if i % 2 == 0 else pair[::-1]):
                into.append(process_wrk(url, a.conns, a.dur, f"alternate {who} #{i + 1}", out))
    s, bs = summary_runs(ours), summary_runs(theirs)
    return {**inst.desc, "shmmel": s, "bare": bs,
            "ratios_rps": [round(x["rps"] / y["rps"], 3) for x, y in zip(ours, theirs)],
            "ratio_rps": round(s["rps_mean"] / bs["rps_mean"], 3),
            "ratio_p99": round(s["p99_mean"] / bs["p99_mean"], 3), "health": inst.health}


def item_linger(a, out: Path) -> dict:
    """``http_linger_ms`` on (the default) and off (0), and the bare app, all three up at
    once, ``--reps`` rounds of one run each, the order rotating every round; each shmmel run
    as a ratio to the bare run of its round. Also one sequential client (wrk -t1 -c1)."""
    http, workers = a.configs[0]
    res: dict = {}
    with Instance(out, http, a.threads, workers, a.kind) as on, \
            Instance(out, http, a.threads, workers, a.kind,
                     env={"SHMMEL_HTTP_LINGER_MS": "0"}, tag="l") as off, \
            bare(out, http, a.threads) as b:
        urls = {"linger": on.url, "no_linger": off.url, "bare": b.url}
        for who, url in urls.items():
            process_wrk(url, a.conns, 1, f"linger {who} warm-up", out)
        for conns, threads, key in ((a.conns, 4, "process"), (1, 1, "seq")):
            def run(who: str, i: int, conns: int = conns, threads: int = threads,
                    key: str = key) -> dict:
                return process_wrk(urls[who], conns, a.dur if key == "process" else a.seq_dur,
                                   f"{key} {who} #{i + 1}", out, threads=threads)
            runs = rotating(list(urls), a.reps, run)
            res[key] = {who: summary_runs(rs) for who, rs in runs.items()}
            for who in ("linger", "no_linger"):
                res[key][who]["ratio_rps"] = [round(x["rps"] / y["rps"], 3) for x, y in
                                              zip(runs[who], runs["bare"])]
                res[key][who]["p50_over_bare_ms"] = [round(x["p50_ms"] - y["p50_ms"], 3)
                                                     for x, y in zip(runs[who], runs["bare"])]
    return {"http_workers": http, "workers": workers, "conns": a.conns, **res,
            "health": {"linger": on.health, "no_linger": off.health}}


def item_seq(a, out: Path) -> dict:
    http, workers = a.configs[0]
    with Instance(out, http, a.threads, workers, a.kind) as inst:
        process_wrk(inst.url, 1, 1, "seq warm-up", out, threads=1)
        ours = [process_wrk(inst.url, 1, a.seq_dur, f"seq shmmel #{i + 1}", out, threads=1)
                for i in range(a.reps)]
    with bare(out, http, a.threads) as b:
        process_wrk(b.url, 1, 1, "seq bare warm-up", out, threads=1)
        theirs = [process_wrk(b.url, 1, a.seq_dur, f"seq bare #{i + 1}", out, threads=1)
                  for i in range(a.reps)]
    p50 = [r["p50_ms"] for r in ours]
    b50 = [r["p50_ms"] for r in theirs]
    return {**inst.desc, "shmmel_p50_ms": p50, "bare_p50_ms": b50,
            "overhead_ms": round(statistics.median(p50) - statistics.median(b50), 4),
            "shmmel_rps": [r["rps"] for r in ours], "bare_rps": [r["rps"] for r in theirs],
            "health": inst.health}


def item_ipc(a, out: Path) -> dict:
    reps = []
    for i in range(a.reps_ipc):
        p = subprocess.run([sys.executable, str(HERE / "bench_ipc.py"), "--producers", "1", "8",
                            "--seconds", f"{a.ipc_seconds:g}", "--workers", "2", "--json"],
                           capture_output=True, text=True, timeout=300)
        with open(out / "ipc.log", "a") as f:
            f.write(p.stdout + p.stderr)
        try:
            d = json.loads(p.stdout[p.stdout.index("{"):])
        except ValueError:
            d = {"error": p.stdout[-2000:] + p.stderr[-2000:]}
        reps.append(d)
        log("  ipc #%d: %s" % (i + 1, {k: (v.get("p50_us"), v.get("p99_us")) for k, v in d.items()
                                      if isinstance(v, dict)}))
    return {"reps": reps}


def item_soak(a, out: Path, results: dict) -> dict:
    http, workers = a.soak_config
    seconds = a.soak_seconds
    if a.soak_requests:  # long enough for that many at the rate item "process" measured
        # the slowest run: a fresh instance's first connections may stay slow (see docs)
        rates = [min(c["shmmel"]["rps"]) for c in results.get("process", {}).get("configs", [])
                 if (c["http_workers"], c["workers"]) == (http, workers)]
        if rates:
            seconds = max(10.0, round(a.soak_requests * 1.15 / rates[0]))
    with Instance(out, http, a.threads, workers, a.kind) as inst:
        # every answer counted by status (wrk_process_count.lua): what any non-2xx were
        r = wrk(inst.url + "/process", "wrk_process_count.lua", {"BODY": BODY_256}, 4,
                a.conns, seconds, f"soak h{http} w{workers}", out)
        time.sleep(1)
        metrics = ""
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(inst.url + "/metrics", timeout=10) as resp:
                metrics = resp.read().decode(errors="replace")
        (out / f"metrics-{inst.name}.txt").write_text(metrics)
    return {**inst.desc, **{k: r.get(k) for k in ("rps", "requests", "non_2xx", "timeouts",
                                                  "socket_errors", "statuses", "p50_ms",
                                                  "p99_ms", "cmd")},
            "metrics_non_200": [ln for ln in metrics.splitlines() if not ln.startswith("#")
                                and ("status=" in ln or "code=" in ln) and '"200"' not in ln
                                and not ln.endswith(" 0.0")],
            "health": inst.health}


def item_sweep(a, out: Path) -> dict:
    rows = []
    for t in a.sweep_threads:
        for w in a.sweep_workers:
            with Instance(out, a.configs[0][0], t, w, a.kind) as inst:
                process_wrk(inst.url, a.conns, 1, f"sweep t{t} w{w} warm-up", out)
                r = process_wrk(inst.url, a.conns, a.sweep_dur, f"sweep t{t} w{w}", out)
            rows.append({"http_workers": a.configs[0][0], "threads": t, "workers": w,
                         "rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                         "non_2xx": r["non_2xx"], "timeouts": r["timeouts"],
                         "health": inst.health})
    return {"rows": rows}


def pyspy(pid: int, seconds: int, fmt: str, dest: Path) -> subprocess.Popen:
    return subprocess.Popen(["py-spy", "record", "--idle", "-f", fmt, "-d", str(seconds),
                             "--pid", str(pid), "-o", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def top_self(raw: Path, n: int = 12) -> dict:
    """Self samples a frame (last frame of each collapsed stack), and the idle share."""
    if not raw.exists():
        return {}
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, k = line.rpartition(" ")
        if not k.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(k)
        total += int(k)
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return {"samples": total, "top_self": [(f, round(100 * c / max(1, total), 1)) for f, c in top]}


def flame_one(a, out: Path, code: Path | None, tag: str) -> dict:
    http, workers = a.flame_config
    with Instance(out, http, a.threads, workers, a.kind, code=code, tag=tag) as inst:
        st = inst.status()
        hpid = st["http"][0]["pid"]
        wpid = st["workers"][0]["pid"]
        load = threading.Thread(target=lambda: res.update(
            wrk=process_wrk(inst.url, a.conns, 2 * a.flame_seconds + 5, f"flame {tag}", out)))
        res: dict = {**inst.desc, "http_pid": hpid, "worker_pid": wpid}
        load.start()
        time.sleep(2)
        procs = [pyspy(hpid, a.flame_seconds, "flamegraph", out / f"flame-{tag}-http.svg"),
                 pyspy(wpid, a.flame_seconds, "flamegraph", out / f"flame-{tag}-worker.svg")]
        for p in procs:
            p.wait(timeout=a.flame_seconds + 60)
        procs = [pyspy(hpid, a.flame_seconds, "raw", out / f"flame-{tag}-http.txt"),
                 pyspy(wpid, a.flame_seconds, "raw", out / f"flame-{tag}-worker.txt")]
        for p in procs:
            o, _ = p.communicate(timeout=a.flame_seconds + 60)
            with open(out / "pyspy.log", "a") as f:
                f.write(o or "")
        load.join()
    res["http_profile"] = top_self(out / f"flame-{tag}-http.txt")
    res["worker_profile"] = top_self(out / f"flame-{tag}-worker.txt")
    res["health"] = inst.health
    return res


def item_flame(a, out: Path) -> dict:
    if shutil.which("py-spy") is None:
        return {"skipped": "py-spy is not on PATH"}
    res = {"after": flame_one(a, out, None, "after")}
    if a.before:
        res["before"] = flame_one(a, out, Path(a.before).resolve(), "before")
    return res


ITEMS = {"process": item_process, "balance": item_balance, "linger": item_linger,
         "alternate": item_alternate, "seq": item_seq, "soak": item_soak, "sweep": item_sweep,
         "flame": item_flame, "ipc": item_ipc, "oneshot": item_oneshot, "audio": item_audio,
         "streams": item_streams, "switch": item_switch, "cpu": item_cpu,
         "audiocpu": item_audio_cpu}


def pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in p.split("x")) for p in text.split(",")]  # type: ignore[misc]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def host_info() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "cpu": platform.processor()}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                     timeout=20).stdout.strip()
    info["code"] = os.environ.get("SHMMEL_CODE", "")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--items", default=",".join(ITEMS))
    ap.add_argument("--kind", default="cpu", help="compute workers for /process")
    ap.add_argument("--configs", type=pairs, default=pairs("8x4,8x8,12x8"),
                    help="HTTPxWORKERS for the /process item")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--dur", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--balance-trials", type=int, default=2,
                    help="item balance: fresh instances per setting (on, off)")
    ap.add_argument("--seq-dur", type=float, default=3)
    ap.add_argument("--soak-config", type=lambda s: pairs(s)[0], default=(12, 8))
    ap.add_argument("--soak-seconds", type=float, default=60)
    ap.add_argument("--soak-requests", type=int, default=0,
                    help="size the soak for this many requests at item process's rate")
    ap.add_argument("--sweep-threads", type=ints, default=ints("4,8,16"))
    ap.add_argument("--sweep-workers", type=ints, default=ints("2,4,8"))
    ap.add_argument("--sweep-dur", type=float, default=4)
    ap.add_argument("--flame-config", type=lambda s: pairs(s)[0], default=(8, 8))
    ap.add_argument("--flame-seconds", type=int, default=5)
    ap.add_argument("--before", help="an older checkout (src/, cli/) to profile too")
    ap.add_argument("--audio-kind", default="cuda")
    ap.add_argument("--audio-http", type=int, default=8)
    ap.add_argument("--audio-conns", type=int, default=64)
    ap.add_argument("--audio-workers", type=ints, default=ints("1,2,4"))
    ap.add_argument("--audio-dur", type=float, default=4)
    ap.add_argument("--streams-fast", type=int, default=64)
    ap.add_argument("--audio-fast-workers", type=int, default=2,
                    help="compute workers of the audio item's instance")
    ap.add_argument("--reps-audio", type=int, default=2)
    ap.add_argument("--audio-phase", default="files", choices=["files", "chunks"],
                    help="item audiocpu: the bench audio phase to load with")
    ap.add_argument("--reps-ipc", type=int, default=2)
    ap.add_argument("--ipc-seconds", type=float, default=3)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--streams-over", type=int, default=1200)
    ap.add_argument("--streams-http", type=int, default=8)
    ap.add_argument("--streams-threads", type=int, default=128)
    ap.add_argument("--streams-dur", type=float, default=6)
    ap.add_argument("--streams-warmup", type=float, default=3)
    ap.add_argument("--cpu-servers", default="shmmel;bare",
                    help="item cpu: servers up at once, name[:k=v,...];... (compare_cpu.py)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("host", host_info())
    results.setdefault("argv", []).append(sys.argv)
    log(f"host: {results['host']}")
    for name in a.items.split(","):
        log(f"== {name}")
        t = time.monotonic()
        try:
            results[name] = ITEMS[name](a, out, results) if name == "soak" else \
                ITEMS[name](a, out)
        except Exception as exc:  # one broken item must not lose the others
            import traceback
            traceback.print_exc()
            results[name] = {"failed": repr(exc)}
        results[name + "_seconds"] = round(time.monotonic() - t, 1)
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        log(f"== {name} done in {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
