#!/usr/bin/env bash
# The image and the monitoring, run for real (run by .ci/run; issue 17):
#
#   1. installs what is missing (podman, runc, debootstrap, Debian's prometheus, psql, curl)
#   2. makes sure the Dockerfile's base images exist (scripts/container-base-images.sh makes
#      stand-ins when they do not: no registry serves container images here), then builds the
#      image with podman and prints its size and the binary's against a budget
#   3. runs it with host networking against a private nats-server (random port, own store) and
#      a scratch database on the PostgreSQL at 127.0.0.1:5432, scraped by a real Prometheus loaded
#      with the shipped rules (monitoring/alerts.yml), and checks:
#        - the process runs as a non-root uid
#        - `podman healthcheck run`: unhealthy while NATS is not there, healthy once bound
#        - /metrics serves the families the alerts and the dashboard use
#        - events published while it runs are stored (rows), none left pending or unacked
#        - Prometheus: the target is up, every rule evaluates without error, NormalizeDeadLetters
#          fires on a dead letter, NormalizeDatabaseDown goes pending then fires (its `for: 2m`
#          as shipped) while the database refuses connections, and the instance recovers
#        - `podman run IMAGE topology status` and `... dlq list` work against the same NATS
#        - `podman stop` with a batch in flight (blocked on a table lock released after the
#          SIGTERM) exits 0 within SHUTDOWN_TIMEOUT_MS + 2 s, the batch stored and acked; what
#          was not yet delivered stays in the stream and a restarted container stores it
#
# Everything it starts is removed on exit (trap), also on failure, when the logs are shown.
# The image (CONTAINER_IMAGE, default normalize-service:ci) and its build stage (…-build) stay in
# podman's storage afterwards: their layers are the cache that makes the next build warm (the
# dependency layer is rebuilt only when Cargo.toml or Cargo.lock change). Measured on 2 shared
# cores: cold ~8 min with the base images present (dependencies ~4 min, the crate 1-2 min) plus
# ~2.5 min to make the stand-in base images; warm ~2.5 min unchanged, ~4.5 min after a source
# change. About 2 of those minutes are NormalizeDatabaseDown's `for: 2m`.
#
# The podman flags are the ones this sandbox needs: runc (crun refuses the cgroup layout),
# cgroupfs (no systemd), `--format docker` (the OCI format drops HEALTHCHECK), chroot isolation
# and host networking for builds, and explicit ulimits (podman's defaults exceed what a process
# may raise itself to here). Without systemd the periodic health timer does not run, so the
# HEALTHCHECK command is run explicitly with `podman healthcheck run`.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
ERR_AT=""
trap 'ERR_AT="line $LINENO: $BASH_COMMAND"' ERR

IMAGE="${CONTAINER_IMAGE:-normalize-service:ci}"
SHUTDOWN_TIMEOUT_MS=10000
# Size budget of the runtime image. Debian's slim base is about 75 MB and is shared by every
# image built on it (pulled once per node); what this Dockerfile adds is the binary, the CA bundle
# and one user, which must stay under OWN_BUDGET_MB. The total budget leaves 5 MB of slack over
# the two. A distroless base would save ~50 MB once per node, but loses the shell operators use
# for `podman exec` debugging; a static musl binary needs a target this toolchain lacks.
IMAGE_BUDGET_MB=105
OWN_BUDGET_MB=25
BINARY_BUDGET_MB=20

# Without systemd podman cannot set up the periodic health timer and says so on every run, create
# and removal; that one message is dropped, everything else podman prints is kept.
P() {
  podman --runtime runc --cgroup-manager cgroupfs "$@" \
    2> >(grep -v -e 'unable to get systemd connection' -e 'Removing timer for container' >&2)
}
PG=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p 5432 -U postgres)
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
PROBE=("$PY" "$ROOT/scripts/container_probe.py")

