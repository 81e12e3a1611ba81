"""The Falcon WSGI app: resources take their backend through the constructor; library errors
are mapped to HTTP statuses once, here; every error body is ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
from collections.abc import Iterator
from typing import Any

import falcon

from . import layout as L
from .audio_http import add_routes as add_audio_routes
from .channel import Producer, ReplyError, call_parts
from .config import MAX_MESSAGE_BYTES, Config
from .errors import BadRequest, ShmmelError, http_status
from .httputil import read_body, require_media_type
from .httpworker import close_after_response
from .metrics import HttpMetrics, MetricsResource
from .openapi import OpenAPIResource
from .shm import Shm
from .whisper.http import add_routes as add_whisper_routes
from .whisper.openai import add_routes as add_openai_routes
from .whisper.openai import openai_errors

log = logging.getLogger("shmmel.http")
NDJSON = "application/x-ndjson"

_encode_str = json.encoder.encode_basestring  # a str as a JSON string, non-ASCII kept
MAX_JSON_BODY = 64 * 1024  # a 4 KiB message may grow six-fold as JSON \\u escapes
TEXT_OP_INDEX = {name: i for i, name in enumerate(L.TEXT_OPS)}


def result_json(data: bytes) -> bytes:
    """``{"result": <data as a JSON string>}`` from the worker's UTF-8 answer: the bytes
    Falcon's JSON handler (``json.dumps(..., ensure_ascii=False)``) writes, made with the
    string encoder that dumps calls (C) and no encoder object, dict or generator (~130
    bytecodes a request less)."""
    return b'{"result": ' + _encode_str(data.decode("utf-8")).encode() + b"}"


def error_serializer(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    detail = exc.description
    if not detail:
        if exc.status_code == 404:
            detail = f"no resource at {req.path}"
        elif exc.status_code == 405:
            detail = f"{req.method} is not allowed on {req.path}"
        else:
            detail = exc.title
    # "error" is always the status phrase ("Method Not Allowed"), whatever title was given
    phrase = falcon.code_to_http_status(exc.status_code).split(" ", 1)[-1]
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps({"error": phrase, "detail": detail}).encode()


def _typed(req: Any, resp: Any, exc: Exception, params: Any) -> None:
    """Every error raised on purpose (ShmmelError and its kinds: BadRequest 400, BadAudio
    400, UnsupportedMedia 415, BodyTooLarge 413, UnknownStream 404, StreamBusy 409,
    ServiceUnavailable 503, RequestTimeout 504) and a client's stall (408), mapped once by
    errors.http_status, the same mapping the in-band error records use."""
    code, phrase, detail = http_status(exc)
    if code >= 500 and code not in (503, 504):
        log.error("error on %s %s: %s", req.method, req.path, exc)
    headers = {"Retry-After": str(getattr(exc, "retry_after", 1))} if code == 503 else None
    if code == 408:  # a stalled client: close, so its thread is not held draining the body
        close_after_response(req.env)
    raise falcon.HTTPError(falcon.code_to_http_status(code), title=phrase, description=detail,
                           headers=headers)


def _internal(req: Any, resp: Any, exc: Exception, params: Any) -> None:
    if isinstance(exc, falcon.HTTPError):
        raise exc
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise falcon.HTTPInternalServerError(title="Internal Server Error",
                                         description="unexpected error; see the service log")


class ProcessResource:
    """POST /process {"message": str, "op": "reverse"|"upper"|"prefix"} -> {"result": str}"""

    def __init__(self, config: Config, producer: Producer) -> None:
        self.config, self.producer = config, producer

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_media_type(req, falcon.MEDIA_JSON)
        raw = read_body(req, MAX_JSON_BODY)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description=f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description="body must be a JSON object")
        message = body.get("message")
        if not isinstance(message, str):
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description='"message" is required and must be a string')
        op = body.get("op", "reverse")
        if not isinstance(op, str) or op not in TEXT_OP_INDEX:
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description=f'"op" must be one of {", ".join(L.TEXT_OPS)}')
        try:
            data = message.encode("utf-8")
        except UnicodeEncodeError:
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description='"message" is not valid Unicode '
                                                    "(lone surrogate)") from None
        if len(data) > MAX_MESSAGE_BYTES:
            raise falcon.HTTPContentTooLarge(
                title="Content Too Large",
                description=f'"message" is {len(data)} bytes of UTF-8; the limit is '
                            f"{MAX_MESSAGE_BYTES}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise falcon.HTTPBadRequest(title="Bad Request",
                                        description='"stream" must be true or false')
        accept = req.env.get("HTTP_ACCEPT")  # req.get_header, without its name mangling
        if stream or (accept and "*/*" not in accept and req.client_prefers(
                [falcon.MEDIA_JSON, NDJSON]) == NDJSON):
            self._stream(resp, data, TEXT_OP_INDEX[op])
            return
        reply = self.producer.call(L.OP_TEXT, data, args=(TEXT_OP_INDEX[op],),
                                   timeout=self.config.request_timeout, kinds=L.MEL_KINDS)
        if reply.status == L.R_BAD_INPUT:
            raise BadRequest(reply.data.decode(errors="replace"))
        if reply.status != L.R_OK:
            raise RuntimeError(f"worker error: {reply.data.decode(errors='replace')}")
        resp.content_type = falcon.MEDIA_JSON
        resp.data = result_json(reply.data)
        resp.set_header("Server-Timing", reply.server_timing())


    def _stream(self, resp: falcon.Response, data: bytes, text_op: int) -> None:
        """The spec's streaming mode: NDJSON lines ``{"delta": ...}`` as the worker makes
        each part (over the request's one slot), then ``{"result": ..., "final": true}``
        (the last line of every NDJSON answer of shmmel carries ``final``).
        The first part is awaited before the response starts, so a refusal is a real 4xx."""
        parts = call_parts(self.producer, L.OP_TEXT, data, args=(text_op, 1),
                           timeout=self.config.request_timeout, kinds=L.MEL_KINDS)
        try:
            first = [next(parts)]
        except StopIteration:
            first = []
        except ReplyError as exc:
            parts.close()
            if exc.status == L.R_BAD_INPUT:
                raise BadRequest(str(exc)) from None
            raise RuntimeError(f"worker error: {exc}") from None
        except BaseException:
            parts.close()
            raise

        def lines() -> Iterator[bytes]:
            got: list[str] = []
            try:
                for chunk in itertools.chain(first, parts):
                    text = chunk.decode("utf-8")
                    got.append(text)
                    yield json.dumps({"delta": text}).encode() + b"\n"
            except (ShmmelError, ReplyError) as exc:
                yield json.dumps({"error": "Service Unavailable", "detail": str(exc),
                                  "final": True}).encode() + b"\n"
                return
            finally:
                parts.close()
            yield json.dumps({"result": "".join(got), "final": True}).encode() + b"\n"

        resp.content_type = NDJSON
        resp.stream = lines()


class HealthResource:
    """GET /healthz: the HTTP process is up."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """GET /readyz: at least one mel worker is ready (engines, GPU included, initialised).
    Whisper workers are counted apart (``whisper_ready``): transcription is optional."""

    def __init__(self, shm: Shm) -> None:
        self.shm = shm

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        w = self.shm.workers
        mel = w["kind"] != L.K_WHISPER  # whisper rows carry their kind from the start
        up = w["state"] == L.W_READY
        ready = int((up & mel).sum())
        body = {"ready": ready, "workers": int(mel.sum()),
                "whisper_ready": int((up & ~mel).sum()),
                "state": L.INST_STATES.get(int(self.shm.header["state"]), "?")}
        if ready == 0 or self.shm.header["state"] != L.INST_RUNNING:
            resp.status = falcon.HTTP_503
            resp.append_header("Retry-After", "1")
            body["error"], body["detail"] = "Service Unavailable", "no worker is ready"
        resp.media = body


class BearerAuth:
    """Middleware: when ``auth_token`` is set, every endpoint but the health probes needs
    ``Authorization: Bearer <token>`` (compared in constant time)."""

    OPEN = ("/healthz", "/readyz")

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in self.OPEN:
            return
        got = (req.get_header("Authorization") or "").encode()
        if not hmac.compare_digest(got, self.expected):
            raise falcon.HTTPUnauthorized(title="Unauthorized",
                                          description="a valid bearer token is required",
                                          challenges=["Bearer"])


def create_app(config: Config, producer: Producer, shm: Shm, row: int = -1) -> falcon.App:
    middleware: list[Any] = [HttpMetrics(shm, row)]  # first: it also counts refusals
    if config.auth_token:
        middleware.append(BearerAuth(config.auth_token))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(openai_errors(error_serializer))  # OpenAI's shape under /v1/
    app.add_error_handler(Exception, _internal)
    for typed in (ShmmelError, BlockingIOError, TimeoutError):  # the one mapping
        app.add_error_handler(typed, _typed)
    app.add_route("/process", ProcessResource(config, producer))
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(shm))
    app.add_route("/metrics", MetricsResource(shm))
    app.add_route("/openapi.json", OpenAPIResource())
    calls = add_audio_routes(app, config, producer)
    add_whisper_routes(app, config, producer, calls)
    add_openai_routes(app, config, producer, calls)
    return app
