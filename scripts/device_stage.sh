#!/usr/bin/env bash
# Stages what scripts/device_check.sh needs on the GPU machine into .device/ (git-ignored):
# the release binary, the unit-test binary, the integration-test binaries that need no fonts
# (api, metrics, trainer), the Fashion-MNIST test split and the path the tests were built in.
# Run through `make device-stage` (which sets up the torch venv the build needs). Then, with the
# device tool: carry [".device"], command "bash scripts/device_check.sh" (README, "GPU check").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$ROOT/.device"
FASHION=/usr/share/datasets/fashion-mnist
cd "$ROOT"

cargo build --release
# The test executables, as cargo reports them: the library's unit tests and three
# integration-test binaries.
executables=$(cargo test --release --no-run --message-format=json-render-diagnostics | python3 -c '
import json, sys
wanted = {("lib", "crossbatch"): "unit", ("test", "api"): "api",
          ("test", "metrics"): "metrics", ("test", "trainer"): "trainer"}
for line in sys.stdin:
    msg = json.loads(line)
    exe = msg.get("executable")
    if msg.get("reason") != "compiler-artifact" or not exe:
        continue
    for kind in msg["target"]["kind"]:
        name = wanted.get((kind, msg["target"]["name"]))
        if name:
            print(name, exe)
')
[[ $(wc -l <<<"$executables") == 4 ]] || { echo "expected 4 test executables, got: $executables" >&2; exit 1; }

rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/fashion-mnist"
cp target/release/crossbatch "$STAGE/bin/crossbatch"
while read -r name exe; do cp "$exe" "$STAGE/bin/$name"; done <<<"$executables"
# Debug sections of the test binaries are not needed there and would eat the 64 MiB the device
# tool carries (the server binary stays as built: the check copies it over the local build).
for name in unit api metrics trainer; do strip --strip-debug "$STAGE/bin/$name" 2>/dev/null || true; done
cp "$FASHION"/t10k-images-idx3-ubyte.gz "$FASHION"/t10k-labels-idx1-ubyte.gz "$STAGE/fashion-mnist/"
# The integration tests find the repository and the server binary at the paths of this build.
echo "$ROOT" >"$STAGE/built_root"
du -sh "$STAGE"