T0=$SECONDS
section() { printf '\n-- [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
ok() { printf '   ok  %s\n' "$*"; }
info() { printf '       %s\n' "$*"; }
FAILED=0
fail() { printf '   FAIL %s\n' "$*" >&2; FAILED=1; exit 1; }

# --- 1. tools ---------------------------------------------------------------------------------------
section "tools"
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || fail "need ${missing[*]} (apt-get install ${missing[*]}), and root to run podman"
  info "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || fail "run as root (rootful podman with host networking)"
NATS_BIN=/usr/sbin/nats-server
[ -x "$NATS_BIN" ] || NATS_BIN="$(command -v nats-server || true)"
[ -n "$NATS_BIN" ] || fail "no nats-server (apt-get install nats-server)"
"${PG[@]}" -d postgres -c 'select 1' >/dev/null 2>&1 || fail "PostgreSQL does not answer on 127.0.0.1:5432 (user postgres, trust)"
ok "$(podman --version), $(runc --version | head -n1), $(prometheus --version 2>&1 | head -n1 | cut -d' ' -f1-3), $("$NATS_BIN" --version)"

# ulimits: the shell's own hard limits (podman lowers its own nproc to 32768).
nofile="$(ulimit -Hn)"; [ "$nofile" = unlimited ] && nofile=1048576
nproc="$(ulimit -Hu)"; { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
RUN_FLAGS=(--network host --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

# --- state and clean-up -------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/normalize-container-test.XXXXXX)"
NAME="normalize-ct-$$"
DB="normalize_container_$$"
NATS_PID="" PROM_PID="" LOCKER_PID=""
read -r NATS_PORT HTTP_PORT METRICS_PORT PROM_PORT < <("${PROBE[@]}" ports 4)

show_logs() {
  local f
  if P container exists "$NAME" 2>/dev/null; then
    echo "--- container logs (last 40 lines)" >&2
    P logs --tail 40 "$NAME" >&2 2>&1 || true
  fi
  for f in "$WORK"/nats.log "$WORK"/prometheus.log "$WORK"/build.log; do
    [ -s "$f" ] || continue
    echo "--- $f (last 20 lines)" >&2
    tail -n 20 "$f" >&2
  done
}

cleanup() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    [ "$FAILED" -eq 1 ] || printf '   FAIL exit %s at %s\n' "$rc" "${ERR_AT:-?}" >&2
    show_logs
  fi
  P rm -f --ignore -t 0 "$NAME" "$NAME-cli" >/dev/null 2>&1
  for pid in $LOCKER_PID $PROM_PID $NATS_PID; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  "${PG[@]}" -d postgres -c "ALTER DATABASE $DB ALLOW_CONNECTIONS true" >/dev/null 2>&1
  "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
  if [ "$rc" -eq 0 ]; then
    printf '\ncontainer test: passed in %d s\n' "$((SECONDS - T0))"
  else
    printf '\ncontainer test: FAILED after %d s\n' "$((SECONDS - T0))" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Polls a command until it succeeds: wait_until SECONDS DESCRIPTION COMMAND...
wait_until() {
  local limit=$1 what=$2 start=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$limit" ] || fail "$what: not within $limit s"
    sleep 0.5
  done
}
healthcheck() { P healthcheck run "$NAME"; }
unhealthy() { ! P healthcheck run "$NAME"; }
sql() { "${PG[@]}" -d "$DB" -At -c "$1"; }
ms() { date +%s%3N; }

# --- 2. base images and the build ----------------------------------------------------------------------
section "base images"
# The stand-in rust image carries the machine's toolchain; when that is not the version the
# Dockerfile names, the build asks for the machine's version, so every name stays true.
DOCKERFILE_RUST="$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile | head -n1)"
MACHINE_RUST="$(rustc --version | awk '{ split($2, v, "."); print v[1] "." v[2] }')"
BUILD_ARGS=()
if [ "$MACHINE_RUST" != "$DOCKERFILE_RUST" ]; then
  info "the machine's Rust is $MACHINE_RUST, the Dockerfile's $DOCKERFILE_RUST: building with --build-arg RUST_VERSION=$MACHINE_RUST"
  BUILD_ARGS=(--build-arg "RUST_VERSION=$MACHINE_RUST")
fi
scripts/container-base-images.sh "$MACHINE_RUST"
# The build context has no .git: the revision normalize_build_info reports comes in as an argument.
REVISION="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
BUILD_ARGS+=(--build-arg "NORMALIZE_GIT_REVISION=$REVISION")

section "podman build -t $IMAGE ."
# The build stage is tagged too, so that pruning the images earlier builds left without a name
# keeps its layers: they are the cache of the next build (the dependency layer above all).
BUILD_IMAGE="$IMAGE-build"
build_start=$SECONDS
BUILD=(build --format docker --isolation chroot --network host ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"})
if ! { P "${BUILD[@]}" --target build -t "$BUILD_IMAGE" . && P "${BUILD[@]}" -t "$IMAGE" .; } >"$WORK/build.log" 2>&1; then
  fail "podman build failed (log above)"
fi
build_secs=$((SECONDS - build_start))
steps=$(grep -E 'STEP [0-9]+/[0-9]+: ' "$WORK/build.log" | grep -cv ': FROM ' || true)
cached=$(grep -c -- '--> Using cache' "$WORK/build.log" || true)
ok "built in ${build_secs} s ($cached of $steps steps from the layer cache; the build stage is counted twice)"
# The dependency layer: the first RUN that builds the stub crate.
if awk '/STEP [0-9]+\/[0-9]+: RUN .*cargo build/ { getline; exit !/Using cache/ }' "$WORK/build.log"; then
  info "dependency layer (Cargo.toml + Cargo.lock): from the cache, no dependency rebuilt"
else
  info "dependency layer (Cargo.toml + Cargo.lock): built"
fi
grep -E 'STEP [0-9]+/[0-9]+: RUN|Finished .release' "$WORK/build.log" | cut -c1-110 | sed 's/^/         | /'
P image prune -f >/dev/null 2>&1 || true

section "image"
inspect() { P image inspect --format "$1" "$IMAGE"; }
[ "$(inspect '{{.Config.User}}')" = "10001:10001" ] || fail "USER is $(inspect '{{.Config.User}}'), not 10001:10001"
hc="$(inspect '{{json .Config.Healthcheck}}')"
case "$hc" in *normalize-service*healthcheck*) ok "HEALTHCHECK kept in the image: $hc" ;; *) fail "no HEALTHCHECK in the image ($hc): built without --format docker?" ;; esac
[ "$(inspect '{{.Config.StopSignal}}')" = SIGTERM ] || fail "STOPSIGNAL is $(inspect '{{.Config.StopSignal}}')"
size=$(inspect '{{.Size}}')
base_size=$(P image inspect --format '{{.Size}}' debian:bookworm-slim)
cid=$(P create --no-healthcheck "$IMAGE")
P cp "$cid:/usr/local/bin/normalize-service" "$WORK/normalize-service"
P cp "$cid:/etc/ssl/certs/ca-certificates.crt" "$WORK/ca.crt"
P rm "$cid" >/dev/null
bin_size=$(stat -c %s "$WORK/normalize-service")
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1000000 }'; }
info "image $IMAGE: $(mb "$size") MB (base debian:bookworm-slim $(mb "$base_size") MB, this Dockerfile's layers $(mb $((size - base_size))) MB)"
info "binary /usr/local/bin/normalize-service: $(mb "$bin_size") MB; CA bundle $(grep -c 'BEGIN CERTIFICATE' "$WORK/ca.crt") certificates"
[ "$size" -le $((IMAGE_BUDGET_MB * 1000000)) ] || fail "the image is $(mb "$size") MB, over its budget of $IMAGE_BUDGET_MB MB"
[ $((size - base_size)) -le $((OWN_BUDGET_MB * 1000000)) ] || fail "the layers over the base are $(mb $((size - base_size))) MB, over $OWN_BUDGET_MB MB"
[ "$bin_size" -le $((BINARY_BUDGET_MB * 1000000)) ] || fail "the binary is $(mb "$bin_size") MB, over $BINARY_BUDGET_MB MB"
ok "within budget: image <= $IMAGE_BUDGET_MB MB, own layers <= $OWN_BUDGET_MB MB, binary <= $BINARY_BUDGET_MB MB"
help="$(P run --rm --no-healthcheck "${RUN_FLAGS[@]}" "$IMAGE" --help)"
for c in run healthcheck topology migrate dlq; do
  grep -qw "$c" <<<"$help" || fail "\`$IMAGE --help\` does not list $c (the dependency stub shipped?)"
done
ok "the entrypoint is the service (--help lists run, healthcheck, topology, migrate, dlq)"

# --- 3. run ----------------------------------------------------------------------------------------------
section "Prometheus with the shipped rules, scraping 127.0.0.1:$METRICS_PORT"
mkdir -p "$WORK/prom" "$WORK/nats"
# Only the intervals differ from monitoring/prometheus.yml (and a static target instead of the
# compose DNS names); the rules are the shipped file itself.
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/monitoring/alerts.yml
scrape_configs:
  - job_name: normalize-service
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
        labels:
          service: normalize-service
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null || fail "promtool rejects the test configuration"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prom" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
PROM="http://127.0.0.1:$PROM_PORT"
wait_until 60 "Prometheus ready" curl -fsS "$PROM/-/ready"
ok "Prometheus ready at $PROM"

section "container $NAME: NATS not there yet (nats://127.0.0.1:$NATS_PORT), database $DB"
P run -d --name "$NAME" "${RUN_FLAGS[@]}" \
  -e NATS_URL="nats://127.0.0.1:$NATS_PORT" \
  -e DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB" \
  -e HOST=127.0.0.1 -e PORT="$HTTP_PORT" -e METRICS_PORT="$METRICS_PORT" \
  -e SHUTDOWN_TIMEOUT_MS="$SHUTDOWN_TIMEOUT_MS" \
  -e CONSUMER_INFO_INTERVAL_MS=1000 \
  -e RUST_LOG=info \
  "$IMAGE" >/dev/null
wait_until 60 "the HTTP port answering" curl -sS -o /dev/null "http://127.0.0.1:$HTTP_PORT/health/live"
pid=$(P inspect --format '{{.State.Pid}}' "$NAME")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
[ "$uids" = "10001 10001 10001 10001" ] || fail "the daemon runs with uids $uids, not 10001"
ok "the daemon (host pid $pid) runs as uid 10001 (real, effective, saved, fs)"
out="$(P healthcheck run "$NAME" 2>&1)" && fail "healthcheck passed with NATS down: $out"
ok "podman healthcheck run: $out while NATS is down ($(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HTTP_PORT/health/ready") on /health/ready)"

