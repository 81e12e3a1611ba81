"""gunicorn's gthread worker, hardened against slow clients, with JSON error pages.

gunicorn's gthread worker hands a connection to a thread as soon as one byte has arrived; the
thread then parses the request in blocking mode. A client that drips its headers a byte at a
time (slowloris) holds that thread for as long as it drips (``client_timeout`` restarts on
every byte), so a few dozen such connections take every thread and nobody else is served.

Here the poller, not a thread, reads request headers: each readable event appends what the
socket holds to a per-connection buffer (one non-blocking ``recv``), and only a connection
whose headers are complete (``\\r\\n\\r\\n``) goes to a thread, with those bytes handed to its
parser. (Doing that first read in the pool thread instead was measured: no throughput gain
within the run-to-run spread, and stalled clients then held threads 5 s longer.) Headers
must be whole within ``header_timeout`` of their first byte or the connection gets a 408 and
is closed, whatever the drip rate. A request body with a
Content-Length must then keep up ``min_body_rate`` bytes/s (after a 5 s grace): the poller
checks the bytes the kernel received (``TCP_INFO``) once a second and shuts down a connection
that falls behind, which frees its thread. Chunked bodies (full-duplex audio streams, which
are paced by their sender) keep ``client_timeout`` per read only.

gunicorn answers malformed HTTP (bad Content-Length, CL+TE, 414, 431) itself, with an HTML
page; every other answer of shmmel is JSON, so its error writer is replaced by one writing
``{"error", "detail"}`` like the app's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import selectors
import socket
import struct
import termios
import time
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 128 * 1024  # past this the parser answers 431/414 itself
BODY_GRACE = 5.0               # seconds before min_body_rate applies
_TCP_INFO_LEN = 136            # up to and including tcpi_bytes_received
_BYTES_RECEIVED = struct.Struct("<Q")
_BYTES_RECEIVED_OFF = 128      # struct tcp_info: tcpi_bytes_received (Linux >= 4.1)


# Sockets (by descriptor) whose connection must close after the response being written: the
# app marks a stalled client's (its 408) so the thread does not wait on the rest of the body
# (gunicorn drops a Connection: close the app sets, and would drain up to 5 s). Touched only
# by this process's threads: set add/discard are atomic under the GIL.
CLOSE_AFTER: set[int] = set()


def close_after_response(environ: dict) -> None:
    """Close this request's connection once its answer is written (no keep-alive, no drain
    of an unread body): for a client that stalled mid-body."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            CLOSE_AFTER.add(sock.fileno())


