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

/// One JSON value as the field readers see it, whether it comes from a `serde_json::Value` tree
/// (Oura webhooks, kept whole) or from the typed reading of a core event (`core_event.rs`): absent
/// and `null` are the same, strings and numbers carry their content, anything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    Missing,
    Str(&'a str),
    Num(f64),
    /// A boolean, an array or an object.
    Other,
}

impl<'a> Scalar<'a> {
    pub(crate) fn of(value: Option<&'a Value>) -> Scalar<'a> {
        match value {
            None | Some(Value::Null) => Scalar::Missing,
            Some(Value::String(s)) => Scalar::Str(s),
            // Always `Some` without serde_json's `arbitrary_precision`; NaN would be refused.
            Some(Value::Number(n)) => Scalar::Num(n.as_f64().unwrap_or(f64::NAN)),
            Some(Value::Bool(_) | Value::Array(_) | Value::Object(_)) => Scalar::Other,
        }
    }
}

/// A field that must be a JSON object when present, over an object type `T` (a `serde_json`
/// map, or a typed record).
#[derive(Debug)]
pub(crate) enum Member<'a, T> {
    Missing,
    Object(&'a T),
    NotObject,
}

impl<'a> Member<'a, Map<String, Value>> {
    pub(crate) fn of(value: Option<&'a Value>) -> Self {
        match value {
            None | Some(Value::Null) => Member::Missing,
            Some(Value::Object(o)) => Member::Object(o),
            Some(_) => Member::NotObject,
        }
    }
}

/// The optional top-level `eventId`: a string when present.
pub(crate) fn event_id(value: Scalar<'_>) -> Result<Option<String>, SchemaError> {
    match value {
        Scalar::Missing => Ok(None),
        // It names the event's announcements (a `Nats-Msg-Id` header value): header-safe and
        // bounded, or the event is refused.
        Scalar::Str(s) if s.chars().any(char::is_control) => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "must not contain control characters",
        }),
        Scalar::Str(s) if s.len() > MAX_EVENT_ID_BYTES => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "longer than 256 bytes",
        }),
        Scalar::Str(s) => Ok(Some(s.to_owned())),
        Scalar::Num(_) | Scalar::Other => Err(SchemaError::Invalid {
            field: "eventId",
            reason: "must be a string",
        }),
    }
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, SchemaError> {
    match super::parse_json(body).map_err(SchemaError::Json)? {
        Value::Object(map) => Ok(map),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_) => {
            Err(SchemaError::NotObject("body"))
        }
    }
}

pub(crate) fn object<'a, T>(value: Member<'a, T>, field: &'static str) -> Result<&'a T, SchemaError> {
    match value {
        Member::Missing => Err(SchemaError::Missing(field)),
        Member::Object(o) => Ok(o),
        Member::NotObject => Err(SchemaError::NotObject(field)),
    }
}

pub(crate) fn optional_object<'a, T>(
    value: Member<'a, T>,
    field: &'static str,
) -> Result<Option<&'a T>, SchemaError> {
    match value {
        Member::Missing => Ok(None),
        Member::Object(o) => Ok(Some(o)),
        Member::NotObject => Err(SchemaError::NotObject(field)),
    }
}

/// A user id: a string of 1..=128 characters, not blank, without NUL (PostgreSQL `text` cannot
/// hold U+0000: the insert would fail with SQLSTATE 22021, a non-retryable error found only after
/// the batch was written and unrolled).
pub(crate) fn user_id(value: Scalar<'_>, field: &'static str) -> Result<String, SchemaError> {
    match value {
        Scalar::Missing => Err(SchemaError::Missing(field)),
        Scalar::Str(s) => {
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
                Ok(s.to_owned())
            }
        }
        Scalar::Num(_) | Scalar::Other => Err(SchemaError::Invalid {
            field,
            reason: "must be a string",
        }),
    }
}

/// A calendar date written exactly as `YYYY-MM-DD`.
pub(crate) fn date(value: Scalar<'_>, field: &'static str) -> Result<NaiveDate, SchemaError> {
    let s = match value {
        Scalar::Missing => return Err(SchemaError::Missing(field)),
        Scalar::Str(s) => s,
        Scalar::Num(_) | Scalar::Other => {
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
    value: Scalar<'_>,
    field: &'static str,
    clock: Clock,
) -> Result<Option<DateTime<Utc>>, SchemaError> {
    match value {
        Scalar::Missing => Ok(None),
        Scalar::Str(s) => {
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
        Scalar::Num(_) | Scalar::Other => Err(SchemaError::Invalid {
            field,
            reason: "must be an RFC 3339 timestamp string",
        }),
    }
}

/// An optional finite number. JSON strings are not numbers, so "NaN" and "Infinity" fail here.
pub(crate) fn number(value: Scalar<'_>, field: &'static str) -> Result<Option<f64>, SchemaError> {
    match value {
        Scalar::Missing => Ok(None),
        Scalar::Num(f) if f.is_finite() => Ok(Some(f)),
        Scalar::Num(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be a finite number",
        }),
        Scalar::Str(_) | Scalar::Other => Err(SchemaError::Invalid {
            field,
            reason: "must be a number",
        }),
    }
}

/// `raw.source` mapped to a vendor; `None` when absent (or `raw` is), so a stored vendor is not
/// erased.
pub(crate) fn vendor(source: Scalar<'_>) -> Option<Vendor> {
    match source {
        Scalar::Str(s) => Some(Vendor::from_source(s)),
        Scalar::Missing => None,
        Scalar::Num(_) | Scalar::Other => Some(Vendor::Unknown),
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