section "nats-server on 127.0.0.1:$NATS_PORT"
"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
started=$SECONDS
wait_until 90 "podman healthcheck run healthy once NATS answers" healthcheck
ok "podman healthcheck run: healthy $((SECONDS - started)) s after nats-server started (consumers bound)"
"${PROBE[@]}" prom-target "$PROM" normalize-service 30 >"$WORK/t" || fail "scrape target"
ok "Prometheus target up: $(cat "$WORK/t")"

section "events published while it runs are stored"
HRV=40 SLEEP=10 OURA=5
for i in $(seq 1 $HRV); do
  printf '{"eventId":"ct-hrv-%d","payload":{"userId":"ct-hrv-%d","date":"2025-03-01","rMSSD":%d.5,"capturedAt":"2025-03-01T07:00:00Z"}}\n' "$i" "$i" "$((30 + i))"
done | "${PROBE[@]}" publish "127.0.0.1:$NATS_PORT" athlete-ally.hrv.raw-received >"$WORK/p" || fail "publishing HRV events"
info "hrv: $(cat "$WORK/p")"
for i in $(seq 1 $SLEEP); do
  printf '{"payload":{"userId":"ct-sleep-%d","date":"2025-03-01","durationMinutes":%d,"capturedAt":"2025-03-01T07:00:00Z"}}\n' "$i" "$((400 + i))"
