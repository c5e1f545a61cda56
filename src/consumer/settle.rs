//! The only code that speaks the ack protocol — ack, NAK (with or without delay), TERM and
//! progress acks:
//! - one message as [`crate::outcome::decide`] said ([`Settler::settle`]), including the
//!   dead-letter publish/retry/hold loop, whose choice [`crate::outcome::unstored`] makes;
//! - messages held while they wait or are processed ([`progress_all`], [`progress_while`]);
//! - what never started when a loop stops (shutdown, binding lost or drained): [`release`].
//!
//! A progress ack is sent only for a message that is not settled yet (a progress ack after a
//! delayed NAK would reset the NAK's delay to a whole `ack_wait`); a message is settled once.
//! The per-message ack target is [`AckTarget`], so this module is unit-tested without a server.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError, AckKind};
use tokio_util::sync::CancellationToken;

use super::delivery::Delivery;
use crate::config::ConsumerKind;
use crate::dlq::{self, Origin, Reason};
use crate::health::Health;
use crate::metrics::{MessageResult, Metrics};
use crate::outcome::{self, Action, Failure, Unstored};

/// What a delivered message is settled through: a JetStream message in the daemon, a recorder
/// in the unit tests.
pub(super) trait AckTarget: Send + Sync + 'static {
    fn acknowledge(&self, kind: AckKind) -> impl Future<Output = Result<(), async_nats::Error>> + Send;
    /// Which delivery this is (1-based), when the message carries JetStream metadata.
    fn delivered(&self) -> Option<i64>;
    /// Its stream sequence, when the message carries JetStream metadata.
    fn stream_sequence(&self) -> Option<u64>;
    /// How many messages the consumer still had to deliver when this one was sent (JetStream
    /// metadata); `None` without it.
    fn pending(&self) -> Option<u64> {
        None
    }
}

impl AckTarget for jetstream::Message {
    fn acknowledge(&self, kind: AckKind) -> impl Future<Output = Result<(), async_nats::Error>> + Send {
        jetstream::Message::ack_with(self, kind)
    }

    fn delivered(&self) -> Option<i64> {
        self.info().ok().map(|i| i.delivered)
    }

    fn stream_sequence(&self) -> Option<u64> {
        self.info().ok().map(|i| i.stream_sequence)
    }

    fn pending(&self) -> Option<u64> {
        self.info().ok().map(|i| i.pending)
    }
}

/// Where dead letters are stored: the DLQ stream in the daemon, a script in the unit tests.
pub(super) trait Letters<M> {
    /// Stores the dead letter of `msg` and awaits JetStream's PubAck.
    fn store(
        &self,
        msg: &M,
        origin: &Origin<'_>,
        reason: Reason,
        error: &str,
    ) -> impl Future<Output = Result<StoredLetter, PublishError>> + Send;
}

/// A dead letter JetStream acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredLetter {
    /// Its DLQ sequence.
    pub seq: u64,
    /// Already stored (its `Nats-Msg-Id` is in the duplicate window): a redelivery after a
    /// lost TERM or ack. Settled as stored, not counted again.
    pub duplicate: bool,
}

/// The DLQ stream: `<prefix>.<reason>`.
pub(super) struct Dlq<'a> {
    pub js: &'a jetstream::Context,
    pub prefix: &'a str,
}

impl Letters<jetstream::Message> for Dlq<'_> {
    async fn store(
        &self,
        msg: &jetstream::Message,
        origin: &Origin<'_>,
        reason: Reason,
        error: &str,
    ) -> Result<StoredLetter, PublishError> {
        dlq::publish(self.js, self.prefix, &msg.message, origin, reason, error)
            .await
            .map(|ack| StoredLetter {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            })
    }
}

impl<M: AckTarget> Delivery<M> {
    /// Acks (the effect is committed). An ack lost on the way is a redelivery, stored
    /// idempotently.
    async fn ack(&self) {
        self.send(AckKind::Ack, "ack").await;
    }

