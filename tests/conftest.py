"""Shared fixtures: start the real daemon through the installed CLI, always clean it up."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shmmel.osutil import pid_alive

ROOT = Path(__file__).resolve().parents[1]
from shmmel.config import Config
from shmmel.shm import Shm, instance_names, unlink_instance


def shmmel_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "shmmel"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("shmmel")
    return [found] if found else [sys.executable, "-m", "shmmel_cli.main"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 90,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*shmmel_cmd(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"shmmel {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Daemon:
    instance: str
    env: dict[str, str]
    log_file: Path
    port: int = 0
    pids: set[int] = field(default_factory=set)

    def status(self) -> dict:
        # a dead instance (SIGKILLed supervisor) still prints its JSON, with exit code 1
        proc = run_cli("status", "--instance", self.instance, "--json", env=self.env,
                       check=not instance_names(self.instance))
        return json.loads(proc.stdout)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post_json(self, path: str, obj: object, timeout: float = 30) -> tuple[int, dict]:
        status, _, body = self.request("POST", path, json.dumps(obj),
                                       {"Content-Type": "application/json"}, timeout)
        return status, json.loads(body)

    def all_pids(self) -> set[int]:
        """Supervisor, gunicorn arbiter and workers, compute workers (as seen now)."""
        info = self.status()
        pids = {info["pid"], info["gunicorn_pid"]}
        pids |= {w["pid"] for w in info["workers"] if w["pid"]}
        pids |= {h["pid"] for h in info["http"]}
        self.pids |= pids
        return pids

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")
        return ""


def start_daemon(tmp_path: Path, *args: str, extra_env: dict[str, str] | None = None) -> Daemon:
    instance = f"t{uuid.uuid4().hex[:10]}"
    env = dict(os.environ)
    env["SHMMEL_LOG_FILE"] = str(tmp_path / f"{instance}.log")
    env.update(extra_env or {})
    d = Daemon(instance, env, tmp_path / f"{instance}.log")
    run_cli("up", "--instance", instance, "--port", "0", *args, env=env)
    info = d.status()
    d.port = info["port"]
    d.all_pids()
    return d


def stop_daemon(d: Daemon) -> None:
    """`shmmel down`; if that fails, kill whatever is left and unlink the segments."""
    try:
        with contextlib.suppress(Exception):
            d.all_pids()
        run_cli("down", "--instance", d.instance, env=d.env, check=False)
    finally:
        for pid in d.pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if instance_names(d.instance):
            unlink_instance(d.instance)


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[Daemon] = []

    def make(*args: str, extra_env: dict[str, str] | None = None) -> Daemon:
        d = start_daemon(tmp_path, *args, extra_env=extra_env)
        started.append(d)
        return d

    yield make
    for d in started:
        stop_daemon(d)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    """One daemon shared by the end-to-end tests that only talk to it (no kills, no limits)."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"), "--workers", "2", "--http-workers", "2",
                     "--worker-kind", "cpu")
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def inproc():
    """The app in this process over real shared memory, 2 NumPy workers as threads
    (tests/inproc.py): for 4xx tables, parameters and formats; no socket, no daemon."""
    from .inproc import InProc

    with InProc() as d:
        yield d


def wait_for(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- shared memory without a daemon: real segments, children forked by the test ---------------
@contextlib.contextmanager
def instance_segments(**settings):
    """A real instance's segments and semaphores (no daemon) for these Config settings;
    children forked with :func:`fork` are killed and reaped, and nothing is left in
    /dev/shm."""
    config = Config(instance=f"t{uuid.uuid4().hex[:10]}", **settings)
    shm = Shm.create(config)
    children: list[int] = []
    shm.children = children  # type: ignore[attr-defined]
    try:
        yield shm
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        shm.close()
        shm.unlink()
        assert instance_names(config.instance) == []


@pytest.fixture
def shm():
    """Three workers' rows, 32 slots of 16 KiB: see :func:`instance_segments`."""
    with instance_segments(workers=3, slots=32, slot_bytes=16 * 1024) as segments:
        yield segments


def fork(shm, fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    shm.children.append(pid)
    return pid
