//! Raw HRV readings (`athlete-ally.hrv.raw-received`): their decoding, the `hrv_data` row as
//! its normalized-stored event (`athlete-ally.hrv.normalized-stored`) describes it, and the
//! migration probe's sample event.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Number, Value};

use super::core_event::{CoreEvent, Payload};
use super::normalized::{rfc3339, score_json, to_json, AsStr, NormalizedRow};
use super::{
    date, number, object, optional_object, timestamp, user_id, vendor, Clock, Scalar, SchemaError, Vendor,
};

#[derive(Debug, Clone, PartialEq)]
pub struct HrvRecord {
    pub user_id: String,
    pub date: NaiveDate,
    pub rmssd: f64,
    pub ln_rmssd: f64,
    /// `None` when the event names no source: the stored vendor is then kept.
    pub vendor: Option<Vendor>,
    pub captured_at: DateTime<Utc>,
    /// Passed through from `raw.readinessScore` when it is a number in 0..=100, else 0.
    pub readiness_score: f64,
    /// The event's own `eventId`, when it has one (an identity for its announcements).
    pub event_id: Option<String>,
}

pub(crate) fn decode(body: &[u8], clock: Clock) -> Result<HrvRecord, SchemaError> {
    let root = CoreEvent::parse(body)?;
    let event_id = super::event_id(root.event_id())?;
    let payload = object(root.payload(), "payload")?;
    let mut r = from_payload(payload, clock)?;
    r.event_id = event_id;
    Ok(r)
}

fn from_payload(p: &Payload<'_>, clock: Clock) -> Result<HrvRecord, SchemaError> {
    let user_id = user_id(p.user_id(), "payload.userId")?;
    let date = date(p.date(), "payload.date")?;
    let rmssd = rmssd(p.rmssd(), "payload.rMSSD")?;
    let ln_given = number(p.ln_rmssd(), "payload.lnRMSSD")?;
    let captured_at = timestamp(p.captured_at(), "payload.capturedAt", clock)?
        .ok_or(SchemaError::Missing("payload.capturedAt"))?;
    let raw = optional_object(p.raw(), "payload.raw")?;
    let readiness_score = match raw.map(|r| r.readiness_score()) {
        Some(Scalar::Num(s)) if s.is_finite() && (0.0..=100.0).contains(&s) => s,
        _ => 0.0,
    };
    Ok(HrvRecord {
        user_id,
        date,
        rmssd,
        ln_rmssd: ln_given.unwrap_or_else(|| rmssd.ln()),
        vendor: vendor(raw.map_or(Scalar::Missing, |r| r.source())),
        captured_at,
        readiness_score,
        event_id: None,
    })
}

/// rMSSD: a finite number strictly greater than zero.
pub(crate) fn rmssd(value: Scalar<'_>, field: &'static str) -> Result<f64, SchemaError> {
    match number(value, field)? {
        None => Err(SchemaError::Missing(field)),
        Some(v) if v > 0.0 => Ok(v),
        Some(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be greater than 0",
        }),
    }
}

/// An `hrv_data` row as stored: what its normalized-stored event describes.
#[derive(Debug, Clone, PartialEq)]
pub struct HrvRow {
    pub user_id: String,
    pub date: NaiveDate,
    pub rmssd: f64,
    pub ln_rmssd: f64,
    pub readiness_score: f64,
    pub vendor: String,
    pub captured_at: DateTime<Utc>,
    pub version: i64,
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
            version,
        }
    }
}

impl NormalizedRow for HrvRow {
    const SUBJECT: &'static str = "athlete-ally.hrv.normalized-stored";
    const NAME: &'static str = "hrv";

