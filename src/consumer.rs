//! The pull loop: bind, fetch, hand what arrived to the batch pipeline ([`batch`]), which
//! settles each message as [`outcome::decide`] says; never die on a pull error.
//!
//! Only intake listens to the shutdown token: a batch being processed is finished and settled;
//! messages already delivered but not yet started are NAKed so another instance takes them now.

mod batch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use chrono::Utc;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConsumerConfig, PullMode};
use crate::dlq::{self, Origin, Reason};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::topology::{self, Binding};

/// Everything a consumer loop shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub js: jetstream::Context,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

#[derive(Clone)]
pub struct Worker {
    shared: Shared,
    cc: ConsumerConfig,
}

/// The batches of one binding's loop that are being processed.
struct Flight {
    worker: Arc<Worker>,
    binding: Arc<Binding>,
    batches: batch::InFlight,
}

impl Flight {
    /// Starts a batch on its own task once the pipeline has room for it (see
    /// [`batch::InFlight`]).
    async fn start(
        &mut self,
        msgs: Vec<batch::Received>,
        db_down: &Arc<AtomicBool>,
        shutdown: &CancellationToken,
    ) {
        let ack_wait = self.binding.consumer.cached_info().config.ack_wait;
        self.batches.room(&msgs, ack_wait).await;
        self.batches.spawn(self.worker.clone().run_batch(
            msgs,
            self.binding.clone(),
            db_down.clone(),
            shutdown.clone(),
        ));
    }
}

/// A binding with its running loop's stop token.
struct Running {
    binding: Binding,
    token: CancellationToken,
}

type LoopFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = (String, LoopEnd)> + Send + 'a>>;

/// Why a consume loop returned.
enum LoopEnd {
    Shutdown,
    /// The durable or its stream is gone: bind again.
    Lost,
}

