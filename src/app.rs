//! The daemon: `Application::build(config)` then `run_until_stopped(token)`.
//!
//! Start-up order: metrics and health state, NATS, HTTP listeners (so `/health` answers at
//! once), then the database (created and migrated, retried in the background while it is down),
//! then one independent loop per consumer. Shutdown: readiness flips to 503 at once, intake
//! stops, in-flight messages finish and are settled, acks are flushed, the connection drained,
//! and the HTTP listeners stop last; past `SHUTDOWN_TIMEOUT_MS` every step is bounded, so no
//! peer (database, NATS, HTTP client) can hold the exit (docs/RELIABILITY.md §11).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::consumer::{sleep_or_cancel, Shared, Worker};
use crate::health::Health;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::store;

pub struct Application {
    shared: Shared,
    nats: async_nats::Client,
    nats_watch: crate::nats::ConnectionWatch,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        let health = Arc::new(Health::new(
            config.mode,
            &config
                .consumers
                .iter()
                .map(|c| (c.kind, c.durable.clone(), c.expires, c.ack_wait))
                .collect::<Vec<_>>(),
        ));
        let nats_watch = crate::nats::ConnectionWatch::new(&config.nats, metrics.nats_reconnects.clone());
        let nats = crate::nats::connect_daemon(&config.nats, nats_watch.clone()).await?;
        let js = async_nats::jetstream::new(nats.clone());
        let pool = store::lazy_pool(&config).context("DATABASE_URL")?;
        // Every batch in flight holds a connection while it writes; a pool smaller than that
        // makes batches queue for connections (and time out as "database unreachable").
        let in_flight: usize = config.consumers.iter().map(|c| c.pipeline_depth).sum();
        if in_flight >= config.database_max_connections as usize {
            tracing::warn!(
                database_max_connections = config.database_max_connections,
                batches_in_flight = in_flight,
                "DATABASE_MAX_CONNECTIONS should exceed the sum of *_PIPELINE_DEPTH (one connection per batch in flight, plus the health probe)"
            );
        }
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .with_context(|| format!("PORT: cannot listen on {}:{}", config.host, config.port))?;
        // Port 0 asks the OS for a free port (tests); equal non-zero ports share one listener.
        let metrics_listener = if config.metrics_port == 0 || config.metrics_port != config.port {
            Some(
                tokio::net::TcpListener::bind((config.host.as_str(), config.metrics_port))
                    .await
                    .with_context(|| {
                        format!(
                            "METRICS_PORT: cannot listen on {}:{}",
                            config.host, config.metrics_port
                        )
                    })?,
            )
        } else {
            None
        };
        Ok(Application {
            shared: Shared {
                config,
                js,
                pool,
                metrics,
                health,
            },
            nats,
            nats_watch,
            listener,
            metrics_listener,
        })
    }

    /// The bound `PORT` (useful when it was 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The bound `METRICS_PORT`; the main port when both are the same.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
            .unwrap_or_else(|| self.port())
    }

    /// Runs until `shutdown` is cancelled (or a task fails, which is an error).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let addr = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            event = "listening",
            address = %addr(&self.listener),
            metrics_address = %self.metrics_listener.as_ref().map_or_else(|| addr(&self.listener), addr),
            "listening on {} (health, metrics)",
            addr(&self.listener)
        );
        let Application {
            shared,
            nats,
            nats_watch,
            listener,
            metrics_listener,
        } = self;
        let config = shared.config.clone();
        let http_stop = CancellationToken::new();
        let state = HttpState {
            health: shared.health.clone(),
            metrics: shared.metrics.clone(),
            pool: shared.pool.clone(),
            nats: nats.clone(),
        };
        let mut servers = JoinSet::new();
        {
            let stop = http_stop.clone();
            let app = http::router(state.clone());
            servers.spawn(async move {
                http::serve(listener, app, stop)
                    .await
                    .context("HTTP server on PORT")
            });
        }
        if let Some(l) = metrics_listener {
            let stop = http_stop.clone();
            let app = http::metrics_router(state.clone());
            servers.spawn(async move {
                http::serve(l, app, stop)
                    .await
                    .context("HTTP server on METRICS_PORT")
            });
        }

        let mut background = JoinSet::new();
        background.spawn(prepare_database(
            config.clone(),
            shared.health.clone(),
            shutdown.clone(),
        ));
        background.spawn(watchdog(
            shared.clone(),
            nats.clone(),
            nats_watch,
            shutdown.clone(),
        ));
        background.spawn(watch_dlq_depth(shared.clone(), shutdown.clone()));
        let mut workers = JoinSet::new();
        for cc in &config.consumers {
            let worker = Worker::new(shared.clone(), cc.clone());
            let token = shutdown.clone();
            let kind = cc.kind;
            workers.spawn(async move {
                worker.run(token).await;
                kind
            });
        }

        // Any task ending before shutdown was asked for ends the process with an error.
        let failure: Option<anyhow::Error> = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            Some(r) = workers.join_next() => match r {
                // A loop returns by itself only when asked to stop.
                Ok(_) if shutdown.is_cancelled() => None,
                Ok(kind) => Some(anyhow::anyhow!("consumer loop {kind} ended unexpectedly")),
                Err(e) => Some(anyhow::anyhow!("consumer loop panicked: {e}")),
            },
            Some(r) = servers.join_next() => Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("HTTP server ended unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("HTTP server panicked: {e}"),
            }),
        };
        let deadline = Instant::now() + config.shutdown_timeout;
        shared.health.set_shutdown_deadline(deadline);
        shared.health.set_shutting_down();
        shutdown.cancel();
        tracing::info!(
            timeout_ms = config.shutdown_timeout.as_millis() as u64,
            "stopping intake; finishing in-flight messages"
        );
        let drained = tokio::time::timeout_at(deadline.into(), async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "shutdown timeout reached with consumers still busy; unsettled messages will be redelivered"
            );
            workers.abort_all();
        }
        // From here on nothing may hold the process past the deadline (plus a short grace for
        // the steps that are quick when healthy): each step is bounded, and an HTTP client, a
        // blocked database connection or an unreachable NATS server only costs its bound.
        let hard = deadline + AFTER_DEADLINE_GRACE;
        if nats.connection_state() == async_nats::connection::State::Connected {
            // Acks are fire-and-forget publishes: flush them before the connection goes.
            if tokio::time::timeout(until(hard), nats.flush()).await.is_err() {
                tracing::warn!("flushing NATS timed out; unflushed acks will be redelivered");
            }
            if tokio::time::timeout(until(hard), nats.drain()).await.is_err() {
                tracing::warn!("draining the NATS connection timed out");
            }
        } else {
            // A flush would wait for a reconnection that may never come; the acks it would
            // send are lost with the connection anyway and JetStream redelivers those messages.
            tracing::warn!("NATS disconnected at shutdown; unflushed acks will be redelivered");
        }
        background.abort_all();
        // The dead letters of the last moments (the drain) too.
        summarise_dead_letters(&shared.health);
        http_stop.cancel();
        let http_bound = until(hard).min(HTTP_CLOSE_GRACE);
        if tokio::time::timeout(http_bound, async { while servers.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = http_bound.as_millis() as u64,
                "HTTP connections still open after the grace period; closing them"
            );
            servers.abort_all();
        }
        // Closing the pool waits for every connection to come back; one stuck in a statement
        // (a lock, a dead server) would hold the exit for as long as the database likes.
        if tokio::time::timeout(until(hard).min(POOL_CLOSE_GRACE), shared.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database connections still busy at shutdown; leaving without them");
        }
        if Instant::now() > deadline {
            tracing::warn!(
                timeout_ms = config.shutdown_timeout.as_millis() as u64,
                "stop forced by SHUTDOWN_TIMEOUT_MS; messages left unsettled are redelivered by JetStream"
            );
        }
        match failure {
            Some(e) => Err(e),
            None => {
                tracing::info!("stopped");
                Ok(())
            }
        }
    }
}

