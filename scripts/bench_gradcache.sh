#!/usr/bin/env bash
# GradCache benchmark: peak memory (RSS of the training process; with DEVICE=cuda:N also the
# peak GPU memory nvidia-smi reports for it) and seconds per step versus the logical batch
# size, with and without GradCache, fine-tuning the shipped model on Fashion-MNIST with frozen
# BatchNorm statistics (what GradCache requires).
#
#   scripts/bench_gradcache.sh                 # batches 64 256 1024, chunk 64, 4 steps each
#   BATCHES="128 512" CHUNK=32 STEPS=3 scripts/bench_gradcache.sh
#   DEVICE=cuda:0 BATCHES="1024 4096 16384" scripts/bench_gradcache.sh   # on a GPU machine
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CROSSBATCH:-$ROOT/target/release/crossbatch}"
BATCHES="${BATCHES:-64 256 1024}"
CHUNK="${CHUNK:-64}"
STEPS="${STEPS:-4}"
THREADS="${THREADS:-2}"
DEVICE="${DEVICE:-cpu}"
IMAGES=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# gpu_peak PID OUT: polls nvidia-smi while PID runs and writes its peak used GPU memory (MiB).
gpu_peak() {
  local pid=$1 out=$2 peak=0 used
  while kill -0 "$pid" 2>/dev/null; do
    used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
      awk -F', ' -v p="$pid" '$1 == p { print $2 }')
    [[ -n "$used" && "$used" -gt "$peak" ]] && peak=$used
    sleep 0.2
  done
  echo "$peak" > "$out"
}

gpu=false
[[ "$DEVICE" == cuda* ]] && command -v nvidia-smi >/dev/null && gpu=true
echo "| logical batch | GradCache chunk | s/step | peak RSS MB |$($gpu && echo ' peak GPU MiB |')"
echo "|---:|---:|---:|---:|$($gpu && echo '---:|')"
for batch in $BATCHES; do
  for chunk in 0 "$CHUNK"; do
    /usr/bin/time -f %M -o "$WORK/rss" "$BIN" train --format idx --limit 10000 \
      --init "$ROOT/models/default" --out "$WORK/model" --steps "$STEPS" --batch-size "$batch" \
      --per-class $((batch / 10)) --norm frozen --gradcache-chunk "$chunk" --threads "$THREADS" \
      --device "$DEVICE" "$IMAGES" >"$WORK/out" 2>"$WORK/err" &
    timer=$!
    if $gpu; then
      # The training process is the child of /usr/bin/time.
      sleep 0.5
      gpu_peak "$(pgrep -P "$timer" | head -1)" "$WORK/gpu" &
    fi
    wait "$timer"
    gpu_col=""
    if $gpu; then wait; gpu_col=" $(cat "$WORK/gpu") |"; fi
    seconds=$(sed -n 's/.*trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' "$WORK/out" "$WORK/err" | head -1)
    rss=$(($(cat "$WORK/rss") / 1024))
    step=$(awk -v s="$seconds" -v n="$STEPS" 'BEGIN { printf "%.2f", s / n }')
    echo "| $batch | $([ "$chunk" = 0 ] && echo off || echo "$chunk") | $step | $rss |$gpu_col"
  done
done
