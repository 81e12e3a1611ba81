"""Where an HTTP process's CPU goes under an audio load, shmmel against the bare app.

For each server (shmmel with the default settings, shmmel with each variant's environment,
the bare gunicorn+Falcon app), rotating ``GP_REPS`` rounds: ``shmmel bench audio --pace fast``
on one phase; once its measured part runs, the CPU of every HTTP process over 5 s (so the
CPU per file or chunk, with the bench's rate) and ``py-spy record --gil`` of one HTTP process
(the Python it runs holding the GIL). Needs py-spy (GPU host: ../shared/device/stage
py-spy==0.4.3). Usage:

    GP_REPS=2 GP_VARIANTS="off:SHMMEL_MALLOC_KEEP_MB=0" \
        python3 bench/profile_gil_audio.py OUT files|chunks STREAMS HTTP KIND WORKERS

GP_VARIANTS: ``name:K=V,K=V;name2:...``; GP_BARE=0 leaves the bare app out; GP_NATIVE=1 also
records a second HTTP process with ``py-spy --idle --native`` (where its threads wait).
"""
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_cpu import group_times
from compare_lib import Instance, _children, _cmdline, bare


def profile(out: Path, url: str, pids: list[int], tag: str, phase: str, streams: str,
            http: int) -> None:
    log = out / f"bench_{tag}.log"
    with log.open("w") as fh:
        b = subprocess.Popen([sys.executable, "-m", "shmmel_cli.main", "bench", "audio",
                              "--url", url, "--streams", streams, "--pace", "fast",
                              "--phases", phase, "-d", "10", "--warmup", "1", "--no-verify",
                              "--gpu-index", "-1", "--http-workers", str(http)],
                             stdout=fh, stderr=subprocess.STDOUT)
        for _ in range(300):  # sample once the measured part runs (its first progress line)
            if "/10 s" in log.read_text():
                break
            time.sleep(0.1)
        native = None
        if os.environ.get("GP_NATIVE") == "1" and len(pids) > 1:  # where threads wait, C
            native = subprocess.Popen(  # frames included (take_gil: waiting for the GIL)
                ["py-spy", "record", "--idle", "--native", "-f", "raw", "-r", "200", "-d", "5",
                 "-o", str(out / f"native_{tag}.txt"), "--pid", str(pids[1])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        g0, t0 = group_times(pids), time.time()
        subprocess.run(["py-spy", "record", "--gil", "-f", "raw", "-r", "500", "-d", "5",
                        "-o", str(out / f"gil_{tag}.txt"), "--pid", str(pids[0])],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        g1, t1 = group_times(pids), time.time()
        if native is not None:
            native.wait()
        b.wait()
    rates = [line for line in log.read_text().splitlines() if "/s " in line][-2:]
    # user and system cores, voluntary and involuntary context switches a second: the CPU
    # a request spent outside the GIL shows as system time or as switches (GIL hand-overs)
    per_s = [round((b1 - a1) / (t1 - t0), 2) for a1, b1 in zip(g0, g1)]
    print(tag, "cores", round(per_s[0] + per_s[1], 2), "user/sys/vcs/ivcs a second", per_s,
          rates, flush=True)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(exist_ok=True, parents=True)
    phase, streams, http, kind, workers = (sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                           sys.argv[5], int(sys.argv[6]))
    envs: dict[str, dict[str, str]] = {"shmmel": {}}
    for spec in os.environ.get("GP_VARIANTS", "").split(";"):
        if spec:
            name, _, kv = spec.partition(":")
            envs[name] = dict(x.split("=", 1) for x in kv.split(",") if x)
    for rep in range(int(os.environ.get("GP_REPS", "1"))):
        for name, env in envs.items():
            with Instance(out, http, 16, workers, kind, env=env) as inst:
                pids = [h["pid"] for h in inst.status()["http"]]
                profile(out, inst.url, pids, f"{name}{rep}", phase, streams, http)
        if os.environ.get("GP_BARE", "1") == "1":
            with bare(out, http, 16) as b:
                masters = [k for k in _children(os.getpid()) if b"baseline_app" in _cmdline(k)]
                profile(out, b.url, _children(masters[0]), f"bare{rep}", phase, streams, http)


if __name__ == "__main__":
    main()
