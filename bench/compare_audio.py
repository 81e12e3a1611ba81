"""The audio items of bench/compare.py: one-shot uploads with wrk, ``bench audio`` fast
streams against the bare app, real-time streams up to and over ``max_streams``.

The over-limit check (:func:`hold_streams`) opens the admitted streams first and waits until
every one is open; only then do their real-time chunks start, and the extra streams are
attempted in the middle third of the run, so the refusals and the admitted streams'
per-chunk latency before, during and after them are measured on a full table. Standalone
(any running instance, e.g. ``shmmel up -i lim`` with ``SHMMEL_MAX_STREAMS=50``)::

    python bench/compare_audio.py --url http://127.0.0.1:PORT --streams 50 --extra 10
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_lib import Instance, bare, bench_cli, log, summary_runs, wrk, _lat  # noqa: E402

L16 = "audio/L16;rate=16000"

def one_second_s16le(path: Path) -> Path:
    import numpy as np
    t = np.arange(16000) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(1).standard_normal(16000)
    path.write_bytes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def item_oneshot(a, out: Path) -> dict:
    body = one_second_s16le(out / "one_second.s16le")
    env = {"BODY_FILE": str(body)}
    path = "/audio/stream?format=binary"
    res: dict = {"http_workers": a.audio_http, "http_threads": a.threads, "configs": []}
    with bare(out, a.audio_http, a.threads) as b:
        wrk(b.url + path, "wrk_oneshot.lua", env, 4, a.audio_conns, 1, "bare oneshot warm-up", out)
        bruns = [wrk(b.url + path, "wrk_oneshot.lua", env, 4, a.audio_conns, a.dur,
                     f"bare oneshot #{i + 1}", out) for i in range(a.reps)]
    res["bare"] = summary_runs(bruns)
    for w in a.audio_workers:
        with Instance(out, a.audio_http, a.threads, w, a.audio_kind) as inst:
            wrk(inst.url + path, "wrk_oneshot.lua", env, 4, a.audio_conns, 1,
                f"oneshot w{w} warm-up", out)
            runs = [wrk(inst.url + path, "wrk_oneshot.lua", env, 4, a.audio_conns, a.dur,
                        f"shmmel oneshot {a.audio_kind} w{w} #{i + 1}", out)
                    for i in range(a.reps)]
        s = summary_runs(runs)
        res["configs"].append({**inst.desc, "shmmel": s, "health": inst.health,
                               "bytes_per_response": runs[-1].get("bytes_per_response"),
                               "ratio_rps": round(s["rps_mean"] / res["bare"]["rps_mean"], 3),
                               "ratio_p99": round(s["p99_mean"] / res["bare"]["p99_mean"], 3)})
    return res


def item_audio(a, out: Path) -> dict:
    reps = []
    for i in range(a.reps_audio):
        save = out / f"audio_fast64_{i + 1}.json"
        rc, _ = bench_cli(["audio", "--spawn", "--worker-kind", a.audio_kind,
                           "-w", str(a.audio_fast_workers),
                           "--http-workers", str(a.audio_http), "--streams", str(a.streams_fast),
                           "--pace", "fast", "--baseline", "-d", f"{a.audio_dur:g}",
                           "--warmup", "1", "--save", str(save), "--log-dir", str(out)],
                          f"audio fast #{i + 1}", out)
        d = json.loads(save.read_text()) if save.exists() else {}
        reps.append({"rc": rc, "vs_baseline": d.get("vs_baseline"),
                     "chunk_p50_ms": _lat(d, "shmmel", "chunks", "chunk_ms", "p50"),
                     "bare_chunk_p50_ms": _lat(d, "baseline", "chunks", "chunk_ms", "p50"),
                     "chunk_p99_ms": _lat(d, "shmmel", "chunks", "chunk_ms", "p99"),
                     "bare_chunk_p99_ms": _lat(d, "baseline", "chunks", "chunk_ms", "p99"),
                     "files_audio_s_per_s": _lat(d, "shmmel", "files", "audio_s_per_s", "mean"),
                     "bare_files_audio_s_per_s": _lat(d, "baseline", "files", "audio_s_per_s",
                                                      "mean"),
                     "errors": (d.get("shmmel") or {}).get("error_count"),
                     "bare_errors": (d.get("baseline") or {}).get("error_count")})
        log(f"  audio fast #{i + 1}: {reps[-1]}")
    return {"reps": reps}


def _streams_args(inst: Instance, streams: int, dur: float, warmup: float, save: Path) -> list:
    return ["audio", "-i", inst.name, "--streams", str(streams), "--pace", "realtime",
            "--phases", "chunks", "-d", f"{dur:g}", "--warmup", f"{warmup:g}", "--no-verify",
            "--save", str(save)]


def _chunks(save: Path) -> dict:
    d = json.loads(save.read_text()) if save.exists() else {}
    ch = (d.get("shmmel") or {}).get("chunks") or {}
    return {"chunks": ch.get("chunks"), "errors": ch.get("errors"),
            "error_count": ch.get("error_count"), "chunk_ms": ch.get("chunk_ms"),
            "first_chunk_ms": ch.get("first_chunk_ms")}


def item_streams(a, out: Path) -> dict:
    res: dict = {}
    # 1. a.streams real-time streams, the limit above them
    limit = a.streams + 24
    with Instance(out, a.streams_http, a.streams_threads, 2, a.audio_kind,
                  env={"SHMMEL_MAX_STREAMS": str(limit)}) as inst:
        save = out / f"streams_{a.streams}.json"
        rc, _ = bench_cli(_streams_args(inst, a.streams, a.streams_dur, a.streams_warmup, save),
                          f"streams {a.streams} (max_streams {limit})", out)
    res["admitted_only"] = {**inst.desc, "streams": a.streams, "max_streams": limit, "rc": rc,
                            **_chunks(save), "health": inst.health}
    log(f"  streams {a.streams}: {res['admitted_only']}")
    # 2. a.streams admitted and all open, then a.streams_over - a.streams more attempted
    extra = a.streams_over - a.streams
    with Instance(out, a.streams_http, a.streams_threads, 2, a.audio_kind,
                  env={"SHMMEL_MAX_STREAMS": str(a.streams)}) as inst:
        r = hold_streams(inst.url, a.streams, extra, window=a.streams_dur,
                         warmup=a.streams_warmup)
    res["over_limit"] = {**inst.desc, "max_streams": a.streams, **r, "health": inst.health}
    (out / "streams_over.md").write_text(markdown(r, f"{a.streams} admitted + {extra} over "
                                                     f"max_streams {a.streams}"))
    log(f"  over the limit: {res['over_limit']}")
    return res


# -- the over-limit check: admitted streams held open, extra ones attempted ------------------
def _pcts(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    x = sorted(ms)
    at = lambda q: round(x[min(len(x) - 1, math.ceil(q * len(x)) - 1)], 2)  # noqa: E731
    return {"n": len(x), "p50": at(0.50), "p99": at(0.99), "max": round(x[-1], 2)}


def _chunk_pcm(seconds: float) -> bytes:
    import numpy as np
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(2).standard_normal(n)
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _hold_proc(url: str, ks: list[int], n: int, chunk_s: float, end_rel: float,
               opened_q, go, t0_val, res_q) -> None:
    """One process of the admitted streams: open each (a thread and a keep-alive connection
    per stream), report, wait for ``go``, send real-time chunks until ``t0 + end_rel``,
    finish each stream, report every chunk as (intended - t0, latency ms, status)."""
    host, port = url.split("//")[1].split(":")
    pcm = _chunk_pcm(chunk_s)
    lock = threading.Lock()
    opened: Counter = Counter()
    chunks: list[tuple[float, float, int]] = []
    ready = threading.Barrier(len(ks) + 1)

    def stream(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        sid = None
        try:
            try:
                status, sid = _open_stream(conn)
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
            with lock:
                opened[str(status)] += 1
            ready.wait()
            go.wait()
            if sid is None:
                return
            t0 = t0_val.value
            i = 0
            mine = []
            while True:
                rel = (k / n) * chunk_s + i * chunk_s
                if rel >= end_rel:
                    break
                time.sleep(max(0.0, t0 + rel - time.monotonic()))
                try:
                    conn.request("POST", f"/audio/streams/{sid}", body=pcm,
                                 headers={"Content-Type": L16,
                                          "Accept": "application/octet-stream"})
                    resp = conn.getresponse()
                    resp.read()
                    st = resp.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    st = 0
                mine.append((rel, (time.monotonic() - t0 - rel) * 1e3, st))
                i += 1
            with lock:
                chunks.extend(mine)
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn.request("DELETE", f"/audio/streams/{sid}",
                             headers={"Accept": "application/octet-stream"})
                conn.getresponse().read()
        finally:
            conn.close()

    threads = [threading.Thread(target=stream, args=(k,), daemon=True) for k in ks]
    for t in threads:
        t.start()
    ready.wait()
    opened_q.put(dict(opened))
    for t in threads:
        t.join()
    res_q.put(chunks)


def _open_stream(conn: http.client.HTTPConnection) -> tuple[int, str | None]:
    """``POST /audio/streams`` on ``conn``: (status, the stream id when it was opened)."""
    conn.request("POST", "/audio/streams", body=b"", headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, (json.loads(body)["stream_id"] if resp.status == 201 else None)


def _attempt(url: str, until: float, out: list, lock: threading.Lock, pause: float) -> None:
    """Open streams until ``until`` (monotonic), one at a time, ``pause`` apart: each as
    (time, status, latency ms); an admitted one is finished at once (and counted)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        while True:
            t = time.monotonic()
            try:
                st, sid = _open_stream(conn)
            except (OSError, http.client.HTTPException):
                conn.close()
                st, sid = 0, None
            ms = (time.monotonic() - t) * 1e3
            with lock:
                out.append((t, st, ms))
            if sid is not None:
                conn.request("DELETE", f"/audio/streams/{sid}")
                conn.getresponse().read()
            if time.monotonic() + pause >= until:
                break
            time.sleep(pause)
    finally:
        conn.close()


