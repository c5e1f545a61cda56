//! A delivered message and the daemon's promise to settle it.
//!
//! Every message a pull hands us is wrapped in a [`Delivery`] at once. Settling it (ack, NAK,
//! TERM) goes through the wrapper, which records that it happened; a progress ack is sent only
//! for a message that is not settled yet (a progress ack after a delayed NAK would reset the
//! NAK's delay to a whole `ack_wait`). A `Delivery` dropped without being settled is counted in
//! `normalize_messages_released_unsettled_total` and logged: that counter staying at 0 is the
//! proof that no delivered message is left for `ack_wait` to find.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use prometheus::IntCounter;

use crate::config::ConsumerKind;
use crate::health::Health;

/// What a binding's deliveries report to: the unsettled counter of the binding and the
/// consumer's activity (messages held, last settled) for `/health` and the stuck check.
#[derive(Clone)]
pub(crate) struct Ledger {
    pub kind: ConsumerKind,
    pub stream: Arc<str>,
    pub unsettled: IntCounter,
    pub health: Arc<Health>,
    /// The durable's own finite `max_deliver`: a delivery that reaches it is the last one.
    pub server_max_deliver: Option<i64>,
}

impl Ledger {
    /// Wraps a message just received from a pull.
    pub fn receive(&self, msg: jetstream::Message) -> Delivery {
        self.health.activity(self.kind).held(1);
        Delivery {
            msg,
            at: Instant::now(),
            settled: AtomicBool::new(false),
            ledger: self.clone(),
        }
    }
}

/// A message delivered to this process, not necessarily settled yet.
pub(crate) struct Delivery {
    pub msg: jetstream::Message,
    /// When it arrived (for the processing-time histogram).
    pub at: Instant,
    settled: AtomicBool,
    ledger: Ledger,
}

impl Delivery {
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// The server will not deliver it again (its durable has a finite `max_deliver` and this
    /// delivery reached it): it must be processed or dead-lettered, never released by a NAK.
    pub fn is_last_delivery(&self) -> bool {
        match (self.ledger.server_max_deliver, self.msg.info()) {
            (Some(max), Ok(info)) => info.delivered >= max,
            _ => false,
        }
    }

    /// Records the settlement once; returns false when it was already settled.
    fn mark_settled(&self) -> bool {
        if self.settled.swap(true, Ordering::AcqRel) {
            return false;
        }
        let activity = self.ledger.health.activity(self.ledger.kind);
        activity.held(-1);
        activity.settled_now();
        true
    }

    /// Acks (the effect is committed). An ack lost on the way is a redelivery, stored
    /// idempotently.
    pub async fn ack(&self) {
        self.send(AckKind::Ack, "ack").await;
    }

    /// NAKs with a delay (`None`: redeliver now).
    pub async fn nak(&self, delay: Option<Duration>) {
        self.send(AckKind::Nak(delay), "nak").await;
    }

    /// Terminates (its dead letter is stored).
    pub async fn term(&self) {
        self.send(AckKind::Term, "term").await;
    }

    async fn send(&self, kind: AckKind, what: &'static str) {
        if !self.mark_settled() {
            return;
        }
        if let Err(e) = self.msg.ack_with(kind).await {
            tracing::warn!(consumer = %self.ledger.kind, error = %e, settle = what, "settling a message failed; JetStream redelivers it after ack_wait");
        }
    }

    /// Asks the server for another `ack_wait`, unless the message is already settled.
    pub async fn progress(&self) {
        if self.is_settled() {
            return;
        }
        if let Err(e) = self.msg.ack_with(AckKind::Progress).await {
            tracing::debug!(consumer = %self.ledger.kind, error = %e, "progress ack failed");
        }
    }

    /// Marks a message settled without telling the server: only for a message that has no
    /// JetStream reply subject (nothing could settle it).
    pub fn forget(&self) {
        self.mark_settled();
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.is_settled() {
            return;
        }
        let activity = self.ledger.health.activity(self.ledger.kind);
        activity.held(-1);
        self.ledger.unsettled.inc();
        let seq = self.msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::warn!(
            consumer = %self.ledger.kind, stream = %self.ledger.stream, seq,
            "a delivered message was released without ack, NAK or TERM; JetStream redelivers it after ack_wait"
        );
    }
}

/// Sends a progress ack for every message of `msgs` that is not settled yet.
pub(crate) async fn progress_all<'m>(msgs: impl Iterator<Item = &'m Delivery>) {
    for d in msgs {
        d.progress().await;
    }
}
