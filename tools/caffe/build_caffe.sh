#!/usr/bin/env bash
# Builds the pinned Caffe sdist, patched, into CAFFE_DIR/src. Called by tools/setup.sh
# only when CAFFE_DIR has no BUILD_OK marker (the directory name is the recipe's hash).
# Usage: build_caffe.sh CAFFE_DIR PYTHON [PATCHES]
#   PYTHON   the Python pycaffe is built for (its version picks boost_pythonXY and libpythonX.Y)
#   PATCHES  all (default): the project's Caffe; build-only: only what today's compilers need
#            to build it, none of the behaviour fixes (stands in for a user's own Caffe in tests)
set -euo pipefail
CAFFE_DIR="$1"; PYTHON="$2"; PATCHES="${3:-all}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SDIST_NAME="brocolli-caffe"
SDIST_VERSION="9.0.2"
SDIST_SHA256="c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a"
SRC="$CAFFE_DIR/src"

echo "[setup] download Caffe sdist $SDIST_NAME==$SDIST_VERSION and check its sha256"
rm -rf "$CAFFE_DIR"; mkdir -p "$CAFFE_DIR/dl"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "$SDIST_NAME==$SDIST_VERSION" \
    -d "$CAFFE_DIR/dl" 2>&1 | grep -v "is ignored: it is neither" || true
TARBALL="$CAFFE_DIR/dl/$SDIST_NAME-$SDIST_VERSION.tar.gz"
[ -f "$TARBALL" ] || { echo "[setup] download of $SDIST_NAME==$SDIST_VERSION failed" >&2; exit 1; }
echo "$SDIST_SHA256  $TARBALL" | sha256sum -c --quiet - \
  || { echo "[setup] sha256 mismatch for $TARBALL" >&2; exit 1; }

echo "[setup] extract and patch Caffe ($PATCHES patches, see tools/caffe/patch_caffe.py)"
mkdir -p "$SRC"
tar xzf "$TARBALL" -C "$SRC" --strip-components=1
"$PYTHON" "$HERE/patch_caffe.py" "$SRC" "$PATCHES"
cp "$HERE/Makefile.config" "$SRC/Makefile.config"

echo "[setup] build Caffe CPU-only with the Python layer (make all pycaffe; about 7 minutes on 2 cores)"
NUMPY_INCLUDE=$("$PYTHON" -c "import numpy; print(numpy.get_include())")
PYTHON_VERSION=$("$PYTHON" -c "import sys; print('%d.%d' % sys.version_info[:2])")
make -C "$SRC" -j"$(nproc)" all pycaffe NUMPY_INCLUDE="$NUMPY_INCLUDE" PYTHON_VERSION="$PYTHON_VERSION" \
  MULTIARCH="$(gcc -dumpmachine)" > "$CAFFE_DIR/build.log" 2>&1 \
  || { tail -40 "$CAFFE_DIR/build.log" >&2; echo "[setup] make failed: $CAFFE_DIR/build.log" >&2; exit 1; }
# This fork builds into .temp_release, but links _caffe.so and the tools with rpaths into build/.
ln -sfn .temp_release "$SRC/build"

echo "[setup] regenerate caffe_pb2 with the machine's protoc"
protoc --python_out="$SRC/python/caffe/proto" -I "$SRC/src/caffe/proto" "$SRC/src/caffe/proto/caffe.proto"
touch "$CAFFE_DIR/BUILD_OK"
