"""The service's OpenAPI 3.0.3 description (``SPEC``) and the resource that serves it.

Limits come from the modules that enforce them (message size, padding range, text ops,
output formats), so the description cannot drift from the code on those. ``tests/
test_openapi.py`` fuzzes a running instance against it with schemathesis.

Authentication: when the ``auth_token`` setting is set, every endpoint except ``/healthz``
and ``/readyz`` requires ``Authorization: Bearer <token>`` and answers 401 without it; with
no token configured nothing is required.
"""

from __future__ import annotations

import json
from typing import Any

import falcon

from . import layout as L
from . import wire
from .config import MAX_MESSAGE_BYTES
from .mel import N_SAMPLES
from .whisper.openai_spec import OPENAI_ERROR_SCHEMA, V1_PATHS

ERROR = {"$ref": "#/components/schemas/Error"}
BINARY = {"type": "string", "format": "binary"}
RAW_AUDIO = {  # request bodies of raw PCM: the bytes are the samples
    "application/octet-stream": {"schema": BINARY},
    "audio/L16": {"schema": BINARY},
    "audio/x-f32le": {"schema": BINARY},
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 0}}}


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": ERROR}}}
    if headers:
        out["headers"] = headers
    return out


UNAUTHORIZED = _error("missing or wrong bearer token (only when auth_token is configured)",
                      {"WWW-Authenticate": {"schema": {"type": "string"}}})
UNAVAILABLE = _error("no capacity now: every worker queue full, no free slot, no live worker, "
                     "too many open streams, or the worker holding the request died",
                     RETRY_AFTER)
TIMEOUT = _error("no answer from the worker within request_timeout")
NOT_ACCEPTABLE = _error("the Accept header names no format this endpoint produces")

N_MELS = {"name": "n_mels", "in": "query", "required": False,
          "description": "mel channels",
          "schema": {"type": "integer", "enum": [80, 128], "default": 80}}
PADDING = {"name": "padding", "in": "query", "required": False,
           "description": "zero samples appended to the input before the last frames",
           "schema": {"type": "integer", "minimum": 0, "maximum": 2 * N_SAMPLES, "default": 0}}
WINDOWS = {"name": "windows", "in": "query", "required": False,
           "description": "Whisper's 30 s windows: each 480,000-sample window computed on its "
                          "own, the last zero-padded (3000 frames each). /audio/stream only; "
                          "'1', 'true' and 'yes' mean true",
           "schema": {"type": "boolean", "default": False}}
STREAM_ID = {"name": "stream_id", "in": "path", "required": True,
             "description": "as returned by POST /audio/streams: '<index>-<16 hex digits>'",
             "schema": {"type": "string", "pattern": "^[0-9]+-[0-9a-f]{16}$",
                        "example": "3-5f0c2a9be1d47730"}}


def _format_param(names: list[str]) -> dict[str, Any]:
    return {"name": "format", "in": "query", "required": False,
            "description": "output format; overrides the Accept header",
            "schema": {"type": "string", "enum": names}}


BATCH = {  # one NDJSON line / one session reply
    "type": "object",
    "required": ["window", "offset", "frames", "running_max", "mel"],
    "properties": {
        "window": {"type": "integer", "minimum": 0},
        "offset": {"type": "integer", "minimum": 0, "description": "index of the first frame"},
        "frames": {"type": "integer", "minimum": 0},
        "running_max": {"type": "number", "nullable": True,
                        "description": "max log10 value so far (null before any frame)"},
        "mel": {"type": "array", "description": "frames x n_mels, provisionally normalised",
                "items": {"type": "array", "items": {"type": "number"}}},
        "final": {"type": "boolean", "enum": [True]},
        "final_max": {"type": "number", "nullable": True},
        "floor": {"type": "number", "nullable": True,
                  "description": "apply max(value, floor) in float32 to every value received"},
        "total_frames": {"type": "integer", "minimum": 0},
    },
}
WHOLE = {
    "type": "object",
    "required": ["shape", "max", "mel"],
    "properties": {
        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3,
                  "description": "[n_mels, frames], or [windows, n_mels, 3000]"},
        "max": {"description": "the final max (a list of them with windows=true)",
                "oneOf": [{"type": "number", "nullable": True},
                          {"type": "array", "items": {"type": "number", "nullable": True}}]},
        "mel": {"type": "array", "description": "normalised exactly like Whisper"},
    },
}


