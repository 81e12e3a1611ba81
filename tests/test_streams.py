"""The stream table without a cross-process lock (issue 12): partitions per producer row,
tokens that carry an entry's use count, the worker as the one arbiter of a stream's requests.

In-process and forked processes over a real instance's segments (the ``shm`` fixture); the
HTTP behaviour (404, 409, 503, expiry) is tested end to end in test_audio_http.py and
test_hardening.py.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from shmmel import layout as L
from shmmel import wire
from shmmel.audio_calls import AudioCalls, check_reply
from shmmel.audio_worker import MelJobs
from shmmel.channel import Producer, claim_row
from shmmel.config import Config
from shmmel.errors import (BadRequest, RequestTimeout, ServiceUnavailable, StreamBusy,
                           StreamLost, UnknownStream, WorkerDied, WorkerStalled)
from shmmel.inbox import Inbox
from shmmel.mel import FrameBatch, create_engine
from shmmel.shm import Shm
from shmmel.stream_table import StreamTable

from .conftest import fork, instance_segments
from .test_shared_words import exit_code

HAMMER_S = 3.0


@pytest.fixture
def small():
    """An instance whose stream table has 3 entries per partition and max_streams 6."""
    with instance_segments(workers=2, slots=32, slot_bytes=16 * 1024, max_streams=6,
                           http_workers=8) as shm:
        for k in range(2):
            shm.workers["gen"][k] = 1
            shm.workers["state"][k] = L.W_READY
        yield shm, shm.children


def on_worker(k: int, gen: int = 1):
    return lambda t: (k, gen)


def test_partitions_cover_the_table_and_never_overlap():
    for max_streams, http in ((1, 1), (6, 8), (1000, 8), (1024, 2), (65536, 64)):
        n = L.stream_entries(max_streams, http)
        parts = L.partitions_for(http)
        ranges = [L.stream_partition(r, n, parts) for r in range(parts)]
        seen = [i for r in ranges for i in r]
        assert len(seen) == len(set(seen)) == n
        # a process may hold STREAM_SHARE x its fair share, never less than max_streams / http
        assert len(ranges[0]) == min(max_streams, -(-L.STREAM_SHARE * max_streams // http))
        assert len(ranges[0]) * http >= max_streams


def test_tokens_never_repeat_on_a_reused_entry():
    tok, seen = 0, set()
    for _ in range(5000):
        tok = L.stream_token(tok, 12345)  # the same random bits every time: the count differs
        assert 0 < tok < 1 << 63 and tok not in seen
        seen.add(tok)
    top = ((1 << 23) - 1) << L.TOKEN_RANDOM_BITS
    assert L.stream_token(top, 0) >> L.TOKEN_RANDOM_BITS == 1  # wraps, never to 0


def test_no_entry_is_ever_taken_by_two_processes(small):
    """Three producer processes open and free streams as fast as they can, with the global
    limit (6) below what their partitions hold (3 each, 9 in all), so opens race at the
    limit all the time. Each checks, while it holds a stream, that the entry's token and busy
    words are still its own, that the entry lies in its partition, and that no more than
    max_streams streams are open. A shared partition or a check-then-act limit fails it."""
    shm, children = small

    def producer() -> int:
        mine = Shm.attach(shm.instance)
        row = claim_row(mine)
        table = StreamTable(mine, row)
        part = L.stream_partition(row, len(table), mine.partitions)
        pid, t = os.getpid(), mine.streams
        held: list = []
        opened = refused = 0
        stop = time.monotonic() + HAMMER_S
        while time.monotonic() < stop:
            try:
                h = table.allocate(80, 0, on_worker(opened % 2), pid)
                opened += 1
                held.append(h)
                if h.index not in part:
                    print(f"entry {h.index} outside partition {part}", flush=True)
                    return 3
                if table.open_count() > table.limit:
                    print(f"{table.open_count()} open > max {table.limit}", flush=True)
                    return 5
            except ServiceUnavailable:
                refused += 1
            for h in held:
                if int(t["token"][h.index]) != h.token or int(t["busy"][h.index]) != pid:
                    print(f"entry {h.index} taken by another process", flush=True)
                    return 3
            if len(held) >= 3 or (held and (opened + refused) % 2 == 0):
                h = held.pop(0)
                table.free(h.index)
        print(f"opened {opened}, refused {refused}", flush=True)
        return 0 if opened > 200 and refused > 0 else 4

    pids = [fork(shm, producer) for _ in range(3)]
    codes = [exit_code(p, HAMMER_S + 30) for p in pids]
    assert codes == [0, 0, 0], (f"exit codes {codes} (3: an entry used twice, 5: past "
                                "max_streams, 4: no real work or the limit never reached)")


def test_a_stale_id_never_reads_as_the_stream_that_reuses_its_entry(small):
    """A child process frees and reopens the last entry of its partition in a tight loop
    (the other two stay open), each stream's n_mels set to its token's use count; this
    process looks the current id and the first one up all the while. A lookup that succeeds
    returns the fields of the id's own stream, and the first id never succeeds once its
    entry was reused."""
    shm, children = small
    row = claim_row(shm)
    table = StreamTable(shm, row)
    i = L.stream_partition(row + 1, len(table), shm.partitions).start + 2  # the child's

    def churn() -> int:
        mine = Shm.attach(shm.instance)
        t = StreamTable(mine, claim_row(mine))
        assert t.part.start + 2 == i
        keep = [t.allocate(80, 0, on_worker(0), os.getpid()) for _ in range(2)]
        assert i not in {h.index for h in keep}
        end = time.monotonic() + HAMMER_S
        h = None
        while time.monotonic() < end:
            if h is not None:
                t.free(h.index)
            uses = L.stream_token(int(mine.streams["token"][i]), 0) >> L.TOKEN_RANDOM_BITS
            h = t.allocate(uses, 0, on_worker(0), os.getpid())
            if h.index != i:
                return 3
        return 0

    fork(shm, churn)
    st = shm.streams
    deadline = time.monotonic() + 5
    while int(st["state"][i]) != L.ST_OPEN and time.monotonic() < deadline:
        time.sleep(0.001)
    first_token = int(st["token"][i])
    first = f"{i}-{first_token:016x}"
    ok = mismatched = reused = old_found = 0
    end = time.monotonic() + HAMMER_S - 0.5
    while time.monotonic() < end:
        cur = int(st["token"][i])
        try:
            h = table.find(f"{i}-{cur:016x}", 60)
            ok += 1
            if h.n_mels != h.token >> L.TOKEN_RANDOM_BITS:
                mismatched += 1
        except UnknownStream:
            pass
        if cur != first_token:
            reused += 1
            try:
                table.find(first, 60)
                old_found += 1
            except UnknownStream:
                pass
    assert mismatched == 0, f"{mismatched} of {ok} lookups returned another stream's fields"
    print(f"lookups {ok}, after reuse {reused}")
    assert ok > 50 and reused > 50, (ok, reused)
    assert old_found == 0, "a freed and reused entry was found under its old id"


def test_limit_partition_and_errors_in_one_process(small):
    shm, _ = small
    row = claim_row(shm)
    table = StreamTable(shm, row)
    pid = os.getpid()
    got = [table.allocate(80, 0, on_worker(0), pid) for _ in range(3)]
    assert {h.index for h in got} <= set(table.part)
    with pytest.raises(ServiceUnavailable, match="this HTTP process holds its maximum of 3"):
        table.allocate(80, 0, on_worker(0), pid)
    # another process's row reaches the global limit (6) and a fast 503
    other = StreamTable(shm, claim_row_for(shm, row + 1))
    more = [other.allocate(80, 0, on_worker(1), pid) for _ in range(3)]
    third = StreamTable(shm, claim_row_for(shm, row + 2))
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"too many open streams \(max 6\)"):
        third.allocate(80, 0, on_worker(1), pid)
    assert time.monotonic() - t0 < 0.05
    assert table.open_count() == 6 and table.in_use() == 6
    # the refused open left nothing reserved
    assert int((shm.streams["state"] == L.ST_RESERVED).sum()) == 0
    # lookups: a good id, a wrong token, a worker that restarted
    h = got[0]
    found = third.find(h.stream_id, 60)
    assert (found.index, found.worker, found.gen, found.held) == (h.index, 0, 1, False)
    with pytest.raises(UnknownStream):
        third.find(f"{h.index}-{h.token ^ 1:016x}", 60)
    shm.workers["gen"][0] = 2  # worker 0 replaced: its streams are lost, and not counted
    with pytest.raises(StreamLost):
        third.find(h.stream_id, 60)
    assert table.open_count() == 3
    # the owner reuses its own stale entries (the supervisor leaves a live partition alone)
    again = [table.allocate(80, 0, on_worker(1), pid) for _ in range(3)]
    assert {a.index for a in again} == {g.index for g in got}
    with pytest.raises(UnknownStream):
        third.find(h.stream_id, 60)
    assert all(third.find(a.stream_id, 60).worker == 1 for a in again + more)


def claim_row_for(shm: Shm, row: int) -> int:
    """Row ``row`` of the HTTP table as a live process's (this one's): a second producer
    row in one test process."""
    shm.http["pid"][row] = os.getpid()
    return row


def test_the_supervisor_frees_a_dead_producers_reserved_and_stale_entries(small):
    shm, children = small

    def dies_mid_open() -> int:
        mine = Shm.attach(shm.instance)
        t = StreamTable(mine, claim_row(mine))
        t.allocate(80, 0, on_worker(0), os.getpid())   # a live stream: stays
        t.allocate(80, 0, on_worker(1), os.getpid())   # its worker dies below: freed
        with t._lock:
            t._take()                                   # killed between reserve and publish
        time.sleep(60)
        return 0

    pid = fork(shm, dies_mid_open)
    st = shm.streams["state"]
    deadline = time.monotonic() + 10
    # each allocate passes through RESERVED before it publishes OPEN: wait for the end state
    while (int((st == L.ST_OPEN).sum()) < 2 or int((st == L.ST_RESERVED).sum()) == 0) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int((st == L.ST_OPEN).sum()) == 2 and int((st == L.ST_RESERVED).sum()) == 1
    table = StreamTable(shm)
    assert table.sweep() == 0  # its process is alive: nothing of its partition is touched
    shm.workers["gen"][1] = 2
    assert table.sweep() == 0
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    children.remove(pid)
    assert table.sweep() == 2  # the reservation and the dead worker's stream
    assert int((st == L.ST_OPEN).sum()) == 1 and int((st == L.ST_RESERVED).sum()) == 0
    assert table.open_count() == 1  # the live stream on worker 0 stays for its worker


# -- the worker: tokens and one request at a time -----------------------------------------
class Jobs:
    """MelJobs of worker 0 with the NumPy engine, fed slots by hand."""

    def __init__(self, shm: Shm) -> None:
        self.shm = shm
        self.jobs = MelJobs(Config(request_timeout=30), shm, 0, 1, create_engine("cpu"))
        self.inbox = Inbox(shm, 0, 1)
        self.next = 0

    def serve(self, *requests: tuple[int, ...], audio: bytes = b"",
              slot: int | None = None) -> list[int]:
        taken = []
        for req in requests:
            j = self.next if slot is None else slot
            self.next = (self.next + 1) % 8
            n = len(audio) if req[0] in (L.OP_AUDIO_PUSH, L.OP_AUDIO_ONESHOT) else 0
            self.shm.payload[j, :n] = np.frombuffer(audio, np.uint8)
            taken.append((j, (req[0], n, *req[1:])))
        self.jobs.serve(taken, self.inbox)
        return [int(self.shm.slots["status"][j]) for j, _ in taken]


def push(k: int, token: int, lease: int, last: bool = True, final: bool = False):
    flags = (L.PUSH_LAST_PIECE if last else 0) | (L.PUSH_FINAL if final else 0)
    return (L.OP_AUDIO_PUSH, k, L.FMT_S16LE, flags, token, lease)


def test_the_worker_serves_one_request_of_a_stream_at_a_time(small):
    shm, children = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    h = table.allocate(80, 0, on_worker(0), os.getpid())
    audio = np.zeros(1600, "<i2").tobytes()
    assert w.serve((L.OP_AUDIO_OPEN, h.index, 80, 0, h.token, 0)) == [L.R_OK]
    me = os.getpid() << 32
    a, b = me | 1, me | 2
    # request a sends the first of two pieces: b is refused until a's last piece
    assert w.serve(push(h.index, h.token, a, last=False), audio=audio) == [L.R_OK]
    assert w.serve(push(h.index, h.token, b), audio=audio) == [L.R_BUSY]
    assert w.serve(push(h.index, h.token, a), audio=audio) == [L.R_OK]
    assert w.serve(push(h.index, h.token, b), audio=audio) == [L.R_OK]
    # two requests of one stream in one wake-up: the second is refused, the stream fed once
    before = table.counts(h.index)[1]
    assert w.serve(push(h.index, h.token, me | 3), push(h.index, h.token, me | 4),
                   audio=audio) == [L.R_OK, L.R_BUSY]
    assert table.counts(h.index)[1] == before + 1600
    # a holder that died gives the stream up at once
    dead = fork(shm, lambda: 0)
    exit_code(dead, 10)
    assert w.serve(push(h.index, h.token, dead << 32 | 1, last=False), audio=audio) == [L.R_OK]
    assert w.serve(push(h.index, h.token, me | 5), audio=audio) == [L.R_OK]
    # a wrong token is no stream (404), and changes nothing
    before = table.counts(h.index)
    assert w.serve(push(h.index, h.token ^ 1, me | 6), audio=audio) == [L.R_NO_STREAM]
    assert table.counts(h.index) == before
    # the last push frees the entry
    assert w.serve(push(h.index, h.token, me | 7, final=True), audio=audio) == [L.R_OK]
    assert int(shm.streams["state"][h.index]) == L.ST_FREE and not w.jobs.leases


def test_a_request_for_a_reused_entry_never_reaches_the_new_stream(small):
    """The entry of a finished stream is reused for a new one on the same worker; a push
    carrying the old id's token (a lookup that raced the reuse) is refused, 404."""
    shm, _ = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    audio = np.zeros(1600, "<i2").tobytes()
    old = table.allocate(80, 0, on_worker(0), os.getpid())
    w.serve((L.OP_AUDIO_OPEN, old.index, 80, 0, old.token, 0))
    assert w.serve(push(old.index, old.token, 1, final=True), audio=audio) == [L.R_OK]
    new = None
    for _ in range(3):  # the partition's other entries come first
        h = table.allocate(80, 0, on_worker(0), os.getpid())
        if h.index == old.index:
            new = h
    assert new is not None and new.token != old.token
    w.serve((L.OP_AUDIO_OPEN, new.index, 80, 0, new.token, 0))
    assert w.serve(push(old.index, old.token, 2), audio=audio) == [L.R_NO_STREAM]
    assert table.counts(new.index) == (0, 0)
    assert w.serve(push(new.index, new.token, 3), audio=audio) == [L.R_OK]


