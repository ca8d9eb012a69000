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

# gpu_used_mib [-lms MS]: the GPU's used memory in MiB, once or every MS milliseconds.
gpu_used_mib() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "${DEVICE#cuda:}" "$@"
}

gpu=false
[[ "$DEVICE" == cuda* ]] && command -v nvidia-smi >/dev/null && gpu=true
echo "| logical batch | GradCache chunk | s/step | peak RSS MB |$($gpu && echo ' peak GPU MiB |')"
echo "|---:|---:|---:|---:|$($gpu && echo '---:|')"
failed=0
for batch in $BATCHES; do
    for chunk in 0 "$CHUNK"; do
        if $gpu; then
            baseline=$(gpu_used_mib | head -1)
            gpu_used_mib -lms 20 >"$WORK/gpu" &
            sampler=$!
        fi
        "$BIN" train --format idx --limit 10000 --init "$ROOT/models/default" \
            --out "$WORK/model" --steps "$STEPS" --batch-size "$batch" \
            --per-class $((batch / 10)) --loss contrastive --norm frozen --gradcache-chunk "$chunk" \
            --threads "$THREADS" --device "$DEVICE" "$IMAGES" >"$WORK/out" 2>"$WORK/log" &
        trainer=$!
        status=0
        wait "$trainer" || status=$?
        gpu_col=""
        if $gpu; then
            kill "$sampler" && wait "$sampler" || true
            peak=$(awk -v b="$baseline" '$1 ~ /^[0-9]+$/ && $1 - b > p { p = $1 - b } END { print p + 0 }' "$WORK/gpu")
            gpu_col=" $peak |"
        fi
        if ((status != 0)); then
            echo "| $batch | $chunk | failed: $(tail -1 "$WORK/log") | – |$gpu_col"
            failed=1
            continue
        fi
        summary=$(grep '^trained ' "$WORK/log" | tail -1)
        seconds=$(sed -n 's/^trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' <<<"$summary")
        rss=$(sed -n 's/.*peak RSS \([0-9]*\) MB.*/\1/p' <<<"$summary")
        step=$(awk -v s="$seconds" -v n="$STEPS" 'BEGIN { printf "%.3f", s / n }')
        echo "| $batch | $([ "$chunk" = 0 ] && echo off || echo "$chunk") | $step | $rss |$gpu_col"
    done
done
exit "$failed"
