# syntax=docker/dockerfile:1
# Multi-stage build. The dependency layer is compiled from a stub crate with only Cargo.toml and
# Cargo.lock copied, so it is cached until those change; a source change rebuilds only this crate.
# With podman: `podman build --format docker -t normalize-service .` (the OCI format would drop
# the HEALTHCHECK); scripts/container-test.sh builds and runs it that way in CI. On a machine
# without a container engine, `scripts/deploy_checks.py mirror-build` runs this stage's COPY/RUN
# steps (it reads them from this file) and checks the binary is the real one.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
# The binary is stripped below, so generating the line tables Cargo.toml's release profile asks
# for (useful for profiling outside the image) would be wasted: the build is faster without them
# and the cached target directory a fraction of the size.
ENV CARGO_PROFILE_RELEASE_DEBUG=0
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
# The stub's fingerprints are removed afterwards: COPY keeps the sources' (older) mtimes, and
# cargo would otherwise consider the stub binary up to date and ship it. Cargo.toml declares the
# throughput bench, which the image does not build; a stub file keeps the manifest valid.
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && echo 'fn main() {}' > benches/throughput.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/normalize-service-*
# migrations/ is embedded at compile time (sqlx::migrate!).
COPY migrations ./migrations
COPY src ./src
# build.rs records the git revision for normalize_build_info: the context has no .git, so the
# revision comes in as a build argument (scripts/container-test.sh passes it), else "unknown".
COPY build.rs ./
ARG NORMALIZE_GIT_REVISION=unknown
RUN cargo build --release --locked && strip target/release/normalize-service

# The runtime stage adds three things to Debian's slim base: a system user, the CA bundle and
# the binary (about 20 MB in all; scripts/container-test.sh prints the sizes and holds them to a
# budget). The bundle is the build image's, from the same Debian ca-certificates package: NATS
# over TLS verifies servers against it (rustls reads /etc/ssl/certs), and without apt-get here the
# stage needs no network and no package lists.
FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin normalize
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /app/target/release/normalize-service /usr/local/bin/normalize-service
USER 10001:10001
ENV LOG_FORMAT=json PORT=4102 METRICS_PORT=9464 HOST=0.0.0.0
EXPOSE 4102 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/normalize-service", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/normalize-service"]
CMD ["run"]
