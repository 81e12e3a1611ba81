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
from shmmel.osutil import pid_alive
from shmmel.shm import Shm

from .conftest import wait_for


def test_a_crash_looping_worker_backs_off_while_the_others_serve(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "2", "--http-workers", "1")
    shm = Shm.attach(d.instance)
    try:
        for n in range(5):  # die 5 times in a row: respawned at once, then after .5, 1, 2, 4 s
            wait_for(lambda: shm.workers["state"][0] == L.W_READY, timeout=40,
                     what=f"worker 0 ready before kill {n}")
            old = int(shm.workers["pid"][0])
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: shm.workers["state"][0] != L.W_READY
                     or int(shm.workers["pid"][0]) != old, timeout=20, what="death seen",
                     interval=0.005)
        wait_for(lambda: shm.workers["state"][0] == L.W_BACKOFF, timeout=5, interval=0.01,
                 what="worker 0 in backoff")
        backoff = next(w for w in d.status()["workers"] if w["index"] == 0)
        assert backoff["state"] == "backoff", backoff  # 4 s: time enough to read it
        assert backoff["respawn_in_s"] > 0 and backoff["recent_crashes"] >= 5
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
        wait_for(lambda: before.get("200", 0) >= 50, timeout=30, what="load flowing")
        with lock:
            base = dict(before)
        os.kill(w0, signal.SIGSTOP)

        def since_stop() -> dict[str, int]:
            with lock:
                return {k: before.get(k, 0) - base.get(k, 0) for k in before}

        # stall detection within ~1 s, then all traffic on worker 1 (the old code served
        # nothing until heartbeat_timeout, 30 s)
        wait_for(lambda: since_stop().get("200", 0) > 100, timeout=8,
                 what="over 100 requests served with worker 0 stopped")
        during = since_stop()
    finally:
        stop.set()
        for t in threads:
            t.join(35)
        if pid_alive(w0):
            os.kill(w0, signal.SIGCONT)
    assert during.get("200", 0) > 100, during  # the old code served 0 from here to 30 s
    assert during.get("error", 0) == 0 and not before.get("slow"), before


def _probe(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/process", json.dumps({"message": "p"}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - t0
    finally:
        conn.close()


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_slow_clients_hold_no_thread_and_time_out(daemon_factory):
    """500 connections dripping their headers a byte at a time: normal requests are still
    answered within 1 s (the old code served 0 of 10 while 40 dripped); a dripping
    connection is answered 408 (JSON) at header_timeout; a Content-Length body sent far
    below min_body_rate is cut off."""
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "2",
                       extra_env={"SHMMEL_HEADER_TIMEOUT": "4", "SHMMEL_MIN_BODY_RATE": "1000"})
    socks = []
    try:
        idle = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        socks.append(idle)
        idle.sendall(b"GET /healthz HTTP/1.1\r\n")  # then nothing: it gets the 408 below
        t_start = time.monotonic()
        for _ in range(500):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            s.sendall(b"POST /process HTTP/1.1\r\n")
            socks.append(s)
        probes = []
        for i in range(6):  # 3 s of dripping, a probe every half second
            for s in socks[1:]:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
            probes.append(_probe(d.port))
            time.sleep(0.5)
        assert all(code == 200 for code, _ in probes), probes
        assert max(t for _, t in probes) < 1.0, probes
        # at header_timeout (4 s after the first byte) a connection is answered 408, closed
        idle.settimeout(max(0.1, t_start + 8 - time.monotonic()))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = idle.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"] == "Request Timeout" and "header" in body["detail"]
    finally:
        for s in socks:
            s.close()
    # a body dripped far below min_body_rate is cut off after the grace period
    with socket.create_connection(("127.0.0.1", d.port), timeout=15) as s:
        s.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 60000\r\n\r\n{")
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 12:
            try:
                s.sendall(b" ")
                s.settimeout(1.0)
                if s.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 11
    assert _probe(d.port)[0] == 200


def test_malformed_http_is_answered_in_json(daemon):
    cases = {
        b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n":
            400,
        b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n": 400,
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": 414,
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n": 431,
    }
    for raw, status in cases.items():
        answer = _raw(daemon.port, raw, timeout=5)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status), (raw[:60], head)
        assert b"Content-Type: application/json" in head
        doc = json.loads(body)
        assert set(doc) == {"error", "detail"} and doc["detail"]


def test_detached_log_is_private_and_never_follows_a_symlink(tmp_path):
    from shmmel.config import Config
    from shmmel.control import default_log_file, open_log

    path = tmp_path / "x.log"
    os.close(open_log(path))
    assert (path.stat().st_mode & 0o777) == 0o600
    target = tmp_path / "victim"
    target.write_text("keep")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    try:
        os.close(open_log(link))
        raise AssertionError("a symlink was followed")
    except OSError:
        pass
    assert target.read_text() == "keep"
    runtime = tmp_path / "run"
    runtime.mkdir()
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        assert default_log_file(Config(instance="zz")) == runtime / "shmmel-zz.log"
    finally:
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old


def test_kept_alive_connection_with_partial_next_headers_gets_408(daemon_factory):
    """A kept-alive connection whose next request's headers arrive in part (here pipelined
    behind the first request, so the thread lingering on it, http_linger_ms, reads them) is
    answered 408 at header_timeout like any other, not closed silently at the keep-alive
    timeout (5 s)."""
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "1",
                       extra_env={"SHMMEL_HEADER_TIMEOUT": "1.5", "SHMMEL_HTTP_LINGER_MS": "50"})
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        answer = b""
        while answer.count(b"HTTP/1.1 ") < 2 or not answer.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    second = answer[answer.index(b"HTTP/1.1 ", 1):]
    assert second.startswith(b"HTTP/1.1 408"), answer[-300:]
    assert json.loads(second.split(b"\r\n\r\n", 1)[1])["error"] == "Request Timeout"
    assert elapsed < 4.5, elapsed
