#!/usr/bin/env bash
# One batched GPU-host run of `shmmel bench` (issue 5). On the device:
#   source .device/setup && bash bench/gpu_run.sh
# Everything lands in $OUT (JSON, .hgrm, PNG, logs).
set -u
FINAL=${OUT:-}; OUT=/tmp/bench-out; mkdir -p "$OUT"  # $OUT returns at most 8 files: tar at the end
B="python3 -m shmmel_cli.main bench"
export PYTHONPATH="$PWD/cli:${PYTHONPATH:-}"
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/host.txt"
python3 -c "import sys; print(sys.version)" | tee -a "$OUT/host.txt"
step() { echo "=== $*" | tee -a "$OUT/steps.log"; local t=$SECONDS; "$@" 2>&1 | tee -a "$OUT/steps.log"; echo "--- $((SECONDS - t)) s" | tee -a "$OUT/steps.log"; }
step $B text --spawn --worker-kind cpu --http-workers 8 --sweep workers=1,2,4,8 -c 100 -d 5 --warmup 1 --save "$OUT/text_sweep.json" --log-dir "$OUT"
step $B text --spawn --worker-kind cpu -w 4 --http-workers 8 -c 100 -d 10 --warmup 2 --baseline --burst 1000 --save "$OUT/text.json" --hgrm "$OUT/text.hgrm" --plot "$OUT/text.png" --log-dir "$OUT"
step $B text --spawn --worker-kind cpu -w 8 --http-workers 8 -c 100 -d 10 --warmup 2 --save "$OUT/text_w8.json" --log-dir "$OUT"
step $B text --spawn --worker-kind cpu -w 4 --http-workers 8 -c 100 -d 10 --warmup 2 --rate 5000 --save "$OUT/text_open.json" --hgrm "$OUT/text_open.hgrm" --log-dir "$OUT"
step $B text --spawn --worker-kind cpu -w 4 --http-workers 8 -c 100 -d 10 --warmup 2 --sizes 64,512,4096 --ops reverse,upper,prefix --save "$OUT/text_mix.json" --log-dir "$OUT"
step python3 bench/check_vs_wrk.py --spawn --workers 4 --http-workers 8 --connections 100 --wrk-threads 4 --duration 5 --rounds 4 --json "$OUT/wrk_check.json"
step $B audio --spawn --worker-kind cuda -w 4 --http-workers 8 --streams 8 --pace realtime -d 10 --baseline --save "$OUT/audio.json" --hgrm "$OUT/audio.hgrm" --plot "$OUT/audio.png" --log-dir "$OUT"
step $B audio --spawn --worker-kind cuda -w 4 --http-workers 8 --streams 32 --pace fast -d 8 --save "$OUT/audio_fast32.json" --log-dir "$OUT"
step $B audio --spawn --worker-kind cuda --http-workers 8 --streams 32 --phases files -d 5 --sweep workers=1,2,4,8 --save "$OUT/audio_sweep.json" --log-dir "$OUT"
ls /dev/shm | grep -c shmmel || true
[ -n "$FINAL" ] && tar czf "$FINAL/results.tgz" -C "$OUT" . && cp "$OUT/steps.log" "$FINAL/steps.log"
