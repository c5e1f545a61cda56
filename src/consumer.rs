//! The pull loop: bind, fetch, hand what arrived to the batch pipeline ([`batch`]), which
//! settles each message as [`outcome::decide`] says; never die on a pull error.
//!
//! Only intake listens to the shutdown token: a batch being processed is finished and settled;
//! messages already delivered but not yet started are NAKed so another instance takes them now.

mod batch;
mod delivery;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConsumerConfig, PullMode};
use crate::dlq::{self, Origin, Reason};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::topology::{self, Binding};
use delivery::{progress_all, Delivery, Ledger};

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

/// The intake side of one binding's loop: the batches being processed, and what was received
/// but could not start yet because the pipeline is full.
struct Flight {
    worker: Arc<Worker>,
    binding: Arc<Binding>,
    batches: batch::InFlight,
    ledger: Ledger,
    waiting: Waiting,
    batch_size: usize,
    /// The process's shutdown token, for the batches: a draining binding's loop being stopped
    /// must not look like a shutdown to a batch holding a last delivery.
    root: CancellationToken,
}

/// Sub-batches received and not started yet, each with the database short-circuit of the pull
/// it came from. They are ours as much as a running batch's messages are: they get progress
/// acks while they wait and are released if the loop stops, so the pull they came from can be
/// read to its end (async-nats drops what a pull has buffered when its own timer ends it).
struct Waiting {
    subs: VecDeque<(Vec<Delivery>, Arc<AtomicBool>)>,
    every: Duration,
    next_progress: tokio::time::Instant,
}

impl Flight {
    fn new(worker: &Worker, b: &Binding, root: &CancellationToken) -> Flight {
        let ack_wait = b.consumer.cached_info().config.ack_wait;
        Flight {
            worker: Arc::new(worker.clone()),
            binding: Arc::new(b.clone()),
            batches: batch::InFlight::new(worker.cc.pipeline_depth),
            ledger: Ledger {
                kind: worker.cc.kind,
                stream: b.stream.as_str().into(),
                unsettled: worker.shared.metrics.released_unsettled.with_label_values(&[
                    worker.cc.kind.as_str(),
                    &b.stream,
                    &b.durable,
                ]),
                health: worker.shared.health.clone(),
                server_max_deliver: b.server_max_deliver,
            },
            waiting: Waiting {
                subs: VecDeque::new(),
                every: batch::progress_every(ack_wait),
                next_progress: tokio::time::Instant::now(),
            },
            batch_size: worker.cc.batch_size,
            root: root.clone(),
        }
    }

    /// Takes a received sub-batch: it starts at once when the pipeline has room, else waits
    /// (joined to the previous waiting one from the same pull while that stays within a batch).
    fn hold(&mut self, msgs: Vec<Delivery>, db_down: &Arc<AtomicBool>) {
        if msgs.is_empty() {
            return;
        }
        let w = &mut self.waiting;
        if w.subs.is_empty() {
            w.next_progress = tokio::time::Instant::now() + w.every;
        }
        match w.subs.back_mut() {
            Some((last, flag))
                if Arc::ptr_eq(flag, db_down) && last.len() + msgs.len() <= self.batch_size =>
            {
                last.extend(msgs)
            }
            _ => w.subs.push_back((msgs, db_down.clone())),
        }
        self.start_waiting();
    }

    /// Takes what a pull or stream that has ended (or failed) still buffers, to be processed
    /// like the rest: releasing it would cost each message a delivery it never had.
    fn take_buffered<S, E>(&mut self, source: &mut S, db_down: &Arc<AtomicBool>)
    where
        S: futures::Stream<Item = Result<jetstream::Message, E>> + Unpin,
    {
        let msgs = drain_ready(source, &self.ledger);
        self.hold(msgs, db_down);
    }

    /// Starts waiting sub-batches, each on its own task, while the pipeline has room.
    fn start_waiting(&mut self) {
        while self.batches.free() > 0 {
            let Some((msgs, db_down)) = self.waiting.subs.pop_front() else {
                break;
            };
            self.spawn(msgs, db_down);
        }
    }