def hold_streams(url: str, n: int, extra: int, window: float = 6.0, warmup: float = 2.0,
                 chunk_s: float = 1.0, procs: int | None = None, pause: float = 0.5) -> dict:
    """``n`` real-time session streams, all opened before any chunk; then ``warmup`` s,
    then three windows of ``window`` s: before, during (``extra`` clients try to open a
    stream at once, then every ``pause`` s), after. Per window the admitted streams'
    per-chunk latency (from each chunk's intended send time) and errors; the extra
    attempts' statuses and latency (the first wave apart)."""
    procs = procs or max(1, min(8, math.ceil(n / 128)))
    ctx = mp.get_context("fork")
    opened_q, res_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    t0_val = ctx.Value("d", 0.0)
    end_rel = warmup + 3 * window
    shares = [list(range(p, n, procs)) for p in range(procs)]
    workers = [ctx.Process(target=_hold_proc, args=(url, ks, n, chunk_s, end_rel, opened_q,
                                                      go, t0_val, res_q), daemon=True)
               for ks in shares if ks]
    t_open = time.monotonic()
    for w in workers:
        w.start()
    opened: Counter = Counter()
    for _ in workers:
        opened.update(opened_q.get(timeout=120))
    open_s = time.monotonic() - t_open
    log(f"  {n} streams: opens {dict(opened)} in {open_s:.1f} s; chunks start")
    t0 = time.monotonic() + 0.5
    t0_val.value = t0
    go.set()
    # the extra clients, in the middle window
    attempts: list[tuple[float, int, float]] = []
    lock = threading.Lock()
    start_at, stop_at = t0 + warmup + window, t0 + warmup + 2 * window
    time.sleep(max(0.0, start_at - time.monotonic()))
    clients = [threading.Thread(target=_attempt, args=(url, stop_at, attempts, lock, pause),
                                daemon=True) for _ in range(extra)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(timeout=window + 60)
    chunks: list[tuple[float, float, int]] = []
    for _ in workers:
        chunks.extend(res_q.get(timeout=end_rel + 120))
    for w in workers:
        w.join(timeout=30)
    windows = {}
    for name, lo in (("before", warmup), ("during", warmup + window),
                     ("after", warmup + 2 * window)):
        sel = [c for c in chunks if lo <= c[0] < lo + window]
        bad = Counter(str(st) for _, _, st in sel if st != 200)
        windows[name] = {**_pcts([ms for _, ms, st in sel if st == 200]),
                         "errors": sum(bad.values()), "statuses": dict(bad)}
    first = sorted(attempts)[:extra]
    refused = [ms for _, st, ms in attempts if st == 503]
    res = {"streams": n, "extra": extra, "window_s": window, "warmup_s": warmup,
           "procs": len(workers), "opened": dict(opened), "open_s": round(open_s, 2),
           "chunks": windows,
           "extra_attempts": len(attempts),
           "extra_statuses": dict(Counter(str(st) for _, st, _ in attempts)),
           "extra_first_wave_ms": _pcts([ms for _, _, ms in first]),
           "extra_refused_ms": _pcts(refused)}
    log(f"  over the limit: {json.dumps(res)}")
    return res


def markdown(r: dict, title: str) -> str:
    """The over-limit result as a markdown table."""
    rows = [f"**{title}**: {r['streams']} streams admitted (opens: {r['opened']}, "
            f"{r['open_s']} s), then {r['extra']} more clients opening streams in the middle "
            f"{r['window_s']:g} s window ({r['extra_attempts']} attempts, statuses "
            f"{r['extra_statuses']}).", "",
            "| admitted streams' chunks | chunks | p50 ms | p99 ms | max ms | errors |",
            "|---|---|---|---|---|---|"]
    for name in ("before", "during", "after"):
        w = r["chunks"][name]
        rows.append(f"| {name} the extra opens | {w['n']} | {w.get('p50')} | {w.get('p99')} "
                    f"| {w.get('max')} | {w['errors']} {w['statuses'] or ''} |")
    fw, rf = r["extra_first_wave_ms"], r["extra_refused_ms"]
    rows += ["", "| extra opens | n | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|",
             f"| first wave (all at once) | {fw['n']} | {fw.get('p50')} | {fw.get('p99')} "
             f"| {fw.get('max')} |",
             f"| every refusal (503) | {rf['n']} | {rf.get('p50')} | {rf.get('p99')} "
             f"| {rf.get('max')} |"]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="real-time streams held open at max_streams, "
                                             "extra opens refused (see the module doc)")
    ap.add_argument("--url", required=True, help="a running instance (max_streams = --streams)")
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--extra", type=int, default=10)
    ap.add_argument("--window", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--procs", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--md", help="append the markdown table here")
    a = ap.parse_args(argv)
    r = hold_streams(a.url.rstrip("/"), a.streams, a.extra, a.window, a.warmup,
                     procs=a.procs or None)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    md = markdown(r, f"{a.streams} + {a.extra} streams")
    if a.md:
        with open(a.md, "a") as f:
            f.write(md + "\n")
    print(md)
    ok = (r["opened"].get("201") == a.streams and "201" not in r["extra_statuses"]
          and all(w["errors"] == 0 for w in r["chunks"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
