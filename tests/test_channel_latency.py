"""The sequential request path's shortcuts (issue 12): a reply caught by polling, the home
worker of a process with nothing else in flight, a worker's spin on its doorbell, one scan for
the posts made, and the HTTP metrics written as single stores. Real shared memory, workers forked or in threads."""

from __future__ import annotations

import os
import threading
import time

import falcon
import numpy as np
import pytest

from shmmel import channel
from shmmel import layout as L
from shmmel.channel import Producer
from shmmel.inbox import Inbox
from shmmel.config import Config
from shmmel.metrics import HttpMetrics
from shmmel.worker import Worker

from .test_channel import start_workers


@pytest.fixture
def spare(monkeypatch):
    """A host with cores to spare, whatever this one is (see channel.spare_cores)."""
    monkeypatch.setattr(channel, "_spare", [True, float("inf")])


def test_reply_caught_by_polling_leaves_no_post_behind(shm, spare):
    """A reply seen while polling leaves the worker's post on the reply semaphore; release
    takes it, so the slot's next request sleeps until its own answer (no early wake-up)."""
    start_workers(shm, 1)
    prod = Producer(shm, queue_depth=8, reply_spin=1.0)  # poll up to 1 s: always caught
    for _ in range(50):
        with prod.claim() as slot:
            slot.view(3)[:] = b"abc"
            slot.submit(0, 1, L.OP_PING, 3, prod.next_seq())
            slot.wait(5)
            assert slot.reply().data == b"cba|0"
            index = slot.index
    # each release took its reply's post (one may still be on its way when release looks:
    # the next release takes it), so 50 polled replies leave at most one behind, not 50
    time.sleep(0.05)
    slot = prod.claim()
    assert slot.index == index  # the deque hands back the slot just released
    slot.release()
    assert shm.replies[index].value <= 1
    # and a sleeping wait (no polling) still gets the right answer on that slot; it takes
    # one post, so the one left behind is gone, or (when the last polled reply's post came
    # only now, on a loaded host) its own stays: never two
    prod.reply_spin = 0.0
    assert prod.call(L.OP_PING, b"xyz", timeout=5).data == b"zyx|0"
    time.sleep(0.05)
    assert shm.replies[index].value <= 1


def test_polling_only_while_alone_in_flight(shm, spare):
    """While another request of the process awaits its reply, a wait sleeps at once (a
    poll would hold the GIL from the other thread): the answer still arrives."""
    start_workers(shm, 2, delay=0.2)
    prod = Producer(shm, queue_depth=8, reply_spin=5.0)  # would poll 5 s if it polled
    slow = threading.Thread(target=prod.call, args=(L.OP_PING, b"a"), kwargs={"timeout": 5})
    slow.start()
    deadline = time.monotonic() + 5
    while not prod._waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    assert prod._waiting, "the first request is not waiting"
    t0 = time.monotonic()
    assert prod.call(L.OP_PING, b"b", timeout=5).data.startswith(b"b|")
    slow.join()
    assert time.monotonic() - t0 < 2.0  # answered after the 0.2 s delay, not after 5 s
    assert prod._waiting == []


def test_home_worker_when_alone_round_robin_otherwise(shm):
    for k in range(3):
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        shm.workers["gen"][k] = 1
        shm.workers["state"][k] = L.W_READY
    prod = Producer(shm, queue_depth=8)
    home = prod.row % 3
    assert {prod.pick_worker()[0] for _ in range(20)} == {home}
    prod._waiting.append(0)  # another request of this process awaits its reply
    assert {prod.pick_worker()[0] for _ in range(20)} == {0, 1, 2}
    prod._waiting.clear()
    # a worker that is no longer ready is dropped from the cached list once it is refreshed
    shm.workers["state"][home] = L.W_DEAD
    prod.forget_workers()
    assert home not in {prod.pick_worker()[0] for _ in range(20)}


