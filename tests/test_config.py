"""Config resolution: flags > file > environment > defaults; invalid values name the setting."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shmmel.config import Config, resolve
from shmmel.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_matches_the_code_defaults():
    text = (ROOT / "config" / "shmmel.toml").read_text()
    data = tomllib.loads(text)["shmmel"]
    fields = [f for f in dataclasses.fields(Config) if f.name != "sources"]
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    assert data == defaults
    # a default that depends on the host is listed commented out: set, it would be pinned
    for f in fields:
        if f.default is dataclasses.MISSING:
            assert re.search(rf"^# {f.name} = ", text, re.MULTILINE), f.name


def test_precedence_flags_over_file_over_env(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[shmmel]\nport = 9001\nworkers = 3\n')
    env = {"SHMMEL_PORT": "9002", "SHMMEL_WORKERS": "5", "SHMMEL_HTTP_WORKERS": "7"}
    c = resolve({"port": 9000, "host": None}, f, env)
    assert (c.port, c.workers, c.http_workers, c.host) == (9000, 3, 7, "127.0.0.1")
    assert c.sources["port"] == "flag"
    assert c.sources["workers"] == f"file:{f}"
    assert c.sources["http_workers"] == "env"
    assert c.sources["host"] == "default"


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("instance = 'flat'\n")  # a flat file works too
    assert resolve({}, None, {"SHMMEL_CONFIG": str(f)}).instance == "flat"


@pytest.mark.parametrize("flags, name", [
    ({"workers": 0}, "workers"),
    ({"port": 70000}, "port"),
    ({"instance": "a.b"}, "instance"),
    ({"worker_kind": "tpu"}, "worker_kind"),
    ({"cuda_sync": "sleep"}, "cuda_sync"),
    ({"slot_bytes": 5000}, "slot_bytes"),
    ({"request_timeout": 0}, "request_timeout"),
])
def test_invalid_values_name_the_setting(flags, name):
    with pytest.raises(ConfigError, match=name):
        resolve(flags, None, {})


def test_bad_types_and_unknown_settings_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="SHMMEL_PORT"):
        resolve({}, None, {"SHMMEL_PORT": "eighty"})
    f = tmp_path / "c.toml"
    f.write_text("[shmmel]\nwrokers = 2\n")
    with pytest.raises(ConfigError, match="unknown setting 'wrokers'"):
        resolve({}, f, {})
    with pytest.raises(ConfigError, match="not found"):
        resolve({}, tmp_path / "missing.toml", {})


def test_config_round_trips_through_json():
    c = resolve({"port": 1234, "prefix": "» "}, None, {})
    assert Config.from_json(c.to_json()) == c


def test_http_switch_interval_default_depends_on_the_host_cores(monkeypatch):
    """200 µs where the host has cores to spare, Python's 5 ms (0) on a small host, where
    the GIL waiters' wake-ups take the CPU the request path needs; a set value is kept."""
    from shmmel import config as config_module

    monkeypatch.setattr(config_module, "CGROUP_ROOT", Path("/nonexistent-cgroup"))
    assert config_module.host_cores() == len(os.sched_getaffinity(0))
    assert config_module.default_switch_interval_us(2) == 0
    assert config_module.default_switch_interval_us(config_module.SPARE_CORES_MIN - 1) == 0
    assert config_module.default_switch_interval_us(config_module.SPARE_CORES_MIN) == 200
    monkeypatch.setattr(config_module, "host_cores", lambda: 16)
    assert Config().http_switch_interval_us == 200
    assert resolve({}, None, {}).http_switch_interval_us == 200
    monkeypatch.setattr(config_module, "host_cores", lambda: 2)
    assert Config().http_switch_interval_us == 0
    c = resolve({}, None, {})
    assert c.http_switch_interval_us == 0 and c.sources["http_switch_interval_us"] == "default"
    assert Config.from_json(Config(http_switch_interval_us=200).to_json()).http_switch_interval_us == 200
    c = resolve({}, None, {"SHMMEL_HTTP_SWITCH_INTERVAL_US": "200"})
    assert c.http_switch_interval_us == 200 and c.sources["http_switch_interval_us"] == "env"


