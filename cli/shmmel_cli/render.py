"""The CLI's consoles and renderings.

Both consoles print text as written (``markup=False``): library messages carry brackets
(`[shmmel] must be a table`, `pip install 'shmmel[whisper]'`) that rich markup would eat.
Colour comes from ``style=`` and :class:`rich.text.Text` parts instead. Piped output is never
wrapped (a wide virtual width), so tables keep whole cells when read by a script.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 1000  # not a terminal: lay out at this width, i.e. never wrap


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, markup=False, highlight=False,
                   width=None if stream.isatty() else PIPE_WIDTH)


out = console()
err = console(stderr=True)


def fail(exc: BaseException | str) -> typer.Exit:
    """Print ``[error] <message>`` (one line, literally) on stderr; the Exit to raise."""
    err.print(Text.assemble(("[error]", "red"), " ", str(exc)))
    return typer.Exit(1)


def check_output(*paths: Path | None) -> None:
    """Refuse an output path that cannot be written before any work is done (OSError)."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise IsADirectoryError(f"output {path} is a directory")
        parent = path.parent
        if not parent.is_dir():
            raise FileNotFoundError(f"output directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"output directory {parent} is not writable")


def note(message: str) -> None:
    """A warning the user should see (stderr, yellow)."""
    err.print(message, style="yellow")


# (header, key of a worker record or callable, shown without --wide)
def _beat(w: dict[str, Any]) -> str:
    age = w["heartbeat_age_s"]
    return "-" if age is None else f"{age * 1000:.0f} ms"


WORKER_COLUMNS: list[tuple[str, Any, bool]] = [
    ("#", "index", True), ("pid", lambda w: str(w["pid"] or "-"), True), ("kind", "kind", True),
    ("state", "state", True), ("gen", "generation", False), ("beat", _beat, True),
    ("dev", lambda w: "-" if w["device"] < 0 else str(w["device"]), True),
    ("served", "served", True), ("err", "errors", True), ("queue", "queue_depth", True),
    ("streams", "streams", False), ("restarts", "restarts", False),
    ("busy s", "busy_s", False),
]


def status_table(info: dict[str, Any], wide: bool = False) -> list[RenderableType]:
    """What `shmmel status` prints: a header line, the workers, the HTTP processes, a
    summary; within 80 columns unless ``wide``."""
    parts: list[RenderableType] = [Text.assemble(
        (info["instance"], "bold"), f" {info['state']} at {info['url']}, up "
        f"{info['uptime_s']:.0f} s\nsupervisor pid {info['pid']}, gunicorn pid "
        f"{info['gunicorn_pid']}")]
    cols = [c for c in WORKER_COLUMNS if wide or c[2]]
    t = Table(*(h for h, _, _ in cols), title="workers")
    for col in t.columns:
        col.no_wrap = True
    for w in info["workers"]:
        t.add_row(*(str(get(w) if callable(get) else w[get]) for _, get, _ in cols))
    parts.append(t)
    if info.get("devices"):
        d = Table("device", "state", "ready", "streams", "queue", "memory", "util",
                  title="devices")
        for r in info["devices"]:
            util = r["utilisation"]
            d.add_row(str(r["device"]), r["state"], f"{r['ready']}/{len(r['workers'])}",
                      str(r["streams"]), str(r["queue_depth"]),
                      f"{r['memory_bytes'] / 2**20:.0f} MiB",
                      "-" if util is None else f"{util:.0%}")
        parts.append(d)
    h = Table("http pid", "requests", "age", title="HTTP processes")
    for p in info["http"]:
        h.add_row(str(p["pid"]), str(p["requests"]), f"{p['age_s']:.0f} s")
    parts.append(h)
    s = info["slots"]
    parts.append(f"slots: {s['free']}/{s['total']} free, {s['parked']} parked, {s['queued']} "
                 f"queued, {s['working']} working, {s['orphaned']} orphaned "
                 f"({s['bytes'] // 1024} KiB each)\nstreams: {info['streams']['open']}/"
                 f"{info['streams']['max']} open")
    off = next((w["reason"] for w in info["workers"] if w["state"] == "off"), None)
    if off:
        parts.append(Text(f"whisper workers off:\n  {off}", style="yellow"))
    return parts
