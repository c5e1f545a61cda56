//! Pipeline room: the batches between "received" and "settled" ([`InFlight`]), and what was
//! received but could not start yet because the pipeline is full ([`Flight`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::delivery::{Delivery, Ledger};
use super::settle::{self, AckTarget};

/// The batches between "received" and "settled", each processed and settled on its own task,
/// at most `depth` at once: batch N+1 is decoded and written while batch N's commit, PubAcks and
/// acks complete. Each batch acks only its own messages after its own commit, so overlapping
/// them changes nothing of the delivery guarantees; same-key writes in concurrent batches are
/// ordered by PostgreSQL's row locks and the upserts' `captured_at` condition.
pub(super) struct InFlight {
    /// Aborted when dropped: if the shutdown deadline abandons the loop, its batches stop too
    /// (their messages were not acked, so JetStream redelivers them).
    tasks: JoinSet<()>,
    depth: usize,
}

impl InFlight {
    pub fn new(depth: usize) -> InFlight {
        InFlight {
            tasks: JoinSet::new(),
            depth: depth.max(1),
        }
    }

    /// How many more batches may start now.
    pub fn free(&self) -> usize {
        self.depth.saturating_sub(self.tasks.len())
    }

    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Waits for every batch in flight to be settled.
    pub async fn drain(&mut self) {
        while !self.tasks.is_empty() {
            self.next().await;
        }
    }

    /// Waits for one batch to finish. A panic in a batch is a bug, never a message's fault:
    /// it is re-raised here, ending the consumer as it did before batches had their own tasks.
    pub async fn next(&mut self) {
        if let Some(Err(e)) = self.tasks.join_next().await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            tracing::debug!(error = %e, "a batch task was cancelled; its messages will be redelivered");
        }
    }
}

/// Makes one batch's task (processing and settling it), given its messages and the database
/// short-circuit of the pull they came from.
pub(super) type Start<M = jetstream::Message> =
    Box<dyn FnMut(Vec<Delivery<M>>, Arc<AtomicBool>) -> BoxFuture<'static, ()> + Send>;

/// The intake side of one binding's loop: the batches being processed, and what was received
/// but could not start yet because the pipeline is full.
pub(super) struct Flight<M: AckTarget = jetstream::Message> {
    start: Start<M>,
    pub batches: InFlight,
    pub ledger: Ledger,
    waiting: Waiting<M>,
    batch_size: usize,
}

/// Sub-batches received and not started yet, each with the database short-circuit of the pull
/// it came from. They are ours as much as a running batch's messages are: they get progress
/// acks while they wait and are released if the loop stops, so the pull they came from can be
/// read to its end (async-nats drops what a pull has buffered when its own timer ends it).
struct Waiting<M: AckTarget> {
    subs: VecDeque<(Vec<Delivery<M>>, Arc<AtomicBool>)>,
    every: Duration,
    next_progress: tokio::time::Instant,
}

impl<M: AckTarget> Flight<M> {
    /// `depth` batches at once of up to `batch_size` messages; waiting ones get a progress ack
    /// every `ack_wait` / 3.
    pub fn new(
        depth: usize,
        batch_size: usize,
        ack_wait: Duration,
        ledger: Ledger,
        start: Start<M>,
    ) -> Flight<M> {
        Flight {
            start,
            batches: InFlight::new(depth),
            ledger,
            waiting: Waiting {
                subs: VecDeque::new(),
                every: settle::progress_every(ack_wait),
                next_progress: tokio::time::Instant::now(),
            },
            batch_size,
        }
    }

    /// Takes a received sub-batch: it starts at once when the pipeline has room, else waits
    /// (joined to the previous waiting one from the same pull while that stays within a batch).
    pub fn hold(&mut self, msgs: Vec<Delivery<M>>, db_down: &Arc<AtomicBool>) {
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
    pub fn take_buffered<S, E>(&mut self, source: &mut S, db_down: &Arc<AtomicBool>)
    where
        S: Stream<Item = Result<M, E>> + Unpin,
    {
        let msgs = drain_ready(source, &self.ledger);
        self.hold(msgs, db_down);
    }

    /// Starts waiting sub-batches, each on its own task, while the pipeline has room.
    pub fn start_waiting(&mut self) {
        while self.batches.free() > 0 {
            let Some((msgs, db_down)) = self.waiting.subs.pop_front() else {
                break;
            };
            self.spawn(msgs, db_down);
        }
    }

    fn spawn(&mut self, msgs: Vec<Delivery<M>>, db_down: Arc<AtomicBool>) {
        let task = (self.start)(msgs, db_down);
        self.batches.spawn(task);
    }

    pub fn has_waiting(&self) -> bool {
        !self.waiting.subs.is_empty()
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.subs.iter().map(|(m, _)| m.len()).sum()
    }

    pub fn full(&self) -> bool {
        self.batches.free() == 0
    }

    /// When the waiting messages' next progress ack is due.
    pub fn next_progress(&self) -> tokio::time::Instant {
        self.waiting.next_progress
    }

    pub async fn progress_waiting(&mut self) {
        settle::progress_all(self.waiting.subs.iter().flat_map(|(m, _)| m.iter())).await;
        self.waiting.next_progress = tokio::time::Instant::now() + self.waiting.every;
    }

    /// Waits for `work` while keeping the flight going: batches that finish make room for
    /// waiting ones, and waiting messages get their progress acks. `None` when `token` is
    /// cancelled first.
    pub async fn serve<T>(&mut self, work: impl Future<Output = T>, token: &CancellationToken) -> Option<T> {
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
    /// ([`settle::release`]) — except a last delivery, which is processed now, whatever the
    /// pipeline depth.
    pub async fn release_waiting(&mut self) {
        let subs: Vec<_> = self.waiting.subs.drain(..).collect();
        for (msgs, db_down) in subs {
            self.release(msgs, db_down).await;
        }
    }

    /// [`Flight::release_waiting`] for what a pull or stream still buffers when the loop stops.
    pub async fn release_source<S, E>(&mut self, source: &mut S)
    where
        S: Stream<Item = Result<M, E>> + Unpin,
    {
        let msgs = drain_ready(source, &self.ledger);
        self.release(msgs, Arc::new(AtomicBool::new(false))).await;
    }

    async fn release(&mut self, msgs: Vec<Delivery<M>>, db_down: Arc<AtomicBool>) {
        let last = settle::release(msgs).await;
        if !last.is_empty() {
            self.spawn(last, db_down);
        }
    }
}

/// What a pull or stream has already buffered (never waits), each message wrapped at once.
/// Error items (a status the library reports) are skipped, a bounded number of times.
fn drain_ready<M, S, E>(source: &mut S, ledger: &Ledger) -> Vec<Delivery<M>>
where
    M: AckTarget,
    S: Stream<Item = Result<M, E>> + Unpin,
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

#[cfg(test)]
mod tests;
