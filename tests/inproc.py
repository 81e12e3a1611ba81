"""The HTTP app in the test process: real shared memory, real workers as threads, no sockets.

``InProc`` creates an instance's segments and semaphores (``Shm.create``, a unique name), runs
each worker's real code (``Worker.serve_until_stopped``: boot, heartbeat, serve; mel rows
and, with ``whisper_workers``, the CTranslate2 rows) in a thread of this process, builds the app with ``create_app`` over a real ``Producer``, and sends
requests through ``falcon.testing.TestClient``. It has the request helpers of the end-to-end
``Daemon`` (``request``, ``post_json``, ``status``, ``log``), so a test of a 4xx table,
a parameter or a format reads the same either way. What needs real processes (gunicorn,
sockets, kills, the CLI, the supervisor) stays end to end (conftest.start_daemon).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from typing import Any

import falcon.testing

from shmmel import layout as L
from shmmel.app import create_app
from shmmel.channel import Producer
from shmmel.config import Config
from shmmel.control import snapshot
from shmmel.supervisor import prepare_worker_row
from shmmel.shm import Shm, instance_names
from shmmel.worker import EXIT_OK, Worker


class _Records(logging.Handler):
    """Keeps the text of every record of the ``shmmel`` loggers (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InProc:
    """One instance served in this process. Use as a context manager (or call ``close``)."""

    def __init__(self, **settings: Any) -> None:
        base: dict[str, Any] = {"instance": f"t{uuid.uuid4().hex[:10]}", "worker_kind": "cpu",
                                "workers": 2, "whisper_workers": 0, "http_workers": 1}
        self.config = Config(**{**base, **settings})
        self.instance = self.config.instance
        self.port = 0  # no socket: tests that need one are end to end
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.exit_codes: dict[int, int | str] = {}
        self.records = _Records()
        self._logger = logging.getLogger("shmmel")
        self._logger.addHandler(self.records)
        self._level = self._logger.level
        if self._logger.getEffectiveLevel() > logging.INFO:
            self._logger.setLevel(logging.INFO)
        self.shm = Shm.create(self.config)
        try:
            h = self.shm.header
            h["supervisor_pid"] = os.getpid()
            h["started_wall"] = time.time()
            h["started_mono"] = time.monotonic()
            self.shm.workers["device"] = -1
            for k in range(self.config.worker_rows):  # mel rows, then whisper rows
                self.spawn_worker(k)
            self.wait_ready()
            h["state"] = L.INST_RUNNING
            self.producer = Producer(self.shm, self.config.queue_depth,
                                     stall_timeout=min(self.config.stall_timeout,
                                                       self.config.heartbeat_timeout))
            self.app = create_app(self.config, self.producer, self.shm, self.producer.row)
            self.client = falcon.testing.TestClient(self.app)
        except BaseException:
            self.close()
            raise

    # -- workers: what Supervisor.spawn_worker does, with a thread for the fork ---------------
    def spawn_worker(self, k: int) -> None:
        gen = prepare_worker_row(self.shm, k, self.config.workers)
        self.shm.workers["pid"][k] = os.getpid()
        worker = Worker(self.config, self.shm, k, gen, parent=os.getppid())

        def serve() -> None:
            try:
                self.exit_codes[k] = worker.serve_until_stopped()
            except BaseException:  # noqa: BLE001 - reported by close()
                self.exit_codes[k] = traceback.format_exc()

        thread = threading.Thread(target=serve, name=f"inproc-worker-{k}", daemon=True)
        thread.start()
        self.workers.append((worker, thread))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states = self.shm.workers["state"]
        while not (states == L.W_READY).all():
            failed = {k: c for k, c in self.exit_codes.items() if c != EXIT_OK}
            assert not failed, f"in-process workers failed to boot: {failed}"
            assert time.monotonic() < deadline, f"workers not ready after {timeout} s"
            time.sleep(0.01)

    # -- the Daemon helpers ----------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30,
                chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-case headers, body), as ``Daemon.request`` gives them.

        A body is sent with its Content-Length (0 included, as http.client does) unless the
        headers declare another one. ``chunked``: the body reaches the app as a chunked
        upload does through gunicorn (decoded, no CONTENT_LENGTH: read until its end)."""
        path, _, query = path.partition("?")
        headers = dict(headers or {})
        extras = None
        if chunked:
            extras = {"CONTENT_LENGTH": ""}
        elif body is not None and not any(k.lower() == "content-length" for k in headers):
            headers["Content-Length"] = str(len(body.encode() if isinstance(body, str)
                                                else body))
        result = self.client.simulate_request(method, path, query_string=query or None,
                                              body=body, headers=headers, extras=extras)
        return (result.status_code, {k.lower(): v for k, v in result.headers.items()},
                result.content)

    def post_json(self, path: str, obj: object, timeout: float = 30) -> tuple[int, dict]:
        status, _, body = self.request("POST", path, json.dumps(obj),
                                       {"Content-Type": "application/json"}, timeout)
        return status, json.loads(body)

    def status(self) -> dict:
        """What ``shmmel status --json`` would print for this instance."""
        return snapshot(self.shm)

    def log(self) -> str:
        return "\n".join(self.records.lines)

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads, close and unlink everything; assert nothing is left."""
        try:
            for worker, _ in self.workers:
                worker.stop_signal = signal.SIGTERM
                with contextlib.suppress(Exception):
                    self.shm.doorbells[worker.index].release()
            for _, thread in self.workers:
                thread.join(10)
            hung = [t.name for _, t in self.workers if t.is_alive()]
            failed = {k: c for k, c in self.exit_codes.items() if c != EXIT_OK}
        finally:
            self._logger.removeHandler(self.records)
            self._logger.setLevel(self._level)
            if not any(t.is_alive() for _, t in self.workers):
                self.shm.close()
            self.shm.unlink()
        assert not hung, f"worker threads did not stop: {hung}"
        assert not failed, f"in-process workers failed: {failed}"
        assert instance_names(self.instance) == [], "shared memory left behind"

    def __enter__(self) -> InProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