def _audio_stream_op() -> dict[str, Any]:
    return {
        "operationId": "audioStream",
        "summary": "Log-mel spectrogram of an upload, streamed both ways",
        "description": (
            "Input: 16 kHz mono. `audio/wav` (16-bit PCM or 32-bit float, also "
            "`audio/x-wav`, `audio/wave`), raw s16le as `audio/L16;rate=16000` or "
            "`application/octet-stream`, raw float32 as `audio/x-f32le;rate=16000`. A `rate` "
            "other than 16000 or `channels` other than 1 is 415. Content-Length and chunked "
            "uploads; at most max_body_bytes. The output format is `format` or the Accept "
            "header: ndjson (default) and binary stream frames as they are computed; json and "
            "npy arrive at the end. An error found before the response starts is a 4xx; one "
            "found later (a chunked upload ending on half a sample or crossing max_body_bytes) "
            "is a last NDJSON line {\"error\", \"detail\"} or an error record."),
        "parameters": [N_MELS, PADDING, WINDOWS, _format_param(list(wire.FORMATS))],
        "requestBody": {"required": True, "content": {
            "audio/wav": {"schema": BINARY}, **RAW_AUDIO}},
        "responses": {
            "200": {"description": "mel frames in the requested format", "content": {
                wire.NDJSON: {"schema": {"type": "string", "description":
                                         "one Batch object per line"}},
                wire.JSON: {"schema": WHOLE},
                wire.BINARY: {"schema": {"type": "string", "format": "binary", "description":
                                         "records: see src/shmmel/wire.py"}},
                wire.NPY: {"schema": {"type": "string", "format": "binary"}},
            }},
            "400": _error("bad parameters, bad WAV header, NaN/Inf samples, a body that is "
                          "not a whole number of samples, an empty body"),
            "401": UNAUTHORIZED,
            "406": NOT_ACCEPTABLE,
            "413": _error("the body exceeds max_body_bytes"),
            "415": _error("a Content-Type (or rate/channels) shmmel does not take"),
            "503": UNAVAILABLE,
            "504": TIMEOUT,
        },
    }


def _transcribe_op() -> dict[str, Any]:
    segment = {"type": "object", "required": ["start", "end", "text", "tokens"], "properties": {
        "start": {"type": "number"}, "end": {"type": "number"}, "text": {"type": "string"},
        "tokens": {"type": "array", "items": {"type": "integer"}}}}
    return {
        "operationId": "transcribe",
        "summary": "Transcribe 16 kHz mono speech (Whisper tiny.en) from shmmel's own features",
        "description": (
            "Same inputs as /audio/stream. The audio is cut into Whisper's 30 s windows; each "
            "window's features go to a whisper worker (CTranslate2), batched with other "
            "requests' windows. `format=ndjson` (or that Accept) streams one line per window "
            "as soon as it is decoded, then a final line. Needs the [whisper] extra: 501 "
            "without it or with whisper_workers = 0."),
        "parameters": [_format_param(["json", "ndjson"])],
        "requestBody": {"required": True, "content": {
            "audio/wav": {"schema": BINARY}, **RAW_AUDIO}},
        "responses": {
            "200": {"description": "the transcript", "content": {
                wire.JSON: {"schema": {
                    "type": "object",
                    "required": ["text", "tokens", "segments", "windows", "duration"],
                    "properties": {
                        "text": {"type": "string"},
                        "tokens": {"type": "array", "items": {"type": "integer"}},
                        "segments": {"type": "array", "items": segment},
                        "windows": {"type": "integer"}, "duration": {"type": "number"}}}},
                wire.NDJSON: {"schema": {"type": "string", "description":
                                         "one {window, offset, duration, text, tokens, "
                                         "segments, batch} line per 30 s window, then {final: "
                                         "true, windows, duration, text}; errors in-band"}},
            }},
            "400": _error("bad parameters or bad audio (as /audio/stream)"),
            "401": UNAUTHORIZED,
            "406": NOT_ACCEPTABLE,
            "413": _error("the body exceeds max_body_bytes"),
            "415": _error("a Content-Type (or rate/channels) shmmel does not take"),
            "501": _error("the [whisper] extra is not installed, or whisper_workers = 0"),
            "503": UNAVAILABLE,
            "504": TIMEOUT,
        },
    }


