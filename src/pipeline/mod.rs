//! Decoding, validation and normalization of raw events, and the normalized-stored events of
//! their rows: pure functions, no I/O.
//!
//! One file per event type: its decoding, its stored row as announced (subject and body), and a
//! sample event for the migration probe. [`decode`] is the single entry point the consumer loop
//! calls; it turns bytes into a typed [`Decoded`] value or a [`SchemaError`] that says which field
//! is wrong (never echoing its content, which may be personal data).

mod core_event;
mod fields;
pub mod hrv;
pub mod normalized;
pub mod oura;
pub mod sleep;
mod tree;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;

use crate::config::ConsumerKind;

pub use hrv::{HrvRecord, HrvRow};
pub use normalized::{Normalized, NormalizedRow, StoredRow};
pub use oura::{InvalidSection, OuraWebhook};
pub use sleep::{SleepRecord, SleepRow};
pub use tree::parse_json;

pub(crate) use fields::{
    clamp_score, date, event_id, minutes, number, object, optional_object, parse_object, timestamp, user_id,
    vendor, Member, Scalar,
};
pub use fields::{parse_date, Vendor, MAX_EVENT_ID_BYTES};

/// Why a message can never be processed, whatever the number of retries.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("payload of {size} bytes exceeds MAX_PAYLOAD_BYTES ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("body is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{0} is not a JSON object")]
    NotObject(&'static str),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid field {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// A decoded, validated, normalized event, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Hrv(HrvRecord),
    Sleep(SleepRecord),
    Oura(OuraWebhook),
}

impl Decoded {
    /// The event's identity (docs/CONTRACT.md), the stem of its normalized events' ids: a
    /// webhook's idempotency key; for another event its publisher's id (`msg_id`), else its own
    /// `eventId`, else `position` (where it was first stored).
    pub fn identity<'a>(&'a self, msg_id: Option<&'a str>, position: &'a str) -> &'a str {
        let event_id = match self {
            Decoded::Oura(w) => return &w.idempotency_key,
            Decoded::Hrv(r) => r.event_id.as_deref(),
            Decoded::Sleep(r) => r.event_id.as_deref(),
        };
        let usable = |id: &&str| !id.trim().is_empty();
        msg_id
            .filter(usable)
            .or(event_id.filter(usable))
            .unwrap_or(position)
    }
}

/// A core event for the migration probe: `{"eventId", "payload": {"userId", "date",
/// "capturedAt", "raw": {"source": "probe"}, <measure>}}`, of `user_id` captured `at`.
fn probe_core_event(event_id: &str, user_id: &str, at: DateTime<Utc>, measure: (&str, Value)) -> Value {
    let mut payload = serde_json::json!({
        "userId": user_id,
        "date": at.format("%Y-%m-%d").to_string(),
        "capturedAt": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "raw": {"source": "probe"},
    });
    if let Value::Object(fields) = &mut payload {
        fields.insert(measure.0.to_string(), measure.1);
    }
    serde_json::json!({"eventId": event_id, "payload": payload})
}

/// What the decoder may know about the message besides its body.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The event's identity as a message id (the publisher's `Nats-Msg-Id`; for a DLQ replay the
    /// first publisher's, see [`crate::dlq::idempotency_msg_id`]), if any.
    pub msg_id: Option<&'a str>,
    /// The raw message's JetStream timestamp — for a replay, the first publish's
    /// ([`crate::dlq::event_origin`]). The only default time an event may take: it is the same
    /// on every redelivery and replay, so the stored row does not depend on when it is processed.
    pub stable_time: DateTime<Utc>,
    /// Processing time: only the upper bound of accepted event times (`now + max_future_skew`),
    /// never a stored value.
    pub now: DateTime<Utc>,
    /// `MAX_FUTURE_SKEW_MS`: an event time further than this ahead of `now` is schema-invalid
    /// (it would win every comparison for its row key for as long as it stays in the future).
    pub max_future_skew: chrono::Duration,
    pub max_payload_bytes: usize,
}

impl Envelope<'_> {
    fn clock(&self) -> Clock {
        Clock {
            latest: self.now.checked_add_signed(self.max_future_skew),
        }
    }
}

/// The bounds an event time must respect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// The latest accepted event time; `None` when `now + skew` is beyond chrono's range.
    latest: Option<DateTime<Utc>>,
}

/// Truncates to whole microseconds, the precision of PostgreSQL's `timestamptz`: a time compared
/// in memory (within a batch) and the same time read back from the table must be equal. A leap
/// second (`…:59:60.5`, which RFC 3339 allows) becomes the next second's `.5`, as PostgreSQL
/// stores it: chrono would order it before `…:00:00.0` and the table after, so the newest event of
/// a batch and of the table could differ.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let t = t.trunc_subsecs(6);
    match t.timestamp_subsec_nanos().checked_sub(1_000_000_000) {
        Some(nanos) => DateTime::from_timestamp(t.timestamp().saturating_add(1), nanos).unwrap_or(t),
        None => t,
    }
}

