"""Which worker a producer's request or stream goes to.

:class:`Routing` is the worker-choosing half of :class:`shmmel.channel.Producer` (its base
class): the ready workers and their queue depths, read from the worker rows and slot states
and cached for a moment (``READY_TTL``, ``DEPTH_TTL``) so a request's choice reads no worker
row; a round robin, or the producer's home worker for a sequential client; placement across
devices through :mod:`shmmel.placement`. It reads shared memory only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from . import layout as L
from . import placement
from .errors import ServiceUnavailable
from .shm import Shm

# the codecs and word indexes live beside the dtypes, in layout (reads only: see there)
_WO = L.WORKER_OFF
_U32, _I32, _F64 = L.U32, L.I32, L.F64
_W_STATE_GEN = L.W_STATE_GEN
_monotonic = time.monotonic


class Routing:
    """The worker choice of a producer (see the module's text). ``row`` picks the home
    worker; ``_waiting`` lists the slots whose reply a thread of the producer awaits."""

    DEPTH_TTL = 0.001  # seconds
    READY_TTL = 0.01   # seconds: readiness and heartbeats (stalls are judged over a second)

    def __init__(self, shm: Shm, queue_depth: int, stall_timeout: float, row: int) -> None:
        self.shm = shm
        self.queue_depth = queue_depth
        self.stall_timeout = stall_timeout
        self.row = row
        self._waiting: list[int] = []  # slots whose reply a thread of this process awaits
        self.workers_off = shm.layout.workers_off
        self._states = shm.slots["state"]
        self._rr = 0
        self._depths = np.zeros(len(shm.workers), np.int64)
        self._depth_list: list[int] = self._depths.tolist()  # the same, for item reads
        self._depths_at = -1.0
        self._ready_cache: dict[tuple[int, ...] | None, list[tuple[int, int, int]]] = {}
        self._multi_device: dict[tuple[int, ...] | None, bool] = {}  # per ready list
        self._ready_at = -1.0

    def queue_depths(self) -> np.ndarray:
        return L.queue_depths(self._states, len(self.shm.workers))

    def _cached_depths(self, fresh: bool = False) -> np.ndarray:
        """Queue depths, recomputed at most every DEPTH_TTL seconds unless ``fresh``."""
        now = time.monotonic()
        if fresh or now - self._depths_at > self.DEPTH_TTL:
            self._depths, self._depths_at = self.queue_depths(), now
            self._depth_list = self._depths.tolist()
        return self._depths

    def _ready_cached(self, kinds: Iterable[int] | None) -> list[tuple[int, int, int]]:
        """:meth:`_ready`, read anew at most every READY_TTL: a request's worker choice reads
        no worker row. A worker that died or stalled meanwhile is caught by the request's
        wait, which drops this cache before it raises (:meth:`forget_workers`); a worker
        that became ready is seen within READY_TTL (at once when none was)."""
        now = time.monotonic()
        if now - self._ready_at > self.READY_TTL:
            self._ready_cache.clear()
            self._ready_at = now
        key = kinds if kinds is None or type(kinds) is tuple else tuple(kinds)
        ready = self._ready_cache.get(key)
        if ready is None:
            ready = self._ready(key)  # not kinds: an iterator is spent by tuple() above
            self._multi_device[key] = len({r[2] for r in ready}) > 1
            if ready:
                self._ready_cache[key] = ready
        return ready

    def forget_workers(self) -> None:
        """Read worker rows and depths anew on the next pick (a worker died or stalled)."""
        self._depths_at = self._ready_at = -1.0
        self._ready_cache.clear()

    def _ready(self, kinds: Iterable[int] | None,
               exclude: int = -1) -> list[tuple[int, int, int]]:
        """(index, generation, device) of every ready, beating worker (of ``kinds``). When
        none beats but some are ready, those: every worker silent at once means a starved
        host far more often than every worker stopped, and waiting beats a 503 then."""
        ctl, off, size = self.shm.ctl_view, self.workers_off, L.WORKER.itemsize
        kind_set = None if kinds is None else set(kinds)
        oldest = time.monotonic() - self.stall_timeout
        beating, silent = [], []
        for k in range(len(self.shm.workers)):
            base = off + k * size
            state, gen = _W_STATE_GEN.unpack_from(ctl, base + _WO["state"])
            if state != L.W_READY or k == exclude or (
                    kind_set is not None
                    and _U32.unpack_from(ctl, base + _WO["kind"])[0] not in kind_set):
                continue
            row = (k, gen, _I32.unpack_from(ctl, base + _WO["device"])[0])
            fresh = _F64.unpack_from(ctl, base + _WO["heartbeat"])[0] >= oldest
            (beating if fresh else silent).append(row)
        return beating or silent

    def others_beating(self, worker: int) -> bool:
        """Whether a ready worker other than ``worker`` beats (of any mel or whisper kind
        like it): the host is not starved, so ``worker``'s silence is its own."""
        kind = int(self.shm.workers["kind"][worker])
        oldest = time.monotonic() - self.stall_timeout
        return any(self.shm.worker_word(k, "heartbeat") >= oldest
                   for k, _g, _d in self._ready([kind], exclude=worker))

    def candidates(self, kinds: Iterable[int] | None = None, streams: np.ndarray | None = None,
                   fresh: bool = True) -> list[placement.Candidate]:
        """The ready workers (of ``kinds``) with their device and load, for
        :mod:`shmmel.placement`. ``streams``: streams per worker row (default: the workers'
        own counts; the stream table's, under its lock, counts opens not yet served)."""
        depths = self._cached_depths(fresh)
        held = self.shm.workers["streams"] if streams is None else streams
        return [placement.Candidate(k, gen, dev, int(held[k]), int(depths[k]))
                for k, gen, dev in self._ready(kinds)]

    def pick_worker(self, kinds: Iterable[int] | None = None) -> tuple[int, int]:
        """A ready worker (of ``kinds``) for one request, as (index, generation).

        Round robin over ready workers (or this process's home worker when no other
        request of it is in flight), skipping any whose queue holds ``queue_depth`` requests
        (workers and depths are cached for DEPTH_TTL: one bincount per millisecond instead
        of one per request). Raises ServiceUnavailable when no worker is ready or all are
        full.
        """
        if kinds is not None and type(kinds) is not tuple:
            kinds = tuple(kinds)  # read twice below (an iterator would be spent)
        now = _monotonic()
        # the cached ready list, inline (see _ready_cached; it fills the cache)
        ready = self._ready_cache.get(kinds) if now - self._ready_at <= self.READY_TTL else None
        if ready is None:
            ready = self._ready_cached(kinds)
            if not ready:
                raise ServiceUnavailable("no live worker")
        self._rr += 1
        if self._multi_device[kinds]:  # several devices: balance them
            for fresh in (False, True):
                c = placement.place_request(self.candidates(kinds, fresh=fresh),
                                            self.queue_depth, self._rr)
                if c is not None:
                    return c.worker, c.gen
            raise ServiceUnavailable("all worker queues are full")
        # No other request of this process awaits a reply: its home worker (one per producer
        # row), which a sequential client thus keeps busy and awake (a worker that spins,
        # worker_spin_us, takes the next request without a wake-up). Else round robin.
        first = (self.row if not self._waiting else self._rr) % len(ready)
        if now - self._depths_at <= self.DEPTH_TTL:  # the usual case, inline: the first
            k, gen, _ = ready[first]  # choice, its queue not full as last counted
            if self._depth_list[k] < self.queue_depth:
                return k, gen
        for fresh in (False, True):
            depths = self._cached_depths(fresh)
            for i in range(len(ready)):
                k, gen, _ = ready[(first + i) % len(ready)]
                if depths[k] < self.queue_depth:
                    return k, gen
        raise ServiceUnavailable("all worker queues are full")

    def least_loaded(self, kinds: Iterable[int] | None = None,
                     streams: np.ndarray | None = None) -> tuple[int, int]:
        """The worker (of ``kinds``) for a new stream: on the least loaded device, the one
        holding the fewest streams (:func:`shmmel.placement.place_stream`)."""
        cands = self.candidates(kinds, streams)
        if not cands:
            raise ServiceUnavailable("no live worker")
        c = placement.place_stream(cands, self.queue_depth)
        if c is None:
            raise ServiceUnavailable("all worker queues are full")
        return c.worker, c.gen
