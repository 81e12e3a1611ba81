"""Prometheus metrics, correct across gunicorn's processes.

Every number lives in the instance's shared memory: HTTP request counters and latency
histograms in one row per HTTP process (``layout.METRICS``), worker counters in the worker
table, queue depths and stream counts derived from the slot and stream tables. ``GET
/metrics`` in any HTTP process runs a custom prometheus_client collector over them, so every
scrape sees the whole instance. This beats prometheus_client's multiprocess mode here: no
directory of per-pid files to clean up, no environment variable to set before import, and
the supervisor's and workers' figures (which never pass through an HTTP process) are there
too. Rows are inherited by a process that replaces a dead one, so sums never go backwards.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from typing import Any

import falcon
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import layout as L
from .devices import Nvml, device_rows, pinned_streams
from .stream_table import StreamTable
from .shm import Shm

ROUTE_OF_TEMPLATE = {
    "/process": "process", "/audio/stream": "audio_stream", "/audio/streams": "audio_streams",
    "/audio/streams/{stream_id}": "audio_session", "/healthz": "healthz", "/readyz": "readyz",
    "/metrics": "metrics", "/openapi.json": "openapi", "/audio/transcribe": "transcribe",
    "/v1/audio/transcriptions": "openai_transcriptions", "/v1/models": "openai_models",
    "/v1/models/{model}": "openai_models",
}
ROUTE_INDEX = {name: i for i, name in enumerate(L.ROUTES)}
CODE_INDEX = {code: i for i, code in enumerate(L.CODES)}
OTHER_CODE = CODE_INDEX[0]
BUCKETS, N_CODES, N_BUCKETS = L.BUCKETS, len(L.CODES), len(L.BUCKETS) + 1


class HttpMetrics:
    """Falcon middleware: counts each request by route and status, times it (until the
    responder returns: for a streamed response, the time to its first byte)."""

    def __init__(self, shm: Shm, row: int) -> None:
        self.shm, self.row = shm, row
        self._lock = threading.Lock()
        # word indexes of this row's counters in Shm.u64 / Shm.f64: a request's counts are
        # four single stores (numpy field access cost several microseconds a request)
        base = shm.layout.metrics_off + max(row, 0) * L.METRICS.itemsize
        self._req = (base + L.METRICS.fields["requests"][1]) >> 3
        self._lat = (base + L.METRICS.fields["latency"][1]) >> 3
        self._sum = (base + L.METRICS.fields["latency_sum"][1]) >> 3
        self._words: dict[tuple[Any, Any], tuple[int, int, int]] = {}  # see _words_of
        self._total = (shm.layout.http_off + max(row, 0) * L.HTTP.itemsize
                       + L.HTTP.fields["requests"][1]) >> 3

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.t0 = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any,
                         req_succeeded: bool) -> None:
        if self.row < 0:
            return
        now = time.perf_counter()
        elapsed = now - getattr(req.context, "t0", now)
        key = (req.uri_template, resp.status)
        words = self._words.get(key)
        if words is None:
            words = self._words_of(*key)
        req_w, lat_w, sum_w = words
        b = bisect.bisect_left(BUCKETS, elapsed)
        u64 = self.shm.u64
        with self._lock:  # this process's threads; the row is written by this process only
            u64[req_w] += 1
            u64[lat_w + b] += 1
            self.shm.f64[sum_w] += elapsed
            u64[self._total] += 1

    def _words_of(self, template: str | None, status: Any) -> tuple[int, int, int]:
        """The counter words of a route template and a status (as the response holds it),
        kept: the route and code lookups cost more than the counting, on every request."""
        r = ROUTE_INDEX[ROUTE_OF_TEMPLATE.get(template or "", "other")]
        c = CODE_INDEX.get(falcon.http_status_to_code(status), OTHER_CODE)
        words = (self._req + r * N_CODES + c, self._lat + r * N_BUCKETS, self._sum + r)
        if len(self._words) < 1024:  # templates are the app's; statuses a handful
            self._words[(template, status)] = words
        return words


class ShmCollector:
    """Reads one instance's shared memory at scrape time."""

    def __init__(self, shm: Shm) -> None:
        self.shm = shm
        self.nvml = Nvml()  # utilisation where nvidia-ml-py is installed; started on use

    def collect(self) -> Iterator[Any]:
        shm = self.shm
        now = time.monotonic()
        m = shm.metrics
        requests = m["requests"].sum(axis=0)
        latency = m["latency"].sum(axis=0)
        lsum = m["latency_sum"].sum(axis=0)
        c = CounterMetricFamily("shmmel_http_requests", "HTTP requests by route and status",
                                labels=["route", "code"])
        for ri, route in enumerate(L.ROUTES):
            for ci, code in enumerate(L.CODES):
                if requests[ri, ci]:
                    c.add_metric([route, str(code) if code else "other"], float(requests[ri, ci]))
        yield c
        h = HistogramMetricFamily("shmmel_http_request_duration_seconds",
                                  "Time until the responder returned (first byte when streamed)",
                                  labels=["route"])
        for ri, route in enumerate(L.ROUTES):
            counts = np.cumsum(latency[ri])
            if counts[-1] == 0:
                continue
            buckets = [(repr(b), float(n)) for b, n in zip(L.BUCKETS, counts[:-1])]
            buckets.append(("+Inf", float(counts[-1])))
            h.add_metric([route], buckets, float(lsum[ri]))
        yield h

        w = shm.workers
        st = shm.slots["state"]
        depth = L.queue_depths(st, len(w))
        labels = ["worker", "kind"]
        served = CounterMetricFamily("shmmel_worker_requests", "Requests answered", labels=labels)
        errors = CounterMetricFamily("shmmel_worker_errors", "Requests answered with an error",
                                     labels=labels)
        batches = CounterMetricFamily("shmmel_worker_batches",
                                      "Wake-ups that found work (requests / batches = batch fill)",
                                      labels=labels)
        busy = CounterMetricFamily("shmmel_worker_busy_seconds", "Seconds spent computing",
                                   labels=labels)
        audio = CounterMetricFamily("shmmel_audio_seconds",
                                    "Seconds of audio (and padding) turned into mel frames",
                                    labels=labels)
        restarts = CounterMetricFamily("shmmel_worker_restarts", "Respawns after a death",
                                       labels=["worker"])
        state = GaugeMetricFamily("shmmel_worker_state", "1 for the worker's current state",
                                  labels=["worker", "state"])
        beat = GaugeMetricFamily("shmmel_worker_heartbeat_age_seconds",
                                 "Seconds since the worker's last loop", labels=["worker"])
        queue = GaugeMetricFamily("shmmel_queue_depth", "Requests queued or in work",
                                  labels=["worker"])
        streams = GaugeMetricFamily("shmmel_worker_streams", "Open audio streams held",
                                    labels=["worker"])
        gpu = GaugeMetricFamily("shmmel_gpu_memory_bytes", "Device memory held (CUDA workers)",
                                labels=["worker", "device"])
        crashes = GaugeMetricFamily("shmmel_worker_recent_crashes",
                                    "Deaths within the supervisor's crash window (drives the "
                                    "respawn backoff)", labels=["worker"])
        respawn = GaugeMetricFamily("shmmel_worker_respawn_in_seconds",
                                    "Seconds until a backed-off worker is respawned (0: none)",
                                    labels=["worker"])
        for k in range(len(w)):
            r = w[k]
            kind = L.W_KINDS[int(r["kind"])]
            lab = [str(k), kind]
            served.add_metric(lab, float(r["served"]))
            errors.add_metric(lab, float(r["errors"]))
            batches.add_metric(lab, float(r["batches"]))
            busy.add_metric(lab, float(r["busy_s"]))
            audio.add_metric(lab, float(r["audio_samples"]) / 16000.0)
            restarts.add_metric([str(k)], float(r["restarts"]))
            for code, name in L.W_STATES.items():
                state.add_metric([str(k), name], 1.0 if int(r["state"]) == code else 0.0)
            beat.add_metric([str(k)], max(0.0, now - float(r["heartbeat"])))
            queue.add_metric([str(k)], float(depth[k]))
            streams.add_metric([str(k)], float(r["streams"]))
            crashes.add_metric([str(k)], float(r["crashes"]))
            at = float(r["respawn_at"]) if int(r["state"]) == L.W_BACKOFF else 0.0
            respawn.add_metric([str(k)], max(0.0, at - now) if at else 0.0)
            if int(r["kind"]) == L.K_CUDA:
                gpu.add_metric([str(k), str(int(r["device"]))], float(r["gpu_bytes"]))
        yield from (served, errors, batches, busy, audio, restarts, state, beat, queue, streams,
                    gpu, crashes, respawn)
        yield from self.collect_devices(depth)
        slots = GaugeMetricFamily("shmmel_slots", "Shared-memory slots by state", labels=["state"])
        for name, count in L.slot_counts(st).items():
            slots.add_metric([name], float(count))
        yield slots
        yield GaugeMetricFamily("shmmel_streams_open", "Open audio streams",
                                value=float(StreamTable(shm).open_count()))
        yield GaugeMetricFamily("shmmel_uptime_seconds", "Seconds since the supervisor started",
                                value=now - float(shm.header["started_mono"]))


    def collect_devices(self, depth: np.ndarray) -> Iterator[Any]:
        """Each mel worker's device, and one row of figures per device."""
        w = self.shm.workers
        mel_rows = int((w["kind"] != L.K_WHISPER).sum())
        where = GaugeMetricFamily("shmmel_worker_device", "The device a mel worker uses "
                                  "(1 per worker; absent for CPU workers)",
                                  labels=["worker", "device"])
        for k in range(mel_rows):
            if int(w["device"][k]) >= 0:
                where.add_metric([str(k), str(int(w["device"][k]))], 1.0)
        yield where
        rows = device_rows(w, mel_rows, depth, pinned_streams(w, self.shm.streams))
        util = self.nvml.utilisation([r["device"] for r in rows])
        fams = {
            "ready": GaugeMetricFamily("shmmel_device_workers_ready",
                                       "Ready mel workers on the device (0: down, no new "
                                       "work goes there)", labels=["device"]),
            "memory_bytes": GaugeMetricFamily("shmmel_device_memory_bytes",
                                              "Device memory held by its workers' CuPy pools",
                                              labels=["device"]),
            "streams": GaugeMetricFamily("shmmel_device_streams",
                                         "Audio streams pinned to the device's workers",
                                         labels=["device"]),
            "queue_depth": GaugeMetricFamily("shmmel_device_queue_depth",
                                             "Requests queued on or taken by its workers",
                                             labels=["device"]),
        }
        busy = GaugeMetricFamily("shmmel_device_utilization_ratio",
                                 "GPU busy fraction over NVML's sample period (needs "
                                 "nvidia-ml-py)", labels=["device"])
        for r in rows:
            for key, fam in fams.items():
                fam.add_metric([str(r["device"])], float(r[key]))
            if util and r["device"] in util:
                busy.add_metric([str(r["device"])], util[r["device"]])
        yield from fams.values()
        yield busy


class MetricsResource:
    """GET /metrics (Prometheus text exposition)."""

    def __init__(self, shm: Shm) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ShmCollector(shm))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.registry)
