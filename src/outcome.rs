//! The one place that decides what happens to a message: ack, NAK with delay, or dead-letter
//! ([`decide`]); and, when its dead letter cannot be stored, NAK, hold or give up ([`unstored`]).
//!
//! Pure: it sees a classified result, the delivery count and the limits, and nothing else.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

use crate::dlq::Reason;
use crate::pipeline::SchemaError;

/// Why processing a message failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Schema(#[from] SchemaError),
    #[error("database: {0}")]
    Store(#[source] sqlx::Error),
    #[error("publishing the normalized event: {0}")]
    Publish(#[source] PublishError),
    /// The multi-row statement of the batch this message was part of failed with a transient
    /// error; every message of the batch shares it (the batch is retried as a whole).
    #[error("database (batch write): {0}")]
    Batch(#[source] Arc<sqlx::Error>),
    /// An earlier message of the same batch found the database unreachable; this one was not tried.
    #[error("database unreachable (not attempted after an earlier failure in the batch)")]
    DatabaseSkipped,
    /// The delivery carried no JetStream metadata (no stream, sequence or delivery count).
    #[error("message without JetStream metadata")]
    NoMetadata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Can never succeed: dead-letter at once as schema-invalid.
    Invalid,
    /// May succeed later: retry until the delivery limit.
    Transient,
    /// Will not succeed by retrying: dead-letter as non-retryable.
    Permanent,
}

impl Failure {
    pub fn class(&self) -> Class {
        match self {
            Failure::Schema(_) => Class::Invalid,
            Failure::Store(e) => {
                if crate::store::is_transient(e) {
                    Class::Transient
                } else {
                    Class::Permanent
                }
            }
            Failure::Batch(e) => {
                if crate::store::is_transient(e) {
                    Class::Transient
                } else {
                    Class::Permanent
                }
            }
            Failure::Publish(e) => publish_class(e.kind()),
            Failure::DatabaseSkipped => Class::Transient,
            Failure::NoMetadata => Class::Permanent,
        }
    }

    /// True when the failure says the database itself is unreachable (not one bad row).
    pub fn database_unreachable(&self) -> bool {
        match self {
            Failure::Store(e) => unreachable_error(e),
            Failure::Batch(e) => unreachable_error(e),
            Failure::DatabaseSkipped => true,
            Failure::Schema(_) | Failure::Publish(_) | Failure::NoMetadata => false,
        }
    }
}

/// The database (not one statement) is unreachable or refuses this service: no connection, the
/// server shutting down or starting, out of connection slots, the credentials or the database
/// refused, a read-only server after a failover ([`crate::store::is_outage_sqlstate`]). The rest
/// of a batch need not be tried.
pub fn unreachable_error(e: &sqlx::Error) -> bool {
    #[allow(
        clippy::wildcard_enum_match_arm,
        reason = "sqlx::Error is non-exhaustive: whatever is not listed is not an outage"
    )]
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            true
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|c| crate::store::is_outage_sqlstate(&c)),
        _ => false,
    }
}

/// Publish failures: a payload the server will never take, or a sequence expectation that was
/// violated, are permanent; everything else (timeouts, no responders, disconnects, unknown) is
/// retried, because dropping a message on an ambiguous error would be at-most-once.
pub fn publish_class(kind: PublishErrorKind) -> Class {
    match kind {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Class::Permanent,
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::Other => Class::Transient,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Ack,
    Nak(Duration),
    DeadLetter(Reason),
}

/// Decides the fate of a message on its `delivered`-th delivery (1-based).
pub fn decide(result: Result<(), Class>, delivered: i64, max_deliver: i64, backoff: &[Duration]) -> Action {
    match result {
        Ok(()) => Action::Ack,
        Err(Class::Invalid) => Action::DeadLetter(Reason::SchemaInvalid),
        Err(Class::Permanent) => Action::DeadLetter(Reason::NonRetryable),
        Err(Class::Transient) if delivered >= max_deliver => Action::DeadLetter(Reason::MaxDeliver),
        Err(Class::Transient) => Action::Nak(crate::config::retry_delay(backoff, delivered)),
    }
}

/// What to do with a message whose dead letter could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstored {
    /// NAK with this delay (never ack or TERM it): the server redelivers it and the dead
    /// letter is tried again then.
    Nak(Duration),
    /// The server will not redeliver it: keep it (progress ack) and try the dead letter again
    /// after this wait.
    Hold(Duration),
    /// The shutdown deadline is near: give the held message up (an ERROR naming it, counted in
    /// `normalize_held_messages_abandoned_total`); the server will not redeliver it.
    GiveUp,
}

/// How long before the process's shutdown deadline a held message is given up: time for every
/// held message's ERROR and counter before the process is stopped.
pub const GIVE_UP_MARGIN: Duration = Duration::from_millis(1500);

