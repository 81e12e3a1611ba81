"""Shared words under concurrent writers: no slot is ever used by two producers at once, and a
word read while another process writes it is always a value that was written.

Both tests failed on the code before the single-store fix: ``struct.pack_into`` clears its
target before writing, so a slot state read mid-write looked FREE to a claimer in another
process (lost requests), and a heartbeat read mid-write looked like 0.0 (false kills).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from shmmel import layout as L
from shmmel.channel import Producer
from shmmel.inbox import Inbox
from shmmel.errors import RequestTimeout, ServiceUnavailable
from shmmel.shm import Shm

from .conftest import fork  # and the shm fixture

HAMMER_S = 6.0  # seconds of load; the old code failed within ~1 s


def exit_code(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


def echo(shm: Shm, k: int) -> int:
    inbox = Inbox(shm, k, 1)
    while True:
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        if not inbox.wait(0.05):
            continue
        for j in inbox.pending():
            n = int(shm.slots["req_len"][j])
            shm.payload[j, :n] = shm.payload[j, :n][::-1].copy()
            inbox.answer(j, L.R_OK, n)


def test_no_slot_is_ever_used_by_two_producers(shm):
    """Two producer processes (4 threads each) claim, submit and release as fast as they can,
    with no local pool, so every claim scans the shared table while the other process writes
    slot states. Each producer checks that its slot's owner word is still itself, and every
    reply is its own; a stolen slot shows up as a foreign owner, a wrong reply or a timeout."""
    for k in range(2):
        shm.set_worker_word(k, "heartbeat", time.monotonic())
        shm.workers["gen"][k] = 1
        shm.workers["state"][k] = L.W_READY
        fork(shm, lambda k=k: echo(shm, k))

    def producer() -> int:
        mine = Shm.attach(shm.instance)
        prod = Producer(mine, queue_depth=64)
        pid = os.getpid()
        faults: list[str] = []
        done = 0
        stop = time.monotonic() + HAMMER_S

        def run(t: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < stop and not faults:
                i += 1
                payload = f"{pid}:{t}:{i}".encode()
                try:
                    k, gen = prod.pick_worker()
                    with prod.claim() as slot:
                        slot.view(len(payload))[:] = payload
                        slot.submit(k, gen, L.OP_PING, len(payload), prod.next_seq())
                        slot.wait(2.0)
                        owner = int(mine.slots["owner"][slot.index])
                        got = bytes(slot.view(len(payload)))
                        if owner != pid:
                            faults.append(f"slot {slot.index} owned by {owner}, not {pid}")
                        elif got != payload[::-1]:
                            faults.append(f"slot {slot.index}: reply {got!r} for {payload!r}")
                    done += 1
                except ServiceUnavailable:
                    continue
                except RequestTimeout as exc:
                    faults.append(f"lost request: {exc}")

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if faults:
            print(faults[:3], flush=True)
            return 3
        return 0 if done > 500 else 4  # it must have done real work to mean anything

    pids = [fork(shm, producer) for _ in range(2)]
    codes = [exit_code(p, HAMMER_S + 30) for p in pids]
    assert codes == [0, 0], f"producer exit codes {codes} (3: a slot was used twice, 4: idle)"


@pytest.mark.parametrize("word", ["heartbeat", "served", "state"])
def test_a_word_read_while_written_is_always_a_written_value(shm, word):
    """One process writes a worker-row word through the real writer (Shm.set_worker_word)
    in a tight loop, never writing 0; another reads it through the real reader in a tight
    loop and must never see 0 (a value nobody wrote)."""
    k = 1
    first = {"heartbeat": 1000.5, "served": 7, "state": L.W_READY}[word]
    shm.set_worker_word(k, word, first)
    go = time.monotonic() + 3.0

    def writer() -> int:
        mine = Shm.attach(shm.instance)
        v = first
        while time.monotonic() < go:
            for _ in range(1000):
                if word == "state":
                    v = L.W_BACKOFF if v == L.W_READY else L.W_READY
                else:
                    v = v + 1
                mine.set_worker_word(k, word, v)
        return 0

    fork(shm, writer)
    zeros = reads = 0
    while time.monotonic() < go:
        for _ in range(1000):
            if shm.worker_word(k, word) == 0:
                zeros += 1
        reads += 1000
    assert reads > 100_000
    assert zeros == 0, f"{zeros} of {reads} reads saw 0, a value never written"