    /// NAKs with a delay (`None`: redeliver now).
    async fn nak(&self, delay: Option<Duration>) {
        self.send(AckKind::Nak(delay), "nak").await;
    }

    /// Terminates (its dead letter is stored).
    async fn term(&self) {
        self.send(AckKind::Term, "term").await;
    }

    async fn send(&self, kind: AckKind, what: &'static str) {
        if !self.mark_settled() {
            return;
        }
        if let Err(e) = self.msg.acknowledge(kind).await {
            tracing::warn!(error = %e, settle = what, "settling a message failed; JetStream redelivers it after ack_wait");
        }
    }

    /// Asks the server for another `ack_wait`, unless the message is already settled.
    async fn progress(&self) {
        if self.is_settled() {
            return;
        }
        if let Err(e) = self.msg.acknowledge(AckKind::Progress).await {
            tracing::debug!(error = %e, "progress ack failed");
        }
    }

    /// Marks a message settled without telling the server: for a held last delivery given up
    /// at shutdown (the server will not redeliver it whatever is sent).
    fn forget(&self) {
        self.mark_settled();
    }
}

/// How often a held message gets a progress ack: a third of the durable's ack_wait.
pub(super) fn progress_every(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(100))
}

/// Sends a progress ack for every message of `msgs` that is not settled yet.
pub(super) async fn progress_all<'m, M: AckTarget>(msgs: impl Iterator<Item = &'m Delivery<M>>) {
    for d in msgs {
        d.progress().await;
    }
}

/// Awaits `work`, sending a progress ack every ack_wait / 3 for each message in `msgs` that is
/// not settled yet: slow work (a database lock, a slow disk) must not be redelivered under us.
pub(super) async fn progress_while<'m, M: AckTarget, T>(
    msgs: impl Iterator<Item = &'m Delivery<M>> + Clone,
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let every = progress_every(ack_wait);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tokio::time::sleep(every) => progress_all(msgs.clone()).await,
        }
    }
}

/// Releases messages that never started when their loop stops: each is NAKed without delay,
/// so another instance or a restart takes it now instead of after ack_wait — except a last
/// delivery (finite server-side `max_deliver`), which a NAK would lose: those are returned, to
/// be processed now.
pub(super) async fn release<M: AckTarget>(msgs: Vec<Delivery<M>>) -> Vec<Delivery<M>> {
    let (last, others): (Vec<_>, Vec<_>) = msgs.into_iter().partition(Delivery::is_last_delivery);
    for d in &others {
        d.nak(None).await;
    }
    last
}

/// Acks are fire-and-forget publishes: a batch pushes them out together, once.
pub(super) async fn flush(js: &jetstream::Context) {
    if let Err(e) = js.client().flush().await {
        tracing::debug!(error = %e, "flushing acks failed; they will be sent on reconnect or redelivered");
    }
}

/// The sections of an Oura webhook that could not be used, and why: the webhook is stored
/// without them, and a dead letter naming them is stored before it is acked.
pub(super) struct Report {
    pub sections: Vec<&'static str>,
    pub error: String,
}

/// A dead letter to store: why, the error text, and what then settles the original (TERM; or
/// ack, when the letter only reports what the stored message lacked).
struct Letter<'a> {
    reason: Reason,
    error: &'a str,
    terminate: bool,
}

/// What settling one binding's messages needs.
pub(super) struct Settler<'a, L> {
    pub kind: ConsumerKind,
    pub metrics: &'a Metrics,
    pub health: &'a Health,
    pub letters: L,
    /// `RETRY_BACKOFF_MS`: the NAK delays of a dead letter that could not be stored.
    pub backoff: &'a [Duration],
    /// The durable's ack_wait: a held message is retried within a third of it.
    pub ack_wait: Duration,
    /// The durable's own finite `max_deliver`: a delivery that reaches it is held, not NAKed.
    pub server_max_deliver: Option<i64>,
    /// The process's `SHUTDOWN_TIMEOUT_MS`, when [`Health`] has no shutdown deadline yet.
    pub shutdown_timeout: Duration,
    /// The `subject` label of the message counters (the consumer's filter subject).
    pub metric_subject: &'a str,
    pub durable: &'a str,
    /// The process's shutdown: a held message is given up shortly before its deadline.
    pub shutdown: &'a CancellationToken,
}