def test_host_cores_counts_the_cgroup_cpu_quota(monkeypatch, tmp_path):
    """A container limited by CPU quota (``docker run --cpus=2`` on a many-core host) has the
    quota's cores, rounded up, not the affinity mask's; no quota ("max", -1), missing or
    garbage files leave the affinity count."""
    from shmmel import config as config_module

    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(config_module, "CGROUP_ROOT", tmp_path)
    assert config_module.host_cores() == 64  # no files: no quota
    v2 = tmp_path / "cpu.max"
    for text, cores in [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000", 1),
                        ("max 100000\n", 64), ("garbage\n", 64), ("x y\n", 64), ("", 64),
                        ("-1 100000", 64), ("100000 0", 64), ("12800000 100000", 64)]:
        v2.write_text(text)
        assert config_module.host_cores() == cores, text
    v2.write_bytes(b"\xff\xfe 1")
    assert config_module.host_cores() == 64
    v2.write_text("200000 100000\n")
    assert config_module.Config().http_switch_interval_us == 0  # 2 cores: nothing to spare
    v2.unlink()
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    for text, cores in [("300000\n", 3), ("-1\n", 64), ("garbage", 64), ("", 64)]:
        (v1 / "cpu.cfs_quota_us").write_text(text)
        assert config_module.host_cores() == cores, text
    (v1 / "cpu.cfs_period_us").unlink()  # a quota without its period: ignored
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert config_module.host_cores() == 64
    v2.mkdir()  # unreadable (a directory): ignored, the v1 files are looked at
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert config_module.host_cores() == 3


def test_http_switch_interval_is_validated_and_applied_by_the_http_process():
    from shmmel.httpworker import set_switch_interval

    with pytest.raises(ConfigError, match="http_switch_interval_us"):
        Config(http_switch_interval_us=10)
    before = sys.getswitchinterval()
    try:
        set_switch_interval(Config(http_switch_interval_us=300))
        assert sys.getswitchinterval() == pytest.approx(300e-6)
        set_switch_interval(Config(http_switch_interval_us=0))  # 0: left as it is
        assert sys.getswitchinterval() == pytest.approx(300e-6)
    finally:
        sys.setswitchinterval(before)


MALLOC_PROBE = """
import ctypes, sys
from shmmel.osutil import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory(int(sys.argv[1]))
before = libc.mallinfo2().hblkhd
buf = bytearray(4 << 20)
mapped = libc.mallinfo2().hblkhd - before
held = libc.mallinfo2().arena
del buf
print(int(applied), mapped, held - libc.mallinfo2().arena)
"""


@pytest.mark.parametrize("mb, env, applied", [(128, {}, True), (0, {}, False),
                                              (128, {"MALLOC_MMAP_THRESHOLD_": "131072"}, False)])
def test_keep_freed_memory_serves_large_buffers_from_the_heap(mb, env, applied):
    """malloc_keep_mb: a 4 MiB buffer comes from the heap, not from a fresh mapping, and
    the heap keeps it once freed (not trimmed back: the arena does not shrink) for the next
    one, once applied; 0, or the operator's MALLOC_ variables, leave glibc's default (a
    mapping: mallinfo2's hblkhd grows by the buffer)."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("needs glibc 2.33 or newer (mallinfo2)")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, str(mb)], capture_output=True,
                         text=True, env={**environ, **env}, timeout=60, check=True).stdout
    got, mapped, trimmed = map(int, out.split())
    assert bool(got) is applied
    assert (mapped == 0) if applied else (mapped >= 4 << 20), out
    assert trimmed == 0, out  # applied: kept on the heap; else it was a mapping, unmapped


def test_malloc_keep_mb_is_checked():
    assert resolve({"malloc_keep_mb": 0}, None, {}).malloc_keep_mb == 0
    with pytest.raises(ConfigError, match="malloc_keep_mb"):
        resolve({"malloc_keep_mb": 4096}, None, {})
