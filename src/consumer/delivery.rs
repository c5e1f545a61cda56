//! The ledger of delivered messages: every message a pull hands us is wrapped in a [`Delivery`]
//! at once, which records whether it has been settled (by [`super::settle`], the only code that
//! acks, NAKs or TERMs). A `Delivery` dropped without being settled is counted in
//! `normalize_messages_released_unsettled_total` and logged: that counter staying at 0 is the
//! proof that no delivered message is left for `ack_wait` to find.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream;
use prometheus::IntCounter;

use super::settle::AckTarget;
use crate::config::ConsumerKind;
use crate::health::Health;

/// What a binding's deliveries report to: the unsettled counter of the binding and the
/// consumer's activity (messages held, last settled) for `/health` and the stuck check.
#[derive(Clone)]
pub(super) struct Ledger {
    pub kind: ConsumerKind,
    pub unsettled: IntCounter,
    pub health: Arc<Health>,
    /// The durable's own finite `max_deliver`: a delivery that reaches it is the last one.
    pub server_max_deliver: Option<i64>,
}

impl Ledger {
    /// Wraps a message just received from a pull.
    pub fn receive<M: AckTarget>(&self, msg: M) -> Delivery<M> {
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
pub(super) struct Delivery<M: AckTarget = jetstream::Message> {
    pub msg: M,
    /// When it arrived (for the processing-time histogram).
    pub at: Instant,
    settled: AtomicBool,
    ledger: Ledger,
}

impl<M: AckTarget> Delivery<M> {
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// The server will not deliver it again (its durable has a finite `max_deliver` and this
    /// delivery reached it): it must be processed or dead-lettered, never released by a NAK.
    pub fn is_last_delivery(&self) -> bool {
        match (self.ledger.server_max_deliver, self.msg.delivered()) {
            (Some(max), Some(delivered)) => delivered >= max,
            _ => false,
        }
    }

    /// Records the settlement once; returns false when it was already settled. Only
    /// [`super::settle`] calls it, with the ack, NAK or TERM it sends.
    pub(super) fn mark_settled(&self) -> bool {
        if self.settled.swap(true, Ordering::AcqRel) {
            return false;
        }
        let activity = self.ledger.health.activity(self.ledger.kind);
        activity.held(-1);
        activity.settled_now();
        true
    }
}

impl<M: AckTarget> Drop for Delivery<M> {
    fn drop(&mut self) {
        if self.is_settled() {
            return;
        }
        let activity = self.ledger.health.activity(self.ledger.kind);
        activity.held(-1);
        self.ledger.unsettled.inc();
        let seq = self.msg.stream_sequence().unwrap_or(0);
        tracing::warn!(
            seq,
            "a delivered message was released without ack, NAK or TERM; JetStream redelivers it after ack_wait"
        );
    }
}
