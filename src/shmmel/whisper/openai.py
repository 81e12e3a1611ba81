"""OpenAI's transcription API: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

The official ``openai`` clients (and anything that takes a ``base_url``) work unchanged:
multipart/form-data in (parsed by Falcon's own multipart handler), any audio file FFmpeg reads
(:mod:`shmmel.decode`, in this HTTP process), OpenAI's response formats out
(:mod:`shmmel.whisper.formats`), errors as ``{"error": {"message", "type", "param", "code"}}``
on every ``/v1/`` path. The decoded 16 kHz audio takes the same path as ``/audio/transcribe``
(:class:`~shmmel.upload.Upload` cuts it into 30 s windows on the mel workers, :class:`WhisperJob` decodes them on
a whisper worker, batched with other requests' windows), so the text is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import falcon

from .. import layout as L
from ..upload import Spec, Upload, WindowSink
from ..audio_io import BadAudio, BodyReader
from ..channel import Producer, Slot
from ..config import Config
from ..decode import AudioFile, AudioTooLong, audio_missing, open_audio
from ..decode import INSTALL_HINT as AUDIO_HINT
from ..errors import ShmmelError
from ..mel import SAMPLE_RATE
from ..audio_calls import AudioCalls
from . import MAX_TEMPERATURE, N_MELS
from .formats import FORMATS, Deltas, render, sse
from .http import WhisperJob, unavailable_reason

log = logging.getLogger("shmmel.openai")

MODELS = ("whisper-1", "tiny.en")  # both select the one served model, Whisper tiny.en
LANGUAGES = ("en", "english")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "stream",
          "timestamp_granularities", "timestamp_granularities[]"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no", "")
READ_BLOCK = 1 << 20


class OpenAIError(falcon.HTTPError):
    """An error with OpenAI's ``param`` and ``code`` (rendered by :func:`openai_errors`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(falcon.code_to_http_status(status), description=message)
        self.param, self.code = param, code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = ("invalid_request_error" if status < 500 else
            "service_unavailable" if status == 503 else "server_error")
    if status == 401:
        code = code or "invalid_api_key"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_errors(fallback: Callable[..., None]) -> Callable[..., None]:
    """The app's error serializer: OpenAI's error shape under ``/v1/``, else ``fallback``."""
    import json

    def serialize(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
        if not req.path.startswith("/v1/"):
            return fallback(req, resp, exc)
        message = exc.description or (
            f"no resource at {req.path}" if exc.status_code == 404 else
            f"{req.method} is not allowed on {req.path}" if exc.status_code == 405 else
            exc.title)
        body = error_body(exc.status_code, message, getattr(exc, "param", None),
                          getattr(exc, "code", None))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = json.dumps(body).encode()

    return serialize


@dataclass
class Request:
    """A transcription request's form, validated."""

    file: bytes
    filename: str | None
    model: str
    response_format: str = "json"
    temperature: float = 0.0
    prompt: str = ""
    stream: bool = False

    @property
    def options(self) -> dict[str, Any] | None:
        """What the whisper worker needs beyond /audio/transcribe's defaults, or None."""
        if not self.prompt.strip() and self.temperature == 0:
            return None
        # Whisper keeps the last 223 tokens of context: the last 8 KiB of text cover them
        return {"prompt": self.prompt[-8192:], "temperature": self.temperature}


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param, code)


