//! Decoding, validation and normalization of raw events: pure functions, no I/O.
//!
//! One file per event type. [`decode`] is the single entry point the consumer loop calls; it
//! turns bytes into a typed [`Decoded`] value or a [`SchemaError`] that says which field is wrong
//! (never echoing its content, which may be personal data).

pub mod hrv;
pub mod oura;
pub mod sleep;

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use serde_json::{Map, Value};

use crate::config::ConsumerKind;

/// Serializes anything `Display` as a JSON string, without an intermediate `String`.
pub(crate) struct AsStr<T>(pub T);

impl<T: std::fmt::Display> serde::Serialize for AsStr<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// `{"record": …}`, the shape of every normalized-stored event.
#[derive(serde::Serialize)]
pub(crate) struct Announcement<R> {
    pub record: R,
}

/// Serializes a normalized-stored body. The bodies are plain structs of strings and finite
/// numbers, which always serialize; the fallback is only there so no path can panic.
pub(crate) fn to_json<R: serde::Serialize>(record: R) -> Vec<u8> {
    serde_json::to_vec(&Announcement { record }).unwrap_or_else(|_| b"{}".to_vec())
}

pub use hrv::HrvRecord;
pub use oura::{InvalidSection, OuraWebhook};
pub use sleep::SleepRecord;

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
/// in memory (within a batch) and the same time read back from the table must be equal.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
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

/// The vendor label stored and published: a bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Oura,
    Whoop,
    Unknown,
}

impl Vendor {
    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Oura => "oura",
            Vendor::Whoop => "whoop",
            Vendor::Unknown => "unknown",
        }
    }

    /// `raw.source`, trimmed and lower-cased, mapped to `oura|whoop|unknown`.
    pub fn from_source(source: &str) -> Vendor {
        match source.trim().to_ascii_lowercase().as_str() {
            "oura" => Vendor::Oura,
            "whoop" => Vendor::Whoop,
            _ => Vendor::Unknown,
        }
    }
}

/// The longest `eventId` accepted.
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// The optional top-level `eventId`: a string when present.
pub(crate) fn event_id(root: &Map<String, Value>) -> Result<Option<String>, SchemaError> {
    match root.get("eventId") {
        None | Some(Value::Null) => Ok(None),
        // It names the event's announcements (a `Nats-Msg-Id` header value): header-safe and
        // bounded, or the event is refused.
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "must not contain control characters",
        }),
        Some(Value::String(s)) if s.len() > MAX_EVENT_ID_BYTES => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "longer than 256 bytes",
        }),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "must be a string",
        }),
    }
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, SchemaError> {
    match serde_json::from_slice::<Value>(body).map_err(SchemaError::Json)? {
        Value::Object(map) => Ok(map),
        _ => Err(SchemaError::NotObject("body")),
    }
}

pub(crate) fn object<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<&'a Map<String, Value>, SchemaError> {
    match map.get(key) {
        None | Some(Value::Null) => Err(SchemaError::Missing(field)),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(SchemaError::NotObject(field)),
    }
}

pub(crate) fn optional_object<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a Map<String, Value>>, SchemaError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(SchemaError::NotObject(field)),
    }
}

/// A user id: a string of 1..=128 characters, not blank, without NUL (PostgreSQL `text` cannot
/// hold U+0000: the insert would fail with SQLSTATE 22021, a non-retryable error found only after
/// the batch was written and unrolled).
pub(crate) fn user_id(
    map: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<String, SchemaError> {
    match map.get(key) {
        None | Some(Value::Null) => Err(SchemaError::Missing(field)),
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                Err(SchemaError::Invalid {
                    field,
                    reason: "must not be empty",
                })
            } else if s.contains('\0') {
                Err(SchemaError::Invalid {
                    field,
                    reason: "must not contain NUL (U+0000)",
                })
            } else if s.chars().count() > 128 {
                Err(SchemaError::Invalid {
                    field,
                    reason: "longer than 128 characters",
                })
            } else {
                Ok(s.clone())
            }
        }
        Some(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be a string",
        }),
    }
}

/// A calendar date written exactly as `YYYY-MM-DD`.
pub(crate) fn date(
    map: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<NaiveDate, SchemaError> {
    let s = match map.get(key) {
        None | Some(Value::Null) => return Err(SchemaError::Missing(field)),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(SchemaError::Invalid {
                field,
                reason: "must be a YYYY-MM-DD string",
            })
        }
    };
    parse_date(s).ok_or(SchemaError::Invalid {
        field,
        reason: "must be a real calendar date written YYYY-MM-DD",
    })
}

