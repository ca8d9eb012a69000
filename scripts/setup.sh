#!/usr/bin/env bash
# Installs what crossbatch needs to build and test, idempotently:
#   - libtorch 2.11.0 from PyPI into the project-local venv .venv (tch 0.24 requires it),
#   - Fashion-MNIST (Debian package dataset-fashion-mnist) for the default model and tests,
#   - Korean font packages, rendered into the many-class glyph dataset (`crossbatch glyphs`).
# A second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (about 5 GB)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi

FONT_PACKAGES="fonts-alee fonts-baekmuk fonts-lexi-gulim fonts-lexi-saebom fonts-nanum fonts-nanum-extra fonts-nanum-eco fonts-unfonts-core fonts-unfonts-extra"
missing=""
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing="dataset-fashion-mnist"
[ -d /usr/share/fonts/truetype/nanum ] || missing="$missing $FONT_PACKAGES"
if [ -n "$missing" ]; then
  echo "setup: installing$([ -n "$missing" ] && echo " $missing")"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