@pytest.mark.parametrize("status, error", [(L.R_BUSY, StreamBusy),
                                           (L.R_NO_STREAM, UnknownStream)])
def test_worker_refusals_become_409_and_404(shm, status, error):
    prod = Producer(shm, queue_depth=4)
    with prod.claim() as slot:
        slot.view(4)[:] = b"busy"
        shm.slots["resp_len"][slot.index] = 4
        with pytest.raises(error, match="busy"):
            check_reply(slot, status)
        assert error(  # the status each maps to
            "x").http_status == {StreamBusy: 409, UnknownStream: 404}[error]


def open_push(k: int, token: int, lease: int, n_mels: int = 80, fmt: int = L.FMT_S16LE,
              last: bool = True, final: bool = False):
    flags = (L.PUSH_OPEN | n_mels << L.PUSH_MELS_SHIFT | (L.PUSH_LAST_PIECE if last else 0)
             | (L.PUSH_FINAL if final else 0))
    return (L.OP_AUDIO_PUSH, k, fmt, flags, token, lease)


def test_a_push_that_opens_its_stream(small):
    """PUSH_OPEN: the worker makes the stream's state and takes its first samples in one
    request. A refused opening push leaves no state and the entry as it was (the HTTP side
    frees it, as after a refused OPEN); a state the entry's last stream left is replaced."""
    shm, _ = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    x = (3000 * np.sin(np.arange(16000) * 0.01)).astype("<i2")
    h = table.allocate(80, 0, on_worker(0), os.getpid())
    assert w.serve(open_push(h.index, h.token, 1), audio=x[:8000].tobytes()) == [L.R_OK]
    assert w.jobs.states[h.index][0] == h.token and int(shm.workers["streams"][0]) == 1
    assert table.counts(h.index) == (int(shm.slots["r1"][0]), 8000)
    # the next push of the stream (no OPEN), ending it: the entry is freed
    assert w.serve(push(h.index, h.token, 2, final=True), audio=x[8000:].tobytes()) == [L.R_OK]
    assert table.counts(h.index)[1] == 16000
    assert int(shm.streams["state"][h.index]) == L.ST_FREE and not w.jobs.states
    # refused: a bad n_mels, then NaN float audio (after the state was made)
    h = table.allocate(80, 0, on_worker(0), os.getpid())
    assert w.serve(open_push(h.index, h.token, 3, n_mels=81), audio=x[:160].tobytes()) == [
        L.R_BAD_INPUT]
    nan = np.array([0.1, np.nan] * 80, "<f4").tobytes()
    assert w.serve(open_push(h.index, h.token, 4, fmt=L.FMT_F32LE), audio=nan) == [
        L.R_BAD_INPUT]
    assert not w.jobs.states and not w.jobs.leases and int(shm.workers["streams"][0]) == 0
    assert int(shm.streams["state"][h.index]) == L.ST_OPEN  # the HTTP side's to free
    # an entry whose last stream's state (and a request's lease) the worker still holds:
    # the opening push of the new token replaces both, and the old token is no stream
    me = os.getpid() << 32
    assert w.serve(open_push(h.index, 111, me | 5, last=False), audio=x[:160].tobytes()) == [
        L.R_OK]
    assert w.serve(open_push(h.index, h.token, me | 6), audio=x[:160].tobytes()) == [L.R_OK]
    assert w.jobs.states[h.index][0] == h.token and not w.jobs.leases
    assert w.serve(push(h.index, 111, me | 7), audio=x[:160].tobytes()) == [L.R_NO_STREAM]
    assert w.serve(push(h.index, h.token, me | 8, final=True), audio=x[:160].tobytes()) == [
        L.R_OK]
    assert int(shm.streams["state"][h.index]) == L.ST_FREE and not w.jobs.states


