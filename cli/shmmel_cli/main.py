"""The `shmmel` command: thin typer commands over the library, rendered with rich.

Each command builds the config, calls one library function, and renders the result. Library
errors (ShmmelError) become `[error] ...` on stderr and exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from shmmel import config as cfg
from shmmel import daemon
from shmmel.errors import ShmmelError

from .bench import bench_app, gen_audio

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="shmmel: Whisper log-mel spectrograms over HTTP, on the GPU.")
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.command("gen-audio")(gen_audio)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

Instance = Annotated[Optional[str], typer.Option("--instance", "-i", help="Instance name.")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file.")]


def fail(exc: Exception) -> typer.Exit:
    err.print(f"[red][error][/red] {exc}", highlight=False)
    return typer.Exit(1)


def resolve(config_file: Path | None = None, **flags: Any) -> cfg.Config:
    try:
        return cfg.resolve(flags, config_file)
    except ShmmelError as exc:
        raise fail(exc) from None


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
    try:
        if foreground:
            daemon.setup_logging(c.log_level)
            raise typer.Exit(daemon.run_foreground(c))
        started = daemon.start(c)
    except ShmmelError as exc:
        raise fail(exc) from None
    if started.cleared:
        err.print(f"[yellow]cleared stale shared memory[/yellow] of instance {c.instance} "
                  f"(a previous run died): {len(started.cleared)} entries", highlight=False)
    out.print(f"shmmel [bold]{c.instance}[/bold] up at [link]{started.url}[/link]  "
              f"supervisor pid {started.pid}, gunicorn pid {started.gunicorn_pid}, "
              f"workers {', '.join(map(str, started.workers))}\nlog: {started.log_file}",
              highlight=False)


@app.command()
def down(
    instance: Instance = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a graceful stop.")] = 30.0,
) -> None:
    """Stop an instance gracefully: finish in-flight requests, reap, unlink."""
    c = resolve(instance=instance)
    try:
        pid = daemon.stop(c.instance, timeout)
    except ShmmelError as exc:
        raise fail(exc) from None
    out.print(f"shmmel {c.instance} stopped (supervisor pid {pid})", highlight=False)


@app.command()
def status(
    instance: Instance = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the supervisor, workers, HTTP processes, slots and streams."""
    c = resolve(instance=instance)
    try:
        info = daemon.status(c.instance)
    except ShmmelError as exc:
        raise fail(exc) from None
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['instance']}[/bold] {info['state']} at {info['url']}  "
              f"supervisor {info['pid']}  gunicorn {info['gunicorn_pid']}  "
              f"up {info['uptime_s']:.0f} s", highlight=False)
    t = Table("#", "pid", "kind", "state", "gen", "beat", "served", "err", "queue", "streams",
              "restarts", title="workers")
    for w in info["workers"]:
        t.add_row(str(w["index"]), str(w["pid"]), w["kind"], w["state"], str(w["generation"]),
                  f"{w['heartbeat_age_s'] * 1000:.0f} ms", str(w["served"]), str(w["errors"]),
                  str(w["queue_depth"]), str(w["streams"]), str(w["restarts"]))
    out.print(t)
    h = Table("http pid", "requests", "age", title="HTTP processes")
    for p in info["http"]:
        h.add_row(str(p["pid"]), str(p["requests"]), f"{p['age_s']:.0f} s")
    out.print(h)
    s = info["slots"]
    out.print(f"slots: {s['free']}/{s['total']} free, {s['parked']} parked, {s['queued']} queued, {s['working']} "
              f"working, {s['orphaned']} orphaned ({s['bytes'] // 1024} KiB each); streams: "
              f"{info['streams']['open']}/{info['streams']['max']} open", highlight=False)


@app.command("mel")
def mel_cmd(
    file: Annotated[Path, typer.Argument(help="WAV file (16 kHz mono, 16-bit or float32).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .npy.")],
    n_mels: Annotated[int, typer.Option(help="80 or 128.")] = 80,
    windows: Annotated[bool, typer.Option(help="Whisper's 30 s windows of 3000 frames.")] = False,
    url: Annotated[Optional[str], typer.Option(help="Service URL (default: the instance's).")] = None,
    instance: Instance = None,
) -> None:
    """Compute FILE's log-mel spectrogram through a running instance; save it as .npy."""
    import numpy as np

    from shmmel.client import ClientError, MelClient

    c = resolve(instance=instance)
    try:
        target = url or daemon.status(c.instance)["url"]
        spec = MelClient(target).mel(file, n_mels=n_mels, windows=windows)
    except (ShmmelError, ClientError, OSError) as exc:
        raise fail(exc) from None
    np.save(output, spec)
    out.print(f"{file} -> {output}: shape {tuple(spec.shape)}", highlight=False)


@config_app.command("show")
def config_show(
    config: ConfigFile = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the resolved configuration and where each value came from."""
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
    app()


if __name__ == "__main__":
    main()
