"""The library's exception types. The CLI maps them to exit codes; the HTTP app maps them
to statuses once, through :func:`http_status` (the ``http_status`` of each class), both for
answers and for errors reported in-band in a response already streaming."""

from __future__ import annotations

from http import HTTPStatus


class ShmmelError(Exception):
    """Base of every error shmmel raises on purpose."""

    http_status = 500


class ConfigError(ShmmelError):
    """A setting is invalid; the message names it."""


class InstanceError(ShmmelError):
    """An instance is running where it must not be, or missing where it must be."""


class BootError(ShmmelError):
    """A worker or the HTTP server could not start."""


class ServiceUnavailable(ShmmelError):
    """No capacity right now (no live worker, queue full, no free slot): HTTP 503."""

    http_status = 503
    retry_after = 1


class WorkerDied(ServiceUnavailable):
    """The worker holding a request died before answering."""


class WorkerStalled(ServiceUnavailable):
    """The worker holding a request stopped beating (stopped, stuck) before answering."""


class RequestTimeout(ShmmelError):
    """The worker did not answer within request_timeout: HTTP 504."""

    http_status = 504


class BadRequest(ShmmelError):
    """The input is wrong (bad audio, bad parameters, refused by the worker): HTTP 400."""

    http_status = 400


class BodyTooLarge(ShmmelError):
    """The request body (or the audio it holds) is over a limit: HTTP 413."""

    http_status = 413


class UnknownStream(ShmmelError):
    """404: no such stream (never opened, expired, or closed)."""

    http_status = 404


class StreamBusy(ShmmelError):
    """409: another request is using this stream right now."""

    http_status = 409


class StreamLost(ServiceUnavailable):
    """503: the worker holding the stream's state died; the stream cannot continue."""


CLIENT_STALLED = "the client stopped sending the request body"
# RFC 9110's names where Python < 3.13's http.HTTPStatus still has the old ones (falcon, which
# writes the error answers, uses these: in-band records must say the same)
_PHRASES = {413: "Content Too Large", 422: "Unprocessable Content"}


def http_status(exc: BaseException) -> tuple[int, str, str]:
    """(status code, status phrase, detail) for an error, the one mapping of the HTTP side.

    A read that timed out (``client_timeout``: SO_RCVTIMEO makes a blocking read fail with
    EAGAIN/ETIMEDOUT) is the client's stall, 408; anything not raised on purpose is a 500
    whose detail never leaks internals."""
    if isinstance(exc, (BlockingIOError, TimeoutError)):
        code, detail = 408, CLIENT_STALLED
    elif isinstance(exc, ShmmelError):
        code, detail = exc.http_status, str(exc)
    else:
        code, detail = 500, "unexpected error; see the service log"
    return code, _PHRASES.get(code) or HTTPStatus(code).phrase, detail
