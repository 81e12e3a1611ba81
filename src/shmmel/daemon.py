"""Start, stop and inspect instances: what ``shmmel up/down/status`` call.

``start`` in the default (detached) mode launches the supervisor as a new session
(``python -m shmmel.daemon CONFIG_JSON``) and returns once the service answers ``/readyz``;
``run_foreground`` runs the supervisor in the calling process (systemd, containers).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from . import layout as L
from .channel import pid_alive
from .config import Config
from .errors import BootError, InstanceError
from .shm import Shm, instance_names, unlink_instance

log = logging.getLogger("shmmel")
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def default_log_file(config: Config) -> Path:
    return Path(config.log_file or Path(tempfile.gettempdir()) / f"shmmel-{config.instance}.log")


def _is_supervisor(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid_alive(pid)  # no /proc: trust the pid
    return b"shmmel" in cmd


def live_supervisor(instance: str) -> int:
    """The pid of the instance's live supervisor, or 0."""
    try:
        shm = Shm.attach(instance)
    except InstanceError:
        return 0
    try:
        pid = int(shm.header["supervisor_pid"])
    finally:
        shm.close()
    return pid if pid and pid_alive(pid) and _is_supervisor(pid) else 0


def clear_stale(instance: str) -> list[str]:
    """Remove a dead instance's segments and semaphores; refuse to touch a live one."""
    names = instance_names(instance)
    if not names:
        return []
    pid = live_supervisor(instance)
    if pid:
        raise InstanceError(f"instance {instance!r} is already running (supervisor pid {pid}); "
                            f"stop it with `shmmel down --instance {instance}`")
    unlink_instance(instance)
    log.warning("cleared stale shared memory of instance %s: %s", instance, ", ".join(names))
    return names


def run_foreground(config: Config) -> int:
    """Run the supervisor in this process until it is told to stop. Returns its exit code."""
    from .supervisor import Supervisor

    clear_stale(config.instance)
    return Supervisor(config).run()


@dataclass(frozen=True)
class Started:
    pid: int
    url: str
    log_file: Path
    workers: list[int]
    gunicorn_pid: int
    cleared: list[str]  # stale names of a dead earlier run that start() removed


def _get(host: str, port: int, path: str, timeout: float = 1.0) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start(config: Config, timeout: float | None = None) -> Started:
    """Launch a detached supervisor and wait until the service is ready."""
    cleared = clear_stale(config.instance)
    log_file = default_log_file(config)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        # the config (which may hold auth_token) goes through a pipe, never the command line
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmmel.daemon"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
        assert proc.stdin is not None
        proc.stdin.write(config.to_json().encode())
        proc.stdin.close()
    deadline = time.monotonic() + (timeout or config.boot_timeout + 10)
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise BootError(f"the supervisor exited with code {code} during start-up; "
                            f"last lines of {log_file}:\n{_tail(log_file)}")
        info = None
        with contextlib.suppress(InstanceError):  # segments may be half-made for a moment
            info = status(config.instance)
        if info and info["state"] == "running" and info["pid"] == proc.pid:
            host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
            host = "::1" if config.host == "::" else host
            with contextlib.suppress(OSError):
                if _get(host, info["port"], "/readyz") == 200:
                    return Started(proc.pid, info["url"], log_file,
                                   [w["pid"] for w in info["workers"]], info["gunicorn_pid"],
                                   cleared)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(config.shutdown_timeout + 10)
    raise BootError(f"the service did not become ready within the start timeout; "
                    f"last lines of {log_file}:\n{_tail(log_file)}")


def stop(instance: str, timeout: float = 30.0) -> int:
    """Ask the supervisor to shut down gracefully (SIGTERM) and wait; returns its pid."""
    pid = live_supervisor(instance)
    if not pid:
        if instance_names(instance):
            clear_stale(instance)
            raise InstanceError(f"instance {instance!r} was not running; cleared its stale "
                                "shared memory")
        raise InstanceError(f"instance {instance!r} is not running")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return pid
        with contextlib.suppress(ChildProcessError):  # our own child when started in-process
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    raise InstanceError(f"instance {instance!r}: supervisor {pid} did not stop within "
                        f"{timeout:.0f} s")


def status(instance: str) -> dict[str, Any]:
    """A snapshot of the control segment, as plain data (what `shmmel status --json` prints)."""
    shm = Shm.attach(instance)
    try:
        return snapshot(shm)
    finally:
        shm.close()


def snapshot(shm: Shm) -> dict[str, Any]:
    now = time.monotonic()
    h = shm.header
    s = shm.slots
    st = s["state"]
    depth = L.queue_depths(st, len(shm.workers))
    workers = []
    for k, w in enumerate(shm.workers):
        workers.append({
            "index": k, "pid": int(w["pid"]), "kind": L.W_KINDS[int(w["kind"])],
            "state": L.W_STATES[int(w["state"])], "generation": int(w["gen"]),
            "device": int(w["device"]), "heartbeat_age_s": round(now - float(w["heartbeat"]), 3),
            "served": int(w["served"]), "errors": int(w["errors"]),
            "batches": int(w["batches"]),
            "queue_depth": int(depth[k]), "streams": int(w["streams"]),
            "restarts": int(w["restarts"]), "busy_s": round(float(w["busy_s"]), 3),
        })
    http = [{"pid": int(r["pid"]), "requests": int(r["requests"]),
             "age_s": round(now - float(r["started"]), 1)}
            for r in shm.http if r["pid"] != 0]
    host = bytes(h["host"]).decode()
    port = int(h["port"])
    url_host = f"[{host}]" if ":" in host else host
    return {
        "instance": bytes(h["instance"]).decode(),
        "pid": int(h["supervisor_pid"]),
        "gunicorn_pid": int(h["gunicorn_pid"]),
        "state": L.INST_STATES.get(int(h["state"]), "?"),
        "url": f"http://{url_host}:{port}", "host": host, "port": port,
        "uptime_s": round(now - float(h["started_mono"]), 1),
        "workers": workers,
        "http": http,
        "slots": {
            "total": len(s), **L.slot_counts(st),
            "orphaned": int(((st != L.S_FREE) & (s["owner"] == 0)).sum()),
            "bytes": shm.slot_bytes,
        },
        "streams": {"open": int((shm.streams["state"] != L.ST_FREE).sum()),
                    "max": len(shm.streams)},
    }


def _main() -> int:
    config = Config.from_json(sys.stdin.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    setup_logging(config.log_level)
    try:
        return run_foreground(config)
    except (BootError, InstanceError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
