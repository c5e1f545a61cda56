# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are compiled in their own layer (from a stub crate), so a
# source change rebuilds only this crate.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /app
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/normalize-service-*
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked && strip target/release/normalize-service

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin normalize
COPY --from=build /app/target/release/normalize-service /usr/local/bin/normalize-service
USER 10001:10001
ENV LOG_FORMAT=json PORT=4102 METRICS_PORT=9464 HOST=0.0.0.0
EXPOSE 4102 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/normalize-service", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/normalize-service"]
CMD ["run"]
