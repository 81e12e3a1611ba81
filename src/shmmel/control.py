"""Start, stop and inspect instances: what ``shmmel up/down/status`` call.

``start`` in the default (detached) mode launches the supervisor as a new session
(``python -m shmmel.control CONFIG_JSON``) and returns once the service answers ``/readyz``;
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
from .osutil import pid_alive
from .config import Config
from .devices import Nvml, device_rows, pinned_streams
from .errors import BootError, InstanceError
from .stream_table import StreamTable
from .shm import Shm, instance_names, unlink_instance

log = logging.getLogger("shmmel")
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def default_log_file(config: Config) -> Path:
    """``log_file``, else ``shmmel-<instance>.log`` in the user's runtime directory
    ($XDG_RUNTIME_DIR: private to the user) where there is one, else the temp directory."""
    if config.log_file:
        return Path(config.log_file)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path(tempfile.gettempdir())
    return base / f"shmmel-{config.instance}.log"


def open_log(path: Path) -> int:
    """Open the detached instance's log for appending: mode 0600, never through a symlink
    (the default path is predictable, and /tmp is world-writable)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    if os.fstat(fd).st_uid == os.getuid():
        os.fchmod(fd, 0o600)  # a log left 0644 by an older version
    return fd


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
    """Remove a dead instance's segments and semaphores; refuse to touch a live one.
    Returns the names removed; the caller says so (once)."""
    names = instance_names(instance)
    if not names:
        return []
    pid = live_supervisor(instance)
    if pid:
        raise InstanceError(f"instance {instance!r} is already running (supervisor pid {pid}); "
                            f"stop it with `shmmel down --instance {instance}`")
    unlink_instance(instance)
    log.debug("cleared stale shared memory of instance %s: %s", instance, ", ".join(names))
    return names


def cleared_message(instance: str, names: list[str]) -> str:
    return (f"cleared stale shared memory of instance {instance} (a previous run died): "
            f"{len(names)} entries")


def whisper_off_reason(config: Config) -> str | None:
    """Why whisper workers that ``config`` asks for are not spawned (the extra is missing),
    or None. What ``shmmel up`` prints; the supervisor logs the same."""
    from .whisper import INSTALL_HINT, whisper_missing

    missing = whisper_missing() if config.whisper_workers else None
    return None if missing is None else f"{missing} is not installed; {INSTALL_HINT}"


def run_foreground(config: Config) -> int:
    """Run the supervisor in this process until it is told to stop. Returns its exit code."""
    from .supervisor import Supervisor

    cleared = clear_stale(config.instance)
    if cleared:
        log.warning("%s", cleared_message(config.instance, cleared))
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
    try:
        fd = open_log(log_file)
    except OSError as exc:
        raise InstanceError(f"cannot open the log file {log_file}: {exc.strerror} "
                            "(a symbolic link is refused)") from None
    with open(fd, "ab") as out:
        # the config (which may hold auth_token) goes through a pipe, never the command line
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmmel.control"],
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
            with contextlib.suppress(OSError):
                if _get(probe_host(config.host), info["port"], "/readyz") == 200:
                    return Started(proc.pid, info["url"], log_file,
                                   [w["pid"] for w in info["workers"] if w["pid"]],
                                   info["gunicorn_pid"], cleared)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(config.shutdown_timeout + 10)
    raise BootError(f"the service did not become ready within the start timeout; "
                    f"last lines of {log_file}:\n{_tail(log_file)}")


def probe_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def readiness(instance: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Ask the running instance's ``/readyz`` (on the port it really listens on):
    (ready, what it said). InstanceError if it is not running."""
    running_url(instance)
    info = status(instance)
    try:
        code = _get(probe_host(info["host"]), info["port"], "/readyz", timeout)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{info['url']}/readyz: {exc}"
    return code == 200, f"{info['url']}/readyz answered {code}"


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


DEAD_HINT = "stale shared memory; shmmel up or shmmel down clears it"


def status(instance: str) -> dict[str, Any]:
    """A snapshot of the control segment, as plain data (what `shmmel status --json` prints).

    ``state`` is ``dead`` when the segments outlive their supervisor (it was SIGKILLed):
    whatever the segment says, nothing serves."""
    shm = Shm.attach(instance)
    try:
        info = snapshot(shm)
    finally:
        shm.close()
    pid = info["pid"]
    if pid and not (pid_alive(pid) and _is_supervisor(pid)):
        info["state"] = "dead"
    return info


def running_url(instance: str) -> str:
    """The URL of a running instance; InstanceError (saying why) otherwise."""
    try:
        info = status(instance)
    except InstanceError:
        raise InstanceError(f"instance {instance!r} is not running (start it with `shmmel up"
                            f"{'' if instance == 'default' else ' --instance ' + instance}`, "
                            "or pass --url)") from None
    if info["state"] == "dead":
        raise InstanceError(f"instance {instance!r} is dead ({DEAD_HINT})")
    return str(info["url"])


def snapshot(shm: Shm) -> dict[str, Any]:
    now = time.monotonic()
    h = shm.header
    s = shm.slots
    st = s["state"]
    depth = L.queue_depths(st, len(shm.workers))
    workers = []
    off = None
    for k, w in enumerate(shm.workers):
        state = L.W_STATES[int(w["state"])]
        kind = L.W_KINDS[int(w["kind"])]
        never = int(w["gen"]) == 0 and int(w["pid"]) == 0
        if never and kind == "whisper" and h["state"] != L.INST_STARTING:
            # a whisper row the supervisor did not spawn: the [whisper] extra is missing
            from .whisper import INSTALL_HINT, whisper_missing

            if off is None:
                missing = whisper_missing()
                off = f"{missing or 'the [whisper] extra'} is not installed; {INSTALL_HINT}"
            state = "off"
        workers.append({
            "index": k, "pid": int(w["pid"]), "kind": kind, "state": state,
            "generation": int(w["gen"]), "device": int(w["device"]),
            "heartbeat_age_s": None if never else round(now - float(w["heartbeat"]), 3),
            **({"reason": off} if state == "off" else {}),
            "served": int(w["served"]), "errors": int(w["errors"]),
            "batches": int(w["batches"]),
            "queue_depth": int(depth[k]), "streams": int(w["streams"]),
            "restarts": int(w["restarts"]), "busy_s": round(float(w["busy_s"]), 3),
            "recent_crashes": int(w["crashes"]),
            "respawn_in_s": (round(max(0.0, float(w["respawn_at"]) - now), 1)
                             if int(w["state"]) == L.W_BACKOFF else None),
        })
    mel_rows = int(h["n_workers"]) - sum(w["kind"] == "whisper" for w in workers)
    devices = device_rows(shm.workers, mel_rows, depth,
                          pinned_streams(shm.workers, shm.streams))
    if devices:
        util = Nvml().utilisation([d["device"] for d in devices])
        for d in devices:
            d["utilisation"] = None if util is None else util.get(d["device"])
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
        "devices": devices,
        "http": http,
        "slots": {
            "total": len(s), **L.slot_counts(st),
            "orphaned": int(((st != L.S_FREE) & (s["owner"] == 0)).sum()),
            "bytes": shm.slot_bytes,
        },
        "streams": {"open": StreamTable(shm).open_count(),
                    "max": int(shm.header["max_streams"])},
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
