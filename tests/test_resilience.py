"""Staying up: a crash-looping worker, a stopped worker under load, slow clients, bad HTTP.

Each test starts the real daemon and talks HTTP to it (see conftest), and cleans up.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

from shmmel import layout as L
from shmmel.channel import pid_alive
from shmmel.shm import Shm

from .conftest import wait_for


def test_a_crash_looping_worker_backs_off_while_the_others_serve(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "2", "--http-workers", "1")
    shm = Shm.attach(d.instance)
    try:
        for n in range(4):  # die 4 times in a row: respawned at once, then after 0.5, 1, 2 s
            wait_for(lambda: shm.workers["state"][0] == L.W_READY, timeout=15,
                     what=f"worker 0 ready before kill {n}")
            old = int(shm.workers["pid"][0])
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: shm.workers["state"][0] != L.W_READY
                     or int(shm.workers["pid"][0]) != old, timeout=5, what="death seen",
                     interval=0.005)
            if n == 3:
                break
        backoff = wait_for(lambda: next((w for w in d.status()["workers"] if w["index"] == 0
                                         and w["state"] == "backoff"), None),
                           timeout=5, what="worker 0 in backoff")
        assert backoff["respawn_in_s"] > 0 and backoff["recent_crashes"] >= 3
        # the instance keeps serving on worker 1 meanwhile (the old code stopped it all
        # after 10 deaths in 60 s)
        for _ in range(20):
            assert d.post_json("/process", {"message": "ab"}) == (200, {"result": "ba"})
        metrics = d.request("GET", "/metrics")[2].decode()
        assert 'shmmel_worker_state{state="backoff",worker="0"} 1.0' in metrics
        assert 'shmmel_worker_recent_crashes{worker="0"}' in metrics
        wait_for(lambda: shm.workers["state"][0] == L.W_READY, timeout=15,
                 what="worker 0 respawned after its backoff")
        assert pid_alive(d.status()["pid"])
    finally:
        shm.close()


def _load(port: int, stop: threading.Event, counts: dict[str, int], lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"message": "hello"})
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn.request("POST", "/process", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            key = str(resp.status)
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            key = "error"
        slow = time.monotonic() - t0 > 4.0
        with lock:
            counts[key] = counts.get(key, 0) + 1
            if slow:
                counts["slow"] = counts.get("slow", 0) + 1
    conn.close()


def test_a_stopped_worker_does_not_stop_the_service(daemon_factory):
    """SIGSTOP one of two workers under 16-connection load: requests queued on it are
    re-routed after stall_timeout (1 s here), not held until heartbeat_timeout (30 s)."""
    d = daemon_factory("--worker-kind", "cpu", "--workers", "2", "--http-workers", "1",
                       extra_env={"SHMMEL_STALL_TIMEOUT": "1.0"})
    w0 = d.status()["workers"][0]["pid"]
    stop, lock = threading.Event(), threading.Lock()
    before: dict[str, int] = {}
    threads = [threading.Thread(target=_load, args=(d.port, stop, before, lock))
               for _ in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        with lock:
            base = dict(before)
        os.kill(w0, signal.SIGSTOP)
        time.sleep(4.0)  # stall detection within ~1 s, then all traffic on worker 1
        with lock:
            during = {k: before.get(k, 0) - base.get(k, 0) for k in before}
    finally:
        stop.set()
        for t in threads:
            t.join(35)
        if pid_alive(w0):
            os.kill(w0, signal.SIGCONT)
    assert during.get("200", 0) > 100, during  # the old code served 0 from here to 30 s
    assert during.get("error", 0) == 0 and not before.get("slow"), before
