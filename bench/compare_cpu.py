"""The ``cpu`` item of bench/compare.py: where the CPU of a ``/process`` request goes, on
shmmel and on the bare app, from each process's own counters.

Several servers up at once (``--cpu-servers``, see :func:`parse_servers`), ``--reps``
rounds of one ``/process`` run each at ``--conns``, the order rotating every round. Around
each run, the CPU time (``/proc/PID/stat`` utime + stime) and the context switches
(``/proc/PID/task/*/status``, voluntary and not) of every process of the server under load,
grouped (shmmel: ``http``, ``workers``, ``supervisor`` = the supervisor and gunicorn's
arbiter; bare: ``http``, ``arbiter``), and wrk's own CPU (``RUSAGE_CHILDREN``), each
divided by the run's requests; also the whole host's busy CPU per request (``/proc/stat``),
whose excess over the groups is other load (this machine is shared). Each shmmel run is also
a ratio to the first bare server's run of its round.

CPU per request moves far less with other load than requests per second do (a busy host
slows both servers alike in wall time, but a request still costs what it costs), so it
tells the two sides apart on a noisy 2-core machine where throughput ratios spread by 2x.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_lib import Instance, _children, _cmdline, bare, log, process_wrk, rotating

_TCK = os.sysconf("SC_CLK_TCK")
_CS = re.compile(rb"^(voluntary|nonvoluntary)_ctxt_switches:\s*(\d+)", re.MULTILINE)


def proc_times(pid: int) -> tuple[float, float, int, int]:
    """(user s, system s, voluntary, involuntary context switches) of a process, all its
    threads together; zeros for a process that is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        user, system = int(f[11]) / _TCK, int(f[12]) / _TCK
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0, 0, 0
    cs = {b"voluntary": 0, b"nonvoluntary": 0}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for kind, n in _CS.findall(Path(f"/proc/{pid}/task/{tid}/status").read_bytes()):
                    cs[kind] += int(n)
    return user, system, cs[b"voluntary"], cs[b"nonvoluntary"]


def group_times(pids: list[int]) -> list[float]:
    tot = [0.0, 0.0, 0.0, 0.0]
    for pid in pids:
        for i, x in enumerate(proc_times(pid)):
            tot[i] += x
    return tot


def host_busy() -> float:
    """Seconds of CPU the host has spent busy (all CPUs, /proc/stat), so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TCK  # all but idle and iowait (guest is in user)


def shmmel_groups(inst: Instance) -> dict[str, list[int]]:
    st = inst.status()
    http = [int(r["pid"]) for r in st.get("http", []) if r.get("pid")]
    workers = [int(r["pid"]) for r in st.get("workers", []) if r.get("pid")]
    sup = int(st.get("pid") or 0)
    arbiter = int(st.get("gunicorn_pid") or 0)
    return {"http": http, "workers": workers, "supervisor": [p for p in (sup, arbiter) if p]}


def bare_groups(masters: list[int]) -> dict[str, list[int]]:
    return {"http": [k for m in masters for k in _children(m)], "arbiter": masters}


def _baseline_masters() -> set[int]:
    return {k for k in _children(os.getpid()) if b"baseline_app" in _cmdline(k)}


def _per_unit(groups: dict[str, list[int]], before: dict[str, list[float]], n: int) -> dict:
    """Each group's CPU and context switches since ``before``, per one of ``n`` units."""
    n = max(1, n)
    cpu: dict = {}
    for g, pids in groups.items():
        d = [a - b for a, b in zip(group_times(pids), before[g])]
        cpu[g] = {"us": round((d[0] + d[1]) / n * 1e6, 1), "user_us": round(d[0] / n * 1e6, 1),
                  "sys_us": round(d[1] / n * 1e6, 1), "vcs": round(d[2] / n, 2),
                  "ivcs": round(d[3] / n, 2)}
    return cpu


