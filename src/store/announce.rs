//! The rows as the upsert returns them, and the normalized-stored events that describe them.
//! A normalized event always describes the row as stored (every field, whichever event gave
//! it), with the row's version.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Number;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::{HRV_NORMALIZED_SUBJECT, SLEEP_NORMALIZED_SUBJECT};
use crate::pipeline::{to_json, AsStr, HrvRecord, SleepRecord};

/// An optional field's source columns (`<prefix>_at`, `_stream`, `_seq`), when set.
type Source = Option<(DateTime<Utc>, String, i64)>;

fn source(row: &PgRow, prefix: &str) -> Result<Source, sqlx::Error> {
    let at: Option<DateTime<Utc>> = row.try_get(format!("{prefix}_at").as_str())?;
    let stream: Option<String> = row.try_get(format!("{prefix}_stream").as_str())?;
    let seq: Option<i64> = row.try_get(format!("{prefix}_seq").as_str())?;
    Ok(at.map(|at| (at, stream.unwrap_or_default(), seq.unwrap_or_default())))
}

fn borrowed(s: &Source) -> Option<(DateTime<Utc>, &str, i64)> {
    s.as_ref().map(|(at, stream, seq)| (*at, stream.as_str(), *seq))
}

/// Times are stored in microseconds; published with milliseconds when that is exact (as they
/// always were), else with microseconds.
fn rfc3339(at: DateTime<Utc>) -> String {
    let format = if at.timestamp_subsec_micros() % 1000 == 0 {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Micros
    };
    at.to_rfc3339_opts(format, true)
}

/// A score as an integer when it is one, so `85` stays `85`, not `85.0`.
fn score_json(v: f64) -> Number {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Number::from(v as i64)
    } else {
        Number::from_f64(v).unwrap_or_else(|| Number::from(0))
    }
}

/// A row as the upsert returns it, ready to be announced.
pub trait StoredRow: Sized {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error>;
    fn key(&self) -> (&str, NaiveDate);
    /// The order key of the event its required fields came from.
    fn order(&self) -> (DateTime<Utc>, &str, i64);
    /// The order keys of the events its optional fields came from (`None`: never carried).
    fn optional_sources(&self) -> Vec<Option<(DateTime<Utc>, &str, i64)>>;
    /// Whether the event with this order key gave the row any of its fields.
    fn holds(&self, key: (DateTime<Utc>, &str, i64)) -> bool {
        self.order() == key || self.optional_sources().contains(&Some(key))
    }
    /// Changed by the statement that returned it (not bookkeeping only).
    fn changed(&self) -> bool;
    fn version(&self) -> i64;
    /// The normalized-stored subject and the kind named in ids.
    fn subject(&self) -> (&'static str, &'static str);
    /// The normalized-stored body: the row as stored, with its version.
    fn body(&self) -> Vec<u8>;
}

pub struct HrvRow {
    user_id: String,
    date: NaiveDate,
    rmssd: f64,
    ln_rmssd: f64,
    readiness_score: f64,
    vendor: String,
    captured_at: DateTime<Utc>,
    source_stream: String,
    source_seq: i64,
    vendor_source: Source,
    version: i64,
    changed: bool,
}

/// The record of an `athlete-ally.hrv.normalized-stored` event (keys in alphabetical order).
#[derive(Serialize)]
struct HrvStored<'a> {
    #[serde(rename = "capturedAt")]
    captured_at: String,
    date: AsStr<NaiveDate>,
    #[serde(rename = "lnRMSSD")]
    ln_rmssd: f64,
    #[serde(rename = "rMSSD")]
    rmssd: f64,
    #[serde(rename = "readinessScore")]
    readiness_score: Number,
    #[serde(rename = "userId")]
    user_id: &'a str,
    vendor: &'a str,
    version: i64,
}

impl HrvRow {
    /// The row one record would make on its own (for checks of the announcement's format).
    pub fn of(r: &HrvRecord, vendor: &str, version: i64) -> HrvRow {
        HrvRow {
            user_id: r.user_id.clone(),
            date: r.date,
            rmssd: r.rmssd,
            ln_rmssd: r.ln_rmssd,
            readiness_score: r.readiness_score,
            vendor: vendor.to_string(),
            captured_at: r.captured_at,
            source_stream: String::new(),
            source_seq: 0,
            vendor_source: None,
            version,
            changed: true,
        }
    }
}

