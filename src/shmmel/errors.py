"""The library's exception types. The CLI maps them to exit codes, the HTTP app to statuses."""

from __future__ import annotations


class ShmmelError(Exception):
    """Base of every error shmmel raises on purpose."""


class ConfigError(ShmmelError):
    """A setting is invalid; the message names it."""


class InstanceError(ShmmelError):
    """An instance is running where it must not be, or missing where it must be."""


class BootError(ShmmelError):
    """A worker or the HTTP server could not start."""


class ServiceUnavailable(ShmmelError):
    """No capacity right now (no live worker, queue full, no free slot): HTTP 503."""

    retry_after = 1


class WorkerDied(ServiceUnavailable):
    """The worker holding a request died before answering."""


class WorkerStalled(ServiceUnavailable):
    """The worker holding a request stopped beating (stopped, stuck) before answering."""


class RequestTimeout(ShmmelError):
    """The worker did not answer within request_timeout: HTTP 504."""


class BadRequest(ShmmelError):
    """The worker rejected the input (bad audio and the like): HTTP 400."""