def test_frames_the_worker_normalises_are_the_bits_the_http_side_would_make(small):
    """PUSH_PROVISIONAL and ONESHOT_PROVISIONAL: the worker normalises the reply's frames in
    the slot with the push's running max (a running max that grows between two pushes), and
    the record the HTTP side sends of them is byte for byte the one it makes of raw frames."""
    shm, _ = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    ramp = np.linspace(0.01, 1.0, 8000)  # louder later: the second push raises the max
    x = (20000 * np.sin(np.arange(8000) * 0.01) * ramp).astype("<i2")
    me = os.getpid() << 32

    def reply(status: list[int]) -> tuple[int, int, float, np.ndarray]:
        assert status == [L.R_OK]
        r0, r1, f0 = (int(shm.slots["r0"][0]), int(shm.slots["r1"][0]),
                      float(shm.slots["f0"][0]))
        return r0, r1, f0, shm.payload[0, : r1 * 320].view("<f4").reshape(r1, 80).copy()

    got: dict[bool, list] = {}
    for norm in (False, True):
        h = table.allocate(80, 0, on_worker(0), os.getpid())
        extra = L.PUSH_PROVISIONAL if norm else 0
        first = open_push(h.index, h.token, me | 1)
        first = (*first[:3], first[3] | extra, *first[4:])
        second = push(h.index, h.token, me | 2, final=True)
        second = (*second[:3], second[3] | extra, *second[4:])
        got[norm] = [reply(w.serve(first, audio=x[:3500].tobytes(), slot=0)),
                     reply(w.serve(second, audio=x[3500:].tobytes(), slot=0))]
        oneshot = (L.OP_AUDIO_ONESHOT, -1, L.FMT_S16LE, 80, 0,
                   L.ONESHOT_PROVISIONAL if norm else 0)
        got[norm].append(reply(w.serve(oneshot, audio=x.tobytes(), slot=0)))
    assert got[False][0][2] < got[False][1][2]  # the running max grew
    for (r0, r1, f0, raw), (n0, n1, nf0, frames) in zip(got[False], got[True]):
        assert (r0, r1, f0) == (n0, n1, nf0) and r1 > 0
        assert not np.array_equal(raw, frames)  # normalised, not raw
        for final in (False, True):
            assert wire.batch_record(3, FrameBatch(r0, raw, f0, final)) == \
                wire.batch_record(3, FrameBatch(r0, frames, f0, final, True))
            np.testing.assert_array_equal(FrameBatch(r0, raw, f0, final).provisional(), frames)


