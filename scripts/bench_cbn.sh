#!/usr/bin/env bash
# Cross-Iteration BatchNorm benchmark: online fine-tuning with tiny batches. The shipped model
# (trained on Fashion-MNIST) is fine-tuned on the glyph training classes at batch sizes 2, 4
# and 8 (K = 2 images per class, XBM supplying the negatives as in the online trainer) with
# each BatchNorm mode; retrieval is measured on the unseen glyph test classes. Same seed, steps
# and learning rate for every row. Prints a Markdown table.
#
#   scripts/bench_cbn.sh                               # ~25 min on two free CPU cores
#   STEPS=200 BATCHES="4" NORMS="bn cbn" scripts/bench_cbn.sh   # quick check
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CROSSBATCH:-$ROOT/target/release/crossbatch}"
INIT="${INIT:-$ROOT/models/default}"
CLASSES="${CLASSES:-1000}"
MAX_FONTS="${MAX_FONTS:-24}"
SIZE="${SIZE:-32}"
GLYPHS_DIR="${GLYPHS_DIR:-/tmp/crossbatch-glyphs-${CLASSES}c-${MAX_FONTS}f-${SIZE}px}"
BATCHES="${BATCHES:-2 4 8}"
NORMS="${NORMS:-bn naive cbn frozen}"
STEPS="${STEPS:-800}"
LR="${LR:-5e-4}"
SEED="${SEED:-0}"
WINDOW="${WINDOW:-4}"
BURNIN="${BURNIN:-20}"
MEMORY_SIZE="${MEMORY_SIZE:-1024}"
MEMORY_START="${MEMORY_START:-20}"
THREADS="${THREADS:-2}"
DEVICE="${DEVICE:-cpu}"
WORK_DIR="${WORK_DIR:-/tmp/crossbatch-bench-cbn}"

source "$ROOT/scripts/bench_lib.sh"
use_private_binary
ensure_glyphs

read -r base_r1 _ _ _ base_map < <(eval_glyph_test "$INIT" "$WORK_DIR/init")
rows=("| shipped model, not fine-tuned | – | – | $(awk -v r="$base_r1" -v m="$base_map" \
    'BEGIN { printf "%.1f | %.1f | – |", 100*r, 100*m }')")
started=$SECONDS
for batch in $BATCHES; do
    for norm in $NORMS; do
        name="b${batch}-${norm}"
        echo "== $name" >&2
        rm -rf "$WORK_DIR/$name"
        "$BIN" train --format imagefolder --init "$INIT" --out "$WORK_DIR/$name" \
            --steps "$STEPS" --batch-size "$batch" --per-class 2 --lr "$LR" --seed "$SEED" \
            --loss multi-similarity --memory-size "$MEMORY_SIZE" --memory-start "$MEMORY_START" \
            --norm "$norm" --cbn-window "$WINDOW" --cbn-burnin "$BURNIN" \
            --threads "$THREADS" --device "$DEVICE" "$GLYPHS_DIR/train" \
            2> "$WORK_DIR/$name.train.log"
        train_s=$(sed -n 's/^trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' "$WORK_DIR/$name.train.log")
        read -r r1 _ _ _ map < <(eval_glyph_test "$WORK_DIR/$name" "$WORK_DIR/$name")
        row=$(awk -v n="$norm" -v b="$batch" -v r1="$r1" -v map="$map" -v t="$train_s" \
            -v s="$STEPS" 'BEGIN { printf "| %s | %d | %d | %.1f | %.1f | %.1f |",
            n, b, s, 100*r1, 100*map, 1000*t/s }')
        echo "$row" >&2
        rows+=("$row")
    done
done

echo
echo "Fine-tuning $INIT on the glyph training classes, evaluated on the unseen test classes" \
     "(leave-one-out, exact kNN, %). Multi-similarity + XBM ($MEMORY_SIZE rows from step" \
     "$MEMORY_START), K=2 per class, lr $LR, seed $SEED, $THREADS thread(s), $DEVICE;" \
     "cbn/naive: window $WINDOW, burn-in $BURNIN steps."
echo
echo "| BatchNorm | batch | steps | R@1 | MAP@R | ms/step |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "total $((SECONDS - started)) s (models and logs in $WORK_DIR)"
