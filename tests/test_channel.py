"""The request/response channel with real processes: many producers, many consumers, kills."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from shmmel import layout as L
from shmmel.channel import Producer, Slot, reclaim_slots
from shmmel.inbox import Inbox
from shmmel.errors import RequestTimeout, ServiceUnavailable, WorkerDied, WorkerStalled
from shmmel.shm import Shm

from .conftest import fork, wait_for  # the shm fixture is conftest's too


def echo_worker(shm: Shm, k: int, gen: int, delay: float = 0.0) -> int:
    """Answers each request with reversed payload + "|k"; exits when its generation changes."""
    inbox = Inbox(shm, k, gen)
    while shm.workers["gen"][k] == gen:
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        if not inbox.wait(0.05):
            continue
        for j in inbox.pending():
            n = int(shm.slots["req_len"][j])
            out = bytes(shm.payload[j, :n])[::-1] + b"|%d" % k
            if delay:
                time.sleep(delay)
            shm.payload[j, : len(out)] = memoryview(out)
            inbox.answer(j, L.R_OK, len(out), r0=int(shm.slots["seq"][j]))
    return 0


def start_workers(shm: Shm, n: int, delay: float = 0.0) -> list[int]:
    pids = []
    for k in range(n):
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        shm.workers["gen"][k] = 1
        shm.workers["state"][k] = L.W_READY
        pids.append(fork(shm, lambda k=k: echo_worker(shm, k, 1, delay)))
    return pids


def test_many_producer_processes_and_threads_each_get_their_own_reply(shm):
    start_workers(shm, 3)

    def producer_process() -> int:
        mine = Shm.attach(shm.instance)
        prod = Producer(mine, queue_depth=64)
        bad: list[str] = []

        def run(t: int) -> None:
            rng = random.Random(os.getpid() * 100 + t)
            for i in range(150):
                payload = f"{os.getpid()}:{t}:{i}:".encode() + rng.randbytes(rng.randrange(0, 2000))
                reply = prod.call(L.OP_PING, payload, timeout=10)  # a partition > 6 threads
                body, _, k = reply.data.rpartition(b"|")
                if body != payload[::-1] or not 0 <= int(k) < 3:
                    bad.append(f"mismatch at {t}:{i}")

        threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return 3 if bad else 0

    producers = [fork(shm, producer_process) for _ in range(4)]
    for pid in producers:
        _, status = os.waitpid(pid, 0)
        shm.children.remove(pid)
        assert os.waitstatus_to_exitcode(status) == 0
    # nothing queued or in flight; what is not free is parked in the exited producers' partitions
    st = shm.slots["state"]
    assert set(np.unique(st).tolist()) <= {L.S_FREE, L.S_PARKED}
    assert not set(shm.slots["owner"][st == L.S_PARKED].tolist()) & {os.getpid()}
    prod = Producer(shm, queue_depth=64)
    assert prod.queue_depths().sum() == 0
    assert prod.call(L.OP_PING, b"abc", timeout=5).data.startswith(b"cba|")


def test_killed_worker_gives_worker_died_and_frees_the_slot(shm):
    pids = start_workers(shm, 1, delay=5.0)  # takes the request, then sleeps: we kill it
    prod = Producer(shm, queue_depth=8)
    result: dict[str, object] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            prod.call(L.OP_PING, b"x", timeout=30)
        except Exception as exc:  # noqa: BLE001
            result["exc"] = exc
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=call)
    th.start()
    wait_for(lambda: (shm.slots["state"] == L.S_TAKEN).any(), timeout=5, interval=0.01,
             what="the worker took the request")
    assert (shm.slots["state"] == L.S_TAKEN | 0).sum() == 1
    os.kill(pids[0], signal.SIGKILL)
    os.waitpid(pids[0], 0)
    shm.children.remove(pids[0])
    killed_at = time.monotonic()
    # what the supervisor does when it reaps a worker
    shm.workers["state"][0] = L.W_DEAD
    shm.workers["gen"][0] += 1
    th.join(5)
    assert not th.is_alive()
    assert isinstance(result["exc"], WorkerDied)
    assert time.monotonic() - killed_at < 1.0
    # the call released its slot (the caller owns it after WorkerDied, not the dead worker)
    assert set(np.unique(shm.slots["state"]).tolist()) <= {L.S_FREE, L.S_PARKED}


def test_all_workers_silent_is_a_starved_host_not_a_stall(shm):
    """Every worker silent at once (a starved host): a request waits for its answer instead
    of a 503 for a stall."""
    pids = start_workers(shm, 1)
    prod = Producer(shm, queue_depth=8, stall_timeout=0.3)
    os.kill(pids[0], signal.SIGSTOP)
    try:
        time.sleep(0.5)  # the load itself: the only worker has been silent past stall_timeout
        result: dict[str, object] = {}
        th = threading.Thread(target=lambda: result.update(
            r=prod.call(L.OP_PING, b"abc", timeout=20)))
        th.start()
        time.sleep(1.0)  # still waiting (the old rule gave WorkerStalled after 0.3 s)
        assert th.is_alive()
    finally:
        os.kill(pids[0], signal.SIGCONT)
    th.join(10)
    assert result["r"].data == b"cba|0"


def test_a_stalled_worker_gets_no_new_work_and_its_queue_is_rerouted(shm):
    """SIGSTOP one of two workers: a request queued on it is re-sent to the other within about
    stall_timeout (not heartbeat_timeout), and new requests skip it."""
    pids = start_workers(shm, 2)
    prod = Producer(shm, queue_depth=8, stall_timeout=0.5)
    os.kill(pids[0], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        reply = prod.call(L.OP_PING, b"abc", timeout=10, worker=None)
        answers = {prod.call(L.OP_PING, b"x", timeout=10).data for _ in range(20)}
        elapsed = time.monotonic() - t0
        assert reply.data in (b"cba|0", b"cba|1")
        assert answers == {b"x|1"}  # the stopped worker 0 is skipped once it is silent
        assert elapsed < 3.0
        # a request pinned to the stopped worker is answered 503 (WorkerStalled), not hung
        with pytest.raises(WorkerStalled):
            prod.call(L.OP_PING, b"pinned", timeout=10, worker=(0, 1))
        orphaned = (shm.slots["state"] != L.S_FREE) & (shm.slots["owner"] == 0)
        assert orphaned.sum() >= 1  # left to the supervisor: the worker may still wake
    finally:
        os.kill(pids[0], signal.SIGCONT)


def test_timeout_orphans_the_slot_instead_of_reusing_it(shm):
    start_workers(shm, 1, delay=0.6)
    prod = Producer(shm, queue_depth=8)
    with pytest.raises(RequestTimeout):
        prod.call(L.OP_PING, b"slow", timeout=0.2)
    taken = (shm.slots["state"] != L.S_FREE) & (shm.slots["owner"] == 0)
    assert taken.sum() == 1  # orphaned, not freed: the worker still writes into it
    orphan = Slot(prod, int(np.flatnonzero(taken)[0]))
    orphan._owned = False  # what Slot.wait leaves behind after the timeout
    with pytest.raises(ServiceUnavailable, match="given up"):
        orphan.submit(0, 1, L.OP_PING, 0, prod.next_seq())
    # a new request gets another slot and its own answer, never the late one
    assert prod.call(L.OP_PING, b"next", timeout=5).data == b"txen|0"


def test_no_worker_and_full_queue_are_unavailable(shm):
    prod = Producer(shm, queue_depth=1)
    with pytest.raises(ServiceUnavailable, match="no live worker"):
        prod.pick_worker()
    shm.workers["state"][0] = L.W_READY
    # ready but silent, and no other worker beats: a starved host, not a stall; routed to
    assert prod.pick_worker() == (0, int(shm.workers["gen"][0]))
    shm.set_worker_word(0, "heartbeat", time.monotonic())
    slot = prod.claim()
    slot.submit(0, int(shm.workers["gen"][0]), L.OP_PING, 0, prod.next_seq())
    prod._depths_at = -1.0  # the queue depths are cached for DEPTH_TTL: read them anew
    with pytest.raises(ServiceUnavailable, match="queues are full"):
        prod.pick_worker()
    slot.release()


def test_slots_exhausted_is_unavailable(shm):
    prod = Producer(shm, queue_depth=8)
    held = [prod.claim() for _ in range(prod.capacity)]
    assert len({s.index for s in held}) == prod.capacity
    assert all(prod.first <= s.index < prod.stop for s in held)  # its own partition only
    with pytest.raises(ServiceUnavailable, match="slots of this HTTP process are busy"):
        prod.claim()
    for s in held:
        s.release()
    # released slots stay parked in this producer's partition, for it alone to reuse
    part = shm.slots["state"][prod.first : prod.stop]
    assert (part == L.S_PARKED).all()
    assert prod.claim().index in {s.index for s in held}


def test_producers_own_disjoint_partitions_and_adopt_freed_slots(shm):
    a, b = Producer(shm, queue_depth=8), Producer(shm, queue_depth=8)
    assert a.row != b.row
    assert set(range(a.first, a.stop)).isdisjoint(range(b.first, b.stop))
    assert a.capacity >= 2 * 16 + L.SLOTS_OVER_THREADS  # room for a stall's orphans
    # an orphaned slot (owner 0) is not reused until the supervisor frees it, then adopted
    slot = a.claim()
    slot.orphan()
    held = [a.claim() for _ in range(a.capacity - 1)]
    with pytest.raises(ServiceUnavailable):
        a.claim()
    assert reclaim_slots(shm) == 1  # the supervisor's sweep frees only the orphan
    again = a.claim()
    assert again.index == slot.index and int(shm.slots["owner"][slot.index]) == os.getpid()
    for s in held + [again]:
        s.release()



def test_a_reused_slot_is_not_answered_by_its_previous_reply(shm):
    """submit leaves resp_seq, resp_len and status as the last reply wrote them: a slot
    reused for a new request must not pass for answered until the worker answers that one,
    and the worker reads the new request's words (take decodes them in one read). r0..f1
    it zeroes, so a plain answer (which skips them) reads zeros, not the last reply's."""
    prod = Producer(shm, queue_depth=8, reply_spin=0.0)
    inbox = Inbox(shm, 0, 1)
    with prod.claim() as slot:
        slot.view(2)[:] = b"ab"
        slot.submit(0, 1, L.OP_PING, 2, prod.next_seq(), (7,))
        [(_t, j, req)] = inbox.take(time.monotonic())
        assert j == slot.index and req == (L.OP_PING, 2, -1, 7, 0, 0, 0)
        inbox.answer(j, L.R_BAD_INPUT, 2, r0=5, r1=6, f0=1.5)
        slot.wait(1)
        r = slot.reply()
        assert (r.status, r.data, r.r0, r.r1, r.f0, r.f1) == (L.R_BAD_INPUT, b"ab", 5, 6, 1.5, 0)
        assert r.times[0] <= r.times[1] <= r.times[2] <= r.times[3]
        # the same slot, a new request: the old reply is still in its words, DONE
        slot.submit(0, 1, L.OP_TEXT, 1, prod.next_seq(), (1, 2, 3, 4), stream=3)
        assert int(shm.slots["status"][slot.index]) == L.R_BAD_INPUT
        assert not slot._answered()
        [(_t, j, req)] = inbox.take(time.monotonic())
        assert req == (L.OP_TEXT, 1, 3, 1, 2, 3, 4)
        assert not slot._answered()
        inbox.answer(j, L.R_OK, 1)
        slot.wait(1)
        r = slot.reply()
        # r0..f1 as submit zeroed them: the worker writes them only when one is not zero
        assert (r.status, r.data, r.r0, r.r1, r.f0, r.f1) == (L.R_OK, b"a", 0, 0, 0.0, 0.0)
        # a request of fewer args clears the ones it does not give
        slot.submit(0, 1, L.OP_PING, 0, prod.next_seq())
        assert inbox.take(time.monotonic())[0][2] == (L.OP_PING, 0, -1, 0, 0, 0, 0)
        inbox.answer(j, L.R_OK, 0)
        slot.wait(1)
