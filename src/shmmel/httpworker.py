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

At start, a process accepts connections only once all ``http_workers`` processes have booted
(their rows in the HTTP table), or after ``http_boot_wait``: a keep-alive connection stays
with the process that accepted it, so the first burst of clients would otherwise stay on the
processes that booted first (a fresh instance served by 3 of 12 for a whole 75 s run). The
listening socket queues what arrives meanwhile. A respawned process finds its siblings up and
accepts at once.

Then accepts are balanced: all processes wait on the one listening socket, and the kernel
wakes them all for a new connection; whoever runs first takes it, so a burst of connections
lands on the processes that happen to be on a CPU (on an oversubscribed host some get none,
and keep-alive keeps it so). Each process publishes its open-connection count in an
:class:`AcceptBoard` (an anonymous shared mapping the arbiter makes before it forks them,
a row per HTTP table row); a process holding ``http_accept_slack`` or more connections above
the least-loaded live sibling leaves the listening socket alone for a few milliseconds, so
that sibling takes the connection, but no longer than ``ACCEPT_DEFER_MAX`` after that
sibling last accepted one (a stalled sibling cannot hold connections back). The counts are
one aligned 8-byte store each; nothing is locked.

After answering on a kept-alive connection, the pool thread waits ``http_linger_ms`` for the
next request there and serves it itself (headers read non-blocking, as the poller would)
while no other work is queued, instead of handing the connection back to the poller: the
poller's round per request was the wall of an HTTP process under load. A request that does
not come in time, or whose headers are incomplete, goes to the poller as before.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import mmap
import os
import select
import selectors
import socket
import struct
import sys
import time
from functools import partial
from typing import Any

import numpy as np
from gunicorn import util
from gunicorn.http import message, wsgi
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import ThreadWorker

from . import layout as L
from .errors import InstanceError
from .osutil import keep_freed_memory, pid_alive, unread_bytes
from .shm import Shm

HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 128 * 1024  # past this the parser answers 431/414 itself
BODY_GRACE = 5.0               # seconds before min_body_rate applies
_TCP_INFO_LEN = 136            # up to and including tcpi_bytes_received
_BYTES_RECEIVED = struct.Struct("<Q")
_BYTES_RECEIVED_OFF = 128      # struct tcp_info: tcpi_bytes_received (Linux >= 4.1)
ACCEPT_HOLD = 0.005            # seconds a process leaves the listener to a less-loaded sibling
ACCEPT_DEFER_MAX = 0.05        # then takes the connection itself, however loaded
GATHER_SEND = 8192             # a body this large is sent beside its headers, not joined


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


def set_switch_interval(app_cfg: Any) -> None:
    """Apply ``http_switch_interval_us`` to this (HTTP) process.

    The pool threads, the poller and the reply wake-ups share the process's GIL. A thread
    woken by its reply (or by readable bytes) waits for the running one to block, or to be
    asked to drop the GIL once the switch interval has passed: 5 ms by default, and at c100
    that wait is the p99. On the 16-core host 200 µs took the p99 at c100 from 11.7-12.4 to
    8.6-9.6 ms for 5-13 % of throughput (docs/PERFORMANCE.md, issue 12, third round)."""
    switch_us = int(getattr(app_cfg, "http_switch_interval_us", 0))
    if switch_us:
        sys.setswitchinterval(switch_us / 1e6)