def upload_push(token: int, opens: bool = False, final: bool = False, n_mels: int = 80,
                fmt: int = L.FMT_S16LE):
    flags = (L.PUSH_SLOT | L.PUSH_LAST_PIECE | (L.PUSH_FINAL if final else 0)
             | ((L.PUSH_OPEN | n_mels << L.PUSH_MELS_SHIFT) if opens else 0))
    return (L.OP_AUDIO_PUSH, -1, fmt, flags, token, 0)


def test_an_uploads_stream_is_kept_under_its_slot_not_in_the_table(small):
    """PUSH_SLOT: an upload's stream lives in its worker under the upload's slot. Its frames
    are bit for bit a table stream's; the table is never touched; a token that is not the
    slot's upload's is no stream; the slot's next upload replaces a state left behind; a
    close, a refusal or the final push drops it, idle expiry one nobody finishes."""
    shm, _ = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    x = (3000 * np.sin(np.arange(24000) * 0.013) * np.linspace(0.1, 1, 24000)).astype("<i2")
    pieces = [x[:8000], x[8000:16000], x[16000:]]

    def frames(j: int) -> np.ndarray:
        k = int(shm.slots["r1"][j])
        return shm.payload[j].view(np.float32)[: k * 80].reshape(k, 80).copy()

    h = table.allocate(80, 0, on_worker(0), os.getpid())  # the same audio as a table stream
    assert w.serve((L.OP_AUDIO_OPEN, h.index, 80, 0, h.token, 0)) == [L.R_OK]
    want = []
    for i, p in enumerate(pieces):
        assert w.serve(push(h.index, h.token, 1, final=i == 2), audio=p.tobytes(),
                       slot=0) == [L.R_OK]
        want.append(frames(0))
    assert int(shm.streams["state"][h.index]) == L.ST_FREE and not w.jobs.states
    before = shm.streams.copy()
    got = []
    for i, p in enumerate(pieces):
        assert w.serve(upload_push(7, opens=i == 0, final=i == 2), audio=p.tobytes(),
                       slot=5) == [L.R_OK]
        got.append(frames(5))
        assert (5 in w.jobs.uploads) == (i < 2)
    assert all(np.array_equal(a, b) for a, b in zip(want, got)) and len(got) == 3
    assert np.array_equal(shm.streams, before) and not w.jobs.states
    assert int(shm.workers["streams"][0]) == 0
    # another token on the slot is no stream; an open replaces what an upload left there
    piece = x[:1600].tobytes()
    assert w.serve(upload_push(8, opens=True), audio=piece, slot=5) == [L.R_OK]
    assert w.serve(upload_push(9), audio=piece, slot=5) == [L.R_NO_STREAM]
    assert w.serve(upload_push(8), audio=piece, slot=6) == [L.R_NO_STREAM]
    assert w.serve(upload_push(9, opens=True), audio=piece, slot=5) == [L.R_OK]
    assert w.jobs.uploads[5][0] == 9
    assert w.serve((L.OP_AUDIO_CLOSE, -1, 0, L.PUSH_SLOT, 9, 0), slot=5) == [L.R_OK]
    assert 5 not in w.jobs.uploads
    # refused: a bad n_mels opening, then NaN float audio mid-upload: no state stays
    assert w.serve(upload_push(10, opens=True, n_mels=81), audio=piece, slot=5) == [
        L.R_BAD_INPUT]
    assert w.serve(upload_push(11, opens=True), audio=piece, slot=5) == [L.R_OK]
    nan = np.array([0.1, np.nan] * 80, "<f4").tobytes()
    assert w.serve(upload_push(11, fmt=L.FMT_F32LE), audio=nan, slot=5) == [L.R_BAD_INPUT]
    assert not w.jobs.uploads
    # one left behind (its HTTP process died): idle expiry drops it
    assert w.serve(upload_push(12, opens=True), audio=piece, slot=4) == [L.R_OK]
    w.jobs.expire(time.monotonic() + w.jobs.config.stream_idle_timeout / 2)
    assert 4 in w.jobs.uploads
    w.jobs._next_expiry = 0.0
    w.jobs.expire(time.monotonic() + w.jobs.config.stream_idle_timeout + 1)
    assert not w.jobs.uploads


