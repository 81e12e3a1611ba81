"""The shared-memory layout: declared once here, imported by supervisor, workers and HTTP side.

Two POSIX shared-memory segments and two families of semaphores per instance ``I``::

    /shmmel.I.ctl    control segment (small, all metadata)
    +--------------------+  offset 0
    | HEADER             |  magic, version, sizes, pids, times, instance state
    +--------------------+  CtlLayout.workers_off
    | WORKER x workers   |  pid, kind, state, generation, heartbeat, counters (mel workers
    |                    |  first, then whisper_workers rows: a worker's role is its index)
    +--------------------+  CtlLayout.http_off
    | HTTP   x MAX_HTTP  |  gunicorn worker processes: pid, start, requests
    +--------------------+  CtlLayout.slots_off
    | SLOT   x slots     |  request/response header of each data slot
    +--------------------+  CtlLayout.streams_off
    | STREAM x entries   | audio stream table (owner worker, token, idle clock), one
    |                    | partition of stream_entries() per producer row
    +--------------------+  CtlLayout.metrics_off
    | METRICS x MAX_HTTP |  HTTP request counters and latency histograms, per HTTP row
    +--------------------+  CtlLayout.size

    /shmmel.I.data   data segment: slots x slot_bytes of payload, page aligned, so a CUDA
                     worker can register the whole mapping as pinned memory once.

    /shmmel.I.w<k>   semaphore: doorbell of worker k (producers post after a submit)
    /shmmel.I.s<j>   semaphore: reply of slot j (the worker posts when the slot is DONE)

Every offset below derives from the numpy dtypes; ``tests/test_layout.py`` pins them, so a
change here is a deliberate act (bump ``VERSION``).

Slots are partitioned: producer row r of the HTTP table (a gunicorn worker process, or a
benchmark/tool) owns the slots ``partition_range(r, ...)`` and is the only process that
claims them, so a claim never takes a cross-process lock and never races another process.

Slot life cycle (who writes ``state``)::

    FREE --adopt (the partition's producer, when its deque of idle slots runs dry)--> PARKED
    PARKED --claim (producer: a deque pop)--> CLAIMED
    CLAIMED --submit (producer)--> SUBMITTED|k --take (worker k)--> TAKEN|k --answer--> DONE
    DONE/CLAIMED --release (producer: a deque append)--> PARKED

Exactly one party may write a slot at each state, so no lock is held while a request is in
flight: a worker killed at any instant holds nothing that others wait for. A waiting producer
notices the death through the worker's generation (bumped by the supervisor when it reaps)
and frees its slot itself. A slot whose producer died, or gave up waiting on a live worker, is
marked orphaned (owner 0) and set FREE by the supervisor once it is DONE or its worker is gone;
the partition's (new) producer adopts FREE slots again. The supervisor writes only slots
whose owner is dead or 0; a producer adopts only FREE slots: the writers never meet.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"SHMMEL\x00\x01"
VERSION = 7  # 2: S_FREE non-zero, respawn backoff; 3: slot partitions per producer row;
             # 4: stream-table partitions per producer row, stream tokens in requests;
             # 5: a push may open its stream (PUSH_OPEN): an older worker would refuse it;
             # 6: an upload's stream is kept under its slot (PUSH_SLOT), not in the table;
             # 7: replies' frames normalised by the worker (PUSH_PROVISIONAL, ONESHOT_*)
MAX_HTTP = 64  # producer rows: gunicorn worker processes (respawned ones reuse dead rows),
               # benchmarks and tools that talk to the workers directly
SPARE_PARTITIONS = 4  # partitions beyond http_workers: respawn overlap, benches, tools
# A partition holds at least 2 x http_threads + SLOTS_OVER_THREADS slots: every thread may
# hold one request while the requests it had queued on a worker that then stalled sit
# orphaned (the stalled worker may still write them) and their retries take fresh slots.
SLOTS_OVER_THREADS = 4
PAGE = 4096

# instance state (HEADER.state)
INST_STARTING, INST_RUNNING, INST_STOPPING = 0, 1, 2
INST_STATES = {INST_STARTING: "starting", INST_RUNNING: "running", INST_STOPPING: "stopping"}

# worker state (WORKER.state) and kind (WORKER.kind)
W_EMPTY, W_BOOTING, W_READY, W_STOPPING, W_DEAD, W_BACKOFF = 0, 1, 2, 3, 4, 5
W_STATES = {W_EMPTY: "empty", W_BOOTING: "booting", W_READY: "ready",
            W_STOPPING: "stopping", W_DEAD: "dead",
            W_BACKOFF: "backoff"}  # crashed; respawned at WORKER.respawn_at
K_NONE, K_CPU, K_CUDA = 0, 1, 2
K_WHISPER = 3        # a speech-recognition worker (rows after the mel workers)
W_KINDS = {K_NONE: "-", K_CPU: "cpu", K_CUDA: "cuda", K_WHISPER: "whisper"}
MEL_KINDS = (K_CPU, K_CUDA)  # where text and mel audio may go: never to a whisper worker

# slot state (SLOT.state). SUBMITTED and TAKEN carry the target worker in their low byte, so
# a worker finds its work, and a producer a worker's queue depth, with one vectorised compare.
# No state is 0: a word caught half-written (or a segment not yet initialised) never reads as
# FREE. (struct.pack_into zeroes its target before writing it, which once made in-use slots
# read as free to a claimer in another process; every shared word is now written with one
# aligned store, and 0 is kept meaningless as a second line of defence.)
S_FREE, S_CLAIMED, S_PARKED, S_DONE = 1, 2, 3, 4  # PARKED: idle in its producer's partition
S_SUBMITTED, S_TAKEN = 0x100, 0x200   # | worker index (workers <= 256)
S_QUEUED_MIN = S_SUBMITTED            # state >= this: queued on (state & 0xFF)

# slot ops (SLOT.op); the worker dispatches on these
OP_PING = 0          # echo the payload (IPC benchmark)
OP_TEXT = 1          # arg0 = text op (TEXT_OPS); payload UTF-8 in, UTF-8 out
# stream ops carry the entry's token in arg2 (the worker refuses a token that is not the one
# it holds: a request for a stream whose entry was reused never reaches the new stream)
OP_AUDIO_OPEN = 2    # open a stream: arg0 = n_mels, stream = table index, arg2 = token
OP_AUDIO_PUSH = 3    # push audio: arg0 = sample format, arg1 = PUSH_* flags, arg2 = token,
                     # arg3 = lease (the seq of the request's first piece, see MelJobs)
OP_AUDIO_CLOSE = 4   # drop a stream's state without output (client went away); arg2 = token
PUSH_FINAL = 1       # the stream ends with this piece
PUSH_LAST_PIECE = 2  # the last piece of one HTTP request: its lease on the stream ends
PUSH_OPEN = 4        # the push opens its stream (an entry just allocated, arg2 its token):
PUSH_MELS_SHIFT = 8  # n_mels in arg1 >> PUSH_MELS_SHIFT; no separate OPEN round trip
# An upload's stream (one HTTP request, one slot from its first push to its last): the worker
# keeps its state under the slot's index, with no stream-table entry and no lease; arg2 is the
# upload's token (a state another upload left under the slot is not this one's). Also on
# OP_AUDIO_CLOSE (arg1) to drop it.
PUSH_SLOT = 8
# The reply's frames provisionally normalised with the push's running max
# (mel.stream.normalise_into) instead of raw log10: for a request of one piece whose frames go
# out as they are (a session chunk's record). The worker does the three NumPy calls; in an
# HTTP process each of them lets the GIL go and, with other threads waiting for it, costs a
# wait to take it back. An older worker would ignore the bit and answer raw frames (hence
# VERSION 7).
PUSH_PROVISIONAL = 16
# transcription (whisper workers): a job is a stream-table entry pinned to a whisper worker
OP_WHISPER_OPEN = 5      # start a job: stream = table index
OP_WHISPER_FEATURES = 6  # append float32 features: arg0 = byte offset in the window
OP_WHISPER_DECODE = 7    # decode the window received: arg0 = window bytes; reply JSON
OP_WHISPER_CLOSE = 8     # drop the job (frees its table entry)
WHISPER_OPS = (OP_WHISPER_OPEN, OP_WHISPER_FEATURES, OP_WHISPER_DECODE, OP_WHISPER_CLOSE)
# a whole upload in one round trip (no stream entry): payload = samples; arg0 = sample format,
# arg1 = n_mels, arg2 = padding (zero samples appended by the worker: a count, not bytes);
# reply = every frame (r0 = first frame index, r1 = frames, f0 = final max); arg3 =
# ONESHOT_PROVISIONAL: the frames normalised (with the final max), as PUSH_PROVISIONAL
OP_AUDIO_ONESHOT = 9
ONESHOT_PROVISIONAL = 1
AUDIO_OPS = (OP_AUDIO_OPEN, OP_AUDIO_PUSH, OP_AUDIO_CLOSE, OP_AUDIO_ONESHOT)

TEXT_OPS = ("reverse", "upper", "prefix")
TEXT_PART_CHARS = 64  # OP_TEXT with arg1 = 1: the result in parts of this many characters

# audio sample formats (OP_AUDIO_PUSH arg0)
FMT_S16LE, FMT_F32LE = 0, 1
FMT_WIDTH = {FMT_S16LE: 2, FMT_F32LE: 4}

# reply status (SLOT.status); R_BUSY: another request holds the stream (409), R_NO_STREAM: the
# worker holds no stream of that token (404: expired, closed, or its entry reused)
R_OK, R_BAD_INPUT, R_ERROR, R_BUSY, R_NO_STREAM = 0, 1, 2, 3, 4

# stream table state (STREAM.state). RESERVED: taken by its partition's producer, being
# filled (counted against max_streams, invisible to lookups).
ST_FREE, ST_OPEN, ST_RESERVED = 0, 1, 2

HEADER = np.dtype([
    ("magic", "S8"),
    ("version", "<u4"),
    ("state", "<u4"),
    ("n_workers", "<u4"),
    ("n_slots", "<u4"),
    ("slot_bytes", "<u4"),
    ("max_streams", "<u4"),
    ("supervisor_pid", "<i8"),
    ("gunicorn_pid", "<i8"),
    ("started_wall", "<f8"),
    ("started_mono", "<f8"),
    ("port", "<u4"),
    ("http_workers", "<u4"),
    ("host", "S64"),
    ("instance", "S48"),
    ("partitions", "<u4"),   # producer rows with a partition of slots each (<= MAX_HTTP)
], align=True)

WORKER = np.dtype([
    ("pid", "<i8"),
    ("kind", "<u4"),
    ("state", "<u4"),
    ("gen", "<u4"),
    ("device", "<i4"),
    ("restarts", "<u4"),
    ("streams", "<u4"),      # open audio streams held by this worker
    ("heartbeat", "<f8"),    # time.monotonic() of the last loop (CLOCK_MONOTONIC: system wide)
    ("started", "<f8"),
    ("served", "<u8"),       # requests answered
    ("errors", "<u8"),       # requests answered with an error status
    ("batches", "<u8"),      # worker wake-ups that found work
    ("busy_s", "<f8"),       # seconds spent computing
    ("audio_samples", "<u8"),  # audio samples turned into frames
    ("gpu_bytes", "<u8"),    # device memory held by the worker's CuPy pool
    ("respawn_at", "<f8"),   # time.monotonic() of a scheduled respawn (state BACKOFF), else 0
    ("crashes", "<u4"),      # deaths within the supervisor's crash window (drives the backoff)
], align=True)

HTTP = np.dtype([
    ("pid", "<i8"),
    ("started", "<f8"),
    ("requests", "<u8"),
], align=True)

SLOT = np.dtype([
    ("state", "<u4"),
    ("op", "<u4"),
    ("worker", "<u4"),
    ("gen", "<u4"),
    ("seq", "<u8"),          # request id, unique per instance run: (pid << 32) | counter
    ("resp_seq", "<u8"),     # the seq the reply answers; a stale wake-up is told apart by it
    ("owner", "<i8"),        # producer pid; 0 = orphaned (freed by the supervisor)
    ("req_len", "<u4"),
    ("resp_len", "<u4"),
    ("status", "<u4"),
    ("stream", "<i4"),       # stream table index or -1
    ("arg0", "<i8"),
    ("arg1", "<i8"),
    ("arg2", "<i8"),
    ("arg3", "<i8"),
    ("r0", "<i8"),           # op-specific reply integers (frame offset, frame count)
    ("r1", "<i8"),
    ("f0", "<f8"),           # op-specific reply floats (running max)
    ("f1", "<f8"),
    ("t_submit", "<f8"),     # time.monotonic() stamps, for the latency breakdown
    ("t_taken", "<f8"),
    ("t_done", "<f8"),
], align=True)

STREAM = np.dtype([
    ("state", "<u4"),
    ("worker", "<u4"),
    ("gen", "<u4"),
    ("n_mels", "<u4"),
    ("token", "<u8"),        # the public stream id is "<index>-<token hex>": the entry's
                             # use count (high 23 bits) and 40 random bits (see stream_token)
    ("last_used", "<f8"),    # time.monotonic()
    ("frames", "<i8"),
    ("samples", "<i8"),
    ("busy", "<i8"),         # pid of the HTTP process using it now, 0 when idle
    ("padding", "<i8"),      # zero samples the HTTP side appends at the end of the stream
], align=True)


# HTTP metrics: one row per HTTP table row, written only by the process owning that row
# (a respawned process inherits a dead one's row and counts on from its values, so sums over
# rows never go backwards). Read by the /metrics collector in any process.
ROUTES = ("process", "audio_stream", "audio_streams", "audio_session", "transcribe",
          "healthz", "readyz", "metrics", "openapi", "openai_transcriptions", "openai_models",
          "other")
CODES = (200, 201, 400, 401, 404, 405, 406, 408, 409, 413, 415, 500, 501, 503, 504,
         0)  # 0: any other
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)  # seconds; a last bucket counts the rest (+Inf)

METRICS = np.dtype([
    ("requests", "<u8", (len(ROUTES), len(CODES))),
    ("latency", "<u8", (len(ROUTES), len(BUCKETS) + 1)),   # per bucket, not cumulative
    ("latency_sum", "<f8", (len(ROUTES),)),
], align=True)


# -- codecs: the hot paths' access to the records above -----------------------------------
# Reads may use these struct codecs (several times faster than numpy field access per
# request); writes never do: struct.pack_into clears its target before writing, so a word
# another process reads at that instant would read 0. Every write of a shared word is one
# aligned store of its full width, through the typed views of Shm (u32, i32, u64, i64, f64)
# at the word indexes below, or numpy item assignment.
SLOT_OFF = {name: SLOT.fields[name][1] for name in SLOT.names}
WORKER_OFF = {name: WORKER.fields[name][1] for name in WORKER.names}
REQ_TAIL = struct.Struct("<IIIiqqqq")   # req_len, resp_len, status, stream, arg0..arg3
U32, I32, U64, F64 = (struct.Struct(f) for f in ("<I", "<i", "<Q", "<d"))
LEN_STATUS = struct.Struct("<II")       # resp_len, status
W_STATE_GEN = struct.Struct("<II")      # worker state, gen
COUNTERS = struct.Struct("<QQQdQ")      # served, errors, batches, busy_s, audio_samples
assert SLOT_OFF["req_len"] + REQ_TAIL.size == SLOT_OFF["r0"]
assert SLOT_OFF["status"] == SLOT_OFF["resp_len"] + 4 and SLOT_OFF["f1"] == SLOT_OFF["r0"] + 24
assert WORKER_OFF["gen"] == WORKER_OFF["state"] + 4
assert WORKER_OFF["audio_samples"] == WORKER_OFF["served"] + 32
assert SLOT.itemsize % 8 == 0
# word indexes of slot fields, relative to the slot's first 4-byte (W4) or 8-byte (W8) word
SLOT_W4 = {n: SLOT_OFF[n] // 4 for n in ("state", "op", "worker", "gen", "req_len", "resp_len",
                                         "status", "stream")}
SLOT_W8 = {n: SLOT_OFF[n] // 8 for n in ("seq", "resp_seq", "owner", "arg0", "r0", "r1", "f0",
                                         "f1", "t_submit", "t_taken", "t_done")}


def queue_depths(states: np.ndarray, n_workers: int) -> np.ndarray:
    """Requests queued on or taken by each worker, from the slot state column."""
    return np.bincount(states[states >= S_QUEUED_MIN] & 0xFF, minlength=n_workers)


def slot_counts(states: np.ndarray) -> dict[str, int]:
    """How many slots are in each state (queued/working summed over workers)."""
    return {
        "free": int((states == S_FREE).sum()),
        "parked": int((states == S_PARKED).sum()),  # idle in a producer's partition
        "claimed": int((states == S_CLAIMED).sum()),
        "queued": int(((states & 0xF00) == S_SUBMITTED).sum()),
        "working": int(((states & 0xF00) == S_TAKEN).sum()),
        "done": int((states == S_DONE).sum()),
    }


def partitions_for(http_workers: int) -> int:
    """How many producer partitions an instance has (one per HTTP table row in use)."""
    return min(MAX_HTTP, http_workers + SPARE_PARTITIONS)


def slots_for(requested: int, http_workers: int, http_threads: int) -> int:
    """The slot count: at least what every partition needs for its threads."""
    return max(requested,
               partitions_for(http_workers) * (2 * http_threads + SLOTS_OVER_THREADS))


def partition_range(row: int, n_slots: int, partitions: int) -> range:
    """The slots of producer row ``row``: claimed and released by that process alone."""
    per = n_slots // partitions
    return range(row * per, (row + 1) * per)


# Stream-table entries are partitioned like the slots: producer row r alone takes the FREE
# entries of stream_partition(r, ...) (a stream's open takes no cross-process lock), while any
# process looks up any entry (a session's chunks reach any HTTP process). max_streams is the
# global limit on open streams; a partition holds up to STREAM_SHARE x its fair share of it, so
# uneven spreading of opens over HTTP processes does not refuse streams below the limit.
STREAM_SHARE = 4
TOKEN_RANDOM_BITS = 40


def stream_entries_per_partition(max_streams: int, http_workers: int) -> int:
    return min(max_streams, -(-STREAM_SHARE * max_streams // max(1, http_workers)))


def stream_entries(max_streams: int, http_workers: int) -> int:
    """The stream table's length: a partition of entries for every producer row."""
    return partitions_for(http_workers) * stream_entries_per_partition(max_streams, http_workers)


