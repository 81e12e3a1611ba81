"""A small Python client for shmmel's audio API (stdlib only, plus NumPy).

    from shmmel.client import MelClient
    client = MelClient("http://127.0.0.1:8000")   # token: SHMMEL_AUTH_TOKEN, or token=...
    for batch in client.stream(audio):          # full duplex: frames while uploading
        ...                                     # batch.mel is provisional (see docs/MEL.md)
    spec = client.mel("speech.wav")             # (80, T) float32, exactly Whisper's values

``stream`` sends the body with chunked transfer encoding from a thread while it reads the
NDJSON response, so batches arrive while the upload is still running. A problem on the
client's side (a missing file, a directory, an unreadable piece) is raised at once, as itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np

from .decode import decode_audio, is_service_wav
from .errors import ShmmelError
from .mel import final_floor

TOKEN_ENV = "SHMMEL_AUTH_TOKEN"


class ClientError(ShmmelError):
    """The service answered with an error (``status``, and its JSON ``body``)."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body.get('error')}: {body.get('detail')}")
        self.status, self.body = status, body


@dataclass(frozen=True)
class Batch:
    window: int
    offset: int
    mel: np.ndarray            # (frames, n_mels) float32, provisionally normalised
    running_max: float | None
    final: bool = False
    final_max: float | None = None
    floor: float | None = None
    reason: str | None = None  # "shutdown" when the service stopped before the upload ended


def _pieces(audio: np.ndarray | str | Path | bytes, chunk_s: float
            ) -> tuple[str, Iterable[bytes], float]:
    """(content type, body pieces, seconds of audio per piece). A path that is not a 16 kHz
    mono WAV (mp3, m4a, ogg, flac, another rate, stereo) is decoded here to 16 kHz mono
    16-bit with PyAV (the [audio] extra): its mel is then that of the converted audio."""
    if isinstance(audio, (str, Path)) and not is_service_wav(audio):
        audio = decode_audio(audio)
    if isinstance(audio, (str, Path)):
        fh = Path(audio).open("rb")  # here, not in the sender: a missing file fails at once
        size = 32000 * chunk_s

        def read() -> Iterator[bytes]:
            with fh:
                while piece := fh.read(max(1, int(size))):
                    yield piece

        return "audio/wav", read(), chunk_s
    if isinstance(audio, bytes):
        step = max(2, int(32000 * chunk_s) // 2 * 2)
        return ("application/octet-stream",
                (audio[i : i + step] for i in range(0, len(audio), step)), chunk_s)
    a = np.asarray(audio)
    if a.dtype == np.int16:
        ctype, data = "audio/L16;rate=16000", a.astype("<i2").tobytes()
    else:
        ctype, data = "audio/x-f32le;rate=16000", a.astype("<f4").tobytes()
    n = max(1, int(16000 * chunk_s)) * (2 if a.dtype == np.int16 else 4)
    return ctype, (data[i : i + n] for i in range(0, len(data), n)), chunk_s


class MelClient:
    """``token``: the instance's ``auth_token`` (sent as ``Authorization: Bearer``); None
    takes ``SHMMEL_AUTH_TOKEN`` from the environment, "" sends none."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0,
                 token: str | None = None) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.timeout = timeout
        self.token = os.environ.get(TOKEN_ENV, "") if token is None else token

    def stream(self, audio: np.ndarray | str | Path | bytes, *, n_mels: int = 80,
               padding: int = 0, windows: bool = False, chunk_s: float = 1.0,
               realtime: bool = False) -> Iterator[Batch]:
        """Upload ``audio`` (array, WAV path, or raw s16le bytes) in chunks; yield batches."""
        ctype, pieces, per_piece = _pieces(audio, chunk_s)
        query = urlencode({"n_mels": n_mels, "padding": padding, "format": "ndjson",
                           "windows": str(windows).lower()})
        auth = f"Authorization: Bearer {self.token}\r\n" if self.token else ""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        head = (f"POST /audio/stream?{query} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n{auth}"
                f"Accept: application/x-ndjson\r\nConnection: close\r\n\r\n").encode()
        sock.sendall(head)
        failure: list[BaseException] = []  # what went wrong reading the input, if anything

        def send() -> None:
            t0 = time.monotonic()
            it = iter(pieces)
            i = 0
            while True:
                try:
                    piece = next(it)
                except StopIteration:
                    break
                except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                    failure.append(exc)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # wakes the reader at once
                    return
                if realtime:
                    time.sleep(max(0.0, t0 + i * per_piece - time.monotonic()))
                i += 1
                try:
                    if piece:
                        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                except OSError:
                    return  # the server answered early (an error) and closed
            with contextlib.suppress(OSError):
                sock.sendall(b"0\r\n\r\n")

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        resp = http.client.HTTPResponse(sock, method="POST")
        try:
            yield from self._read(resp, n_mels)
        except (OSError, ValueError, http.client.HTTPException):
            sender.join(1)
            if failure:  # the input broke first: say so, not what it did to the connection
                raise failure[0] from None
            raise
        finally:
            resp.close()
            sock.close()
            sender.join(5)
        if failure:
            raise failure[0]

    @staticmethod
    def _read(resp: http.client.HTTPResponse, n_mels: int) -> Iterator[Batch]:
        resp.begin()
        if resp.status != 200:
            raise ClientError(resp.status, json.loads(resp.read() or b"{}"))
        for line in iter(resp.readline, b""):
            rec = json.loads(line)
            if "error" in rec:
                raise ClientError(400, rec)
            yield Batch(rec["window"], rec["offset"],
                        np.asarray(rec["mel"], np.float32).reshape(rec["frames"], n_mels),
                        rec["running_max"], rec.get("final", False), rec.get("final_max"),
                        rec.get("floor"), rec.get("reason"))

    def mel(self, audio: np.ndarray | str | Path | bytes, *, n_mels: int = 80,
            padding: int = 0, windows: bool = False, chunk_s: float = 1.0) -> np.ndarray:
        """The whole log-mel, exactly as Whisper computes it: (n_mels, T), or
        (windows, n_mels, 3000) with ``windows=True``."""
        per_window: dict[int, list[Batch]] = {}
        for b in self.stream(audio, n_mels=n_mels, padding=padding, windows=windows,
                             chunk_s=chunk_s):
            per_window.setdefault(b.window, []).append(b)
        out = []
        for w in sorted(per_window):
            batches = per_window[w]
            prov = np.concatenate([b.mel for b in batches]) if batches else \
                np.empty((0, n_mels), np.float32)
            last = batches[-1]
            if last.final_max is not None:
                prov = np.maximum(prov, final_floor(last.final_max))
            out.append(np.ascontiguousarray(prov.T))
        return np.stack(out) if windows else out[0]
