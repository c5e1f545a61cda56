//! The normalized-stored events: a stored row ([`StoredRow`], as the store returns it) rendered
//! as the event that announces it ([`Normalized`]). An event always describes the row as stored
//! (every field, whichever event gave it), with the row's version; each event type's file
//! renders its own rows.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Number;

use super::hrv::HrvRow;
use super::sleep::SleepRow;

/// A normalized event to publish once the transaction that stored its row has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    pub subject: &'static str,
    /// Its `Nats-Msg-Id`: the identity of the event that made the change, the row's type and
    /// version (docs/CONTRACT.md), so a repeated announcement of one change is dropped.
    pub id: String,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// What a stored row type says of itself in its announcements (each event type's file
/// implements it for its row).
pub trait NormalizedRow {
    /// The normalized-stored subject.
    const SUBJECT: &'static str;
    /// The row's type as named in event ids.
    const NAME: &'static str;
    fn version(&self) -> i64;
    /// The normalized-stored body: the row as stored, with its version.
    fn body(&self) -> Vec<u8>;
}

/// A row of a normalized table, as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredRow {
    Hrv(HrvRow),
    Sleep(SleepRow),
}

impl StoredRow {
    /// The normalized-stored subject.
    pub fn subject(&self) -> &'static str {
        match self {
            StoredRow::Hrv(_) => HrvRow::SUBJECT,
            StoredRow::Sleep(_) => SleepRow::SUBJECT,
        }
    }

    /// The row's type as named in event ids.
    pub fn name(&self) -> &'static str {
        match self {
            StoredRow::Hrv(_) => HrvRow::NAME,
            StoredRow::Sleep(_) => SleepRow::NAME,
        }
    }

    pub fn version(&self) -> i64 {
        match self {
            StoredRow::Hrv(r) => r.version,
            StoredRow::Sleep(r) => r.version,
        }
    }

    /// The normalized-stored body: the row as stored, with its version.
    pub fn body(&self) -> Vec<u8> {
        match self {
            StoredRow::Hrv(r) => r.body(),
            StoredRow::Sleep(r) => r.body(),
        }
    }

    /// The event announcing this row, on behalf of the event whose identity is given (the one
    /// that made the change): its id is that identity, the row's type and its version.
    pub fn announcement(&self, identity: &str) -> Normalized {
        Normalized {
            subject: self.subject(),
            id: format!("{identity}:{}:v{}", self.name(), self.version()),
            body: self.body(),
        }
    }
}

/// Serializes anything `Display` as a JSON string, without an intermediate `String`.
pub(crate) struct AsStr<T>(pub T);

impl<T: std::fmt::Display> serde::Serialize for AsStr<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// `{"record": …}`, the shape of every normalized-stored event.
#[derive(serde::Serialize)]
struct Announcement<R> {
    record: R,
}

/// Serializes a normalized-stored body. The bodies are plain structs of strings and finite
/// numbers, which always serialize; the fallback is only there so no path can panic.
pub(crate) fn to_json<R: serde::Serialize>(record: R) -> Vec<u8> {
    serde_json::to_vec(&Announcement { record }).unwrap_or_else(|_| b"{}".to_vec())
}

/// Times are stored in microseconds; published with milliseconds when that is exact (as they
/// always were), else with microseconds.
pub(crate) fn rfc3339(at: DateTime<Utc>) -> String {
    let format = if at.timestamp_subsec_micros() % 1000 == 0 {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Micros
    };
    at.to_rfc3339_opts(format, true)
}

/// A score as an integer when it is one, so `85` stays `85`, not `85.0`.
pub(crate) fn score_json(v: f64) -> Number {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Number::from(v as i64)
    } else {
        Number::from_f64(v).unwrap_or_else(|| Number::from(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_named_by_identity_type_and_version() {
        let row = StoredRow::Sleep(SleepRow {
            user_id: "u".into(),
            date: chrono::NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            duration_minutes: 400,
            quality_score: None,
            vendor: "unknown".into(),
            captured_at: DateTime::from_timestamp(1_740_800_000, 0).unwrap(),
            version: 3,
        });
        let n = row.announcement("ingest-1");
        assert_eq!(n.subject, "athlete-ally.sleep.normalized-stored");
        assert_eq!(n.id, "ingest-1:sleep:v3");
        assert_eq!(n.body, row.body());
    }
}
