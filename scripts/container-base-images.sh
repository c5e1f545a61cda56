#!/usr/bin/env bash
# Makes sure the two base images the Dockerfile names exist in podman's local storage, and makes
# stand-ins under the same names when they do not (no registry serves container images here):
#
#   debian:bookworm-slim        `debootstrap --variant=minbase bookworm`, trimmed like the official
#                               slim image (no docs, man pages or locales), piped into `podman import`
#   rust:<X.Y>-slim-bookworm    that base plus gcc, libc6-dev, ca-certificates, the machine's Rust
#                               toolchain (its bin/ and lib/, laid out as in the official image:
#                               RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo) and the
#                               machine's own CA certificates (cargo reaches crates.io through them)
#
# An image that is already there (a stand-in made by an earlier run, or a real one) is used as
# it is: the tag is the cache. The stand-ins carry the label org.normalize-service.stand-in; they
# exist only for testing, and the Dockerfile keeps naming the official images.
#
# Usage: scripts/container-base-images.sh [RUST_VERSION]   (default: the machine's rustc X.Y)
# Prints nothing on stdout; progress goes to stderr. Needs root, podman and (for the first
# stand-in) debootstrap.
set -euo pipefail

log() { printf 'base-images: %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

PODMAN=(podman --cgroup-manager cgroupfs)
SUITE=bookworm
DEBIAN_IMAGE="debian:${SUITE}-slim"
STAND_IN_LABEL=org.normalize-service.stand-in

RUST_VERSION="${1:-$(rustc --version | awk '{split($2, v, "."); print v[1] "." v[2]}')}"
RUST_IMAGE="rust:${RUST_VERSION}-slim-${SUITE}"

have_image() { "${PODMAN[@]}" image exists "$1"; }

SCRATCH=()
cleanup() { [ ${#SCRATCH[@]} -eq 0 ] || rm -rf "${SCRATCH[@]}"; }
trap cleanup EXIT

# The Debian mirror this machine's apt uses (first deb URI serving the suite), so the stand-in
# is made from the same place as the machine's own packages; empty lets debootstrap choose.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk -v suite="$SUITE" '
      /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
      END { if (uri != "" && ok) print uri }' "$f" | head -n1
  done
  if [ -r /etc/apt/sources.list ]; then
    awk -v suite="$SUITE" '$1 == "deb" && $0 !~ /security/ { for (i = 2; i < NF; i++) if ($(i + 1) == suite && $i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list
  fi
}

make_debian() {
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is not installed (apt-get install debootstrap)"
  local root mirror started
  root="$(mktemp -d /var/tmp/normalize-debootstrap.XXXXXX)"
  SCRATCH+=("$root" "$root.log")
  mirror="$(debian_mirror | head -n1)"
  started=$SECONDS
  log "making $DEBIAN_IMAGE: debootstrap --variant=minbase $SUITE ${mirror:-(the default mirror of debootstrap)}"
  debootstrap --variant=minbase "$SUITE" "$root" ${mirror:+"$mirror"} >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; die "debootstrap failed"; }
  # What the official slim variant leaves out, for this and every later package install.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda}/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar -C "$root" --numeric-owner -c . \
    | "${PODMAN[@]}" import --quiet \
      --change 'CMD ["bash"]' \
      --change "LABEL $STAND_IN_LABEL=debootstrap" \
      --message "stand-in for $DEBIAN_IMAGE (debootstrap --variant=minbase $SUITE)" \
      - "$DEBIAN_IMAGE" >/dev/null
  log "made $DEBIAN_IMAGE in $((SECONDS - started)) s"
}

make_rust() {
  local sysroot toolchain ctx started
  sysroot="$(rustc --print sysroot)"
  toolchain="$(basename "$sysroot")"
  if [ ! -x "$sysroot/bin/cargo" ] || [ ! -x "$sysroot/bin/rustc" ]; then die "no cargo/rustc under $sysroot"; fi
  ctx="$(mktemp -d /var/tmp/normalize-rust-ctx.XXXXXX)"
  SCRATCH+=("$ctx" "$ctx.log")
  started=$SECONDS
  log "making $RUST_IMAGE from $DEBIAN_IMAGE, the toolchain $sysroot ($(rustc --version)) and the machine's CA certificates"
  mkdir -p "$ctx/toolchain" "$ctx/certs/local"
  # Hard links when the sysroot is on the same file system: no 600 MB copy.
  cp -al "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/" 2>/dev/null \
    || cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  [ -r /etc/ssl/certs/ca-certificates.crt ] || die "no /etc/ssl/certs/ca-certificates.crt on this machine"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/certs/ca-certificates.crt"
  if [ -d /usr/local/share/ca-certificates ]; then
    cp -a /usr/local/share/ca-certificates/. "$ctx/certs/local/"
  fi
  cat >"$ctx/Containerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY certs/local/ /usr/local/share/ca-certificates/
# update-ca-certificates rebuilds the bundle from Debian's list and the local ones; the machine's
# own bundle (a superset, possibly with CAs added to the file directly) replaces it afterwards.
COPY certs/ca-certificates.crt /tmp/machine-ca-certificates.crt
RUN update-ca-certificates >/dev/null && mv /tmp/machine-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo RUST_VERSION=$(rustc --version | awk '{print $2}') \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY toolchain/ /usr/local/rustup/toolchains/$toolchain/
RUN mkdir -p /usr/local/cargo/bin \\
    && for b in /usr/local/rustup/toolchains/$toolchain/bin/*; do ln -s "\$b" /usr/local/cargo/bin/; done \\
    && cargo --version && rustc --version
LABEL $STAND_IN_LABEL=machine-toolchain
EOF
  "${PODMAN[@]}" build --format docker --isolation chroot --network host --layers=false \
    -t "$RUST_IMAGE" -f "$ctx/Containerfile" "$ctx" >"$ctx.log" 2>&1 \
    || { tail -n 30 "$ctx.log" >&2; die "building the $RUST_IMAGE stand-in failed"; }
  log "made $RUST_IMAGE in $((SECONDS - started)) s"
}

describe() {
  local kind
  kind="$("${PODMAN[@]}" image inspect --format "{{ index .Labels \"$STAND_IN_LABEL\" }}" "$1" 2>/dev/null || true)"
  case "$kind" in
    ""|"<no value>") log "$1: present (not a stand-in)" ;;
    *) log "$1: present (stand-in: $kind)" ;;
  esac
}

if have_image "$DEBIAN_IMAGE"; then describe "$DEBIAN_IMAGE"; else make_debian; fi
if have_image "$RUST_IMAGE"; then describe "$RUST_IMAGE"; else make_rust; fi
