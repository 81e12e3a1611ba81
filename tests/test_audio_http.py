"""Audio over HTTP (NumPy engine): every upload style equals the library's offline result
bit for bit; bad input gets a 4xx JSON error and leaves nothing behind. Whole uploads, the
session API and the 4xx tables run in-process (``audio_inproc``: tests/inproc.py); chunked
and full-duplex uploads with the client, limits and kills go through the daemon."""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import signal
import socket
import struct
import threading
import time
import wave

import numpy as np
import pytest

from shmmel import mel, wire
from shmmel.client import ClientError, MelClient
from shmmel.stream_table import StreamTable

from .conftest import start_daemon, stop_daemon, wait_for
from .inproc import InProc

RNG = np.random.default_rng(1234)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) ** 2
    x = 0.2 * env * voiced + 0.01 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def wav_bytes(x: np.ndarray, rate: int = 16000, channels: int = 1, float32: bool = False) -> bytes:
    if float32:
        data = np.repeat(x, channels).astype("<f4").tobytes()
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
        chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
        chunks += b"LIST" + struct.pack("<I", 4) + b"INFO"  # a chunk to skip
        chunks += b"data" + struct.pack("<I", len(data)) + data
        return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat((x * 32767).astype("<i2"), channels).tobytes())
    return buf.getvalue()


def as_i16(x: np.ndarray) -> np.ndarray:
    return (x * 32767).astype(np.int16)


def post(d, path, body, ctype, accept=None, timeout=60):
    headers = {"Content-Type": ctype}
    if accept:
        headers["Accept"] = accept
    return d.request("POST", path, body, headers, timeout)


def parse_records(raw: bytes) -> list[tuple[dict, np.ndarray]]:
    out, pos = [], 0
    while pos < len(raw):
        magic, flags, window, offset, k, n_mels, rmax, fmax = wire.RECORD.unpack_from(raw, pos)
        assert magic == b"SMEL"
        pos += wire.RECORD.size
        frames = np.frombuffer(raw, "<f4", k * n_mels, pos).reshape(k, n_mels)
        pos += k * n_mels * 4
        out.append(({"flags": flags, "window": window, "offset": offset, "final_max": fmax},
                    frames))
    return out


def assert_clean(d) -> None:
    """No stream, no in-flight slot left behind."""
    def clean():
        info = d.status()
        s = info["slots"]
        return (info["streams"]["open"] == 0 and s["free"] + s["parked"] == s["total"]
                and all(w["streams"] == 0 for w in info["workers"]))
    wait_for(clean, timeout=5, what="no stream or slot left behind")


@pytest.fixture(scope="module")
def audio_inproc():
    with InProc(max_body_bytes=4 << 20) as d:
        yield d


@pytest.fixture(scope="module")
def audio_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("audio"), "--workers", "2", "--http-workers", "2",
                     "--worker-kind", "cpu",
                     extra_env={"SHMMEL_MAX_BODY_BYTES": str(4 << 20)})
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.mark.parametrize("kind", ["s16", "f32", "wav16", "wavf32"])
def test_whole_upload_json_equals_offline(audio_inproc, kind):
    x = speechlike(2.3, seed=1)
    if kind == "s16":
        body, ctype, ref_in = as_i16(x).tobytes(), "audio/L16;rate=16000", as_i16(x)
    elif kind == "f32":
        body, ctype, ref_in = x.tobytes(), "audio/x-f32le;rate=16000", x
    elif kind == "wav16":
        body, ctype, ref_in = wav_bytes(x), "audio/wav", as_i16(x)
    else:
        body, ctype, ref_in = wav_bytes(x, float32=True), "audio/wav", x
    status, headers, raw = post(audio_inproc, "/audio/stream?format=json", body, ctype)
    assert status == 200, raw
    got = json.loads(raw)
    ref = mel.log_mel_spectrogram(ref_in)
    assert got["shape"] == [80, ref.shape[1]] == [80, 230]
    assert np.array_equal(np.asarray(got["mel"], np.float32), ref)
    assert_clean(audio_inproc)