done | "${PROBE[@]}" publish "127.0.0.1:$NATS_PORT" athlete-ally.sleep.raw-received >"$WORK/p" || fail "publishing sleep events"
info "sleep: $(cat "$WORK/p")"
for i in $(seq 1 $OURA); do
  printf '{"user_id":"ct-oura-%d","timestamp":"2025-03-01T07:00:00Z","data":{}}\n' "$i"
done | "${PROBE[@]}" publish "127.0.0.1:$NATS_PORT" vendor.oura.webhook.received >"$WORK/p" || fail "publishing Oura webhooks"
info "oura: $(cat "$WORK/p")"
echo 'not json' | "${PROBE[@]}" publish "127.0.0.1:$NATS_PORT" athlete-ally.hrv.raw-received >/dev/null || fail "publishing the invalid event"
info "one invalid HRV event (not JSON): a dead letter"
stored() {
  [ "$(sql "SELECT (SELECT count(*) FROM hrv_data WHERE user_id LIKE 'ct-hrv-%') || ' ' || (SELECT count(*) FROM sleep_data WHERE user_id LIKE 'ct-sleep-%') || ' ' || (SELECT count(*) FROM vendor_webhook_events WHERE user_id LIKE 'ct-oura-%')")" = "$HRV $SLEEP $OURA" ]
}
wait_until 60 "all $HRV hrv, $SLEEP sleep and $OURA oura rows stored" stored
ok "stored: $HRV hrv_data, $SLEEP sleep_data, $OURA vendor_webhook_events rows"
settled() {
  local s d
  for s in AA_CORE_HOT/normalize-hrv-durable AA_CORE_HOT/normalize-sleep-durable AA_VENDOR_HOT/normalize-oura; do
    d=$("${PROBE[@]}" consumer "127.0.0.1:$NATS_PORT" "${s%/*}" "${s#*/}") || return 1
    [ "$d" = "0 0" ] || return 1
  done
}
wait_until 30 "every durable with nothing pending or unacked" settled
ok "every durable settled (0 pending, 0 unacked): nothing left behind"

