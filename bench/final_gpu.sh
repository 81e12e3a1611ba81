#!/usr/bin/env bash
# The lead's GPU-host batch for 2026-11-22: GPU tests, IPC (with and without worker spin),
# a settled re-run of the text load, audio at 8/64/256 streams, CUDA workers per GPU.
#   source .device/setup && bash bench/final_gpu.sh      (results: $OUT/final.tgz)
set -u
FINAL=${OUT:-/tmp}; OUT=/tmp/final-out; mkdir -p "$OUT"
export PYTHONPATH="$PWD/cli:${PYTHONPATH:-}"
B="python3 -m shmmel_cli.main bench"
step() { echo "=== $*" | tee -a "$OUT/steps.log"; local t=$SECONDS; "$@" >>"$OUT/steps.log" 2>&1; echo "--- rc=$? $((SECONDS - t)) s" | tee -a "$OUT/steps.log"; }
lscpu | grep -E "Model name|^CPU\(s\)" > "$OUT/host.txt"; nvidia-smi -L >> "$OUT/host.txt"
step python3 -m pytest -q tests/test_mel_gpu.py tests/test_gpu_service.py
step python3 bench/bench_ipc.py --producers 1 8 --seconds 4 --workers 2 --spin-us 0 100
step python3 bench/check_vs_wrk.py --spawn --workers 4 --http-workers 8 --connections 100 --wrk-threads 4 --duration 5 --rounds 4 --json "$OUT/wrk_check.json"
# a named instance, so its state can be read right after the load (stuck requests?)
SHMMEL_WHISPER_WORKERS=0 SHMMEL_LOG_FILE="$OUT/text_w4_instance.log" python3 -m shmmel_cli.main up --instance tw4 --port 0 --worker-kind cpu -w 4 --http-workers 8 >>"$OUT/steps.log" 2>&1
step $B text --instance tw4 --http-workers 8 -c 100 -d 8 --warmup 2 --baseline --save "$OUT/text_w4.json"
sleep 1; python3 -m shmmel_cli.main status --instance tw4 --json > "$OUT/text_w4_status.json" 2>&1
python3 -m shmmel_cli.main down --instance tw4 >>"$OUT/steps.log" 2>&1
step $B text --spawn --worker-kind cpu -w 8 --http-workers 8 -c 100 -d 8 --warmup 2 --save "$OUT/text_w8.json" --log-dir "$OUT"
for s in 8 64 256; do
  step $B audio --spawn --worker-kind cuda -w 2 --http-workers 8 --streams $s --pace realtime --phases chunks -d 8 --save "$OUT/audio_rt_$s.json" --log-dir "$OUT"
done
step $B audio --spawn --worker-kind cuda -w 2 --http-workers 8 --streams 64 --pace fast --phases chunks,files -d 6 --baseline --save "$OUT/audio_fast64.json" --log-dir "$OUT"
step $B audio --spawn --worker-kind cuda --http-workers 8 --streams 64 --pace fast --phases chunks -d 5 --sweep workers=1,2,4 --save "$OUT/audio_sweep.json" --log-dir "$OUT"
grep -h "no heartbeat\|Traceback\|ERROR" "$OUT"/*.log 2>/dev/null | sort | uniq -c | head -20 > "$OUT/log_errors.txt"
ls /dev/shm | grep -c shmmel >> "$OUT/log_errors.txt" || true
tar czf "$FINAL/final.tgz" -C "$OUT" . ; cp "$OUT/steps.log" "$FINAL/steps.log"
