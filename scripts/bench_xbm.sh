#!/usr/bin/env bash
# Many-class XBM benchmark: train on half of the glyph classes, evaluate retrieval (leave-one-out
# Recall@K and MAP@R, exact kNN) on the unseen other half, with and without cross-batch memory
# at the same seed, batch size, steps and learning rate. Prints a Markdown table with XBM's
# overhead (seconds per training step, peak RSS of the training process).
#
#   scripts/bench_xbm.sh                       # defaults below, ~15 min on one free CPU core
#   STEPS=500 CONFIGS="ctr:32:0 ctr:32:xbm" scripts/bench_xbm.sh   # quick check
#
# A configuration is LOSS:BATCH:MEM[:WEIGHT] with LOSS = ctr (contrastive) | ms
# (multi-similarity), MEM = 0 (no memory) | xbm (MEMORY_SIZE rows from step MEMORY_START) | a row
# count, and WEIGHT the memory-loss weight (default MEMORY_WEIGHT).
# Everything else is shared by all configurations. Models and logs go to $WORK_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${CROSSBATCH:-$ROOT/target/release/crossbatch}"
CLASSES="${CLASSES:-1000}"          # total; half train, half unseen test
MAX_FONTS="${MAX_FONTS:-24}"        # fonts (= images) per class; 0 = all (~47)
SIZE="${SIZE:-32}"
GLYPHS_DIR="${GLYPHS_DIR:-/tmp/crossbatch-glyphs-${CLASSES}c-${MAX_FONTS}f-${SIZE}px}"
STEPS="${STEPS:-1500}"
LR="${LR:-2e-3}"
SEED="${SEED:-0}"
PER_CLASS="${PER_CLASS:-2}"         # K of the P×K batches
WIDTHS="${WIDTHS:-16,32,64}"
EMBEDDING_DIM="${EMBEDDING_DIM:-128}"
MAX_SHIFT="${MAX_SHIFT:-2}"
MEMORY_SIZE="${MEMORY_SIZE:-4096}"
MEMORY_START="${MEMORY_START:-300}"
MEMORY_WEIGHT="${MEMORY_WEIGHT:-1}"
MEMORY_MAX_AGE="${MEMORY_MAX_AGE:-0}"
THREADS="${THREADS:-1}"             # >1 on a busy machine makes OpenMP spin: slower, not faster
DEVICE="${DEVICE:-cpu}"
EXTRA_TRAIN_ARGS="${EXTRA_TRAIN_ARGS:-}" # appended to every `train`, e.g. "--norm frozen"
CONFIGS="${CONFIGS:-ctr:32:0 ctr:32:xbm ctr:32:xbm:0.1 ctr:64:0 ms:32:0 ms:32:xbm}"
WORK_DIR="${WORK_DIR:-/tmp/crossbatch-bench-xbm}"

source "$ROOT/scripts/bench_lib.sh"
use_private_binary
ensure_glyphs
n_train_classes=$(find "$GLYPHS_DIR/train" -mindepth 1 -maxdepth 1 -type d | wc -l)
n_test_classes=$(find "$GLYPHS_DIR/test" -mindepth 1 -maxdepth 1 -type d | wc -l)
n_train=$(find "$GLYPHS_DIR/train" -name '*.png' | wc -l)
n_test=$(find "$GLYPHS_DIR/test" -name '*.png' | wc -l)

rows=()
started=$SECONDS
for config in $CONFIGS; do
    IFS=: read -r loss batch mem weight <<<"$config"
    weight="${weight:-$MEMORY_WEIGHT}"
    case "$loss" in
        ctr | contrastive) loss_flag=contrastive; loss_name=contrastive ;;
        ms | multi-similarity) loss_flag=multi-similarity; loss_name=multi-similarity ;;
        *) echo "unknown loss in config $config" >&2; exit 2 ;;
    esac
    case "$mem" in
        0 | off) mem_rows=0 ;;
        xbm) mem_rows=$MEMORY_SIZE ;;
        *) mem_rows=$mem ;;
    esac
    name="${loss_name}-b${batch}-m${mem_rows}"
    [[ "$mem_rows" != 0 && "$weight" != "$MEMORY_WEIGHT" ]] && name="$name-w$weight"
    model="$WORK_DIR/$name"
    rm -rf "$model"
    mem_args=(--memory-size "$mem_rows")
    label="$loss_name"
    if [[ "$mem_rows" != 0 ]]; then
        mem_args+=(--memory-start "$MEMORY_START" --memory-weight "$weight"
                   --memory-max-age "$MEMORY_MAX_AGE")
        label="$loss_name + XBM"
        [[ "$weight" != "$MEMORY_WEIGHT" ]] && label="$label (weight $weight)"
    fi
    echo "== $name" >&2
    run_measured "$WORK_DIR/$name.rss" "$BIN" train --format imagefolder --out "$model" \
        --steps "$STEPS" --batch-size "$batch" --per-class "$PER_CLASS" --lr "$LR" \
        --seed "$SEED" --loss "$loss_flag" "${mem_args[@]}" --threads "$THREADS" \
        --device "$DEVICE" --max-shift "$MAX_SHIFT" --embedding-dim "$EMBEDDING_DIM" \
        --widths "$WIDTHS" $EXTRA_TRAIN_ARGS "$GLYPHS_DIR/train" 2> "$WORK_DIR/$name.train.log"
    grep -v '^step ' "$WORK_DIR/$name.train.log" >&2 || true
    # Seconds of the training loop itself (excludes loading/preprocessing the images).
    train_s=$(sed -n 's/^trained [0-9]* steps in \([0-9.]*\) s.*/\1/p' "$WORK_DIR/$name.train.log")
    read -r r1 r2 r4 r8 map < <(eval_glyph_test "$model" "$WORK_DIR/$name")
    rss_kb=$(tail -n 1 "$WORK_DIR/$name.rss")
    row=$(awk -v l="$label" -v b="$batch" -v s="$STEPS" -v m="$mem_rows" -v r1="$r1" -v r2="$r2" \
        -v r4="$r4" -v r8="$r8" -v map="$map" -v t="$train_s" -v rss="$rss_kb" 'BEGIN {
        printf "| %s | %d | %d | %d | %.1f | %.1f | %.1f | %.1f | %.2f | %.4f | %.0f |",
            l, b, s, m, 100*r1, 100*r2, 100*r4, 100*r8, 100*map, t/s, rss/1024 }')
    echo "$row" >&2
    rows+=("$row")
done

echo
echo "Glyphs: $n_train_classes train classes ($n_train images) / $n_test_classes unseen test" \
     "classes ($n_test images), ${SIZE}px; resnet-small widths $WIDTHS, dim $EMBEDDING_DIM;" \
     "P×K batches with K=$PER_CLASS, lr $LR (Adam, 5 % warm-up, cosine), seed $SEED, $THREADS" \
     "thread(s), device $DEVICE. XBM: start step $MEMORY_START, weight $MEMORY_WEIGHT," \
     "max age $MEMORY_MAX_AGE (0 = none).${EXTRA_TRAIN_ARGS:+ Extra train flags: $EXTRA_TRAIN_ARGS.}" \
     "R@K and MAP@R in %, leave-one-out on the test classes."
echo
echo "| config | batch | steps | memory size | R@1 | R@2 | R@4 | R@8 | MAP@R | s/step | peak RSS MB |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "total $((SECONDS - started)) s (models and logs in $WORK_DIR)"
