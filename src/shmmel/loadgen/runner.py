"""Fork the load processes, show live progress, collect their results.

Each process gets a 2-slot shared counter (answers, errors) that it overwrites as it goes;
the parent sums them for the live display and never waits on a lock. Results come back
through a queue as plain data (histograms encoded), read before the processes are joined.
When the console is not a terminal (piped, CI) the display is a plain progress line every
PIPED_EVERY seconds instead, so a long run shows it is alive.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from multiprocessing.sharedctypes import RawArray
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text


PIPED_EVERY = 4.0  # seconds between progress lines when the console is not a terminal


class LoadError(RuntimeError):
    """A load process failed (its last traceback line is in the message)."""


def _child(target: Callable[[int, Any], dict], index: int, progress: Any, q: Any) -> None:
    try:
        q.put((index, target(index, progress), None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((index, None, traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()


def run_processes(target: Callable[[int, Any], dict], procs: int, *, label: str,
                  t0: float, warmup: float, duration: float, unit: str = "req",
                  console: Console | None = None, timeout: float = 60.0) -> list[dict]:
    """Run ``target(i, progress)`` in ``procs`` forked processes; return their results in
    index order. The display counts from ``t0 + warmup`` for ``duration`` seconds."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    counters = [RawArray("q", 2) for _ in range(procs)]
    children = [ctx.Process(target=_child, args=(target, i, counters[i], q), daemon=True)
                for i in range(procs)]
    for p in children:
        p.start()
    results: dict[int, dict] = {}
    start = t0 + warmup
    deadline = start + duration + timeout
    console = console or Console(stderr=True)
    history: list[tuple[float, int]] = []

    def view() -> Text:
        now = time.monotonic()
        done = sum(c[0] for c in counters)
        errors = sum(c[1] for c in counters)
        history.append((now, done))
        while len(history) > 2 and history[0][0] < now - 1.0:
            history.pop(0)
        (ta, a), (tb, b) = history[0], history[-1]
        rate = (b - a) / (tb - ta) if tb > ta else 0.0
        if now < start:
            phase = f"warm-up {start - now:4.1f} s"
        else:
            phase = f"{min(duration, now - start):5.1f}/{duration:g} s"
        return Text.assemble((f"{label} ", "bold"), phase, f"  {done:,} {unit}",
                             (f"  {rate:,.0f} {unit}/s", "cyan"),
                             (f"  errors {errors:,}", "red" if errors else "green"),
                             f"  [{len(results)}/{procs} done]")

    piped = not console.is_terminal
    printed = time.monotonic()
    try:
        with Live(view(), console=console, refresh_per_second=4, transient=True) as live:
            while len(results) < procs:
                if piped and time.monotonic() - printed >= PIPED_EVERY:
                    console.print(view())
                    printed = time.monotonic()
                try:
                    i, res, tb = q.get(timeout=0.25)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise LoadError(f"{label}: load processes did not finish in time") from None
                    dead = [p for p in children if p.exitcode not in (None, 0)]
                    if dead:
                        raise LoadError(f"{label}: load process {dead[0].pid} exited with "
                                        f"code {dead[0].exitcode}") from None
                    live.update(view())
                    continue
                if tb is not None:
                    last = (tb.strip().splitlines() or ["?"])[-1]
                    raise LoadError(f"{label}: load process {i} failed: {last}")
                results[i] = res
                live.update(view())
    finally:
        for p in children:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        q.close()
    return [results[i] for i in range(procs)]


def default_procs(connections: int) -> int:
    """Load processes: a quarter of the cores (leave the rest to the server), 1..8."""
    return max(1, min(connections, 8, (os.cpu_count() or 2) // 4 or 1))
