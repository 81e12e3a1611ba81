"""/process in parts (the spec's streaming mode): several replies over one slot."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from shmmel import layout as L
from shmmel.channel import Producer, ReplyError, call_parts
from shmmel.inbox import Inbox
from shmmel.config import Config
from shmmel.shm import Shm, instance_names


def ndjson(d, body: dict, headers: dict | None = None) -> tuple[int, dict, list[dict]]:
    status, hdrs, raw = d.request("POST", "/process", json.dumps(body),
                                  {"Content-Type": "application/json", **(headers or {})})
    if not hdrs.get("content-type", "").startswith("application/x-ndjson"):
        return status, hdrs, [json.loads(raw)]
    return status, hdrs, [json.loads(line) for line in raw.splitlines()]


def test_stream_true_gives_the_result_in_parts_then_a_final_line(inproc):
    message = "".join(chr(0x41 + i % 26) for i in range(300)) + "é✓"
    served = lambda: sum(w["served"] for w in inproc.status()["workers"])  # noqa: E731
    before = served()
    status, headers, lines = ndjson(inproc, {"message": message, "stream": True})
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    deltas = [x["delta"] for x in lines[:-1]]
    # parts published faster than the HTTP side wakes arrive merged: never split mid-character
    assert 1 <= len(deltas) <= -(-len(message) // L.TEXT_PART_CHARS)
    assert "".join(deltas) == message[::-1]
    assert lines[-1] == {"result": message[::-1], "final": True}
    assert served() - before == 1  # one request, one slot, several replies


def test_accept_ndjson_streams_and_bad_stream_values_are_400(inproc):
    status, _, lines = ndjson(inproc, {"message": "abc", "op": "upper"},
                              {"Accept": "application/x-ndjson"})
    assert status == 200 and lines == [{"delta": "ABC"}, {"result": "ABC", "final": True}]
    status, _, lines = ndjson(inproc, {"message": "", "stream": True})
    assert status == 200 and lines == [{"result": "", "final": True}]
    status, _, (doc,) = ndjson(inproc, {"message": "abc", "stream": "yes"})
    assert status == 400 and doc["error"] == "Bad Request" and "stream" in doc["detail"]


@pytest.fixture
def shm():
    config = Config(instance=f"t{uuid.uuid4().hex[:10]}", workers=1, slots=8,
                    slot_bytes=16 * 1024)
    shm = Shm.create(config)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()
        assert instance_names(config.instance) == []


def test_parts_reach_the_producer_before_the_reply_is_complete(shm):
    """A worker publishes three parts 0.3 s apart: the producer has the first long before
    the last exists; a bad final status after parts raises ReplyError."""
    shm.workers["gen"][0], shm.workers["state"][0] = 1, L.W_READY
    stop = threading.Event()

    def worker() -> None:
        inbox = Inbox(shm, 0, 1)
        while not stop.is_set():
            shm.set_worker_word(0, "heartbeat", time.monotonic())
            if not inbox.wait(0.05):
                continue
            for j in inbox.pending():
                pos = 0
                for part in (b"one ", b"two ", b"three"):
                    pos = inbox.publish(j, part, pos)
                    shm.set_worker_word(0, "heartbeat", time.monotonic())
                    time.sleep(0.3)
                if int(shm.slots["arg0"][j]) == 1:
                    inbox.fail(j, L.R_BAD_INPUT, "refused at the end")
                else:
                    inbox.answer(j, L.R_OK, pos, r0=pos)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    try:
        prod = Producer(shm, queue_depth=8)
        t0 = time.monotonic()
        got = []
        for chunk in call_parts(prod, L.OP_PING, b"x", args=(0,), timeout=10):
            got.append((chunk, time.monotonic() - t0))
        assert b"".join(c for c, _ in got) == b"one two three"
        assert got[0][1] < 0.25 and got[-1][1] > 0.55
        with pytest.raises(ReplyError, match="refused at the end"):
            list(call_parts(prod, L.OP_PING, b"x", args=(1,), timeout=10))
        part = shm.slots["state"][prod.first : prod.stop]
        assert (part == L.S_PARKED).all()  # both slots released
    finally:
        stop.set()
        th.join(5)
    assert os.getpid()