section "/metrics"
FAMILIES=(
  normalize_hrv_messages_total normalize_sleep_messages_total normalize_oura_messages_total
  dlq_messages_total normalize_processing_duration_seconds normalize_batch_size
  normalize_db_write_duration_seconds normalize_consumer_bound normalize_consumer_pending_messages
  normalize_consumer_ack_pending_messages normalize_consumer_redelivered_messages
  normalize_consumer_stalled normalize_nats_connected normalize_database_up normalize_build_info
  process_cpu_seconds_total process_resident_memory_bytes
)
for port in "$METRICS_PORT" "$HTTP_PORT"; do
  "${PROBE[@]}" metrics "http://127.0.0.1:$port/metrics" "${FAMILIES[@]}" >"$WORK/m" || fail "/metrics on port $port"
  ok "http://127.0.0.1:$port/metrics: $(cat "$WORK/m")"
done
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/metrics" || fail "GET /metrics"
grep -q "^normalize_build_info{.*git_revision=\"$REVISION\"" "$WORK/metrics" \
  || { grep normalize_build_info "$WORK/metrics" >&2; fail "normalize_build_info does not carry git_revision=$REVISION"; }
ok "normalize_build_info carries git_revision=\"$REVISION\""

section "Prometheus: rules and an alert on a dead letter"
"${PROBE[@]}" prom-rules "$PROM" 30 >"$WORK/r" || fail "rule evaluation"
ok "$(cat "$WORK/r")"
"${PROBE[@]}" prom-alert "$PROM" NormalizeDeadLetters firing 60 >"$WORK/a" || fail "NormalizeDeadLetters"
ok "$(cat "$WORK/a")"