def test_a_whole_upload_that_fits_a_slot_is_one_round_trip(audio_inproc):
    """1 s of s16le with padding, Content-Length known: one message to a worker and one
    back (the worker's served count moves by exactly 1; no stream-table entry), bit-exact."""
    x = as_i16(speechlike(1.0, seed=5))
    served = lambda: sum(w["served"] for w in audio_inproc.status()["workers"]  # noqa: E731
                         if w["kind"] != "whisper")
    before = served()
    status, _, raw = post(audio_inproc, "/audio/stream?format=npy&padding=480", x.tobytes(),
                          "audio/L16;rate=16000")
    assert status == 200, raw
    wait_for(lambda: served() - before >= 1, timeout=5, what="the worker's served count")
    assert served() - before == 1  # the old path took 3: open, push, finish (zero padding)
    assert np.array_equal(np.load(io.BytesIO(raw)), mel.log_mel_spectrogram(x, padding=480))
    assert_clean(audio_inproc)


@pytest.mark.parametrize("kind", ["s16", "wav16", "f32"])
def test_a_whole_upload_larger_than_a_slot_takes_few_round_trips(audio_inproc, kind,
                                                                 monkeypatch):
    """10 s with Content-Length: read a push at a time, each push as large as a slot
    holds (s16le: ~4 s), the first one opening the stream, the last one ending it: 3
    round trips for s16le (open + 3 before, and 11 before that: 64 KB reads, each split in
    two pushes, then a finish), 6 for float32; no stream or slot left; bit-exact. The
    stream is the upload's slot's (PUSH_SLOT): no stream-table entry is ever allocated."""

    def no_table(*_a, **_k):
        raise AssertionError("an upload allocated a stream-table entry")

    monkeypatch.setattr(StreamTable, "allocate", no_table)
    x = speechlike(10.0, seed=8)
    if kind == "f32":
        body, ctype, ref_in, trips = x.tobytes(), "audio/x-f32le;rate=16000", x, 6
    elif kind == "wav16":
        body, ctype, ref_in, trips = wav_bytes(x), "audio/wav", as_i16(x), 3
    else:
        body, ctype, ref_in, trips = (as_i16(x).tobytes(), "audio/L16;rate=16000",
                                      as_i16(x), 3)
    served = lambda: sum(w["served"] for w in audio_inproc.status()["workers"]  # noqa: E731
                         if w["kind"] != "whisper")
    before = served()
    status, _, raw = post(audio_inproc, "/audio/stream?format=binary", body, ctype)
    assert status == 200, raw
    # the worker counts a batch just after answering it: let the last count land
    wait_for(lambda: served() - before >= trips, timeout=5, what="the worker's served count")
    assert served() - before == trips
    records = parse_records(raw)
    assert records[-1][0]["flags"] == wire.F_FINAL
    prov = np.concatenate([f for _, f in records])
    floor = mel.final_floor(records[-1][0]["final_max"])
    assert np.array_equal(np.maximum(prov, floor).T, mel.log_mel_spectrogram(ref_in))
    assert_clean(audio_inproc)


@pytest.mark.parametrize("at_s", [0.0, 6.0])
def test_an_upload_refused_in_its_opening_push_or_later_leaves_nothing(audio_inproc, at_s):
    """10 s of float32 with a NaN in the first push (which opens the stream: refused,
    nothing more is sent) or in a later one (the stream is closed): 400, no stream, no slot
    and no worker state left behind."""
    x = speechlike(10.0, seed=11)
    x[int(16000 * at_s) + 7] = math.nan
    served = lambda: sum(w["served"] for w in audio_inproc.status()["workers"]  # noqa: E731
                         if w["kind"] != "whisper")
    before = served()
    status, _, raw = post(audio_inproc, "/audio/stream?format=npy", x.tobytes(),
                          "audio/x-f32le;rate=16000")
    assert status == 400 and "NaN" in json.loads(raw)["detail"], raw
    assert_clean(audio_inproc)
    if at_s == 0.0:  # one round trip: the refused opening push (no open, no close)
        wait_for(lambda: served() - before >= 1, timeout=5, what="the worker's served count")
        time.sleep(0.2)  # a further round trip's count would land by now
        assert served() - before == 1


