#!/usr/bin/env bash
# CPU a mel worker spends per chunk and per batch (engine call) under the chunk load of
# `shmmel bench audio --streams 64 --pace fast`, read from /proc (utime + stime of the
# workers, and of the HTTP processes) and from the workers' served/batches counters
# (`shmmel status --json`) over the same 5 s window. CPU time is far steadier on a shared
# host than latency, so a change to the worker loop shows here when a p50 ratio cannot.
#   bash bench/worker_cpu_audio.sh [reps] [label=PYTHONPATH ...]
# With no variants, the code on PYTHONPATH as "this"; with several, they alternate within
# each rep (e.g. "new=$PWD/src:$PWD/cli" "old=/tmp/before/src:/tmp/before/cli"). WORKERS,
# HTTP and KIND (cuda; cpu works too) set the instance. One line a run, also in $OUT/cpu.txt.
set -u
REPS=${1:-2}; shift || true
[ $# -gt 0 ] || set -- "this=${PYTHONPATH:-}"
KIND=${KIND:-cuda}; W=${WORKERS:-2}; H=${HTTP:-8}; O=${OUT:-/tmp}
ticks() {  # pids -> their utime + stime, summed (clock ticks)
  for p in "$@"; do awk '{print $14 + $15}' /proc/"$p"/stat 2>/dev/null; done | awk '{s += $1} END {print s + 0}'
}
measure() {  # label pythonpath
  local I="wcpu$$_$1" S="python3 -m shmmel_cli.main" T
  T=$(mktemp -d)
  PYTHONPATH=$2 timeout 60 $S up -i "$I" --port 0 --worker-kind "$KIND" -w "$W" --http-workers "$H" > "$T/up.log" 2>&1 \
    || { echo "$1: up failed: $(tail -1 "$T/up.log")"; rm -rf "$T"; return; }
  PYTHONPATH=$2 $S status -i "$I" --json > "$T/s0.json"
  local pids="import json, sys; d = json.load(open(sys.argv[1]))"
  WP=$(python3 -c "$pids; print(' '.join(str(w['pid']) for w in d['workers'] if w['kind'] == '$KIND'))" "$T/s0.json")
  HP=$(python3 -c "$pids; print(' '.join(str(h['pid']) for h in d['http']))" "$T/s0.json")
  PYTHONPATH=$2 timeout 60 $S bench audio -i "$I" --streams 64 --pace fast --phases chunks -d 6 --warmup 1 \
    --no-verify --save "$T/bench.json" > "$T/bench.log" 2>&1 &
  local B=$!
  # the window starts once the measured load runs (its first progress line)
  for _ in $(seq 300); do grep -qE "[0-9.]+/[0-9]+ s" "$T/bench.log" && break; sleep 0.1; done
  PYTHONPATH=$2 $S status -i "$I" --json > "$T/s1.json"; w0=$(ticks $WP); h0=$(ticks $HP)
  sleep 5
  PYTHONPATH=$2 $S status -i "$I" --json > "$T/s2.json"; w1=$(ticks $WP); h1=$(ticks $HP)
  wait $B
  python3 - "$T" "$1" "$KIND" "$((w1 - w0))" "$((h1 - h0))" "$(getconf CLK_TCK)" <<'EOF' | tee -a "$O/cpu.txt"
import json, sys
t, label, kind, wt, ht, hz = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
a, b = (json.load(open(f"{t}/s{i}.json")) for i in (1, 2))
count = lambda d, k: sum(w[k] for w in d["workers"] if w["kind"] == kind)
n, nb = count(b, "served") - count(a, "served"), count(b, "batches") - count(a, "batches")
us = 1e6 / hz
ch = json.load(open(f"{t}/bench.json"))["shmmel"]["chunks"]
print(f"{label}: {n} items in {nb} batches ({n / max(nb, 1):.2f} a batch); workers "
      f"{wt * us / max(n, 1):.1f} us an item, {wt * us / max(nb, 1):.1f} us a batch; HTTP "
      f"{ht * us / max(n, 1):.1f} us an item; chunk p50 {ch['chunk_ms']['p50']} ms, "
      f"{ch['chunks_per_s']['mean']:.0f} chunks/s, errors {ch['error_count']}")
EOF
  PYTHONPATH=$2 $S down -i "$I" > /dev/null 2>&1
  rm -rf "$T"
}
export PYTHONPATH="${PYTHONPATH:-}"
for _ in $(seq "$REPS"); do
  for v in "$@"; do measure "${v%%=*}" "${v#*=}"; done
done