impl StoredRow for HrvRow {
    fn from_row(row: &PgRow) -> Result<HrvRow, sqlx::Error> {
        Ok(HrvRow {
            user_id: row.try_get("user_id")?,
            date: row.try_get("date")?,
            rmssd: row.try_get("rmssd")?,
            ln_rmssd: row.try_get("ln_rmssd")?,
            readiness_score: row.try_get("readiness_score")?,
            vendor: row.try_get("vendor")?,
            captured_at: row.try_get("captured_at")?,
            source_stream: row
                .try_get::<Option<String>, _>("source_stream")?
                .unwrap_or_default(),
            source_seq: row.try_get::<Option<i64>, _>("source_seq")?.unwrap_or_default(),
            vendor_source: source(row, "vendor")?,
            version: row.try_get("version")?,
            changed: row.try_get::<Option<bool>, _>("changed")?.unwrap_or(false),
        })
    }

    fn key(&self) -> (&str, NaiveDate) {
        (self.user_id.as_str(), self.date)
    }

    fn order(&self) -> (DateTime<Utc>, &str, i64) {
        (self.captured_at, self.source_stream.as_str(), self.source_seq)
    }

    fn optional_sources(&self) -> Vec<Option<(DateTime<Utc>, &str, i64)>> {
        vec![borrowed(&self.vendor_source)]
    }

    fn changed(&self) -> bool {
        self.changed
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn subject(&self) -> (&'static str, &'static str) {
        (HRV_NORMALIZED_SUBJECT, "hrv")
    }

    fn body(&self) -> Vec<u8> {
        to_json(HrvStored {
            captured_at: rfc3339(self.captured_at),
            date: AsStr(self.date),
            ln_rmssd: self.ln_rmssd,
            rmssd: self.rmssd,
            readiness_score: score_json(self.readiness_score),
            user_id: &self.user_id,
            vendor: &self.vendor,
            version: self.version,
        })
    }
}

pub struct SleepRow {
    user_id: String,
    date: NaiveDate,
    duration_minutes: i32,
    quality_score: Option<i32>,
    vendor: String,
    captured_at: DateTime<Utc>,
    source_stream: String,
    source_seq: i64,
    vendor_source: Source,
    quality_source: Source,
    version: i64,
    changed: bool,
}

/// The record of an `athlete-ally.sleep.normalized-stored` event (keys in alphabetical order;
/// `qualityScore` only when one is stored).
#[derive(Serialize)]
struct SleepStored<'a> {
    #[serde(rename = "capturedAt")]
    captured_at: String,
    date: AsStr<NaiveDate>,
    #[serde(rename = "durationMinutes")]
    duration_minutes: i32,
    #[serde(rename = "qualityScore", skip_serializing_if = "Option::is_none")]
    quality_score: Option<i32>,
    #[serde(rename = "userId")]
    user_id: &'a str,
    vendor: &'a str,
    version: i64,
}

impl SleepRow {
    /// The row one record would make on its own (for checks of the announcement's format).
    pub fn of(r: &SleepRecord, vendor: &str, version: i64) -> SleepRow {
        SleepRow {
            user_id: r.user_id.clone(),
            date: r.date,
            duration_minutes: r.duration_minutes,
            quality_score: r.quality_score,
            vendor: vendor.to_string(),
            captured_at: r.captured_at,
            source_stream: String::new(),
            source_seq: 0,
            vendor_source: None,
            quality_source: None,
            version,
            changed: true,
        }
    }
}

impl StoredRow for SleepRow {
    fn from_row(row: &PgRow) -> Result<SleepRow, sqlx::Error> {
        Ok(SleepRow {
            user_id: row.try_get("user_id")?,
            date: row.try_get("date")?,
            duration_minutes: row.try_get("duration_minutes")?,
            quality_score: row.try_get("quality_score")?,
            vendor: row.try_get("vendor")?,
            captured_at: row.try_get("captured_at")?,
            source_stream: row
                .try_get::<Option<String>, _>("source_stream")?
                .unwrap_or_default(),
            source_seq: row.try_get::<Option<i64>, _>("source_seq")?.unwrap_or_default(),
            vendor_source: source(row, "vendor")?,
            quality_source: source(row, "quality")?,
            version: row.try_get("version")?,
            changed: row.try_get::<Option<bool>, _>("changed")?.unwrap_or(false),
        })
    }

