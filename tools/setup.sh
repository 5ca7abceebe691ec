#!/usr/bin/env bash
# amct_retrain setup: Debian build dependencies, .venv, Caffe built from source (cached),
# the project installed into .venv. Idempotent: a second run takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${AMCT_CACHE:-$HOME/.cache/amct_retrain}"
APT_PACKAGES="build-essential libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-regex-dev libboost-python-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev
  libgflags-dev libhdf5-dev libopenblas-dev liblmdb-dev python3.11 python3.11-dev python3.11-venv"
APT_PACKAGES="$APT_PACKAGES chromium"  # the headless browser tests/test_analysis_browser.py runs report.html in

STEP=""
step() { STEP="$1"; echo "[setup] $1"; }
trap 'echo "[setup] FAILED at step: $STEP (see the output above)" >&2' ERR

step "Debian build dependencies"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[setup] installing:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

step "virtual environment .venv (Debian python3.11, the Python Caffe links against)"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3.11 -m venv "$VENV"
fi
REQ_HASH=$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)
if [ "$(cat "$VENV/.requirements-hash" 2>/dev/null)" != "$REQ_HASH" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import numpy, google.protobuf, yaml, tensorboardX, pytest"
  echo "$REQ_HASH" > "$VENV/.requirements-hash"
fi

# The build is keyed by everything that shapes it: the Caffe recipe and numpy's ABI.
NUMPY_PIN=$(grep -E '^numpy' "$ROOT/requirements.txt")
RECIPE_HASH=$( (cat "$ROOT/tools/caffe/"*; echo "$NUMPY_PIN") | sha256sum | cut -c1-16)
CAFFE_DIR="$CACHE/caffe-$RECIPE_HASH"
SRC="$CAFFE_DIR/src"
if [ ! -f "$CAFFE_DIR/BUILD_OK" ]; then
  step "build Caffe into $CAFFE_DIR"
  "$ROOT/tools/caffe/build_caffe.sh" "$CAFFE_DIR" "$VENV/bin/python"
fi

step "link Caffe and amct_retrain into .venv"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SRC/python" > "$SITE/amct_caffe_build.pth"
if ! "$VENV/bin/python" -c "import amct_retrain" 2>/dev/null \
   || [ "$(cat "$VENV/.setup-py-hash" 2>/dev/null)" != "$(sha256sum "$ROOT/setup.py" | cut -c1-16)" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  sha256sum "$ROOT/setup.py" | cut -c1-16 > "$VENV/.setup-py-hash"
fi
# The caffe binary embeds the Python it links; it finds .venv through PATH (pyvenv.cfg).
cat > "$VENV/bin/caffe" <<WRAP
#!/bin/sh
# Caffe's command-line tool, running amct_retrain's Python layers from this .venv.
export PATH="$VENV/bin:\$PATH"
export PYTHONPATH="$SRC/python:$ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$SRC/.temp_release/tools/caffe.bin" "\$@"
WRAP
chmod +x "$VENV/bin/caffe"

step "check: import caffe, amct_retrain"
"$VENV/bin/python" -c "import caffe, amct_retrain, amct_retrain_layers" 
echo "[setup] ready: $VENV (Caffe at $SRC)"