def stream_partition(row: int, entries: int, partitions: int) -> range:
    """The stream-table entries that producer row ``row`` alone allocates."""
    per = entries // partitions
    return range(row * per, (row + 1) * per)


def stream_token(previous: int, random_bits: int) -> int:
    """The token of an entry's next stream: its use count (the previous token's, plus one,
    in 23 bits, never 0) over ``random_bits``. A reused entry never repeats a token within
    2^23 - 1 uses, so a stale stream id can never name the new stream; the random part keeps
    ids unguessable. Fits an i64 slot argument."""
    uses = (previous >> TOKEN_RANDOM_BITS) % ((1 << 23) - 1) + 1
    return (uses << TOKEN_RANDOM_BITS) | (random_bits & ((1 << TOKEN_RANDOM_BITS) - 1))


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


class CtlLayout:
    """Offsets of the control segment for given sizes (all derived from the dtypes above)."""

    def __init__(self, n_workers: int, n_slots: int, n_streams: int) -> None:
        self.n_workers, self.n_slots, self.n_streams = n_workers, n_slots, n_streams
        self.header_off = 0
        self.workers_off = _align(HEADER.itemsize)
        self.http_off = _align(self.workers_off + WORKER.itemsize * n_workers)
        self.slots_off = _align(self.http_off + HTTP.itemsize * MAX_HTTP)
        self.streams_off = _align(self.slots_off + SLOT.itemsize * n_slots)
        self.metrics_off = _align(self.streams_off + STREAM.itemsize * n_streams)
        self.size = _align(self.metrics_off + METRICS.itemsize * MAX_HTTP, PAGE)

    def views(self, buf) -> tuple[np.ndarray, ...]:
        """(header, workers, http, slots, streams, metrics) as numpy views over ``buf``."""
        header = np.frombuffer(buf, HEADER, 1, self.header_off)
        workers = np.frombuffer(buf, WORKER, self.n_workers, self.workers_off)
        http = np.frombuffer(buf, HTTP, MAX_HTTP, self.http_off)
        slots = np.frombuffer(buf, SLOT, self.n_slots, self.slots_off)
        streams = np.frombuffer(buf, STREAM, self.n_streams, self.streams_off)
        metrics = np.frombuffer(buf, METRICS, MAX_HTTP, self.metrics_off)
        return header, workers, http, slots, streams, metrics


def data_size(n_slots: int, slot_bytes: int) -> int:
    return n_slots * slot_bytes


# Names. Instance names cannot contain ".", so "shmmel.<instance>." prefixes never collide.
def prefix(instance: str) -> str:
    return f"shmmel.{instance}."


def ctl_name(instance: str) -> str:
    return f"/{prefix(instance)}ctl"


def data_name(instance: str) -> str:
    return f"/{prefix(instance)}data"


def doorbell_name(instance: str, worker: int) -> str:
    return f"/{prefix(instance)}w{worker}"


def reply_name(instance: str, slot: int) -> str:
    return f"/{prefix(instance)}s{slot}"
