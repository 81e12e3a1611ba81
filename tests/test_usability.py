"""What a new user trips on (issue 13): client errors, the CLI's messages, status of a dead
instance, tokens in the clients, a base install without [whisper], help, container and unit.

One shared daemon ("base"): auth_token set, and the [whisper] extra hidden from it (a
sitecustomize makes ``find_spec("ctranslate2")`` answer None), as after ``pip install .``.
What needs no process is tested in-process.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import tomllib
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest

from shmmel.osutil import pid_alive
from shmmel.shm import instance_names

from .conftest import ROOT, Daemon, run_cli, stop_daemon, wait_for
from .inproc import InProc

TOKEN = "tok-usability"
HIDE_WHISPER = ('import sys\nsys.modules["ctranslate2"] = None  # as if [whisper] were not '
                'installed\n')


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def _wav(path: Path, rate: int = 16000, channels: int = 1, seconds: float = 0.5) -> Path:
    n = int(rate * seconds)
    pcm = (np.sin(np.arange(n * channels) / 7.0) * 8000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_WHISPER)
    env = {**os.environ, "SHMMEL_AUTH_TOKEN": TOKEN, "SHMMEL_WHISPER_WORKERS": "1",
           "SHMMEL_LOG_FILE": str(tmp / "base.log"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH"))
                                         if p)}
    d = Daemon(f"u{uuid.uuid4().hex[:10]}", env, tmp / "base.log")
    try:
        d.up = run_cli("up", "--instance", d.instance, "--port", "0", "--workers", "1",  # type: ignore[attr-defined]
                       "--http-workers", "1", "--worker-kind", "cpu", env=env)
        d.port = d.status()["port"]
        d.all_pids()
        d.tmp = tmp  # type: ignore[attr-defined]
        d.config = tmp / "instance.toml"  # type: ignore[attr-defined]
        d.config.write_text(f'[shmmel]\ninstance = "{d.instance}"\n')  # type: ignore[attr-defined]
        yield d
    finally:
        stop_daemon(d)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# -- 1. a client-side error surfaces at once, as itself --------------------------------------

def test_missing_input_fails_at_once_in_the_client():
    from shmmel.client import MelClient

    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        MelClient("http://127.0.0.1:9").mel("/nonexistent/nosuch.wav")
    with pytest.raises(IsADirectoryError):
        MelClient("http://127.0.0.1:9").mel(ROOT / "tests")
    assert time.monotonic() - t0 < 2


def test_input_that_breaks_mid_upload_is_raised_not_a_timeout(monkeypatch):
    """The sender thread's error reaches the caller at once, even when the server says
    nothing (before the fix it was swallowed and the client waited for a 408)."""
    import shmmel.client as client

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()

    def pieces(audio, chunk_s):
        def gen():
            yield b"\0" * 3200
            raise OSError("disk read error")
        return "audio/L16;rate=16000", gen(), chunk_s

    monkeypatch.setattr(client, "_pieces", pieces)
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError, match="disk read error"):
            client.MelClient(f"http://127.0.0.1:{port}", timeout=30).mel(b"")
        assert time.monotonic() - t0 < 5
    finally:
        for s in held:
            s.close()
        srv.close()


def test_cli_mel_of_a_missing_file_is_one_line_at_once(base):
    t0 = time.monotonic()
    for what in ("nosuch.wav", str(base.tmp)):
        proc = run_cli("mel", what, "-o", str(base.tmp / "x.npy"), "--instance", base.instance,
                       env=base.env, check=False, timeout=20)
        assert proc.returncode == 1
        assert proc.stderr.startswith("[error] ") and proc.stderr.count("\n") == 1
        assert ("No such file" in proc.stderr) or ("Is a directory" in proc.stderr)
    assert time.monotonic() - t0 < 15


# -- 2. error text is printed as written ------------------------------------------------------

def test_error_prefix_and_brackets_survive(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("shmmel = 3\n")
    proc = run_cli("config", "show", "--config", str(bad), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"[error] config file {bad}: [shmmel] must be a table\n"


def test_render_prints_markup_literally(capsys):
    from shmmel_cli import render

    with pytest.raises(Exception):
        raise render.fail("pip install 'shmmel[bench]' [red]x[/red]")
    render.note("see [bold]this[/bold]")
    err = capsys.readouterr().err
    assert "[error] pip install 'shmmel[bench]' [red]x[/red]" in err
    assert "see [bold]this[/bold]" in err


# -- 3 and 8. a dead instance is shown dead; the next `up` says it cleaned up, once -----------

def test_dead_instance_status_and_one_cleanup_line(daemon_factory, tmp_path):
    d = daemon_factory("--worker-kind", "cpu", "--workers", "1", "--http-workers", "1",
                       extra_env={"SHMMEL_WHISPER_WORKERS": "0"})
    info = d.status()
    pids = d.all_pids() - {info["pid"]}
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(info["pid"]) and not any(pid_alive(p) for p in pids),
             timeout=10, what="the instance's processes exit")
    proc = run_cli("status", "--instance", d.instance, env=d.env, check=False)
    assert proc.returncode == 1
    assert (f"{d.instance} dead (stale shared memory; shmmel up or shmmel down clears it)"
            in proc.stdout)
    js = run_cli("status", "--instance", d.instance, "--json", env=d.env, check=False)
    assert js.returncode == 1 and json.loads(js.stdout)["state"] == "dead"
    proc = run_cli("mel", str(_wav(tmp_path / "a.wav")), "-o", str(tmp_path / "a.npy"),
                   "--instance", d.instance, env=d.env, check=False)
    assert proc.returncode == 1 and "is dead" in proc.stderr

    up = run_cli("up", "--instance", d.instance, "--port", "0", "--worker-kind", "cpu",
                 "--workers", "1", "--http-workers", "1", env=d.env)
    d.all_pids()
    both = up.stdout + up.stderr
    assert both.count("cleared stale shared memory") == 1
    assert re.search(r"\(a previous run died\): \d+ entries", up.stderr)
    assert f"shmmel.{d.instance}." not in both  # a count, not the list of names
    # 9. `down` (like status, mel and the benches) takes --config naming the instance
    cfg = tmp_path / "i.toml"
    cfg.write_text(f'[shmmel]\ninstance = "{d.instance}"\n')
    run_cli("down", "--config", str(cfg), env=d.env)
    assert instance_names(d.instance) == []


# -- 4, 12. tokens in the clients and benches; bench progress when piped ---------------------

def test_cli_mel_takes_the_token_from_env_flag_or_config(base, tmp_path):
    wav = _wav(tmp_path / "t.wav")
    out = tmp_path / "t.npy"
    run_cli("mel", str(wav), "-o", str(out), "--instance", base.instance, env=base.env)
    ref = np.load(out)
    no_token = _without(base.env, "SHMMEL_AUTH_TOKEN")
    proc = run_cli("mel", str(wav), "-o", str(out), "--instance", base.instance,
                   env=no_token, check=False)
    assert proc.returncode == 1 and "HTTP 401" in proc.stderr
    run_cli("mel", str(wav), "-o", str(out), "--instance", base.instance, "--token", TOKEN,
            env=no_token)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[shmmel]\ninstance = "{base.instance}"\nauth_token = "{TOKEN}"\n')
    run_cli("mel", str(wav), "-o", str(out), "--config", str(cfg), env=no_token)
    assert np.array_equal(np.load(out), ref) and ref.shape[0] == 80


def test_mel_client_sends_the_token(base, monkeypatch):
    from shmmel.client import ClientError, MelClient

    url = f"http://127.0.0.1:{base.port}"
    audio = np.zeros(8000, np.int16)
    assert MelClient(url, token=TOKEN).mel(audio).shape == (80, 50)
    monkeypatch.setenv("SHMMEL_AUTH_TOKEN", TOKEN)
    assert MelClient(url).mel(audio).shape == (80, 50)
    with pytest.raises(ClientError) as e:
        MelClient(url, token="").mel(audio)
    assert e.value.status == 401


def test_bench_uses_the_token_shows_progress_when_piped_and_marks_n_a(base):
    proc = run_cli("bench", "text", "--config", str(base.config), "-c", "2", "-d", "5",
                   "--warmup", "0.2", "--procs", "1", env=base.env, timeout=60)
    assert "no errors" in proc.stdout and "HTTP 401" not in proc.stdout
    assert re.search(r"shmmel +\d", proc.stderr), proc.stderr  # a progress line, not a tty
    row = next(line for line in proc.stdout.splitlines() if "concurrent clients" in line)
    assert "n/a" in row and "missed" not in row


def test_bench_of_mostly_errors_reports_no_throughput(base):
    proc = run_cli("bench", "text", "--instance", base.instance, "-c", "1", "-d", "1",
                   "--warmup", "0", "--procs", "1",
                   env=_without(base.env, "SHMMEL_AUTH_TOKEN"), check=False, timeout=60)
    assert proc.returncode == 1
    assert "req/s" not in proc.stdout
    assert "answers were errors" in proc.stderr and "HTTP 401" in proc.stderr


def test_mostly_errors_rule():
    from shmmel_cli.bench import _mostly_errors

    assert _mostly_errors({}, 100) is None
    assert _mostly_errors({"HTTP 503": 10}, 100) is None
    assert "--token" in _mostly_errors({"HTTP 401": 60}, 100)
    assert _mostly_errors({"connect": 5}, 0) is not None


def test_targets_that_do_not_apply_are_n_a():
    from shmmel.loadgen import report

    r = {"latency_ms": {"p50": 1, "p95": 2, "p99": 3}, "throughput": {"mean": 10.0},
         "load": {"mode": "closed", "connections": 20}, "error_count": 0}
    check = next(c for c in report.text_checks(r, None) if c.figure == "concurrent clients")
    assert check.met is None
    r["load"]["connections"] = 100
    check = next(c for c in report.text_checks(r, None) if c.figure == "concurrent clients")
    assert check.met is True


def test_piped_progress_lines(monkeypatch):
    from rich.console import Console

    from shmmel.loadgen import runner

    monkeypatch.setattr(runner, "PIPED_EVERY", 0.5)

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False, width=200)
    t0 = time.monotonic()

    def work(i, progress):
        time.sleep(runner.PIPED_EVERY + 0.6)
        return {"i": i}

    assert runner.run_processes(work, 1, label="x", t0=t0, warmup=0, duration=1,
                                console=con) == [{"i": 0}]
    assert re.search(r"x +[\d.]+/1 s", buf.getvalue())


# -- 5. one line, not a traceback -------------------------------------------------------------

def test_bench_against_a_closed_port_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("bench", "text", "--url", f"http://127.0.0.1:{port}", "-d", "1",
                   check=False, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("[error] cannot reach")


def test_mel_to_an_unwritable_path_fails_before_the_work(base, tmp_path):
    served = sum(w["served"] for w in base.status()["workers"])
    proc = run_cli("mel", str(_wav(tmp_path / "a.wav")), "-o", "/nonexistent/dir/x.npy",
                   "--instance", base.instance, env=base.env, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "[error] output directory /nonexistent/dir does not exist\n"
    assert sum(w["served"] for w in base.status()["workers"]) == served


# -- 6, 7, 9. status of a base install: whisper off, 80 columns, --config --------------------

def test_base_install_shows_whisper_off(base):
    # `shmmel up` lists no pid 0 and says why there is no transcription
    workers = re.search(r"workers ([\d, ]+)", base.up.stdout).group(1)
    assert "0" not in [p.strip() for p in workers.split(",")]
    assert "whisper workers off (ctranslate2 is not installed; install it with: pip install " \
           "'shmmel[whisper]')" in base.up.stderr
    info = base.status()
    w = [x for x in info["workers"] if x["kind"] == "whisper"]
    assert w and all(x["state"] == "off" and x["heartbeat_age_s"] is None for x in w)
    assert "pip install 'shmmel[whisper]'" in w[0]["reason"]
    text = run_cli("status", "--config", str(base.config), env=base.env).stdout
    row = next(line for line in text.splitlines() if "whisper" in line and "│" in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[1:5] == ["-", "whisper", "off", "-"]  # pid, kind, state, beat
    assert "whisper workers off:\n  ctranslate2 is not installed; install it with: pip " \
           "install 'shmmel[whisper]'" in text


def test_status_fits_80_columns_and_never_wraps_when_piped(base):
    env = _without(base.env, "COLUMNS")
    text = run_cli("status", "--instance", base.instance, env=env).stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    for head in ("pid", "kind", "state", "beat", "served", "err", "queue"):
        assert f" {head} " in text
    wide = run_cli("status", "--instance", base.instance, "--wide",
                   env={**env, "COLUMNS": "60"}).stdout
    for head in ("gen", "streams", "restarts", "busy s"):
        assert f" {head} " in wide
    table = wide[wide.index("┏"):wide.index("┘") + 1].splitlines()
    assert len({len(r) for r in table}) == 1  # one width: no cell was wrapped
    assert len(table) == 4 + len(base.status()["workers"])  # a line a row
    assert "…" not in wide


# -- 10. consistent errors --------------------------------------------------------------------

def test_error_field_is_the_status_phrase_and_types_are_listed(tmp_path):
    base = InProc(auth_token=TOKEN)  # the app's answers: in-process, with the token set
    with base:
        _error_fields_and_types(base, tmp_path)


def _error_fields_and_types(base: InProc, tmp_path: Path) -> None:
    s, _, body = base.request("GET", "/process", headers=_auth())
    assert s == 405 and json.loads(body)["error"] == "Method Not Allowed"
    s, _, body = base.request("POST", "/process", "x", {**_auth(), "Content-Type": "text/plain"})
    e = json.loads(body)
    assert s == 415 and e["error"] == "Unsupported Media Type" and "application/json" in e["detail"]
    s, _, body = base.request("POST", "/audio/stream", b"\0" * 64,
                              {**_auth(), "Content-Type": "text/plain"})
    e = json.loads(body)
    assert s == 415 and e["error"] == "Unsupported Media Type"
    for accepted in ("audio/wav", "audio/L16;rate=16000", "application/octet-stream",
                     "audio/x-f32le;rate=16000"):
        assert accepted in e["detail"]
    details = set()
    for n in ("64", "100", "abc"):
        s, _, body = base.request("POST", f"/audio/stream?n_mels={n}", b"\0" * 3200,
                                  {**_auth(), "Content-Type": "audio/L16;rate=16000"})
        assert s == 400 and json.loads(body)["error"] == "Bad Request"
        details.add(json.loads(body)["detail"])
    assert details == {"n_mels must be 80 or 128"}
    wav = _wav(tmp_path / "st.wav", rate=44100, channels=2).read_bytes()
    s, _, body = base.request("POST", "/audio/stream", wav, {**_auth(),
                                                             "Content-Type": "audio/wav"})
    detail = json.loads(body)["detail"]
    assert s == 400 and "2 channels" in detail and "44100 Hz" in detail


def test_wav_and_media_problems_are_named_together(tmp_path):
    from shmmel.audio_io import UnsupportedMedia, parse_media
    from shmmel.mel import load_wav

    with pytest.raises(ValueError, match="2 channels.*44100 Hz"):
        load_wav(_wav(tmp_path / "a.wav", rate=44100, channels=2))
    with pytest.raises(UnsupportedMedia, match="sample rate 8000.*2 channels"):
        parse_media("audio/L16;rate=8000;channels=2")
    with pytest.raises(UnsupportedMedia, match="audio/wav"):
        parse_media("text/plain")
    assert load_wav(_wav(tmp_path / "m.wav")).dtype == np.int16


def test_range_errors_name_their_source(tmp_path):
    from shmmel.config import resolve
    from shmmel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"workers=0 \(from environment SHMMEL_WORKERS\)"):
        resolve({}, None, {"SHMMEL_WORKERS": "0"})
    f = tmp_path / "c.toml"
    f.write_text("[shmmel]\nport = 70000\n")
    with pytest.raises(ConfigError, match=rf"port=70000 \(from file {re.escape(str(f))}\)"):
        resolve({}, f, {})
    with pytest.raises(ConfigError, match=r"slots=1 \(from command line\)"):
        resolve({"slots": 1}, None, {})


# -- 11. --help and --version ----------------------------------------------------------------

def test_help_has_no_bool_placeholders_and_describes_every_option():
    import click
    import typer.main

    from shmmel_cli.main import app

    root = typer.main.get_command(app)
    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.help:
                missing.append(f"{path} {p.opts[0]}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(root, "shmmel")
    assert missing == []
    for args in (["mel"], ["config", "show"], ["bench", "audio"], ["status"]):
        text = run_cli(*args, "--help").stdout
        assert "<bool>" not in text and "--help" in text


def test_version_and_readme_lists_every_signal():
    from importlib.metadata import version

    from shmmel.loadgen import signals

    assert run_cli("--version").stdout.strip() == f"shmmel {version('shmmel')}"
    readme = (ROOT / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "shmmel gen-audio" in x)
    assert all(k in line for k in signals.KINDS)


# -- 13. container and unit -------------------------------------------------------------------

def test_dockerfile_checks_the_configured_port_and_stops_gracefully():
    text = (ROOT / "Dockerfile").read_text()
    health = text[text.index("HEALTHCHECK"):].split("\n\n")[0]
    assert "8000" not in health and '"status", "--ready"' in health
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r"^ARG EXTRAS=.*whisper", text, re.M) and "${EXTRAS}" in text
    default = tomllib.loads((ROOT / "config" / "shmmel.toml").read_text())["shmmel"]
    readme = (ROOT / "README.md").read_text()
    for doc in (text, readme):
        stop = re.search(r"docker run .*--stop-timeout (\d+)", doc)
        assert stop and int(stop.group(1)) > default["shutdown_timeout"] + 5


def test_status_ready_is_the_health_check(base):
    proc = run_cli("status", "--ready", "--instance", base.instance, env=base.env)
    assert f":{base.port}/readyz answered 200" in proc.stdout
    proc = run_cli("status", "--ready", "--instance", "nosuch-x", env=base.env, check=False)
    assert proc.returncode == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies_when_installed_as_the_readme_says(tmp_path):
    unit = (ROOT / "systemd" / "shmmel.service").read_text()
    readme = (ROOT / "README.md").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) up --foreground --config (\S+)$", unit, re.M)
    assert exec_start
    binary, conf = exec_start.groups()
    home = binary.removesuffix("/.venv/bin/shmmel")
    assert f"git clone <this repo> {home}" in readme and "python3 -m venv .venv" in readme
    assert f"install -Dm644 config/shmmel.toml {conf}" in readme
    assert re.search(rf"useradd --system .*{re.escape(home)} shmmel", readme)
    # installed: the venv's shmmel where the unit expects it (here, this test's venv)
    here = shutil.which("shmmel") or str(Path(os.sys.executable).parent / "shmmel")
    (tmp_path / "shmmel.service").write_text(unit.replace(binary, here))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "shmmel.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- 14. the README's Python example runs -----------------------------------------------------

def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Python\n", 1)[1]  # the library example, not the OpenAI one
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "audio = " in block.split("log_mel_spectrogram(audio")[0]  # defined before use
    shutil.copy(ROOT / "tests" / "fixtures" / "speech1.wav", tmp_path / "speech.wav")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["spec"].shape[0] == 80 and scope["windows"].shape[1:] == (80, 3000)
    assert np.array_equal(scope["spec"], scope["mel"].log_mel_spectrogram(scope["audio"]))
