"""Several devices, in-process: the placement policy, the device settings, the device each
worker takes, and the per-device figures of status and /metrics."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from shmmel import layout as L
from shmmel.config import Config, resolve
from shmmel.devices import (
    device_for,
    device_rows,
    parse_devices,
    pinned_streams,
    probe_device_count,
    settle_workers,
)
from shmmel.devices import create_worker_engine
from shmmel.errors import BootError, ConfigError
from shmmel.placement import Candidate, device_loads, place_request, place_stream


def C(worker: int, device: int, streams: int = 0, queued: int = 0) -> Candidate:
    return Candidate(worker, 7, device, streams, queued)


# -- streams -----------------------------------------------------------------------------

def test_streams_go_to_the_least_loaded_device_then_the_emptiest_worker():
    cands = [C(0, 0, streams=3), C(1, 1, streams=1), C(2, 0, streams=0), C(3, 1, streams=1)]
    # device 0 holds 3 streams, device 1 holds 2: device 1, the worker with fewer streams
    assert place_stream(cands, 64).worker == 1
    # device 0's idle worker does not win over the lighter device
    assert place_stream(cands, 64).device == 1


def test_queued_work_breaks_ties_between_devices_with_as_many_streams():
    cands = [C(0, 0, streams=2, queued=4), C(1, 1, streams=1, queued=0),
             C(2, 1, streams=1, queued=1)]
    assert place_stream(cands, 64).device == 1  # 2 streams each: device 1 has 1 queued
    assert device_loads(cands)[1] == (1, 2, 1, 2)
    cands[0] = C(0, 0, streams=1, queued=4)
    assert place_stream(cands, 64).device == 0  # fewer streams first, whatever the queue


def test_a_sequence_of_opens_alternates_devices_even_with_uneven_workers():
    # device 0 has 3 ready workers, device 1 only 1 (the others down): streams still split
    # evenly over the two GPUs, not 3:1 as a per-worker rule would
    held = collections.Counter()
    devices = {0: 0, 1: 0, 2: 0, 3: 1}
    for _ in range(40):
        c = place_stream([C(k, d, streams=held[k]) for k, d in devices.items()], 64)
        held[c.worker] += 1
    per_device = collections.Counter()
    for k, n in held.items():
        per_device[devices[k]] += n
    assert per_device == {0: 20, 1: 20}
    assert sorted(held[k] for k in (0, 1, 2)) == [6, 7, 7]


def test_a_device_without_candidates_is_never_chosen():
    # only ready workers are candidates: device 1's workers are all down, so none is listed
    cands = [C(0, 0, streams=100), C(2, 0, streams=100)]
    assert place_stream(cands, 1000).device == 0
    assert place_request(cands, 1000, turn=1).device == 0


def test_full_queues_are_skipped_and_none_when_all_are_full():
    cands = [C(0, 0, queued=4), C(1, 1, queued=4, streams=9)]
    assert place_stream(cands, 4) is None
    assert place_request(cands, 4, 0) is None
    cands[1] = C(1, 1, queued=3, streams=9)
    assert place_stream(cands, 4).worker == 1
    assert place_request(cands, 4, 0).worker == 1
    assert place_stream([], 4) is None


def test_one_device_keeps_the_old_rule():
    cands = [C(0, -1, streams=2, queued=0), C(1, -1, streams=1, queued=3),
             C(2, -1, streams=1, queued=1)]
    assert place_stream(cands, 64).worker == 2  # fewest streams, then shortest queue


# -- one-shot requests ----------------------------------------------------------------------

def test_requests_round_robin_over_devices_and_their_workers_when_idle():
    cands = [C(0, 0), C(1, 1), C(2, 0), C(3, 1)]
    picks = [place_request(cands, 64, turn) for turn in range(8)]
    assert [p.device for p in picks] == [0, 1] * 4
    assert collections.Counter(p.worker for p in picks) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_requests_go_to_the_device_with_the_shorter_queue():
    cands = [C(0, 0, queued=3), C(1, 1, queued=1), C(2, 0, queued=0), C(3, 1, queued=1)]
    # device 0 has 3 queued, device 1 has 2: device 1 whatever the turn
    assert {place_request(cands, 64, t).device for t in range(6)} == {1}


# -- settings, device per worker ---------------------------------------------------------

def test_devices_setting_from_flag_env_and_toml_list(tmp_path):
    assert resolve({"devices": "0, 1"}, environ={}).device_list == (0, 1)
    assert resolve({}, environ={"SHMMEL_DEVICES": "1,0"}).device_list == (1, 0)
    assert resolve({}, environ={}).device_list is None  # "all"
    f = tmp_path / "c.toml"
    f.write_text("[shmmel]\ndevices = [2, 0]\nworkers_per_device = 3\n")
    c = resolve({}, f, environ={})
    assert (c.devices, c.device_list, c.workers_per_device) == ("2,0", (2, 0), 3)


@pytest.mark.parametrize("bad, why", [
    ("x", "ordinals separated by commas"), ("0,0", "listed twice"), ("64", "0..63"),
    ("", "ordinals separated by commas"),
])
def test_bad_devices_name_the_setting(bad, why):
    with pytest.raises(ConfigError, match=f"devices=.*{why}"):
        resolve({"devices": bad}, environ={})
    with pytest.raises(ValueError, match=why):
        parse_devices(bad)


def test_toml_list_of_non_ordinals_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('devices = ["a"]\n')
    with pytest.raises(ConfigError, match="list of CUDA device ordinals"):
        resolve({}, f, environ={})


def test_workers_per_device_sets_the_worker_count():
    c = settle_workers(Config(devices="0,1,3", workers_per_device=2, whisper_workers=0))
    assert c.workers == 6 and c.sources["workers"] == "workers_per_device"
    assert settle_workers(Config(fake_devices=2, workers_per_device=3, worker_kind="cpu")
                          ).workers == 6
    plain = Config(workers=5, devices="0,1")
    assert settle_workers(plain) is plain  # 0: workers stays as given, spread round robin
    assert settle_workers(Config(workers_per_device=2, worker_kind="cpu")).workers == 2
    with pytest.raises(ConfigError, match="workers_per_device"):
        Config(devices="0,1,2,3,4", workers_per_device=60)


def test_the_device_count_is_asked_of_a_child_process():
    # the supervisor never starts CUDA itself; a host without CuPy (CI) counts 0
    try:
        import cupy

        want = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver
        want = 0
    assert probe_device_count(60) == want


def test_worker_rows_go_round_robin_over_the_devices():
    assert [device_for(k, None, 2) for k in range(5)] == [0, 1, 0, 1, 0]
    assert [device_for(k, (3, 1), 8) for k in range(4)] == [3, 1, 3, 1]


def test_fake_devices_report_ordinals_and_a_missing_one_fails_boot():
    seen = []
    engine, kind, device = create_worker_engine("auto", 1, None, 2, seen.append)
    assert (kind, device, seen) == (L.K_CPU, 1, [1])
    engine.close()
    with pytest.raises(BootError, match="device 2 is not present"):
        create_worker_engine("cpu", 2, (0, 1, 2), 2, seen.append)
    assert seen[-1] == 2  # reported before the failure, so status shows which device


def test_cuda_sync_loads_no_driver_where_no_cuda_engine_is_made(monkeypatch):
    import ctypes

    from shmmel import devices

    def no_driver(*_a, **_k):
        raise AssertionError("the CUDA driver was loaded")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    devices.set_cuda_sync(0, "auto")  # CUDA's own choice: nothing to set
    engine, kind, device = create_worker_engine("cpu", 0, None, 0, None, "blocking")
    assert (kind, device) == (L.K_CPU, -1)
    engine.close()


# -- per-device figures -------------------------------------------------------------------

def test_device_rows_sum_their_workers_and_skip_stale_streams():
    w = np.zeros(5, L.WORKER)
    w["device"] = [0, 1, 0, 1, 0]      # row 4: a whisper row (beyond mel_rows)
    w["state"] = [L.W_READY, L.W_DEAD, L.W_READY, L.W_BACKOFF, L.W_READY]
    w["gen"] = [1, 4, 1, 3, 1]
    w["gpu_bytes"] = [10, 20, 30, 40, 50]
    t = np.zeros(6, L.STREAM)
    t["state"] = [L.ST_OPEN, L.ST_OPEN, L.ST_OPEN, L.ST_FREE, L.ST_OPEN, L.ST_OPEN]
    t["worker"] = [0, 2, 1, 1, 3, 3]
    t["gen"] = [1, 1, 3, 4, 3, 2]      # row 1's entry is of a dead generation (3 != 4)
    pinned = pinned_streams(w, t)
    assert pinned.tolist() == [1, 0, 1, 1, 0]
    rows = device_rows(w, 4, np.array([2, 0, 1, 0, 0]), pinned, {0: 0.5})
    assert rows == [
        {"device": 0, "workers": [0, 2], "ready": 2, "state": "serving", "memory_bytes": 40,
         "utilisation": 0.5, "streams": 2, "queue_depth": 3},
        {"device": 1, "workers": [1, 3], "ready": 0, "state": "down", "memory_bytes": 60,
         "utilisation": None, "streams": 1, "queue_depth": 0},
    ]
