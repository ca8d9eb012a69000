#!/usr/bin/env bash
# GradCache benchmark: peak memory (RSS of the training process) and seconds per step versus
# the logical batch size, with and without GradCache, fine-tuning the shipped model on
# Fashion-MNIST with frozen BatchNorm statistics (what GradCache requires).
#
#   scripts/bench_gradcache.sh                 # batches 64 256 1024, chunk 64, 4 steps each
#   BATCHES="128 512" CHUNK=32 STEPS=3 scripts/bench_gradcache.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CROSSBATCH:-$ROOT/target/release/crossbatch}"
BATCHES="${BATCHES:-64 256 1024}"
CHUNK="${CHUNK:-64}"
STEPS="${STEPS:-4}"
THREADS="${THREADS:-2}"
IMAGES=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "| logical batch | GradCache chunk | s/step | peak RSS MB |"
echo "|---:|---:|---:|---:|"
for batch in $BATCHES; do
  for chunk in 0 "$CHUNK"; do
    /usr/bin/time -f %M -o "$WORK/rss" "$BIN" train --format idx --limit 10000 \
      --init "$ROOT/models/default" --out "$WORK/model" --steps "$STEPS" --batch-size "$batch" \
      --per-class $((batch / 10)) --norm frozen --gradcache-chunk "$chunk" --threads "$THREADS" \
      --device cpu "$IMAGES" >"$WORK/out" 2>"$WORK/err"
    seconds=$(sed -n 's/.*trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' "$WORK/out" "$WORK/err" | head -1)
    rss=$(($(cat "$WORK/rss") / 1024))
    step=$(awk -v s="$seconds" -v n="$STEPS" 'BEGIN { printf "%.2f", s / n }')
    echo "| $batch | $([ "$chunk" = 0 ] && echo off || echo "$chunk") | $step | $rss |"
  done
done
