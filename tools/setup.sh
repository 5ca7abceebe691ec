#!/usr/bin/env bash
# amct_retrain setup: Debian build dependencies, .venv, Caffe built from source (cached),
# the project installed into .venv. Idempotent: a second run takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${AMCT_CACHE:-$HOME/.cache/amct_retrain}"
# Debian 12 and 13 alike: the distribution's default python3 is the one its boost_python is
# built for (3.11 on bookworm, 3.13 on trixie), so that is the Python of .venv and pycaffe.
APT_PACKAGES="build-essential libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-regex-dev libboost-python-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev
  libgflags-dev libhdf5-dev libopenblas-dev liblmdb-dev python3 python3-dev python3-venv"
APT_PACKAGES="$APT_PACKAGES chromium"  # the headless browser tests/test_analysis.py runs report.html in

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

step "the system Python that Debian's boost_python is built for"
VERSION_OF='import sys; print("%d.%d" % sys.version_info[:2])'
PY_VERSION=$(/usr/bin/python3 -c "$VERSION_OF")
SYSTEM_PYTHON="/usr/bin/python$PY_VERSION"
BOOST_PYTHON="/usr/lib/$(gcc -dumpmachine)/libboost_python${PY_VERSION/./}.so"
if [ ! -e "$BOOST_PYTHON" ]; then
  echo "[setup] Debian's python3 is $PY_VERSION but libboost-python-dev has no $BOOST_PYTHON;" \
       "it has: $(ls /usr/lib/"$(gcc -dumpmachine)"/libboost_python3*.so 2>/dev/null | xargs -n1 basename | tr '\n' ' ')" >&2
  false
fi

step "virtual environment .venv (Python $PY_VERSION, the Python Caffe links against)"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c "$VERSION_OF")" != "$PY_VERSION" ]; then
  echo "[setup] .venv has another Python than $PY_VERSION: making it anew"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$SYSTEM_PYTHON" -m venv "$VENV"
fi
REQ_HASH=$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)
if [ "$(cat "$VENV/.requirements-hash" 2>/dev/null)" != "$REQ_HASH" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import numpy, google.protobuf, yaml, tensorboardX, pytest, lmdb"
  echo "$REQ_HASH" > "$VENV/.requirements-hash"
fi

# The build is keyed by everything that shapes it: the Caffe recipe, numpy's ABI, the Python.
NUMPY_PIN=$(grep -E '^numpy' "$ROOT/requirements.txt")
RECIPE_HASH=$( (cat "$ROOT/tools/caffe/"*; echo "$NUMPY_PIN"; echo "python$PY_VERSION") | sha256sum | cut -c1-16)
CAFFE_DIR="$CACHE/caffe-$RECIPE_HASH"
SRC="$CAFFE_DIR/src"
if [ -n "${AMCT_CAFFE:-}" ]; then
  # A user's own Caffe (a fork with custom layers, say): used as it is, nothing is built.
  step "your Caffe: AMCT_CAFFE=$AMCT_CAFFE"
  SRC="$(cd "$AMCT_CAFFE" && pwd)"
  if [ ! -f "$SRC/python/caffe/__init__.py" ] || ! ls "$SRC"/python/caffe/_caffe*.so >/dev/null 2>&1; then
    echo "[setup] $SRC/python/caffe has no built pycaffe (_caffe.so): AMCT_CAFFE must be a Caffe tree built" \
         "with 'make all pycaffe' (or CMake's pycaffe target) and WITH_PYTHON_LAYER := 1" >&2
    false
  fi
elif [ ! -f "$CAFFE_DIR/BUILD_OK" ]; then
  step "build Caffe into $CAFFE_DIR"
  "$ROOT/tools/caffe/build_caffe.sh" "$CAFFE_DIR" "$VENV/bin/python"
fi
CAFFE_BIN=""
for tool in "$SRC/build/tools/caffe.bin" "$SRC/build/tools/caffe"; do
  if [ -x "$tool" ] && [ -f "$tool" ]; then CAFFE_BIN="$tool"; break; fi
done
if [ -z "$CAFFE_BIN" ]; then
  echo "[setup] no build/tools/caffe.bin in $SRC: build Caffe's command-line tools (make all)" >&2
  false
fi

step "link Caffe and amct_retrain into .venv"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SRC/python" > "$SITE/amct_caffe_build.pth"
if ! "$VENV/bin/python" -c "import amct_retrain" 2>/dev/null \
   || [ "$(cat "$VENV/.pyproject-hash" 2>/dev/null)" != "$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  sha256sum "$ROOT/pyproject.toml" | cut -c1-16 > "$VENV/.pyproject-hash"
fi
# The caffe binary embeds the Python it links; it finds .venv through PATH (pyvenv.cfg).
cat > "$VENV/bin/caffe" <<WRAP
#!/bin/sh
# Caffe's command-line tool, running amct_retrain's Python layers from this .venv.
export PATH="$VENV/bin:\$PATH"
export PYTHONPATH="$SRC/python:$ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$CAFFE_BIN" "\$@"
WRAP
chmod +x "$VENV/bin/caffe"

step "check: import caffe, amct_retrain"
if ! "$VENV/bin/python" -c "import caffe"; then
  echo "[setup] pycaffe of $SRC does not import with $VENV/bin/python (Python $PY_VERSION): it must be built" \
       "for this Python; if the error is 'Descriptors cannot be created directly', regenerate its caffe_pb2 with" \
       "this machine's protoc: protoc --python_out=$SRC/python/caffe/proto -I $SRC/src/caffe/proto caffe.proto" >&2
  false
fi
if ! "$VENV/bin/python" -c "import caffe, sys; sys.exit('Python' not in caffe.layer_type_list())"; then
  echo "[setup] the Caffe at $SRC has no Python layer: rebuild it with WITH_PYTHON_LAYER := 1 (the toolkit's" \
       "quantization layers are Caffe Python layers)" >&2
  false
fi
# Reports, in plain words and with the workaround, each of the project's Caffe fixes it lacks.
"$VENV/bin/python" -c "import logging; logging.basicConfig(format='[setup] %(levelname)s: %(message)s'); \
import amct_retrain_layers, amct_retrain.caffe_proto"
echo "[setup] ready: $VENV (Caffe at $SRC)"