    fn version(&self) -> i64 {
        self.version
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

/// A valid raw HRV event of `user_id` captured `at`, identified by `event_id`.
pub(crate) fn probe_event(event_id: &str, user_id: &str, at: DateTime<Utc>) -> Value {
    super::probe_core_event(event_id, user_id, at, ("rMSSD", json!(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        crate::pipeline::test_envelope().clock()
    }

    fn ok(body: &str) -> HrvRecord {
        decode(body.as_bytes(), clock()).unwrap()
    }

    fn err(body: &str) -> SchemaError {
        decode(body.as_bytes(), clock()).unwrap_err()
    }

    #[test]
    fn valid_event_is_normalized() {
        let r = ok(
            r#"{"eventId":"e1","payload":{"userId":"u1","date":"2025-03-01","rMSSD":42.5,
            "capturedAt":"2025-03-01T07:30:00+02:00","raw":{"source":"Oura","readinessScore":77}}}"#,
        );
        assert_eq!(r.user_id, "u1");
        assert_eq!(r.date, NaiveDate::from_ymd_opt(2025, 3, 1).unwrap());
        assert_eq!(r.rmssd, 42.5);
        assert!((r.ln_rmssd - 42.5f64.ln()).abs() < 1e-12);
        assert_eq!(r.vendor, Some(Vendor::Oura));
        assert_eq!(r.captured_at.to_rfc3339(), "2025-03-01T05:30:00+00:00");
        assert_eq!(r.readiness_score, 77.0);
        assert_eq!(r.event_id.as_deref(), Some("e1"));
    }

    #[test]
    fn legacy_keys_and_given_ln_are_accepted() {
        let r = ok(
            r#"{"payload":{"userId":"u","date":"2025-03-01","rmssd":10,"lnRmssd":2.5,"capturedAt":"2025-03-01T00:00:00Z"}}"#,
        );
        assert_eq!(r.rmssd, 10.0);
        assert_eq!(r.ln_rmssd, 2.5);
        assert_eq!(r.vendor, None);
        assert_eq!(r.readiness_score, 0.0);
    }

    #[test]
    fn invalid_events_are_typed_by_field() {
        use crate::pipeline::Shape::{self, Invalid, Json, Missing, NotObject};
        let base = |p: &str| format!(r#"{{"payload":{{{p}}}}}"#);
        let cases: Vec<(String, Shape)> = vec![
            ("not json".into(), Json),
            ("[1,2]".into(), NotObject("body")),
            (r#"{"payload":3}"#.into(), NotObject("payload")),
            (
                base(r#""date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                Missing("payload.userId"),
            ),
            (
                base(r#""userId":"","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                Invalid("payload.userId", "must not be empty"),
            ),
            (
                base(r#""userId":"u","date":"2025-02-30","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                Invalid("payload.date", "must be a real calendar date written YYYY-MM-DD"),
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":0,"capturedAt":"2025-03-01T00:00:00Z""#),
                Invalid("payload.rMSSD", "must be greater than 0"),
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":-5,"capturedAt":"2025-03-01T00:00:00Z""#),
                Invalid("payload.rMSSD", "must be greater than 0"),
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":"NaN","capturedAt":"2025-03-01T00:00:00Z""#),
                Invalid("payload.rMSSD", "must be a number"),
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":1e999,"capturedAt":"2025-03-01T00:00:00Z""#),
                Json,
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00""#),
                Invalid("payload.capturedAt", "must be an RFC 3339 timestamp with offset"),
            ),
            (
                base(r#""userId":"u","date":"2025-03-01","rMSSD":4"#),
                Missing("payload.capturedAt"),
            ),
            (
                base(
                    r#""userId":"u","date":"2025-03-01","rMSSD":4,"lnRMSSD":"x","capturedAt":"2025-03-01T00:00:00Z""#,
                ),
                Invalid("payload.lnRMSSD", "must be a number"),
            ),
        ];
        for (body, shape) in cases {
            assert_eq!(Shape::of(&err(&body)), shape, "{body}");
        }
    }

    #[test]
    fn long_user_ids_are_refused() {
        let long = "x".repeat(129);
        let body = format!(
            r#"{{"payload":{{"userId":"{long}","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z"}}}}"#
        );
        assert!(matches!(
            err(&body),
            SchemaError::Invalid {
                field: "payload.userId",
                reason: "longer than 128 characters"
            }
        ));
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn announcements_describe_the_row_byte_for_byte() {
        let mut row = HrvRow {
            user_id: "u1".into(),
            date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            rmssd: 42.5,
            ln_rmssd: 42.5f64.ln(),
            readiness_score: 77.0,
            vendor: "oura".into(),
            captured_at: at("2025-03-01T05:30:00Z"),
            version: 2,
        };
        assert_eq!(
            String::from_utf8(row.body()).unwrap(),
            format!(
                r#"{{"record":{{"capturedAt":"2025-03-01T05:30:00.000Z","date":"2025-03-01","lnRMSSD":{},"rMSSD":42.5,"readinessScore":77,"userId":"u1","vendor":"oura","version":2}}}}"#,
                42.5f64.ln()
            )
        );
        // A fractional score stays fractional; microseconds are published when present.
        row.readiness_score = 77.5;
        row.captured_at = at("2025-03-01T05:30:00.000123Z");
        let v: Value = serde_json::from_slice(&row.body()).unwrap();
        assert_eq!(v["record"]["readinessScore"], json!(77.5));
        assert_eq!(v["record"]["capturedAt"], "2025-03-01T05:30:00.000123Z");
    }

    #[test]
    fn the_probe_event_is_a_valid_event() {
        let t = at("2025-03-01T05:30:00.123456Z");
        let body = probe_event("p:hrv:1", "migration-probe", t);
        assert_eq!(
            body.to_string(),
            r#"{"eventId":"p:hrv:1","payload":{"capturedAt":"2025-03-01T05:30:00.123456Z","date":"2025-03-01","rMSSD":1.0,"raw":{"source":"probe"},"userId":"migration-probe"}}"#
        );
        let r = ok(&body.to_string());
        assert_eq!((r.user_id.as_str(), r.captured_at), ("migration-probe", t));
    }
}
