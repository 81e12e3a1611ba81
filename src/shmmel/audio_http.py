"""Audio resources: ``POST /audio/stream`` (streaming both ways) and the session API.

``/audio/stream`` runs the upload pipeline (:mod:`shmmel.upload`): the body is read in
pieces, pushed through one slot to the worker that holds the stream, and (for NDJSON and
binary output) the frames each piece completed leave while the body is still arriving. The
first piece is processed before the response starts, so a bad header or bad first samples
get a real 4xx; a problem found later arrives in-band as a last error record. An upload
answered whole by then (it fitted the first piece) goes out as one answer with a
Content-Length, in every format. JSON and .npy
outputs are assembled at the end, normalised exactly (encoders in :mod:`shmmel.wire`).
"""

from __future__ import annotations

import functools
import logging
import time

import falcon
import numpy as np
from falcon import mediatypes

from . import layout as L
from . import wire
from .audio_calls import AudioCalls
from .audio_io import ARRIVAL_WAIT, BodyReader, Media, parse_media
from .channel import Producer
from .config import Config
from .errors import BadRequest
from .httputil import read_body
from .mel import N_SAMPLES, FrameBatch
from .upload import WHOLE_ANSWER_BYTES, AudioBody, Spec, Upload

log = logging.getLogger("shmmel.audio")


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
    best = _preferred(accept, allowed)
    if best is None:
        raise falcon.HTTPNotAcceptable(title="Not Acceptable",
                                       description=f"can produce {', '.join(allowed)}")
    return best


# A session sends the same Accept and Content-Type with every chunk: both are parsed once
# per distinct value (bounded caches; a bad value raises every time, nothing is cached).
@functools.lru_cache(maxsize=256)
def _preferred(accept: str, allowed: tuple[str, ...]) -> str | None:
    try:
        return mediatypes.best_match(list(allowed), accept) or None
    except ValueError:  # a malformed Accept header, as falcon's client_prefers takes it
        return None


def media_of(req: falcon.Request) -> Media:
    return _media(req.content_type)  # UnsupportedMedia: 415, mapped by the app


_media = functools.lru_cache(maxsize=256)(parse_media)


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
        up = Upload(self.calls, self.producer.claim(), Spec(body.fmt, n_mels, padding, windows),
                    wire.encoder(out, n_mels, windows))
        try:
            head = up.start(body)
        except BaseException:
            up.close()
            raise
        resp.content_type = out
        if out in wire.STREAMING and not up.done:
            if body.exact and body.content_length <= WHOLE_ANSWER_BYTES:
                # frames leave as soon as the audio that makes them has arrived, and no
                # later: while each next push's audio is here already, nothing is waited
                # for, and a body that is all here gets one answer with a Content-Length
                # (one write, no chunk framing); the first push that would wait for the
                # client starts the stream with what was made so far
                try:
                    head = up.while_arrived(body, head)
                except BaseException:
                    up.close()
                    raise
            if not up.done:
                header = self.calls.shm.header
                resp.stream = up.stream(head, body, out,
                                        lambda: header["state"] == L.INST_STOPPING)
                return
        # a body answered whole in start() or while_arrived (every sample had arrived)
        # goes out as one answer with a Content-Length, streaming formats too
        parts = [head]
        try:
            up.to_end(body, parts)
        finally:
            up.close()
            body.reader.drain()  # if the answer ends before the upload did
        parts.append(up.sink.result())
        resp.data = b"".join(parts)


def session_reply(out: str, fb: FrameBatch) -> bytes:
    if out == wire.BINARY:
        return wire.batch_record(0, fb)
    final_max = None if np.isinf(fb.running_max) else fb.running_max
    total = fb.start + fb.log10.shape[0]
    return wire.ndjson_line(0, fb.start, fb.provisional(), fb.running_max, final_max, total,
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
               fmt: int | None = None) -> None:
        """Push the request's body (``fmt`` None: finish the stream instead) and answer
        with the frames it made. The body is read first, so a bad one is refused before
        the stream is looked up; one that fits a push and has all arrived is received
        straight into the slot. A slot is claimed only once the body is here: a client
        slow to send its chunk holds none while it is awaited."""
        out = output_media(req, wire.JSON, self.OUTPUTS)
        data = None if fmt is None else self._body(req, fmt)
        with self.producer.claim() as slot:
            if type(data) is BodyReader:
                data = self._receive(data, slot, req.content_length)
            h = self.calls.find(stream_id)
            try:
                # the frames come back normalised (the worker's NumPy calls, not this
                # process's, which would let the GIL go) and are encoded from the slot
                # before it is released: no copy
                if data is None:
                    fb = self.calls.finish(slot, h, copy=False, provisional=True)
                else:
                    fb = self.calls.push(slot, h, data, fmt, final=False, copy=False,
                                         provisional=True)
            finally:
                self.calls.release(h)  # after finish the entry is free: release checks the token
            resp.data = session_reply(out, fb)
        resp.content_type = out

    def _body(self, req: falcon.Request, fmt: int) -> bytes | BodyReader:
        """The chunk: the body's reader when its declared length fits one push (at either
        n_mels) and all of it has arrived (:meth:`BodyReader.arrived`, looked at for up to
        ARRIVAL_WAIT while it is on its way), to be received into the slot
        (:meth:`_receive`); any other body read as bytes, before a slot is claimed."""
        limit = min(self.config.max_body_bytes, 16 << 20)
        length = req.content_length
        if length and length <= min(limit, self.calls.push_samples(fmt, 128) * L.FMT_WIDTH[fmt]):
            reader = BodyReader(req.env["wsgi.input"], limit, length)
            if reader.sees_arrival and reader.wait_arrived(length,
                                                           time.monotonic() + ARRIVAL_WAIT):
                return reader
        return read_body(req, limit)

    @staticmethod
    def _receive(reader: BodyReader, slot, length: int) -> int:
        """Read the chunk, all arrived, into ``slot``; its byte count."""
        n = reader.readinto(slot.view(length))
        if n < length:
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description=f"the body ended after {n} of the "
                                                    f"{length} bytes its Content-Length "
                                                    "announced")
        return n

    def on_post(self, req: falcon.Request, resp: falcon.Response, stream_id: str) -> None:
        media = media_of(req)
        if media.container != "raw":
            raise falcon.HTTPUnsupportedMediaType(
                title="Unsupported Media Type",
                description="session chunks are raw PCM: audio/L16;rate=16000, "
                            "application/octet-stream or audio/x-f32le;rate=16000")
        self._reply(req, resp, stream_id, media.fmt)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, stream_id: str) -> None:
        self._reply(req, resp, stream_id)

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
    return calls  # UnknownStream 404, StreamBusy 409, StreamLost 503: mapped by the app
