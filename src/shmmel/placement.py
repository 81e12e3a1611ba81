"""Where work goes when there are several devices: the policy, as pure functions.

The producer (:class:`shmmel.channel.Producer`) gathers one :class:`Candidate` per ready,
beating worker of the wanted kinds and asks these functions which one to use. A device whose
workers are all down (dead, backing off, booting, stalled) has no candidate, so it is never
chosen; a worker whose queue is full is skipped.

- A stream (:func:`place_stream`) goes to the device holding the fewest streams, ties to
  the one with fewer requests queued, then to that device's worker with the fewest streams.
  A device's figures are summed over its workers: the GPU is what its workers share, so a
  device with one live worker of two is as big as before. Streams come first because each
  real-time stream is a standing load for as long as it lives, while a queue is a moment's
  (and a burst of opens queues the opens themselves: counting them too would count each
  new stream twice).
- A one-shot request (:func:`place_request`) goes to the device with the fewest queued
  requests, ties broken round robin (``turn``), then to that device's least queued worker.

With one device (or none: CPU workers, device -1) both reduce to the old rules: fewest
streams then shortest queue, and round robin over workers with room in their queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple


class Candidate(NamedTuple):
    worker: int   # row of the worker table
    gen: int      # its generation (a request carries it; a respawn invalidates it)
    device: int   # CUDA ordinal, -1 for a CPU worker
    streams: int  # streams pinned to it
    queued: int   # requests queued on or taken by it


class DeviceLoad(NamedTuple):
    device: int
    streams: int
    queued: int
    workers: int  # candidates (ready workers) on it

    @property
    def load(self) -> tuple[int, int]:
        """What :func:`place_stream` compares: streams, then queued requests."""
        return self.streams, self.queued


def device_loads(cands: Iterable[Candidate]) -> dict[int, DeviceLoad]:
    """Per device: streams, queued requests and ready workers, summed over its candidates."""
    acc: dict[int, list[int]] = {}
    for c in cands:
        a = acc.setdefault(c.device, [0, 0, 0])
        a[0] += c.streams
        a[1] += c.queued
        a[2] += 1
    return {d: DeviceLoad(d, *a) for d, a in acc.items()}


def place_stream(cands: Sequence[Candidate], queue_depth: int) -> Candidate | None:
    """The worker for a new stream: the least loaded device (fewest streams, then fewest
    queued requests, then lowest ordinal), then its worker with the fewest streams (ties:
    shorter queue, lower index). None when every candidate's queue holds ``queue_depth``."""
    room = [c for c in cands if c.queued < queue_depth]
    if not room:
        return None
    loads = device_loads(cands)
    best = min({c.device for c in room}, key=lambda d: (loads[d].load, d))
    return min((c for c in room if c.device == best),
               key=lambda c: (c.streams, c.queued, c.worker))


def place_request(cands: Sequence[Candidate], queue_depth: int, turn: int) -> Candidate | None:
    """The worker for one stateless request: the device with the fewest queued requests
    (ties: round robin by ``turn``), then its least queued worker (ties: round robin).
    None when every candidate's queue is full."""
    room = [c for c in cands if c.queued < queue_depth]
    if not room:
        return None
    devices = sorted({c.device for c in room})
    queued = {d: 0 for d in devices}
    for c in cands:
        if c.device in queued:
            queued[c.device] += c.queued
    n = len(devices)
    best = min(range(n), key=lambda i: (queued[devices[i]], (i - turn) % n))
    mine = [c for c in room if c.device == devices[best]]
    m = len(mine)
    j = min(range(m), key=lambda i: (mine[i].queued, (i - turn // n) % m))
    return mine[j]
