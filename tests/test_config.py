"""Config resolution: flags > file > environment > defaults; invalid values name the setting."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path

import pytest

from shmmel.config import Config, resolve
from shmmel.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_matches_the_code_defaults():
    data = tomllib.loads((ROOT / "config" / "shmmel.toml").read_text())["shmmel"]
    defaults = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "sources"}
    assert data == defaults


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
