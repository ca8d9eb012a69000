#!/usr/bin/env bash
# Load test of search traffic while the online trainer publishes generations and the server
# swaps model + index under load. Uses wrk (Debian package `wrk`, installed if missing).
#
#   scripts/loadtest.sh            # defaults: 2000 items, 60 s, 8 connections
#   ITEMS=5000 DURATION=120 CONNECTIONS=16 scripts/loadtest.sh
#
# Prints wrk's requests/s, p50/p99 latency and error counts, and how many generations were
# swapped in during the run. Every error counts: non-2xx answers, connect/read/timeouts.
set -euo pipefail
cd "$(dirname "$0")/.."
ITEMS=${ITEMS:-2000}
[ "$ITEMS" -le 10000 ] || { echo "ITEMS is at most 10000 (the Fashion-MNIST t10k set)" >&2; exit 1; }
DURATION=${DURATION:-60}
CONNECTIONS=${CONNECTIONS:-8}
PUBLISH_EVERY=${PUBLISH_EVERY:-100}
BIN=target/release/crossbatch
[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

WORK=$(mktemp -d)
trap 'kill "$SERVER_PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
CROSSBATCH__TRAINER__PUBLISH_EVERY=$PUBLISH_EVERY CROSSBATCH__TRAINER__DUTY_CYCLE=0.5 \
CROSSBATCH__TRAINER__REEMBED_RATE=0 RUST_LOG=warn \
  "$BIN" serve --addr 127.0.0.1:0 --data-dir "$WORK/data" >"$WORK/stdout" 2>"$WORK/stderr" &
SERVER_PID=$!
# Waits (at most 5 minutes) for the server to listen and be ready; stops with its log if it
# exits or never gets there.
URL=""
for _ in $(seq 1500); do
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited:" >&2; cat "$WORK/stderr" >&2; exit 1; }
  [ -n "$URL" ] || URL=$(sed -n 's/^crossbatch listening on //p' "$WORK/stdout")
  [ -n "$URL" ] && curl -sf "$URL/readyz" >/dev/null && break
  sleep 0.2
done
curl -sf "$URL/readyz" >/dev/null || { echo "the server never became ready:" >&2; cat "$WORK/stderr" >&2; exit 1; }

"$BIN" import --server "$URL" --format idx --id-prefix fm- --limit "$ITEMS" \
  --labels /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz \
  /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz 2>"$WORK/import.log" ||
  { echo "import failed:" >&2; cat "$WORK/import.log" >&2; exit 1; }

cat >"$WORK/search.lua" <<LUA
-- Half the queries embed a random tensor (model + index), half search by stored item.
local bodies = {}
function init(args)
  math.randomseed(os.time() + math.random(1000))
  for i = 1, 40 do
    local t = {}
    for j = 1, 784 do t[j] = string.format("%.3f", math.random() * 2 - 1) end
    bodies[#bodies + 1] = '{"query":{"tensor":[' .. table.concat(t, ",") .. '],"shape":[1,28,28]},"k":10}'
    bodies[#bodies + 1] = '{"query":{"item_id":"fm-' .. math.random(0, $ITEMS - 1) .. '"},"k":10}'
  end
end
request = function()
  return wrk.format("POST", "/v1/search", {["Content-Type"] = "application/json"}, bodies[math.random(#bodies)])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %.1f %.2f %.2f %.2f %d %d %d %d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status, e.connect, e.read, e.timeout))
end
LUA

published() { curl -s "$URL/metrics" | sed -n 's/^crossbatch_generations_published_total //p'; }
BEFORE=$(published)
VERSION_BEFORE=$(curl -s "$URL/v1/info" | sed -n 's/.*"model_version":\([0-9]*\).*/\1/p')
wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 10s -s "$WORK/search.lua" "$URL" >"$WORK/wrk.txt"
AFTER=$(published)
VERSION_AFTER=$(curl -s "$URL/v1/info" | sed -n 's/.*"model_version":\([0-9]*\).*/\1/p')
read -r _ REQUESTS RUN_SECONDS RPS P50 P99 STATUS CONNECT READ TIMEOUT < <(grep '^RESULT' "$WORK/wrk.txt")
echo
echo "| items | connections | seconds | requests | requests/s | p50 ms | p99 ms | non-2xx | socket errors | generations swapped (versions) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
echo "| $ITEMS | $CONNECTIONS | $RUN_SECONDS | $REQUESTS | $RPS | $P50 | $P99 | $STATUS | $((CONNECT + READ + TIMEOUT)) | $((${AFTER%.*} - ${BEFORE%.*})) ($VERSION_BEFORE → $VERSION_AFTER) |"
[ "$STATUS" -eq 0 ] && [ $((CONNECT + READ + TIMEOUT)) -eq 0 ]