/// Decodes one raw message of the given consumer kind. Never panics, whatever the bytes.
pub fn decode(kind: ConsumerKind, body: &[u8], env: Envelope<'_>) -> Result<Decoded, SchemaError> {
    if body.len() > env.max_payload_bytes {
        return Err(SchemaError::TooLarge {
            size: body.len(),
            max: env.max_payload_bytes,
        });
    }
    match kind {
        ConsumerKind::Hrv => hrv::decode(body, env.clock()).map(Decoded::Hrv),
        ConsumerKind::Sleep => {
            let clock = env.clock();
            if clock.latest.is_some_and(|latest| env.stable_time > latest) {
                // Only a forged replay header can put the first publish in the future.
                return Err(SchemaError::Invalid {
                    field: "Replay-Original-Timestamp",
                    reason: "is further in the future than MAX_FUTURE_SKEW_MS allows",
                });
            }
            sleep::decode(body, to_micros(env.stable_time), clock).map(Decoded::Sleep)
        }
        ConsumerKind::Oura => oura::decode(body, env.msg_id, env.clock()).map(Decoded::Oura),
    }
}

/// The identity of the migration probe's event of `kind` for `user_id` at `at`: its
/// `Nats-Msg-Id`, and its `eventId` when the event type has one.
pub fn probe_msg_id(kind: ConsumerKind, user_id: &str, at: DateTime<Utc>) -> String {
    format!(
        "{user_id}:{kind}:{}",
        at.timestamp_nanos_opt().unwrap_or_default()
    )
}

/// A valid raw event of `kind` for the migration probe: `user_id`'s, captured (or sent) `at`,
/// identified by [`probe_msg_id`].
pub fn probe_event(kind: ConsumerKind, user_id: &str, at: DateTime<Utc>) -> Value {
    let id = probe_msg_id(kind, user_id, at);
    match kind {
        ConsumerKind::Hrv => hrv::probe_event(&id, user_id, at),
        ConsumerKind::Sleep => sleep::probe_event(&id, user_id, at),
        ConsumerKind::Oura => oura::probe_event(user_id, at),
    }
}

