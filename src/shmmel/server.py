"""gunicorn, embedded: settings from the Config, the app built in each HTTP worker after fork.

The supervisor binds the listening socket and hands gunicorn its descriptor (``fd://N``), so
a port clash is reported before anything is forked, and ``port = 0`` picks a free port that
the supervisor knows (and publishes in the control segment).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gunicorn.app.base import BaseApplication

from .channel import Producer
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
        producer = Producer(shm, self.config.queue_depth,
                            stall_timeout=min(self.config.stall_timeout,
                                              self.config.heartbeat_timeout))
        return create_app(self.config, producer, shm, producer.row)