def json_error(status_int: int, reason: str, mesg: str) -> bytes:
    body = json.dumps({"error": reason, "detail": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for gunicorn.util.write_error (same signature), answering JSON."""
    util.write_nonblock(sock, json_error(status_int, reason, mesg))


class QuietSocket(socket.socket):
    """A connection's socket whose ``setblocking`` makes no ioctl (with the GIL released: a
    hand-over to a waiting thread) in the mode it is in already, as gthread asks before every
    request; the mode is the one Python tracks (``gettimeout()``: None blocking, 0.0 not)."""

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if (self.gettimeout() is None) if flag else (self.gettimeout() == 0.0):
            return
        super().setblocking(flag)

    def settimeout(self, timeout: float | None) -> None:
        """No ioctl when the timeout is the one set already: gunicorn's parser puts the
        timeout back (``settimeout(None)`` on a blocking socket) after its look for an
        unread body before every request on a connection."""
        if timeout == self.gettimeout():
            return
        super().settimeout(timeout)


_PLAIN_SOCKETS = (socket.socket, QuietSocket)
_http_date = util.http_date
_date_cache: tuple[int, str] = (0, "")


def http_date(timestamp: float | None = None) -> str:
    """gunicorn's ``util.http_date``, the ``Date`` header of every response: the same text
    (whole seconds), made once a second instead of once a request (``email.utils.formatdate``
    is ~40 bytecodes and several objects)."""
    global _date_cache
    if timestamp is not None:
        return _http_date(timestamp)
    now = int(time.time())
    at, text = _date_cache
    if at != now:
        text = _http_date(now)
        _date_cache = (now, text)  # one tuple store: threads read it whole
    return text


class OneSendResponse(wsgi.Response):
    """gunicorn's response, but a body given in one piece with its Content-Length goes out
    with the headers in one send (gunicorn sends the headers, then the body: two
    syscalls and two TCP segments, each send releasing the GIL, a hand-over to a waiting
    thread under load, and each segment a wake-up of the client). Anything else (chunked,
    several pieces, HEAD, a length that does not match) takes gunicorn's own path."""

    def write(self, arg: bytes) -> None:
        if self.headers_sent or type(arg) is not bytes or self.chunked or self.sent \
                or self.response_length != len(arg) or self._omits_body:
            return super().write(arg)
        tosend = self.default_headers()
        tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        tosend.append("\r\n")
        head = "".join(tosend).encode("latin-1")  # the bytes send_headers makes
        self.headers_sent = True
        self.sent = len(arg)
        if len(arg) < GATHER_SEND or type(self.sock) not in _PLAIN_SOCKETS:  # TLS: no sendmsg
            self.sock.sendall(head + arg)
            return
        # a large body (a chunk's frames) goes with the headers by one gathering send: no
        # copy of it into a joined buffer first
        n = self.sock.sendmsg((head, arg))
        if n < len(head):
            self.sock.sendall(head[n:])
            n = len(head)
        if n - len(head) < len(arg):
            self.sock.sendall(memoryview(arg)[n - len(head):])


_ip_in_allow_list = getattr(message, "_ip_in_allow_list", None)
_allowed: dict[tuple[str, tuple[str, ...]], bool] = {}


def ip_in_allow_list(ip_str: str, allow_list: Any, networks: Any) -> bool:
    """gunicorn's peer check (is the peer a trusted proxy, for forwarded headers), asked
    on every request: the answer kept per address and allow list (the networks are made
    from the list), where gunicorn parses the address anew each time (~240 bytecodes)."""
    key = (ip_str, tuple(allow_list))
    hit = _allowed.get(key)
    if hit is None:
        hit = bool(_ip_in_allow_list(ip_str, allow_list, networks))
        if len(_allowed) >= 4096:  # many distinct peers: start over, never grow unbounded
            _allowed.clear()
        _allowed[key] = hit
    return hit


def settled_config(cfg: Any) -> Any:
    """A copy of gunicorn's ``Config`` with every setting's value as a plain attribute: a
    request reads about twenty settings, each a ``__getattr__`` call and a dict lookup
    (~370 bytecodes a request). Taken once the process has booted; the settings of a worker
    process do not change (a reload starts new ones). Properties (``is_ssl`` and the like)
    stay computed, from these values."""
    settings = getattr(cfg, "settings", None)
    if not isinstance(settings, dict):
        return cfg
    snap = copy.copy(cfg)
    for name, setting in settings.items():
        snap.__dict__[name] = setting.get()  # beside __setattr__, which refuses settings
    return snap


def _lean_gunicorn() -> None:
    """In an HTTP process: the cached Date, the cached peer check and the one-send response
    (each only where this gunicorn has what it replaces)."""
    if getattr(util, "http_date", None) is _http_date:
        util.http_date = http_date
    if _ip_in_allow_list is not None and message._ip_in_allow_list is _ip_in_allow_list:
        message._ip_in_allow_list = ip_in_allow_list
    probe = wsgi.Response.__new__(wsgi.Response)
    try:
        wsgi.Response.__init__(probe, None, None, None)
    except Exception:  # noqa: BLE001 - another gunicorn: keep its response as it is
        return
    if all(hasattr(probe, a) for a in ("headers_sent", "chunked", "sent", "response_length",
                                       "_omits_body", "headers")) and \
            hasattr(wsgi.Response, "default_headers") and wsgi.Response is not OneSendResponse:
        wsgi.Response = OneSendResponse


def _take_buffered(unreader: Any) -> bytes:
    """What gunicorn's unreader holds, taken (``take_buffered``); b"" at the cost of one
    seek when it holds nothing, as it usually does."""
    return unreader.take_buffered() if unreader.buf.seek(0, 2) else b""


def body_read(conn: Any) -> bool:
    """Whether the request's body (a Content-Length one, or none) was read whole: gunicorn's
    drain before keep-alive would find nothing, after two ``settimeout`` ioctls."""
    body = getattr(getattr(conn.parser, "mesg", None), "body", None)
    reader = getattr(body, "reader", None)
    return type(reader) is LengthReader and reader.length == 0 and not body.failed \
        and not body.buf.tell()


class AcceptBoard:
    """Each HTTP process's open-connection count, readable by its siblings: an anonymous
    shared mapping (inherited through fork), a (pid, connections) row per HTTP table row.
    Each row has one writer, its process; every word is written in one aligned store."""

    def __init__(self, rows: int = L.MAX_HTTP) -> None:
        self.rows = rows
        self._map = mmap.mmap(-1, rows * 16)  # MAP_SHARED: the children see one table
        self._words = memoryview(self._map).cast("q")  # [2r]: pid, [2r + 1]: connections
        self._table = np.frombuffer(self._map, dtype=np.int64).reshape(rows, 2)

    def join(self, row: int, pid: int) -> None:
        self._words[2 * row + 1] = 0
        self._words[2 * row] = pid

    def leave(self, row: int) -> None:
        self._words[2 * row] = 0

    def publish(self, row: int, connections: int) -> None:
        self._words[2 * row + 1] = connections

    def least_loaded(self, row: int) -> tuple[int, int] | None:
        """(pid, connections) of the sibling of ``row`` holding the fewest connections."""
        t = self._table
        live = t[:, 0] > 0
        live[row] = False
        idx = np.flatnonzero(live)
        if idx.size == 0:
            return None
        k = int(idx[np.argmin(t[idx, 1])])
        return int(t[k, 0]), int(t[k, 1])


class ShmmelThreadWorker(ThreadWorker):
    """gthread with request headers read by the poller, a minimum body rate, and accepts
    balanced over the HTTP processes."""

    _board: AcceptBoard | None = None  # made by the arbiter, shared by the workers it forks
    _board_owner = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls._board is None or cls._board_owner != os.getpid():  # runs in the arbiter
            cls._board = AcceptBoard()
            cls._board_owner = os.getpid()
        self.board = cls._board
        self.board_row = -1
        self.accept_slack = 0
        self._hold_until = 0.0
        self._defer_since = 0.0
        self._last_defer = 0.0
        self._defer_peer: tuple[int, int] | None = None

    def init_process(self) -> None:
        util.write_error = write_json_error  # this process is ours: gunicorn's pages as JSON
        _lean_gunicorn()
        cfg = settled_config(self.cfg)
        if getattr(self.log, "cfg", None) is self.cfg:
            self.log.cfg = cfg  # its access() reads five settings a request
        self.cfg = cfg
        app_cfg = getattr(self.app, "config", None)
        self.header_timeout = float(getattr(app_cfg, "header_timeout", 10.0))
        self.min_body_rate = int(getattr(app_cfg, "min_body_rate", 1024))
        self.linger_ms = float(getattr(app_cfg, "http_linger_ms", 0.0))
        set_switch_interval(app_cfg)
        keep_freed_memory(int(getattr(app_cfg, "malloc_keep_mb", 0)))
        self._plain = not self.cfg.is_ssl  # constant; a property lookup on every read
        # the parser gets the headers alone (see _gather) unless a PROXY protocol header may
        # precede them ("off" in gunicorn >= 24, False before)
        self._split_head = getattr(self.cfg, "proxy_protocol", "off") in ("off", False, None)
        self.reading: dict[Any, float] = {}      # conn -> header deadline
        self.bodies: dict[Any, tuple[float, int, int]] = {}  # conn -> (start, need, bytes0)
        self._next_body_check = 0.0
        self._notified = 0.0
        super().init_process()

    def run(self) -> None:
        cfg = getattr(self.app, "config", None)
        if cfg is not None and int(getattr(cfg, "http_workers", 1)) > 1:
            try:
                shm = Shm.attach(cfg.instance)  # closed before any thread runs (POSIX locks)
            except InstanceError:
                shm = None
            if shm is not None:
                try:
                    self.wait_for_siblings(shm, cfg.http_workers,
                                           float(getattr(cfg, "http_boot_wait", 0.0)))
                    rows = np.flatnonzero(shm.http["pid"] == os.getpid())
                finally:
                    shm.close()
                slack = int(getattr(cfg, "http_accept_slack", 0))
                if rows.size and int(rows[0]) < self.board.rows and slack > 0:
                    self.board_row, self.accept_slack = int(rows[0]), slack
                    self.board.join(self.board_row, os.getpid())
        try:
            super().run()
        finally:
            if self.board_row >= 0:
                self.board.leave(self.board_row)

    def wait_for_siblings(self, shm: Shm, want: int, wait: float) -> None:
        """Before accepting: wait (at most ``wait`` s) until ``want`` HTTP processes of the
        instance have booted, so the first connections spread over all of them."""
        deadline = time.monotonic() + wait
        while self.alive and wait > 0:
            booted = sum(1 for pid in shm.http["pid"].tolist() if pid and pid_alive(pid))
            if booted >= want:
                return
            if time.monotonic() >= deadline:
                self.log.warning("accepting connections with %d of %d HTTP processes booted "
                                 "after %g s (http_boot_wait)", booted, want, wait)
                return
            self.notify()
            time.sleep(0.01)

    # -- accepts, balanced over the HTTP processes ----------------------------------------------
    def accept(self, listener: Any) -> None:
        if self.board_row >= 0 and self._defer_accept():
            return
        super().accept(listener)

    def _defer_accept(self) -> bool:
        """Whether to leave the pending connection to a less-loaded live sibling (and stop
        polling the listener for ACCEPT_HOLD)."""
        least = self.board.least_loaded(self.board_row)
        if least is None or self.nr_conns - least[1] < self.accept_slack:
            return False
        now = time.monotonic()
        if least != self._defer_peer or now - self._last_defer > 4 * ACCEPT_HOLD:
            self._defer_since = now  # a new burst, or the sibling accepted one meanwhile
        elif now - self._defer_since > ACCEPT_DEFER_MAX:
            return False  # the sibling took none for this long: take it
        if not pid_alive(least[0]):
            return False
        self._defer_peer = least
        self._last_defer = now
        self.set_accept_enabled(False)
        self._hold_until = now + ACCEPT_HOLD
        return True

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and self._hold_until:
            if time.monotonic() < self._hold_until:
                return  # run() asks every pass; the hold ends on a pass after ACCEPT_HOLD
            self._hold_until = 0.0
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._hold_until:  # wake in time to poll the listener again
            timeout = min(timeout, ACCEPT_HOLD)
        super().wait_for_and_dispatch_events(timeout)

    def notify(self) -> None:
        """gunicorn's liveness stamp (a utime(2) on a temp file), called on every pass of
        the poller loop: at most every 0.5 s here (the arbiter's timeout is 30 s). It cost
        11 % of the poller thread under load (py-spy, docs/PERFORMANCE.md)."""
        if self.board_row >= 0:
            self.board.publish(self.board_row, self.nr_conns)
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
        """Read what the socket holds (non-blocking) until the request headers are complete
        (or too long: the parser then answers 431); True then.

        The parser is given the headers alone; the bytes that came after them (a chunk's
        body, usually all of it: one ``recv`` of up to 64 KiB) wait in ``conn.hbody`` until
        the headers are parsed (:meth:`handle_request` puts them back). gunicorn's Python
        parser copies everything its buffer holds several times over while it looks for
        the end of the headers (a bytearray, ``bytes()`` of it per line and per look, the
        slice after the headers, the unread), so a 32 KB body that came with its headers
        was copied about eight times before the app saw it (py-spy on the GPU host: this
        method and the parse held the GIL ~45 us a session chunk, ~20 us more than the bare
        app's reads)."""
        if conn.is_http2 or not self._plain:
            return True  # not ours to buffer: gunicorn's own path
        data = getattr(conn, "hbuf", None)  # what came so far (None: a new request)
        if data is None:
            # a kept-alive connection may hold read-ahead (the next request, pipelined)
            data = _take_buffered(conn.parser.unreader) if conn.parser is not None else b""
            end = data.find(HEADER_END)
        else:
            end = -1  # looked through when it was kept
        while end < 0 and len(data) < MAX_HEADER_BYTES:
            try:
                more = conn.sock.recv(65536, socket.MSG_DONTWAIT)  # whatever the socket's mode
            except (BlockingIOError, InterruptedError):
                conn.hbuf = data
                return False
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    conn.hbuf = data
                    return False
                raise _Closed() from None
            if not more:
                raise _Closed()
            if not data:  # the usual case: the whole request in one read, kept as it is
                data, end = more, more.find(HEADER_END)
            else:  # headers in pieces (a slow client): appended, and only the new bytes
                if type(data) is bytes:  # looked through (with the three before them)
                    data = bytearray(data)
                seen = len(data)
                data += more
                end = data.find(HEADER_END, max(0, seen - 3))
        conn.hbuf = None
        if type(data) is bytearray:
            data = bytes(data)
        if conn.parser is None:
            conn.init()  # plain HTTP/1: only creates the parser
        unreader = conn.parser.unreader
        rest = _take_buffered(unreader)
        if end < 0 or not self._split_head:
            # too long (the parser refuses it), or a PROXY protocol header comes first (its
            # v2 signature starts with the blank line): all of it to the parser
            head, conn.hbody = data + rest, None
        else:
            end += len(HEADER_END)
            head, after = data[:end], data[end:] + rest if rest else data[end:]
            conn.hbody = after or None
        unreader.buf = io.BytesIO(head)  # shares the bytes: no copy
        return True

    # -- keep-alive: the next request in the same thread -------------------------------------
    def handle(self, conn: Any) -> Any:
        """Serve the request, then (``http_linger_ms``) the connection's next ones while
        they arrive within the linger and no other work waits for a thread: each one so
        served skips the poller's round (hand back, register, wake, unregister, read the
        headers, submit), the wall of an HTTP process under load."""
        if type(conn.sock) is socket.socket:  # plain TCP (not TLS): see QuietSocket
            conn.sock.__class__ = QuietSocket
        keep = super().handle(conn)
        work = getattr(self.tpool, "_work_queue", None)
        while keep is True and self.linger_ms > 0 and self.alive and work is not None \
                and work.empty():
            ready = self._next_request(conn)
            if ready is None:
                return False  # the peer closed: finish_request closes it
            if not ready:
                break  # to the poller (with any partial headers in conn.hbuf)
            keep = super().handle(conn)
        return keep

    def finish_request(self, conn: Any, fs: Any) -> None:
        """A connection whose next request's headers the linger read in part goes to the
        header reader (header_timeout, 408), not to the keep-alive list, where the poller
        would wait for more bytes with no header deadline and close it silently at the
        keep-alive timeout."""
        if getattr(conn, "hbuf", None) and not fs.cancelled() and fs.exception() is None \
                and fs.result() is True:
            self.enqueue_req(conn)
            return
        super().finish_request(conn, fs)

    def _next_request(self, conn: Any) -> bool | None:
        """Wait up to ``linger_ms`` for the next request's headers (non-blocking reads):
        True once they are whole, False if they are not (yet), None if the peer closed."""
        if conn.is_http2 or not self._plain:
            return False
        if getattr(conn, "hbuf", None) is None and not conn.parser.unreader.buf.seek(0, 2):
            poll = getattr(conn, "lpoll", None)  # one per connection, made at its first linger
            if poll is None:
                poll = conn.lpoll = select.poll()
                poll.register(conn.sock, select.POLLIN)
            if not poll.poll(self.linger_ms):
                return False
        try:
            return self._gather(conn)
        except _Closed:
            return None

    # -- the body: a minimum rate ---------------------------------------------------------------
    @staticmethod
    def _put_back(conn: Any) -> None:
        """The bytes read after the request's headers (see :meth:`_gather`) back in the
        parser's buffer, once the headers are parsed: after anything it left unread."""
        after = getattr(conn, "hbody", None)
        if after is not None:
            conn.hbody = None
            unreader = conn.parser.unreader
            left = _take_buffered(unreader)
            unreader.buf = io.BytesIO(left + after if left else after)  # no copy

    def handle_h2c_upgrade(self, conn: Any, req: Any, settings: Any) -> Any:
        self._put_back(conn)  # the client's first HTTP/2 frames may have come with them
        return super().handle_h2c_upgrade(conn, req, settings)

    def handle_request(self, req: Any, conn: Any) -> bool:
        self._put_back(conn)
        unreader = conn.parser.unreader
        need = next((int(v) for n, v in req.headers if n == "CONTENT-LENGTH" and v.isdigit()), 0)
        if self.min_body_rate and need:
            # body bytes still to come: Content-Length minus what the parser holds and what
            # the kernel has received but nobody has read yet (counted in bytes0 already)
            held = unreader.buf.seek(0, 2)  # its size (getbuffer() would copy shared bytes)
            if need > held:  # else the whole body is read already: no syscall for it
                held += unread_bytes(conn.sock)
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
        if keepalive and body_read(conn):
            return True  # nothing to drain (see body_read)
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