/// Sleeps unless cancelled first; returns false when cancelled.
pub async fn sleep_or_cancel(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

impl Worker {
    pub fn new(shared: Shared, cc: ConsumerConfig) -> Worker {
        Worker { shared, cc }
    }

    /// Runs until `shutdown` is cancelled: binds (retrying with backoff while nothing can be
    /// bound), consumes, binds again if the binding disappears, and — in multi mode — moves to
    /// whichever of primary and legacy stream captures the filter subject, draining the old
    /// durable until it has nothing pending or unacked. No restart is needed at any migration step.
    pub async fn run(self, shutdown: CancellationToken) {
        let kind = self.cc.kind;
        // Never bind before migrations have run: a missing table would dead-letter everything.
        while !self.shared.health.database_ready() {
            if !sleep_or_cancel(Duration::from_millis(200), &shutdown).await {
                return;
            }
        }
        let mut loops: FuturesUnordered<LoopFuture<'_>> = FuturesUnordered::new();
        let mut active: Option<Running> = None;
        let mut draining: Vec<Running> = Vec::new();
        let mut backoff = Duration::from_millis(250);
        loop {
            if active.is_none() && !shutdown.is_cancelled() {
                match topology::bind(&self.shared.js, &self.shared.config, &self.cc).await {
                    Ok(b) => {
                        backoff = Duration::from_millis(250);
                        let previous = draining.iter().position(|r| r.binding.stream == b.stream);
                        match previous {
                            // Bound again where we were draining: that loop becomes the active one.
                            Some(i) => active = Some(draining.remove(i)),
                            None => {
                                self.on_bound(&b, None);
                                let token = shutdown.child_token();
                                loops.push(Box::pin(self.run_binding(b.clone(), token.clone())));
                                active = Some(Running { binding: b, token });
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %kind, error = %e, retry_in_ms = backoff.as_millis() as u64, "consumer not bound; retrying");
                        self.shared.health.update(kind, |s| {
                            s.stream = None;
                            s.bind_error = Some(e.to_string());
                        });
                    }
                }
            }
            self.report_bindings(active.as_ref(), &draining);
            let wait = if active.is_some() {
                self.shared.config.rebind_interval
            } else {
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(15));
                w
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    while loops.next().await.is_some() {}
                    tracing::info!(consumer = %kind, "consumer stopped");
                    return;
                }
                Some((stream, end)) = loops.next(), if !loops.is_empty() => {
                    if active.as_ref().is_some_and(|r| r.binding.stream == stream) {
                        if let LoopEnd::Lost = end {
                            tracing::warn!(consumer = %kind, stream = %stream, "binding lost; binding again");
                            active = None;
                            self.shared.health.update(kind, |s| s.stream = None);
                        }
                    } else {
                        draining.retain(|r| r.binding.stream != stream);
                        tracing::info!(consumer = %kind, stream = %stream, "finished draining the previous durable");
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if let Some(current) = active.take() {
                        active = Some(self.rebalance(current, &mut draining, &mut loops, &shutdown).await);
                    }
                    self.stop_drained(&draining).await;
                }
            }
        }
    }

    /// Consumes one binding until it ends; keeps its gauges and info refresher for that time.
    async fn run_binding(&self, binding: Binding, token: CancellationToken) -> (String, LoopEnd) {
        let kind = self.cc.kind;
        let info_stop = token.child_token();
        let refresher = tokio::spawn(refresh_info(
            self.shared.clone(),
            self.cc.clone(),
            binding.clone(),
            info_stop.clone(),
        ));
        let end = self.consume(&binding, &token).await;
        info_stop.cancel();
        let _ = refresher.await;
        self.shared
            .metrics
            .consumer_bound
            .with_label_values(&[kind.as_str(), &binding.stream, &binding.durable])
            .set(0);
        (binding.stream, end)
    }

    /// Multi mode: if the stream that captures the filter subject is no longer the active one,
    /// make it active and keep the old binding running as a draining one.
    async fn rebalance<'a>(
        &'a self,
        current: Running,
        draining: &mut Vec<Running>,
        loops: &mut FuturesUnordered<LoopFuture<'a>>,
        shutdown: &CancellationToken,
    ) -> Running {
        if self.shared.config.mode != crate::config::StreamMode::Multi {
            return current;
        }
        let Some(target) = topology::capturing_stream(&self.shared.js, &self.shared.config, &self.cc).await
        else {
            return current;
        };
        if target == current.binding.stream {
            return current;
        }
        let primary = self.shared.config.streams.primary(self.cc.primary).to_string();
        let next = if let Some(i) = draining.iter().position(|r| r.binding.stream == target) {
            draining.remove(i)
        } else {
            match topology::bind_on(&self.shared.js, &self.shared.config, &self.cc, &target).await {
                Ok(Some(mut b)) => {
                    b.fallback = b.stream != primary;
                    let token = shutdown.child_token();
                    loops.push(Box::pin(self.run_binding(b.clone(), token.clone())));
                    Running { binding: b, token }
                }
                Ok(None) => return current,
                Err(e) => {
                    tracing::warn!(consumer = %self.cc.kind, stream = %target, error = %e, "cannot bind the capturing stream yet");
                    return current;
                }
            }
        };
        tracing::info!(
            consumer = %self.cc.kind, from = %current.binding.stream, to = %next.binding.stream,
            "subjects moved: consuming the new stream and draining the old durable"
        );
        self.on_bound(&next.binding, Some(&current.binding.stream));
        draining.push(current);
        next
    }

    /// Stops draining loops whose durable has nothing pending or unacked.
    async fn stop_drained(&self, draining: &[Running]) {
        for r in draining {
            if r.token.is_cancelled() {
                continue;
            }
            if let Ok(info) = r.binding.consumer.get_info().await {
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    r.token.cancel();
                }
            }
        }
    }

    fn report_bindings(&self, active: Option<&Running>, draining: &[Running]) {
        let names: Vec<String> = draining.iter().map(|r| r.binding.stream.clone()).collect();
        self.shared.health.update(self.cc.kind, |s| {
            if let Some(a) = active {
                s.stream = Some(a.binding.stream.clone());
                s.fallback = a.binding.fallback;
                s.bind_error = None;
            }
            s.draining = names;
        });
    }

    /// A new active binding; `from` is the stream it replaces (live rebinding).
    fn on_bound(&self, b: &Binding, from: Option<&str>) {
        let kind = self.cc.kind;
        let m = &self.shared.metrics;
        let primary = self.shared.config.streams.primary(self.cc.primary).to_string();
        if b.fallback && from.is_none() {
            tracing::warn!(consumer = %kind, from = %primary, to = %b.stream, durable = %b.durable, "primary stream or durable absent; bound to the fallback stream");
        } else {
            tracing::info!(consumer = %kind, stream = %b.stream, durable = %b.durable, "consumer bound");
        }
        // Count every move between primary and fallback: the initial fallback and each switch.
        if b.fallback || from.is_some() {
            let from = from.unwrap_or(&primary);
            m.stream_fallback
                .with_label_values(&[kind.as_str(), from, &b.stream])
                .inc();
        }
        m.consumer_bound
            .with_label_values(&[kind.as_str(), &b.stream, &b.durable])
            .set(1);
        m.touch_binding(kind, &self.cc.filter_subject, &b.stream, &b.durable);
        self.shared.health.update(kind, |s| {
            s.stream = Some(b.stream.clone());
            s.durable = b.durable.clone();
            s.fallback = b.fallback;
            s.bind_error = None;
            s.last_progress = Some(Instant::now());
            s.stalled = false;
        });
    }

    fn progress(&self, pulled: bool, messages: bool) {
        let now = Utc::now();
        self.shared.health.update(self.cc.kind, |s| {
            s.last_progress = Some(Instant::now());
            if pulled {
                s.last_pull_at = Some(now);
            }
            if messages {
                s.last_message_at = Some(now);
            }
        });
    }

    fn count_pull_error(&self, b: &Binding, error: &dyn std::fmt::Display) {
        tracing::warn!(consumer = %self.cc.kind, stream = %b.stream, error = %error, "pull ended with an error; issuing a fresh request");
        self.shared
            .metrics
            .pull_errors
            .with_label_values(&[self.cc.kind.as_str(), &b.stream, &b.durable])
            .inc();
    }

    async fn consume(&self, b: &Binding, shutdown: &CancellationToken) -> LoopEnd {
        let mut flight = Flight {
            worker: Arc::new(self.clone()),
            binding: Arc::new(b.clone()),
            batches: batch::InFlight::new(self.cc.pipeline_depth),
        };
        let end = match self.cc.pull_mode {
            PullMode::Fetch => self.consume_fetch(b, shutdown, &mut flight).await,
            PullMode::Stream => self.consume_stream(b, shutdown, &mut flight).await,
        };
        // Whatever ended the loop, the batches already started have their rows committed or
        // being committed: let them settle.
        flight.batches.drain().await;
        end
    }

    /// Batch requests bounded by `expires`. A pull's messages are processed in sub-batches of
    /// what has arrived so far (see [`batch::gather`]), so a partial batch never waits for the
    /// rest or for `expires`. When a pull came back full (a backlog), the next pull is issued
    /// before the current batch is written, so the server delivers it while we write; this is
    /// done only while two batches fit in the durable's `max_ack_pending`. Batches are handed to
    /// [`Flight::start`], which runs up to `*_PIPELINE_DEPTH` of them at once.
    async fn consume_fetch(&self, b: &Binding, shutdown: &CancellationToken, flight: &mut Flight) -> LoopEnd {
        let mut consecutive_errors: u32 = 0;
        let mut prefetched: Option<pull::Batch> = None;
        let max_ack_pending = b.consumer.cached_info().config.max_ack_pending;
        let overlap = max_ack_pending <= 0
            || i64::try_from(self.cc.batch_size.saturating_mul(2)).is_ok_and(|two| two <= max_ack_pending);
        loop {
            let batch = match prefetched.take() {
                Some(batch) => Ok(batch),
                None => {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return LoopEnd::Shutdown,
                        r = self.pull(b) => r,
                    }
                }
            };
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    self.count_pull_error(b, &e);
                    self.progress(true, false);
                    if let Some(end) = self.after_error(b, &mut consecutive_errors, shutdown).await {
                        return end;
                    }
                    continue;
                }
            };
            let mut received = 0usize;
            let db_down = Arc::new(AtomicBool::new(false));
            let mut failed = false;
            // The server ends the request at `expires`; a request lost in a reconnect is
            // abandoned shortly after, instead of at the library's expires + 5 s, so the
            // watchdog never mistakes a reconnect for a wedged loop.
            let deadline = tokio::time::Instant::now() + self.cc.expires + Duration::from_millis(500);
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        release_buffered(&mut batch).await;
                        if let Some(mut p) = prefetched.take() {
                            release_buffered(&mut p).await;
                        }
                        return LoopEnd::Shutdown;
                    }
                    n = tokio::time::timeout_at(deadline, batch.next()) => n,
                };
                let next = match next {
                    Ok(n) => n,
                    Err(_) => {
                        tracing::debug!(consumer = %self.cc.kind, "pull request outlived its expiry; issuing a fresh one");
                        break;
                    }
                };
                let first = match next {
                    None => break,
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => {
                        self.count_pull_error(b, &e);
                        failed = true;
                        break;
                    }
                };
                let mut msgs = vec![batch::Received {
                    msg: first,
                    at: Instant::now(),
                }];
                let gathered = batch::gather(&mut batch, &mut msgs, self.cc.batch_size - received).await;
                received += msgs.len();
                if overlap
                    && received >= self.cc.batch_size
                    && prefetched.is_none()
                    && !shutdown.is_cancelled()
                {
                    match self.pull(b).await {
                        Ok(p) => prefetched = Some(p),
                        Err(e) => self.count_pull_error(b, &e),
                    }
                }
                flight.start(msgs, &db_down, shutdown).await;
                self.progress(false, true);
                match gathered {
                    batch::Gathered::Open => {}
                    batch::Gathered::Ended => break,
                    batch::Gathered::Failed(e) => {
                        self.count_pull_error(b, &e);
                        failed = true;
                        break;
                    }
                }
            }
            self.progress(true, false);
            self.shared
                .metrics
                .batch_size
                .with_label_values(&[self.cc.kind.as_str()])
                .observe(received as f64);
            if failed {
                if let Some(mut p) = prefetched.take() {
                    release_buffered(&mut p).await;
                }
                if let Some(end) = self.after_error(b, &mut consecutive_errors, shutdown).await {
                    return end;
                }
                continue;
            }
            consecutive_errors = 0;
            if received == 0 && !sleep_or_cancel(self.cc.idle_backoff, shutdown).await {
                return LoopEnd::Shutdown;
            }
        }
    }

    /// Issues one pull request for `batch_size` messages bounded by `expires`.
    async fn pull(&self, b: &Binding) -> Result<pull::Batch, pull::BatchError> {
        b.consumer
            .batch()
            .max_messages(self.cc.batch_size)
            .expires(self.cc.expires)
            .messages()
            .await
    }

    /// A continuous `messages()` stream; the library keeps pull requests outstanding and
    /// reports missed heartbeats, which are logged and counted, never fatal. What is already
    /// buffered when a message arrives (up to `batch_size`) is processed with it as one batch.
    async fn consume_stream(
        &self,
        b: &Binding,
        shutdown: &CancellationToken,
        flight: &mut Flight,
    ) -> LoopEnd {
        let mut consecutive_errors: u32 = 0;
        'outer: loop {
            let heartbeat = (self.cc.expires / 2).max(Duration::from_millis(50));
            let opened = b
                .consumer
                .stream()
                .max_messages_per_batch(self.cc.batch_size)
                .expires(self.cc.expires)
                .heartbeat(heartbeat)
                .messages();
            let stream = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return LoopEnd::Shutdown,
                r = opened => r,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    self.count_pull_error(b, &e);
                    if let Some(end) = self.after_error(b, &mut consecutive_errors, shutdown).await {
                        return end;
                    }
                    continue;
                }
            };
            let db_down = Arc::new(AtomicBool::new(false));
            let mut last_db_reset = Instant::now();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        release_stream_buffered(&mut stream).await;
                        return LoopEnd::Shutdown;
                    }
                    n = tokio::time::timeout(self.cc.expires, stream.next()) => n,
                };
                // The "batch" of stream mode is one expiry period: the database short-circuit
                // is reset after it, so the database is tried again.
                if last_db_reset.elapsed() >= self.cc.expires {
                    db_down.store(false, Ordering::Relaxed);
                    last_db_reset = Instant::now();
                }
                match next {
                    Err(_idle) => self.progress(true, false),
                    Ok(None) => continue 'outer,
                    Ok(Some(Ok(msg))) => {
                        consecutive_errors = 0;
                        let mut msgs = vec![batch::Received {
                            msg,
                            at: Instant::now(),
                        }];
                        let gathered = batch::gather(&mut stream, &mut msgs, self.cc.batch_size).await;
                        // In stream mode a "pull" is what arrived together.
                        self.shared
                            .metrics
                            .batch_size
                            .with_label_values(&[self.cc.kind.as_str()])
                            .observe(msgs.len() as f64);
                        flight.start(msgs, &db_down, shutdown).await;
                        self.progress(true, true);
                        match gathered {
                            batch::Gathered::Open => {}
                            batch::Gathered::Ended => continue 'outer,
                            batch::Gathered::Failed(e) => {
                                use jetstream::consumer::pull::MessagesErrorKind as K;
                                self.count_pull_error(b, &e);
                                if e.kind() != K::MissingHeartbeat {
                                    if let Some(end) =
                                        self.after_error(b, &mut consecutive_errors, shutdown).await
                                    {
                                        return end;
                                    }
                                    continue 'outer;
                                }
                            }
                        }
                    }
                    Ok(Some(Err(e))) => {
                        use jetstream::consumer::pull::MessagesErrorKind as K;
                        self.count_pull_error(b, &e);
                        self.progress(true, false);
                        match e.kind() {
                            K::MissingHeartbeat => continue,
                            _ => {
                                if let Some(end) =
                                    self.after_error(b, &mut consecutive_errors, shutdown).await
                                {
                                    return end;
                                }
                                continue 'outer;
                            }
                        }
                    }
                }
            }
        }
    }

    /// After a pull error: find out whether the binding is gone, then back off.
    async fn after_error(
        &self,
        b: &Binding,
        consecutive: &mut u32,
        shutdown: &CancellationToken,
    ) -> Option<LoopEnd> {
        *consecutive += 1;
        if topology::binding_gone(b).await {
            return Some(LoopEnd::Lost);
        }
        let delay = Duration::from_millis(100 * u64::from((*consecutive).min(50)));
        if !sleep_or_cancel(delay, shutdown).await {
            return Some(LoopEnd::Shutdown);
        }
        None
    }

    /// Publishes the dead letter and TERMs the original once JetStream has stored it. When the
    /// dead letter cannot be stored the original is NAKed (never acked or terminated); on a
    /// durable with a finite server-side limit, the last delivery is held with progress acks
    /// while the dead letter is retried. Returns true when the dead letter was stored.
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        origin: &Origin<'_>,
        reason: Reason,
        error: &str,
        b: &Binding,
        shutdown: &CancellationToken,
    ) -> bool {
        let kind = self.cc.kind;
        let mut attempt: i64 = 0;
        loop {
            match dlq::publish(
                &self.shared.js,
                &self.cc.dlq_prefix,
                &msg.message,
                origin,
                reason,
                error,
            )
            .await
            {
                Ok(_) => {
                    self.shared.health.update(kind, |s| s.dead_letter_ok = true);
                    tracing::error!(
                        consumer = %kind, reason = reason.as_str(), stream = %origin.stream, seq = origin.seq,
                        delivered = origin.delivered, error = %error,
                        "message dead-lettered"
                    );
                    if let Err(e) = msg.ack_with(AckKind::Term).await {
                        tracing::warn!(consumer = %kind, error = %e, "term failed; the redelivery will be dead-lettered again and deduplicated");
                    }
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    self.shared.health.update(kind, |s| s.dead_letter_ok = false);
                    self.shared
                        .metrics
                        .dlq_publish_failures
                        .with_label_values(&[kind.as_str(), origin.stream, &b.durable])
                        .inc();
                    let delay = crate::config::retry_delay(
                        &self.shared.config.retry_backoff,
                        origin.delivered.max(attempt),
                    );
                    let last_delivery = b.server_max_deliver.is_some_and(|m| origin.delivered >= m);
                    tracing::error!(
                        consumer = %kind, reason = reason.as_str(), stream = %origin.stream, seq = origin.seq,
                        error = %e, holding = last_delivery,
                        "dead letter could not be stored; the original is kept for retry"
                    );
                    if !last_delivery {
                        nak(msg, delay).await;
                        return false;
                    }
                    // The server will not redeliver this message: hold it and retry here.
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!(consumer = %kind, error = %e, "progress ack failed");
                    }
                    let hold = delay
                        .min(b.consumer.cached_info().config.ack_wait / 3)
                        .max(Duration::from_millis(10));
                    if !sleep_or_cancel(hold, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

async fn nak(msg: &jetstream::Message, delay: Duration) {
    if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
    }
}

/// NAKs (without delay) messages that were delivered to us but not started, so a restart or
/// another instance gets them at once instead of after ack_wait.
async fn release_buffered(batch: &mut pull::Batch) {
    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "releasing a buffered message failed");
        }
    }
}

