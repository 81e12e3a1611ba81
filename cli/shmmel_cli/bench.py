"""`shmmel bench text|audio` and `shmmel gen-audio`: thin commands over shmmel.loadgen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from shmmel import config as cfg
from shmmel.errors import ShmmelError
from shmmel.loadgen import bench as lb
from shmmel.loadgen import report, signals
from shmmel.loadgen.audioload import AudioLoad
from shmmel.loadgen.runner import LoadError, default_procs
from shmmel.loadgen.text import parse_ops, parse_sizes
from shmmel.loadgen.textload import TextLoad
from shmmel.loadgen.transcribeload import TranscribeLoad, transcribe_bench

from .render import check_output, err, fail, out

bench_app = typer.Typer(help="Load-test a running (or spawned) instance.", no_args_is_help=True,
                        rich_markup_mode=None)

Url = Annotated[Optional[str], typer.Option(help="Service URL (default: the instance's).")]
Instance = Annotated[Optional[str], typer.Option("--instance", "-i",
                                                 help="Instance to load (default: default).")]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML config file: the instance to load, its token; with --spawn, the "
                     "settings of the spawned instance.")]
Token = Annotated[Optional[str], typer.Option(
    help="Bearer token (default: auth_token from --config or SHMMEL_AUTH_TOKEN).")]
Spawn = Annotated[bool, typer.Option(help="Start a fresh instance (port 0) and stop it after.")]
Workers = Annotated[Optional[int], typer.Option("--workers", "-w", help="--spawn: compute workers.")]
HttpWorkers = Annotated[Optional[int], typer.Option(help="--spawn: gunicorn processes (and the "
                                                         "baseline's, with --url).")]
Threads = Annotated[Optional[int], typer.Option(help="--spawn: gunicorn threads a process.")]
Kind = Annotated[Optional[str], typer.Option(help="--spawn: auto, cpu or cuda.")]
Duration = Annotated[float, typer.Option("--duration", "-d", help="Seconds measured.")]
Warmup = Annotated[float, typer.Option(help="Seconds of load before measuring.")]
Procs = Annotated[Optional[int], typer.Option(help="Load processes (default: cores/4, 1..8).")]
Baseline = Annotated[bool, typer.Option(help="Also load a bare gunicorn+Falcon app (no IPC).")]
Sweep = Annotated[Optional[str], typer.Option(help="NAME=V1,V2,...: one spawned instance a "
                                                   "point, e.g. workers=1,2,4,8.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]
Save = Annotated[Optional[Path], typer.Option(help="Also write the JSON here.")]
Hgrm = Annotated[Optional[Path], typer.Option(help="Write the latency distribution (.hgrm).")]
Plot = Annotated[Optional[Path], typer.Option(help="Write a percentile plot (PNG; matplotlib).")]
LogDir = Annotated[Optional[Path], typer.Option(help="--spawn: directory for instance logs.")]


def _source(url: str | None, instance: str | None, spawn: bool, sweep: str | None,
            flags: dict[str, Any], log_dir: Path | None, http_workers: int | None,
            http_threads: int | None, config: Path | None = None,
            token: str | None = None) -> lb.Source:
    flags = {k: v for k, v in flags.items() if v is not None}
    spawning = spawn or sweep is not None
    if spawning and url:
        raise fail(ValueError("--url and --spawn/--sweep exclude each other"))
    try:
        c = cfg.resolve({"instance": instance}, config)
    except ShmmelError as exc:
        raise fail(exc) from None
    if spawning and token:
        flags["auth_token"] = token  # the spawned instance gets it through its pipe
    return lb.Source(url=url, instance=c.instance, spawn=flags if spawning else None,
                     log_dir=str(log_dir) if log_dir else None, http_workers=http_workers,
                     http_threads=http_threads or 16,
                     config_file=str(config) if config else None,
                     token=token or c.auth_token)


def _mostly_errors(errors: dict[str, int], answers: int) -> str | None:
    """A run whose answers are mostly errors measured the errors, not the service: the
    message that replaces its throughput, or None. ``answers`` counts errors too."""
    n = sum(errors.values())
    if not n or n * 2 < answers:
        return None
    hint = "; pass --token or set SHMMEL_AUTH_TOKEN" if any("401" in k for k in errors) else ""
    return (f"{n:,} of {max(n, answers):,} answers were errors ({errors}): no throughput to "
            f"report{hint}")


def _refuse_errors(bad: str | None, data: dict[str, Any], as_json: bool) -> None:
    if bad:
        if as_json:
            print(json.dumps(data, indent=2, default=str))
        raise fail(bad)


def _emit(outcome: lb.Outcome, title: str, as_json: bool, save: Path | None,
          hgrm: Path | None, plot: Path | None, latency_rows: dict[str, dict]) -> None:
    text = json.dumps(outcome.data, indent=2, default=str)
    if save:
        save.write_text(text + "\n")
    if hgrm:
        for name, h in outcome.hists.items():
            suffix = "" if name == "shmmel" else "-" + name.replace(" ", "-")
            target = hgrm if not suffix else hgrm.with_name(f"{hgrm.stem}{suffix}{hgrm.suffix}")
            report.write_hgrm(target, h)
    if plot:
        msg = report.write_plot(plot, outcome.hists, title)
        if msg:
            err.print(msg, style="yellow")
    if as_json:
        print(text)
        return
    d = outcome.data
    t = d["target"]
    out.print(f"{title} against {t['url']} (instance {t['instance'] or '-'}, "
              f"workers {t['workers'] or '?'} {t['worker_kind'] or ''}, "
              f"{t['http_workers']} HTTP processes x {t['http_threads']} threads)",
              style="bold")
    out.print(report.latency_table("latency", latency_rows))
    out.print(report.checks_table("targets", outcome.checks))
    if "vs_baseline" in d:
        out.print(Table.grid())
        t2 = Table("figure", "shmmel / bare", title="ratio to the bare HTTP stack",
                   title_justify="left")
        for k, v in d["vs_baseline"].items():
            t2.add_row(k, "-" if v is None else f"{v:.3f}")
        out.print(t2)


def _sweep_table(rows: list[dict]) -> Table:
    t = Table(*rows[0].keys(), title="scalability", title_justify="left")
    for r in rows:
        t.add_row(*(report._fmt(v) for v in r.values()))
    return t


@bench_app.command("text")
def bench_text(
    url: Url = None, instance: Instance = None, config: ConfigFile = None,
    token: Token = None, spawn: Spawn = False,
    workers: Workers = None, http_workers: HttpWorkers = None, http_threads: Threads = None,
    worker_kind: Kind = None,
    connections: Annotated[int, typer.Option("--connections", "-c",
                                             help="Concurrent keep-alive connections.")] = 100,
    duration: Duration = 10.0, warmup: Warmup = 2.0,
    rate: Annotated[float, typer.Option(help="Open loop at this many req/s in all "
                                             "(0: closed loop).")] = 0.0,
    sizes: Annotated[str, typer.Option(help="Message bytes, or a mix: 64,512,4096.")] = "256",
    ops: Annotated[str, typer.Option(help="Op mix: reverse, or reverse:2,upper,prefix.")] = "reverse",
    procs: Procs = None,
    timing_fraction: Annotated[float, typer.Option(help="Fraction of answers whose "
                                                        "Server-Timing is sampled.")] = 0.05,
    burst: Annotated[int, typer.Option(help="Then send this many requests at once (0: no).")] = 0,
    baseline: Baseline = False, sweep: Sweep = None, as_json: AsJson = False, save: Save = None,
    hgrm: Hgrm = None, plot: Plot = None, log_dir: LogDir = None,
) -> None:
    """POST /process load: latency percentiles, throughput, errors, against the targets."""
    try:
        check_output(save, hgrm, plot)
        load = TextLoad(connections=connections, duration=duration, warmup=warmup,
                        mode="open" if rate > 0 else "closed", rate=rate,
                        sizes=tuple(parse_sizes(sizes)), ops=tuple(parse_ops(ops)),
                        procs=procs or default_procs(connections),
                        timing_fraction=timing_fraction)
        src = _source(url, instance, spawn, sweep, dict(
            workers=workers, http_workers=http_workers, http_threads=http_threads,
            worker_kind=worker_kind), log_dir, http_workers, http_threads, config, token)
        if sweep:
            name, values = lb.parse_sweep(sweep)
            rows = lb.sweep("text", src, name, values, load, console=err)
            _print_rows(rows, as_json, save)
            return
        outcome = lb.text_bench(src, load, burst=burst, baseline=baseline, console=err)
    except (ShmmelError, LoadError, ValueError, OSError) as exc:
        raise fail(exc) from None
    d = outcome.data
    _refuse_errors(_mostly_errors(d["shmmel"]["errors"], d["shmmel"]["requests"]), d, as_json)
    rows = {"shmmel": d["shmmel"]["latency_ms"]}
    if load.mode == "open":
        rows["shmmel (uncorrected)"] = d["shmmel"]["uncorrected_ms"]
    for name, s in d["shmmel"]["components_ms"].items():
        rows[f"  {name}"] = s
    if "baseline" in d:
        rows["bare stack"] = d["baseline"]["latency_ms"]
    _emit(outcome, "shmmel bench text", as_json, save, hgrm, plot, rows)
    if not as_json:
        tp = d["shmmel"]["throughput"]
        line = f"throughput: {tp['mean']:,.0f} ± {tp['stdev']:,.0f} req/s over {tp['intervals']} s"
        if "baseline" in d:
            line += f"; bare stack {d['baseline']['throughput']['mean']:,.0f} req/s"
        errors = d["shmmel"]["errors"]
        out.print(line + (f"; errors {errors}" if errors else "; no errors"))
        if "burst" in d["shmmel"]:
            b = d["shmmel"]["burst"]
            out.print(f"burst: {b['answered']:,}/{b['requests']:,} answered, all within "
                      f"{report._fmt(b['all_answered_in_ms'])} ms, errors {b['errors'] or 0}",
                      )


def _print_rows(rows: list[dict], as_json: bool, save: Path | None) -> None:
    text = json.dumps({"sweep": rows}, indent=2)
    if save:
        save.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        out.print(_sweep_table(rows))


@bench_app.command("audio")
def bench_audio(
    url: Url = None, instance: Instance = None, config: ConfigFile = None,
    token: Token = None, spawn: Spawn = False,
    workers: Workers = None, http_workers: HttpWorkers = None, http_threads: Threads = None,
    worker_kind: Kind = None,
    streams: Annotated[int, typer.Option("--streams", "-s", help="Concurrent streams "
                                         "(--transcribe: concurrent clients).")] = 8,
    duration: Annotated[float, typer.Option("--duration", "-d",
                                            help="Seconds measured, each phase.")] = 10.0,
    warmup: Warmup = 1.0,
    pace: Annotated[str, typer.Option(help="Chunks: realtime or fast.")] = "realtime",
    file_seconds: Annotated[float, typer.Option(help="Seconds of audio a file.")] = 10.0,
    signal: Annotated[str, typer.Option(help="speech, tone, chirp, noise or silence.")] = "speech",
    phases: Annotated[str, typer.Option(help="chunks (session API), files (/audio/stream), "
                                             "or both.")] = "chunks,files",
    procs: Procs = None,
    verify: Annotated[bool, typer.Option(help="Check a file a process against "
                                              "log_mel_spectrogram.")] = True,
    gpu_index: Annotated[int, typer.Option(help="GPU to sample through NVML (-1: none).")] = 0,
    transcribe: Annotated[bool, typer.Option(help="POST 30 s windows to /audio/transcribe "
                                                  "instead: windows/s, latency a window.")] = False,
    file: Annotated[Optional[Path], typer.Option(help="--transcribe: the window's audio (WAV "
                                                      "or raw s16le, 16 kHz; first 30 s).")] = None,
    openai: Annotated[bool, typer.Option(help="--transcribe: send each window as an mp3 to "
                                              "OpenAI's /v1/audio/transcriptions.")] = False,
    baseline: Baseline = False, sweep: Sweep = None, as_json: AsJson = False, save: Save = None,
    hgrm: Hgrm = None, plot: Plot = None, log_dir: LogDir = None,
) -> None:
    """Audio streams: first chunk, per-chunk and end-to-end latency, real-time factor.
    With --transcribe: Whisper windows per second and the latency of each window."""
    if transcribe:
        if baseline or sweep:
            raise fail(ValueError("--transcribe takes neither --baseline nor --sweep"))
        _bench_transcribe(TranscribeLoad(streams=streams, duration=duration, warmup=warmup,
                                         signal=signal, file=str(file) if file else None,
                                         openai=openai),
                          _source(url, instance, spawn, None, dict(
                              workers=workers, http_workers=http_workers,
                              http_threads=http_threads, worker_kind=worker_kind),
                              log_dir, http_workers, http_threads, config, token),
                          as_json, save, hgrm, plot)
        return
    if file is not None or openai:
        raise fail(ValueError("--file and --openai go with --transcribe"))
    try:
        check_output(save, hgrm, plot)
        if pace not in ("realtime", "fast"):
            raise ValueError("--pace must be realtime or fast")
        chosen = tuple(p.strip() for p in phases.split(",") if p.strip())
        if not chosen or any(p not in ("chunks", "files") for p in chosen):
            raise ValueError("--phases takes chunks, files or chunks,files")
        if signal not in signals.KINDS:
            raise ValueError(f"--signal must be one of {', '.join(signals.KINDS)}")
        load = AudioLoad(streams=streams, duration=duration, warmup=warmup, pace=pace,  # type: ignore[arg-type]
                         file_seconds=file_seconds, procs=procs or default_procs(streams),
                         signal=signal, verify=verify, phases=chosen)
        src = _source(url, instance, spawn, sweep, dict(
            workers=workers, http_workers=http_workers, http_threads=http_threads,
            worker_kind=worker_kind), log_dir, http_workers, http_threads, config, token)
        gpu = None if gpu_index < 0 else gpu_index
        if sweep:
            name, values = lb.parse_sweep(sweep)
            rows = lb.sweep("audio", src, name, values, load, console=err, gpu_index=gpu)
            _print_rows(rows, as_json, save)
            return
        outcome = lb.audio_bench(src, load, baseline=baseline, gpu_index=gpu, console=err)
    except (ShmmelError, LoadError, ValueError, OSError) as exc:
        raise fail(exc) from None
    d = outcome.data
    errors: dict[str, int] = {}
    ok = 0
    for phase in ("chunks", "files"):
        if phase in d["shmmel"]:
            ok += d["shmmel"][phase][phase]
            for k, v in d["shmmel"][phase]["errors"].items():
                errors[k] = errors.get(k, 0) + v
    _refuse_errors(_mostly_errors(errors, ok + sum(errors.values())), d, as_json)
    rows: dict[str, dict] = {}
    for who in ("shmmel", "baseline"):
        if who not in d:
            continue
        tag = "" if who == "shmmel" else " (bare)"
        if "chunks" in d[who]:
            rows[f"first chunk{tag}"] = d[who]["chunks"]["first_chunk_ms"]
            rows[f"per chunk{tag}"] = d[who]["chunks"]["chunk_ms"]
            rows[f"finish (DELETE){tag}"] = d[who]["chunks"]["finish_ms"]
        if "files" in d[who]:
            rows[f"{file_seconds:g} s file{tag}"] = d[who]["files"]["file_ms"]
    _emit(outcome, "shmmel bench audio", as_json, save, hgrm, plot, rows)
    if not as_json:
        s = d["shmmel"]
        for phase in ("chunks", "files"):
            if phase in s and "gpu" in s[phase]:
                g = s[phase]["gpu"]
                out.print(f"GPU during {phase}: {g['name']}, utilisation mean "
                          f"{g['util_mean_pct']} % (max {g['util_max_pct']} %), memory max "
                          f"{g['mem_max_mib']} MiB")


def _bench_transcribe(load: TranscribeLoad, src: lb.Source, as_json: bool, save: Path | None,
                      hgrm: Path | None, plot: Path | None) -> None:
    try:
        check_output(save, hgrm, plot)
        outcome = transcribe_bench(src, load, console=err)
    except (ShmmelError, LoadError, ValueError, OSError) as exc:
        raise fail(exc) from None
    s = outcome.data["shmmel"]
    _refuse_errors(_mostly_errors(s["errors"], s["windows"] + s["error_count"]), outcome.data,
                   as_json)
    _emit(outcome, "shmmel bench audio --transcribe", as_json, save, hgrm, plot,
          {"per window": s["latency_ms"]})
    if not as_json:
        tp, b, tok = s["windows_per_s"], s["batch"], s["tokens"]
        out.print(f"windows: {s['windows']:,}, {tp['mean']:.2f} ± {tp['stdev']:.2f} windows/s "
                  f"over {tp['intervals']} s; mean batch {report._fmt(b['mean'])} (max "
                  f"{report._fmt(b['max'])}); mean tokens a window {report._fmt(tok['mean'])}"
                  + (f"; errors {s['errors']}" if s["errors"] else "; no errors"),
                  )
        if "decode_ms" in s:
            d = s["decode_ms"]
            out.print(f"mp3 ({s['mp3_bytes']:,} bytes) decoded here in {d['median']} ms "
                      f"(median of {d['repeat']}; {d['min']}-{d['max']})")


def gen_audio(
    output: Annotated[Path, typer.Argument(help="File to write.")],
    kind: Annotated[str, typer.Option(help="speech, tone, chirp, noise or silence.")] = "speech",
    duration: Annotated[float, typer.Option("--duration", "-d", help="Seconds.")] = 10.0,
    seed: Annotated[int, typer.Option(help="Random seed (noise, speech).")] = 0,
    fmt: Annotated[str, typer.Option("--format", "-f", help="wav, s16le or f32le.")] = "wav",
    freq: Annotated[float, typer.Option(help="tone: frequency in Hz.")] = 440.0,
) -> None:
    """Write test audio (16 kHz mono): WAV (16-bit PCM) or raw s16le / f32le."""
    try:
        if kind not in signals.KINDS:
            raise ValueError(f"--kind must be one of {', '.join(signals.KINDS)}")
        if duration < 0:
            raise ValueError("--duration must be >= 0")
        audio = signals.generate(kind, duration, seed, freq)  # type: ignore[arg-type]
        size = signals.write(output, audio, fmt)  # type: ignore[arg-type]
    except (ValueError, OSError) as exc:
        raise fail(exc) from None
    out.print(f"{output}: {kind}, {duration:g} s at 16 kHz, {fmt}, {size:,} bytes",
              )
