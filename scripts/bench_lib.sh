#!/usr/bin/env bash
# Shared helpers of the benchmark scripts (sourced, not run). Expects BIN, WORK_DIR, THREADS
# and, for the glyph helpers, CLASSES, MAX_FONTS, SIZE and GLYPHS_DIR to be set by the caller.

# use_private_binary: checks $BIN, runs a private copy of it from $WORK_DIR (so that a
# concurrent `cargo build` cannot swap the binary mid-benchmark) and pins OpenMP to $THREADS.
use_private_binary() {
    [[ -x "$BIN" ]] || { echo "no binary at $BIN (make build, or set CROSSBATCH)" >&2; exit 1; }
    mkdir -p "$WORK_DIR"
    cp "$BIN" "$WORK_DIR/crossbatch"
    BIN="$WORK_DIR/crossbatch"
    export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
}

# ensure_glyphs: renders the many-class glyph dataset into $GLYPHS_DIR once and reuses it while
# the parameters match. `params` is written last, so a rendering that did not finish is
# rendered again instead of being benchmarked.
ensure_glyphs() {
    if [[ ! -f "$GLYPHS_DIR/params" ]]; then
        rm -rf "$GLYPHS_DIR/train" "$GLYPHS_DIR/test"
        echo "rendering $CLASSES glyph classes into $GLYPHS_DIR" >&2
        font_args=()
        [[ "$MAX_FONTS" != 0 ]] && font_args=(--max-fonts "$MAX_FONTS")
        "$BIN" glyphs --out "$GLYPHS_DIR" --classes "$CLASSES" --size "$SIZE" \
            --test-fraction 0.5 "${font_args[@]}" >&2
        echo "classes=$CLASSES max_fonts=$MAX_FONTS size=$SIZE" > "$GLYPHS_DIR/params"
    elif [[ "$(cat "$GLYPHS_DIR/params")" != "classes=$CLASSES max_fonts=$MAX_FONTS size=$SIZE" ]]; then
        echo "warning: $GLYPHS_DIR was rendered with $(cat "$GLYPHS_DIR/params"); reusing it" >&2
    fi
}

# run_measured RSS_FILE CMD...: runs CMD (stderr to the caller's stderr) and writes its peak
# RSS in KB to RSS_FILE.
run_measured() {
    local rss_file=$1
    shift
    if [[ -x /usr/bin/time ]]; then
        /usr/bin/time -f '%M' -o "$rss_file" "$@"
    else
        # Fallback: poll VmHWM (the kernel's high-water mark) until the process exits.
        "$@" &
        local pid=$! hwm=0 line
        while kill -0 "$pid" 2>/dev/null; do
            line=$(grep VmHWM "/proc/$pid/status" 2>/dev/null || true)
            [[ -n "$line" ]] && hwm=$(awk '{print $2}' <<<"$line")
            sleep 0.2
        done
        wait "$pid"
        echo "$hwm" > "$rss_file"
    fi
}

json_get() { # json_get FILE JQ_PATH
    if command -v jq >/dev/null; then
        jq -r "$2" "$1"
    else
        python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); k=sys.argv[2].lstrip(".").replace("\"","").split(".")
for p in k: d=d[p]
print(d)' "$1" "$2"
    fi
}


# eval_glyph_test MODEL_DIR OUT_PREFIX: leave-one-out retrieval on $GLYPHS_DIR/test (exact kNN)
# on $DEVICE; keeps OUT_PREFIX.eval.{json,log} and prints "R@1 R@2 R@4 R@8 MAP@R" (fractions).
eval_glyph_test() {
    local ej="$2.eval.json"
    "$BIN" eval --model "$1" --format imagefolder --json --device "$DEVICE" \
        "$GLYPHS_DIR/test" > "$ej" 2> "$2.eval.log"
    printf '%s %s %s %s %s\n' \
        "$(json_get "$ej" '.recall_at."1"')" "$(json_get "$ej" '.recall_at."2"')" \
        "$(json_get "$ej" '.recall_at."4"')" "$(json_get "$ej" '.recall_at."8"')" \
        "$(json_get "$ej" '.map_at_r')"
}
