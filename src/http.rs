//! HTTP: `/health`, `/health/live`, `/health/ready` and `/metrics` (axum), plus the tiny
//! client the `healthcheck` subcommand uses so container images need no curl.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct HttpState {
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub pool: PgPool,
    pub nats: async_nats::Client,
}

impl HttpState {
    fn nats_connected(&self) -> bool {
        let up = self.nats.connection_state() == State::Connected;
        self.metrics.nats_connected.set(i64::from(up));
        up
    }

    async fn database_up(&self) -> bool {
        let up = crate::store::ping(&self.pool, Duration::from_secs(1)).await;
        self.metrics.database_up.set(i64::from(up));
        up
    }
}

/// The main port: health endpoints and metrics.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The metrics port: `/metrics` only (plus liveness, handy for scrapers' blackbox checks).
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .with_state(state)
}

/// How long a connection may take to send a request's head once it started one: a client that
/// stops half-way is disconnected instead of holding a connection (and the shutdown) for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` (HTTP/1.1, with [`HEADER_READ_TIMEOUT`]) until `stop` is
/// cancelled; then stops accepting, lets open connections finish their request and returns when
/// they are closed. The caller bounds that wait: dropping (aborting) this future closes every
/// connection, since they are tasks of its own `JoinSet`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the connections we
                    // have, and try again shortly (as axum's `serve` does).
                    tracing::warn!(error = %e, "HTTP accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            // Connection errors (a client going away, a header-read timeout) concern that
            // client only.
            tokio::select! {
                r = conn.as_mut() => drop(r),
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    drop(conn.await);
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn health(AxState(s): AxState<HttpState>) -> Response {
    let nats = s.nats_connected();
    let db = s.database_up().await;
    let body = s.health.to_json(nats, db);
    let code = if s.health.ready(nats, db) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn live(AxState(s): AxState<HttpState>) -> Response {
    if !s.health.live() {
        (StatusCode::SERVICE_UNAVAILABLE, "stalled\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn ready(AxState(s): AxState<HttpState>) -> Response {
    let nats = s.nats_connected();
    let db = s.database_up().await;
    if s.health.ready(nats, db) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        // Which checks fail, e.g. "not ready: database unavailable (…); consumer hrv not bound".
        let reasons = s.health.not_ready_reasons(nats, db).join("; ");
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reasons}\n")).into_response()
    }
}

async fn metrics(AxState(s): AxState<HttpState>) -> Response {
    s.nats_connected();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

/// A minimal HTTP/1.0 GET: returns the status code and body.
pub async fn http_get(host: &str, port: u16, path: &str, within: Duration) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(within, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
}
