#!/usr/bin/env bash
# Where an audio load spends its time, on the GPU host: py-spy (raw, --idle) of the CUDA
# workers and one HTTP process, and every shmmel process's CPU share, under
# `shmmel bench audio --pace fast` (files, then chunks). On the device:
#   source .device/setup && bash bench/profile_audio.sh [workers] [http] [streams]
# (needs py-spy: ../shared/device/stage py-spy==0.4.3). Results: $OUT/profile_audio.tgz
set -u
W=${1:-2}; H=${2:-8}; N=${3:-64}; SEC=${PROF_SECONDS:-4}; KIND=${PROF_KIND:-cuda}
FINAL=${OUT:-/tmp}; O=/tmp/prof-audio; rm -rf "$O"; mkdir -p "$O"
export PYTHONPATH="$PWD/cli:${PYTHONPATH:-}"
S="python3 -m shmmel_cli.main"
I=prof$$
cpu() {  # pid -> utime+stime ticks, one line a pid
  for p in "$@"; do awk -v p="$p" '{print p, $14 + $15}' /proc/"$p"/stat 2>/dev/null; done
}
$S up -i "$I" --port 0 --worker-kind "$KIND" -w "$W" --http-workers "$H" > "$O/up.log" 2>&1
$S status -i "$I" --json > "$O/status.json"
WP=$(python3 -c "import json; d=json.load(open('$O/status.json')); print(' '.join(str(w['pid']) for w in d['workers'] if w['kind'] == '$KIND'))")
HP=$(python3 -c "import json; d=json.load(open('$O/status.json')); print(' '.join(str(h['pid']) for h in d['http']))")
ALL=$(python3 -c "import json; d=json.load(open('$O/status.json')); print(' '.join(str(x) for x in [d['pid'], d['gunicorn_pid']] + [w['pid'] for w in d['workers']] + [h['pid'] for h in d['http']]))")
echo "cuda workers: $WP; http: $HP" | tee "$O/pids.txt"
for phase in ${PROF_PHASES:-files chunks}; do
  $S bench audio -i "$I" --streams "$N" --pace fast --phases "$phase" -d $((SEC + 5)) --warmup 1 \
    --no-verify --gpu-index 0 --save "$O/$phase.json" > "$O/bench_$phase.log" 2>&1 &
  B=$!
  # sample only once the measured load runs (its first progress line); the load processes
  # take seconds to start
  for _ in $(seq 300); do grep -qE "[0-9.]+/[0-9]+ s" "$O/bench_$phase.log" && break; sleep 0.1; done
  cpu $ALL > "$O/cpu_${phase}_0.txt"; date +%s.%N > "$O/t_${phase}_0"
  for p in $WP; do py-spy record --idle -f raw -r 250 -d "$SEC" -o "$O/spy_${phase}_w$p.txt" --pid "$p" > /dev/null 2>&1 & done
  h1=${HP%% *}
  py-spy record --idle -f raw -r 250 -d "$SEC" -o "$O/spy_${phase}_h$h1.txt" --pid "$h1" > /dev/null 2>&1 &
  sleep "$SEC"
  cpu $ALL > "$O/cpu_${phase}_1.txt"; date +%s.%N > "$O/t_${phase}_1"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader >> "$O/gpu_util.txt"
  wait
  w0=${WP%% *}
  $S bench audio -i "$I" --streams "$N" --pace fast --phases "$phase" -d $((SEC + 4)) --warmup 1 \
    --no-verify --gpu-index -1 > "$O/bench2_$phase.log" 2>&1 &
  for _ in $(seq 300); do grep -qE "[0-9.]+/[0-9]+ s" "$O/bench2_$phase.log" && break; sleep 0.1; done
  py-spy record --native -f raw -r 100 -d "$SEC" -o "$O/spynative_${phase}_w$w0.txt" --pid "$w0" > /dev/null 2>&1
  wait
done
$S status -i "$I" --json > "$O/status_end.json"
$S down -i "$I" > /dev/null 2>&1
cp /tmp/shmmel-"$I".log "$O/" 2>/dev/null
tar czf "$FINAL/profile_audio${PROF_TAG:-}.tgz" -C "$O" .