def read_form(req: falcon.Request, limit: int) -> tuple[bytes | None, str | None,
                                                         dict[str, list[str]]]:
    """(file bytes, file name, other fields) from the multipart body, the file counted
    against ``limit`` bytes as it is read (413 beyond)."""
    ctype = (req.content_type or "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise OpenAIError(415, f"Content-Type must be multipart/form-data (got "
                               f"{ctype or 'none'}), with the audio in a 'file' field",
                          None, "unsupported_media_type")
    if req.content_length is not None and req.content_length > limit:
        raise OpenAIError(413, f"the body is {req.content_length} bytes; the limit is {limit}",
                          "file", "file_too_large")
    file: bytes | None = None
    filename: str | None = None
    fields: dict[str, list[str]] = {}
    for part in req.get_media():
        name = part.name or ""
        if name == "file":
            chunks, size = [], 0
            while piece := part.stream.read(READ_BLOCK):
                size += len(piece)
                if size > limit:
                    raise OpenAIError(413, f"the file is over the limit of {limit} bytes",
                                      "file", "file_too_large")
                chunks.append(piece)
            file, filename = b"".join(chunks), part.filename
        elif name not in FIELDS:
            raise _bad(f"unsupported parameter: {name!r} (supported: "
                       f"{', '.join(sorted(FIELDS))})", name, "unknown_parameter")
        else:
            try:
                fields.setdefault(name, []).append(part.get_data().decode("utf-8"))
            except UnicodeDecodeError:
                raise _bad(f"{name} is not valid UTF-8", name) from None
    return file, filename, fields


def parse_request(file: bytes | None, filename: str | None,
                  fields: dict[str, list[str]]) -> Request:
    """Validate the form as OpenAI does, with 400s naming the parameter."""
    one = {k: v[-1].strip() for k, v in fields.items()}
    if file is None:
        raise _bad("you must provide a 'file' field with the audio", "file", "missing_file")
    model = one.get("model", "")
    if not model:
        raise _bad("you must provide a 'model' parameter (whisper-1 or tiny.en)", "model",
                   "missing_model")
    if model not in MODELS:
        raise _bad(f"model {model!r} is not served here; use one of {', '.join(MODELS)} "
                   "(both are Whisper tiny.en)", "model", "model_not_found")
    language = one.get("language", "").lower()
    if language and language not in LANGUAGES:
        raise _bad(f"language {language!r} is not supported: the served model (tiny.en) is "
                   "English-only; send 'en' or leave it out", "language",
                   "unsupported_language")
    fmt = one.get("response_format", "json") or "json"
    if fmt not in FORMATS:
        raise _bad(f"response_format must be one of {', '.join(FORMATS)}", "response_format")
    try:
        temperature = float(one.get("temperature", "0") or "0")
    except ValueError:
        raise _bad("temperature must be a number", "temperature") from None
    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also NaN
        raise _bad(f"temperature must be between 0 and {MAX_TEMPERATURE:g}", "temperature")
    for g in fields.get("timestamp_granularities[]", []) + fields.get(
            "timestamp_granularities", []):
        if g.strip() == "word":
            raise _bad("timestamp_granularities 'word' is not supported; 'segment' is",
                       "timestamp_granularities", "unsupported_value")
        if g.strip() != "segment":
            raise _bad(f"timestamp_granularities must be 'segment' (got {g!r})",
                       "timestamp_granularities")
    stream_raw = one.get("stream", "false").lower()
    if stream_raw not in TRUE + FALSE:
        raise _bad("stream must be true or false", "stream")
    stream = stream_raw in TRUE
    if stream and fmt not in ("json", "text"):
        raise _bad("stream=true works with response_format json or text", "stream")
    return Request(file, filename, model, fmt, temperature, one.get("prompt", ""), stream)


class TranscriptionsResource:
    """POST /v1/audio/transcriptions"""

    def __init__(self, config: Config, producer: Producer, calls: AudioCalls) -> None:
        self.config, self.producer, self.calls = config, producer, calls
        why = unavailable_reason(config)
        if why is None and audio_missing():
            why = f"decoding audio files needs PyAV (the [audio] extra); {AUDIO_HINT}"
        self.unavailable = why
        # as much audio as max_body_bytes holds as 16 kHz 16-bit PCM (/audio/transcribe's limit)
        self.max_seconds = config.max_body_bytes / (2 * SAMPLE_RATE)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = self.config.max_body_bytes
        try:
            r = parse_request(*read_form(req, limit))  # a bad form is a 400 even here
        finally:  # the epilogue after the last boundary, or the rest after an error: read
            # it (bounded), so the connection stays usable and the answer is not reset
            BodyReader(req.bounded_stream, limit, 1 << 16).drain()
        if self.unavailable:
            raise OpenAIError(501, self.unavailable, None, "not_implemented")
        try:
            audio = open_audio(r.file)
        except BadAudio as exc:
            raise _bad(str(exc), "file", "invalid_audio") from None
        try:
            audio.check_length(self.max_seconds)  # before any window is transcribed
        except AudioTooLong as exc:
            audio.close()
            raise _audio_error(exc) from None
        try:
            slot = self.producer.claim()
        except BaseException:
            audio.close()
            raise
        job = WhisperJob(self.config, self.producer, self.calls, slot, options=r.options)
        run = Upload(self.calls, slot, Spec(L.FMT_S16LE, N_MELS, windows=True),
                     WindowSink(job.window))
        try:
            job.open()
        except BaseException:
            self._end(run, job, slot, audio)
            raise
        if r.stream:
            deltas = Deltas()
            job.emit = lambda rec: deltas.delta_event(rec["segments"])
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.stream = self._stream(run, job, slot, audio, deltas)
            return
        try:
            for _ in self._feed(run, audio):
                pass
        except BadAudio as exc:
            raise _audio_error(exc) from None
        finally:
            self._end(run, job, slot, audio)
        resp.content_type, resp.data = render(r.response_format, job.result(), job.windows,
                                              job.scores)

    def _feed(self, run: Upload, audio: AudioFile) -> Iterator[bytes]:
        """Decode, resample and push the audio; yield what each piece produced."""
        for pcm in audio.chunks(self.max_seconds):
            if out := run.feed(pcm.tobytes()):
                yield out
        if run.total_samples == 0:
            raise BadAudio(f"the file ({audio.format}, {audio.codec}) holds no audio samples")
        yield run.finish()

    @staticmethod
    def _end(run: Upload, job: WhisperJob, slot: Slot, audio: AudioFile) -> None:
        try:
            run.abort()
            job.close()
        finally:
            slot.release()
            audio.close()

    def _stream(self, run: Upload, job: WhisperJob, slot: Slot, audio: AudioFile,
                deltas: Deltas) -> Iterator[bytes]:
        try:
            for out in self._feed(run, audio):
                if out:
                    yield out
            yield deltas.done_event()
        except BadAudio as exc:
            e = _audio_error(exc)
            yield sse(error_body(e.status_code, e.description or "", e.param, e.code))
        except ShmmelError as exc:
            yield sse(error_body(503, str(exc)))
        except Exception:  # noqa: BLE001 - the response has started: report in-band
            log.exception("transcription failed mid-stream")
            yield sse(error_body(500, "unexpected error; see the service log"))
        finally:  # also when the client goes away (the server closes the iterator)
            self._end(run, job, slot, audio)


def _audio_error(exc: BadAudio) -> OpenAIError:
    if isinstance(exc, AudioTooLong):
        return OpenAIError(413, str(exc), "file", "audio_too_long")
    return _bad(str(exc), "file", "invalid_audio")


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "shmmel"}


class ModelsResource:
    """GET /v1/models, GET /v1/models/{model}: what is served (404 for others)."""

    def __init__(self, config: Config) -> None:
        self.served = MODELS if unavailable_reason(config) is None else ()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"object": "list", "data": [model_object(m) for m in self.served]}

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, model: str) -> None:
        if model not in self.served:
            raise OpenAIError(404, f"the model {model!r} does not exist here", "model",
                              "model_not_found")
        resp.media = model_object(model)


def add_routes(app: falcon.App, config: Config, producer: Producer, calls: AudioCalls) -> None:
    app.add_route("/v1/audio/transcriptions", TranscriptionsResource(config, producer, calls))
    models = ModelsResource(config)
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model}", models, suffix="one")
