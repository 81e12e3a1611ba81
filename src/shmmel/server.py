"""gunicorn, embedded: settings from the Config, the app built in each HTTP worker after fork.

The supervisor binds the listening socket and hands gunicorn its descriptor (``fd://N``), so
a port clash is reported before anything is forked, and ``port = 0`` picks a free port that
the supervisor knows (and publishes in the control segment).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
from gunicorn.app.base import BaseApplication

from .channel import Producer, pid_alive
from .config import Config
from .shm import Shm

log = logging.getLogger("shmmel.http")


class GunicornServer(BaseApplication):
    def __init__(self, config: Config, listen_fd: int) -> None:
        self.config = config
        self.listen_fd = listen_fd
        super().__init__()

    def load_config(self) -> None:
        c = self.config
        settings: dict[str, Any] = {
            "bind": [f"fd://{self.listen_fd}"],
            "workers": c.http_workers,
            # gthread, with headers read by the poller and JSON error pages (httpworker.py)
            "worker_class": "shmmel.httpworker.ShmmelThreadWorker",
            "threads": c.http_threads,
            "worker_connections": max(1000, c.http_threads * 4),
            "keepalive": 5,
            "timeout": 30,
            "graceful_timeout": max(1, math.ceil(c.shutdown_timeout)),
            "proc_name": f"shmmel-http[{c.instance}]",
            "control_socket_disable": True,  # gunicorn >= 25 would create gunicorn.ctl
            "accesslog": None,
            "errorlog": "-",
            "loglevel": c.log_level,
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "limit_request_field_size": 8190,
            "preload_app": False,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        """Runs in each HTTP worker process: attach to the shared memory, build the app."""
        from .app import create_app

        shm = Shm.attach(self.config.instance)
        row = register_http_process(shm)
        producer = Producer(shm, self.config.queue_depth,
                            stall_timeout=min(self.config.stall_timeout,
                                              self.config.heartbeat_timeout))
        return create_app(self.config, producer, shm, row)


def register_http_process(shm: Shm) -> int:
    """Claim a row of the HTTP table for this process (rows of dead processes are reused)."""
    pid = os.getpid()
    with shm.lock():
        h = shm.http
        for r in np.flatnonzero(h["pid"] != 0).tolist():
            if not pid_alive(int(h["pid"][r])):
                h["pid"][r] = 0
        free = np.flatnonzero(h["pid"] == 0)
        if free.size == 0:
            log.warning("HTTP table full; process %d is not shown in status", pid)
            return -1
        r = int(free[0])
        h["pid"][r] = pid
        h["started"][r] = time.monotonic()  # counters (and metrics row r) carry on
    return r
