#!/usr/bin/env bash
# Checks the deployment kit on a machine without a container engine (run by .ci/run):
#   1. promtool: Prometheus config, alert rules, and the alert unit tests (monitoring/alerts.test.yml)
#   2. scripts/deploy_checks.py check: structure and cross-references of docker-compose.yml,
#      Dockerfile, .dockerignore, monitoring/prometheus.yml, Grafana provisioning and dashboard
#   3. scripts/deploy_checks.py selftest: known-bad edits are each reported by step 2
#   4. scripts/deploy_checks.py mirror-build: the Dockerfile's build stage (its COPY/RUN steps)
#      run with cargo in a scratch directory; the binary must be the real service.
#      CHECK_DEPLOY_BUILD=0 skips it; MIRROR_TARGET_DIR keeps its target dir between runs
#      (default under ~/.cache; a first run compiles the dependencies in release mode, ~4 min).
# Not covered here: building and running the image, its HEALTHCHECK, and Prometheus loading the
# rules; scripts/container-test.sh does those with podman (run by .ci/run, which then skips step
# 4). Not covered anywhere: pulling the compose stack's images (NATS, PostgreSQL, Prometheus,
# Grafana: no registry serves images here) and `docker compose up`. The metrics and labels used by
# the alerts and the dashboard are checked against a live scrape by `cargo test --test it deploy`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf -- '-- %s\n' "$*"; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "check-deploy: need $* (apt-get install $*)" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

command -v promtool >/dev/null 2>&1 || apt_install prometheus
PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import yaml' 2>/dev/null || apt_install python3-yaml
  PY=/usr/bin/python3
fi

step "promtool check config monitoring/prometheus.yml"
promtool check config monitoring/prometheus.yml
step "promtool check rules monitoring/alerts.yml"
promtool check rules monitoring/alerts.yml
step "promtool test rules monitoring/alerts.test.yml"
(cd monitoring && promtool test rules alerts.test.yml)

step "compose, Dockerfile, Prometheus and Grafana cross-references"
"$PY" scripts/deploy_checks.py check
step "the checks catch known-bad edits"
"$PY" scripts/deploy_checks.py selftest

if [ "${CHECK_DEPLOY_BUILD:-1}" != "0" ]; then
  step "Dockerfile build stage mirrored with cargo"
  export MIRROR_TARGET_DIR="${MIRROR_TARGET_DIR:-$HOME/.cache/normalize-service/docker-mirror-target}"
  "$PY" scripts/deploy_checks.py mirror-build
else
  step "Dockerfile build stage mirror skipped (CHECK_DEPLOY_BUILD=0)"
fi
