"""The OpenAPI description of OpenAI's transcription API under ``/v1/`` (merged into
:data:`shmmel.openapi.SPEC`); errors there take OpenAI's shape (``OpenAIError``)."""

from __future__ import annotations

from typing import Any

from . import MAX_TEMPERATURE
from .formats import FORMATS
from .openai import MODELS

RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer", "minimum": 0}}}
OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}


def _oai_error(description: str, headers: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": OPENAI_ERROR}}}
    if headers:
        out["headers"] = headers
    return out


OAI_UNAUTHORIZED = _oai_error("missing or wrong bearer token (only when auth_token is "
                              "configured)", {"WWW-Authenticate": {"schema": {"type": "string"}}})
MODEL_OBJECT = {"type": "object", "required": ["id", "object", "created", "owned_by"],
                "properties": {"id": {"type": "string", "enum": list(MODELS)},
                               "object": {"type": "string", "enum": ["model"]},
                               "created": {"type": "integer"},
                               "owned_by": {"type": "string"}}}


def _transcriptions_op() -> dict[str, Any]:
    segment = {"type": "object", "required": [
        "id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
        "compression_ratio", "no_speech_prob"], "properties": {
        "id": {"type": "integer"}, "seek": {"type": "integer"}, "start": {"type": "number"},
        "end": {"type": "number"}, "text": {"type": "string"},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "temperature": {"type": "number"}, "avg_logprob": {"type": "number"},
        "compression_ratio": {"type": "number"}, "no_speech_prob": {"type": "number"}}}
    usage = {"type": "object", "required": ["type", "seconds"], "properties": {
        "type": {"type": "string", "enum": ["duration"]}, "seconds": {"type": "integer"}}}
    text = {"schema": {"type": "string"}}
    return {
        "operationId": "openaiTranscriptions",
        "summary": "OpenAI's transcription API (whisper-1 = tiny.en), any audio file in",
        "description": (
            "multipart/form-data as OpenAI defines it; the official `openai` clients work "
            "unchanged with `base_url=<shmmel>/v1`. The file may be any audio FFmpeg reads "
            "(mp3, m4a, ogg/opus, flac, webm, wav at any rate and channel count); it is "
            "decoded in the HTTP process and resampled to 16 kHz mono (the [audio] extra), "
            "then transcribed as /audio/transcribe does. At most max_body_bytes, and at most "
            "as many seconds as max_body_bytes holds of 16 kHz 16-bit PCM. `stream=true` (with "
            "json or text) answers text/event-stream: a `transcript.text.delta` event per "
            "30 s window, then `transcript.text.done`; a later error is an event {error}. "
            "Errors are OpenAI's {\"error\": {message, type, param, code}}."),
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "model"],
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "model": {"type": "string", "enum": list(MODELS)},
                "language": {"type": "string", "enum": ["en"],
                             "description": "tiny.en is English-only; others are a 400"},
                "prompt": {"type": "string", "description": "previous-text context: Whisper "
                                                            "keeps its last 223 tokens"},
                "response_format": {"type": "string", "enum": list(FORMATS),
                                    "default": "json"},
                "temperature": {"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE,
                                "default": 0, "description": "0: greedy; above: sampling"},
                "timestamp_granularities[]": {
                    "type": "array", "items": {"type": "string", "enum": ["segment"]},
                    "description": "'segment' (always given in verbose_json); 'word' is a "
                                   "400"},
                "stream": {"type": "boolean", "default": False}}}}}},
        "responses": {
            "200": {"description": "the transcript in response_format", "content": {
                "application/json": {"schema": {"oneOf": [
                    {"type": "object", "required": ["text"], "additionalProperties": False,
                     "properties": {"text": {"type": "string"}, "usage": usage}},
                    {"type": "object", "additionalProperties": False,
                     "required": ["task", "language", "duration", "text", "segments"],
                     "properties": {"task": {"type": "string", "enum": ["transcribe"]},
                                    "language": {"type": "string"},
                                    "duration": {"type": "number"},
                                    "text": {"type": "string"},
                                    "segments": {"type": "array", "items": segment},
                                    "usage": usage}}]}},
                "text/plain": text, "application/x-subrip": text, "text/vtt": text,
                "text/event-stream": {"schema": {"type": "string", "description":
                                                 "data: {type: transcript.text.delta, "
                                                 "delta} ... data: {type: "
                                                 "transcript.text.done, text}"}}}},
            "400": _oai_error("a bad parameter (param names it) or a file that is not audio "
                              "FFmpeg can read (param: file, code: invalid_audio)"),
            "401": OAI_UNAUTHORIZED,
            "408": _oai_error("the client stopped sending the request body"),
            "413": _oai_error("the body exceeds max_body_bytes, or the audio the duration "
                              "limit"),
            "415": _oai_error("the body is not multipart/form-data"),
            "501": _oai_error("no transcription here: the [whisper] or [audio] extra is not "
                              "installed, or whisper_workers = 0"),
            "503": _oai_error("no capacity now, or the worker died", RETRY_AFTER),
            "504": _oai_error("no answer from a worker within request_timeout"),
        },
    }


OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "description": "errors under /v1/",
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": "string", "nullable": True},
                       "code": {"type": "string", "nullable": True}}}}}

V1_PATHS: dict[str, Any] = {
    "/v1/audio/transcriptions": {"post": _transcriptions_op()},
    "/v1/models": {"get": {
        "operationId": "openaiModels",
        "summary": "The models /v1/audio/transcriptions serves (none without transcription)",
        "responses": {
            "200": {"description": "OpenAI's model list", "content": {"application/json": {
                "schema": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": MODEL_OBJECT}}}}}},
            "401": OAI_UNAUTHORIZED,
        },
    }},
    "/v1/models/{model}": {"get": {
        "operationId": "openaiModel",
        "summary": "One served model",
        "parameters": [{"name": "model", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "the model", "content": {"application/json": {
                "schema": MODEL_OBJECT}}},
            "401": OAI_UNAUTHORIZED,
            "404": _oai_error("not a model served here"),
        },
    }},
}
