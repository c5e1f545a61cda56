//! A consumer's supervisor: binds (retrying with backoff), runs each binding's loop on its own
//! task, binds again when a binding disappears, and in multi mode follows the subjects from
//! stream to stream, draining the durables left behind.
//!
//! The binding rule in multi mode: the active binding is on the first candidate stream (primary,
//! then legacy) that receives the filter subject ([`topology::stream_receives`]). The durable on
//! the other candidate is consumed beside it for as long as its stream receives the filter
//! subject too — during a weighted subject-mapping shift, or after a rollback by mapping, a
//! publish may land in either stream at any moment — and, once it no longer does, until it has
//! had nothing pending or unacked on 3 consecutive rebind ticks.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::intake::LoopEnd;
use super::worker::{sleep_or_cancel, Shared, Worker};
use crate::config::ConsumerConfig;
use crate::topology::{self, Binding};

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

/// Which binding loop ended; a panic in it (a bug, never a message's fault) ends the consumer.
fn reraise(r: Result<(tokio::task::Id, LoopEnd), tokio::task::JoinError>) -> tokio::task::Id {
    match r {
        Ok((id, _)) => id,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => e.id(),
    }
}

/// The wait before the next bind attempt after `previous`: doubling, at most 15 s.
fn next_bind_backoff(previous: Duration) -> Duration {
    (previous * 2).min(Duration::from_secs(15))
}

