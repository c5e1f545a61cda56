//! Raw sleep records (`athlete-ally.sleep.raw-received`): their decoding, the `sleep_data` row
//! as its normalized-stored event (`athlete-ally.sleep.normalized-stored`) describes it, and the
//! migration probe's sample event.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::core_event::CoreEvent;
use super::normalized::{rfc3339, to_json, AsStr, NormalizedRow};
use super::{
    clamp_score, date, minutes, number, object, optional_object, timestamp, user_id, vendor, Clock, Scalar,
    SchemaError, Vendor,
};

#[derive(Debug, Clone, PartialEq)]
pub struct SleepRecord {
    pub user_id: String,
    pub date: NaiveDate,
    pub duration_minutes: i32,
    /// `None` when absent: a stored score is then kept.
    pub quality_score: Option<i32>,
    pub vendor: Option<Vendor>,
    pub captured_at: DateTime<Utc>,
    /// True when the event had no `capturedAt` and the message's JetStream timestamp (the first
    /// publish's, for a replay) was used instead (stored in the row).
    pub captured_at_defaulted: bool,
    /// The event's own `eventId`, when it has one (an identity for its announcements).
    pub event_id: Option<String>,
}

/// `stable_time` is the default `captured_at` (already truncated to microseconds).
pub(crate) fn decode(
    body: &[u8],
    stable_time: DateTime<Utc>,
    clock: Clock,
) -> Result<SleepRecord, SchemaError> {
    let root = CoreEvent::parse(body)?;
    let event_id = super::event_id(root.event_id())?;
    let p = object(root.payload(), "payload")?;
    let user_id = user_id(p.user_id(), "payload.userId")?;
    let date = date(p.date(), "payload.date")?;
    let duration = number(p.duration_minutes(), "payload.durationMinutes")?
        .ok_or(SchemaError::Missing("payload.durationMinutes"))?;
    let duration_minutes = minutes(duration, "payload.durationMinutes")?;
    let captured = timestamp(p.captured_at(), "payload.capturedAt", clock)?;
    let raw = optional_object(p.raw(), "payload.raw")?;
    let quality_score = number(
        raw.map_or(Scalar::Missing, |r| r.quality_score()),
        "payload.raw.qualityScore",
    )?
    .map(clamp_score);
    Ok(SleepRecord {
        user_id,
        date,
        duration_minutes,
        quality_score,
        vendor: vendor(raw.map_or(Scalar::Missing, |r| r.source())),
        captured_at: captured.unwrap_or(stable_time),
        captured_at_defaulted: captured.is_none(),
        event_id,
    })
}

/// A `sleep_data` row as stored: what its normalized-stored event describes.
#[derive(Debug, Clone, PartialEq)]
pub struct SleepRow {
    pub user_id: String,
    pub date: NaiveDate,
    pub duration_minutes: i32,
    pub quality_score: Option<i32>,
    pub vendor: String,
    pub captured_at: DateTime<Utc>,
    pub version: i64,
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
            version,
        }
    }
}

impl NormalizedRow for SleepRow {
    const SUBJECT: &'static str = "athlete-ally.sleep.normalized-stored";
    const NAME: &'static str = "sleep";

    fn version(&self) -> i64 {
        self.version
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

/// A valid raw sleep record of `user_id` captured `at`, identified by `event_id`.
pub(crate) fn probe_event(event_id: &str, user_id: &str, at: DateTime<Utc>) -> Value {
    super::probe_core_event(event_id, user_id, at, ("durationMinutes", json!(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(body: &[u8]) -> Result<SleepRecord, SchemaError> {
        let env = crate::pipeline::test_envelope();
        decode(body, crate::pipeline::to_micros(env.stable_time), env.clock())
    }

    #[test]
    fn valid_sleep_is_normalized() {
        let r = dec(
            br#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":420.5,"capturedAt":"2025-03-01T08:00:00Z","raw":{"source":"Oura","qualityScore":104.2}}}"#,
        )
        .unwrap();
        assert_eq!(r.duration_minutes, 421);
        assert_eq!(r.quality_score, Some(100));
        assert_eq!(r.vendor, Some(Vendor::Oura));
        assert!(!r.captured_at_defaulted);
    }

    #[test]
    fn missing_captured_at_defaults_to_the_stable_time_and_says_so() {
        let r = dec(br#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":0}}"#).unwrap();
        // The message's JetStream timestamp, at PostgreSQL's precision; never processing time.
        assert_eq!(r.captured_at.to_rfc3339(), "2025-03-02T11:00:00.123456+00:00");
        assert!(r.captured_at_defaulted);
        assert_eq!(r.quality_score, None);
        assert_eq!(r.vendor, None);
    }

    #[test]
    fn invalid_sleep_is_typed_by_field() {
        use crate::pipeline::Shape::{self, Invalid, Missing};
        let out_of_range = Invalid("payload.durationMinutes", "must be between 0 and 1440 minutes");
        for (body, shape) in [
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":1441}}"#,
                out_of_range,
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":-1}}"#,
                out_of_range,
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01"}}"#,
                Missing("payload.durationMinutes"),
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-04-31","durationMinutes":3}}"#,
                Invalid("payload.date", "must be a real calendar date written YYYY-MM-DD"),
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":3,"raw":{"qualityScore":"high"}}}"#,
                Invalid("payload.raw.qualityScore", "must be a number"),
            ),
        ] {
            assert_eq!(Shape::of(&dec(body.as_bytes()).unwrap_err()), shape, "{body}");
        }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn announcements_carry_quality_only_when_stored() {
        let mut row = SleepRow {
            user_id: "u".into(),
            date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            duration_minutes: 421,
            quality_score: Some(100),
            vendor: "oura".into(),
            captured_at: at("2025-03-01T08:00:00Z"),
            version: 1,
        };
        assert_eq!(
            String::from_utf8(row.body()).unwrap(),
            r#"{"record":{"capturedAt":"2025-03-01T08:00:00.000Z","date":"2025-03-01","durationMinutes":421,"qualityScore":100,"userId":"u","vendor":"oura","version":1}}"#
        );
        row.quality_score = None;
        let v: Value = serde_json::from_slice(&row.body()).unwrap();
        assert!(v["record"].get("qualityScore").is_none());
    }

    #[test]
    fn the_probe_event_is_a_valid_event() {
        let t = at("2025-03-01T05:30:00.123456Z");
        let body = probe_event("p:sleep:1", "migration-probe", t).to_string();
        let r = dec(body.as_bytes()).unwrap();
        assert_eq!((r.user_id.as_str(), r.captured_at), ("migration-probe", t));
        assert!(!r.captured_at_defaulted);
    }
}