impl<L> Settler<'_, L> {
    /// Settles one message as decided (`failure`: why it failed, if it did) and counts it.
    pub async fn settle<M: AckTarget>(
        &self,
        d: &Delivery<M>,
        origin: &Origin<'_>,
        failure: Option<&Failure>,
        action: Action,
        report: Option<Report>,
    ) where
        L: Letters<M>,
    {
        let (kind, m, stream) = (self.kind, self.metrics, origin.stream);
        // Counts a stored letter once: not again when a redelivery finds it already stored.
        // True when counted.
        let count_letter = |reason: Reason, stored: StoredLetter| {
            if stored.duplicate {
                return false;
            }
            m.dlq_messages
                .with_label_values(&[
                    kind.as_str(),
                    reason.as_str(),
                    self.metric_subject,
                    stream,
                    self.durable,
                ])
                .inc();
            true
        };
        let settled: MessageResult = match (action, report) {
            // Stored without its invalid sections: the dead letter that names them comes
            // first, then the ack (a NAK, to try again, when it cannot be stored).
            (Action::Ack, Some(report)) => {
                let reason = Reason::SchemaInvalid;
                let letter = Letter {
                    reason,
                    error: &report.error,
                    terminate: false,
                };
                match self.dead_letter(d, origin, letter).await {
                    Some(stored) => {
                        if count_letter(reason, stored) {
                            for section in report.sections {
                                m.count_oura_invalid_section(section);
                            }
                        }
                        MessageResult::Success
                    }
                    None => MessageResult::Retry,
                }
            }
            (Action::Ack, None) => {
                d.ack().await;
                MessageResult::Success
            }
            (Action::Nak(delay), _) => {
                if let Some(f) = failure {
                    tracing::debug!(seq = origin.seq, delivered = origin.delivered, error = %f, "transient failure; NAK with delay");
                }
                d.nak(Some(delay)).await;
                MessageResult::Retry
            }
            (Action::DeadLetter(reason), _) => {
                let error = failure.map(ToString::to_string).unwrap_or_default();
                let letter = Letter {
                    reason,
                    error: &error,
                    terminate: true,
                };
                match self.dead_letter(d, origin, letter).await {
                    Some(stored) => {
                        count_letter(reason, stored);
                        if reason == Reason::SchemaInvalid {
                            MessageResult::SchemaInvalid
                        } else {
                            MessageResult::Dlq
                        }
                    }
                    None => MessageResult::Retry,
                }
            }
        };
        m.count_message(kind, settled, self.metric_subject, stream, self.durable);
        if settled == MessageResult::Success {
            m.last_store_timestamp
                .with_label_values(&[kind.as_str()])
                .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        m.processing_duration
            .with_label_values(&[kind.as_str(), stream, self.durable])
            .observe(d.at.elapsed().as_secs_f64());
    }

    /// Publishes the dead letter and TERMs the original (or acks it, for a report) once
    /// JetStream has stored it. When the dead letter cannot be stored, [`outcome::unstored`]
    /// decides: the original is NAKed (never acked or terminated); or, on a durable with a
    /// finite server-side limit, the last delivery is held with progress acks while the dead
    /// letter is retried — through a shutdown too, until shortly before its deadline, when it
    /// is given up with an ERROR naming its sequence (the server will not redeliver it) and
    /// counted in `normalize_held_messages_abandoned_total`.
    /// Returns the stored letter, `None` when it was not stored.
    async fn dead_letter<M: AckTarget>(
        &self,
        d: &Delivery<M>,
        origin: &Origin<'_>,
        letter: Letter<'_>,
    ) -> Option<StoredLetter>
    where
        L: Letters<M>,
    {
        let Letter {
            reason,
            error,
            terminate,
        } = letter;
        let kind = self.kind;
        let mut attempt: i64 = 0;
        // The process's deadline, not this message's: fixed when the shutdown is first seen.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let e = match self.letters.store(&d.msg, origin, reason, error).await {
                Ok(stored) => {
                    self.health.update(kind, |s| s.dead_letter_ok = true);
                    // Per message at DEBUG; the watchdog summarises them at WARN.
                    if !stored.duplicate {
                        self.health.count_dead_letter(kind, reason.as_str(), stored.seq);
                    }
                    tracing::debug!(
                        reason = reason.as_str(), seq = origin.seq, dlq_seq = stored.seq,
                        duplicate = stored.duplicate, delivered = origin.delivered, error = %error,
                        "message dead-lettered"
                    );
                    if terminate {
                        d.term().await;
                    } else {
                        d.ack().await;
                    }
                    return Some(stored);
                }
                Err(e) => e,
            };
            attempt += 1;
            self.health.update(kind, |s| {
                s.dead_letter_ok = false;
                s.dead_letter_failed_at = Some(std::time::Instant::now());
            });
            self.metrics
                .dlq_publish_failures
                .with_label_values(&[kind.as_str(), origin.stream, self.durable])
                .inc();
            let last_delivery = self.server_max_deliver.is_some_and(|m| origin.delivered >= m);
            if attempt == 1 {
                tracing::warn!(
                    reason = reason.as_str(), seq = origin.seq, error = %e, holding = last_delivery,
                    "dead letter could not be stored; the original is kept for retry"
                );
            }
            let shutdown_left = self.shutdown.is_cancelled().then(|| {
                let at = *deadline.get_or_insert_with(|| self.shutdown_deadline());
                at.saturating_duration_since(tokio::time::Instant::now())
            });
            let next = outcome::unstored(
                last_delivery,
                origin.delivered,
                attempt,
                self.backoff,
                self.ack_wait,
                shutdown_left,
            );
            match next {
                Unstored::Nak(delay) => {
                    d.nak(Some(delay)).await;
                    return None;
                }
                // The server will not redeliver this message: hold it and retry here.
                Unstored::Hold(wait) => {
                    d.progress().await;
                    if shutdown_left.is_some() {
                        tokio::time::sleep(wait).await;
                    } else {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Unstored::GiveUp => {
                    self.metrics
                        .held_abandoned
                        .with_label_values(&[kind.as_str(), origin.stream, self.durable])
                        .inc();
                    tracing::error!(
                        stream = %origin.stream, seq = origin.seq, subject = %origin.subject,
                        delivered = origin.delivered, reason = reason.as_str(),
                        "shutdown: giving up a held last delivery whose dead letter could not be stored; the server will not redeliver it: republish it from the stream at this sequence (docs/OPERATIONS.md)"
                    );
                    d.forget();
                    return None;
                }
            }
        }
    }

    /// When the process must be stopped: the deadline [`Health`] has, else a whole
    /// `SHUTDOWN_TIMEOUT_MS` from now.
    fn shutdown_deadline(&self) -> tokio::time::Instant {
        let left = self
            .health
            .shutdown_deadline()
            .map_or(self.shutdown_timeout, |at| {
                at.saturating_duration_since(std::time::Instant::now())
            });
        tokio::time::Instant::now() + left
    }
}

/// Acks each message: what the batches of the unit tests do.
#[cfg(test)]
pub(super) async fn ack_all<M: AckTarget>(msgs: &[Delivery<M>]) {
    for d in msgs {
        d.ack().await;
    }
}

#[cfg(test)]
pub(super) mod tests;