impl Worker {
    /// Runs until `shutdown` is cancelled: binds (retrying with backoff while nothing can be
    /// bound), consumes, binds again if the binding disappears, and — in multi mode — moves to
    /// whichever of primary and legacy stream captures the filter subject, consuming the old
    /// durable while its stream still receives the subject and then until it has nothing
    /// pending or unacked. No restart is needed at any migration step.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::error_span!("consumer", consumer = %self.cc.kind);
        self.supervise(shutdown).instrument(span).await
    }

    async fn supervise(self, shutdown: CancellationToken) {
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
                // Every NATS request of the supervisor races the shutdown: while the client
                // reconnects a request waits its whole timeout, which must not delay the exit.
                let bound = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => continue,
                    r = topology::bind(&self.shared.js, &self.shared.config, &self.cc) => r,
                };
                match bound {
                    Ok(b) => {
                        backoff = Duration::from_millis(250);
                        let previous = draining
                            .iter()
                            .position(|r| r.binding.stream == b.stream && !r.token.is_cancelled());
                        self.on_bound(&b, None);
                        active = Some(match previous {
                            // Bound again where we were draining (a rollback soon after a
                            // cut-over): that loop becomes the active one.
                            Some(i) => draining.remove(i),
                            None => self.spawn_binding(&mut loops, b, &shutdown),
                        });
                        if let Some(a) = &active {
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => {}
                                _ = self.adopt_stranded(a, &mut draining, &mut loops, &shutdown) => {}
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(event = "consumer_unbound", error = %e, retry_in_ms = backoff.as_millis() as u64, "consumer not bound; retrying");
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
                backoff = next_bind_backoff(backoff);
                w
            };
            tokio::select! {
                _ = shutdown.cancelled() => {
                    while let Some(r) = loops.join_next_with_id().await {
                        reraise(r);
                    }
                    tracing::info!("consumer stopped");
                    return;
                }
                Some(r) = loops.join_next_with_id(), if !loops.is_empty() => {
                    let id = reraise(r);
                    if let Some(a) = active.as_ref().filter(|a| a.task == id) {
                        // The active loop ends by itself only when its binding is gone, or
                        // when the shutdown reached it first (the next pass stops this loop).
                        if !shutdown.is_cancelled() {
                            tracing::warn!(event = "consumer_binding_lost", stream = %a.binding.stream, "binding lost; binding again");
                        }
                        active = None;
                        self.shared.health.update(kind, |s| s.stream = None);
                    } else if let Some(i) = draining.iter().position(|r| r.task == id) {
                        let r = draining.remove(i);
                        tracing::info!(event = "consumer_drained", stream = %r.binding.stream, "finished draining the previous durable");
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    // Cut short by a shutdown, the tick leaves `active` empty: every loop stops
                    // with the shutdown token anyway, and the next pass joins them.
                    let current = active.take();
                    active = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => None,
                        a = self.tick(current, &mut draining, &mut loops, &shutdown) => a,
                    };
                }
            }
        }
    }

    /// One rebind tick: follow the subject to the stream that captures it, adopt stranded
    /// durables, stop the drained ones.
    async fn tick(
        &self,
        active: Option<Running>,
        draining: &mut Vec<Running>,
        loops: &mut Loops,
        shutdown: &CancellationToken,
    ) -> Option<Running> {
        let active = match active {
            Some(current) => {
                let current = self.rebalance(current, draining, loops, shutdown).await;
                self.adopt_stranded(&current, draining, loops, shutdown).await;
                Some(current)
            }
            None => None,
        };
        self.stop_drained(draining).await;
        active
    }

    /// Starts a binding's loop on its own task; its intake stops with the returned token,
    /// its batches only with the process (`shutdown`).
    fn spawn_binding(&self, loops: &mut Loops, binding: Binding, shutdown: &CancellationToken) -> Running {
        let worker = self.clone();
        let token = shutdown.child_token();
        let (b, intake, root) = (binding.clone(), token.clone(), shutdown.clone());
        let span = tracing::error_span!("binding", stream = %binding.stream, durable = %binding.durable);
        let task = loops
            .spawn(async move { worker.run_binding(b, intake, root).await }.instrument(span))
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
        let refresher = tokio::spawn(
            refresh_info(
                self.shared.clone(),
                self.cc.clone(),
                binding.clone(),
                info_stop.clone(),
            )
            .in_current_span(),
        );
        let end = self.consume(&binding, &token, &root).await;
        info_stop.cancel();
        // Aborted, not awaited to its end: a consumer-info request in flight while NATS is away
        // waits its whole timeout, and the refresher only sets gauges.
        refresher.abort();
        if let Err(e) = refresher.await {
            if e.is_panic() {
                tracing::debug!(error = %e, "the info refresher ended abnormally");
            }
        }
        self.shared
            .metrics
            .consumer_bound
            .with_label_values(&[kind.as_str(), &binding.stream, &binding.durable])
            .set(0);
        self.shared
            .metrics
            .forget_binding(kind, &binding.stream, &binding.durable);
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
                    tracing::warn!(stream = %target, error = %e, "cannot bind the capturing stream yet");
                    return current;
                }
            }
        };
        tracing::info!(
            event = "consumer_rebound",
            from = %current.binding.stream, to = %next.binding.stream,
            "subjects moved: consuming the new stream and draining the old durable"
        );
        self.on_bound(&next.binding, Some(&current.binding.stream));
        draining.push(current);
        next
    }

    /// Starts consuming this consumer's durable on any other stream it may have lived on
    /// (primary or legacy, whatever the mode) that still has pending or unacked messages: a
    /// backlog left behind when the subjects moved while no daemon was watching (a deploy or a
    /// rollback during the migration) would otherwise never be delivered. The durable on the
    /// other candidate stream is also taken at once, pending or not, when that stream receives
    /// the filter subject: a subject mapping may send any publish there without a rebind tick
    /// noticing (see the module doc); when that stream has no durable, it is created there if
    /// provisioning allows ([`Worker::provision_receiving`]). Checked after every bind and on
    /// every rebind tick, with at most two requests per stream not consumed yet (and the
    /// creation); the loop stops when the durable is drained ([`Worker::stop_drained`]).
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
            let (b, created) = match topology::existing_durable(&self.shared.js, &self.cc, &name).await {
                Ok(Some(b)) => (b, false),
                Ok(None) => match self.provision_receiving(&name).await {
                    Some(b) => (b, true),
                    None => continue,
                },
                Err(e) => {
                    tracing::debug!(stream = %name, error = %e, "cannot look for a stranded durable");
                    continue;
                }
            };
            let info = b.consumer.cached_info();
            let (pending, ack_pending) = (info.num_pending, info.num_ack_pending);
            if created {
                tracing::info!(
                    stream = %name, durable = %b.durable,
                    "the stream receives the filter subject too (a subject mapping may send it there) and had no durable: created it, consuming it beside the active binding"
                );
            } else if pending > 0 || ack_pending > 0 {
                tracing::info!(
                    stream = %name, durable = %b.durable, pending, ack_pending,
                    "the durable on a stream the subjects left still has messages; draining it"
                );
            } else if self.receives(&name).await == Some(true) {
                tracing::info!(
                    stream = %name, durable = %b.durable,
                    "the durable's stream receives the filter subject too (a subject mapping may send it there); consuming it beside the active binding"
                );
            } else {
                continue;
            }
            let m = &self.shared.metrics;
            m.consumer_bound
                .with_label_values(&[self.cc.kind.as_str(), &name, &b.durable])
                .set(1);
            m.touch_binding(self.cc.kind, &self.cc.filter_subject, &name, &b.durable);
            if !created {
                // `bind_on` warned about a durable it bound.
                topology::warn_about_durable(&b, &self.cc);
            }
            let mut b = b;
            b.fallback = name != primary;
            draining.push(self.spawn_binding(loops, b, shutdown));
        }
        self.report_bindings(Some(active), draining);
    }

    /// The durable on `stream`, created there because that stream receives the filter subject
    /// too (during a mapping cut-over both streams do, and either may get any publish) and
    /// provisioning allows it (`TOPOLOGY_PROVISION=missing`; under `off` the operator's tooling
    /// creates it, `migrate shift` does). `None` when the stream does not receive the subject,
    /// provisioning is off, or the lookup failed (tried again next tick).
    async fn provision_receiving(&self, stream: &str) -> Option<Binding> {
        if self.shared.config.provision == crate::config::Provision::Off
            || self.receives(stream).await != Some(true)
        {
            return None;
        }
        match topology::bind_on(&self.shared.js, &self.shared.config, &self.cc, stream).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(stream, error = %e, "cannot create the durable on a stream that receives the filter subject");
                None
            }
        }
    }

    /// A durable seen drained on this many consecutive rebind ticks, its stream no longer
    /// receiving the filter subject, is done: one empty look is not enough right after the
    /// subjects left (publishes accepted just before may still be arriving).
    const DRAINED_TICKS: u32 = 3;

    /// Stops the loops of durables whose stream no longer receives the filter subject and that
    /// have had nothing pending or unacked for [`Self::DRAINED_TICKS`] ticks. One consumer info
    /// request per loop, and one stream info request when the durable looks drained.
    async fn stop_drained(&self, draining: &mut [Running]) {
        for r in draining {
            if r.token.is_cancelled() {
                continue;
            }
            match r.binding.consumer.get_info().await {
                Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {
                    match self.receives(&r.binding.stream).await {
                        // Publishes can still land there at any moment: keep consuming.
                        Some(true) => r.drained_ticks = 0,
                        Some(false) => {
                            r.drained_ticks += 1;
                            if r.drained_ticks >= Self::DRAINED_TICKS {
                                r.token.cancel();
                            }
                        }
                        None => {}
                    }
                }
                Ok(_) => r.drained_ticks = 0,
                Err(_) => {}
            }
        }
    }

    /// Whether `stream` is one of this consumer's candidate streams and receives its filter
    /// subject now; `None` when the server cannot tell. A stream that is not a candidate (the
    /// primary stream in single mode) is only ever drained, never followed.
    async fn receives(&self, stream: &str) -> Option<bool> {
        let config = &self.shared.config;
        if !topology::candidates(config, &self.cc).iter().any(|c| c == stream) {
            return Some(false);
        }
        topology::stream_receives_now(&self.shared.js, stream, &self.cc.filter_subject).await
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
            tracing::warn!(event = "consumer_bound", fallback = true, from = %primary, to = %b.stream, durable = %b.durable, "primary stream or durable absent; bound to the fallback stream");
        } else {
            tracing::info!(event = "consumer_bound", stream = %b.stream, durable = %b.durable, "consumer bound");
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
}

