"""Two GPUs (a two-GPU host only; skipped with a reason below two): streams spread over both
devices, the mel of the same audio is bit-identical on both (engines and service), and
killing every worker of one device under load moves new streams to the other with no hung
request. The same checks run on CPU workers with fake devices in tests/test_devices.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shmmel import mel

from .conftest import start_daemon, stop_daemon, wait_for
from .test_devices import (
    CHUNK,
    call,
    check_streams_spread_and_device_outage,
    open_stream,
)

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


def _two_gpus_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (the two-GPU tests need cupy and two CUDA devices)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        return f"CUDA unavailable: {exc}"
    return None if n >= 2 else f"needs two CUDA devices, {n} visible"


@pytest.fixture(scope="module")
def two_gpu_daemon(tmp_path_factory):
    reason = _two_gpus_reason()
    if reason:
        pytest.skip(reason)
    d = start_daemon(tmp_path_factory.mktemp("gpu2"), "--worker-kind", "cuda",
                     "--http-workers", "2",
                     extra_env={"SHMMEL_DEVICES": "0,1", "SHMMEL_WORKERS_PER_DEVICE": "2",
                                "SHMMEL_WHISPER_WORKERS": "0"})
    try:
        wait_for(lambda: all(w["state"] == "ready" for w in d.status()["workers"]), 120,
                 what="all CUDA workers ready")
        yield d
    finally:
        stop_daemon(d)


def test_both_devices_serve(two_gpu_daemon):
    info = two_gpu_daemon.status()
    assert [(w["kind"], w["device"]) for w in info["workers"]] == \
        [("cuda", 0), ("cuda", 1), ("cuda", 0), ("cuda", 1)]
    # memory of each device shows once its workers have run (sampled every second)
    for _ in range(8):
        assert call(two_gpu_daemon, "POST", "/audio/stream", CHUNK)[0] == 200
    wait_for(lambda: all(r["memory_bytes"] > 0 for r in two_gpu_daemon.status()["devices"]),
             10, what="device memory in status")


def test_mel_is_bit_identical_on_both_devices():
    reason = _two_gpus_reason()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal(16000 * 7 + 123) * 0.1).astype(np.float32)
    with mel.CudaEngine(0) as a, mel.CudaEngine(1) as b:
        for n_mels in (80, 128):
            x = mel.log_mel_spectrogram(audio, n_mels=n_mels, engine=a)
            y = mel.log_mel_spectrogram(audio, n_mels=n_mels, engine=b)
            assert x.shape == y.shape and np.array_equal(x, y)


def test_service_mel_is_bit_identical_on_both_devices(two_gpu_daemon):
    d = two_gpu_daemon
    dev = {w["index"]: w["device"] for w in d.status()["workers"]}
    outputs = {}
    for _ in range(4):  # opens alternate devices; keep one stream of each
        sid, worker = open_stream(d)
        status, raw = call(d, "POST", f"/audio/streams/{sid}", CHUNK * 5)
        assert status == 200, raw
        status, tail = call(d, "DELETE", f"/audio/streams/{sid}")
        assert status == 200, tail
        outputs.setdefault(dev[worker], raw + tail)
    assert set(outputs) == {0, 1}
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0].splitlines()[0])  # JSON records, not an error page


def test_streams_spread_and_a_killed_device_moves_new_streams(two_gpu_daemon):
    check_streams_spread_and_device_outage(two_gpu_daemon)