/// Decides the fate of a message whose dead letter failed to be stored for the `attempt`-th
/// time (1-based), on its `delivered`-th delivery. `last_delivery`: the durable's own finite
/// `max_deliver` is reached, so a NAK would lose it. `shutdown_left`: `None` while the process
/// runs; during a shutdown, the time left before the process's deadline.
pub fn unstored(
    last_delivery: bool,
    delivered: i64,
    attempt: i64,
    backoff: &[Duration],
    ack_wait: Duration,
    shutdown_left: Option<Duration>,
) -> Unstored {
    let delay = crate::config::retry_delay(backoff, delivered.max(attempt));
    if !last_delivery {
        return Unstored::Nak(delay);
    }
    // Retried within a third of ack_wait, so the progress acks keep it ours.
    let hold = delay.min(ack_wait / 3).max(Duration::from_millis(10));
    match shutdown_left.map(|left| left.saturating_sub(GIVE_UP_MARGIN)) {
        None => Unstored::Hold(hold),
        Some(left) if left.is_zero() => Unstored::GiveUp,
        Some(left) => Unstored::Hold(hold.min(left)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [Duration; 2] = [Duration::from_millis(10), Duration::from_millis(20)];

    #[test]
    fn outcome_table() {
        assert_eq!(decide(Ok(()), 1, 5, &B), Action::Ack);
        assert_eq!(decide(Ok(()), 9, 5, &B), Action::Ack);
        assert_eq!(
            decide(Err(Class::Invalid), 1, 5, &B),
            Action::DeadLetter(Reason::SchemaInvalid)
        );
        assert_eq!(
            decide(Err(Class::Permanent), 1, 5, &B),
            Action::DeadLetter(Reason::NonRetryable)
        );
        assert_eq!(decide(Err(Class::Transient), 1, 5, &B), Action::Nak(B[0]));
        assert_eq!(decide(Err(Class::Transient), 4, 5, &B), Action::Nak(B[1]));
        assert_eq!(
            decide(Err(Class::Transient), 5, 5, &B),
            Action::DeadLetter(Reason::MaxDeliver)
        );
        assert_eq!(
            decide(Err(Class::Transient), 7, 5, &B),
            Action::DeadLetter(Reason::MaxDeliver)
        );
    }

    #[test]
    fn unstored_dead_letter_table() {
        use Unstored::{GiveUp, Hold, Nak};
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let wait = s(30);
        // (last delivery, delivered, attempt, ack_wait, time left in a shutdown, expected)
        let table: [(bool, i64, i64, Duration, Option<Duration>, Unstored); 12] = [
            // Not a last delivery: NAK with the backoff of the delivery (or of the attempt).
            (false, 1, 1, wait, None, Nak(B[0])),
            (false, 2, 1, wait, None, Nak(B[1])),
            (false, 1, 5, wait, None, Nak(B[1])),
            (false, 1, 1, wait, Some(s(10)), Nak(B[0])),
            (false, 1, 1, wait, Some(ms(0)), Nak(B[0])),
            // A last delivery is held, retried within a third of ack_wait, never below 10 ms.
            (true, 1, 1, wait, None, Hold(B[0])),
            (true, 3, 1, ms(30), None, Hold(ms(10))),
            (true, 3, 1, ms(15), None, Hold(ms(10))),
            // In a shutdown: held until GIVE_UP_MARGIN before the deadline, then given up.
            (true, 1, 1, wait, Some(s(10)), Hold(B[0])),
            (true, 1, 1, wait, Some(GIVE_UP_MARGIN + ms(5)), Hold(ms(5))),
            (true, 1, 1, wait, Some(GIVE_UP_MARGIN), GiveUp),
            (true, 1, 1, wait, Some(ms(200)), GiveUp),
        ];
        for (i, (last, delivered, attempt, ack_wait, left, expected)) in table.into_iter().enumerate() {
            assert_eq!(
                unstored(last, delivered, attempt, &B, ack_wait, left),
                expected,
                "row {i}"
            );
        }
    }

    #[test]
    fn publish_errors_are_classified_by_kind() {
        assert_eq!(publish_class(PublishErrorKind::TimedOut), Class::Transient);
        assert_eq!(publish_class(PublishErrorKind::StreamNotFound), Class::Transient);
        assert_eq!(publish_class(PublishErrorKind::BrokenPipe), Class::Transient);
        assert_eq!(
            publish_class(PublishErrorKind::MaxPayloadExceeded),
            Class::Permanent
        );
    }

    #[test]
    fn database_failures() {
        let io = Failure::Store(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(io.class(), Class::Transient);
        assert!(io.database_unreachable());
        let bad = Failure::Store(sqlx::Error::RowNotFound);
        assert_eq!(bad.class(), Class::Permanent);
        assert!(!bad.database_unreachable());
        let batch = Failure::Batch(Arc::new(sqlx::Error::PoolTimedOut));
        assert_eq!(batch.class(), Class::Transient);
        assert!(batch.database_unreachable());
        let batch_bad = Failure::Batch(Arc::new(sqlx::Error::RowNotFound));
        assert_eq!(batch_bad.class(), Class::Permanent);
        assert!(!batch_bad.database_unreachable());
    }
}
