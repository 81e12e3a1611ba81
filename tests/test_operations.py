"""Operations: metrics across processes, bearer token, config, systemd unit, graceful shutdown
under load, stuck and killed workers."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shmmel import layout as L
from shmmel.osutil import pid_alive
from shmmel.client import MelClient
from shmmel.shm import Shm, instance_names

from .conftest import ROOT, run_cli, shmmel_cmd, wait_for
from .test_audio_http import as_i16, speechlike

pytestmark = pytest.mark.e2e


def scrape(d, headers=None) -> dict[str, dict[tuple, float]]:
    status, hdrs, raw = d.request("GET", "/metrics", headers=headers)
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple, float], **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in samples.items() if want <= set(k))


def test_metrics_cover_every_process(daemon_factory):
    d = daemon_factory("--workers", "2", "--http-workers", "3", "--worker-kind", "cpu",
                       extra_env={"SHMMEL_WHISPER_WORKERS": "0"})  # two workers, no more
    n = 60
    for i in range(n):  # new connections spread over the three HTTP processes
        assert d.post_json("/process", {"message": f"m{i}"})[0] == 200
    assert d.post_json("/process", {"message": 5})[0] == 400
    x = as_i16(speechlike(2.0, seed=1))
    MelClient(f"http://127.0.0.1:{d.port}").mel(x)
    m = scrape(d)
    assert total(m["shmmel_http_requests_total"], route="process", code="200") == n
    assert total(m["shmmel_http_requests_total"], route="process", code="400") == 1
    assert total(m["shmmel_http_requests_total"], route="audio_stream", code="200") == 1
    assert total(m["shmmel_http_request_duration_seconds_count"], route="process") == n + 1
    assert total(m["shmmel_http_request_duration_seconds_bucket"], route="process",
                 le="+Inf") == n + 1
    assert total(m["shmmel_worker_requests_total"]) >= n
    assert total(m["shmmel_audio_seconds_total"]) == pytest.approx(2.0)
    assert total(m["shmmel_worker_state"], state="ready") == 2
    assert total(m["shmmel_queue_depth"]) == 0
    assert total(m["shmmel_slots"], state="queued") == 0
    assert m["shmmel_uptime_seconds"][()] > 0
    # every HTTP process served some of the requests, and /metrics sums them all
    assert len([p for p in d.status()["http"] if p["requests"] > 0]) >= 2


def test_bearer_token_guards_everything_but_health(daemon_factory):
    token = "s3cret-token"
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "1",
                       extra_env={"SHMMEL_AUTH_TOKEN": token})
    status, headers, raw = d.request("POST", "/process", b'{"message": "a"}',
                                     {"Content-Type": "application/json"})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(raw)["error"] == "Unauthorized"
    bad = {"Content-Type": "application/json", "Authorization": "Bearer wrong"}
    assert d.request("POST", "/process", b'{"message": "a"}', bad)[0] == 401
    good = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, _, raw = d.request("POST", "/process", b'{"message": "ab"}', good)
    assert status == 200 and json.loads(raw) == {"result": "ba"}
    assert d.request("GET", "/metrics")[0] == 401
    assert d.request("GET", "/healthz")[0] == 200
    assert d.request("GET", "/readyz")[0] == 200
    # the token is in no process's command line and `config show` masks it
    for pid in d.all_pids():
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            assert token.encode() not in fh.read()
    shown = run_cli("config", "show", "--json", env=d.env).stdout
    assert token not in shown and json.loads(shown)["values"]["auth_token"] == "***"


def test_config_show_and_invalid_settings(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[shmmel]\nworkers = 3\n")
    env = dict(os.environ, SHMMEL_HTTP_WORKERS="5")
    out = json.loads(run_cli("config", "show", "--config", str(cfg), "--json", env=env).stdout)
    assert out["values"]["workers"] == 3 and out["sources"]["workers"] == f"file:{cfg}"
    assert out["values"]["http_workers"] == 5 and out["sources"]["http_workers"] == "env"
    proc = run_cli("up", "--workers", "0", "--instance", "never", check=False)
    assert proc.returncode == 1 and "workers" in proc.stderr
    proc = run_cli("up", "--instance", "bad.name", check=False)
    assert proc.returncode == 1 and "instance" in proc.stderr
    assert instance_names("never") == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "systemd" / "shmmel.service").read_text()
    assert "--foreground" in unit and "Restart=on-failure" in unit
    for key in ("NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict",
                "RuntimeDirectory=shmmel", "User=shmmel"):
        assert key in unit
    # point it at this checkout's executable and an existing user, then let systemd check it
    exe = shmmel_cmd()[0] if len(shmmel_cmd()) == 1 else sys.executable
    unit = unit.replace("/opt/shmmel/.venv/bin/shmmel", exe)
    unit = unit.replace("User=shmmel", "User=root").replace("Group=shmmel", "Group=root")
    path = tmp_path / "shmmel.service"
    path.write_text(unit)
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_foreground_mode_stays_attached_and_stops_on_sigterm(tmp_path):
    instance = f"fg{os.getpid()}"
    env = dict(os.environ, SHMMEL_LOG_FILE=str(tmp_path / "fg.log"))
    proc = subprocess.Popen([*shmmel_cmd(), "up", "--foreground", "--port", "0", "--instance",
                             instance, "--worker-kind", "cpu", "--workers", "1",
                             "--http-workers", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: instance_names(instance) and pid_alive(proc.pid), timeout=30,
                 what="foreground instance up")
        shm = wait_for(lambda: _attach_ready(instance), timeout=30, what="workers ready")
        assert int(shm.header["supervisor_pid"]) == proc.pid  # the CLI process itself
        shm.close()
        proc.send_signal(signal.SIGTERM)  # what systemd sends
        assert proc.wait(30) == 0
        assert instance_names(instance) == []
        assert "stopped; shared memory unlinked" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _attach_ready(instance: str) -> Shm | None:
    try:
        shm = Shm.attach(instance)
    except Exception:  # noqa: BLE001 - not created yet
        return None
    if (shm.workers["state"] == L.W_READY).all() and shm.header["state"] == L.INST_RUNNING:
        return shm
    shm.close()
    return None


def test_shutdown_under_load_answers_everything_it_accepted(daemon_factory):
    d = daemon_factory("--workers", "2", "--http-workers", "2", "--worker-kind", "cpu")
    pids = d.all_pids()
    stop = threading.Event()
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20)
            try:
                conn.request("POST", "/process", b'{"message": "abc"}',
                             {"Content-Type": "application/json", "Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                key = str(resp.status)
                if resp.status != 200 or json.loads(body) != {"result": "cba"}:
                    bad.append(f"{resp.status} {body[:100]!r}")
            except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected,
                    BrokenPipeError):
                key = "refused"  # never accepted: the listener is closed
                time.sleep(0.01)
            finally:
                conn.close()
            with lock:
                outcomes[key] = outcomes.get(key, 0) + 1

    lines: list[dict] = []

    def audio() -> None:  # a real-time stream still sending when the shutdown begins
        x = as_i16(speechlike(20.0, seed=3))
        for b in MelClient(f"http://127.0.0.1:{d.port}").stream(x, chunk_s=0.1, realtime=True):
            lines.append({"final": b.final, "reason": b.reason, "n": b.mel.shape[0]})

    threads = [threading.Thread(target=client) for _ in range(6)]
    streamer = threading.Thread(target=audio)
    for t in threads + [streamer]:
        t.start()
    # the shutdown begins under load: requests answered and the stream well under way
    wait_for(lambda: outcomes.get("200", 0) > 10 and len(lines) >= 3, timeout=30,
             what="requests answered and the stream sending")
    t0 = time.monotonic()
    run_cli("down", "--instance", d.instance, env=d.env)
    down_s = time.monotonic() - t0
    stop.set()
    for t in threads + [streamer]:
        t.join(30)
    assert not any(t.is_alive() for t in threads + [streamer]), "a client hung"
    assert bad == [], bad[:5]
    assert outcomes.get("200", 0) > 10
    # the stream was cut short with a proper final message
    assert lines and lines[-1]["final"] is True and lines[-1]["reason"] == "shutdown"
    assert 10 < sum(line["n"] for line in lines) < 2000  # cut well before its 20 s
    assert instance_names(d.instance) == []
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5, what="all processes gone")
    assert down_s < 20


def test_stuck_worker_is_killed_and_replaced(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "2", "--http-workers", "1",
                       extra_env={"SHMMEL_HEARTBEAT_TIMEOUT": "1.0"})
    w0 = d.status()["workers"][0]
    os.kill(w0["pid"], signal.SIGSTOP)  # alive but making no progress
    try:
        replaced = wait_for(lambda: next((w for w in d.status()["workers"]
                                          if w["index"] == 0 and w["pid"] != w0["pid"]
                                          and w["state"] == "ready"), None),
                            timeout=15, what="stuck worker replaced")
    finally:
        if pid_alive(w0["pid"]):
            os.kill(w0["pid"], signal.SIGKILL)
    assert replaced["restarts"] == 1
    assert "no heartbeat" in d.log()
    assert d.post_json("/process", {"message": "ok"}) == (200, {"result": "ko"})


def test_killed_worker_respawns_within_a_second(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "1")
    shm = Shm.attach(d.instance)
    try:
        old = int(shm.workers["pid"][0])
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: int(shm.workers["pid"][0]) != old
                 and shm.workers["state"][0] == L.W_READY, timeout=10, interval=0.005,
                 what="respawned worker ready")
        elapsed = time.monotonic() - t0
    finally:
        shm.close()
    assert elapsed < 1.0, f"respawn took {elapsed:.2f} s"
    assert d.post_json("/process", {"message": "ok"})[0] == 200


def test_metrics_rows_survive_http_worker_restarts(daemon_factory):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "1")
    for _ in range(5):
        assert d.post_json("/process", {"message": "x"})[0] == 200
    before = total(scrape(d)["shmmel_http_requests_total"], route="process")
    http_pid = d.status()["http"][0]["pid"]
    os.kill(http_pid, signal.SIGKILL)  # gunicorn's arbiter starts a replacement
    wait_for(lambda: (lambda h: len(h) == 1 and h[0]["pid"] != http_pid)(d.status()["http"]),
             timeout=20, what="HTTP process replaced")
    after = total(scrape(d)["shmmel_http_requests_total"], route="process")
    assert after == before  # counters carry on: Prometheus sees no reset
    assert d.post_json("/process", {"message": "y"})[0] == 200