def _log_cpu(cpu: dict, unit: str) -> None:
    log(f"    cpu us/{unit}: " + ", ".join(
        f"{g} {v['us']:.0f}" + (f" (sys {v['sys_us']:.0f}, vcs {v['vcs']:.1f})"
                                if "vcs" in v else "")
        for g, v in cpu.items() if isinstance(v, dict)) + f"; other load {cpu['other_us']:.0f}")


def measured_run(url: str, conns: int, dur: float, groups: dict[str, list[int]], label: str,
                 out: Path) -> dict:
    """One /process run with the CPU of each group, wrk's and the host's per request."""
    before = {g: group_times(p) for g, p in groups.items()}
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = host_busy()
    r = process_wrk(url, conns, dur, label, out)
    busy = host_busy() - busy0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n = max(1, r["requests"])
    cpu = _per_unit(groups, before, n)
    wrk_s = (kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime)
    cpu["wrk"] = {"us": round(wrk_s / n * 1e6, 1)}
    ours = sum(v["us"] for v in cpu.values())
    cpu["host_us"] = round(busy / n * 1e6, 1)
    cpu["other_us"] = round(cpu["host_us"] - ours, 1)  # other load on the machine
    r["cpu"] = cpu
    _log_cpu(cpu, "request")
    return r


_PROGRESS = re.compile(r"(\d+(?:\.\d+)?)/\d+(?:\.\d+)? s\s+([\d,]+) (files|chunks)")


def audio_measured_run(url: str, a, groups: dict[str, list[int]], label: str,
                       out: Path) -> dict:
    """One ``bench audio --pace fast`` phase (``a.audio_phase``: files or chunks) against
    ``url``, with the CPU of each group per file (or chunk) between the bench's first and
    last progress lines (the load processes' start-up and warm-up are outside that window;
    the bench client's own CPU is in ``host_us``). Piped, the bench prints one every 4 s from
    2.5 s on, so ``--dur`` must be at least 7 (9 gives a 4 s window)."""
    cmd = [sys.executable, "-m", "shmmel_cli.main", "bench", "audio", "--url", url,
           "--streams", str(a.streams_fast), "--pace", "fast", "--phases", a.audio_phase,
           "-d", f"{a.dur:g}", "--warmup", "1", "--no-verify", "--gpu-index", "-1",
           "--http-workers", str(a.configs[0][0])]
    log(f"  {label}: {' '.join(cmd[3:])}")
    marks: list[tuple[float, int, dict, float]] = []  # (t, count, group times, host busy)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as p:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            m = _PROGRESS.search(line)
            if m:
                marks.append((time.monotonic(), int(m.group(2).replace(",", "")),
                              {g: group_times(ps) for g, ps in groups.items()}, host_busy()))
    with open(out / "bench.log", "a") as f:
        f.write(f"=== {label}\n$ {' '.join(cmd)}\n{''.join(lines)}\n")
    r: dict = {"rc": p.returncode, "marks": len(marks)}
    if len(marks) < 2:
        log(f"    {label}: fewer than two progress lines; no CPU figures")
        return r
    (t0, n0, g0, b0), (t1, n1, _g1, b1) = marks[0], marks[-1]
    n = n1 - n0
    r.update(units=n, seconds=round(t1 - t0, 2), per_s=round(n / (t1 - t0), 1))
    cpu = _per_unit(groups, g0, n)
    cpu["host_us"] = round((b1 - b0) / max(1, n) * 1e6, 1)
    cpu["other_us"] = round(cpu["host_us"] - sum(v["us"] for v in cpu.values()
                                                 if isinstance(v, dict)), 1)
    r["cpu"] = cpu
    log(f"    {label}: {r['per_s']} {a.audio_phase}/s")
    _log_cpu(cpu, a.audio_phase[:-1])
    return r


