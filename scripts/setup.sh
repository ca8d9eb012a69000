#!/usr/bin/env bash
# Installs what crossbatch needs to build and test, idempotently:
#   - Debian packages: python3-venv (for .venv), g++ (torch-sys compiles C++),
#     dataset-fashion-mnist (Fashion-MNIST for the default model and tests) and the Korean font
#     packages rendered into the many-class glyph dataset (`crossbatch glyphs`),
#   - libtorch 2.11.0 from PyPI into the project-local venv .venv (tch 0.24 requires it).
# A second run only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0

PACKAGES="python3-venv g++"
FONT_PACKAGES="fonts-alee fonts-baekmuk fonts-lexi-gulim fonts-lexi-saebom fonts-nanum fonts-nanum-extra fonts-nanum-eco fonts-unfonts-core fonts-unfonts-extra"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=""
for pkg in $PACKAGES $FONT_PACKAGES; do
  installed "$pkg" || missing="$missing $pkg"
done
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing="$missing dataset-fashion-mnist"
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (about 5 GB)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