/// A [`SchemaError`] without its `serde_json` cause, comparable in tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    TooLarge {
        size: usize,
        max: usize,
    },
    Json,
    NotObject(&'static str),
    Missing(&'static str),
    /// Field, reason.
    Invalid(&'static str, &'static str),
}

#[cfg(test)]
impl Shape {
    pub(crate) fn of(e: &SchemaError) -> Shape {
        match e {
            SchemaError::TooLarge { size, max } => Shape::TooLarge {
                size: *size,
                max: *max,
            },
            SchemaError::Json(_) => Shape::Json,
            SchemaError::NotObject(f) => Shape::NotObject(f),
            SchemaError::Missing(f) => Shape::Missing(f),
            SchemaError::Invalid { field, reason } => Shape::Invalid(field, reason),
        }
    }
}

/// A fixed clock for unit tests: stable time 2025-03-02T11:00:00Z, now 2025-03-02T12:00:00Z,
/// a 24 h skew, the default payload limit.
#[cfg(test)]
pub(crate) fn test_envelope() -> Envelope<'static> {
    let at = |s: &str| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    };
    Envelope {
        msg_id: None,
        stable_time: at("2025-03-02T11:00:00.123456789Z"),
        now: at("2025-03-02T12:00:00Z"),
        max_future_skew: chrono::Duration::hours(24),
        max_payload_bytes: 1024 * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let env = Envelope {
            max_payload_bytes: 4,
            ..test_envelope()
        };
        let e = decode(ConsumerKind::Hrv, b"{\"a\":1}", env).unwrap_err();
        assert_eq!(Shape::of(&e), Shape::TooLarge { size: 7, max: 4 });
    }

    fn hrv_at(captured_at: &str) -> String {
        format!(
            r#"{{"payload":{{"userId":"u","date":"2025-03-01","rMSSD":40,"capturedAt":"{captured_at}"}}}}"#
        )
    }

    fn sleep_at(captured_at: &str) -> String {
        format!(
            r#"{{"payload":{{"userId":"u","date":"2025-03-01","durationMinutes":400,"capturedAt":"{captured_at}"}}}}"#
        )
    }

    fn captured_at(d: &Decoded) -> DateTime<Utc> {
        match d {
            Decoded::Hrv(r) => r.captured_at,
            Decoded::Sleep(r) => r.captured_at,
            Decoded::Oura(w) => w.timestamp.unwrap_or_default(),
        }
    }

    #[test]
    fn event_times_are_truncated_to_microseconds() {
        let env = test_envelope();
        for (given, stored) in [
            ("2025-03-01T06:00:00.123456789Z", "2025-03-01T06:00:00.123456Z"),
            ("2025-03-01T06:00:00.9999999+02:00", "2025-03-01T04:00:00.999999Z"),
            ("2025-03-01T06:00:00.0000009Z", "2025-03-01T06:00:00Z"),
            ("2025-03-01T06:00:00.5Z", "2025-03-01T06:00:00.500Z"),
            // A leap second is the next second, as PostgreSQL stores it.
            ("2025-03-01T06:59:60.9Z", "2025-03-01T07:00:00.900Z"),
            ("2025-03-01T06:59:60Z", "2025-03-01T07:00:00Z"),
            ("2025-03-01T08:59:60.25+02:00", "2025-03-01T07:00:00.250Z"),
        ] {
            for (kind, body) in [
                (ConsumerKind::Hrv, hrv_at(given)),
                (ConsumerKind::Sleep, sleep_at(given)),
            ] {
                let t = captured_at(&decode(kind, body.as_bytes(), env).unwrap());
                assert_eq!(
                    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    stored,
                    "{kind} {given}"
                );
                assert_eq!(t.timestamp_subsec_nanos() % 1000, 0);
                assert!(t.timestamp_subsec_nanos() < 1_000_000_000, "no leap second kept");
            }
        }
        // Ordered as the table orders it: a leap second after the second before the next.
        let leap = to_micros(
            DateTime::parse_from_rfc3339("2025-03-01T06:59:60.9Z")
                .unwrap()
                .into(),
        );
        let after = to_micros(
            DateTime::parse_from_rfc3339("2025-03-01T07:00:00.5Z")
                .unwrap()
                .into(),
        );
        assert!(leap > after);
    }

    #[test]
    fn event_times_beyond_the_future_skew_are_schema_invalid() {
        let env = test_envelope(); // now 2025-03-02T12:00:00Z, skew 24 h
        type Body = fn(&str) -> String;
        for (kind, body) in [
            (ConsumerKind::Hrv, hrv_at as Body),
            (ConsumerKind::Sleep, sleep_at),
        ] {
            // Exactly at the bound (and sub-µs digits past it, truncated away) is accepted.
            for ok in [
                "2025-03-03T12:00:00Z",
                "2025-03-03T12:00:00.0000009Z",
                "2025-03-03T13:00:00+01:00",
            ] {
                assert!(decode(kind, body(ok).as_bytes(), env).is_ok(), "{kind} {ok}");
            }
            for bad in [
                "2025-03-03T12:00:00.000001Z",
                "2030-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
            ] {
                let e = decode(kind, body(bad).as_bytes(), env).unwrap_err();
                assert_eq!(
                    Shape::of(&e),
                    Shape::Invalid(
                        "payload.capturedAt",
                        "is further in the future than MAX_FUTURE_SKEW_MS allows"
                    ),
                    "{kind} {bad}"
                );
            }
        }
        // A smaller skew moves the bound; the past is never bounded.
        let tight = Envelope {
            max_future_skew: chrono::Duration::milliseconds(1),
            ..env
        };
        assert!(decode(
            ConsumerKind::Hrv,
            hrv_at("2025-03-02T12:00:00.001Z").as_bytes(),
            tight
        )
        .is_ok());
        assert!(decode(
            ConsumerKind::Hrv,
            hrv_at("2025-03-02T12:00:00.002Z").as_bytes(),
            tight
        )
        .is_err());
        assert!(decode(
            ConsumerKind::Hrv,
            hrv_at("1970-01-01T00:00:00Z").as_bytes(),
            tight
        )
        .is_ok());
    }

    #[test]
    fn nul_in_a_user_id_is_schema_invalid() {
        let env = test_envelope();
        let nul = "must not contain NUL (U+0000)";
        for (kind, body, field) in [
            (
                ConsumerKind::Hrv,
                r#"{"payload":{"userId":"u\u0000","date":"2025-03-01","rMSSD":40,"capturedAt":"2025-03-01T00:00:00Z"}}"#,
                "payload.userId",
            ),
            (
                ConsumerKind::Sleep,
                r#"{"payload":{"userId":"\u0000","date":"2025-03-01","durationMinutes":400}}"#,
                "payload.userId",
            ),
            (ConsumerKind::Oura, r#"{"user_id":"a\u0000b"}"#, "user_id"),
        ] {
            let e = decode(kind, body.as_bytes(), env).unwrap_err();
            assert_eq!(Shape::of(&e), Shape::Invalid(field, nul), "{kind}");
        }
    }

    #[test]
    fn every_kind_has_a_valid_probe_event() {
        let env = test_envelope();
        for kind in ConsumerKind::ALL {
            let id = probe_msg_id(kind, "migration-probe", env.now);
            assert_eq!(id, format!("migration-probe:{kind}:1740916800000000000"));
            let body = probe_event(kind, "migration-probe", env.now).to_string();
            let envelope = Envelope {
                msg_id: Some(&id),
                ..env
            };
            let decoded = decode(kind, body.as_bytes(), envelope).unwrap();
            let own_id = match &decoded {
                Decoded::Hrv(r) => r.event_id.as_deref(),
                Decoded::Sleep(r) => r.event_id.as_deref(),
                Decoded::Oura(w) => Some(w.idempotency_key.as_str()),
            };
            assert_eq!(own_id, Some(id.as_str()), "{kind}");
        }
    }
}
