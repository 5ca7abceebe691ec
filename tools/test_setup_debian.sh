#!/usr/bin/env bash
# Proves the README's setup on a fresh Debian: makes a Debian root with debootstrap, copies a
# clean clone of this project's committed HEAD into it and runs `make test` there (Debian
# packages, .venv, the Caffe build and the whole suite, all inside the root). Not part of
# `make test`. Needs root (debootstrap, chroot, mounts) and Debian's package mirror.
#
# Usage: tools/test_setup_debian.sh SUITE [WORKDIR]     e.g. tools/test_setup_debian.sh trixie
#   SUITE    a Debian suite debootstrap knows: bookworm (12), trixie (13)
#   WORKDIR  where the roots live (default /var/tmp/amct_debian); the freshly bootstrapped
#            root is kept as SUITE-base and copied to SUITE-root for each run, so a rerun
#            starts from a fresh install again without downloading it again.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

SUITE="${1:?usage: $0 SUITE [WORKDIR]  (e.g. trixie)}"
WORK="${2:-/var/tmp/amct_debian}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="$WORK/$SUITE-base"
ROOT="$WORK/$SUITE-root"
log() { echo "[test_setup_debian $SUITE] $*"; }

[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
mkdir -p "$WORK"

# A fresh minimal install: Debian's minbase plus make, the one tool the README's commands
# assume (`make test`); setup installs everything else.
if [ ! -f "$BASE/.debootstrap_ok" ]; then
  log "debootstrap $SUITE into $BASE"
  rm -rf "$BASE"
  debootstrap --variant=minbase --include=make "$SUITE" "$BASE" "$MIRROR" > "$WORK/$SUITE-debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/$SUITE-debootstrap.log" >&2; exit 1; }
  touch "$BASE/.debootstrap_ok"
fi

mounted=()
cleanup() {
  for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { mkdir -p "$ROOT$2"; mount "${@:3}" "$1" "$ROOT$2"; mounted+=("$ROOT$2"); }

log "fresh root $ROOT (copy of $BASE)"
rm -rf "$ROOT"
cp -a "$BASE" "$ROOT"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's own CA certificates: a host behind a TLS-intercepting proxy reaches PyPI only with
# them (pip in the root gets them through PIP_CERT); a host without any has nothing to copy.
CERT_ENV=()
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates" "$ROOT/etc/ssl/certs"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  CERT_ENV=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
fi
# A clean clone of the committed HEAD: no .venv, no caches, no uncommitted files.
git clone -q --no-local "$PROJECT" "$ROOT/root/amct_retrain"
git -C "$ROOT/root/amct_retrain" checkout -q "$(git -C "$PROJECT" rev-parse HEAD)"
bind proc /proc -t proc
bind sysfs /sys -t sysfs
bind /dev /dev --bind
bind devpts /dev/pts -t devpts
bind tmpfs /dev/shm -t tmpfs

log "make test inside $SUITE ($(git -C "$PROJECT" log -1 --format='%h %s'))"
start=$(date +%s)
rc=0
chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 "${CERT_ENV[@]}" /bin/bash -c 'cd /root/amct_retrain && make test' || rc=$?
elapsed=$(( $(date +%s) - start ))
log "make test exit code $rc after ${elapsed} s ($(( elapsed / 60 )) min $(( elapsed % 60 )) s) on $(nproc) cores"
exit "$rc"
