"""The text load: ``POST /process`` over raw keep-alive sockets, one epoll loop a process.

Every request is built as bytes before the clock starts. Each connection carries one
request at a time (HTTP/1.1, no pipelining):

* closed loop - a connection sends its next request as soon as the last answer is read;
* open loop - connection ``j`` of ``C`` sends at the intended times ``t0 + (j + nC) / R``
  (a constant total rate ``R``). A request that cannot leave on time (the connection is
  still waiting for an earlier answer) leaves as soon as it can, but its latency is measured
  from its *intended* send time, as wrk2 does, so a server stall shows up in the figures
  for every request it delayed (coordinated omission). The uncorrected latency (from the
  actual send) is recorded too.
"""

from __future__ import annotations

import json
import random
import re
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from hdrh.histogram import HdrHistogram

from .hist import encode, new_hist, record_s

Mode = Literal["closed", "open", "burst"]
OPS = ("reverse", "upper", "prefix")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_TIMING = re.compile(rb"\r\nserver-timing:[ \t]*([^\r\n]*)", re.I)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)


def message(size: int, rng: random.Random) -> str:
    """``size`` bytes of UTF-8 text: mostly ASCII words, with a few 2-byte letters."""
    words, n = [], 0
    while n < size:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(rng.randint(2, 9)))
        words.append(w)
        n += len(w.encode()) + 1
    text = " ".join(words).encode()[:size].decode("utf-8", "ignore")
    return text + "x" * (size - len(text.encode()))


def auth_headers(token: str) -> dict[str, str]:
    """The header an instance with ``auth_token`` set wants (none for "")."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_requests(host: str, sizes: list[int], ops: list[str], seed: int = 0,
                   count: int = 64, path: str = "/process", token: str = "") -> list[bytes]:
    """``count`` distinct request byte strings; sizes and ops drawn from the given lists."""
    rng = random.Random(seed)
    auth = "".join(f"{k}: {v}\r\n" for k, v in auth_headers(token).items())
    out = []
    for i in range(count):
        size, op = sizes[i % len(sizes)], ops[rng.randrange(len(ops))]
        body = json.dumps({"message": message(size, rng), "op": op},
                          ensure_ascii=False).encode()
        out.append(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                   f"\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    rng.shuffle(out)
    return out


def parse_sizes(spec: str) -> list[int]:
    """"256" or "64,512,4096" (a mix, used in turn) -> sizes in bytes (1 .. 4096)."""
    sizes = [int(s) for s in spec.split(",") if s.strip()]
    if not sizes or any(not 1 <= s <= 4096 for s in sizes):
        raise ValueError(f"message sizes must be 1..4096 bytes, got {spec!r}")
    return sizes


def parse_ops(spec: str) -> list[str]:
    """"reverse" or "reverse:2,upper:1,prefix:1" (weights) -> a list to draw from."""
    out: list[str] = []
    for part in spec.split(","):
        op, _, w = part.strip().partition(":")
        if op not in OPS:
            raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
        out += [op] * int(w or 1)
    return out


def parse_timing(value: bytes) -> dict[str, float]:
    """``queue;dur=0.1, worker;dur=0.2, ipc;dur=0.4`` -> {"queue": 0.1, ...} (ms)."""
    out = {}
    for part in value.split(b","):
        name, _, rest = part.strip().partition(b";")
        for param in rest.split(b";"):
            k, _, v = param.strip().partition(b"=")
            if k == b"dur":
                out[name.decode()] = float(v)
    return out


@dataclass
class Plan:
    """What one load process does. Times are ``time.monotonic()`` values (system-wide)."""

    host: str
    port: int
    requests: list[bytes]
    connections: int
    t0: float                      # the clock starts (warm-up begins)
    warmup: float
    duration: float
    mode: Mode = "closed"
    rate: float = 0.0              # open loop: requests per second for this process
    first_conn: int = 0            # index of this process's first connection, all processes
    all_conns: int = 0             # connections over all processes (open-loop stagger)
    total_rate: float = 0.0
    timing_every: int = 0          # parse Server-Timing on every n-th answer (0: never)
    grace: float = 5.0             # after the end: wait this long for answers in flight
    connect_timeout: float = 10.0

    @property
    def start(self) -> float:      # measurement starts
        return self.t0 + self.warmup

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass
class Result:
    """One process's figures; ``merge`` adds them up."""

    latency: HdrHistogram = field(default_factory=new_hist)
    uncorrected: HdrHistogram = field(default_factory=new_hist)
    timing: dict[str, HdrHistogram] = field(default_factory=dict)
    per_second: list[int] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    sent: int = 0
    done: int = 0

    def tick(self, start: float, now: float) -> None:
        i = int(now - start)
        if i >= 0:
            if i >= len(self.per_second):
                self.per_second.extend([0] * (i + 1 - len(self.per_second)))
            self.per_second[i] += 1

    def to_wire(self) -> dict:
        return {"latency": encode(self.latency), "uncorrected": encode(self.uncorrected),
                "timing": {k: encode(h) for k, h in self.timing.items()},
                "per_second": self.per_second, "statuses": dict(self.statuses),
                "errors": dict(self.errors), "sent": self.sent, "done": self.done}


class Conn:
    __slots__ = ("sock", "buf", "req", "intended", "sent_at", "busy", "index", "next_due",
                 "interval", "want", "head_end")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.req = b""
        self.intended = self.sent_at = 0.0
        self.busy = False
        self.next_due = 0.0
        self.interval = 0.0
        self.want = -1       # total bytes of the answer (head + body), once the head is in
        self.head_end = -1