def test_an_upload_never_touches_the_stream_table(small, monkeypatch):
    """A multi-push upload (larger than a slot) goes through AudioCalls.upload_stream: no
    placement over the table, no entry (StreamTable.allocate fails the test if called);
    its pushes carry PUSH_SLOT, the first one PUSH_OPEN, the last PUSH_FINAL."""
    shm, _ = small

    def no_table(*_a, **_k):
        raise AssertionError("an upload allocated a stream-table entry")

    monkeypatch.setattr(StreamTable, "allocate", no_table)
    shm.workers["kind"][0] = shm.workers["kind"][1] = L.K_CPU
    calls = AudioCalls(Config(), Producer(shm, queue_depth=4))
    h = calls.upload_stream(80, padding=0)
    assert h.slot_keyed and not h.opened and h.index == -1
    with pytest.raises(BadRequest):
        calls.upload_stream(81, padding=0)
    sent = []

    def fake_call(slot, h2, op, nbytes, args, lease=0):
        sent.append((op, args[1]))
        shm.slots["r1"][slot.index] = 0
        return type("R", (), {"r0": 0, "r1": 0, "f0": -1.0})()

    monkeypatch.setattr(calls, "call", fake_call)
    with calls.producer.claim() as slot:
        step = calls.push_samples(L.FMT_S16LE, 80) * 2
        calls.push(slot, h, bytes(2 * step + 10), L.FMT_S16LE, final=True)
    assert [op for op, _ in sent] == [L.OP_AUDIO_PUSH] * 3 and h.opened
    flags = [f for _, f in sent]
    assert all(f & L.PUSH_SLOT for f in flags)
    assert [bool(f & L.PUSH_OPEN) for f in flags] == [True, False, False]
    assert [bool(f & L.PUSH_FINAL) for f in flags] == [False, False, True]
    assert flags[0] >> L.PUSH_MELS_SHIFT == 80


