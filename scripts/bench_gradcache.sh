#!/usr/bin/env bash
# GradCache benchmark: peak memory (the training process's peak RSS, which `train` reports; with
# DEVICE=cuda:N also the peak GPU memory in use, sampled with nvidia-smi) and seconds per step
# versus the logical batch size, with and without GradCache, fine-tuning the shipped model on
# Fashion-MNIST with frozen BatchNorm statistics (what GradCache requires).
#
#   scripts/bench_gradcache.sh                 # batches 64 256 1024, chunk 64, 4 steps each
#   BATCHES="128 512" CHUNK=32 STEPS=3 scripts/bench_gradcache.sh
#   DEVICE=cuda:0 BATCHES="1024 4096 16384" CHUNK=1024 scripts/bench_gradcache.sh   # GPU machine
#
# The GPU column is the growth of the GPU's used memory over its level before the run (nothing
# else runs on the benchmark GPU): the CUDA context plus what PyTorch's caching allocator holds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CROSSBATCH:-$ROOT/target/release/crossbatch}"
BATCHES="${BATCHES:-64 256 1024}"
CHUNK="${CHUNK:-64}"
STEPS="${STEPS:-4}"
THREADS="${THREADS:-2}"
DEVICE="${DEVICE:-cpu}"
IMAGES="${IMAGES:-/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

gpu_used_mib() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "${DEVICE#cuda:}" |
        head -1 | tr -d ' '
}

# gpu_peak PID BASELINE OUT: samples the GPU's used memory while PID runs and writes the peak
# growth over BASELINE (MiB) to OUT.
gpu_peak() {
    local pid=$1 baseline=$2 out=$3 peak=0 used
    while kill -0 "$pid" 2>/dev/null; do
        used=$(gpu_used_mib 2>/dev/null || true)
        [[ "$used" =~ ^[0-9]+$ ]] && ((used - baseline > peak)) && peak=$((used - baseline))
        sleep 0.1
    done
    echo "$peak" >"$out"
}

gpu=false
[[ "$DEVICE" == cuda* ]] && command -v nvidia-smi >/dev/null && gpu=true
echo "| logical batch | GradCache chunk | s/step | peak RSS MB |$($gpu && echo ' peak GPU MiB |')"
echo "|---:|---:|---:|---:|$($gpu && echo '---:|')"
for batch in $BATCHES; do
    for chunk in 0 "$CHUNK"; do
        $gpu && baseline=$(gpu_used_mib)
        "$BIN" train --format idx --limit 10000 --init "$ROOT/models/default" \
            --out "$WORK/model" --steps "$STEPS" --batch-size "$batch" \
            --per-class $((batch / 10)) --norm frozen --gradcache-chunk "$chunk" \
            --threads "$THREADS" --device "$DEVICE" "$IMAGES" >"$WORK/out" 2>"$WORK/log" &
        trainer=$!
        $gpu && gpu_peak "$trainer" "$baseline" "$WORK/gpu" &
        if ! wait "$trainer"; then
            echo "| $batch | $chunk | failed: $(tail -1 "$WORK/log") |"
            wait
            continue
        fi
        wait
        summary=$(grep '^trained ' "$WORK/log" | tail -1)
        seconds=$(sed -n 's/^trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' <<<"$summary")
        rss=$(sed -n 's/.*peak RSS \([0-9]*\) MB.*/\1/p' <<<"$summary")
        step=$(awk -v s="$seconds" -v n="$STEPS" 'BEGIN { printf "%.3f", s / n }')
        echo "| $batch | $([ "$chunk" = 0 ] && echo off || echo "$chunk") | $step | $rss |$($gpu && echo " $(cat "$WORK/gpu") |")"
    done
done
