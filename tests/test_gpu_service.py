"""The service with CUDA workers (GPU host only): audio goes to CUDA workers, results equal the
GPU engine's offline output bit for bit, streams batch into shared launches, a killed CUDA
worker is replaced."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from shmmel import mel
from shmmel.client import MelClient

from .conftest import start_daemon, stop_daemon, wait_for
from .test_audio_http import as_i16, speechlike

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]


def _gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (GPU tests need cupy and a CUDA device)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001
        return f"CUDA unavailable: {exc}"
    return None


@pytest.fixture(scope="module")
def gpu_daemon(tmp_path_factory):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    d = start_daemon(tmp_path_factory.mktemp("gpu"), "--workers", "2", "--http-workers", "2",
                     "--worker-kind", "cuda", extra_env={"SHMMEL_WHISPER_WORKERS": "0"})
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def engine():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    e = mel.CudaEngine(0)
    yield e
    e.close()


def test_workers_are_cuda(gpu_daemon):
    workers = gpu_daemon.status()["workers"]
    assert [w["kind"] for w in workers] == ["cuda", "cuda"]
    assert all(w["state"] == "ready" for w in workers)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_streamed_output_equals_gpu_offline(gpu_daemon, engine, n_mels):
    x = as_i16(speechlike(7.3, seed=11))
    client = MelClient(f"http://127.0.0.1:{gpu_daemon.port}")
    ref = mel.log_mel_spectrogram(x, n_mels=n_mels, engine=engine)
    for chunk_s in (0.031, 1.0):
        assert np.array_equal(client.mel(x, n_mels=n_mels, chunk_s=chunk_s), ref)
    cpu = mel.log_mel_spectrogram(x, n_mels=n_mels)
    assert np.abs(ref - cpu).max() < 1e-3


def test_concurrent_streams_batch_into_shared_launches(gpu_daemon, engine):
    before = {w["index"]: w for w in gpu_daemon.status()["workers"]}
    signals = {i: as_i16(speechlike(3 + 0.05 * i, seed=200 + i)) for i in range(24)}
    refs = {i: mel.log_mel_spectrogram(s, engine=engine) for i, s in signals.items()}
    ok: dict[int, bool] = {}

    def one(i: int) -> None:
        got = MelClient(f"http://127.0.0.1:{gpu_daemon.port}").mel(signals[i], chunk_s=0.1)
        ok[i] = bool(np.array_equal(got, refs[i]))

    threads = [threading.Thread(target=one, args=(i,)) for i in signals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert ok == {i: True for i in signals}
    after = gpu_daemon.status()["workers"]
    served = sum(w["served"] - before[w["index"]]["served"] for w in after)
    batches = sum(w["batches"] - before[w["index"]]["batches"] for w in after)
    assert served >= 24 * 30
    # wake-ups took several streams' chunks at once (one engine call, one kernel launch)
    assert batches < served


def test_killed_cuda_worker_is_replaced(gpu_daemon, engine):
    w0 = gpu_daemon.status()["workers"][0]
    os.kill(w0["pid"], signal.SIGKILL)
    wait_for(lambda: any(w["index"] == 0 and w["state"] == "ready" and w["pid"] != w0["pid"]
                         for w in gpu_daemon.status()["workers"]), timeout=60,
             what="CUDA worker respawned")
    x = as_i16(speechlike(2.0, seed=12))
    got = MelClient(f"http://127.0.0.1:{gpu_daemon.port}").mel(x)
    assert np.array_equal(got, mel.log_mel_spectrogram(x, engine=engine))


@pytest.mark.parametrize("policy, bits", [("blocking", 0x4), ("yield", 0x2)])
def test_cuda_sync_sets_how_the_worker_waits_and_leaves_the_bits_alone(engine, tmp_path, policy, bits):
    # a fresh process: the flags are the primary context's, set before it is first current
    x = as_i16(speechlike(2.5, seed=13))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np\n"
            "from shmmel import devices, mel\n"
            f"e, kind, dev = devices.create_worker_engine('cuda', 0, sync={policy!r})\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, mel.log_mel_spectrogram(np.load({str(tmp_path / 'x.npy')!r}), engine=e))\n"
            "print(devices.cuda_sync_flags(dev))\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) == bits
    assert np.array_equal(np.load(tmp_path / "y.npy"), mel.log_mel_spectrogram(x, engine=engine))
