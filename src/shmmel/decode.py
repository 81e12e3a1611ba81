"""Any audio file in: decode with PyAV (FFmpeg's libraries) and resample to 16 kHz mono.

mp3, m4a/aac, ogg/opus/vorbis, flac, webm, wav at any rate, sample format and channel count:
whatever the FFmpeg in PyAV's wheel reads. The conversion is Whisper's own ``load_audio``
(``ffmpeg -ac 1 -ar 16000 -f s16le``), done in-process: FFmpeg's resampler (libswresample,
through ``av.AudioResampler``, a windowed-sinc filter) to 16 kHz, channels averaged to mono,
signed 16-bit output (``FMT_S16LE`` for the mel workers). With 16-bit output libswresample
normalises the down-mix (stereo becomes (L+R)/2); with float output it would not ((L+R)/√2).

PyAV is the optional ``[audio]`` extra (its wheels carry FFmpeg, about 100 MB): this module
imports it only when a file is decoded, and :func:`audio_missing` says whether it is there.

Where it runs: in the HTTP process, on the request's own thread (see docs/OPENAI.md). PyAV
releases the GIL inside FFmpeg's demux, decode and resample calls, so a decode does not stall
the process's other request threads; it costs well under 1% of real time per stream.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio_io import BadAudio
from .errors import ShmmelError

SAMPLE_RATE = 16000
BLOCK_S = 0.5  # seconds of decoded audio resampled at a time
INSTALL_HINT = "install it with: pip install 'shmmel[audio]'"


class AudioExtraMissing(ShmmelError):
    """PyAV (the ``[audio]`` extra) is not installed."""


class Undecodable(BadAudio):
    """400: the file is not audio that FFmpeg can read; the message says what was wrong."""


class AudioTooLong(BadAudio):
    """413: the decoded audio is longer than the limit."""


def audio_missing() -> str | None:
    """"av" when PyAV cannot be found (without importing it), else None."""
    return "av" if importlib.util.find_spec("av") is None else None


def _av() -> Any:
    if audio_missing():
        raise AudioExtraMissing(f"decoding audio files needs PyAV; {INSTALL_HINT}")
    import av

    return av


def _why(exc: Exception) -> str:
    """FFmpeg's own words for an error (``av`` errors carry ``strerror``), else the text."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass
class AudioFile:
    """An opened audio file: what FFmpeg found in it, and its samples in 16 kHz mono chunks.

    Open with :func:`open_audio` (which raises Undecodable before anything else happens);
    iterate :meth:`chunks` once; :meth:`close` (or ``with``) frees FFmpeg's state."""

    container: Any
    stream: Any
    format: str     # container, as FFmpeg names it ("mp3", "ogg", "mov,mp4,m4a,3gp,3g2,mj2")
    codec: str      # "mp3float", "opus", "aac", "pcm_s16le", ...
    rate: int       # the file's sample rate
    channels: int
    samples: int = 0  # 16 kHz samples produced so far

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def declared_seconds(self) -> float | None:
        """The duration the container declares (estimated from the bit rate for some
        formats), or None; the decoded samples are what :meth:`chunks` counts."""
        d = self.container.duration  # in AV_TIME_BASE (microseconds)
        return None if d is None or d <= 0 else d / 1e6

    def check_length(self, max_seconds: float) -> None:
        """AudioTooLong at once when the container declares more than ``max_seconds``
        (before anything is decoded); :meth:`chunks` also counts what it decodes."""
        declared = self.declared_seconds
        if declared is not None and declared > max_seconds:
            raise AudioTooLong(f"the audio is {declared:.0f} s long; the limit is "
                               f"{max_seconds:.0f} s")

    def chunks(self, max_seconds: float | None = None) -> Iterator[np.ndarray]:
        """int16 16 kHz mono arrays, one per BLOCK_S of decoded audio (the resampler's
        delay flushed at the end). Raises Undecodable when a packet cannot be decoded and
        AudioTooLong as soon as the output passes ``max_seconds``."""
        av = _av()
        limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        frames = self._blocks(av)
        while True:
            try:
                frame = next(frames, None)
                out = resampler.resample(frame)
            except (av.FFmpegError, ValueError) as exc:
                raise Undecodable(f"decoding the {self.codec} audio failed after "
                                  f"{self.seconds:.1f} s: {_why(exc)}") from None
            for f in out:
                pcm = f.to_ndarray().reshape(-1)
                self.samples += pcm.size
                if limit is not None and self.samples > limit:
                    raise AudioTooLong(f"the audio is longer than the limit of "
                                       f"{max_seconds:.0f} s")
                yield pcm
            if frame is None:
                return

    def _blocks(self, av: Any) -> Iterator[Any]:
        """Decoded frames regrouped into blocks of about BLOCK_S of audio (an AudioFifo):
        the resampler and the Python around it then run once a block instead of once a
        packet (an mp3 packet is 26 ms), which cuts the decode time by about half."""
        fifo = av.AudioFifo()
        block = 0
        for packet in self.container.demux(self.stream):
            for frame in packet.decode():
                frame.pts = None  # the FIFO checks timestamps; gaps are FFmpeg's business
                fifo.write(frame)
                block = block or max(1, int(frame.sample_rate * BLOCK_S))
                if fifo.samples >= block:
                    yield fifo.read(block)
        if fifo.samples:
            yield fifo.read()


