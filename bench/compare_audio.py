"""The audio items of bench/compare.py: one-shot uploads with wrk, ``bench audio`` fast
streams against the bare app, real-time streams up to and over ``max_streams``."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from compare_lib import Instance, bare, bench_cli, log, summary_runs, wrk, _lat

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
        rc, _ = bench_cli(["audio", "--spawn", "--worker-kind", a.audio_kind, "-w", "2",
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


def probe_opens(url: str, stop: threading.Event, out: list) -> None:
    """POST /audio/streams every 0.2 s until ``stop``: (status, ms) each; an admitted probe
    is closed again at once."""
    host, port = url.split("//")[1].split(":")
    while not stop.wait(0.2):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        t = time.monotonic()
        try:
            conn.request("POST", "/audio/streams", body=b"",
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            out.append((resp.status, round((time.monotonic() - t) * 1e3, 2)))
            if resp.status == 201:
                sid = json.loads(body)["stream_id"]
                conn.request("DELETE", f"/audio/streams/{sid}")
                conn.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            out.append((repr(exc), round((time.monotonic() - t) * 1e3, 2)))
        finally:
            conn.close()


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
    # 2. a.streams admitted, then a.streams_over - a.streams more with the limit at a.streams
    extra = a.streams_over - a.streams
    with Instance(out, a.streams_http, a.streams_threads, 2, a.audio_kind,
                  env={"SHMMEL_MAX_STREAMS": str(a.streams)}) as inst:
        save = out / f"streams_{a.streams}_of_{a.streams_over}.json"
        cmd = [sys.executable, "-m", "shmmel_cli.main", "bench",
               *_streams_args(inst, a.streams, a.streams_dur, a.streams_warmup, save)]
        with open(out / "bench.log", "a") as f:
            f.write(f"=== streams {a.streams} admitted of {a.streams_over}\n$ {' '.join(cmd)}\n")
            f.flush()
            main = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        time.sleep(a.streams_warmup + 1)
        probes: list = []
        stop = threading.Event()
        prober = threading.Thread(target=probe_opens, args=(inst.url, stop, probes))
        prober.start()
        rc_extra, text = bench_cli(_streams_args(inst, extra, max(1.0, a.streams_dur - 3), 0.5,
                                                 out / "streams_extra.json"),
                                   f"streams {extra} over the limit", out)
        stop.set()
        prober.join()
        rc = main.wait(timeout=300)
    m = re.search(r"([\d,]+) of ([\d,]+) answers were errors \((\{.*?\})\)", text)
    refused_ms = sorted(ms for st, ms in probes if st == 503)
    res["over_limit"] = {
        **inst.desc, "streams": a.streams_over, "max_streams": a.streams, "rc": rc,
        "admitted": _chunks(save), "extra_rc": rc_extra,
        "extra_errors": m.group(0) if m else _chunks(out / "streams_extra.json"),
        "probes": len(probes), "probe_statuses": {str(k): sum(1 for st, _ in probes if st == k)
                                                  for k in {st for st, _ in probes}},
        "probe_503_ms": {"p50": refused_ms[len(refused_ms) // 2] if refused_ms else None,
                         "max": refused_ms[-1] if refused_ms else None},
        "health": inst.health}
    log(f"  over the limit: {res['over_limit']}")
    return res