def _connect(plan: Plan) -> socket.socket:
    s = socket.create_connection((plan.host, plan.port), timeout=plan.connect_timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    return s


def run(plan: Plan, progress=None) -> Result:
    """Drive ``plan.connections`` connections until ``plan.end`` (+ grace for answers in
    flight). ``progress`` (optional) is a writable 2-slot array: answers, errors."""
    res = Result()
    if plan.timing_every:
        res.timing = {k: new_hist() for k in ("queue", "worker", "ipc", "http")}
    sel = selectors.DefaultSelector()
    conns = [Conn(i) for i in range(plan.connections)]
    for c in conns:
        c.sock = _connect(plan)
        sel.register(c.sock, selectors.EVENT_READ, c)
        if plan.mode == "open":
            c.interval = plan.all_conns / plan.total_rate
            c.next_due = plan.t0 + (plan.first_conn + c.index) / plan.total_rate
    nreq, k = len(plan.requests), plan.first_conn * 7
    start, end, t0 = plan.start, plan.end, plan.t0
    closed = plan.mode == "closed"
    burst = plan.mode == "burst"          # one request a connection, all at t0
    timing_every, answers = plan.timing_every, 0
    mono = time.monotonic

    def send(c: Conn, now: float, intended: float) -> None:
        nonlocal k
        c.req = plan.requests[k % nreq]
        k += 1
        c.intended, c.sent_at, c.busy = intended, now, True
        c.want = c.head_end = -1
        try:
            n = c.sock.send(c.req)
            if n < len(c.req):
                c.sock.setblocking(True)
                c.sock.sendall(c.req[n:])
                c.sock.setblocking(False)
        except OSError:
            fail(c, now, "send")
            return
        if now >= start and intended < end:
            res.sent += 1

    def fail(c: Conn, now: float, why: str) -> None:
        if c.busy and c.intended >= start and c.intended < end:
            res.errors[why] += 1
        c.busy = False
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.buf.clear()
        try:
            c.sock = _connect(plan)
            sel.register(c.sock, selectors.EVENT_READ, c)
        except OSError:
            res.errors["connect"] += 1
            c.sock = None

    while mono() < t0:
        time.sleep(min(0.01, max(0.0, t0 - mono())))
    now = mono()
    if closed or burst:
        for c in conns:
            send(c, now, now)
    stopping = False
    while True:
        now = mono()
        if not stopping and now >= end:
            stopping = True
        if stopping and (now >= end + plan.grace or not any(c.busy for c in conns)):
            break
        timeout = 0.05
        if burst and not any(c.busy for c in conns):
            break
        if plan.mode == "open" and not stopping:
            for c in conns:
                if not c.busy and c.sock is not None:
                    if c.next_due <= now:
                        send(c, now, c.next_due)
                        c.next_due += c.interval
                    else:
                        timeout = min(timeout, c.next_due - now)
        for skey, _ in sel.select(timeout):
            c: Conn = skey.data
            try:
                data = c.sock.recv(262144)
            except OSError:
                data = b""
            now = mono()
            if not data:
                fail(c, now, "closed")
                if closed and not stopping and c.sock is not None:
                    send(c, now, now)
                continue
            buf = c.buf
            buf += data
            if c.want < 0:
                he = buf.find(b"\r\n\r\n")
                if he < 0:
                    continue
                head = bytes(buf[:he + 2])
                m = _CONTENT_LENGTH.search(head)
                if m is None:
                    fail(c, now, "no-content-length" if not _CHUNKED.search(head) else "chunked")
                    if closed and not stopping and c.sock is not None:
                        send(c, now, now)
                    continue
                c.head_end = he + 4
                c.want = c.head_end + int(m.group(1))
            if len(buf) < c.want:
                continue
            # a whole answer
            head = bytes(buf[:c.head_end])
            del buf[:c.want]
            status = int(head[9:12])
            c.busy = False
            recorded = c.intended >= start and c.intended < end
            if recorded:
                lat = now - c.intended
                record_s(res.latency, lat)
                record_s(res.uncorrected, now - c.sent_at)
                res.statuses[status] += 1
                if status != 200:
                    res.errors[f"HTTP {status}"] += 1
                answers += 1
                if timing_every and answers % timing_every == 0:
                    m = _TIMING.search(head)
                    if m:
                        t = parse_timing(m.group(1))
                        for name in ("queue", "worker", "ipc"):
                            if name in t:
                                res.timing[name].record_value(max(1, round(t[name] * 1e3)))
                        if "ipc" in t:
                            record_s(res.timing["http"], max(1e-6, now - c.sent_at - t["ipc"] / 1e3))
            if start <= now < end:
                res.tick(start, now)
                res.done += 1
                if progress is not None:
                    progress[0] = res.done
                    progress[1] = sum(res.errors.values())
            if _CLOSE.search(head):
                fail(c, now, "server-close")
            if closed and not stopping and now < end and c.sock is not None:
                send(c, now, now)
    for c in conns:
        if c.busy and c.intended >= start and c.intended < end:
            res.errors["timeout"] += 1
        if c.sock is not None:
            c.sock.close()
    sel.close()
    if progress is not None:
        progress[0] = res.done
        progress[1] = sum(res.errors.values())
    return res
