"""One frozen Config, resolved once and passed down.

Precedence, highest first: command-line flags > config file (TOML) > environment
(``SHMMEL_<NAME>``) > built-in defaults. Only :func:`resolve` reads the environment; the
supervisor, the workers and the HTTP app receive the resulting :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .devices import parse_devices
from .errors import ConfigError

WorkerKind = Literal["auto", "cpu", "cuda"]
WhisperDevice = Literal["cpu", "cuda"]
CudaSync = Literal["auto", "spin", "yield", "blocking"]
INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
ENV_PREFIX = "SHMMEL_"
MAX_MESSAGE_BYTES = 4096  # the /process contract: 4 KiB of UTF-8, counted in bytes
SPARE_CORES_MIN = 4  # a host with fewer cores has none to spare for the HTTP processes


CGROUP_ROOT = Path("/sys/fs/cgroup")  # where host_cores looks for a CPU quota (tests move it)


def _cgroup_quota_cores(root: Path) -> int:
    """The CPU quota of this process's cgroup, in whole cores (rounded up): cgroup v2
    ``cpu.max`` ("200000 100000": 2 cores; "max": none), else cgroup v1
    ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (-1: none). 0 where no quota is set
    or the files are missing, unreadable or garbage."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError, UnicodeError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except (OSError, UnicodeError):
            return 0
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max" or garbage: no quota
        return 0
    return -(-q // p) if q > 0 and p > 0 else 0


def host_cores() -> int:
    """CPUs this process may use: its affinity mask (a container's cpuset or taskset's share
    of the host, else ``os.cpu_count()``), at most its cgroup's CPU quota rounded up
    (``docker run --cpus=2`` on a 64-core host: 2, though all 64 are in the mask)."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores(CGROUP_ROOT)
    return min(cores, quota) if quota else cores


def default_switch_interval_us(cores: int | None = None) -> int:
    """``http_switch_interval_us`` when not set: 200 µs on a host of SPARE_CORES_MIN cores or
    more, 0 (Python's 5 ms) on a smaller one.

    A thread waiting for the GIL wakes every switch interval to ask the holder to let go,
    and the holder then sleeps until a waiter has taken it: with many pool threads in
    requests at once (each awaits its reply mid-request), a short interval means many more
    wake-ups and context switches. On a host with cores to spare they run beside the
    process, and 200 µs cut the p99 at c100 by a quarter to a third on the 16-core host for
    5-13 % of throughput; on 2 cores they take the CPU the HTTP processes, the workers and
    the clients need: /process at c32 lost about a third of its throughput (futex calls per request
    ~7 -> ~17, HTTP-side CPU per request +25 %; docs/PERFORMANCE.md, issue 12)."""
    return 200 if (host_cores() if cores is None else cores) >= SPARE_CORES_MIN else 0


@dataclass(frozen=True)
class Config:
    instance: str = "default"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    devices: str = "all"          # CUDA ordinals the mel workers use: "all" or e.g. "0,1"
    workers_per_device: int = 0   # > 0: that many mel workers on each device (sets workers)
    fake_devices: int = 0         # test hook: CPU workers stand in for this many devices
    http_workers: int = 2
    http_threads: int = 16
    worker_kind: WorkerKind = "auto"
    cuda_sync: CudaSync = "auto"      # how a CUDA worker's thread waits for the GPU (devices.set_cuda_sync)
    slots: int = 128
    slot_bytes: int = 128 * 1024
    queue_depth: int = 64
    max_streams: int = 1024
    request_timeout: float = 30.0
    client_timeout: float = 30.0
    stream_idle_timeout: float = 60.0
    worker_spin_us: int = 50         # doorbell poll after a batch, on spare-core hosts only
    heartbeat_interval: float = 0.2
    heartbeat_timeout: float = 30.0
    stall_timeout: float = 1.0        # no heartbeat for this long: no new work, queued work 503/re-routed
    respawn_backoff_max: float = 30.0  # cap of the exponential respawn delay of a crash-looping worker
    header_timeout: float = 10.0      # a request's headers must arrive whole within this
    min_body_rate: int = 1024         # bytes/s a Content-Length body must keep up (0: off)
    http_boot_wait: float = 10.0      # an HTTP process accepts once all http_workers booted, or after this (0: at once)
    http_accept_slack: int = 2        # leave a new connection to a sibling holding this many fewer (0: off)
    http_linger_ms: float = 1.0       # a pool thread waits this long for a kept-alive connection's next request (0: off)
    # the HTTP processes' GIL switch interval (sys.setswitchinterval; 0: Python's 5 ms); by
    # default 200 µs with 4 or more cores, 0 on fewer (default_switch_interval_us)
    http_switch_interval_us: int = field(default_factory=default_switch_interval_us)
    malloc_keep_mb: int = 128         # freed C heap each process keeps for reuse (0: the C library's default; see osutil.keep_freed_memory)
    boot_timeout: float = 60.0
    shutdown_timeout: float = 10.0
    prefix: str = "shmmel: "
    max_body_bytes: int = 64 * 1024 * 1024
    auth_token: str = ""
    log_file: str = ""
    log_level: str = "info"
    whisper_workers: int = 1
    whisper_device: WhisperDevice = "cpu"
    whisper_threads: int = 0
    whisper_batch_wait_ms: float = 10.0
    whisper_max_batch: int = 8
    # Where each value came from ("default", "env", "file:<path>", "flag"); not part of equality.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("sources", "auth_token")}
        return f"Config({shown}, auth_token={'***' if self.auth_token else ''!r})"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def device_list(self) -> tuple[int, ...] | None:
        """The CUDA ordinals of ``devices``, or None for "all"."""
        return parse_devices(self.devices)

    @property
    def worker_rows(self) -> int:
        """Rows of the worker table: ``workers`` mel workers, then ``whisper_workers``."""
        return self.workers + self.whisper_workers

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}
        data["sources"] = dict(self.sources)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        return cls(**data)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_SETTINGS = {f.name: f for f in fields(Config) if f.name != "sources"}


def describe_source(name: str, source: str) -> str:
    """Where a value came from, in words: "command line", "environment SHMMEL_PORT", ..."""
    if source == "flag":
        return "command line"
    if source == "env":
        return f"environment {ENV_PREFIX}{name.upper()}"
    if source.startswith("file:"):
        return f"file {source[5:]}"
    return source


def _validate(c: Config) -> None:
    def need(cond: bool, name: str, what: str) -> None:
        if not cond:
            origin = describe_source(name, c.sources.get(name, "default"))
            raise ConfigError(f"invalid setting {name}={getattr(c, name)!r} (from {origin}): "
                              f"{what}")

    need(bool(INSTANCE_RE.match(c.instance)), "instance", "use 1-40 of A-Z a-z 0-9 _ -")
    need(0 <= c.port <= 65535, "port", "must be 0..65535")
    need(1 <= c.workers <= 256, "workers", "must be 1..256")
    try:
        listed = parse_devices(c.devices)
    except ValueError as exc:
        need(False, "devices", str(exc))
    need(0 <= c.workers_per_device <= 64, "workers_per_device", "must be 0..64 (0: use workers)")
    need(listed is None or len(listed) * c.workers_per_device + c.whisper_workers <= 256,
         "workers_per_device", "devices x workers_per_device + whisper_workers must be at "
         "most 256")
    need(0 <= c.fake_devices <= 64, "fake_devices", "must be 0..64 (a test hook; 0: off)")
    need(1 <= c.http_workers <= 256, "http_workers", "must be 1..256")
    need(1 <= c.http_threads <= 1024, "http_threads", "must be 1..1024")
    need(c.worker_kind in ("auto", "cpu", "cuda"), "worker_kind", "must be auto, cpu or cuda")
    need(c.cuda_sync in ("auto", "spin", "yield", "blocking"), "cuda_sync",
         "must be auto, spin, yield or blocking")
    need(2 <= c.slots <= 65536, "slots", "must be 2..65536")
    need(16 * 1024 <= c.slot_bytes <= 64 * 1024 * 1024 and c.slot_bytes % 4096 == 0,
         "slot_bytes", "must be a multiple of 4096 between 16 KiB and 64 MiB")
    need(1 <= c.queue_depth <= 65536, "queue_depth", "must be 1..65536")
    need(1 <= c.max_streams <= 65536, "max_streams", "must be 1..65536")
    for name in ("request_timeout", "client_timeout", "stream_idle_timeout", "heartbeat_timeout", "boot_timeout",
                 "shutdown_timeout"):
        need(getattr(c, name) > 0, name, "must be > 0 seconds")
    need(0 <= c.worker_spin_us <= 100_000, "worker_spin_us", "must be 0..100000")
    need(0.01 <= c.heartbeat_interval <= 5, "heartbeat_interval", "must be 0.01..5 seconds")
    need(c.heartbeat_timeout > 2 * c.heartbeat_interval, "heartbeat_timeout",
         "must exceed twice heartbeat_interval")
    need(c.stall_timeout > 2 * c.heartbeat_interval, "stall_timeout",
         "must exceed twice heartbeat_interval")  # used as min(stall, heartbeat_timeout)
    need(0 <= c.respawn_backoff_max <= 3600, "respawn_backoff_max", "must be 0..3600 seconds")
    need(0 < c.header_timeout <= 3600, "header_timeout", "must be 0..3600 seconds (not 0)")
    need(0 <= c.min_body_rate <= 1 << 30, "min_body_rate", "must be 0..2^30 bytes/s")
    need(0 <= c.http_boot_wait <= 600, "http_boot_wait", "must be 0..600 seconds (0: off)")
    need(0 <= c.http_accept_slack <= 100_000, "http_accept_slack", "must be 0..100000 (0: off)")
    need(0 <= c.http_linger_ms <= 50, "http_linger_ms",
         "must be 0..50 ms (0: off); queued requests of the process wait up to this long")
    need(c.http_switch_interval_us == 0 or 50 <= c.http_switch_interval_us <= 100_000,
         "http_switch_interval_us", "must be 0 (Python's default) or 50..100000")
    need(0 <= c.malloc_keep_mb <= 2047, "malloc_keep_mb", "must be 0..2047 MiB (0: off)")
    need(len(c.prefix.encode("utf-8", "surrogatepass")) <= 256, "prefix", "at most 256 bytes")
    need(c.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
    need(0 <= c.whisper_workers <= 64, "whisper_workers", "must be 0..64")
    need(c.workers + c.whisper_workers <= 256, "whisper_workers",
         "workers + whisper_workers must be at most 256")
    need(c.whisper_device in ("cpu", "cuda"), "whisper_device", "must be cpu or cuda")
    need(0 <= c.whisper_threads <= 256, "whisper_threads", "must be 0..256")
    need(0 <= c.whisper_batch_wait_ms <= 10_000, "whisper_batch_wait_ms", "must be 0..10000")
    need(1 <= c.whisper_max_batch <= 64, "whisper_max_batch", "must be 1..64")
    need(c.log_level in ("debug", "info", "warning", "error"), "log_level",
         "must be debug, info, warning or error")


def _coerce(name: str, value: Any, origin: str) -> Any:
    f = _SETTINGS.get(name)
    if f is None:
        raise ConfigError(f"unknown setting {name!r} (from {origin})")
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if name == "devices" and isinstance(value, (list, tuple)):  # TOML: devices = [0, 1]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"invalid setting devices={value!r} (from {origin}): expected "
                              "a list of CUDA device ordinals")
        return ",".join(str(v) for v in value)
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid setting {name}={value!r} (from {origin}): expected {kind}") from None


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    # Accept both a flat file and one with a [shmmel] table.
    section = data.get("shmmel", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {p}: [shmmel] must be a table")
    return section


def resolve(
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config: flags (None values ignored) > file > environment > defaults.

    ``config_file`` falls back to ``SHMMEL_CONFIG`` from the environment.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in _SETTINGS}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name in _SETTINGS:
            values[name] = _coerce(name, raw, f"environment {key}")
            sources[name] = "env"
    path = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    if path:
        for name, raw in load_file(path).items():
            values[name] = _coerce(name, raw, f"file {path}")
            sources[name] = f"file:{path}"
    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        values[name] = _coerce(name, raw, "command line")
        sources[name] = "flag"
    return Config(**values, sources=sources)