def test_a_padded_upload_larger_than_a_slot_equals_offline(audio_inproc):
    """Padding still ends the stream in its own push (zeros), after the last samples."""
    x = as_i16(speechlike(5.0, seed=9))
    status, _, raw = post(audio_inproc, "/audio/stream?format=npy&padding=16000",
                          x.tobytes(), "audio/L16;rate=16000")
    assert status == 200, raw
    assert np.array_equal(np.load(io.BytesIO(raw)), mel.log_mel_spectrogram(x, padding=16000))
    assert_clean(audio_inproc)


def test_npy_and_binary_outputs(audio_inproc):
    x = as_i16(speechlike(1.7, seed=2))
    ref = mel.log_mel_spectrogram(x, n_mels=128, padding=123)
    status, headers, raw = post(audio_inproc, "/audio/stream?n_mels=128&padding=123",
                                x.tobytes(), "application/octet-stream", accept="application/x-npy")
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert np.array_equal(np.load(io.BytesIO(raw)), ref)
    status, headers, raw = post(audio_inproc, "/audio/stream?n_mels=128&padding=123&format=binary",
                                x.tobytes(), "application/octet-stream")
    assert status == 200
    assert int(headers["content-length"]) == len(raw)  # answered whole in one round trip
    records = parse_records(raw)
    assert records[-1][0]["flags"] == wire.F_FINAL
    prov = np.concatenate([f for _, f in records])
    floor = mel.final_floor(records[-1][0]["final_max"])
    assert np.array_equal(np.maximum(prov, floor).T, ref)
    assert [r["offset"] for r, _ in records] == list(
        np.cumsum([0] + [f.shape[0] for _, f in records[:-1]]))


