//! A binding's intake: issues pulls (or reads a `messages()` stream), gathers what arrived into
//! sub-batches for the [`Flight`], and never dies on a pull error. Only intake listens to the
//! shutdown token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::delivery::{Delivery, Ledger};
use super::flight::{Flight, Start};
use super::settle::AckTarget;
use super::worker::Worker;
use crate::config::PullMode;
use crate::topology::{self, Binding};

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
    /// No message: a batch finished (`tick` false) or the progress tick came (`tick` true).
    Idle {
        tick: bool,
    },
    Next(N),
}

/// Why a consume loop returned.
pub(super) enum LoopEnd {
    Shutdown,
    /// The durable or its stream is gone: bind again.
    Lost,
}

/// Why reading a `messages()` stream stopped.
enum StreamEnd {
    Shutdown,
    Ended,
    Failed(pull::MessagesError),
}

/// How long to wait for the next message of a burst before processing what is in hand, when
/// the last message said the consumer had nothing more to deliver: a pull's messages arrive
/// back to back; this only joins them into one write.
const GATHER_WINDOW: Duration = Duration::from_millis(1);

/// How long to wait for the next message while the last one said more were pending: the pull
/// is still being delivered (a busy CPU spreads its messages out), so waiting fills the batch
/// instead of splitting it. Bounded, so a partial batch is never held for long (not for
/// `expires`), e.g. when the pending messages go to another instance's pull.
const MORE_PENDING_WINDOW: Duration = Duration::from_millis(20);

/// How gathering a sub-batch ended.
enum Gathered<E> {
    /// The pull may deliver more.
    Open,
    /// The pull (or stream) ended.
    Ended,
    /// The pull ended with an error.
    Failed(E),
}

/// Takes what has already arrived and what arrives next, up to `max` messages in total in
/// `into`, each wrapped by `ledger` at once: it waits [`GATHER_WINDOW`] for the next message, or
/// [`MORE_PENDING_WINDOW`] while the last message received said the consumer had more to
/// deliver.
async fn gather<M, S, E>(
    source: &mut S,
    into: &mut Vec<Delivery<M>>,
    max: usize,
    ledger: &Ledger,
) -> Gathered<E>
where
    M: AckTarget,
    S: Stream<Item = Result<M, E>> + Unpin,
{
    while into.len() < max {
        let more_pending = into.last().and_then(|d| d.msg.pending()).is_some_and(|p| p > 0);
        let window = if more_pending {
            MORE_PENDING_WINDOW
        } else {
            GATHER_WINDOW
        };
        let next = match source.next().now_or_never() {
            Some(n) => n,
            None => match tokio::time::timeout(window, source.next()).await {
                Ok(n) => n,
                Err(_) => return Gathered::Open,
            },
        };
        match next {
            Some(Ok(msg)) => into.push(ledger.receive(msg)),
            Some(Err(e)) => return Gathered::Failed(e),
            None => return Gathered::Ended,
        }
    }
    Gathered::Open
}

/// The wait after the `consecutive`-th pull error in a row: 100 ms more each time, at most 5 s.
fn error_backoff(consecutive: u32) -> Duration {
    Duration::from_millis(100 * u64::from(consecutive.min(50)))
}

impl Worker {
    /// A wake without messages (a batch finished, or the progress tick): the loop's liveness,
    /// and on the tick progress acks to the messages waiting for pipeline room.
    async fn idle_tick(&self, stream: &str, tick: bool, flight: &mut Flight) {
        if tick {
            flight.progress_waiting().await;
        }
        self.progress(stream, false, false);
    }

    /// A loop on `stream` made progress. Only the active binding's loop counts for liveness: a
    /// second loop kept on the other stream during a migration pulls (empty) all the time and
    /// would hide a wedged active loop.
    fn progress(&self, stream: &str, pulled: bool, messages: bool) {
        let now = Utc::now();
        self.shared.health.update(self.cc.kind, |s| {
            if s.stream.as_deref().is_none_or(|active| active == stream) {
                s.last_progress = Some(Instant::now());
            }
            if pulled {
                s.last_pull_at = Some(now);
            }
            if messages {
                s.last_message_at = Some(now);
            }
        });
    }

    fn count_pull_error(&self, b: &Binding, error: &dyn std::fmt::Display) {
        tracing::warn!(error = %error, "pull ended with an error; issuing a fresh request");
        self.shared
            .metrics
            .pull_errors
            .with_label_values(&[self.cc.kind.as_str(), &b.stream, &b.durable])
            .inc();
    }