/// The start-up line: the version and the effective configuration, secrets redacted
/// (`event` = `starting`).
pub fn log_effective_config(config: &Config) {
    let consumers = config
        .consumers
        .iter()
        .map(|c| {
            format!(
                "{}(durable={},batch={},expires_ms={},ack_wait_ms={},max_deliver={},pipeline_depth={})",
                c.kind,
                c.durable,
                c.batch_size,
                c.expires.as_millis(),
                c.ack_wait.as_millis(),
                c.max_deliver,
                c.pipeline_depth
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        event = "starting",
        version = crate::VERSION,
        git_revision = crate::metrics::GIT_REVISION,
        mode = config.mode.as_str(),
        provision = ?config.provision,
        nats = %crate::nats::servers(&config.nats),
        nats_auth = crate::nats::auth_kind(&config.nats),
        database = %crate::redact::redact_url(&config.database_url),
        database_max_connections = config.database_max_connections,
        database_statement_timeout_ms = config.database_statement_timeout.as_millis() as u64,
        run_migrations = config.run_migrations,
        host = %config.host,
        port = config.port,
        metrics_port = config.metrics_port,
        consumers = %consumers,
        shutdown_timeout_ms = config.shutdown_timeout.as_millis() as u64,
        "starting"
    );
}

/// How long the bounded shutdown steps (flush, drain, HTTP, pool) may run past
/// `SHUTDOWN_TIMEOUT_MS`; each is quick when its peer is healthy.
const AFTER_DEADLINE_GRACE: Duration = Duration::from_millis(1000);

/// How long open HTTP connections (a scrape in progress, a client in the middle of sending its
/// request) may delay the exit once the rest has stopped.
const HTTP_CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How long closing the database pool may take: idle connections close in milliseconds; one
/// still inside a statement (a batch aborted at the deadline) is not worth waiting for.
const POOL_CLOSE_GRACE: Duration = Duration::from_millis(500);

fn until(t: Instant) -> Duration {
    t.saturating_duration_since(Instant::now())
}

/// Creates and migrates the database, retrying with backoff until it works; consumers bind
/// only after this, so a missing table can never dead-letter messages.
async fn prepare_database(config: Arc<Config>, health: Arc<Health>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match store::connect(&config).await {
            Ok(pool) => {
                pool.close().await;
                health.set_database_ready();
                tracing::info!(migrations = config.run_migrations, "database ready");
                shutdown.cancelled().await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "database not ready; retrying");
                if !sleep_or_cancel(backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Logs at WARN when the connected nats-server has a bug that changes recovery times
/// (docs/RELIABILITY.md, "nats-server before 2.10.16").
fn warn_about_server_version(config: &Config, version: &str) {
    match crate::server_version::has_nak_requeue_bug(version) {
        Some(true) => {
            let ack_waits = config
                .consumers
                .iter()
                .map(|c| format!("{}={}", c.kind, c.ack_wait.as_millis()))
                .collect::<Vec<_>>()
                .join(",");
            let (major, minor, patch) = crate::server_version::NAK_REQUEUE_FIXED_IN;
            tracing::warn!(
                server_version = %version,
                fixed_in = %format!("{major}.{minor}.{patch}"),
                ack_wait_ms = %ack_waits,
                "nats-server older than {major}.{minor}.{patch}: when a NAK delay falls due while the \
                 durable's only queued pull request has lost interest (the client stopped \
                 listening before it expired), the server drops the message from its redelivery queue (redelivered only at ack_wait) and may deliver an \
                 already-acked message again; nothing is lost, but recovery after an outage can take \
                 up to ack_wait. Upgrade nats-server, or keep ack_wait short \
                 (NORMALIZE_{{HRV,SLEEP,OURA}}_ACK_WAIT_MS, e.g. 10000, for the durables it creates; \
                 existing durables keep theirs until edited) — see docs/RELIABILITY.md"
            );
        }
        Some(false) => {
            tracing::debug!(server_version = %version, "nats-server version has no known bug affecting the daemon")
        }
        None => tracing::debug!(server_version = %version, "cannot read the nats-server version"),
    }
}

fn log_database_change(change: Option<crate::health::DependencyChange>) {
    use crate::health::DependencyChange;
    match change {
        Some(DependencyChange::Down { error }) => {
            tracing::warn!(event = "database_down", error = %error, "database unreachable");
        }
        Some(DependencyChange::Up { outage, cause }) => tracing::info!(
            event = "database_up",
            outage_ms = u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
            cause = %cause,
            "database reachable again after {} ms",
            outage.as_millis()
        ),
        Some(DependencyChange::FirstUp) => tracing::debug!(event = "database_up", "database reachable"),
        None => {}
    }
}

/// Pool exhaustion (every connection in use), logged when it lasts [`PoolWatch::AFTER`]
/// watchdog ticks and again when a connection is free; the gauges every tick.
#[derive(Default)]
struct PoolWatch {
    exhausted_ticks: u32,
    logged: bool,
}

impl PoolWatch {
    const AFTER: u32 = 3;

    fn check(&mut self, shared: &Shared) {
        let size = shared.pool.size();
        let idle = u32::try_from(shared.pool.num_idle()).unwrap_or(u32::MAX);
        shared.metrics.database_pool_connections.set(i64::from(size));
        shared.metrics.database_pool_idle.set(i64::from(idle));
        let max = shared.config.database_max_connections;
        if size >= max && idle == 0 {
            self.exhausted_ticks += 1;
            if self.exhausted_ticks == Self::AFTER {
                self.logged = true;
                tracing::warn!(
                    event = "database_pool_exhausted",
                    database_max_connections = max,
                    "every database connection in use for {} s; batches wait for connections (DATABASE_MAX_CONNECTIONS)",
                    Self::AFTER
                );
            }
        } else {
            self.exhausted_ticks = 0;
            if std::mem::take(&mut self.logged) {
                tracing::info!(
                    event = "database_pool_available",
                    idle,
                    "database connections free again"
                );
            }
        }
    }
}

/// Keeps the dependency state, the stall and stuck verdicts and the connection gauges fresh
/// between scrapes. A loop is stalled when it has made no progress for 3 × expires, and stuck
/// when it holds messages and has settled none for 3 × ack_wait; neither is judged while NATS
/// or the database is down (see [`Health::check_stalls`]), so a broker outage never fails
/// liveness and restarts every instance at once.
async fn watchdog(
    shared: Shared,
    nats: async_nats::Client,
    nats_watch: crate::nats::ConnectionWatch,
    shutdown: CancellationToken,
) {
    let mut was = std::collections::HashMap::new();
    let mut checked_version = String::new();
    let mut announced_ready = false;
    let mut pool = PoolWatch::default();
    let mut last_summary = Instant::now();
    loop {
        let now = Instant::now();
        let up = nats.connection_state() == async_nats::connection::State::Connected;
        shared.metrics.nats_connected.set(i64::from(up));
        // The NATS transitions are logged by the connection's event callback (crate::nats).
        shared.health.observe_nats(
            now,
            if up {
                Ok(())
            } else {
                Err(nats_watch
                    .last_error()
                    .unwrap_or_else(|| "disconnected".to_string()))
            },
        );
        if up {
            // At start (or at the first connection, when NATS was down at start) and again
            // whenever a reconnection lands on a server of another version.
            let version = nats.server_info().version;
            if version != checked_version {
                warn_about_server_version(&shared.config, &version);
                checked_version = version;
            }
        }
        let db_result = store::round_trip(&shared.pool, Duration::from_secs(1)).await;
        let db = db_result.is_ok();
        shared.metrics.database_up.set(i64::from(db));
        log_database_change(shared.health.observe_database(now, db_result));
        pool.check(&shared);
        shared.health.set_dependencies_up(up && db);
        if !announced_ready && shared.health.ready(up, db) {
            announced_ready = true;
            tracing::info!(
                event = "ready",
                "ready: NATS connected, database up, every consumer bound"
            );
        }
        for v in shared.health.check_stalls(Instant::now()) {
            let kind = v.kind.as_str();
            let m = &shared.metrics;
            m.consumer_stalled
                .with_label_values(&[kind])
                .set(i64::from(v.stalled));
            m.consumer_stuck
                .with_label_values(&[kind])
                .set(i64::from(v.stuck));
            m.consumer_held
                .with_label_values(&[kind])
                .set(i64::try_from(v.held).unwrap_or(i64::MAX));
            let (stalled, stuck) = was.insert(v.kind, (v.stalled, v.stuck)).unwrap_or((false, false));
            if v.stalled && !stalled {
                tracing::error!(
                    event = "consumer_stalled",
                    consumer = kind,
                    "consumer loop stalled: no progress for 3 x expires with NATS and the database up"
                );
            } else if !v.stalled && stalled {
                tracing::info!(
                    event = "consumer_recovered",
                    consumer = kind,
                    "consumer loop recovered"
                );
            }
            if v.stuck && !stuck {
                tracing::error!(event = "consumer_stuck", consumer = kind, held = v.held, "consumer stuck: holding messages and settling none for 3 x ack_wait with NATS and the database up");
            } else if !v.stuck && stuck {
                tracing::info!(
                    event = "consumer_unstuck",
                    consumer = kind,
                    "consumer settles messages again"
                );
            }
        }
        if last_summary.elapsed() >= DEAD_LETTER_SUMMARY_EVERY {
            last_summary = Instant::now();
            summarise_dead_letters(&shared.health);
        }
        if !sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
            summarise_dead_letters(&shared.health);
            return;
        }
    }
}

/// Keeps `normalize_dlq_depth_messages` current: every `CONSUMER_INFO_INTERVAL_MS`, the
/// per-subject counts under `dlq.>` of the DLQ stream and (while the migration has not moved
/// `dlq.>` off it) the legacy stream. A stream that is absent has its series removed; one that
/// cannot be read now keeps its last values.
async fn watch_dlq_depth(shared: Shared, stop: CancellationToken) {
    let streams = &shared.config.streams;
    let mut names = vec![streams.dlq.clone()];
    if streams.legacy != streams.dlq {
        names.push(streams.legacy.clone());
    }
    loop {
        for name in &names {
            match dlq_depth(&shared.js, name).await {
                Ok(Some(depth)) => {
                    for (reason, n) in depth {
                        shared
                            .metrics
                            .dlq_depth
                            .with_label_values(&[name, reason])
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
                Ok(None) => {
                    for (reason, _) in crate::dlq::depth_by_reason([]) {
                        // Absent series are fine to "remove" again.
                        if shared
                            .metrics
                            .dlq_depth
                            .remove_label_values(&[name, reason])
                            .is_err()
                        {
                            continue;
                        }
                    }
                }
                Err(e) => tracing::debug!(stream = %name, error = %e, "dead-letter depth unavailable"),
            }
        }
        if !sleep_or_cancel(shared.config.consumer_info_interval, &stop).await {
            return;
        }
    }
}

/// The stream's dead letters by reason; `None` when the stream does not exist.
async fn dlq_depth(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> anyhow::Result<Option<std::collections::BTreeMap<&'static str, u64>>> {
    use futures::TryStreamExt as _;
    let handle = js.get_stream_no_info(stream).await?;
    let read = async {
        match handle.info_with_subjects("dlq.>").await {
            Ok(subjects) => subjects
                .map_ok(|(subject, n)| (subject, n as u64))
                .try_collect::<Vec<_>>()
                .await
                .map(Some)
                .map_err(anyhow::Error::from),
            Err(e) if stream_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let counts = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("stream info timed out")??;
    Ok(counts.map(|c| crate::dlq::depth_by_reason(c.iter().map(|(s, n)| (s.as_str(), *n)))))
}

fn stream_not_found(e: &async_nats::jetstream::context::RequestError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|j| j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// How often the dead letters stored are summarised at WARN (per consumer, when any).
pub const DEAD_LETTER_SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// One WARN line per consumer that dead-lettered messages since the last summary: how many,
/// by reason, and the range of their DLQ sequences (for `dlq list` / `dlq show`).
fn summarise_dead_letters(health: &Health) {
    for (kind, t) in health.take_dead_letters() {
        tracing::warn!(
            event = "dead_letters",
            consumer = kind.as_str(),
            count = t.count(),
            by_reason = %t.by_reason_text(),
            first_dlq_seq = t.first_dlq_seq,
            last_dlq_seq = t.last_dlq_seq,
            "{} message(s) dead-lettered in the last {} s ({}); see `normalize-service dlq list`",
            t.count(),
            DEAD_LETTER_SUMMARY_EVERY.as_secs(),
            t.by_reason_text()
        );
    }
}
