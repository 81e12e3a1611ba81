"""Accepts balanced over the HTTP processes (httpworker.py): a process accepts once all its
siblings have booted (``http_boot_wait``) and leaves a new connection to a less-loaded
sibling (``http_accept_slack``, through the :class:`AcceptBoard`).

The board is tested in-process (with a forked writer); the rest starts the real daemon
(e2e): how a burst of keep-alive connections spreads, and a SIGKILLed HTTP process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import uuid

import pytest

from shmmel.config import Config
from shmmel.control import start, stop
from shmmel.errors import InstanceError
from shmmel.httpworker import AcceptBoard
from shmmel.osutil import pid_alive
from shmmel.shm import Shm, instance_names, unlink_instance

from .conftest import run_cli, wait_for

BODY = json.dumps({"message": "hello", "op": "reverse"}).encode()
REQUEST = (b"POST /process HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


def test_board_rows_are_shared_across_fork_and_least_loaded_skips_own_and_empty_rows():
    board = AcceptBoard(rows=8)
    assert board.least_loaded(0) is None  # nobody else there
    pid = os.fork()
    if pid == 0:  # the child writes rows 1 and 3 as two siblings would
        try:
            board.join(1, 111)
            board.publish(1, 7)
            board.join(3, 333)
            board.publish(3, 2)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    board.join(0, os.getpid())
    board.publish(0, 1)  # fewest of all, but row 0 is the caller's own
    assert board.least_loaded(0) == (333, 2)
    assert board.least_loaded(3) == (os.getpid(), 1)
    board.leave(3)
    assert board.least_loaded(0) == (111, 7)
    board.leave(1)
    assert board.least_loaded(0) is None


def _http_counts(instance: str) -> dict[int, int]:
    """Requests each HTTP process served (read from the HTTP table at once, not via the CLI)."""
    shm = Shm.attach(instance)
    try:
        return {int(h["pid"]): int(h["requests"]) for h in shm.http if h["pid"] != 0}
    finally:
        shm.close()


def _burst(port: int, n: int) -> list[socket.socket]:
    """``n`` keep-alive connections opened at once, each sending one /process request;
    returns them once every answer is read (they stay open: they count as held)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    for s in socks:
        s.sendall(REQUEST)
    for s in socks:
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 200, resp.read()
        resp.read()
    return socks


def _served(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {pid: n - before.get(pid, 0) for pid, n in after.items()}


@pytest.mark.e2e
def test_start_returns_once_every_http_process_has_booted(tmp_path):
    """control.start returns on /readyz; with http_boot_wait no process accepts (so none
    answers /readyz) before all four have booted. Without it, one or two of four had."""
    config = Config(instance=f"t{uuid.uuid4().hex[:10]}", port=0, workers=1, http_workers=4,
                    worker_kind="cpu", whisper_workers=0, log_file=str(tmp_path / "up.log"))
    try:
        start(config)
        assert len(_http_counts(config.instance)) == 4
    finally:
        with contextlib.suppress(InstanceError):
            stop(config.instance)
        if instance_names(config.instance):
            unlink_instance(config.instance)


@pytest.mark.e2e
def test_new_connections_go_to_the_less_loaded_process_and_a_stopped_one_holds_none_back(
        daemon_factory):
    d = daemon_factory("--workers", "1", "--http-workers", "2", "--worker-kind", "cpu")
    a, b = sorted(_http_counts(d.instance))
    held: list[socket.socket] = []
    try:
        os.kill(b, signal.SIGSTOP)  # b takes nothing: a must not wait on it past 50 ms a burst
        try:
            before = _http_counts(d.instance)
            held += _burst(d.port, 20)
        finally:
            os.kill(b, signal.SIGCONT)
        assert _served(before, _http_counts(d.instance)) == {a: 20, b: 0}
        # a holds 20 kept-alive connections, b none: b takes new ones until it is level
        # (unbalanced, the kernel's wake-ups split them about evenly). One at a time: a
        # sibling descheduled past 50 ms on a loaded machine then costs one, not a burst.
        before = _http_counts(d.instance)
        for _ in range(20):
            held += _burst(d.port, 1)
        served = _served(before, _http_counts(d.instance))
        assert served[b] >= 16, served
    finally:
        for s in held:
            s.close()


@pytest.mark.e2e
def test_an_http_process_sigkilled_its_siblings_serve_new_connections_and_down_drains(
        daemon_factory):
    d = daemon_factory("--workers", "1", "--http-workers", "2", "--worker-kind", "cpu")
    socks = _burst(d.port, 8)  # both processes hold connections: the board has both rows
    victim = d.status()["http"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    for s in socks:
        s.close()
    # the dead row still reads as the least loaded: the survivor must not wait on it
    for _ in range(20):
        status, _, _ = d.request("POST", "/process", BODY,
                                 {"Content-Type": "application/json"}, timeout=10)
        assert status == 200
    # gunicorn forks a replacement, which takes the dead row and accepts at once
    wait_for(lambda: len(set(_http_counts(d.instance)) - {victim}) == 2, 30,
             what="a replacement HTTP process")
    socks = _burst(d.port, 8)
    for s in socks:
        s.close()
    pids = d.all_pids()
    run_cli("down", "--instance", d.instance, env=d.env)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10,
             what="every process of the instance gone")
    assert not [n for n in os.listdir("/dev/shm") if d.instance in n]
