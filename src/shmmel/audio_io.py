"""Audio input for the HTTP side: media types, WAV headers, and a body reader that returns
what has arrived instead of waiting for a fixed size.

Accepted bodies (16 kHz mono only; shmmel does not resample):

=================================  ==========================================
``audio/wav`` (``audio/x-wav``,    RIFF/WAVE, PCM 16-bit or IEEE float 32-bit
``audio/wave``)                    (also WAVE_FORMAT_EXTENSIBLE of those)
``audio/L16;rate=16000``           raw signed 16-bit little-endian (see note)
``application/octet-stream``       raw s16le
``audio/x-f32le;rate=16000``       raw float32 little-endian (shmmel's own name)
=================================  ==========================================

Note: RFC 2586 defines ``audio/L16`` as big-endian; like most speech services we take the
common little-endian reading, which is what every Whisper client sends.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import layout as L
from .errors import BadRequest, BodyTooLarge, ShmmelError
from .osutil import unread_bytes

WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
S16_TYPES = ("audio/l16", "application/octet-stream")
F32_TYPES = ("audio/x-f32le",)
SAMPLE_RATE = 16000
# how long a request may wait, in all, for body bytes that are on their way before it takes
# the path for a body still arriving (BodyReader.wait_arrived), and how often it looks
ARRIVAL_WAIT, ARRIVAL_POLL = 0.005, 0.0002
WAVE_FORMAT_PCM, WAVE_FORMAT_FLOAT, WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


class UnsupportedMedia(ShmmelError, ValueError):
    """415: a content type (or its parameters) shmmel does not take."""

    http_status = 415


class BadAudio(BadRequest, ValueError):
    """400: the body is not valid audio of the declared type (a ValueError too, for the
    library's callers)."""


@dataclass(frozen=True)
class Media:
    container: str  # "wav" or "raw"
    fmt: int        # L.FMT_S16LE or L.FMT_F32LE (for wav: known after the header)


ACCEPTED = ("audio/wav, audio/L16;rate=16000, application/octet-stream or "
            "audio/x-f32le;rate=16000")


def parse_media(content_type: str | None) -> Media:
    if not content_type:
        raise UnsupportedMedia(f"Content-Type is required: {ACCEPTED}")
    main, *params = [p.strip() for p in content_type.split(";")]
    main = main.lower()
    opts = {}
    for p in params:
        k, _, v = p.partition("=")
        opts[k.strip().lower()] = v.strip().strip('"')
    if main in WAV_TYPES:
        return Media("wav", -1)
    if main in S16_TYPES or main in F32_TYPES:
        rate = opts.get("rate", str(SAMPLE_RATE))
        channels = opts.get("channels", "1")
        problems = []
        if rate != str(SAMPLE_RATE):
            problems.append(f"sample rate {rate} is not supported")
        if channels != "1":
            problems.append(f"{channels} channels are not supported")
        if problems:
            raise UnsupportedMedia(f"{' and '.join(problems)}: send 16000 Hz mono audio")
        return Media("raw", L.FMT_F32LE if main in F32_TYPES else L.FMT_S16LE)
    raise UnsupportedMedia(f"unsupported Content-Type {main!r}: send {ACCEPTED}")


@dataclass(frozen=True)
class WavInfo:
    fmt: int
    data_bytes: int | None  # None: unknown (streaming WAV writes 0 or 0xFFFFFFFF)
    rest: bytes             # body bytes after the header, already read


def read_wav_header(read: Callable[[int], bytes], limit: int = 1 << 20) -> WavInfo:
    """Parse RIFF/WAVE up to the start of the ``data`` chunk; ``read(n)`` returns up to n
    bytes, b"" at the end. Skips LIST and other chunks. Raises BadAudio."""
    buf = bytearray()

    def need(n: int) -> None:
        while len(buf) < n:
            if len(buf) > limit:
                raise BadAudio("WAV header too large (no data chunk in the first MiB)")
            piece = read(max(n - len(buf), 4096))
            if not piece:
                raise BadAudio("truncated WAV header")
            buf.extend(piece)

    need(12)
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise BadAudio("not a RIFF/WAVE file")
    pos, fmt = 12, None
    while True:
        need(pos + 8)
        cid, size = bytes(buf[pos : pos + 4]), struct.unpack_from("<I", buf, pos + 4)[0]
        pos += 8
        if cid == b"data":
            if fmt is None:
                raise BadAudio("WAV data chunk before its fmt chunk")
            data_bytes = None if size in (0, 0xFFFFFFFF) else size
            return WavInfo(fmt, data_bytes, bytes(buf[pos:]))
        need(pos + size + (size & 1))
        if cid == b"fmt ":
            if size < 16:
                raise BadAudio("WAV fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, pos)
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 40:
                tag = struct.unpack_from("<H", buf, pos + 24)[0]
            problems = []  # every problem at once, so one round trip fixes the file
            if channels != 1:
                problems.append(f"{channels} channels (send mono)")
            if rate != SAMPLE_RATE:
                problems.append(f"a sample rate of {rate} Hz (send 16000 Hz)")
            if tag == WAVE_FORMAT_PCM and bits == 16:
                fmt = L.FMT_S16LE
            elif tag == WAVE_FORMAT_FLOAT and bits == 32:
                fmt = L.FMT_F32LE
            else:
                problems.append(f"encoding format {tag} with {bits} bits (send 16-bit PCM or "
                                "32-bit float)")
            if problems:
                raise BadAudio(f"WAV has {' and '.join(problems)}")
        pos += size + (size & 1)


class BodyReader:
    """Reads a WSGI request body in pieces, returning what has arrived.

    For a chunked upload under gunicorn it takes each piece as the socket delivers it (through
    the ChunkedReader's parser), so frames can go out while the client is still sending;
    other servers and Content-Length bodies fall back to ``read(n)``. Counts bytes against
    ``limit`` (413 beyond).
    """

    def __init__(self, stream, limit: int, block: int) -> None:
        self.stream, self.limit, self.block = stream, limit, block
        self.total = 0
        self.pending = b""
        reader = getattr(stream, "reader", None)
        parser = getattr(reader, "parser", None)
        self._parser = parser if type(reader).__name__ == "ChunkedReader" else None
        self._body = self._direct()  # asked several times a request: looked up once

    def unread(self, data: bytes) -> None:
        self.pending = data + self.pending

    def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` (default ``block``) bytes; b"" at the end of the body."""
        n = n or self.block
        if self.pending:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        data = self._read_some(n)
        self.total += len(data)
        if self.total > self.limit:
            raise BodyTooLarge(f"body exceeds {self.limit} bytes")
        if len(data) > n:
            data, self.pending = data[:n], data[n:]
        return data

    def readinto(self, out: memoryview) -> int:
        """Fill ``out`` (a slot's payload, say) from the body: fewer bytes only at its end.

        Under gunicorn a body with a Content-Length is received straight into ``out``
        (``recv_into``, after any bytes its parser already holds), where :meth:`read` makes
        gunicorn copy each block four times on the way to a bytes object, and the caller
        once more into the slot; other servers, and chunked bodies, go through :meth:`read`.
        """
        n, got = len(out), 0
        if self.pending:
            got = min(n, len(self.pending))
            out[:got] = self.pending[:got]
            self.pending = self.pending[got:]
        direct = self._body
        while got < n:
            if direct is not None:
                k = self._recv_into(direct, out[got:])
                self.total += k
            else:
                data = self._read_some(n - got)
                self.total += len(data)
                k = min(len(data), n - got)
                if k < len(data):  # a chunked reader's piece beyond what fits: kept
                    self.pending = data[k:]
                out[got : got + k] = data[:k]
            if self.total > self.limit:
                raise BodyTooLarge(f"body exceeds {self.limit} bytes")
            if not k:
                break
            got += k
        return got

    def arrived(self) -> int:
        """Body bytes readable now without waiting: held here, in gunicorn's buffers, or
        received by the kernel (FIONREAD) and not yet read; 0 where that cannot be known
        (other servers, chunked bodies), which callers take as "not here"."""
        body = self._body
        if body is None:
            return 0
        un = body.reader.unreader
        length = body.reader.length
        # sizes by seek (every reader of these buffers seeks to their end first):
        # getbuffer() would copy a buffer that shares its bytes (io.BytesIO(data))
        held = un.buf.seek(0, 2)
        # beyond the reader's length the bytes are the next pipelined request's; the kernel
        # is asked only when the buffers fall short (the headers' read usually took the
        # whole body): the ioctl lets the GIL go, and under load taking it back is a wait
        later = min(held if held >= length else held + unread_bytes(un.sock), length)
        return len(self.pending) + body.buf.seek(0, 2) + later

    def wait_arrived(self, n: int, deadline: float) -> bool:
        """Whether ``n`` body bytes are here (:meth:`arrived`), looking again every
        ARRIVAL_POLL until ``deadline`` (time.monotonic) while they are on their way: a
        client's one send of headers and body reaches us as we look, crossing the socket's
        receive window as we read."""
        while self.arrived() < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(ARRIVAL_POLL)
        return True

    @property
    def sees_arrival(self) -> bool:
        """Whether :meth:`arrived` can tell what has arrived (gunicorn, a body with a
        Content-Length)."""
        return self._body is not None

    def _direct(self):
        """gunicorn's body object (``Body`` > ``LengthReader`` > ``SocketUnreader``) when
        its socket may be read directly; else None."""
        s = self.stream
        reader = getattr(s, "reader", None)
        if (type(s).__name__ != "Body" or type(reader).__name__ != "LengthReader"
                or type(getattr(reader, "unreader", None)).__name__ != "SocketUnreader"):
            return None
        return s

    @staticmethod
    def _take(holder, out: memoryview) -> int:
        """Move up to ``len(out)`` bytes from ``holder.buf`` (a BytesIO) into ``out``."""
        buf = holder.buf
        if not len(out) or not buf.seek(0, 2):
            return 0
        # the buffer's own bytes where it holds them whole (a buffer made from bytes, as the
        # header reader's is: httpworker._gather): no copy before the one into ``out``
        data = buf.getvalue()
        k = min(len(out), len(data))
        out[:k] = memoryview(data)[:k]
        holder.buf = rest = type(buf)(data[k:]) if k < len(data) else type(buf)()
        rest.seek(0, 2)  # at its end, as after a write (gunicorn's Body sizes by tell())
        return k

    @classmethod
    def _recv_into(cls, body, out: memoryview) -> int:
        """Up to ``len(out)`` body bytes into ``out`` through gunicorn's body: what its
        buffers hold first (the body's own, then the bytes read with the headers), then
        the socket. The ``LengthReader``'s ``length`` goes down by what it gave, as its
        own ``read`` does, so gunicorn finds the body read."""
        k = cls._take(body, out)  # already counted off the reader's length
        if k:
            return k
        reader = body.reader
        want = min(len(out), reader.length)
        if want <= 0:
            return 0
        un = reader.unreader
        k = cls._take(un, out[:want]) or un.sock.recv_into(out, want)
        reader.length -= k
        return k

    def drain(self, seconds: float = 2.0, max_bytes: int = 64 << 20) -> None:
        """Read and drop what the client is still sending, within bounds.

        After an answer that ends before the body does (an error, a shutdown), closing the
        connection with unread bytes in the socket makes the kernel send a reset, which can
        destroy the answer before the client reads it. Draining first (a "lingering close",
        as nginx does) lets the client finish sending and read the answer. A stalled
        client is still cut off by client_timeout.
        """
        deadline = time.monotonic() + seconds
        dropped = len(self.pending)
        self.pending = b""
        while dropped < max_bytes and time.monotonic() < deadline:
            try:
                data = self._read_some(1 << 16)
            except (OSError, ValueError):
                return
            if not data:
                return
            dropped += len(data)

    def _read_some(self, n: int) -> bytes:
        if self._parser is not None and self._buffers_empty():
            try:
                return next(self._parser)
            except StopIteration:
                self._parser = None
                self.stream.reader.parser = None
                return b""
        return self.stream.read(n)

    def _buffers_empty(self) -> bool:
        s = self.stream
        return s.buf.tell() == 0 and s.reader.buf.tell() == 0