    fn spawn(&mut self, msgs: Vec<Delivery>, db_down: Arc<AtomicBool>) {
        self.batches.spawn(self.worker.clone().run_batch(
            msgs,
            self.binding.clone(),
            db_down,
            self.root.clone(),
        ));
    }

    fn has_waiting(&self) -> bool {
        !self.waiting.subs.is_empty()
    }

    fn waiting_len(&self) -> usize {
        self.waiting.subs.iter().map(|(m, _)| m.len()).sum()
    }

    fn full(&self) -> bool {
        self.batches.free() == 0
    }

    async fn progress_waiting(&mut self) {
        progress_all(self.waiting.subs.iter().flat_map(|(m, _)| m.iter())).await;
        self.waiting.next_progress = tokio::time::Instant::now() + self.waiting.every;
    }

    /// Waits for `work` while keeping the flight going: batches that finish make room for
    /// waiting ones, and waiting messages get their progress acks. `None` when `token` is
    /// cancelled first.
    async fn serve<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        token: &CancellationToken,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            self.start_waiting();
            let due = self.waiting.next_progress;
            tokio::select! {
                biased;
                _ = token.cancelled() => return None,
                r = &mut work => return Some(r),
                _ = self.batches.next(), if self.full() => {}
                _ = tokio::time::sleep_until(due), if self.has_waiting() => self.progress_waiting().await,
            }
        }
    }

    /// When the loop stops (shutdown, binding lost): what never started is released at once
    /// (NAK without delay), so another instance or a restart takes it instead of waiting for
    /// ack_wait — except a last delivery (finite server-side `max_deliver`), which a NAK would
    /// lose: that one is processed now, whatever the pipeline depth.
    async fn release_waiting(&mut self) {
        let subs: Vec<_> = self.waiting.subs.drain(..).collect();
        for (msgs, db_down) in subs {
            self.release(msgs, db_down).await;
        }
    }

    /// [`Flight::release_waiting`] for what a pull or stream still buffers when the loop stops.
    async fn release_source<S, E>(&mut self, source: &mut S)
    where
        S: futures::Stream<Item = Result<jetstream::Message, E>> + Unpin,
    {
        let msgs = drain_ready(source, &self.ledger);
        self.release(msgs, Arc::new(AtomicBool::new(false))).await;
    }

    async fn release(&mut self, msgs: Vec<Delivery>, db_down: Arc<AtomicBool>) {
        let (last, others): (Vec<Delivery>, Vec<Delivery>) =
            msgs.into_iter().partition(Delivery::is_last_delivery);
        for d in &others {
            d.nak(None).await;
        }
        if !last.is_empty() {
            self.spawn(last, db_down);
        }
    }
}

/// What a pull or stream has already buffered (never waits), each message wrapped at once.
/// Error items (a status the library reports) are skipped, a bounded number of times.
fn drain_ready<S, E>(source: &mut S, ledger: &Ledger) -> Vec<Delivery>
where
    S: futures::Stream<Item = Result<jetstream::Message, E>> + Unpin,
{
    let mut out = Vec::new();
    let mut errors = 0;
    while let Some(Some(item)) = source.next().now_or_never() {
        match item {
            Ok(msg) => out.push(ledger.receive(msg)),
            Err(_) => {
                errors += 1;
                if errors > 16 {
                    break;
                }
            }
        }
    }
    out
}

/// One pull request being read.
struct Pull {
    batch: pull::Batch,
    /// The server ends the request at `expires`; a request lost in a reconnect is abandoned
    /// shortly after, instead of at the library's expires + 5 s, so the watchdog never mistakes
    /// a reconnect for a wedged loop.
    deadline: tokio::time::Instant,
    received: usize,
    /// Set when a batch of this pull found the database unreachable: the rest of the pull is
    /// NAKed at once instead of each waiting for a pool timeout.
    db_down: Arc<AtomicBool>,
}

