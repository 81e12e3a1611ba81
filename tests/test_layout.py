"""Pins the shared-memory layout: a change here must be deliberate (bump layout.VERSION)."""

from __future__ import annotations

from shmmel import layout as L


def offsets(dt):
    return {name: dt.fields[name][1] for name in dt.names}


def test_record_sizes_are_pinned():
    assert L.VERSION == 7
    assert L.HEADER.itemsize == 192
    assert L.WORKER.itemsize == 112
    assert L.METRICS.itemsize == 3072
    assert L.HTTP.itemsize == 24
    assert L.SLOT.itemsize == 144
    assert L.STREAM.itemsize == 64


def test_slot_field_offsets_are_pinned():
    assert offsets(L.SLOT) == {
        "state": 0, "op": 4, "worker": 8, "gen": 12, "seq": 16, "resp_seq": 24, "owner": 32,
        "req_len": 40, "resp_len": 44, "status": 48, "stream": 52, "arg0": 56, "arg1": 64,
        "arg2": 72, "arg3": 80, "r0": 88, "r1": 96, "f0": 104, "f1": 112, "t_submit": 120,
        "t_taken": 128, "t_done": 136,
    }


def test_worker_and_header_offsets_are_pinned():
    assert offsets(L.WORKER) == {
        "pid": 0, "kind": 8, "state": 12, "gen": 16, "device": 20, "restarts": 24,
        "streams": 28, "heartbeat": 32, "started": 40, "served": 48, "errors": 56,
        "batches": 64, "busy_s": 72, "audio_samples": 80, "gpu_bytes": 88, "respawn_at": 96,
        "crashes": 104,
    }
    assert offsets(L.HEADER)["supervisor_pid"] == 32
    assert offsets(L.HEADER)["host"] == 72
    assert offsets(L.STREAM)["token"] == 16


def test_control_segment_regions_are_aligned_and_disjoint():
    lay = L.CtlLayout(n_workers=4, n_slots=128, n_streams=256)
    assert (lay.workers_off, lay.http_off, lay.slots_off, lay.streams_off, lay.metrics_off) == (
        192, 640, 2176, 20608, 36992)
    assert lay.size == 237568 and lay.size % L.PAGE == 0
    for off in (lay.workers_off, lay.http_off, lay.slots_off, lay.streams_off, lay.metrics_off):
        assert off % 64 == 0
    assert lay.workers_off >= L.HEADER.itemsize
    assert lay.http_off >= lay.workers_off + 4 * L.WORKER.itemsize
    assert lay.slots_off >= lay.http_off + L.MAX_HTTP * L.HTTP.itemsize
    assert lay.streams_off >= lay.slots_off + 128 * L.SLOT.itemsize
    assert lay.metrics_off >= lay.streams_off + 256 * L.STREAM.itemsize
    assert lay.size >= lay.metrics_off + L.MAX_HTTP * L.METRICS.itemsize


def test_no_slot_state_is_zero():
    """0 is what a half-written or never-initialised word reads as: it must mean nothing."""
    assert 0 not in (L.S_FREE, L.S_CLAIMED, L.S_PARKED, L.S_DONE)
    assert L.S_SUBMITTED & 0xFF == 0 and L.S_TAKEN & 0xFF == 0 and L.S_SUBMITTED > 0


def test_names_carry_the_instance_and_never_collide():
    assert L.ctl_name("a") == "/shmmel.a.ctl"
    assert L.data_name("a") == "/shmmel.a.data"
    assert L.doorbell_name("a", 3) == "/shmmel.a.w3"
    assert L.reply_name("a", 17) == "/shmmel.a.s17"
    # "a" is not a prefix of "a-b"'s names: the separator cannot occur in an instance name
    assert not L.ctl_name("a-b").startswith("/" + L.prefix("a"))


def test_partitions_cover_every_thread_and_never_overlap():
    for http_workers, threads in ((1, 1), (2, 16), (8, 16), (60, 64)):
        parts = L.partitions_for(http_workers)
        assert http_workers < parts <= L.MAX_HTTP
        n = L.slots_for(128, http_workers, threads)
        ranges = [L.partition_range(r, n, parts) for r in range(parts)]
        assert all(len(r) >= 2 * threads + L.SLOTS_OVER_THREADS for r in ranges)
        seen = [j for r in ranges for j in r]
        assert len(seen) == len(set(seen)) and max(seen) < n
