"""The upload pipeline, one for every audio route: body → samples → pushes → frames per window.

:class:`AudioBody` reads a request body (raw PCM or WAV) in blocks; :class:`Upload` cuts the
samples into pushes on the mel workers (one stream, or one per Whisper 30 s window), carries
partial samples over, sends a whole upload that fits a slot as one message, reads a larger
one with a Content-Length a push at a time (as many samples as a slot takes with their
frames: ~4 s of s16le at 80 mels), its last push ending the stream, and hands each
batch of frames to a sink: a :class:`~shmmel.wire.Encoder` for ``/audio/stream`` (NDJSON,
binary, JSON, .npy), or :class:`WindowSink` for the transcription routes, which get each
window's exactly normalised features. :meth:`Upload.start`, :meth:`Upload.stream` and
:meth:`Upload.to_end` are the request flow the resources share: errors before the response
starts propagate (the app maps them once), errors after it arrive in-band.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import falcon
import numpy as np

from . import layout as L
from . import wire
from .audio_calls import AudioCalls
from .audio_io import ARRIVAL_WAIT, BadAudio, BodyReader, Media, read_wav_header
from .channel import Slot
from .errors import BadRequest, BodyTooLarge, ShmmelError
from .mel import N_SAMPLES, FrameBatch
from .stream_table import Handle

log = logging.getLogger("shmmel.audio")
READ_BLOCK_S = 0.1  # chunked uploads: never wait for more than this much audio per read
# a body of known size up to this many bytes is answered whole, with a Content-Length, in
# the streaming formats too (~32 s of s16le): one write, no chunked framing
WHOLE_ANSWER_BYTES = 1 << 20


class AudioBody:
    """An audio upload being read.

    The constructor checks the declared size and parses a WAV header (4xx before anything
    is claimed); :meth:`read` then gives the next block of sample bytes, b"" at the end, at
    most READ_BLOCK_S of audio per read for a chunked upload (a latency bound)."""

    def __init__(self, req: falcon.Request, media: Media, limit: int) -> None:
        self.content_length = req.content_length
        if req.content_length is not None:
            if req.content_length == 0:
                raise BadRequest("empty body: send audio")
            if req.content_length > limit:
                raise BodyTooLarge(f"body is {req.content_length} bytes; the limit is {limit}")
        self.reader = reader = BodyReader(req.env["wsgi.input"], limit, block=1 << 16)
        self.fmt = media.fmt
        self.data_left: int | None = None  # WAV data bytes still to come
        if media.container == "wav":
            info = read_wav_header(reader.read)
            self.fmt, self.data_left = info.fmt, info.data_bytes
            reader.unread(info.rest)
        block = L.FMT_WIDTH[self.fmt] * int(16000 * READ_BLOCK_S)
        reader.block = block if req.content_length is None else max(block, 1 << 16)
        width = L.FMT_WIDTH[self.fmt]
        size = self.data_left if media.container == "wav" else req.content_length
        if size is not None and size % width:
            raise BadRequest(f"{size} bytes of audio is not a whole number of {width}-byte "
                             "samples")
        # a declared length and a known count of whole samples: read straight into slots
        self.exact = req.content_length is not None and size is not None

    def read(self) -> bytes:
        reader, left = self.reader, self.data_left
        if left is not None and left <= 0:
            return b""
        want = reader.block if left is None else min(reader.block, left)
        data = reader.read(want)
        if self.content_length is not None and 0 < len(data) < want:
            data += reader.read(want - len(data))  # after the bytes a WAV header read left
        if not data and self.content_length is not None and reader.total < self.content_length:
            raise BadAudio(f"the body ended after {reader.total} of the "
                           f"{self.content_length} bytes its Content-Length announced")
        if left is not None:
            self.data_left = left - len(data)
            if not data:
                raise BadAudio("the WAV data chunk is shorter than its header says")
        return data

    def readinto(self, out: memoryview) -> int:
        """Sample bytes into ``out`` (a slot's payload), as many as fit: fewer only at the
        end of the audio (a body of known size, see ``exact``). Raises as :meth:`read`."""
        left = self.data_left
        if left is not None:
            if left <= 0:
                return 0
            out = out[:left]
        n = self.reader.readinto(out)
        if n < len(out):
            if self.content_length is not None and self.reader.total < self.content_length:
                raise BadAudio(f"the body ended after {self.reader.total} of the "
                               f"{self.content_length} bytes its Content-Length announced")
            if left is not None:
                raise BadAudio("the WAV data chunk is shorter than its header says")
        if left is not None:
            self.data_left = left - n
        return n

    def all_read(self) -> bool:
        """A plain upload whose whole declared body has been read."""
        return self.content_length is not None and self.reader.total >= self.content_length

    def at_end(self) -> bool:
        """Every sample byte has been returned by :meth:`read` (the declared length reached,
        or the WAV data chunk read whole): the next read gives b""."""
        if self.reader.pending:
            return False
        if self.data_left is not None:
            return self.data_left <= 0
        return self.all_read()


@dataclass(frozen=True)
class Spec:
    """What an upload is: its sample format, mel channels, padding, and whether it is cut
    into Whisper's 30 s windows (each its own stream, padded to a whole window)."""

    fmt: int
    n_mels: int
    padding: int = 0
    windows: bool = False


# on_window(window index, normalised (80, 3000) float32 features, real samples in it) -> output
WindowHook = Callable[[int, np.ndarray, int], bytes]


class WindowSink(wire.Encoder):
    """Collects each window's frames and gives the hook its exactly normalised features
    (the transcription routes decode the window there)."""

    def __init__(self, on_window: WindowHook) -> None:
        self.on_window = on_window
        self.parts: list[np.ndarray] = []

    def frames(self, window: int, fb: FrameBatch, samples: int, reason: str | None) -> bytes:
        self.parts.append(fb.log10)
        if not fb.final:
            return b""
        log10, self.parts = np.concatenate(self.parts), []
        feats = FrameBatch(0, log10, fb.running_max, True).provisional().T
        return self.on_window(window, np.ascontiguousarray(feats), samples)


class Upload:
    """One upload through the mel workers: a sequence of mel streams (one, or one per 30 s
    window) on one slot, its frames handed to ``sink``."""

    def __init__(self, calls: AudioCalls, slot: Slot, spec: Spec, sink: wire.Encoder) -> None:
        self.calls, self.slot, self.spec, self.sink = calls, slot, spec, sink
        self.width = L.FMT_WIDTH[spec.fmt]
        # sample bytes one push takes in one round trip: a declared-length body is read in
        # blocks of this size, so each read is one message each way
        self.piece = calls.push_samples(spec.fmt, spec.n_mels) * self.width
        self.copy = sink.keeps_frames  # else the frames are views of the slot, encoded at once
        self.norm = sink.provisional  # pushes of one piece come back normalised by the worker
        self.carry = b""          # a partial sample left by the last read
        self.window = 0
        self.in_window = 0        # samples pushed into the current window
        self.handle: Handle | None = None
        self.done = False
        self.total_samples = 0
        self.reason: str | None = None
        self.direct = False       # pushes read straight into the slot (see _feed_slot)

    # -- samples in ------------------------------------------------------------------------
    def _open(self) -> Handle:
        """The next stream of this upload (one, or one per window): kept by its worker under
        this upload's slot, opened by its first push (no round trip of its own)."""
        spec = self.spec
        self.handle = self.calls.upload_stream(spec.n_mels, 0 if spec.windows else spec.padding)
        self.in_window = 0
        return self.handle

    def _emit(self, fb: FrameBatch) -> bytes:
        return self.sink.frames(self.window, fb, self.in_window, self.reason)

    def feed(self, data: bytes, last: bool = False) -> bytes:
        """Push newly arrived sample bytes; return the output they produced. ``last``: the
        body ends with them, so (one stream, no padding) their push also ends the stream,
        with no separate :meth:`finish` round trip."""
        data = self.carry + data
        usable = len(data) - len(data) % self.width
        self.carry = data[usable:]
        view = memoryview(data)[:usable]
        spec = self.spec
        ends = last and not self.carry and not spec.windows and not spec.padding
        out = []
        while len(view):
            h = self.handle or self._open()  # a new stream (or window)
            n = len(view) // self.width
            if spec.windows:
                n = min(n, N_SAMPLES - self.in_window)
            piece, view = view[: n * self.width], view[n * self.width :]
            closes = spec.windows and self.in_window + n == N_SAMPLES
            final = closes or (ends and not len(view))
            fb = self.calls.push(self.slot, h, piece, spec.fmt, final, self.copy, self.norm)
            self.in_window += n
            self.total_samples += n
            out.append(self._emit(fb))
            if final:  # the worker dropped the stream
                self.handle = None
                if closes:
                    self.window += 1
                else:
                    self.done = True
        return out[0] if len(out) == 1 else b"".join(out)

    def oneshot(self, data: bytes) -> bytes:
        """The whole upload in one round trip (no stream entry): see AudioCalls.oneshot."""
        if len(data) % self.width:
            raise BadAudio(f"the body ends with {len(data) % self.width} stray byte(s): not a "
                           f"whole number of {self.width}-byte samples")
        if not data:
            raise BadAudio("the body holds no audio samples")
        spec = self.spec
        fb = self.calls.oneshot(self.slot, data, spec.fmt, spec.n_mels, spec.padding,
                                self.copy, self.norm)
        self.total_samples = self.in_window = len(data) // self.width
        self.done = True
        return self._emit(fb)

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
        if self.handle is not None or not self.spec.windows:
            h = self.handle or self._open()
            extra = N_SAMPLES - self.in_window if self.spec.windows else 0
            fb = self.calls.finish(self.slot, h, extra, self.copy, self.norm)
            self.handle = None
            out = self._emit(fb)
        self.done = True
        return out

    def abort(self) -> None:
        if self.handle is not None:
            self.calls.abort(self.slot, self.handle)
            self.handle = None

    def close(self) -> None:
        """Drop a stream left open (client gone, error) and give the slot back."""
        try:
            self.abort()
        finally:
            self.slot.release()

    # -- the request flow the resources share -------------------------------------------------
    def start(self, body: AudioBody) -> bytes:
        """Read the first block and push it; a whole plain upload that fits a slot goes as
        one message each way; a body already read whole is finished here, so the answer
        (and any 4xx) is known before the response starts."""
        spec = self.spec
        whole = body.content_length is not None and not spec.windows
        if body.content_length is not None:  # a read per push; all at once if it fits a slot
            fits = whole and body.content_length <= self.slot.capacity
            if whole and not fits and body.exact:  # each push read straight into the slot
                self.direct = True
                return self._next(body)
            body.reader.block = body.content_length if fits else self.piece
        first = body.read()
        if whole and body.all_read() and not body.data_left \
                and self.calls.fits_oneshot(len(first), spec.fmt, spec.n_mels, spec.padding):
            return self.oneshot(first)
        head = self.feed(first, body.at_end()) if first else self.finish()
        if body.all_read() and not self.done:  # the whole body is here: finish now
            if body.data_left:
                raise BadAudio("the WAV data chunk is shorter than its header says")
            head += self.finish()
        return head

    def pump(self, body: AudioBody, stopping: Callable[[], bool]) -> Iterator[bytes]:
        """Feed the rest, yielding output as it is made; when ``stopping()`` (the service
        is shutting down), end with a final message for what has arrived."""
        while not self.done:
            if stopping():
                yield self.finish(reason="shutdown")
                return
            chunk = self._next(body)
            if chunk:
                yield chunk

    def while_arrived(self, body: AudioBody, head: bytes) -> bytes:
        """Feed the pushes whose audio has all arrived already (no wait for the client),
        their output gathered after ``head``: a body that is all here is finished whole, and
        one still arriving is streamed from the first push that would wait for it."""
        parts = [head]
        total = body.content_length or 0
        reader, deadline = body.reader, 0.0
        while not self.done:
            need = min(self.piece, total - reader.total)
            if reader.arrived() < need:  # ARRIVAL_WAIT for all the pushes together
                deadline = deadline or time.monotonic() + ARRIVAL_WAIT
                if not reader.wait_arrived(need, deadline):
                    break
            chunk = self._next(body)
            if chunk:
                parts.append(chunk)
        return b"".join(parts) if len(parts) > 1 else head

    def to_end(self, body: AudioBody, out: list[bytes] | None = None) -> None:
        """Feed the rest of the body with nothing to send meanwhile (whole-result formats,
        or a streaming format answered whole: its output appended to ``out``)."""
        while not self.done:
            chunk = self._next(body)
            if out is not None and chunk:
                out.append(chunk)

    def _next(self, body: AudioBody) -> bytes:
        """The next read of the body and its push (the finish once it has ended)."""
        if self.direct:
            return self._feed_slot(body)
        data = body.read()
        return self.feed(data, body.at_end()) if data else self.finish()

    def _feed_slot(self, body: AudioBody) -> bytes:
        """A body of known size (not cut into windows), a push at a time: the next piece
        is received straight into the slot and pushed from there, no copy on the way; the
        piece that ends the body ends the stream (or :meth:`finish` sends the padding)."""
        n = body.readinto(self.slot.view(self.piece))
        if not n:
            return self.finish()
        spec = self.spec
        last = body.at_end()
        final = last and not spec.padding
        fb = self.calls.push(self.slot, self.handle or self._open(), n, spec.fmt, final,
                             self.copy, self.norm)
        self.in_window += n // self.width
        self.total_samples += n // self.width
        out = self._emit(fb)
        if final:  # the worker dropped the stream
            self.handle = None
            self.done = True
        elif last:
            out += self.finish()
        return out

    def stream(self, head: bytes, body: AudioBody, media: str, stopping: Callable[[], bool],
               tail: Callable[[], bytes] | None = None,
               on_close: Callable[[], None] | None = None) -> Iterator[bytes]:
        """The response body of a streaming answer: ``head``, the rest as it is made, then
        ``tail()``; an error arrives in-band as a last record (errors.http_status, the same
        mapping as the app's answers). Cleans up when it ends or the client goes away (the
        server closes the iterator)."""
        try:
            if head:
                yield head
            yield from self.pump(body, stopping)
            if tail is not None:
                yield tail()
        except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
            if not isinstance(exc, (ShmmelError, BlockingIOError, TimeoutError)):
                log.exception("upload failed mid-stream")
            yield wire.error_record(media, exc)
        finally:
            try:
                if on_close is not None:
                    on_close()
            finally:
                self.close()
                body.reader.drain()  # if the answer ended before the upload did