def _http_reply(sock: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 reply read from ``sock`` (Content-Length or chunked): (status, body,
    the bytes read beyond it)."""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            rest += sock.recv(65536)
        return int(lines[0].split()[1]), rest[:n], rest[n:]
    body = b""
    while True:  # chunked
        while b"\r\n" not in rest:
            rest += sock.recv(65536)
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += sock.recv(65536)
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return int(lines[0].split()[1]), body, rest


def _binary_mel(raw: bytes) -> np.ndarray:
    records = parse_records(raw)
    assert records[-1][0]["flags"] == wire.F_FINAL
    prov = np.concatenate([f for _, f in records])
    return np.maximum(prov, mel.final_floor(records[-1][0]["final_max"])).T


@pytest.mark.e2e
def test_uploads_larger_than_a_slot_through_gunicorn_equal_offline(audio_daemon):
    """Through gunicorn, a body with a Content-Length larger than a slot is received
    straight into the slot, a push at a time: s16le, WAV (its header's extra bytes first)
    and float32, padded, JSON, answered whole up to 1 MiB and streamed beyond; two uploads pipelined on one keep-alive connection (the
    second one's bytes arrive with the first: each body is read to its length, no further)
    each equal offline bit for bit; nothing left behind."""
    x = speechlike(10.0, seed=21)
    i16 = as_i16(x)
    cases = [("format=binary", i16.tobytes(), "audio/L16;rate=16000", i16, {}),
             ("format=binary", wav_bytes(x), "audio/wav", i16, {}),
             ("format=binary", wav_bytes(x, float32=True), "audio/wav", x, {}),
             ("format=binary&padding=16000", i16.tobytes(), "application/octet-stream", i16,
              {"padding": 16000}),
             ("format=binary&n_mels=128", x.tobytes(), "audio/x-f32le;rate=16000", x,
              {"n_mels": 128})]
    for query, body, ctype, ref_in, kw in cases:
        status, headers, raw = post(audio_daemon, f"/audio/stream?{query}", body, ctype)
        assert status == 200, raw
        # up to 1 MiB: answered whole when the whole body has arrived in time (on a busy
        # host the client may still be sending it: then streamed, the same bytes)
        assert int(headers.get("content-length", len(raw))) == len(raw)
        assert np.array_equal(_binary_mel(raw), mel.log_mel_spectrogram(ref_in, **kw)), query
    long = as_i16(speechlike(33.0, seed=24))  # over 1 MiB: frames stream back as computed
    status, headers, raw = post(audio_daemon, "/audio/stream?format=binary", long.tobytes(),
                                "audio/L16;rate=16000")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    assert np.array_equal(_binary_mel(raw), mel.log_mel_spectrogram(long))
    status, _, raw = post(audio_daemon, "/audio/stream?format=json", i16.tobytes(),
                          "audio/L16;rate=16000")
    assert status == 200
    got = json.loads(raw)
    assert np.array_equal(np.array(got["mel"], np.float32), mel.log_mel_spectrogram(i16))
    y = as_i16(speechlike(7.3, seed=22))
    bodies = [i16.tobytes(), y.tobytes()]
    head = ("POST /audio/stream?format=binary HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: audio/L16;rate=16000\r\nContent-Length: {}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", audio_daemon.port), timeout=30) as sock:
        sock.sendall(b"".join(head.format(len(b)).encode() + b for b in bodies))
        status1, raw1, rest = _http_reply(sock)
        status2, raw2, rest = _http_reply(sock, rest)
    assert (status1, status2, rest) == (200, 200, b"")
    assert np.array_equal(_binary_mel(raw1), mel.log_mel_spectrogram(i16))
    assert np.array_equal(_binary_mel(raw2), mel.log_mel_spectrogram(y))
    assert_clean(audio_daemon)


@pytest.mark.e2e
def test_a_body_shorter_than_its_length_larger_than_a_slot_is_400(audio_daemon):
    """A Content-Length of 10 s, 5 s sent, then the client half-closes: the reads into the
    slot see the end: 400 (JSON output: before the response starts), nothing left behind."""
    body = as_i16(speechlike(5.0, seed=23)).tobytes()
    head = ("POST /audio/stream?format=json HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"audio/L16;rate=16000\r\nContent-Length: {2 * len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", audio_daemon.port), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        status, raw, _ = _http_reply(sock)
    assert status == 400 and "Content-Length" in json.loads(raw)["detail"], raw
    assert_clean(audio_daemon)


@pytest.mark.e2e
@pytest.mark.parametrize("chunk_s", [0.013, 0.37, 1.0])
def test_chunked_upload_with_the_client_equals_offline(audio_daemon, chunk_s):
    x = speechlike(3.1, seed=3) * np.float32(0.9)
    client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
    assert np.array_equal(client.mel(x, chunk_s=chunk_s), mel.log_mel_spectrogram(x))
    i16 = as_i16(x)
    assert np.array_equal(client.mel(i16, n_mels=128, padding=480000, chunk_s=chunk_s),
                          mel.log_mel_spectrogram(i16, n_mels=128, padding=480000))


@pytest.mark.e2e
def test_ndjson_batches_carry_running_max_and_final_floor(audio_daemon):
    x = speechlike(2.0, seed=4)
    x[16000:] *= 8  # louder later: the running max rises, early batches are provisional
    client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
    batches = list(client.stream(x, chunk_s=0.25))
    assert len(batches) >= 5 and batches[-1].final and not any(b.final for b in batches[:-1])
    maxima = [b.running_max for b in batches if b.running_max is not None]
    assert maxima == sorted(maxima) and maxima[0] < maxima[-1]
    assert batches[-1].final_max == maxima[-1]
    assert batches[-1].floor == float(mel.final_floor(maxima[-1]))
    offsets = [b.offset for b in batches]
    assert offsets == sorted(offsets) and sum(b.mel.shape[0] for b in batches) == 200


@pytest.mark.e2e
def test_windows_equal_whispers_30_second_windows(audio_daemon):
    x = speechlike(61.5, seed=5)
    client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
    got = client.mel(x, windows=True, chunk_s=4.0)
    assert got.shape == (3, 80, 3000)
    assert np.array_equal(got, mel.log_mel_windows(x))


def test_session_api_with_random_chunks_equals_offline(audio_inproc):
    d = audio_inproc
    x = as_i16(speechlike(3.5, seed=6))
    status, headers, raw = d.request("POST", "/audio/streams?n_mels=80&padding=321")
    assert status == 201, raw
    sid = json.loads(raw)["stream_id"]
    assert headers["location"] == f"/audio/streams/{sid}"
    frames, pos = [], 0
    sizes = [1, 2, 159, 1, 40, 3000, 16000] + [int(n) for n in RNG.integers(1, 5000, 6)]
    for n in sizes:
        status, _, raw = post(d, f"/audio/streams/{sid}", x[pos : pos + n].tobytes(),
                              "audio/L16;rate=16000")
        assert status == 200, raw
        rec = json.loads(raw)
        assert rec["offset"] == sum(f.shape[0] for f in frames)
        frames.append(np.asarray(rec["mel"], np.float32).reshape(rec["frames"], 80))
        pos += n
    status, _, raw = d.request("GET", f"/audio/streams/{sid}")
    assert status == 200 and json.loads(raw)["samples"] == pos
    status, _, raw = d.request("DELETE", f"/audio/streams/{sid}")
    assert status == 200
    rec = json.loads(raw)
    assert rec["final"] is True
    frames.append(np.asarray(rec["mel"], np.float32).reshape(rec["frames"], 80))
    got = np.maximum(np.concatenate(frames), np.float32(rec["floor"])).T
    assert np.array_equal(got, mel.log_mel_spectrogram(x[:pos], padding=321))
    # a chunk after close, and a second close: 404
    status, _, raw = post(d, f"/audio/streams/{sid}", b"\0\0", "audio/L16;rate=16000")
    assert status == 404 and json.loads(raw)["detail"]
    assert d.request("DELETE", f"/audio/streams/{sid}")[0] == 404
    assert_clean(d)


@pytest.mark.e2e
def test_full_duplex_frames_arrive_before_the_upload_ends(audio_daemon):
    x = as_i16(speechlike(3.0, seed=7))
    sock = socket.create_connection(("127.0.0.1", audio_daemon.port), timeout=20)
    try:
        sock.sendall(b"POST /audio/stream HTTP/1.1\r\nHost: x\r\nContent-Type: audio/L16;rate=16000"
                     b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        first = x[:16000].tobytes()
        sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        received = b""
        while b"\r\n\r\n" not in received or b'"mel"' not in received:
            piece = sock.recv(65536)
            assert piece, "connection closed before any frame arrived"
            received += piece
        # frames of the first second arrived while 2 s of audio are still unsent
        assert b"200 OK" in received.split(b"\r\n", 1)[0]
        rest = x[16000:].tobytes()
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        while piece := sock.recv(65536):
            received += piece
    finally:
        sock.close()
    body = received.split(b"\r\n\r\n", 1)[1]
    # undo the chunked transfer encoding
    lines, pos = b"", 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            break
        lines += body[end + 2 : end + 2 + size]
        pos = end + 4 + size
    recs = [json.loads(line) for line in lines.splitlines()]
    prov = np.concatenate([np.asarray(r["mel"], np.float32).reshape(r["frames"], 80) for r in recs])
    got = np.maximum(prov, np.float32(recs[-1]["floor"])).T
    assert np.array_equal(got, mel.log_mel_spectrogram(x))
    assert_clean(audio_daemon)


def test_a_known_length_upload_still_arriving_streams_its_frames(audio_daemon):
    """A Content-Length body under 1 MiB is answered whole only when all of it is here: a
    client that has sent 4 of its 10 s gets the frames of those 4 s before it sends the rest
    (frames leave as soon as the audio that makes them has arrived), then the rest; the
    whole equals offline bit for bit."""
    x = as_i16(speechlike(10.0, seed=31))
    data = x.tobytes()
    sock = socket.create_connection(("127.0.0.1", audio_daemon.port), timeout=20)
    try:
        sock.sendall(b"POST /audio/stream?format=binary HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: audio/L16;rate=16000\r\nContent-Length: %d\r\n\r\n"
                     % len(data))
        sock.sendall(data[:4 * 32000])
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 4096:
            piece = sock.recv(65536)
            assert piece, "connection closed before any frame arrived"
            received += piece
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in head
        sock.sendall(data[4 * 32000:])
        status, raw, _ = _http_reply(sock, received)
    finally:
        sock.close()
    assert status == 200
    assert np.array_equal(_binary_mel(raw), mel.log_mel_spectrogram(x))
    assert_clean(audio_daemon)


BAD = [
    ("odd byte count", b"\x01\x02\x03", "audio/L16;rate=16000", 400, "whole number"),
    ("NaN float", np.array([0.1, math.nan] * 200, "<f4").tobytes(), "audio/x-f32le", 400, "NaN"),
    ("Inf float", np.array([0.1, math.inf] * 200, "<f4").tobytes(), "audio/x-f32le", 400, "Inf"),
    ("WAV at 8 kHz", wav_bytes(np.zeros(800, np.float32), rate=8000), "audio/wav", 400, "8000"),
    ("stereo WAV", wav_bytes(np.zeros(800, np.float32), channels=2), "audio/wav", 400, "channels"),
    ("truncated WAV header", wav_bytes(np.zeros(800, np.float32))[:30], "audio/wav", 400,
     "truncated"),
    ("not a WAV", b"OggS" + bytes(100), "audio/wav", 400, "RIFF"),
    ("empty body", b"", "audio/L16;rate=16000", 400, "empty"),
    ("wrong rate type", bytes(100), "audio/L16;rate=8000", 415, "8000"),
    ("stereo raw type", bytes(100), "audio/L16;rate=16000;channels=2", 415, "channels"),
    ("unknown type", bytes(100), "video/mp4", 415, "video/mp4"),
]


@pytest.mark.parametrize("name, body, ctype, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_audio_gets_a_json_4xx(audio_inproc, name, body, ctype, status, words):
    got, headers, raw = post(audio_inproc, "/audio/stream", body, ctype)
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)
    assert err["error"] and words in err["detail"]


@pytest.mark.e2e
def test_body_over_the_limit_is_413_up_front_or_in_band(audio_daemon):
    sock = socket.create_connection(("127.0.0.1", audio_daemon.port), timeout=20)
    try:  # a declared length over max_body_bytes is refused before any byte is read
        sock.sendall(b"POST /audio/stream HTTP/1.1\r\nHost: x\r\nContent-Type: audio/L16\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (5 << 20))
        raw = b""
        while piece := sock.recv(65536):
            raw += piece
    finally:
        sock.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and b"limit" in body
    # a chunked upload has no declared length: it is cut off in-band when it crosses it
    client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
    with pytest.raises(ClientError, match="exceeds"):
        for _ in client.stream(bytes(5 << 20), chunk_s=8.0):
            pass
    assert_clean(audio_daemon)


def test_bad_parameters(audio_inproc):
    for query, words in [("n_mels=81", "n_mels"), ("padding=-1", "padding"),
                         ("format=xml", "format"), ("n_mels=abc", "80 or 128")]:
        status, _, raw = post(audio_inproc, f"/audio/stream?{query}", bytes(3200),
                              "audio/L16;rate=16000")
        assert status == 400 and words in json.loads(raw)["detail"]
    status, _, raw = post(audio_inproc, "/audio/stream", bytes(3200), "audio/L16;rate=16000",
                          accept="text/html")
    assert status == 406


@pytest.mark.e2e
def test_error_after_the_response_started_arrives_in_band(audio_daemon):
    """A chunked upload that ends on half a sample: the frames so far, then an error line."""
    x = as_i16(speechlike(1.0, seed=8)).tobytes() + b"\x01"
    client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
    with pytest.raises(ClientError, match="stray byte"):
        for _ in client.stream(x, chunk_s=0.5):
            pass
    assert_clean(audio_daemon)


def test_unknown_and_malformed_stream_ids_are_404(audio_inproc):
    for sid in ["0-0000000000000001", "nonsense", "99999-ff", "-1-1"]:
        status, _, raw = post(audio_inproc, f"/audio/streams/{sid}", b"\0\0",
                              "audio/L16;rate=16000")
        assert status == 404, sid
        assert json.loads(raw)["error"] == "Not Found"


@pytest.mark.e2e
def test_stream_limits_expiry_and_a_killed_worker(tmp_path):
    d = start_daemon(tmp_path, "--workers", "2", "--http-workers", "1", "--worker-kind", "cpu",
                     extra_env={"SHMMEL_MAX_STREAMS": "3", "SHMMEL_STREAM_IDLE_TIMEOUT": "1"})
    try:
        ids = []
        for _ in range(3):
            status, _, raw = d.request("POST", "/audio/streams")
            assert status == 201
            ids.append(json.loads(raw)["stream_id"])
        status, headers, raw = d.request("POST", "/audio/streams")
        assert status == 503 and headers["retry-after"] == "1"
        assert "too many open streams" in json.loads(raw)["detail"]
        # idle streams expire: their table entries and worker state go away
        wait_for(lambda: d.status()["streams"]["open"] == 0, timeout=6, what="streams expired")
        status, _, raw = post(d, f"/audio/streams/{ids[0]}", b"\0\0", "audio/L16;rate=16000")
        assert status == 404 and "expired" in json.loads(raw)["detail"]
        # a worker killed mid-stream: that stream fails fast, a new one works
        status, _, raw = d.request("POST", "/audio/streams")
        opened = json.loads(raw)
        sid = opened["stream_id"]
        worker = d.status()["workers"][opened["worker"]]
        os.kill(worker["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        status, _, raw = post(d, f"/audio/streams/{sid}", bytes(3200), "audio/L16;rate=16000")
        assert status in (404, 503), raw
        assert time.monotonic() - t0 < 2
        wait_for(lambda: all(w["state"] == "ready" for w in d.status()["workers"]
                             if w["kind"] != "whisper"), timeout=10, what="worker respawned")
        x = as_i16(speechlike(1.0, seed=9))
        client = MelClient(f"http://127.0.0.1:{d.port}")
        assert np.array_equal(client.mel(x), mel.log_mel_spectrogram(x))
        wait_for(lambda: d.status()["streams"]["open"] == 0, timeout=5, what="stale entry freed")
        assert_clean(d)
    finally:
        stop_daemon(d)


@pytest.mark.e2e
def test_many_concurrent_streams_get_their_own_frames(audio_daemon):
    signals = {i: as_i16(speechlike(1.5 + 0.1 * i, seed=100 + i)) for i in range(12)}
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        client = MelClient(f"http://127.0.0.1:{audio_daemon.port}")
        got = client.mel(signals[i], chunk_s=0.2)
        results[i] = bool(np.array_equal(got, mel.log_mel_spectrogram(signals[i])))

    threads = [threading.Thread(target=one, args=(i,)) for i in signals]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: True for i in signals}
    assert_clean(audio_daemon)


@pytest.mark.e2e
def test_a_session_chunk_still_arriving_holds_no_slot(audio_daemon):
    """A session chunk is received straight into a slot only once it has all arrived: while
    a client has sent its headers and half the chunk, no slot of the instance is claimed
    (a slow sender would hold one until the min_body_rate cut). Then the rest; a chunk sent
    whole (received into the slot) and the close; the frames equal offline bit for bit."""
    from shmmel import layout as L
    from shmmel.shm import Shm

    d = audio_daemon
    x = as_i16(speechlike(2.5, seed=21))
    status, _, raw = d.request("POST", "/audio/streams?n_mels=80")
    assert status == 201, raw
    sid = json.loads(raw)["stream_id"]
    shm = Shm.attach(d.instance)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        def claimed() -> int:
            return L.slot_counts(shm.slots["state"])["claimed"]

        wait_for(lambda: claimed() == 0, timeout=5, what="no slot claimed before the chunk")
        frames = []

        def chunk(body: bytes, split: bool) -> None:
            conn.putrequest("POST", f"/audio/streams/{sid}")
            conn.putheader("Content-Type", "audio/L16;rate=16000")
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(None if split else body)
            if split:
                conn.send(body[: len(body) // 2])
                seen, end = 0, time.monotonic() + 1.0  # the HTTP process awaits the rest
                while time.monotonic() < end:
                    seen = max(seen, claimed())
                    time.sleep(0.002)
                assert seen == 0, "a slot was held while the chunk was arriving"
                conn.send(body[len(body) // 2 :])
            resp = conn.getresponse()
            raw = resp.read()
            assert resp.status == 200, raw
            rec = json.loads(raw)
            assert rec["offset"] == sum(f.shape[0] for f in frames)
            frames.append(np.asarray(rec["mel"], np.float32).reshape(rec["frames"], 80))

        chunk(x[:16000].tobytes(), split=True)  # 1 s: fits one push
        chunk(x[16000:32000].tobytes(), split=False)
        chunk(x[32000:].tobytes(), split=True)
        conn.request("DELETE", f"/audio/streams/{sid}")
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.status == 200, raw
        rec = json.loads(raw)
        frames.append(np.asarray(rec["mel"], np.float32).reshape(rec["frames"], 80))
        got = np.maximum(np.concatenate(frames), np.float32(rec["floor"])).T
        assert np.array_equal(got, mel.log_mel_spectrogram(x))
    finally:
        conn.close()
        shm.close()
    assert_clean(d)
