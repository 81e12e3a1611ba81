"""Several devices end to end, with fake devices (SHMMEL_FAKE_DEVICES: CPU workers that report
device ordinals): streams spread over the devices, a device whose workers are killed under
load gets no new streams until one is back and no request hangs, a device that cannot boot
is skipped, and an instance none of whose devices boots stops with a clear message."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import http.client
import json
import os
import signal
import threading

import numpy as np

from shmmel import layout as L
from shmmel.shm import Shm

from .conftest import Daemon, run_cli, stop_daemon, wait_for

FAKE2 = {"SHMMEL_FAKE_DEVICES": "2", "SHMMEL_WHISPER_WORKERS": "0"}
CHUNK = (np.sin(np.arange(3200) / 9.0) * 6000).astype("<i2").tobytes()  # 0.2 s


def call(d, method: str, path: str, body: bytes | None = None, timeout: float = 15.0):
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
    try:
        conn.request(method, path, body=body,
                     headers={"Content-Type": "audio/L16;rate=16000"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def open_stream(d) -> tuple[str, int]:
    status, raw = call(d, "POST", "/audio/streams")
    assert status == 201, raw
    body = json.loads(raw)
    return body["stream_id"], body["worker"]


def test_streams_spread_and_a_killed_device_gets_no_new_streams(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--http-workers", "2",
                       extra_env={**FAKE2, "SHMMEL_WORKERS_PER_DEVICE": "2"})
    info = all_ready(d)
    assert {w["index"]: w["device"] for w in info["workers"]} == {0: 0, 1: 1, 2: 0, 3: 1}
    assert [(r["device"], r["state"], r["ready"]) for r in info["devices"]] == \
        [(0, "serving", 2), (1, "serving", 2)]
    check_streams_spread_and_device_outage(d)


def all_ready(d, but: tuple[int, ...] = ()) -> dict:
    """The status once every mel worker (but those on devices ``but``) is ready (`shmmel
    up` returns once one is) and every worker has said which device it took."""
    def done() -> dict | None:
        info = d.status()
        mel = [w for w in info["workers"] if w["kind"] != "whisper"]
        ok = all(w["device"] >= 0 and (w["state"] == "ready" or w["device"] in but)
                 for w in mel)
        return info if ok else None

    return wait_for(done, 60, what="every worker ready")


def check_streams_spread_and_device_outage(d, streams: int = 16) -> None:
    """On a daemon with two devices (0 and 1): a burst of opens spreads evenly; then, under
    load (pushes on every stream, one-shot uploads), every worker of device 1 is killed
    twice (the second death backs off): while device 1 has no ready worker, every new
    stream goes to device 0, no request hangs, device 0's requests all succeed; once device
    1 is back, the next stream goes to it. Shared with the two-GPU test."""
    dev = {w["index"]: w["device"] for w in all_ready(d)["workers"] if w["kind"] != "whisper"}
    with cf.ThreadPoolExecutor(8) as pool:
        opened = list(pool.map(lambda _: open_stream(d), range(streams)))
    per_device = [sum(dev[w] == k for _, w in opened) for k in (0, 1)]
    # each HTTP process places its opens one at a time (under its thread lock), but the two
    # processes' choices race without a lock: one such race puts a stream on the busier
    # device (9/7 was seen in CI). Opens one at a time then even it out, each one going to
    # the device with fewer streams.
    assert abs(per_device[0] - per_device[1]) <= 2, per_device
    for _ in range(2):
        opened.append(open_stream(d))
        per_device[dev[opened[-1][1]]] += 1
    even = (streams + 2) // 2
    assert per_device == [even, even]
    assert [r["streams"] for r in d.status()["devices"]] == [even, even]
    metrics = call(d, "GET", "/metrics")[1].decode()
    assert f'shmmel_device_streams{{device="1"}} {even}.0' in metrics

    stop, results, errors = threading.Event(), [], []

    def load(mine: list[tuple[str, int]]) -> None:
        try:
            while not stop.is_set():
                for sid, k in mine:
                    results.append((dev[k], call(d, "POST", f"/audio/streams/{sid}", CHUNK)[0]))
                results.append(("oneshot", call(d, "POST", "/audio/stream", CHUNK)[0]))
        except Exception as exc:  # noqa: BLE001 - a timeout here is a hung request
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(opened[i::4],), daemon=True)
               for i in range(4)]
    for t in threads:
        t.start()
    shm = Shm.attach(d.instance)
    try:
        w = shm.workers
        ones = [k for k in dev if dev[k] == 1]

        def down() -> bool:
            return all(int(w["state"][k]) != L.W_READY for k in ones)

        # kill every worker of device 1 twice: the second death backs off 0.5 s, a window
        # in which device 1 has no ready worker at all
        for _ in range(2):
            gens = {k: int(w["gen"][k]) for k in ones}
            wait_for(lambda: all(int(w["state"][k]) == L.W_READY for k in ones), 60,
                     what="device 1 workers ready")
            for k in ones:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(w["pid"][k]), signal.SIGKILL)
            # reaped (the first death is respawned at once, the second backs off)
            wait_for(lambda g=gens: all(int(w["gen"][k]) > g[k] for k in ones), 5,
                     what="the supervisor to reap device 1's workers")
        wait_for(down, 5, what="device 1 down")
        checked = 0
        while down():
            sid, worker = open_stream(d)
            if down():  # device 1 had no ready worker for the whole open
                assert dev[worker] == 0, f"stream {sid} placed on down device 1"
                checked += 1
        assert checked >= 3, "the outage window was too short to check any placement"
        wait_for(lambda: not down(), 60, what="device 1 back")
        # back: it holds fewer streams, so the next opens go to it
        assert dev[open_stream(d)[1]] == 1
    finally:
        shm.close()
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not errors, errors
    seen = {(where, status): results.count((where, status)) for where, status in set(results)}
    # device 0 was never touched: every push of its streams and every upload succeeded;
    # device 1's streams were lost with their workers: 503 (worker died), then 404 (freed)
    assert {k for k in seen if k[0] != 1} <= {(0, 200), ("oneshot", 200)}, seen
    assert {k for k in seen if k[0] == 1} <= {(1, 200), (1, 503), (1, 404)}, seen
    assert seen.get((0, 200), 0) > 10 and seen.get(("oneshot", 200), 0) > 5, seen
    assert d.status()["state"] == "running"


def test_a_device_that_cannot_boot_is_skipped(daemon_factory):
    # device 2 is listed but not present: its worker fails to boot, devices 0 and 1 serve
    d = daemon_factory("--worker-kind", "cpu", "--workers", "3",
                       extra_env={**FAKE2, "SHMMEL_DEVICES": "0,1,2"})
    info = all_ready(d, but=(2,))
    rows = {r["device"]: r for r in info["devices"]}
    assert rows[2]["state"] == "down" and rows[2]["ready"] == 0
    assert rows[0]["state"] == rows[1]["state"] == "serving"
    assert {dev for _, w in (open_stream(d) for _ in range(4))
            for dev in [info["workers"][w]["device"]]} == {0, 1}
    assert call(d, "POST", "/audio/stream", CHUNK)[0] == 200
    wait_for(lambda: "could not boot on device 2" in d.log(), 10, what="the log line")
    assert "device 2 is not present (2 fake devices)" in d.log()
    text = run_cli("status", "--instance", d.instance, env=d.env).stdout
    devices = text[text.index("devices"):text.index("HTTP processes")]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in devices.splitlines()
             if line.startswith("│")]
    assert [c[:3] for c in cells] == [["0", "serving", "1/1"], ["1", "serving", "1/1"],
                                      ["2", "down", "0/1"]]


def test_no_device_boots_stops_the_instance(tmp_path):
    env = {**os.environ, **FAKE2, "SHMMEL_DEVICES": "5,6",
           "SHMMEL_LOG_FILE": str(tmp_path / "none.log")}
    instance = f"t{os.getpid()}nodev"
    try:
        proc = run_cli("up", "--instance", instance, "--port", "0", "--worker-kind", "cpu",
                       env=env, check=False, timeout=60)
        assert proc.returncode == 1
        assert "could not boot on device" in proc.stderr
        assert "no worker of its kind is running" in proc.stderr
    finally:
        stop_daemon(Daemon(instance, env, tmp_path / "none.log"))