def test_worker_spin_returns_at_the_doorbell_post_or_after_its_time(shm):
    """A spinning worker returns as soon as its doorbell is posted, leaving the post for the
    loop's acquire (no sleep), and after its time when nothing comes."""
    config = Config(instance=shm.instance, workers=2, worker_kind="cpu", whisper_workers=0)
    shm.workers["gen"][0] = 1
    w = Worker(config, shm, 0, 1, parent=0)
    prod = Producer(shm, queue_depth=8, reply_spin=0.0)
    t0 = time.monotonic()
    w.spin(0.05)  # nothing comes
    assert 0.05 <= time.monotonic() - t0 < 1.0
    spun = threading.Thread(target=w.spin, args=(5.0,))
    spun.start()
    time.sleep(0.02)
    assert spun.is_alive()
    slot = prod.claim()
    slot.submit(0, 1, L.OP_PING, 0, prod.next_seq())
    spun.join(timeout=2.0)
    assert not spun.is_alive(), "the spin did not see the doorbell's post"
    assert shm.doorbells[0].value == 1  # left for the loop to take
    assert w.inbox.pending() == [slot.index]
    shm.doorbells[0].acquire(0)
    slot.release()


def test_the_loop_takes_the_posts_made_and_serves_them_in_one_scan(shm):
    """Requests submitted while the worker was busy (a post each) are served by one scan:
    the loop takes the posts already made before scanning, instead of scanning once more
    per post left behind (each empty)."""
    config = Config(instance=shm.instance, workers=2, worker_kind="cpu", whisper_workers=0,
                    worker_spin_us=0)
    shm.workers["gen"][0] = 1
    w = Worker(config, shm, 0, 1, parent=os.getppid())
    w.boot = lambda: None  # text and ping only: no engine needed
    prod = Producer(shm, queue_depth=8, reply_spin=0.0)
    slots = [prod.claim() for _ in range(4)]
    for s in slots:
        s.submit(0, 1, L.OP_PING, 0, prod.next_seq())
    assert shm.doorbells[0].value == 4
    scans = []
    take = w.inbox.take
    w.inbox.take = lambda now: scans.append(take(now)) or scans[-1]
    loop = threading.Thread(target=w.serve_until_stopped)
    loop.start()
    try:
        for s in slots:
            s.wait(5)
            assert s.reply().status == L.R_OK
        time.sleep(0.05)
        assert [len(t) for t in scans] == [4]  # one scan for four posts, none empty
        assert shm.doorbells[0].value == 0
    finally:
        w.stop_signal = 15
        shm.doorbells[0].release()
        loop.join(5)
        for s in slots:
            s.release()
    assert not loop.is_alive()


def test_reply_polled_behind_a_queue(shm, spare):
    """A producer alone in flight polls for its reply even when the worker's queue was not
    empty when last counted: a short request behind a few others still comes within the
    poll, and a reply caught so was not slept for (its post is taken at release)."""
    start_workers(shm, 1)
    prod = Producer(shm, queue_depth=8, reply_spin=1.0)
    prod._depth_list[0] = 3  # as if three requests were queued when last counted
    prod._depths_at = float("inf")  # and that count current
    with prod.claim() as slot:
        slot.view(2)[:] = b"ab"
        slot.submit(0, 1, L.OP_PING, 2, prod.next_seq())
        slot.wait(5)
        assert slot._drain, "the reply was slept for, not polled"
        assert slot.reply().data == b"ba|0"


def test_http_metrics_count_into_their_row(shm):
    m = HttpMetrics(shm, 1)

    class Req:  # what process_response reads of a falcon.Request
        uri_template = "/process"
        context = falcon.Request.context_type()

    Req.context.t0 = time.perf_counter() - 0.003

    class Resp:  # a status as falcon holds it: its text, or an int
        status = falcon.HTTP_404

    class Ok:
        status = 200

    req = Req()
    for _ in range(3):
        m.process_response(req, Resp(), None, True)
    r, c = L.ROUTES.index("process"), L.CODES.index(404)
    counts = shm.metrics["requests"]
    assert counts[1, r, c] == 3 and int(counts.sum()) == 3
    m.process_response(req, Ok(), None, True)  # another status: its own counter
    assert counts[1, r, L.CODES.index(200)] == 1 and counts[1, r, c] == 3
    m.process_response(req, Resp(), None, True)
    m.process_response(req, Resp(), None, True)
    m.process_response(req, Resp(), None, True)
    m.process_response(req, Ok(), None, True)
    assert counts[1, r, c] == 6 and counts[1, r, L.CODES.index(200)] == 2
    b = int(np.searchsorted(L.BUCKETS, 0.003))  # 3 ms or more (more on a loaded host)
    assert shm.metrics["latency"][1, r].sum() == 8 and shm.metrics["latency"][1, r, b:].sum() == 8
    assert shm.metrics["latency_sum"][1, r] >= 0.024
    assert shm.http["requests"][1] == 8 and int(shm.http["requests"].sum()) == 8