def parse_servers(text: str) -> list[tuple[str, dict[str, str]]]:
    """``name[:k=v,k=v];...``: a name starting with ``bare`` is the bare app (option
    ``switch``: its GIL switch interval in µs); any other is a shmmel instance (option ``w``:
    compute workers, else the first of ``--configs``; ``code``: a checkout with src/ and cli/
    to run instead of the code on PYTHONPATH, e.g. a patched copy; other options are
    environment variables, e.g. ``SHMMEL_HTTP_LINGER_MS=0``)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, opts = part.partition(":")
        out.append((name, dict(kv.split("=", 1) for kv in opts.split(",") if kv)))
    return out


def _median_cpu(runs: list[dict], group: str, key: str) -> float | None:
    xs = [r["cpu"][group][key] for r in runs if isinstance(r.get("cpu", {}).get(group), dict)
          and key in r["cpu"][group]]
    return round(statistics.median(xs), 2) if xs else None


def item_audio_cpu(a, out: Path) -> dict:
    """The ``audiocpu`` item: as ``cpu``, with ``bench audio --pace fast`` (its
    ``--audio-phase``, files or chunks, ``--streams-fast`` streams) as the load."""
    return item_cpu(a, out, audio=True)


def item_cpu(a, out: Path, audio: bool = False) -> dict:
    http, workers = a.configs[0]
    servers = parse_servers(a.cpu_servers)
    up: list[tuple[str, str, dict[str, list[int]], dict]] = []
    res: dict = {"http_workers": http, "threads": a.threads, "conns": a.conns,
                 "servers": {}}
    with contextlib.ExitStack() as stack:
        for name, opts in servers:
            if name.startswith("bare"):
                before = _baseline_masters()
                b = stack.enter_context(bare(out, http, a.threads,
                                             switch_us=int(opts.get("switch", 0))))
                up.append((name, b.url, bare_groups(sorted(_baseline_masters() - before)),
                           {"switch_us": int(opts.get("switch", 0))}))
            else:
                env = {k: v for k, v in opts.items() if k not in ("w", "code")}
                w = int(opts.get("w", workers))
                code = Path(opts["code"]).resolve() if "code" in opts else None
                inst = stack.enter_context(Instance(out, http, a.threads, w,
                                                    a.audio_kind if audio else a.kind,
                                                    env=env, code=code, tag=f"c{len(up)}"))
                up.append((name, inst.url, shmmel_groups(inst),
                           {"workers": w, "env": env, "code": str(code or "PYTHONPATH"),
                            "inst": inst}))
        by_name = {name: (url, groups) for name, url, groups, _d in up}
        if audio:  # each run warms up on its own (--warmup 1)
            runs = rotating(list(by_name), a.reps, lambda name, i: audio_measured_run(
                by_name[name][0], a, by_name[name][1], f"audiocpu {name} #{i + 1}", out))
        else:
            for name, url, _g, _d in up:
                process_wrk(url, a.conns, 1, f"cpu {name} warm-up", out)
            runs = rotating(list(by_name), a.reps, lambda name, i: measured_run(
                by_name[name][0], a.conns, a.dur, by_name[name][1], f"cpu {name} #{i + 1}",
                out))
    anchor = next((name for name, *_ in up if name.startswith("bare")), None)
    for name, _url, groups, desc in up:
        rs = runs[name]
        row: dict = {k: v for k, v in desc.items() if k != "inst"}
        if "inst" in desc:
            row["health"] = desc["inst"].health
        rate = "per_s" if audio else "rps"
        row[rate] = [r.get(rate) for r in rs]
        if not audio:
            row["p99_ms"] = [r["p99_ms"] for r in rs]
            row["non_2xx"] = sum(r["non_2xx"] for r in rs)
            row["timeouts"] = sum(r["timeouts"] for r in rs)
        row["cpu_median"] = {g: {key: _median_cpu(rs, g, key)
                                 for key in ("us", "user_us", "sys_us", "vcs", "ivcs")
                                 if _median_cpu(rs, g, key) is not None}
                             for g in (*groups, "wrk", "host_us")}
        row["cpu_runs"] = [r.get("cpu") for r in rs]
        if anchor and name != anchor:
            row["ratio_rps" if not audio else "ratio"] = [round(x[rate] / y[rate], 3) if x.get(rate) and y.get(rate)
                            else None for x, y in zip(rs, runs[anchor])]
        res["servers"][name] = row
    return res
