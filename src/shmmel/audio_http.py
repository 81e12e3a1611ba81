"""Audio resources: ``POST /audio/stream`` (streaming both ways) and the session API.

``/audio/stream`` reads the body in pieces, pushes each through one slot to the worker that
holds the stream, and (for NDJSON and binary output) yields the frames each piece completed
while the body is still arriving. The first piece is processed before the response starts,
so a bad header or bad first samples get a real 4xx; a problem found later arrives in-band as
a last error record. JSON and .npy outputs are assembled at the end, normalised exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import falcon
import numpy as np

from . import layout as L
from . import wire
from .audio_io import BadAudio, BodyReader, Media, UnsupportedMedia, parse_media, read_wav_header
from .channel import Producer, Slot
from .httputil import read_body
from .config import Config
from .errors import BadRequest, ShmmelError
from .mel import N_SAMPLES, FrameBatch
from .audio_calls import AudioCalls
from .stream_table import Handle, StreamBusy, UnknownStream

log = logging.getLogger("shmmel.audio")
READ_BLOCK_S = 0.1  # chunked uploads: never wait for more than this much audio per read


def _int_param(req: falcon.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise falcon.HTTPBadRequest(title="Bad Request",
                                    description=f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise falcon.HTTPBadRequest(title="Bad Request",
                                    description=f"{name} must be between {lo} and {hi}")
    return v


def audio_params(req: falcon.Request) -> tuple[int, int, bool]:
    raw_mels = (req.get_param("n_mels") or "80").strip()
    n_mels = int(raw_mels) if raw_mels.isdigit() else 0  # one message for every bad value
    if n_mels not in (80, 128):
        raise falcon.HTTPBadRequest(title="Bad Request", description="n_mels must be 80 or 128")
    padding = _int_param(req, "padding", 0, 0, 2 * N_SAMPLES)
    raw = (req.get_param("windows") or "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise falcon.HTTPBadRequest(title="Bad Request", description="windows must be true or false")
    windows = raw in ("1", "true", "yes")
    return n_mels, padding, windows


def output_media(req: falcon.Request, default: str, allowed: tuple[str, ...]) -> str:
    fmt = req.get_param("format")
    if fmt is not None:
        media = wire.FORMATS.get(fmt.lower())
        if media is None or media not in allowed:
            names = [k for k, v in wire.FORMATS.items() if v in allowed]
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description=f"format must be one of {', '.join(names)}")
        return media
    accept = req.get_header("Accept")
    if not accept or "*/*" in accept:
        return default
    best = req.client_prefers(list(allowed))
    if best is None:
        raise falcon.HTTPNotAcceptable(title="Not Acceptable",
                                       description=f"can produce {', '.join(allowed)}")
    return best


def media_of(req: falcon.Request) -> Media:
    try:
        return parse_media(req.content_type)
    except UnsupportedMedia as exc:
        raise falcon.HTTPUnsupportedMediaType(title="Unsupported Media Type",
                                              description=str(exc)) from None


class AudioBody:
    """An audio upload being read (shared by /audio/stream and /audio/transcribe).

    The constructor checks the declared size and parses a WAV header (4xx before anything
    is claimed); :meth:`read` then gives the next block of sample bytes, b"" at the end, at
    most READ_BLOCK_S of audio per read for a chunked upload (a latency bound)."""

    def __init__(self, req: falcon.Request, media: Media, limit: int) -> None:
        self.content_length = req.content_length
        if req.content_length is not None:
            if req.content_length == 0:
                raise BadRequest("empty body: send audio")
            if req.content_length > limit:
                raise falcon.HTTPContentTooLarge(
                    title="Content Too Large",
                    description=f"body is {req.content_length} bytes; the limit is {limit}")
        self.reader = reader = BodyReader(req.env["wsgi.input"], limit, block=1 << 16)
        self.fmt = media.fmt
        self.data_left: int | None = None  # WAV data bytes still to come
        try:
            if media.container == "wav":
                info = read_wav_header(reader.read)
                self.fmt, self.data_left = info.fmt, info.data_bytes
                reader.unread(info.rest)
        except BadAudio as exc:
            raise BadRequest(str(exc)) from None
        except OverflowError as exc:
            raise falcon.HTTPContentTooLarge(title="Content Too Large", description=str(exc))
        block = L.FMT_WIDTH[self.fmt] * int(16000 * READ_BLOCK_S)
        reader.block = block if req.content_length is None else max(block, 1 << 16)
        width = L.FMT_WIDTH[self.fmt]
        size = self.data_left if media.container == "wav" else req.content_length
        if size is not None and size % width:
            raise BadRequest(f"{size} bytes of audio is not a whole number of {width}-byte "
                             "samples")

    def read(self) -> bytes:
        reader, left = self.reader, self.data_left
        if left is not None and left <= 0:
            return b""
        data = reader.read(reader.block if left is None else min(reader.block, left))
        if not data and self.content_length is not None and reader.total < self.content_length:
            raise BadAudio(f"the body ended after {reader.total} of the "
                           f"{self.content_length} bytes its Content-Length announced")
        if left is not None:
            self.data_left = left - len(data)
            if not data:
                raise BadAudio("the WAV data chunk is shorter than its header says")
        return data

    def all_read(self) -> bool:
        """A plain upload whose whole declared body has been read."""
        return self.content_length is not None and self.reader.total >= self.content_length


# on_window(window index, normalised (80, 3000) float32 features, real samples in it) -> output
WindowHook = Callable[[int, np.ndarray, int], bytes]


class Run:
    """One /audio/stream request: a sequence of mel streams (one, or one per 30 s window).

    With ``on_window`` (and ``windows=True``) each completed window's exactly normalised
    features go to that hook instead of the output encoder; the hook returns the bytes to
    send (``/audio/transcribe`` decodes the window there)."""

    def __init__(self, calls: AudioCalls, slot: Slot, fmt: int, n_mels: int, padding: int,
                 windows: bool, out: str, on_window: WindowHook | None = None) -> None:
        self.calls, self.slot, self.fmt, self.out = calls, slot, fmt, out
        self.on_window = on_window
        self.parts: list[np.ndarray] = []  # the current window's frames (on_window only)
        self.n_mels, self.padding, self.windows = n_mels, padding, windows
        self.width = L.FMT_WIDTH[fmt]
        self.carry = b""          # a partial sample left by the last read
        self.window = 0
        self.in_window = 0        # samples pushed into the current window
        self.handle: Handle | None = None
        self.done = False
        self.whole: list[tuple[int, list[np.ndarray], float | None]] = []
        self.total_samples = 0
        self.reason: str | None = None

    def _open(self) -> Handle:
        self.handle = self.calls.open(self.slot, self.n_mels, 0 if self.windows else self.padding)
        self.in_window = 0
        if self.out not in wire.STREAMING:
            self.whole.append((self.window, [], None))
        return self.handle

    def _emit(self, fb: FrameBatch, final: bool) -> bytes:
        if self.on_window is not None:
            self.parts.append(fb.log10)
            if not final:
                return b""
            log10, self.parts = np.concatenate(self.parts), []
            feats = FrameBatch(0, log10, fb.running_max, True).provisional().T
            return self.on_window(self.window, np.ascontiguousarray(feats), self.in_window)
        if self.out not in wire.STREAMING:
            w, parts, _ = self.whole[-1]
            parts.append(fb.log10)
            if final:
                self.whole[-1] = (w, parts, None if np.isinf(fb.running_max) else fb.running_max)
            return b""
        if not final and fb.log10.shape[0] == 0:
            return b""
        final_max = None if np.isinf(fb.running_max) else fb.running_max
        prov = fb.provisional()
        if self.out == wire.NDJSON:
            total = fb.start + fb.log10.shape[0]
            return wire.ndjson_line(self.window, fb.start, prov, fb.running_max, final_max,
                                    total, final, self.reason if final else None)
        return wire.binary_record(self.window, fb.start, prov, fb.running_max, final_max, final)

    def feed(self, data: bytes) -> bytes:
        """Push newly arrived body bytes; return the output they produced."""
        data = self.carry + data
        usable = len(data) - len(data) % self.width
        self.carry = data[usable:]
        view = memoryview(data)[:usable]
        out = []
        while len(view):
            h = self.handle or self._open()
            n = len(view) // self.width
            if self.windows:
                n = min(n, N_SAMPLES - self.in_window)
            piece, view = view[: n * self.width], view[n * self.width :]
            closes = self.windows and self.in_window + n == N_SAMPLES
            fb = self.calls.push(self.slot, h, piece, self.fmt, final=closes)
            self.in_window += n
            self.total_samples += n
            out.append(self._emit(fb, closes))
            if closes:
                self.handle = None
                self.window += 1
        return b"".join(out)

    def oneshot(self, data: bytes) -> bytes:
        """The whole upload in one round trip (no stream entry): see AudioCalls.oneshot."""
        if len(data) % self.width:
            raise BadAudio(f"the body ends with {len(data) % self.width} stray byte(s): not a "
                           f"whole number of {self.width}-byte samples")
        if not data:
            raise BadAudio("the body holds no audio samples")
        fb = self.calls.oneshot(self.slot, data, self.fmt, self.n_mels, self.padding)
        self.total_samples = len(data) // self.width
        if self.out not in wire.STREAMING:
            self.whole.append((self.window, [], None))
        self.done = True
        return self._emit(fb, True)

    def finish(self, reason: str | None = None) -> bytes:
        """End the stream(s): padding, last frames, final max. With ``reason`` (the service
        is stopping) a trailing partial sample is dropped instead of refused."""
        if reason:
            self.carry = b""
        if self.carry:
            raise BadAudio(f"the body ends with {len(self.carry)} stray byte(s): not a whole "
                           f"number of {self.width}-byte samples")
        if self.total_samples == 0 and not reason:
            raise BadAudio("the body holds no audio samples")
        self.reason = reason
        out = b""
        if self.handle is not None or not self.windows:
            h = self.handle or self._open()
            extra = N_SAMPLES - self.in_window if self.windows else 0
            fb = self.calls.finish(self.slot, h, extra)
            self.handle = None
            out = self._emit(fb, True)
        self.done = True
        return out

    def pump(self, read: Callable[[], bytes], stopping: Callable[[], bool]) -> Iterator[bytes]:
        """Feed the rest of the body, yielding output as it is made; when ``stopping()``
        (the service is shutting down), end with a final message for what has arrived."""
        while not self.done:
            if stopping():
                yield self.finish(reason="shutdown")
                return
            data = read()
            chunk = self.feed(data) if data else self.finish()
            if chunk:
                yield chunk

    def abort(self) -> None:
        if self.handle is not None:
            self.calls.abort(self.slot, self.handle)
            self.handle = None

    def whole_result(self) -> tuple[np.ndarray, list[float | None]]:
        mels, maxima = [], []
        for _w, parts, final_max in self.whole:
            log10 = np.concatenate(parts) if parts else np.empty((0, self.n_mels), np.float32)
            fb = FrameBatch(0, log10, float("-inf") if final_max is None else final_max, True)
            mels.append(np.ascontiguousarray(fb.provisional().T))
            maxima.append(final_max)
        return (np.stack(mels) if self.windows else mels[0]), maxima


class AudioStreamResource:
    """POST /audio/stream"""

    OUTPUTS = (wire.NDJSON, wire.JSON, wire.BINARY, wire.NPY)

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls) -> None:
        self.config, self.producer, self.calls = config, producer, calls

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        media = media_of(req)
        n_mels, padding, windows = audio_params(req)
        out = output_media(req, wire.NDJSON, self.OUTPUTS)
        body = AudioBody(req, media, self.config.max_body_bytes)
        fmt, reader, read = body.fmt, body.reader, body.read
        whole = req.content_length is not None and not windows
        if whole and req.content_length <= self.config.slot_bytes:
            reader.block = max(reader.block, req.content_length)  # the body in one read
        slot = self.producer.claim()
        run = Run(self.calls, slot, fmt, n_mels, padding, windows, out)
        try:
            first = read()
            if whole and reader.total >= req.content_length and not body.data_left \
                    and self.calls.fits_oneshot(len(first), fmt, n_mels, padding):
                head = run.oneshot(first)  # one message each way, no stream entry
            else:
                head = run.feed(first) if first else run.finish()
            if req.content_length is not None and reader.total >= req.content_length \
                    and not run.done:  # the whole body is here: finish before answering
                if body.data_left:
                    raise BadAudio("the WAV data chunk is shorter than its header says")
                head += run.finish()
        except BaseException as exc:
            run.abort()
            slot.release()
            if isinstance(exc, BadAudio):
                raise BadRequest(str(exc)) from None
            if isinstance(exc, OverflowError):
                raise falcon.HTTPContentTooLarge(title="Content Too Large", description=str(exc))
            raise
        resp.content_type = out
        if out in wire.STREAMING:
            resp.stream = self._stream(run, slot, head, body)
            return
        try:
            while not run.done:
                data = read()
                run.feed(data) if data else run.finish()
        except BadAudio as exc:
            raise BadRequest(str(exc)) from None
        except OverflowError as exc:
            raise falcon.HTTPContentTooLarge(title="Content Too Large", description=str(exc))
        finally:
            run.abort()
            slot.release()
            body.reader.drain()  # if the answer ends before the upload did
        mel, maxima = run.whole_result()
        resp.data = wire.whole_npy(mel) if out == wire.NPY else wire.whole_json(mel, maxima)

    def _stream(self, run: Run, slot: Slot, head: bytes, body: AudioBody) -> Iterator[bytes]:
        try:
            if head:
                yield head
            header = self.calls.shm.header
            yield from run.pump(body.read, lambda: header["state"] == L.INST_STOPPING)
        except (BadAudio, BadRequest) as exc:
            yield wire.error_bytes(run.out, "Bad Request", str(exc))
        except OverflowError as exc:
            yield wire.error_bytes(run.out, "Content Too Large", str(exc))
        except (BlockingIOError, TimeoutError):
            yield wire.error_bytes(run.out, "Request Timeout",
                                   "the client stopped sending the request body")
        except ShmmelError as exc:
            yield wire.error_bytes(run.out, "Service Unavailable", str(exc))
        finally:  # also runs when the client goes away (the server closes the iterator)
            run.abort()
            slot.release()
            body.reader.drain()  # if the answer ended before the upload did


def session_reply(out: str, fb: FrameBatch) -> bytes:
    final_max = None if np.isinf(fb.running_max) else fb.running_max
    prov = fb.provisional()
    if out == wire.BINARY:
        return wire.binary_record(0, fb.start, prov, fb.running_max, final_max, fb.final)
    total = fb.start + fb.log10.shape[0]
    return wire.ndjson_line(0, fb.start, prov, fb.running_max, final_max, total,
                            fb.final).rstrip(b"\n")


class StreamsResource:
    """POST /audio/streams -> 201 {"stream_id", ...}"""

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls) -> None:
        self.config, self.producer, self.calls = config, producer, calls

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        n_mels, padding, windows = audio_params(req)
        if windows:
            raise BadRequest("windows=true is only supported on /audio/stream")
        with self.producer.claim() as slot:
            h = self.calls.open(slot, n_mels, padding)
        self.calls.release(h)
        resp.status = falcon.HTTP_201
        resp.location = f"/audio/streams/{h.stream_id}"
        resp.media = {"stream_id": h.stream_id, "n_mels": n_mels, "padding": padding,
                      "worker": h.worker, "idle_timeout_s": self.config.stream_idle_timeout}


class StreamResource:
    """POST (a chunk) / DELETE (finish) / GET (info) /audio/streams/{stream_id}"""

    OUTPUTS = (wire.JSON, wire.BINARY)

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls) -> None:
        self.config, self.producer, self.calls = config, producer, calls

    def _reply(self, req: falcon.Request, resp: falcon.Response, stream_id: str,
               data: bytes | None, fmt: int = L.FMT_S16LE) -> None:
        """Push ``data`` (None: finish the stream) and answer with the frames it made."""
        out = output_media(req, wire.JSON, self.OUTPUTS)
        h = self.calls.find(stream_id)
        try:
            with self.producer.claim() as slot:
                if data is None:
                    fb = self.calls.finish(slot, h)
                else:
                    fb = self.calls.push(slot, h, data, fmt, final=False)
        finally:
            self.calls.release(h)  # after finish the entry is free: release checks the token
        resp.content_type = out
        resp.data = session_reply(out, fb)

    def on_post(self, req: falcon.Request, resp: falcon.Response, stream_id: str) -> None:
        media = media_of(req)
        if media.container != "raw":
            raise falcon.HTTPUnsupportedMediaType(
                title="Unsupported Media Type",
                description="session chunks are raw PCM: audio/L16;rate=16000, "
                            "application/octet-stream or audio/x-f32le;rate=16000")
        data = read_body(req, min(self.config.max_body_bytes, 16 << 20))
        self._reply(req, resp, stream_id, data, media.fmt)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, stream_id: str) -> None:
        self._reply(req, resp, stream_id, None)

    def on_get(self, req: falcon.Request, resp: falcon.Response, stream_id: str) -> None:
        h = self.calls.find(stream_id)
        try:
            frames, samples = self.calls.table.counts(h.index)
            resp.media = {"stream_id": stream_id, "n_mels": h.n_mels, "worker": h.worker,
                          "frames": frames, "samples": samples}
        finally:
            self.calls.release(h)


def add_routes(app: falcon.App, config: Config, producer: Producer) -> AudioCalls:
    calls = AudioCalls(config, producer)
    app.add_route("/audio/stream", AudioStreamResource(config, producer, calls))
    app.add_route("/audio/streams", StreamsResource(config, producer, calls))
    app.add_route("/audio/streams/{stream_id}", StreamResource(config, producer, calls))

    def unknown(req: Any, resp: Any, exc: UnknownStream, params: Any) -> None:
        raise falcon.HTTPNotFound(title="Not Found", description=str(exc))

    def busy(req: Any, resp: Any, exc: StreamBusy, params: Any) -> None:
        raise falcon.HTTPConflict(title="Conflict", description=str(exc))

    app.add_error_handler(UnknownStream, unknown)
    app.add_error_handler(StreamBusy, busy)
    return calls  # StreamLost is a ServiceUnavailable: the app's 503 handler covers it