def test_pending_takes_the_oldest_first(shm):
    prod = Producer(shm, queue_depth=8, reply_spin=0.0)
    slots = [prod.claim() for _ in range(4)]
    for s in slots:
        s.submit(0, 1, L.OP_PING, 0, prod.next_seq())
    for i, s in enumerate(slots):  # submitted "later" in claim order: the last is oldest
        shm.slots["t_submit"][s.index] = 100.0 - i
    inbox = Inbox(shm, 0, 1)
    assert inbox.pending() == [s.index for s in reversed(slots)]
    assert (shm.slots["state"][[s.index for s in slots]] == (L.S_TAKEN | 0)).all()
    assert inbox.pending() == []  # taken once
    for s in slots:
        s.release()


def test_polling_needs_spare_cores(monkeypatch):
    """The reply poll and the worker's spin run only on a host of 4 cores or more with fewer
    threads runnable than three quarters of them, looked at most once a second."""
    assert channel._runnable() >= 1  # this test's own thread runs
    monkeypatch.setattr(channel, "_spare", [False, 0.0])
    monkeypatch.setattr(channel, "host_cores", lambda: 16)
    monkeypatch.setattr(channel, "_runnable", lambda: 11.0)  # 8 producers, 2 workers, 1 more
    assert channel.spare_cores(100.0)
    monkeypatch.setattr(channel, "_runnable", lambda: 12.0)
    assert channel.spare_cores(100.5)  # looked at most once a second
    assert not channel.spare_cores(101.0)
    monkeypatch.setattr(channel, "host_cores", lambda: 4)
    monkeypatch.setattr(channel, "_runnable", lambda: 2.0)
    assert channel.spare_cores(102.0)
    monkeypatch.setattr(channel, "_runnable", lambda: 3.0)
    assert not channel.spare_cores(103.0)
    monkeypatch.setattr(channel, "host_cores", lambda: 2)
    monkeypatch.setattr(channel, "_runnable", lambda: 0.0)
    assert not channel.spare_cores(104.0)  # a 2-core host never polls


def test_many_polled_requests_on_one_slot_leave_at_most_one_post(shm, spare):
    """A stream's slot carries request after request without a release: each wait takes
    the post of the reply before it caught by polling, so posts never pile up."""
    start_workers(shm, 1)
    prod = Producer(shm, queue_depth=8, reply_spin=1.0)
    with prod.claim() as slot:
        for i in range(50):
            data = b"%d" % i
            slot.view(len(data))[:] = data
            slot.submit(0, 1, L.OP_PING, len(data), prod.next_seq())
            slot.wait(5)
            assert slot.reply().data == data[::-1] + b"|0"
        time.sleep(0.05)
        assert shm.replies[slot.index].value <= 1


def test_pick_worker_takes_kinds_as_any_iterable(shm):
    """``kinds`` is an Iterable: a generator names the same workers as a list (the ready
    cache once turned it into its key and passed the spent generator on: no live worker)."""
    for k in range(2):
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        shm.workers["gen"][k] = 1
        shm.workers["kind"][k] = L.K_CPU
        shm.workers["state"][k] = L.W_READY
    prod = Producer(shm, queue_depth=8)
    assert prod.pick_worker(k for k in L.MEL_KINDS)[0] in (0, 1)
    prod.forget_workers()
    assert prod.pick_worker(iter([L.K_CPU]))[0] in (0, 1)


def test_worker_spin_ends_despite_a_request_queued_on_a_dead_generation(shm):
    """A slot still marked submitted to this worker index by a dead generation (its producer
    has not cleared it yet) is never taken; the spin must not keep renewing its deadline on
    it (it spun with no heartbeat until the slot was cleared)."""
    config = Config(instance=shm.instance, workers=1, worker_kind="cpu", whisper_workers=0)
    shm.workers["gen"][0] = 2
    w = Worker(config, shm, 0, 2, parent=0)
    w.audio = None
    prod = Producer(shm, queue_depth=8, reply_spin=0.0)
    stale = prod.claim()
    stale.submit(0, 1, L.OP_PING, 0, prod.next_seq())  # generation 1: dead
    spun = threading.Thread(target=w.spin, args=(0.05,))
    try:
        spun.start()
        spun.join(timeout=2.0)
        assert not spun.is_alive(), "the worker spun on a slot of a dead generation"
        assert not stale._answered()
    finally:
        w.stop_signal = 15  # ends a runaway spin
        spun.join(timeout=2.0)
        stale.release()
