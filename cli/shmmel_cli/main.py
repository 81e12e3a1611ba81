"""The `shmmel` command: thin typer commands over the library, rendered with rich.

Each command builds the config, calls one library function, and renders the result. Library
errors (ShmmelError) become one `[error] ...` line on stderr and exit code 1. The consoles
never read markup: a message's brackets (`[shmmel]`, `'shmmel[whisper]'`) print as written.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from shmmel import config as cfg
from shmmel import control
from shmmel.errors import ShmmelError

from .bench import bench_app, gen_audio
from .render import check_output, err, fail, note, out, status_table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="shmmel: Whisper log-mel spectrograms over HTTP, on the GPU.")
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.command("gen-audio")(gen_audio)

Instance = Annotated[Optional[str], typer.Option("--instance", "-i", help="Instance name.")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML config file (default: SHMMEL_CONFIG).")]
Token = Annotated[Optional[str], typer.Option(
    help="Bearer token of an instance with auth_token set (default: auth_token from "
         "--config or SHMMEL_AUTH_TOKEN; a flag is visible to other local users).")]


def resolve(config_file: Path | None = None, **flags: Any) -> cfg.Config:
    try:
        return cfg.resolve(flags, config_file)
    except ShmmelError as exc:
        raise fail(exc) from None


def _version(value: bool) -> None:
    if value:
        try:
            v = version("shmmel")
        except PackageNotFoundError:
            v = "unknown"
        out.print(f"shmmel {v}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """shmmel: Whisper log-mel spectrograms over HTTP, on the GPU."""


@app.command()
def up(
    host: Annotated[Optional[str], typer.Option(help="Address to bind.")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (0 picks a free one).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-w", help="Compute workers.")] = None,
    http_workers: Annotated[Optional[int], typer.Option(help="gunicorn worker processes.")] = None,
    worker_kind: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    instance: Instance = None,
    config: ConfigFile = None,
    foreground: Annotated[bool, typer.Option("--foreground", "-f",
                                             help="Stay attached (systemd, containers).")] = False,
) -> None:
    """Start an instance: shared memory, workers, HTTP server."""
    c = resolve(config, host=host, port=port, workers=workers, http_workers=http_workers,
                worker_kind=worker_kind, instance=instance)
    off = control.whisper_off_reason(c)
    try:
        if foreground:
            control.setup_logging(c.log_level)
            raise typer.Exit(control.run_foreground(c))
        started = control.start(c)
    except ShmmelError as exc:
        raise fail(exc) from None
    if started.cleared:
        note(control.cleared_message(c.instance, started.cleared))
    out.print(f"shmmel {c.instance} up at {started.url}  supervisor pid {started.pid}, "
              f"gunicorn pid {started.gunicorn_pid}, workers "
              f"{', '.join(map(str, started.workers))}\nlog: {started.log_file}")
    if off:
        note(f"whisper workers off ({off}): /audio/transcribe answers 501")


@app.command()
def down(
    instance: Instance = None,
    config: ConfigFile = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a graceful stop.")] = 30.0,
) -> None:
    """Stop an instance gracefully: finish in-flight requests, reap, unlink."""
    c = resolve(config, instance=instance)
    try:
        pid = control.stop(c.instance, timeout)
    except ShmmelError as exc:
        raise fail(exc) from None
    out.print(f"shmmel {c.instance} stopped (supervisor pid {pid})")


@app.command()
def status(
    instance: Instance = None,
    config: ConfigFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every worker column (over 80 "
                                                      "columns).")] = False,
    ready: Annotated[bool, typer.Option("--ready", help="Only ask /readyz: exit 0 when the "
                                                        "instance serves (health checks).")] = False,
) -> None:
    """Show the supervisor, workers, HTTP processes, slots and streams.
    Exits 1 when the instance is not running or is dead."""
    c = resolve(config, instance=instance)
    try:
        if ready:
            ok, said = control.readiness(c.instance)
            if not ok:
                raise fail(f"{c.instance} is not ready: {said}")
            out.print(f"{c.instance} ready: {said}")
            return
        info = control.status(c.instance)
    except ShmmelError as exc:
        raise fail(exc) from None
    dead = info["state"] == "dead"
    if as_json:
        print(json.dumps(info, indent=2))
    elif dead:
        out.print(f"{info['instance']} dead ({control.DEAD_HINT}); supervisor pid {info['pid']} "
                  "is gone")
    else:
        for part in status_table(info, wide):
            out.print(part)
    if dead:
        raise typer.Exit(1)


@app.command("mel")
def mel_cmd(
    file: Annotated[Path, typer.Argument(help="Audio file: a 16 kHz mono WAV is sent as it "
                                              "is; mp3, m4a, ogg, flac, webm, other rates or "
                                              "stereo are decoded here to 16 kHz mono (needs "
                                              "the [audio] extra).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .npy.")],
    n_mels: Annotated[int, typer.Option(help="80 or 128.")] = 80,
    windows: Annotated[bool, typer.Option(help="Whisper's 30 s windows of 3000 frames.")] = False,
    url: Annotated[Optional[str], typer.Option(help="Service URL (default: the instance's).")] = None,
    instance: Instance = None,
    config: ConfigFile = None,
    token: Token = None,
) -> None:
    """Compute FILE's log-mel spectrogram through a running instance; save it as .npy."""
    import numpy as np

    from shmmel.client import MelClient

    c = resolve(config, instance=instance)
    try:
        check_output(output)
        target = url or control.running_url(c.instance)
        spec = MelClient(target, token=token or c.auth_token).mel(file, n_mels=n_mels,
                                                                   windows=windows)
        np.save(output, spec)
    except (ShmmelError, OSError, ValueError) as exc:
        raise fail(exc) from None
    out.print(f"{file} -> {output}: shape {tuple(spec.shape)}")


@config_app.command("show")
def config_show(
    config: ConfigFile = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output: "
                                                         "{values, sources}.")] = False,
) -> None:
    """Print the resolved configuration and where each value came from."""
    from rich.table import Table

    c = resolve(config)
    data = json.loads(c.to_json())
    sources = data.pop("sources")
    if data.get("auth_token"):
        data["auth_token"] = "***"
    if as_json:
        print(json.dumps({"values": data, "sources": sources}, indent=2))
        return
    t = Table("setting", "value", "source")
    for k, v in data.items():
        t.add_row(k, repr(v), sources.get(k, "default"))
    out.print(t)


def main() -> None:
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - a bug: one line, not a traceback
        if os.environ.get("SHMMEL_DEBUG"):
            raise
        err.print(f"[error] unexpected {type(exc).__name__}: {exc} (SHMMEL_DEBUG=1 shows "
                  "the traceback)", style="red")
        sys.exit(1)


if __name__ == "__main__":
    main()
