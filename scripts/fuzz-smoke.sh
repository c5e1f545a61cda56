#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/*.rs) for a bounded time and exits non-zero
# if any of them finds a crash (a panic in a decoder or a violated invariant).
#
#   scripts/fuzz-smoke.sh                 # CI smoke: 20 s per target
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh hrv   # a long run of one target
#
# Works with the machine's stable toolchain: cargo-fuzz needs a few unstable rustc flags
# (`-Zsanitizer`, `-Cllvm-args` for coverage), which RUSTC_BOOTSTRAP=1 enables on stable. The
# sanitizer defaults to none: the decoders are safe Rust (`unsafe_code = "forbid"`), so
# AddressSanitizer would only halve the executions per second; FUZZ_SANITIZER=address turns it on.
#
# The committed seeds in fuzz/corpus/<target> are only read; what libFuzzer discovers goes to
# fuzz/corpus-run/<target> (git-ignored), so reruns continue from there. Crash inputs land in
# fuzz/artifacts/<target>/ and the script prints the command that reproduces them.
#
# Environment: FUZZ_SECONDS (20), FUZZ_SANITIZER (none), FUZZ_JOBS (1), FUZZ_TARGET_DIR
# (default $CARGO_TARGET_DIR/fuzz, else fuzz/target), CARGO_FUZZ_VERSION (0.13.2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
SANITIZER="${FUZZ_SANITIZER:-none}"
JOBS="${FUZZ_JOBS:-1}"
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  TARGET_DIR="$FUZZ_TARGET_DIR"
elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
  TARGET_DIR="$CARGO_TARGET_DIR/fuzz"
else
  TARGET_DIR="$ROOT/fuzz/target"
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\n== %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cd fuzz && cargo fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "no fuzz targets found" >&2; exit 1; }

fuzz() { (cd "$ROOT/fuzz" && cargo fuzz "$@"); }

log "building fuzz targets (${targets[*]}), sanitizer=$SANITIZER, target dir $TARGET_DIR"
for t in "${targets[@]}"; do
  fuzz build --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" "$t"
done

# -jobs makes libFuzzer log to fuzz-N.log files: only ask for it when running in parallel.
parallel=()
[ "$JOBS" -gt 1 ] && parallel=(-jobs="$JOBS" -workers="$JOBS")

failed=()
summary=()
for t in "${targets[@]}"; do
  seeds="$ROOT/fuzz/corpus/$t"
  work="$ROOT/fuzz/corpus-run/$t"
  mkdir -p "$work" "$ROOT/fuzz/artifacts/$t"
  out="$(mktemp)"
  log "fuzzing $t for ${SECONDS_PER_TARGET}s"
  set +e
  # The first corpus directory is the one libFuzzer writes to; the seeds are read-only.
  fuzz run --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR" "$t" "$work" "$seeds" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -dict="$ROOT/fuzz/json.dict" -print_final_stats=1 "${parallel[@]}" >"$out" 2>&1
  rc=$?
  set -e
  runs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$out" | awk '{s+=$2} END {print s+0}')"
  corpus="$(find "$work" -type f | wc -l | tr -d ' ')"
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    tail -n 60 "$out"
    for a in "$ROOT/fuzz/artifacts/$t"/*; do
      [ -f "$a" ] && echo "reproduce: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s $SANITIZER $t $a)"
    done
    summary+=("$t: FAILED (exit $rc) after $runs executions")
  else
    summary+=("$t: ok, $runs executions in ${SECONDS_PER_TARGET}s, corpus $corpus inputs")
  fi
  rm -f "$out"
done

log "fuzz summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
