"""The supervisor: owns the shared memory, forks compute workers, runs gunicorn in a child.

Shaped after gunicorn's arbiter and uvicorn's multiprocess supervisor: signal handlers only
record the signal (and wake the loop through a pipe); one loop acts::

    while running: wait(); handle_signals(); reap(); check_workers(); respawn_due(); reclaim()

A worker that dies is respawned at once the first time, then after an exponential backoff
(0.5 s, 1 s, 2 s, ... up to respawn_backoff_max) while it keeps dying within CRASH_WINDOW;
the others keep serving meanwhile, and status/metrics show it as "backoff". The instance
stops only when a kind of worker it needs cannot run at all: a worker fails to boot while no
worker of its kind (mel or whisper) is ready.

gunicorn runs in a child of its own (its arbiter reaps every child of its process, so it must
not share a process with our workers), in its own process group so a terminal's Ctrl-C reaches
only the supervisor, which then shuts everything down in order.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from types import FrameType

import numpy as np

from . import layout as L
from .channel import reclaim_slots
from .osutil import pid_alive
from .config import Config
from .devices import settle_workers
from .errors import BootError
from .shm import Shm, unlink_instance
from .stream_table import StreamTable
from .whisper import INSTALL_HINT, whisper_missing
from .osutil import set_parent_death_signal
from .worker import EXIT_BOOT_FAILED, worker_main

log = logging.getLogger("shmmel.supervisor")

CRASH_WINDOW = 60.0   # seconds: deaths of one worker counted for its respawn backoff
BACKOFF_BASE = 0.5    # seconds: the second death in the window waits this, then doubles
RECLAIM_EVERY = 0.5   # seconds between sweeps for orphaned slots and streams


def bind_socket(host: str, port: int, client_timeout: float,
                backlog: int = 2048) -> socket.socket:
    """The listening socket, bound here so a clash is reported before anything forks.

    SO_RCVTIMEO/SO_SNDTIMEO are inherited by every accepted socket (Linux): gunicorn's gthread
    worker reads headers and bodies in blocking mode with no timeout of its own, so without
    them a client that stalls mid-request would hold a thread forever (slowloris).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    secs = int(client_timeout)
    tv = struct.pack("ll", secs, int((client_timeout - secs) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise BootError(f"cannot listen on {host}:{port}: the port is in use") from None
        raise BootError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def prepare_worker_row(shm: Shm, k: int, mel_workers: int) -> int:
    """Ready worker row ``k`` for a new process (a new generation, BOOTING, fresh clocks);
    returns the generation. Rows from ``mel_workers`` on are whisper rows."""
    rec = shm.workers[k : k + 1]
    gen = int(rec["gen"][0]) + 1
    rec["gen"] = gen
    rec["state"] = L.W_BOOTING
    rec["kind"] = L.K_WHISPER if k >= mel_workers else L.K_NONE
    rec["heartbeat"] = time.monotonic()
    rec["started"] = time.monotonic()
    rec["streams"] = 0
    rec["respawn_at"] = 0.0
    return gen


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.shm: Shm | None = None
        self.sock: socket.socket | None = None
        self.pids: dict[int, int] = {}          # worker pid -> index
        self.gunicorn_pid = 0
        self.gunicorn_pgid = 0  # kept after the arbiter is reaped, to sweep its workers
        self.signals: list[int] = []
        self.running = True
        self.exit_code = 0
        self.failure = ""
        self.crashes: dict[int, list[float]] = {}
        self.respawn_at: dict[int, float] = {}  # worker index -> time.monotonic() to respawn
        self._wake_r = self._wake_w = -1
        self._next_reclaim = 0.0

    # -- signals: record only ----------------------------------------------------------------
    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._record)

    def _reset_signals_in_child(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        # workers_per_device sets the mel worker count (the device count is asked of a child)
        c = self.config = settle_workers(self.config)
        self.sock = bind_socket(c.host, c.port, c.client_timeout)
        port = self.sock.getsockname()[1]
        self.shm = Shm.create(c)
        h = self.shm.header
        h["supervisor_pid"] = os.getpid()
        h["started_wall"] = time.time()
        h["started_mono"] = time.monotonic()
        h["port"] = port
        h["state"] = L.INST_STARTING
        self.shm.workers["device"] = -1  # until a worker says which device it took
        self._install_signals()
        log.info("instance %s: %d workers + %d whisper, %d slots x %d KiB, listening on %s:%d",
                 c.instance, c.workers, c.whisper_workers, c.slots, c.slot_bytes // 1024,
                 c.host, port)
        for k in range(c.workers):
            self.spawn_worker(k)
        missing = whisper_missing()
        for k in range(c.workers, c.worker_rows):
            self.shm.workers["kind"][k] = L.K_WHISPER  # shown as such even when empty
            if missing is None:
                self.spawn_worker(k)
        if c.whisper_workers and missing is not None:
            log.warning("whisper_workers=%d but %s is not installed: no transcription "
                        "(/audio/transcribe answers 501); %s", c.whisper_workers, missing,
                        INSTALL_HINT)
        self.spawn_gunicorn()
        h["state"] = L.INST_RUNNING

    def spawn_worker(self, k: int) -> None:
        assert self.shm is not None
        rec = self.shm.workers[k : k + 1]
        gen = prepare_worker_row(self.shm, k, self.config.workers)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            self._reset_signals_in_child()
            os.setpgid(0, 0)
            if self.sock is not None:
                self.sock.close()
            worker_main(self.config, self.shm, k, gen, parent)
        rec["pid"] = pid
        self.pids[pid] = k
        log.info("spawned worker %d (pid %d, gen %d)", k, pid, gen)

    def spawn_gunicorn(self) -> None:
        assert self.sock is not None
        fd = self.sock.fileno()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                self._reset_signals_in_child()
                os.setpgid(0, 0)
                set_parent_death_signal(signal.SIGTERM)
                from .server import GunicornServer

                GunicornServer(self.config, fd).run()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001
                log.exception("gunicorn failed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.gunicorn_pid = self.gunicorn_pgid = pid
        assert self.shm is not None
        self.shm.header["gunicorn_pid"] = pid
        log.info("spawned gunicorn (pid %d) with %d HTTP workers", pid, self.config.http_workers)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, supervise until told to stop, shut down; return the exit code."""
        try:
            self.start()
            while self.running:
                self.wait(0.1)
                self.handle_signals()
                self.reap()
                if not self.running:
                    break
                self.check_workers()
                self.respawn_due()
                self.reclaim()
        finally:
            self.shutdown()
        if self.failure:
            log.error("stopped: %s", self.failure)
        return self.exit_code

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s, shutting down", signal.Signals(sig).name)
                self.running = False
            elif sig == signal.SIGHUP:
                log.info("received SIGHUP: ignored (restart the service to reload config)")

    def fail(self, message: str) -> None:
        self.failure = message
        self.exit_code = 1
        self.running = False

    def reap(self) -> None:
        assert self.shm is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.gunicorn_pid:
                self.gunicorn_pid = 0
                if self.running:
                    code = os.waitstatus_to_exitcode(status)
                    self.fail(f"the HTTP server (gunicorn) exited unexpectedly (code {code}); "
                              "see its error above")
                continue
            k = self.pids.pop(pid, None)
            if k is None:
                continue
            rec = self.shm.workers[k : k + 1]
            was = int(rec["state"][0])
            rec["state"] = L.W_DEAD
            rec["gen"] += 1  # invalidates requests queued on the dead generation
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                name = signal.Signals(-code).name
                (log.error if -code == signal.SIGKILL else log.warning)(
                    "worker %d (pid %d) killed by %s", k, pid, name)
            elif self.running:
                log.warning("worker %d (pid %d) exited with code %d", k, pid, code)
            if not self.running:
                continue
            if code == EXIT_BOOT_FAILED or was == L.W_BOOTING:
                dev = int(rec["device"][0])
                on = f" on device {dev}" if dev >= 0 and k < self.config.workers else ""
                if not self._kind_serving(k):
                    self.fail(f"worker {k} could not boot{on} (exit code {code}) and no worker "
                              "of its kind is running; see the log above")
                    continue
                log.error("worker %d could not boot%s (exit code %d); others of its kind "
                          "serve", k, on, code)
            self.schedule_respawn(k)

    def _kind_serving(self, k: int) -> bool:
        """Whether another worker of row ``k``'s group (mel rows or whisper rows) is ready,
        or is still on its first boot (at start, a device that fails fast must not stop the
        instance before the workers of the other devices are up)."""
        assert self.shm is not None
        mel = k < self.config.workers
        rows = range(self.config.workers) if mel else range(self.config.workers,
                                                             self.config.worker_rows)
        states = self.shm.workers["state"]
        return any(int(states[r]) == L.W_READY
                   or int(states[r]) == L.W_BOOTING and not self.crashes.get(r)
                   for r in rows if r != k)

    def schedule_respawn(self, k: int) -> None:
        """Respawn now after a first death, else after an exponential, capped backoff."""
        assert self.shm is not None
        now = time.monotonic()
        recent = [t for t in self.crashes.get(k, []) if now - t < CRASH_WINDOW] + [now]
        self.crashes[k] = recent
        delay = 0.0 if len(recent) == 1 else min(
            self.config.respawn_backoff_max, BACKOFF_BASE * 2.0 ** (len(recent) - 2))
        rec = self.shm.workers[k : k + 1]
        rec["crashes"] = len(recent)
        rec["restarts"] += 1
        if delay <= 0:
            self.spawn_worker(k)
            return
        log.warning("worker %d died %d times within %.0f s: respawning in %.1f s", k,
                    len(recent), CRASH_WINDOW, delay)
        rec["respawn_at"] = now + delay
        rec["state"] = L.W_BACKOFF
        self.respawn_at[k] = now + delay

    def respawn_due(self) -> None:
        now = time.monotonic()
        for k, at in list(self.respawn_at.items()):
            if now >= at:
                del self.respawn_at[k]
                self.spawn_worker(k)

    def check_workers(self) -> None:
        """Kill workers that stopped beating (stuck) or never finished booting."""
        assert self.shm is not None
        now = time.monotonic()
        w = self.shm.workers
        for pid, k in list(self.pids.items()):
            state, beat = int(w["state"][k]), self.shm.worker_word(k, "heartbeat")
            if state == L.W_READY and now - beat > self.config.heartbeat_timeout:
                log.error("worker %d (pid %d): no heartbeat for %.1f s, killing it", k, pid,
                          now - beat)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            elif state == L.W_BOOTING and now - float(w["started"][k]) > self.config.boot_timeout:
                log.error("worker %d (pid %d) did not boot within %.0f s", k, pid,
                          self.config.boot_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def reclaim(self) -> None:
        """Free slots whose producer died or gave up, and streams whose worker died."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return
        self._next_reclaim = now + RECLAIM_EVERY
        assert self.shm is not None
        reclaim_slots(self.shm)  # orphaned slots, and those of dead producers
        # reserved and stale stream entries of dead producers' partitions (live producers
        # reuse their own stale ones; a dead worker's live-looking entries read as stale)
        StreamTable(self.shm).sweep()
        h = self.shm.http
        for r in np.flatnonzero(h["pid"] != 0).tolist():
            if not pid_alive(int(h["pid"][r])):
                h["pid"][r] = 0

    # -- stop --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Graceful: HTTP first (finishes in-flight requests), then workers, then unlink."""
        if self.shm is None:
            if self.sock is not None:
                self.sock.close()
            return
        c = self.config
        self.shm.header["state"] = L.INST_STOPPING
        if self.gunicorn_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.gunicorn_pid, signal.SIGTERM)
            if not self._wait_pid(self.gunicorn_pid, c.shutdown_timeout + 2.0):
                log.error("gunicorn did not stop within %.0f s, killing it", c.shutdown_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.gunicorn_pid, signal.SIGKILL)
                self._wait_pid(self.gunicorn_pid, 2.0)
        # gunicorn's workers are in its process group; none may survive the arbiter
        if self.gunicorn_pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.gunicorn_pgid, signal.SIGKILL)
        if self.sock is not None:
            self.sock.close()
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for pid in list(self.pids):
            if not self._wait_pid(pid, max(0.0, deadline - time.monotonic())):
                log.error("worker pid %d did not exit, killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_pid(pid, 2.0)
        for k in range(len(self.shm.workers)):
            self.shm.workers["state"][k] = L.W_DEAD
        self.pids.clear()
        self.shm.close()
        unlink_instance(c.instance)
        self.shm = None
        log.info("instance %s stopped; shared memory unlinked", c.instance)

    def _wait_pid(self, pid: int, timeout: float) -> bool:
        """Reap ``pid`` within ``timeout``; True when it is gone."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if done == pid:
                self.pids.pop(pid, None)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