def tcp_bytes_received(sock: socket.socket) -> int | None:
    """Bytes the kernel has received on a TCP socket, or None where it cannot tell."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    return _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFF)[0]


def unread_bytes(sock: socket.socket) -> int:
    """Bytes received by the kernel on ``sock`` and not read yet (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


def json_error(status_int: int, reason: str, mesg: str) -> bytes:
    body = json.dumps({"error": reason, "detail": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for gunicorn.util.write_error (same signature), answering JSON."""
    util.write_nonblock(sock, json_error(status_int, reason, mesg))


class ShmmelThreadWorker(ThreadWorker):
    """gthread with request headers read by the poller and a minimum body rate."""

    def init_process(self) -> None:
        util.write_error = write_json_error  # this process is ours: gunicorn's pages as JSON
        app_cfg = getattr(self.app, "config", None)
        self.header_timeout = float(getattr(app_cfg, "header_timeout", 10.0))
        self.min_body_rate = int(getattr(app_cfg, "min_body_rate", 1024))
        self.reading: dict[Any, float] = {}      # conn -> header deadline
        self.bodies: dict[Any, tuple[float, int, int]] = {}  # conn -> (start, need, bytes0)
        self._next_body_check = 0.0
        self._notified = 0.0
        super().init_process()

    def notify(self) -> None:
        """gunicorn's liveness stamp (a utime(2) on a temp file), called on every pass of
        the poller loop: at most every 0.5 s here (the arbiter's timeout is 30 s). It cost
        11 % of the poller thread under load (py-spy, docs/PERFORMANCE.md)."""
        now = time.monotonic()
        if now - self._notified >= 0.5:
            self._notified = now
            super().notify()

    # -- headers: read by the poller --------------------------------------------------------
    def enqueue_req(self, conn: Any) -> None:
        """Hand ``conn`` to a thread once its request headers are complete."""
        try:
            done = self._gather(conn)
        except _Closed:  # the peer closed a kept-alive or fresh connection
            self.nr_conns -= 1
            conn.close()
            return
        if done:
            conn.data_ready = True
            super().enqueue_req(conn)
            return
        if conn in self.reading:
            return
        self.reading[conn] = time.monotonic() + self.header_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_bytes, conn))

    def _on_bytes(self, conn: Any, _sock: Any) -> None:
        try:
            done = self._gather(conn)
        except _Closed:
            self._drop_reading(conn)
            self.nr_conns -= 1
            conn.close()
            return
        if done:
            self._drop_reading(conn)
            conn.data_ready = True
            super().enqueue_req(conn)  # to a thread: handle() finds the headers complete

    def _drop_reading(self, conn: Any) -> None:
        if self.reading.pop(conn, None) is not None:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _gather(self, conn: Any) -> bool:
        """Read what the socket holds into the connection's parser buffer (non-blocking);
        True once the headers are complete (or too long: the parser then answers 431)."""
        if getattr(conn, "is_http2", False) or self.cfg.is_ssl:
            return True  # not ours to buffer: gunicorn's own path
        buf = getattr(conn, "hbuf", None)
        if buf is None:
            buf = conn.hbuf = bytearray()
            if conn.parser is not None:  # a kept-alive connection may hold read-ahead
                buf += conn.parser.unreader.take_buffered()
        while HEADER_END not in buf and len(buf) < MAX_HEADER_BYTES:
            try:
                data = conn.sock.recv(65536, socket.MSG_DONTWAIT)  # whatever the socket's mode
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return False
                raise _Closed() from None
            if not data:
                raise _Closed()
            buf += data
        if conn.parser is None:
            conn.init()  # plain HTTP/1: only creates the parser
        unreader = conn.parser.unreader
        rest = unreader.take_buffered()
        unreader.buf = io.BytesIO()
        unreader.buf.write(bytes(buf))
        unreader.buf.write(rest)
        conn.hbuf = None
        return True

    # -- the body: a minimum rate ---------------------------------------------------------------
    def handle_request(self, req: Any, conn: Any) -> bool:
        need = next((int(v) for n, v in req.headers if n == "CONTENT-LENGTH" and v.isdigit()), 0)
        if self.min_body_rate and need:
            # body bytes still to come: Content-Length minus what the parser holds and what
            # the kernel has received but nobody has read yet (counted in bytes0 already)
            held = len(conn.parser.unreader.buf.getvalue()) + unread_bytes(conn.sock)
            got = tcp_bytes_received(conn.sock)
            if got is not None and need > held:
                self.bodies[conn] = (time.monotonic(), need - held, got)
        try:
            return super().handle_request(req, conn)
        finally:
            self.bodies.pop(conn, None)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        try:
            fd = conn.sock.fileno()
        except (OSError, ValueError):
            return False
        if fd in CLOSE_AFTER:
            CLOSE_AFTER.discard(fd)
            return False
        return super()._keepalive_after(conn, keepalive)

    def _check_bodies(self, now: float) -> None:
        for conn, (start, need, bytes0) in list(self.bodies.items()):
            elapsed = now - start
            if elapsed < BODY_GRACE:
                continue
            got = tcp_bytes_received(conn.sock)
            if got is None or got - bytes0 >= need:
                self.bodies.pop(conn, None)  # the whole body is in: not our concern any more
                continue
            if got - bytes0 < self.min_body_rate * (elapsed - BODY_GRACE / 2):
                self.bodies.pop(conn, None)
                self.log.warning("closing a connection from %s: its body arrived at %.0f B/s, "
                                 "under min_body_rate %d", conn.client,
                                 (got - bytes0) / elapsed, self.min_body_rate)
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # the reading thread gets EOF
                except OSError:
                    pass

    # -- deadlines, run from the poller loop -------------------------------------------------
    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn, deadline in list(self.reading.items()):
            if now < deadline:
                continue
            self._drop_reading(conn)
            try:
                util.write_nonblock(conn.sock, json_error(
                    408, "Request Timeout",
                    f"the request headers did not arrive within {self.header_timeout:g} s"))
            except OSError:
                pass
            self.nr_conns -= 1
            conn.close()
        if self.bodies and now >= self._next_body_check:
            self._next_body_check = now + 1.0
            self._check_bodies(now)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if force:  # shutting down: connections still sending headers go too
            for conn in list(self.reading):
                self._drop_reading(conn)
                self.nr_conns -= 1
                conn.close()


class _Closed(Exception):
    """The peer closed (or reset) the connection while sending headers."""
