//! Readers of the fields the decoders share: ids, dates, times, numbers, vendors. Each error
//! names the field, never its content.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};

use super::{to_micros, Clock, SchemaError};

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
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_) => {
            Err(SchemaError::NotObject("body"))
        }
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