pub fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// An event time: an RFC 3339 timestamp with an explicit offset, normalized to UTC, truncated to
/// microseconds ([`to_micros`]), and not further in the future than the clock allows.
pub(crate) fn timestamp(
    value: Option<&Value>,
    field: &'static str,
    clock: Clock,
) -> Result<Option<DateTime<Utc>>, SchemaError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = DateTime::parse_from_rfc3339(s.trim())
                .map(|t| to_micros(t.with_timezone(&Utc)))
                .map_err(|_| SchemaError::Invalid {
                    field,
                    reason: "must be an RFC 3339 timestamp with offset",
                })?;
            if clock.latest.is_some_and(|latest| t > latest) {
                return Err(SchemaError::Invalid {
                    field,
                    reason: "is further in the future than MAX_FUTURE_SKEW_MS allows",
                });
            }
            Ok(Some(t))
        }
        Some(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be an RFC 3339 timestamp string",
        }),
    }
}

/// An optional finite number. JSON strings are not numbers, so "NaN" and "Infinity" fail here.
pub(crate) fn number(value: Option<&Value>, field: &'static str) -> Result<Option<f64>, SchemaError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(f)),
            _ => Err(SchemaError::Invalid {
                field,
                reason: "must be a finite number",
            }),
        },
        Some(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be a number",
        }),
    }
}

/// `raw.source` mapped to a vendor; `None` when absent, so a stored vendor is not erased.
pub(crate) fn vendor(raw: Option<&Map<String, Value>>) -> Option<Vendor> {
    match raw.and_then(|r| r.get("source")) {
        Some(Value::String(s)) => Some(Vendor::from_source(s)),
        Some(Value::Null) | None => None,
        Some(_) => Some(Vendor::Unknown),
    }
}

/// A 0..=100 score, clamped and rounded; `None` when absent or not a finite number.
pub(crate) fn clamp_score(v: f64) -> i32 {
    // Clamp before the cast so the conversion is exact.
    v.clamp(0.0, 100.0).round() as i32
}

/// Rounds to the nearest whole minute (half away from zero: 420.5 → 421) and bounds 0..=1440.
pub(crate) fn minutes(v: f64, field: &'static str) -> Result<i32, SchemaError> {
    if !(0.0..=1440.0).contains(&v) {
        return Err(SchemaError::Invalid {
            field,
            reason: "must be between 0 and 1440 minutes",
        });
    }
    Ok(v.round() as i32)
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
    fn dates_must_be_real_and_well_formed() {
        assert!(parse_date("2025-02-28").is_some());
        assert!(parse_date("2024-02-29").is_some());
        for bad in [
            "2025-02-30",
            "2025-2-03",
            "2025-13-01",
            "20250101",
            "2025-02-3 ",
            "",
            "२०२५-०१-०१",
        ] {
            assert!(parse_date(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn vendors_are_a_bounded_set() {
        assert_eq!(Vendor::from_source("Oura"), Vendor::Oura);
        assert_eq!(Vendor::from_source(" WHOOP "), Vendor::Whoop);
        assert_eq!(Vendor::from_source("garmin"), Vendor::Unknown);
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let env = Envelope {
            max_payload_bytes: 4,
            ..test_envelope()
        };
        assert!(matches!(
            decode(ConsumerKind::Hrv, b"{\"a\":1}", env),
            Err(SchemaError::TooLarge { size: 7, max: 4 })
        ));
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
            }
        }
    }

    #[test]
    fn event_times_beyond_the_future_skew_are_schema_invalid() {
        let env = test_envelope(); // now 2025-03-02T12:00:00Z, skew 24 h
        for kind in [ConsumerKind::Hrv, ConsumerKind::Sleep] {
            let body = |t: &str| match kind {
                ConsumerKind::Sleep => sleep_at(t),
                _ => hrv_at(t),
            };
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
                assert!(
                    matches!(
                        e,
                        SchemaError::Invalid {
                            field: "payload.capturedAt",
                            ..
                        }
                    ),
                    "{kind} {bad}: {e}"
                );
                assert!(e.to_string().contains("MAX_FUTURE_SKEW_MS"), "{e}");
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
        for (kind, body) in [
            (
                ConsumerKind::Hrv,
                r#"{"payload":{"userId":"u\u0000","date":"2025-03-01","rMSSD":40,"capturedAt":"2025-03-01T00:00:00Z"}}"#,
            ),
            (
                ConsumerKind::Sleep,
                r#"{"payload":{"userId":"\u0000","date":"2025-03-01","durationMinutes":400}}"#,
            ),
            (ConsumerKind::Oura, r#"{"user_id":"a\u0000b"}"#),
        ] {
            let e = decode(kind, body.as_bytes(), env).unwrap_err();
            assert!(matches!(e, SchemaError::Invalid { .. }), "{kind}: {e}");
            assert!(e.to_string().contains("NUL"), "{kind}: {e}");
        }
    }

    #[test]
    fn rounding_and_clamping() {
        assert_eq!(minutes(420.5, "d").unwrap(), 421);
        assert_eq!(minutes(420.4, "d").unwrap(), 420);
        assert!(minutes(1440.1, "d").is_err());
        assert!(minutes(-0.1, "d").is_err());
        assert_eq!(clamp_score(120.0), 100);
        assert_eq!(clamp_score(-3.0), 0);
        assert_eq!(clamp_score(82.5), 83);
    }
}
