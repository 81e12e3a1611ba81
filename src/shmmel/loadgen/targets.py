"""What a bench runs against: a running instance, one it spawns, or the bare baseline.

``spawned`` starts an instance with a unique name on a free port and always stops it (and
unlinks anything left) on the way out; ``baseline`` runs the bare Falcon app of
``baseline_app`` under gunicorn with the same worker class, processes and threads.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import config as cfg
from .. import control
from ..errors import ShmmelError
from ..shm import instance_names, unlink_instance


@dataclass(frozen=True)
class Target:
    url: str
    instance: str | None = None
    http_workers: int = 2
    http_threads: int = 16
    workers: int | None = None
    worker_kind: str | None = None
    token: str = field(default="", repr=False)  # sent as a bearer token; never in reports

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "token"}


def describe(instance: str) -> Target:
    control.running_url(instance)  # not running, or dead: say so
    info = control.status(instance)
    live = [w for w in info["workers"] if w["state"] not in ("empty", "off")]
    kinds = sorted({w["kind"] for w in live})
    return Target(str(info["url"]), instance, max(1, len(info["http"])), 16,
                  len(live), ",".join(kinds))


def check_reachable(t: Target, timeout: float = 5.0) -> None:
    """One GET /healthz before any load process starts: an unreachable URL is one clear
    error, not a load process's traceback."""
    host, port = control.probe_host(urlsplit(t.url).hostname or "127.0.0.1"), \
        urlsplit(t.url).port or 80
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException) as exc:
        raise ShmmelError(f"cannot reach {t.url}: {exc}") from None
    finally:
        conn.close()


@contextlib.contextmanager
def spawned(flags: dict[str, Any], log_dir: str | None = None,
            config_file: str | None = None) -> Iterator[Target]:
    """Start a fresh instance (``flags`` over ``config_file``, as for ``config.resolve``;
    port 0, unique name)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    # no transcription worker unless asked for: a bench of text or mel load should not
    # load a Whisper model (nor wait for one)
    flags = {"whisper_workers": 0, **flags, "instance": name, "port": 0}
    if log_dir:
        flags["log_file"] = os.path.join(log_dir, f"shmmel-{name}.log")
    c = cfg.resolve(flags, config_file)
    try:
        started = control.start(c)
        info = wait_all_workers(name, c.boot_timeout)
        kinds = sorted({w["kind"] for w in info["workers"] if w["state"] != "off"})
        yield Target(started.url, name, c.http_workers, c.http_threads, c.workers,
                     ",".join(kinds), token=c.auth_token)
    finally:
        stop_instance(name, c.shutdown_timeout + 20)


def wait_all_workers(name: str, timeout: float) -> dict[str, Any]:
    """``control.start`` returns once one worker is ready; a bench wants all of them."""
    deadline = time.monotonic() + timeout
    while True:
        info = control.status(name)
        # "off" rows are never spawned (whisper rows without the [whisper] extra)
        if all(w["state"] in ("ready", "off") for w in info["workers"]):
            return info
        if time.monotonic() > deadline:
            states = ", ".join(w["state"] for w in info["workers"])
            raise ShmmelError(f"instance {name}: not every worker became ready ({states})")
        time.sleep(0.05)


def stop_instance(name: str, timeout: float = 30.0) -> None:
    """Stop ``name`` if it runs; kill its process group if it will not stop; unlink."""
    pid = control.live_supervisor(name)
    try:
        control.stop(name, timeout)
    except ShmmelError:
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    finally:
        if instance_names(name):
            unlink_instance(name)


def wait_ready(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
               path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ShmmelError(f"the baseline server exited with code {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(host, port, timeout=1)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise ShmmelError(f"the baseline server on port {port} did not answer {path} in "
                      f"{timeout:.0f} s")


@contextlib.contextmanager
def baseline(http_workers: int, http_threads: int, host: str = "127.0.0.1",
             log_file: str | None = None, switch_interval_us: int = 0) -> Iterator[Target]:
    """gunicorn (gthread, same processes, threads and keep-alive as shmmel's) serving
    ``shmmel.loadgen.baseline_app:app`` on a free port, passed to it as a descriptor.
    ``switch_interval_us``: the bare processes' GIL switch interval (0: Python's stock 5 ms),
    to compare against shmmel's ``http_switch_interval_us`` setting for setting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}",
           "--worker-class", "gthread", "--workers", str(http_workers),
           "--threads", str(http_threads),
           "--worker-connections", str(max(1000, http_threads * 4)), "--keep-alive", "5",
           "--log-level", "warning", "--no-control-socket",
           "shmmel.loadgen.baseline_app:app"]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    env = {**os.environ, "SHMMEL_BASELINE_SWITCH_US": str(int(switch_interval_us))}
    proc = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    sock.close()
    try:
        wait_ready(host, port, 30, proc)
        yield Target(f"http://{host}:{port}", None, http_workers, http_threads)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if out is not subprocess.DEVNULL:
            out.close()