def open_audio(data: bytes | Path | str) -> AudioFile:
    """Open a file's bytes (or a path) and find its first audio stream."""
    av = _av()
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else str(data)
    if isinstance(source, io.BytesIO) and not len(data):  # type: ignore[arg-type]
        raise Undecodable("the file is empty")
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError) as exc:
        raise Undecodable(f"the file is not audio that FFmpeg can read: {_why(exc)}") from None
    try:
        streams = container.streams.audio
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise Undecodable(f"the file ({container.format.name}) has no audio stream; it "
                              f"holds {', '.join(kinds)}")
        stream = streams[0]
        ctx = stream.codec_context
        return AudioFile(container, stream, container.format.name, ctx.name,
                         int(ctx.sample_rate or 0), int(ctx.channels or 0))
    except BaseException:
        container.close()
        raise


def decode_audio(data: bytes | Path | str, max_seconds: float | None = None) -> np.ndarray:
    """The whole file as one int16 16 kHz mono array (for the client and tests)."""
    with open_audio(data) as f:
        parts = list(f.chunks(max_seconds))
    if not parts or not sum(p.size for p in parts):
        raise Undecodable("the file holds no audio samples")
    return np.concatenate(parts)


def encode_audio(pcm: np.ndarray, rate: int = 44100, container: str = "mp3",
                 codec: str = "libmp3lame", channels: int = 1) -> bytes:
    """16 kHz mono int16 ``pcm`` as a compressed file (the benchmark's and tests' inputs):
    resampled to ``rate`` and copied to ``channels`` by FFmpeg, encoded with ``codec``."""
    av = _av()
    layout = "stereo" if channels == 2 else "mono"
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as c:
        s = c.add_stream(codec, rate=rate, layout=layout)
        data = np.repeat(np.asarray(pcm, "<i2")[:, None], channels, axis=1).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate = SAMPLE_RATE
        resampler = av.AudioResampler(format=s.codec_context.format.name, layout=layout,
                                      rate=rate, frame_size=s.codec_context.frame_size or None)
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return buf.getvalue()


def is_service_wav(path: Path | str) -> bool:
    """Whether the file is a WAV that shmmel takes as it is (16 kHz mono, 16-bit PCM or
    float32): sent unchanged, its mel is exact; anything else is decoded first."""
    from .audio_io import read_wav_header

    with open(path, "rb") as fh:
        try:
            read_wav_header(fh.read)
        except BadAudio:
            return False
    return True