/// Refreshes pending / ack-pending / redelivered from consumer info every
/// `CONSUMER_INFO_INTERVAL_MS`, for the gauges and `/health`.
async fn refresh_info(shared: Shared, cc: ConsumerConfig, b: Binding, stop: CancellationToken) {
    let labels = [cc.kind.as_str(), b.stream.as_str(), b.durable.as_str()];
    // A handle without a request; the oldest pending message is read through it.
    let stream = shared.js.get_stream_no_info(&b.stream).await.ok();
    loop {
        match b.consumer.get_info().await {
            Ok(info) => {
                let m = &shared.metrics;
                if let Some(age) = oldest_pending_age(stream.as_ref(), &info).await {
                    m.consumer_oldest_pending_age.with_label_values(&labels).set(age);
                }
                m.consumer_pending
                    .with_label_values(&labels)
                    .set(info.num_pending as i64);
                m.consumer_ack_pending
                    .with_label_values(&labels)
                    .set(info.num_ack_pending as i64);
                m.consumer_redelivered
                    .with_label_values(&labels)
                    .set(info.num_redelivered as i64);
                m.consumer_max_ack_pending
                    .with_label_values(&labels)
                    .set(info.config.max_ack_pending);
                shared.health.update(cc.kind, |s| {
                    s.backlog.insert(
                        b.stream.clone(),
                        crate::health::Backlog {
                            pending: info.num_pending,
                            ack_pending: info.num_ack_pending as u64,
                            redelivered: info.num_redelivered as u64,
                        },
                    );
                });
            }
            Err(e) => tracing::debug!(error = %e, "consumer info unavailable"),
        }
        if !sleep_or_cancel(shared.config.consumer_info_interval, &stop).await {
            return;
        }
    }
}