    fn key(&self) -> (&str, NaiveDate) {
        (self.user_id.as_str(), self.date)
    }

    fn order(&self) -> (DateTime<Utc>, &str, i64) {
        (self.captured_at, self.source_stream.as_str(), self.source_seq)
    }

    fn optional_sources(&self) -> Vec<Option<(DateTime<Utc>, &str, i64)>> {
        vec![borrowed(&self.vendor_source), borrowed(&self.quality_source)]
    }

    fn changed(&self) -> bool {
        self.changed
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn subject(&self) -> (&'static str, &'static str) {
        (SLEEP_NORMALIZED_SUBJECT, "sleep")
    }

    fn body(&self) -> Vec<u8> {
        to_json(SleepStored {
            captured_at: rfc3339(self.captured_at),
            date: AsStr(self.date),
            duration_minutes: self.duration_minutes,
            quality_score: self.quality_score,
            user_id: &self.user_id,
            vendor: &self.vendor,
            version: self.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn hrv_announcements_describe_the_row_byte_for_byte() {
        let mut row = HrvRow {
            user_id: "u1".into(),
            date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            rmssd: 42.5,
            ln_rmssd: 42.5f64.ln(),
            readiness_score: 77.0,
            vendor: "oura".into(),
            captured_at: at("2025-03-01T05:30:00Z"),
            source_stream: "AA_CORE_HOT".into(),
            source_seq: 3,
            vendor_source: None,
            version: 2,
            changed: true,
        };
        let body = row.body();
        assert!(row.changed());
        assert_eq!(
            (row.version(), row.subject()),
            (2, (HRV_NORMALIZED_SUBJECT, "hrv"))
        );
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!(
                r#"{{"record":{{"capturedAt":"2025-03-01T05:30:00.000Z","date":"2025-03-01","lnRMSSD":{},"rMSSD":42.5,"readinessScore":77,"userId":"u1","vendor":"oura","version":2}}}}"#,
                42.5f64.ln()
            )
        );
        // A fractional score stays fractional; microseconds are published when present.
        row.readiness_score = 77.5;
        row.captured_at = at("2025-03-01T05:30:00.000123Z");
        let v: serde_json::Value = serde_json::from_slice(&row.body()).unwrap();
        assert_eq!(v["record"]["readinessScore"], serde_json::json!(77.5));
        assert_eq!(v["record"]["capturedAt"], "2025-03-01T05:30:00.000123Z");
    }

    #[test]
    fn sleep_announcements_carry_quality_only_when_stored() {
        let mut row = SleepRow {
            user_id: "u".into(),
            date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            duration_minutes: 421,
            quality_score: Some(100),
            vendor: "oura".into(),
            captured_at: at("2025-03-01T08:00:00Z"),
            source_stream: "AA_CORE_HOT".into(),
            source_seq: 9,
            vendor_source: None,
            quality_source: Some((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT".into(), 4)),
            version: 1,
            changed: false,
        };
        assert_eq!(
            String::from_utf8(row.body()).unwrap(),
            r#"{"record":{"capturedAt":"2025-03-01T08:00:00.000Z","date":"2025-03-01","durationMinutes":421,"qualityScore":100,"userId":"u","vendor":"oura","version":1}}"#
        );
        row.quality_score = None;
        let v: serde_json::Value = serde_json::from_slice(&row.body()).unwrap();
        assert!(v["record"].get("qualityScore").is_none());
        assert_eq!(row.order(), (at("2025-03-01T08:00:00Z"), "AA_CORE_HOT", 9));
        // The event that gave the quality is a source of the row too; an unrelated one is not.
        assert!(row.holds((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT", 4)));
        assert!(row.holds((at("2025-03-01T08:00:00Z"), "AA_CORE_HOT", 9)));
        assert!(!row.holds((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT", 5)));
    }
}