    /// Consumes one binding until its intake stops (`intake`: shutdown, or the binding is
    /// drained) or the binding is lost.
    pub(super) async fn consume(
        &self,
        b: &Binding,
        intake: &CancellationToken,
        root: &CancellationToken,
    ) -> LoopEnd {
        let mut flight = self.flight(b, root);
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

    /// The binding's pipeline. `root` is the process's shutdown token, for the batches: a
    /// draining binding's loop being stopped must not look like a shutdown to a batch holding
    /// a last delivery.
    fn flight(&self, b: &Binding, root: &CancellationToken) -> Flight {
        let kind = self.cc.kind;
        let ledger = Ledger {
            kind,
            unsettled: self.shared.metrics.released_unsettled.with_label_values(&[
                kind.as_str(),
                &b.stream,
                &b.durable,
            ]),
            health: self.shared.health.clone(),
            server_max_deliver: b.server_max_deliver,
        };
        let (worker, binding, root) = (Arc::new(self.clone()), Arc::new(b.clone()), root.clone());
        let start: Start = Box::new(move |msgs, db_down| {
            let span = tracing::error_span!("batch", messages = msgs.len());
            let batch = worker
                .clone()
                .run_batch(msgs, binding.clone(), db_down, root.clone());
            batch.instrument(span).boxed()
        });
        let ack_wait = b.consumer.cached_info().config.ack_wait;
        Flight::new(
            self.cc.pipeline_depth,
            self.cc.batch_size,
            ack_wait,
            ledger,
            start,
        )
    }

    fn connected(&self) -> bool {
        self.shared.js.client().connection_state() == async_nats::connection::State::Connected
    }

    /// Batch requests bounded by `expires`. A pull is read to its end without pause: what has
    /// arrived is processed in sub-batches (see [`gather`]), so a partial batch never
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
                    self.progress(&b.stream, false, false);
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
                        self.progress(&b.stream, true, false);
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
            let due = flight.next_progress();
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = flight.batches.next(), if flight.full() => Wake::Idle { tick: false },
                _ = tokio::time::sleep_until(due), if flight.has_waiting() => Wake::Idle { tick: true },
                n = next_of(&mut current), if current.is_some() => Wake::Next(n),
                // A full pipeline of slow but working batches is not a stalled loop (a wedged
                // batch is the stuck check's business).
                _ = tokio::time::sleep(self.cc.expires), if flight.full() => Wake::Idle { tick: false },
            };
            let next = match wake {
                Wake::Shutdown => {
                    for mut p in [current.take(), prefetched.take()].into_iter().flatten() {
                        flight.release_source(&mut p.batch).await;
                    }
                    return LoopEnd::Shutdown;
                }
                Wake::Idle { tick } => {
                    self.idle_tick(&b.stream, tick, flight).await;
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
                    let gathered = gather(&mut p.batch, &mut msgs, room, &flight.ledger).await;
                    p.received += msgs.len();
                    let full = p.received >= self.cc.batch_size;
                    flight.hold(msgs, &p.db_down);
                    self.progress(&b.stream, false, true);
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
                        Gathered::Open => None,
                        Gathered::Ended => Some(false),
                        Gathered::Failed(e) => {
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
                    tracing::debug!("pull request outlived its expiry; issuing a fresh one");
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
            self.progress(&b.stream, true, false);
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
            let due = flight.next_progress();
            let read = flight.waiting_len() < backlog;
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = flight.batches.next(), if flight.full() => Wake::Idle { tick: false },
                _ = tokio::time::sleep_until(due), if flight.has_waiting() => Wake::Idle { tick: true },
                n = tokio::time::timeout(self.cc.expires, stream.next()), if read => Wake::Next(n),
                _ = tokio::time::sleep(self.cc.expires), if flight.full() => Wake::Idle { tick: false },
            };
            // The "batch" of stream mode is one expiry period: the database short-circuit is
            // reset after it, so the database is tried again.
            if last_db_reset.elapsed() >= self.cc.expires {
                db_down.store(false, Ordering::Relaxed);
                last_db_reset = Instant::now();
            }
            let next = match wake {
                Wake::Shutdown => return StreamEnd::Shutdown,
                Wake::Idle { tick } => {
                    self.idle_tick(&b.stream, tick, flight).await;
                    continue;
                }
                Wake::Next(n) => n,
            };
            match next {
                Err(_idle) => self.progress(&b.stream, true, false),
                Ok(None) => return StreamEnd::Ended,
                Ok(Some(Ok(msg))) => {
                    *consecutive_errors = 0;
                    let mut msgs = vec![flight.ledger.receive(msg)];
                    let gathered = gather(stream, &mut msgs, self.cc.batch_size, &flight.ledger).await;
                    // In stream mode a "pull" is what arrived together.
                    self.shared
                        .metrics
                        .batch_size
                        .with_label_values(&[self.cc.kind.as_str()])
                        .observe(msgs.len() as f64);
                    flight.hold(msgs, db_down);
                    self.progress(&b.stream, true, true);
                    match gathered {
                        Gathered::Open => {}
                        Gathered::Ended => return StreamEnd::Ended,
                        Gathered::Failed(e) if e.kind() == K::MissingHeartbeat => {
                            self.count_pull_error(b, &e)
                        }
                        Gathered::Failed(e) => return StreamEnd::Failed(e),
                    }
                }
                Ok(Some(Err(e))) if e.kind() == K::MissingHeartbeat => {
                    self.count_pull_error(b, &e);
                    self.progress(&b.stream, true, false);
                }
                Ok(Some(Err(e))) => {
                    self.progress(&b.stream, true, false);
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
        let delay = error_backoff(*consecutive);
        if flight.serve(tokio::time::sleep(delay), shutdown).await.is_none() {
            return Some(LoopEnd::Shutdown);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::settle::tests::{Books, Fake};

    /// A pull's messages with the gap before each and their `pending` metadata.
    fn source(items: Vec<(u64, u64)>) -> impl Stream<Item = Result<Fake, ()>> + Unpin {
        let mut seq = 0;
        let items: Vec<(Duration, Fake)> = items
            .into_iter()
            .map(|(gap_ms, pending)| {
                seq += 1;
                let mut f = Fake::new(1, seq);
                f.pending = Some(pending);
                (Duration::from_millis(gap_ms), f)
            })
            .collect();
        Box::pin(futures::stream::unfold(items.into_iter(), |mut it| async move {
            let (gap, msg) = it.next()?;
            tokio::time::sleep(gap).await;
            Some((Ok(msg), it))
        }))
    }

    async fn gathered(items: Vec<(u64, u64)>, max: usize) -> (Vec<u64>, Duration) {
        let books = Books::new();
        let ledger = books.ledger(None);
        let mut s = source(items);
        let started = tokio::time::Instant::now();
        let mut into = Vec::new();
        let end = gather(&mut s, &mut into, max, &ledger).await;
        assert!(matches!(end, Gathered::Open | Gathered::Ended));
        let seqs = into.iter().map(|d| d.msg.seq).collect();
        for d in &into {
            d.mark_settled();
        }
        (seqs, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_gathered_while_more_is_pending_and_not_held_when_nothing_is() {
        let ms = Duration::from_millis;
        // More pending: gaps of 10 and 15 ms are waited for; after "nothing pending" 1 ms only.
        let (seqs, took) = gathered(vec![(0, 3), (10, 2), (15, 0), (5, 9)], 10).await;
        assert_eq!(seqs, [1, 2, 3]);
        assert!(took >= ms(25) && took <= ms(27), "{took:?}");
        // More pending but nothing comes: the partial batch goes after 20 ms, not `expires`.
        let (seqs, took) = gathered(vec![(0, 40), (30, 39)], 10).await;
        assert_eq!(seqs, [1]);
        assert!(took >= ms(20) && took <= ms(21), "{took:?}");
        // Never more than the room left in the pull.
        let (seqs, _) = gathered(vec![(0, 9), (1, 8), (1, 7), (1, 6)], 2).await;
        assert_eq!(seqs, [1, 2]);
        // The 1 ms window as before when nothing is pending.
        let (seqs, _) = gathered(vec![(0, 0), (2, 0)], 10).await;
        assert_eq!(seqs, [1]);
    }

    #[test]
    fn pull_error_backoff_grows_by_100_ms_up_to_5_s() {
        let ms = Duration::from_millis;
        assert_eq!(error_backoff(0), ms(0));
        assert_eq!(error_backoff(1), ms(100));
        assert_eq!(error_backoff(7), ms(700));
        assert_eq!(error_backoff(50), ms(5000));
        assert_eq!(error_backoff(u32::MAX), ms(5000));
    }
}