@pytest.mark.parametrize("exc, freed", [
    (BadRequest("refused"), True), (StreamBusy("refused"), True),
    (UnknownStream("refused"), True), (RuntimeError("worker error"), True),
    (WorkerDied("died"), True), (WorkerStalled("stalled"), False),
    (RequestTimeout("timed out"), False)])
def test_a_failed_open_or_opening_push_frees_its_entry_unless_the_state_may_come(
        small, exc, freed):
    """A refusal (the worker holds no state) or a dead worker: the entry is FREE at once.
    A stalled or timed-out worker may still make the state: the entry stays OPEN, not busy,
    for the worker's idle expiry (or its replacement) to free."""
    shm, _ = small
    calls = AudioCalls(Config(), Producer(shm, queue_depth=4))
    h = calls.allocate(0, 1, 80, 0)
    assert int(shm.streams["busy"][h.index]) == os.getpid()
    calls.drop_entry(h, exc)
    state = int(shm.streams["state"][h.index])
    assert state == (L.ST_FREE if freed else L.ST_OPEN)
    assert freed or int(shm.streams["busy"][h.index]) == 0


def test_an_old_holder_never_frees_the_stream_that_reuses_its_entry(small):
    """The HTTP side freed an entry whose open timed out (the worker may still make the
    state); the entry is reused; the worker then drops its late state (idle expiry, close):
    the new stream's entry must stay open. A free without the token check frees it."""
    shm, _ = small
    table = StreamTable(shm, claim_row(shm))
    w = Jobs(shm)
    old = table.allocate(80, 0, on_worker(0), os.getpid())
    assert w.serve((L.OP_AUDIO_OPEN, old.index, 80, 0, old.token, 0)) == [L.R_OK]
    table.free(old.index, old.token)  # as AudioCalls.drop_entry after a refusal
    opened = [table.allocate(80, 0, on_worker(1), os.getpid()) for _ in range(3)]
    new = next(h for h in opened if h.index == old.index)  # the partition's 3 entries
    assert new.token != old.token
    w.jobs._drop(old.index)  # the old state goes (its idle expiry, a close, a shutdown)
    assert int(shm.streams["state"][new.index]) == L.ST_OPEN
    assert table.find(new.stream_id, 60).index == new.index
    table.free(new.index, old.token)  # a stale free by token: a no-op
    assert int(shm.streams["state"][new.index]) == L.ST_OPEN
    table.free(new.index, new.token)
    assert int(shm.streams["state"][new.index]) == L.ST_FREE