/// Seconds since the oldest message the durable has not acknowledged was stored: the first
/// message of its filter after the ack floor. 0 with nothing pending; `None` when it cannot be
/// read now (the gauge keeps its value). One bounded request per info refresh.
async fn oldest_pending_age(
    stream: Option<&jetstream::stream::Stream<()>>,
    info: &jetstream::consumer::Info,
) -> Option<f64> {
    if info.num_pending == 0 && info.num_ack_pending == 0 {
        return Some(0.0);
    }
    let mut get = stream?
        .raw_message_builder()
        .sequence(info.ack_floor.stream_sequence + 1);
    // Without a filter, the oldest message of the stream after the floor: a close enough
    // (never younger) estimate.
    if !info.config.filter_subject.is_empty() {
        get = get.next_by_subject(info.config.filter_subject.clone());
    }
    let msg = tokio::time::timeout(Duration::from_secs(1), get.send())
        .await
        .ok()?
        .ok()?;
    let stored = msg.time.unix_timestamp_nanos() as f64 / 1e9;
    let now = chrono::Utc::now().timestamp_nanos_opt()? as f64 / 1e9;
    Some((now - stored).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_backoff_doubles_up_to_15_s() {
        let ms = Duration::from_millis;
        let mut wait = ms(250);
        let mut seen = Vec::new();
        for _ in 0..9 {
            seen.push(wait);
            wait = next_bind_backoff(wait);
        }
        let expected = [250, 500, 1000, 2000, 4000, 8000, 15000, 15000, 15000].map(ms);
        assert_eq!(seen, expected);
    }
}