impl Pull {
    fn new(batch: pull::Batch, expires: Duration) -> Pull {
        Pull {
            batch,
            deadline: tokio::time::Instant::now() + expires + Duration::from_millis(500),
            received: 0,
            db_down: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What reading a pull gave.
#[allow(clippy::large_enum_variant)] // one per wake-up, never stored
enum Next {
    Message(jetstream::Message),
    Error(async_nats::Error),
    End,
    Expired,
}

async fn next_of(pull: &mut Option<Pull>) -> Next {
    let Some(p) = pull else {
        return std::future::pending().await;
    };
    match tokio::time::timeout_at(p.deadline, p.batch.next()).await {
        Ok(Some(Ok(m))) => Next::Message(m),
        Ok(Some(Err(e))) => Next::Error(e),
        Ok(None) => Next::End,
        Err(_) => Next::Expired,
    }
}

/// What woke the intake loop.
enum Wake<N> {
    Shutdown,
    BatchDone,
    Progress,
    Next(N),
}

/// A binding with its running loop's task and stop token.
struct Running {
    binding: Binding,
    task: tokio::task::Id,
    token: CancellationToken,
    /// Consecutive rebind ticks a draining durable was seen with nothing pending or unacked.
    drained_ticks: u32,
}

/// The consume loops of one consumer's bindings (the active one and those being drained),
/// each on its own task, so that the binding checks between them (NATS requests that can take
/// seconds while the server is unreachable) never hold up reading a pull.
type Loops = JoinSet<LoopEnd>;

/// Why a consume loop returned.
enum LoopEnd {
    Shutdown,
    /// The durable or its stream is gone: bind again.
    Lost,
}

/// Which binding loop ended; a panic in it (a bug, never a message's fault) ends the consumer.
fn reraise(r: Result<(tokio::task::Id, LoopEnd), tokio::task::JoinError>) -> tokio::task::Id {
    match r {
        Ok((id, _)) => id,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => e.id(),
    }
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
        let mut loops = Loops::new();
        let mut active: Option<Running> = None;
        let mut draining: Vec<Running> = Vec::new();
        let mut backoff = Duration::from_millis(250);
        loop {
            if active.is_none() && !shutdown.is_cancelled() {
                match topology::bind(&self.shared.js, &self.shared.config, &self.cc).await {
                    Ok(b) => {
                        backoff = Duration::from_millis(250);
                        let previous = draining
                            .iter()
                            .position(|r| r.binding.stream == b.stream && !r.token.is_cancelled());
                        match previous {
                            // Bound again where we were draining: that loop becomes the active one.
                            Some(i) => active = Some(draining.remove(i)),
                            None => {
                                self.on_bound(&b, None);
                                active = Some(self.spawn_binding(&mut loops, b, &shutdown));
                            }
                        }
                        if let Some(a) = &active {
                            self.adopt_stranded(a, &mut draining, &mut loops, &shutdown).await;
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
                    while let Some(r) = loops.join_next_with_id().await {
                        reraise(r);
                    }
                    tracing::info!(consumer = %kind, "consumer stopped");
                    return;
                }
                Some(r) = loops.join_next_with_id(), if !loops.is_empty() => {
                    let id = reraise(r);
                    if let Some(a) = active.as_ref().filter(|a| a.task == id) {
                        // The active loop ends by itself only when its binding is gone.
                        tracing::warn!(consumer = %kind, stream = %a.binding.stream, "binding lost; binding again");
                        active = None;
                        self.shared.health.update(kind, |s| s.stream = None);
                    } else if let Some(i) = draining.iter().position(|r| r.task == id) {
                        let r = draining.remove(i);
                        tracing::info!(consumer = %kind, stream = %r.binding.stream, "finished draining the previous durable");
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if let Some(current) = active.take() {
                        let current = self.rebalance(current, &mut draining, &mut loops, &shutdown).await;
                        self.adopt_stranded(&current, &mut draining, &mut loops, &shutdown).await;
                        active = Some(current);
                    }
                    self.stop_drained(&mut draining).await;
                }
            }
        }
    }

    /// Starts a binding's loop on its own task; its intake stops with the returned token,
    /// its batches only with the process (`shutdown`).
    fn spawn_binding(&self, loops: &mut Loops, binding: Binding, shutdown: &CancellationToken) -> Running {
        let worker = self.clone();
        let token = shutdown.child_token();
        let (b, intake, root) = (binding.clone(), token.clone(), shutdown.clone());
        let task = loops
            .spawn(async move { worker.run_binding(b, intake, root).await })
            .id();
        Running {
            binding,
            task,
            token,
            drained_ticks: 0,
        }
    }

    /// Consumes one binding until it ends; keeps its gauges and info refresher for that time.
    async fn run_binding(
        &self,
        binding: Binding,
        token: CancellationToken,
        root: CancellationToken,
    ) -> LoopEnd {
        let kind = self.cc.kind;
        let info_stop = token.child_token();
        let refresher = tokio::spawn(refresh_info(
            self.shared.clone(),
            self.cc.clone(),
            binding.clone(),
            info_stop.clone(),
        ));
        let end = self.consume(&binding, &token, &root).await;
        info_stop.cancel();
        let _ = refresher.await;
        self.shared
            .metrics
            .consumer_bound
            .with_label_values(&[kind.as_str(), &binding.stream, &binding.durable])
            .set(0);
        end
    }

    /// Multi mode: if the stream that captures the filter subject is no longer the active one,
    /// make it active and keep the old binding running as a draining one.
    async fn rebalance(
        &self,
        current: Running,
        draining: &mut Vec<Running>,
        loops: &mut Loops,
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
        let reusable = draining
            .iter()
            .position(|r| r.binding.stream == target && !r.token.is_cancelled());
        let next = if let Some(i) = reusable {
            draining.remove(i)
        } else {
            match topology::bind_on(&self.shared.js, &self.shared.config, &self.cc, &target).await {
                Ok(Some(mut b)) => {
                    b.fallback = b.stream != primary;
                    self.spawn_binding(loops, b, shutdown)
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

    /// Starts draining this consumer's durable on any other stream it may have lived on
    /// (primary or legacy, whatever the mode) that still has pending or unacked messages: a
    /// backlog left behind when the subjects moved while no daemon was watching (a deploy or a
    /// rollback during the migration) would otherwise never be delivered. Checked after every
    /// bind and on every rebind tick; the loop stops when the durable is drained
    /// ([`Worker::stop_drained`]).
    async fn adopt_stranded(
        &self,
        active: &Running,
        draining: &mut Vec<Running>,
        loops: &mut Loops,
        shutdown: &CancellationToken,
    ) {
        let streams = &self.shared.config.streams;
        let primary = streams.primary(self.cc.primary).to_string();
        for name in [primary.clone(), streams.legacy.clone()] {
            if name == active.binding.stream
                || draining
                    .iter()
                    .any(|r| r.binding.stream == name && !r.token.is_cancelled())
            {
                continue;
            }
            let b = match topology::existing_durable(&self.shared.js, &self.cc, &name).await {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(consumer = %self.cc.kind, stream = %name, error = %e, "cannot look for a stranded durable");
                    continue;
                }
            };
            let info = b.consumer.cached_info();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                continue;
            }
            tracing::info!(
                consumer = %self.cc.kind, stream = %name, durable = %b.durable,
                pending = info.num_pending, ack_pending = info.num_ack_pending,
                "the durable on a stream the subjects left still has messages; draining it"
            );
            let m = &self.shared.metrics;
            m.consumer_bound
                .with_label_values(&[self.cc.kind.as_str(), &name, &b.durable])
                .set(1);
            m.touch_binding(self.cc.kind, &self.cc.filter_subject, &name, &b.durable);
            let mut b = b;
            b.fallback = name != primary;
            draining.push(self.spawn_binding(loops, b, shutdown));
        }
        self.report_bindings(Some(active), draining);
    }

    /// Stops draining loops whose durable has nothing pending or unacked.
    /// A durable seen drained on this many consecutive rebind ticks is done: one empty look is
    /// not enough while publishes may still reach its stream (a weighted shift sends a subject
    /// to both streams).
    const DRAINED_TICKS: u32 = 3;

    async fn stop_drained(&self, draining: &mut [Running]) {
        for r in draining {
            if r.token.is_cancelled() {
                continue;
            }
            match r.binding.consumer.get_info().await {
                Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {
                    r.drained_ticks += 1;
                    if r.drained_ticks >= Self::DRAINED_TICKS {
                        r.token.cancel();
                    }
                }
                Ok(_) => r.drained_ticks = 0,
                Err(_) => {}
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

    async fn consume(&self, b: &Binding, intake: &CancellationToken, root: &CancellationToken) -> LoopEnd {
        let mut flight = Flight::new(self, b, root);
        let end = match self.cc.pull_mode {
            PullMode::Fetch => self.consume_fetch(b, intake, &mut flight).await,
            PullMode::Stream => self.consume_stream(b, intake, &mut flight).await,
        };
        // Whatever ended the loop: what never started is released at once, and the batches
        // already started have their rows committed or being committed: let them settle.
        flight.release_waiting().await;
        flight.batches.drain().await;
        end
    }

    fn connected(&self) -> bool {
        self.shared.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Batch requests bounded by `expires`. A pull is read to its end without pause: what has
    /// arrived is processed in sub-batches (see [`batch::gather`]), so a partial batch never
    /// waits for the rest or for `expires`, and when the pipeline is full the sub-batches wait
    /// in [`Flight`] (with progress acks) while the pull is still read. A new pull is issued
    /// only when nothing waits and the pipeline has room, and never while NATS is disconnected
    /// (the client would buffer the request and send it on reconnect, when no one may be
    /// reading its inbox). When a pull came back full (a backlog) and nothing waits, the next
    /// one is issued at once, so the server delivers it while we write; this is done only
    /// while two batches fit in the durable's `max_ack_pending`.
    async fn consume_fetch(&self, b: &Binding, shutdown: &CancellationToken, flight: &mut Flight) -> LoopEnd {
        let mut consecutive_errors: u32 = 0;
        let mut current: Option<Pull> = None;
        let mut prefetched: Option<Pull> = None;
        let max_ack_pending = b.consumer.cached_info().config.max_ack_pending;
        let overlap = max_ack_pending <= 0
            || i64::try_from(self.cc.batch_size.saturating_mul(2)).is_ok_and(|two| two <= max_ack_pending);
        loop {
            flight.start_waiting();
            if current.is_none() {
                current = prefetched.take();
            }
            if current.is_none() && !flight.has_waiting() && !flight.full() {
                if !self.connected() {
                    if flight
                        .serve(tokio::time::sleep(Duration::from_millis(100)), shutdown)
                        .await
                        .is_none()
                    {
                        return LoopEnd::Shutdown;
                    }
                    self.progress(false, false);
                    continue;
                }
                let pulled = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return LoopEnd::Shutdown,
                    r = self.pull(b) => r,
                };
                match pulled {
                    Ok(batch) => current = Some(Pull::new(batch, self.cc.expires)),
                    Err(e) => {
                        self.count_pull_error(b, &e);
                        self.progress(true, false);
                        if let Some(end) = self
                            .after_error(b, &mut consecutive_errors, shutdown, flight)
                            .await
                        {
                            return end;
                        }
                        continue;
                    }
                }
            }
            let due = flight.waiting.next_progress;
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = flight.batches.next(), if flight.full() => Wake::BatchDone,
                _ = tokio::time::sleep_until(due), if flight.has_waiting() => Wake::Progress,
                n = next_of(&mut current), if current.is_some() => Wake::Next(n),
                // A full pipeline of slow but working batches is not a stalled loop (a wedged
                // batch is the stuck check's business).
                _ = tokio::time::sleep(self.cc.expires), if flight.full() => Wake::BatchDone,
            };
            let next = match wake {
                Wake::Shutdown => {
                    for mut p in [current.take(), prefetched.take()].into_iter().flatten() {
                        flight.release_source(&mut p.batch).await;
                    }
                    return LoopEnd::Shutdown;
                }
                Wake::BatchDone => {
                    self.progress(false, false);
                    continue;
                }
                Wake::Progress => {
                    flight.progress_waiting().await;
                    self.progress(false, false);
                    continue;
                }
                Wake::Next(n) => n,
            };
            let Some(p) = current.as_mut() else {
                continue;
            };
            // Some(failed) once the pull has ended.
            let ended = match next {
                Next::Message(first) => {
                    let mut msgs = vec![flight.ledger.receive(first)];
                    let room = self.cc.batch_size.saturating_sub(p.received).max(1);
                    let gathered = batch::gather(&mut p.batch, &mut msgs, room, &flight.ledger).await;
                    p.received += msgs.len();
                    let full = p.received >= self.cc.batch_size;
                    flight.hold(msgs, &p.db_down);
                    self.progress(false, true);
                    if overlap
                        && full
                        && prefetched.is_none()
                        && !flight.has_waiting()
                        && self.connected()
                        && !shutdown.is_cancelled()
                    {
                        match self.pull(b).await {
                            Ok(batch) => prefetched = Some(Pull::new(batch, self.cc.expires)),
                            Err(e) => self.count_pull_error(b, &e),
                        }
                    }
                    match gathered {
                        batch::Gathered::Open => None,
                        batch::Gathered::Ended => Some(false),
                        batch::Gathered::Failed(e) => {
                            self.count_pull_error(b, &e);
                            Some(true)
                        }
                    }
                }
                Next::End => Some(false),
                Next::Error(e) => {
                    self.count_pull_error(b, &e);
                    Some(true)
                }
                Next::Expired => {
                    tracing::debug!(consumer = %self.cc.kind, "pull request outlived its expiry; issuing a fresh one");
                    Some(false)
                }
            };
            let Some(failed) = ended else {
                continue;
            };
            let Some(mut p) = current.take() else {
                continue;
            };
            // Anything the pull still buffers (it ended on our deadline or an error) is ours.
            flight.take_buffered(&mut p.batch, &p.db_down);
            self.progress(true, false);
            self.shared
                .metrics
                .batch_size
                .with_label_values(&[self.cc.kind.as_str()])
                .observe(p.received as f64);
            if failed {
                // A prefetched pull is kept: it is read next, and ends by itself if the
                // connection it was made on is gone.
                if let Some(end) = self
                    .after_error(b, &mut consecutive_errors, shutdown, flight)
                    .await
                {
                    if let Some(mut next) = prefetched.take() {
                        flight.release_source(&mut next.batch).await;
                    }
                    return end;
                }
                continue;
            }
            consecutive_errors = 0;
            let idle = p.received == 0 && prefetched.is_none() && !flight.has_waiting();
            if idle
                && flight
                    .serve(tokio::time::sleep(self.cc.idle_backoff), shutdown)
                    .await
                    .is_none()
            {
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
    /// When the pipeline is full what arrives waits in [`Flight`] with progress acks, up to
    /// `*_PIPELINE_DEPTH` batches' worth; past that the stream is not read until there is
    /// room. Whatever ends a stream, what it still buffers is processed (or, at shutdown,
    /// released) before it is dropped.
    async fn consume_stream(
        &self,
        b: &Binding,
        shutdown: &CancellationToken,
        flight: &mut Flight,
    ) -> LoopEnd {
        let mut consecutive_errors: u32 = 0;
        loop {
            let heartbeat = (self.cc.expires / 2).max(Duration::from_millis(50));
            let opened = b
                .consumer
                .stream()
                .max_messages_per_batch(self.cc.batch_size)
                .expires(self.cc.expires)
                .heartbeat(heartbeat)
                .messages();
            let stream = match flight.serve(opened, shutdown).await {
                None => return LoopEnd::Shutdown,
                Some(r) => r,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    self.count_pull_error(b, &e);
                    if let Some(end) = self
                        .after_error(b, &mut consecutive_errors, shutdown, flight)
                        .await
                    {
                        return end;
                    }
                    continue;
                }
            };
            let db_down = Arc::new(AtomicBool::new(false));
            let failed = self
                .read_stream(
                    b,
                    &mut stream,
                    &db_down,
                    shutdown,
                    flight,
                    &mut consecutive_errors,
                )
                .await;
            match failed {
                StreamEnd::Shutdown => {
                    flight.release_source(&mut stream).await;
                    return LoopEnd::Shutdown;
                }
                StreamEnd::Ended => flight.take_buffered(&mut stream, &db_down),
                StreamEnd::Failed(e) => {
                    flight.take_buffered(&mut stream, &db_down);
                    drop(stream);
                    self.count_pull_error(b, &e);
                    if let Some(end) = self
                        .after_error(b, &mut consecutive_errors, shutdown, flight)
                        .await
                    {
                        return end;
                    }
                }
            }
        }
    }

    /// Reads one `messages()` stream until it ends, fails (other than a missed heartbeat,
    /// which is counted and read past) or shutdown.
    async fn read_stream(
        &self,
        b: &Binding,
        stream: &mut pull::Stream,
        db_down: &Arc<AtomicBool>,
        shutdown: &CancellationToken,
        flight: &mut Flight,
        consecutive_errors: &mut u32,
    ) -> StreamEnd {
        use jetstream::consumer::pull::MessagesErrorKind as K;
        let mut last_db_reset = Instant::now();
        let backlog = self.cc.batch_size.saturating_mul(self.cc.pipeline_depth.max(1));
        loop {
            flight.start_waiting();
            let due = flight.waiting.next_progress;
            let read = flight.waiting_len() < backlog;
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = flight.batches.next(), if flight.full() => Wake::BatchDone,
                _ = tokio::time::sleep_until(due), if flight.has_waiting() => Wake::Progress,
                n = tokio::time::timeout(self.cc.expires, stream.next()), if read => Wake::Next(n),
                _ = tokio::time::sleep(self.cc.expires), if flight.full() => Wake::BatchDone,
            };
            // The "batch" of stream mode is one expiry period: the database short-circuit is
            // reset after it, so the database is tried again.
            if last_db_reset.elapsed() >= self.cc.expires {
                db_down.store(false, Ordering::Relaxed);
                last_db_reset = Instant::now();
            }
            let next = match wake {
                Wake::Shutdown => return StreamEnd::Shutdown,
                Wake::BatchDone => {
                    self.progress(false, false);
                    continue;
                }
                Wake::Progress => {
                    flight.progress_waiting().await;
                    self.progress(false, false);
                    continue;
                }
                Wake::Next(n) => n,
            };
            match next {
                Err(_idle) => self.progress(true, false),
                Ok(None) => return StreamEnd::Ended,
                Ok(Some(Ok(msg))) => {
                    *consecutive_errors = 0;
                    let mut msgs = vec![flight.ledger.receive(msg)];
                    let gathered = batch::gather(stream, &mut msgs, self.cc.batch_size, &flight.ledger).await;
                    // In stream mode a "pull" is what arrived together.
                    self.shared
                        .metrics
                        .batch_size
                        .with_label_values(&[self.cc.kind.as_str()])
                        .observe(msgs.len() as f64);
                    flight.hold(msgs, db_down);
                    self.progress(true, true);
                    match gathered {
                        batch::Gathered::Open => {}
                        batch::Gathered::Ended => return StreamEnd::Ended,
                        batch::Gathered::Failed(e) if e.kind() == K::MissingHeartbeat => {
                            self.count_pull_error(b, &e)
                        }
                        batch::Gathered::Failed(e) => return StreamEnd::Failed(e),
                    }
                }
                Ok(Some(Err(e))) if e.kind() == K::MissingHeartbeat => {
                    self.count_pull_error(b, &e);
                    self.progress(true, false);
                }
                Ok(Some(Err(e))) => {
                    self.progress(true, false);
                    return StreamEnd::Failed(e);
                }
            }
        }
    }

    /// After a pull error: find out whether the binding is gone, then back off — keeping the
    /// flight going meanwhile (the check is a NATS request that can take seconds while the
    /// server is unreachable).
    async fn after_error(
        &self,
        b: &Binding,
        consecutive: &mut u32,
        shutdown: &CancellationToken,
        flight: &mut Flight,
    ) -> Option<LoopEnd> {
        *consecutive += 1;
        match flight.serve(topology::binding_gone(b), shutdown).await {
            None => return Some(LoopEnd::Shutdown),
            Some(true) => return Some(LoopEnd::Lost),
            Some(false) => {}
        }
        let delay = Duration::from_millis(100 * u64::from((*consecutive).min(50)));
        if flight.serve(tokio::time::sleep(delay), shutdown).await.is_none() {
            return Some(LoopEnd::Shutdown);
        }
        None
    }

    /// Publishes the dead letter and TERMs the original once JetStream has stored it. When the
    /// dead letter cannot be stored the original is NAKed (never acked or terminated); on a
    /// durable with a finite server-side limit, the last delivery is held with progress acks
    /// while the dead letter is retried — through a shutdown too, until shortly before its
    /// deadline, when it is given up with an ERROR naming its stream and sequence (the server
    /// will not redeliver it) and counted in `normalize_held_messages_abandoned_total`.
    /// Returns true when the dead letter was stored.
    async fn dead_letter(
        &self,
        d: &Delivery,
        origin: &Origin<'_>,
        letter: Letter<'_>,
        b: &Binding,
        shutdown: &CancellationToken,
    ) -> bool {
        let Letter {
            reason,
            error,
            terminate,
        } = letter;
        let kind = self.cc.kind;
        let mut attempt: i64 = 0;
        let mut give_up_at: Option<Instant> = None;
        loop {
            match dlq::publish(
                &self.shared.js,
                &self.cc.dlq_prefix,
                &d.msg.message,
                origin,
                reason,
                error,
            )
            .await
            {
                Ok(ack) => {
                    self.shared.health.update(kind, |s| s.dead_letter_ok = true);
                    tracing::debug!(
                        consumer = %kind, reason = reason.as_str(), stream = %origin.stream, seq = origin.seq,
                        dlq_seq = ack.sequence, delivered = origin.delivered, error = %error,
                        "message dead-lettered"
                    );
                    if terminate {
                        d.term().await;
                    } else {
                        d.ack().await;
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
                    if attempt == 1 {
                        tracing::warn!(
                            consumer = %kind, reason = reason.as_str(), stream = %origin.stream, seq = origin.seq,
                            error = %e, holding = last_delivery,
                            "dead letter could not be stored; the original is kept for retry"
                        );
                    }
                    if !last_delivery {
                        d.nak(Some(delay)).await;
                        return false;
                    }
                    // The server will not redeliver this message: hold it and retry here.
                    d.progress().await;
                    let hold = delay
                        .min(b.consumer.cached_info().config.ack_wait / 3)
                        .max(Duration::from_millis(10));
                    if !shutdown.is_cancelled() {
                        sleep_or_cancel(hold, shutdown).await;
                        continue;
                    }
                    // The process's deadline, not this message's: every held message gives up
                    // in time for the ERROR and the counter, before the process is stopped.
                    let until = *give_up_at.get_or_insert_with(|| {
                        self.shared
                            .health
                            .shutdown_deadline()
                            .unwrap_or_else(|| Instant::now() + self.shared.config.shutdown_timeout)
                            .checked_sub(Duration::from_millis(1500))
                            .unwrap_or_else(Instant::now)
                    });
                    let now = Instant::now();
                    if now >= until {
                        self.shared
                            .metrics
                            .held_abandoned
                            .with_label_values(&[kind.as_str(), origin.stream, &b.durable])
                            .inc();
                        tracing::error!(
                            consumer = %kind, stream = %origin.stream, seq = origin.seq, subject = %origin.subject,
                            durable = %b.durable, delivered = origin.delivered, reason = reason.as_str(),
                            "shutdown: giving up a held last delivery whose dead letter could not be stored; the server will not redeliver it: republish it from the stream at this sequence (docs/OPERATIONS.md)"
                        );
                        d.forget();
                        return false;
                    }
                    tokio::time::sleep(hold.min(until - now)).await;
                }
            }
        }
    }
}

/// A dead letter to store: why, the error text, and what then settles the original (TERM; or
/// ack, when the letter only reports what the stored message lacked).
pub(super) struct Letter<'a> {
    pub reason: Reason,
    pub error: &'a str,
    pub terminate: bool,
}

/// Why reading a `messages()` stream stopped.
enum StreamEnd {
    Shutdown,
    Ended,
    Failed(pull::MessagesError),
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