def test_streams_go_to_cuda_workers_and_fall_back_at_once_when_none_is_ready(small):
    """Audio goes to the CUDA workers while one is ready (the kinds are looked at once per
    audio_calls.KINDS_TTL); when none is ready any more, the next stream goes to another
    mel worker at once, not after the kinds' time to live (nor a 503)."""
    shm, _ = small
    shm.workers["kind"][0], shm.workers["kind"][1] = L.K_CPU, L.K_CUDA
    calls = AudioCalls(Config(), Producer(shm, queue_depth=4))
    opened = [calls._allocate(80, 0) for _ in range(2)]
    assert [h.worker for h in opened] == [1, 1]  # the CUDA worker, though it holds more
    shm.workers["state"][1] = L.W_DEAD
    fallback = calls._allocate(80, 0)
    assert fallback.worker == 0 and calls._kinds() == tuple(L.MEL_KINDS)
    for h in [*opened, fallback]:
        calls.table.free(h.index, h.token)


def test_a_oneshot_whose_last_cuda_worker_dies_is_retried_on_a_cpu_worker(small):
    """A one-shot's retry after its worker died picks the kinds again: when that was the
    only CUDA worker, the retry goes to a ready CPU worker, not a 503 (nor 'worker died')."""
    shm, _ = small
    shm.workers["kind"][0], shm.workers["kind"][1] = L.K_CPU, L.K_CUDA
    shm.workers["heartbeat"][0] = shm.workers["heartbeat"][1] = time.monotonic() + 60
    calls = AudioCalls(Config(), Producer(shm, queue_depth=4, reply_spin=0.0))
    stop, seen = threading.Event(), {0: [], 1: []}

    def fake_worker(k: int) -> None:
        """Worker 0 (CPU) answers every one-shot; worker 1 (CUDA) dies on its first."""
        inbox = Inbox(shm, k, 1)
        while not stop.is_set():
            for j in inbox.pending():
                seen[k].append(j)
                if k == 1:
                    shm.workers["state"][1] = L.W_DEAD
                else:
                    inbox.answer(j, L.R_OK, 0, r0=0, r1=0, f0=-1.0)
            time.sleep(0.001)

    threads = [threading.Thread(target=fake_worker, args=(k,), daemon=True) for k in (0, 1)]
    for t in threads:
        t.start()
    slot = calls.producer.claim()
    try:
        assert calls._kinds() == (L.K_CUDA,)
        batch = calls.oneshot(slot, np.zeros(1600, "<i2").tobytes(), L.FMT_S16LE, 80, 0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        slot.release()
    assert len(seen[1]) == 1 and len(seen[0]) == 1  # tried on CUDA, served on the CPU worker
    assert batch.log10.shape == (0, 80) and calls._kinds() == tuple(L.MEL_KINDS)