section "operator commands in the image: topology status, dlq list"
cli() { P run --rm --no-healthcheck --name "$NAME-cli" "${RUN_FLAGS[@]}" -e NATS_URL="nats://127.0.0.1:$NATS_PORT" "$IMAGE" "$@"; }
cli topology status >"$WORK/status" 2>&1 || { cat "$WORK/status"; fail "podman run $IMAGE topology status"; }
for s in AA_CORE_HOT AA_VENDOR_HOT AA_DLQ; do
  grep -q "$s" "$WORK/status" || { cat "$WORK/status"; fail "topology status does not show $s"; }
done
ok "podman run $IMAGE topology status: exit 0, shows AA_CORE_HOT, AA_VENDOR_HOT, AA_DLQ"
sed 's/^/         | /' "$WORK/status" | head -n 12
cli dlq list >"$WORK/dlq" 2>&1 || { cat "$WORK/dlq"; fail "podman run $IMAGE dlq list"; }
grep -q schema-invalid "$WORK/dlq" || { cat "$WORK/dlq"; fail "dlq list does not show the schema-invalid dead letter"; }
ok "podman run $IMAGE dlq list: exit 0, shows the schema-invalid dead letter"
sed 's/^/         | /' "$WORK/dlq" | head -n 8

section "a real fault: the database refuses connections"
"${PG[@]}" -d postgres -c "ALTER DATABASE $DB ALLOW_CONNECTIONS false" \
  -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '$DB'" >/dev/null
cut=$SECONDS
wait_until 60 "podman healthcheck run unhealthy with the database cut" unhealthy
ok "podman healthcheck run: unhealthy $((SECONDS - cut)) s after the cut"
"${PROBE[@]}" prom-alert "$PROM" NormalizeDatabaseDown pending 60 >"$WORK/a" || fail "NormalizeDatabaseDown pending"
ok "$(cat "$WORK/a")"
info "waiting for NormalizeDatabaseDown to fire (for: 2m, as shipped)"
"${PROBE[@]}" prom-alert "$PROM" NormalizeDatabaseDown firing 180 >"$WORK/a" || fail "NormalizeDatabaseDown firing"
ok "$(cat "$WORK/a"); $((SECONDS - cut)) s after the cut"
"${PG[@]}" -d postgres -c "ALTER DATABASE $DB ALLOW_CONNECTIONS true" >/dev/null
restored=$SECONDS
wait_until 90 "podman healthcheck run healthy after the database is back" healthcheck
ok "database back: healthy again $((SECONDS - restored)) s later"

section "podman stop with a batch in flight"
# A session holds hrv_data locked, so the batch that delivers the next events waits inside its
# upsert; the lock is released two seconds after the SIGTERM, and the batch must then commit,
# publish and ack before the process exits.
"${PG[@]}" -d "$DB" >/dev/null 2>&1 <<'SQL' &
BEGIN;
LOCK TABLE hrv_data IN ACCESS EXCLUSIVE MODE;
SELECT pg_sleep(300);
SQL
LOCKER_PID=$!
locker_held() { [ "$(sql "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'hrv_data' AND l.mode = 'AccessExclusiveLock' AND l.granted")" -ge 1 ]; }
wait_until 30 "the lock on hrv_data held" locker_held
STOP=10
for i in $(seq 1 $STOP); do
  printf '{"eventId":"ct-stop-%d","payload":{"userId":"ct-stop-%d","date":"2025-03-02","rMSSD":50,"capturedAt":"2025-03-02T07:00:00Z"}}\n' "$i" "$i"
