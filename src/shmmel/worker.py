"""Compute worker: runs in a child forked by the supervisor.

One loop: wait on the doorbell (timeout = heartbeat interval), stamp the heartbeat, take every
slot submitted to this worker, answer each. Signal handlers only record. CUDA (through the mel
engine) is initialised here, after the fork, never in the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import FrameType

import posix_ipc

from . import layout as L
from .channel import spare_cores
from .inbox import Inbox
from .config import Config
from .osutil import keep_freed_memory, set_parent_death_signal
from .shm import Shm

log = logging.getLogger("shmmel.worker")
_monotonic = time.monotonic
OP_TEXT, OP_PING = L.OP_TEXT, L.OP_PING


EXIT_OK = 0
EXIT_BOOT_FAILED = 3  # the supervisor stops instead of respawning in a loop


def text_result(op: str, message: str, prefix: str) -> str:
    if op == "reverse":
        return message[::-1]
    if op == "upper":
        return message.upper()
    if op == "prefix":
        return prefix + message
    raise ValueError(f"unknown op {op!r}")


class Worker:
    def __init__(self, config: Config, shm: Shm, index: int, gen: int, parent: int) -> None:
        self.config, self.shm, self.index, self.gen, self.parent = config, shm, index, gen, parent
        self.rec = shm.workers[index : index + 1]
        w_off = shm.layout.workers_off + index * L.WORKER.itemsize
        # counters continue from the record: a respawned worker keeps them monotonic
        self.served, self.errors, self.batches, self.busy_s, self.samples = \
            L.COUNTERS.unpack_from(shm.ctl_view, w_off + L.WORKER.fields["served"][1])
        # word indexes for the single-store writes of this row (see Shm.u32)
        self._beat = shm.worker_word_ref(index, "heartbeat")[1]
        self._counter_words = [shm.worker_word_ref(index, n) for n in
                               ("served", "errors", "batches", "busy_s", "audio_samples")]
        self.inbox = Inbox(shm, index, gen)
        self.stop_signal: int | None = None
        self.engine = None
        self.audio = None
        self.whisper = None  # WhisperJobs on a whisper row (index >= config.workers)
        self.kind = L.K_CPU
        self._next_gpu_sample = 0.0

    # -- signals: record only ---------------------------------------------------------------
    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum

    def boot(self) -> None:
        """Initialise the compute engine. Raises on failure (the caller exits EXIT_BOOT_FAILED)."""
        if self.index >= self.config.workers:  # a whisper row: the model, no mel engine
            from .whisper.runner import WhisperJobs  # imports CTranslate2, only here

            self.whisper = WhisperJobs(self.config, self.shm, self.index, self.gen, self.inbox)
            self.kind = L.K_WHISPER
            self.rec["kind"] = self.kind
            self.rec["device"] = 0 if self.whisper.device == "cuda" else -1
            return
        want = self.config.worker_kind
        from .devices import create_worker_engine  # imports CuPy, if at all, only here

        def on_device(device: int) -> None:  # before the engine: a failed device shows
            self.rec["device"] = device

        self.engine, self.kind, device = create_worker_engine(
            want, self.index, self.config.device_list, self.config.fake_devices, on_device,
            self.config.cuda_sync)
        self.rec["kind"] = self.kind
        self.rec["device"] = device
        from .audio_worker import MelJobs

        self.audio = MelJobs(self.config, self.shm, self.index, self.gen, self.engine)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._record)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        set_parent_death_signal()
        return self.serve_until_stopped()

    def serve_until_stopped(self) -> int:
        """Boot, then serve until ``stop_signal`` is set; return the exit code. ``run()`` sets
        it from SIGTERM; in-process tests run this in a thread and set it themselves."""
        self.rec["heartbeat"] = time.monotonic()
        try:
            self.boot()
        except Exception as exc:  # noqa: BLE001 - any boot failure is reported the same way
            log.error("worker %d failed to boot: %s", self.index, exc)
            return EXIT_BOOT_FAILED
        self.beat()  # fresh before READY: a long boot must not look like a stall
        self.rec["state"] = L.W_READY
        log.info("worker %d ready (%s, gen %d)", self.index, L.W_KINDS[self.kind], self.gen)
        interval = self.config.heartbeat_interval
        spin = self.config.worker_spin_us / 1e6
        rec = self.rec
        f64, beat = self.shm.f64, self._beat
        whisper, audio = self.whisper, self.audio
        doorbell, getppid, parent = self.inbox.doorbell, os.getppid, self.parent
        monotonic, serve_pending = time.monotonic, self.serve_pending
        cuda = self.kind == L.K_CUDA
        every = min(interval, 1.0)
        chores = 0.0  # when the chores below (a syscall, a look at the streams) are due next
        while self.stop_signal is None:
            try:  # Inbox.wait, inline
                doorbell.acquire(interval if whisper is None else whisper.wait_time(interval))
                woke = True
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                woke = False
            now = monotonic()
            f64[beat] = now  # see beat()
            if now >= chores:  # once an interval (or a second), not once a wake-up
                chores = now + every
                if getppid() != parent:
                    log.error("worker %d: supervisor is gone, exiting", self.index)
                    break
                if audio is not None:
                    audio.expire(now)  # itself looks about once a second
                if cuda and now >= self._next_gpu_sample:
                    self._next_gpu_sample = now + 1.0
                    self.shm.set_worker_word(self.index, "gpu_bytes", self.gpu_bytes())
            if woke:
                # The posts already made are taken now, before the scan: each was made
                # after its slot's SUBMITTED store, so the scan below sees those slots,
                # and one scan serves them all (instead of one empty scan per post left
                # behind). A post made after this waits for the next acquire.
                for _ in range(doorbell.value):
                    doorbell.acquire(0)  # no syscall: the count is above zero
                serve_pending()
                if spin and spare_cores(now):
                    self.spin(spin)
            if whisper is not None:
                whisper.tick(time.monotonic())
                whisper.expire(now)
                self.collect_whisper_stats()
        rec["state"] = L.W_STOPPING
        self.serve_pending()  # answer what was already submitted
        if self.audio is not None:
            self.audio.close()
        if self.whisper is not None:
            self.whisper.close()  # decodes and answers what is queued
            self.collect_whisper_stats()
        if self.engine is not None:
            self.engine.close()
        log.info("worker %d exiting (signal %s)", self.index, self.stop_signal)
        return EXIT_OK

    def gpu_bytes(self) -> int:
        """Device memory held by this process's CuPy pools (CUDA workers only)."""
        import cupy  # already initialised by the engine in this process

        return int(cupy.get_default_memory_pool().total_bytes())

    def spin(self, seconds: float) -> None:
        """Poll the doorbell for a moment before going back to sleep on it; return as soon
        as it is posted (the loop's next acquire then takes the post without a syscall) or
        after ``seconds``.

        A client's next request comes within microseconds to a few hundred of the last
        answer, and (routed to its HTTP process's home worker, see Routing.pick_worker) to
        this worker again: catching it here skips the futex sleep and the wake-up from an
        idle core, and a producer's post to a worker that is not asleep is no syscall
        either, so the request path loses a futex wake on each side. The loop calls this
        only on a host with cores to spare (:func:`shmmel.channel.spare_cores`), where the
        poll takes a core nobody else wants; one look is one read of the semaphore's count
        (no scan of the slots), so under load, when the doorbell is posted again before the
        batch is answered, the spin costs one read. Costs at most ``worker_spin_us`` of CPU
        after the last request.
        """
        clock, doorbell = time.perf_counter, self.inbox.doorbell
        deadline = clock() + seconds
        while not doorbell.value:
            if clock() >= deadline or self.stop_signal is not None:
                return

    def beat(self) -> None:
        """Stamp the heartbeat: one aligned store (the supervisor never reads a torn beat).

        Also stamped between the items of a batch, so a worker busy with a long batch is not
        taken for a stalled one (producers stop routing to a worker silent for stall_timeout).
        """
        self.shm.f64[self._beat] = time.monotonic()

    def serve_pending(self) -> None:
        inbox = self.inbox
        t0 = _monotonic()  # the same clock as perf_counter on Linux, and the stamps'
        taken = inbox.take(t0)  # each request decoded once, passed on
        if not taken:
            return
        audio: list[tuple[int, tuple[int, ...]]] = []
        whisper: list[int] = []
        errors = 0
        for _t, j, req in taken:
            op = req[0]
            if op == OP_TEXT:
                errors += self.serve_text(j, req[1], req[3], req[4] != 0)
            elif op == OP_PING:
                inbox.done(j, req[1])
            elif op in L.AUDIO_OPS and self.audio:
                audio.append((j, req))
            elif op in L.WHISPER_OPS and self.whisper:
                whisper.append(j)
            else:
                errors += self.fail(j, L.R_ERROR, f"unknown op {op}")
        if audio or whisper:
            self.beat()
            if audio:
                errors += self.audio.serve(audio, inbox)
                self.samples += self.audio.take_samples()  # counted by serve alone
                self.beat()
            if whisper:
                errors += self.whisper.serve(whisper)
                self.beat()
            self.publish_counters(errors, len(taken), _monotonic() - t0)
            return
        # publish_counters, inline for the short requests (samples unchanged; the heartbeat
        # as stamped at the wake-up, microseconds ago)
        now = _monotonic()
        (v0, i0), (v1, i1), (v2, i2), (v3, i3), _ = self._counter_words
        v0[i0] = self.served = self.served + len(taken)
        if errors:
            v1[i1] = self.errors = self.errors + errors
        v2[i2] = self.batches = self.batches + 1
        v3[i3] = self.busy_s = self.busy_s + (now - t0)

    def publish_counters(self, errors: int = 0, served: int = 0, busy: float = 0.0) -> None:
        """Add to the counters (a batch: ``served`` > 0) and put them into the row, one
        aligned store each (status and /metrics read them)."""
        self.errors += errors
        if served:
            self.served += served
            self.batches += 1
        self.busy_s += busy
        (v0, i0), (v1, i1), (v2, i2), (v3, i3), (v4, i4) = self._counter_words
        v0[i0] = self.served
        v1[i1] = self.errors
        v2[i2] = self.batches
        v3[i3] = self.busy_s
        v4[i4] = self.samples

    def collect_whisper_stats(self) -> None:
        """Add the decode thread's errors and compute time to this worker's counters."""
        errors, busy = self.whisper.take_stats()
        if errors or busy:
            self.publish_counters(errors, busy=busy)

    def fail(self, j: int, status: int, message: str) -> int:
        return self.inbox.fail(j, status, message)

    def serve_text(self, j: int, n: int, text_op: int, parts: bool = False) -> int:
        size = self.shm.slot_bytes
        off = j * size
        data = self.shm.data_view
        try:
            message = str(data[off : off + min(n, size)], "utf-8")
            op = L.TEXT_OPS[text_op]
        except (UnicodeDecodeError, IndexError) as exc:
            return self.fail(j, L.R_BAD_INPUT, str(exc))
        result = text_result(op, message, self.config.prefix)
        if parts:  # the spec's streaming mode: the result in parts, as they are made
            pos = 0
            for i in range(0, len(result), L.TEXT_PART_CHARS):
                pos = self.inbox.publish(j, result[i : i + L.TEXT_PART_CHARS].encode("utf-8"),
                                         pos)
            self.inbox.answer(j, L.R_OK, pos, r0=pos)
            return 0
        out = result.encode("utf-8")
        if len(out) > size:
            return self.fail(j, L.R_ERROR, "result larger than a slot")
        data[off : off + len(out)] = out
        self.inbox.done(j, len(out))
        return 0


def worker_main(config: Config, shm: Shm, index: int, gen: int, parent: int) -> None:
    """Entry point in the forked child. Never returns."""
    code = 1
    try:
        keep_freed_memory(config.malloc_keep_mb)
        code = Worker(config, shm, index, gen, parent).run()
    except BaseException:  # noqa: BLE001
        log.exception("worker %d crashed", index)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