def _session_chunk_op() -> dict[str, Any]:
    return {
        "operationId": "pushStreamChunk",
        "summary": "Push a chunk of raw PCM; get the frames it completed",
        "parameters": [STREAM_ID, _format_param(["json", "binary"])],
        "requestBody": {"required": True, "content": RAW_AUDIO},
        "responses": {
            "200": {"description": "the frames this chunk completed", "content": {
                wire.JSON: {"schema": {"$ref": "#/components/schemas/Batch"}},
                wire.BINARY: {"schema": BINARY}}},
            "400": _error("not a whole number of samples, NaN/Inf samples, a bad format"),
            "401": UNAUTHORIZED,
            "404": _error("no such stream: never opened, expired, or closed"),
            "406": NOT_ACCEPTABLE,
            "409": _error("another request is using this stream"),
            "413": _error("the chunk exceeds max_body_bytes (at most 16 MiB)"),
            "415": _error("not raw PCM of 16 kHz mono (WAV is not taken here)"),
            "503": UNAVAILABLE,
            "504": TIMEOUT,
        },
    }


def _session_finish_op() -> dict[str, Any]:
    return {
        "operationId": "finishStream",
        "summary": "Finish the stream: its padding, the last frames, final_max and floor",
        "parameters": [STREAM_ID, _format_param(["json", "binary"])],
        "responses": {
            "200": {"description": "the last frames (final: true)", "content": {
                wire.JSON: {"schema": {"$ref": "#/components/schemas/Batch"}},
                wire.BINARY: {"schema": BINARY}}},
            "400": _error("a bad format"),
            "401": UNAUTHORIZED,
            "404": _error("no such stream: never opened, expired, or closed"),
            "406": NOT_ACCEPTABLE,
            "409": _error("another request is using this stream"),
            "503": UNAVAILABLE,
            "504": TIMEOUT,
        },
    }


def _session_info_op() -> dict[str, Any]:
    return {
        "operationId": "getStream",
        "summary": "A stream's worker and counters",
        "parameters": [STREAM_ID],
        "responses": {
            "200": {"description": "the stream", "content": {"application/json": {"schema": {
                "type": "object",
                "required": ["stream_id", "n_mels", "worker", "frames", "samples"],
                "properties": {"stream_id": {"type": "string"},
                               "n_mels": {"type": "integer", "enum": [80, 128]},
                               "worker": {"type": "integer", "minimum": 0},
                               "frames": {"type": "integer", "minimum": 0},
                               "samples": {"type": "integer", "minimum": 0}}}}}},
            "401": UNAUTHORIZED,
            "404": _error("no such stream: never opened, expired, or closed"),
            "409": _error("another request is using this stream"),
            "503": _error("the worker holding the stream restarted", RETRY_AFTER),
        },
    }


SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "shmmel",
        "version": "0.1.0",
        "description": (
            "Whisper log-mel spectrograms (and a small text endpoint) over HTTP; requests "
            "travel to compute workers through POSIX shared memory. Every error body is JSON "
            "{\"error\": <HTTP reason>, \"detail\": <what went wrong>}, except under /v1/ "
            "(OpenAI's transcription API), where errors take OpenAI's shape "
            "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}."),
    },
    "security": [{"bearerAuth": []}],
    "paths": {
        "/process": {"post": {
            "operationId": "process",
            "summary": "Transform a short text",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object",
                "required": ["message"],
                "properties": {
                    "message": {"type": "string", "description":
                                f"at most {MAX_MESSAGE_BYTES} bytes of UTF-8 (413 beyond)"},
                    "op": {"type": "string", "enum": list(L.TEXT_OPS), "default": "reverse",
                           "description": "reverse (by character), upper, or prefix (the "
                                          "prefix setting)"},
                    "stream": {"type": "boolean", "default": False, "description":
                               "true (or Accept: application/x-ndjson): the result in parts "
                               "as NDJSON lines {\"delta\"}, then {\"result\", \"final\": true}"}}}}}},
            "responses": {
                "200": {"description": "the result",
                        "headers": {"Server-Timing": {
                            "description": "queue, worker and ipc durations in ms",
                            "schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {
                            "type": "object", "required": ["result"],
                            "properties": {"result": {"type": "string"}}}},
                            "application/x-ndjson": {"schema": {
                                "type": "string", "description":
                                "one JSON object per line: {\"delta\": str} per part, then "
                                "{\"result\": str, \"final\": true} (or an in-band "
                                "{\"error\", \"detail\", \"final\"})"}}}},
                "400": _error("not JSON, not an object, a missing or non-string message, an "
                              "unknown op, a non-boolean stream, invalid UTF-8 or a lone "
                              "surrogate"),
                "401": UNAUTHORIZED,
                "413": _error(f"message over {MAX_MESSAGE_BYTES} bytes of UTF-8, or a body "
                              "over 64 KiB"),
                "415": _error("Content-Type is not application/json"),
                "503": UNAVAILABLE,
                "504": TIMEOUT,
            },
        }},
        "/healthz": {"get": {
            "operationId": "healthz",
            "summary": "The HTTP process is up",
            "security": [],
            "responses": {"200": {"description": "up", "content": {"application/json": {
                "schema": {"type": "object", "required": ["status"],
                           "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}},
        }},
        "/readyz": {"get": {
            "operationId": "readyz",
            "summary": "At least one compute worker is ready and the instance is running",
            "security": [],
            "responses": {
                "200": {"description": "ready", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Readiness"}}}},
                "503": {"description": "not ready (booting, stopping, or no live worker)",
                        "headers": RETRY_AFTER,
                        "content": {"application/json": {"schema": {"allOf": [
                            {"$ref": "#/components/schemas/Readiness"},
                            {"$ref": "#/components/schemas/Error"}]}}}},
            },
        }},
        "/audio/stream": {"post": _audio_stream_op()},
        "/audio/streams": {"post": {
            "operationId": "openStream",
            "summary": "Open an audio session (for clients that cannot stream a body)",
            "parameters": [N_MELS, PADDING, {**WINDOWS, "description":
                                             "must be false here (400 otherwise)"}],
            "responses": {
                "201": {"description": "opened",
                        "headers": {"Location": {"schema": {"type": "string"},
                                                 "description": "/audio/streams/{stream_id}"}},
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["stream_id", "n_mels", "padding", "idle_timeout_s"],
                            "properties": {
                                "stream_id": {"type": "string"},
                                "n_mels": {"type": "integer", "enum": [80, 128]},
                                "padding": {"type": "integer", "minimum": 0},
                                "idle_timeout_s": {"type": "number"}}}}},
                        "links": {
                            "PushChunk": {"operationId": "pushStreamChunk",
                                          "parameters": {"stream_id": "$response.body#/stream_id"}},
                            "GetStream": {"operationId": "getStream",
                                          "parameters": {"stream_id": "$response.body#/stream_id"}},
                            "FinishStream": {"operationId": "finishStream",
                                             "parameters": {
                                                 "stream_id": "$response.body#/stream_id"}}}},
                "400": _error("bad parameters, or windows=true"),
                "401": UNAUTHORIZED,
                "503": UNAVAILABLE,
                "504": TIMEOUT,
            },
        }},
        "/audio/transcribe": {"post": _transcribe_op()},
        "/audio/streams/{stream_id}": {
            "post": _session_chunk_op(),
            "get": _session_info_op(),
            "delete": _session_finish_op(),
        },
        **V1_PATHS,
        "/metrics": {"get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": UNAUTHORIZED,
            },
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {"description": "OpenAPI 3.0.3",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                "401": UNAUTHORIZED,
            },
        }},
    },
    "components": {
        "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "Authorization: Bearer <auth_token>; enforced only when the "
                           "auth_token setting is set"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error", "detail"],
                      "properties": {"error": {"type": "string", "description": "HTTP reason"},
                                     "detail": {"type": "string"}}},
            "Readiness": {"type": "object", "required": ["ready", "workers", "state"],
                          "properties": {"ready": {"type": "integer", "minimum": 0},
                                         "workers": {"type": "integer", "minimum": 0},
                                         "state": {"type": "string"}}},
            "OpenAIError": OPENAI_ERROR_SCHEMA,
            "Batch": BATCH,
            "Whole": WHOLE,
        },
    },
}

SPEC_JSON = json.dumps(SPEC, indent=1).encode()


class OpenAPIResource:
    """GET /openapi.json"""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = SPEC_JSON