done | "${PROBE[@]}" publish "127.0.0.1:$NATS_PORT" athlete-ally.hrv.raw-received >/dev/null || fail "publishing"
waiting() { [ "$(sql "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB' AND wait_event_type = 'Lock'")" -ge 1 ]; }
wait_until 30 "a batch waiting on the lock" waiting
read -r pending_before unacked_before < <("${PROBE[@]}" consumer "127.0.0.1:$NATS_PORT" AA_CORE_HOT normalize-hrv-durable)
[ "$unacked_before" -ge 1 ] || fail "a batch waits on the lock, yet the durable shows nothing unacked"
ok "a batch is in flight: $unacked_before delivered and unacked (blocked on the lock), $pending_before not yet delivered"
t_stop=$(ms)
P stop -t $((SHUTDOWN_TIMEOUT_MS / 1000 + 15)) "$NAME" >"$WORK/stop" 2>&1 &
STOPPER=$!
sleep 2
"${PG[@]}" -d postgres -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$DB' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()" >/dev/null
wait "$LOCKER_PID" 2>/dev/null || true
LOCKER_PID=""
stop_rc=0
wait "$STOPPER" || stop_rc=$?
took=$(($(ms) - t_stop))
exit_code=$(P inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$stop_rc" -eq 0 ] || fail "podman stop exited $stop_rc: $(cat "$WORK/stop")"
[ "$exit_code" = 0 ] || fail "the daemon exited $exit_code after SIGTERM"
[ "$took" -le $((SHUTDOWN_TIMEOUT_MS + 2000)) ] || fail "podman stop took $took ms, over SHUTDOWN_TIMEOUT_MS + 2 s ($((SHUTDOWN_TIMEOUT_MS + 2000)) ms)"
ok "podman stop: exit 0 in $took ms (lock released at 2000 ms; limit $((SHUTDOWN_TIMEOUT_MS + 2000)) ms); the daemon exited 0"
stored_at_stop=$(sql "SELECT count(*) FROM hrv_data WHERE user_id LIKE 'ct-stop-%'")
read -r pending unacked < <("${PROBE[@]}" consumer "127.0.0.1:$NATS_PORT" AA_CORE_HOT normalize-hrv-durable)
[ "$unacked" -eq 0 ] || fail "$unacked messages left unacked at exit (the in-flight batch was abandoned)"
[ "$stored_at_stop" -ge "$unacked_before" ] || fail "only $stored_at_stop rows stored, but $unacked_before were in flight"
[ $((stored_at_stop + pending)) -eq "$STOP" ] || fail "$stored_at_stop stored + $pending pending != $STOP published: messages lost"
ok "the in-flight batch finished: $stored_at_stop of $STOP stored and acked before the exit, $pending still in the stream, 0 unacked"
P logs "$NAME" 2>&1 | tail -n 3 | sed 's/^/         | /'

section "restart: what was not delivered is stored by the next start"
P start "$NAME" >/dev/null
wait_until 60 "healthy after restart" healthcheck
all_stop_stored() { [ "$(sql "SELECT count(*) FROM hrv_data WHERE user_id LIKE 'ct-stop-%'")" -eq "$STOP" ]; }
wait_until 30 "all $STOP stored" all_stop_stored
wait_until 30 "the hrv durable settled" settled
ok "all $STOP stored, nothing pending or unacked"
t_stop=$(ms)
P stop -t 30 "$NAME" >/dev/null
took=$(($(ms) - t_stop))
exit_code=$(P inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$exit_code" = 0 ] || fail "the daemon exited $exit_code after SIGTERM when idle"
ok "idle podman stop: exit 0 in $took ms"

section "summary"
info "build ${build_secs} s ($cached of $steps steps cached); image $(mb "$size") MB, binary $(mb "$bin_size") MB"