async fn release_stream_buffered(stream: &mut pull::Stream) {
    while let Some(Some(Ok(msg))) = stream.next().now_or_never() {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "releasing a buffered message failed");
        }
    }
}

/// Refreshes pending / ack-pending / redelivered from consumer info every
/// `CONSUMER_INFO_INTERVAL_MS`, for the gauges and `/health`.
async fn refresh_info(shared: Shared, cc: ConsumerConfig, b: Binding, stop: CancellationToken) {
    let labels = [cc.kind.as_str(), b.stream.as_str(), b.durable.as_str()];
    loop {
        match b.consumer.get_info().await {
            Ok(info) => {
                let m = &shared.metrics;
                m.consumer_pending
                    .with_label_values(&labels)
                    .set(info.num_pending as i64);
                m.consumer_ack_pending
                    .with_label_values(&labels)
                    .set(info.num_ack_pending as i64);
                m.consumer_redelivered
                    .with_label_values(&labels)
                    .set(info.num_redelivered as i64);
                shared.health.update(cc.kind, |s| {
                    s.pending = info.num_pending;
                    s.ack_pending = info.num_ack_pending as u64;
                    s.redelivered = info.num_redelivered as u64;
                });
            }
            Err(e) => tracing::debug!(consumer = %cc.kind, error = %e, "consumer info unavailable"),
        }
        if !sleep_or_cancel(shared.config.consumer_info_interval, &stop).await {
            return;
        }
    }
}
