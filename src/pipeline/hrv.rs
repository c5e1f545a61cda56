//! Raw HRV readings (`athlete-ally.hrv.raw-received`).

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};

use super::{
    date, number, object, optional_object, parse_object, timestamp, user_id, vendor, Clock, SchemaError,
    Vendor,
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
    let root = parse_object(body)?;
    let event_id = super::event_id(&root)?;
    let payload = object(&root, "payload", "payload")?;
    let mut r = from_payload(payload, clock)?;
    r.event_id = event_id;
    Ok(r)
}

fn from_payload(p: &Map<String, Value>, clock: Clock) -> Result<HrvRecord, SchemaError> {
    let user_id = user_id(p, "userId", "payload.userId")?;
    let date = date(p, "date", "payload.date")?;
    let rmssd_value = p.get("rMSSD").or_else(|| p.get("rmssd"));
    let rmssd = rmssd(rmssd_value, "payload.rMSSD")?;
    let ln_given = number(p.get("lnRMSSD").or_else(|| p.get("lnRmssd")), "payload.lnRMSSD")?;
    let captured_at = timestamp(p.get("capturedAt"), "payload.capturedAt", clock)?
        .ok_or(SchemaError::Missing("payload.capturedAt"))?;
    let raw = optional_object(p, "raw", "payload.raw")?;
    let readiness_score = raw
        .and_then(|r| r.get("readinessScore"))
        .and_then(Value::as_f64)
        .filter(|s| s.is_finite() && (0.0..=100.0).contains(s))
        .unwrap_or(0.0);
    Ok(HrvRecord {
        user_id,
        date,
        rmssd,
        ln_rmssd: ln_given.unwrap_or_else(|| rmssd.ln()),
        vendor: vendor(raw),
        captured_at,
        readiness_score,
        event_id: None,
    })
}

/// rMSSD: a finite number strictly greater than zero.
pub(crate) fn rmssd(value: Option<&Value>, field: &'static str) -> Result<f64, SchemaError> {
    match number(value, field)? {
        None => Err(SchemaError::Missing(field)),
        Some(v) if v > 0.0 => Ok(v),
        Some(_) => Err(SchemaError::Invalid {
            field,
            reason: "must be greater than 0",
        }),
    }
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
    fn invalid_events_name_the_field() {
        let base = |p: &str| format!(r#"{{"payload":{{{p}}}}}"#);
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "body is not a JSON object"),
            (r#"{"payload":3}"#, "payload is not a JSON object"),
            (
                &base(r#""date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                "payload.userId",
            ),
            (
                &base(r#""userId":"","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                "payload.userId",
            ),
            (
                &base(r#""userId":"u","date":"2025-02-30","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z""#),
                "payload.date",
            ),
            (
                &base(r#""userId":"u","date":"2025-03-01","rMSSD":0,"capturedAt":"2025-03-01T00:00:00Z""#),
                "payload.rMSSD",
            ),
            (
                &base(r#""userId":"u","date":"2025-03-01","rMSSD":-5,"capturedAt":"2025-03-01T00:00:00Z""#),
                "payload.rMSSD",
            ),
            (
                &base(
                    r#""userId":"u","date":"2025-03-01","rMSSD":"NaN","capturedAt":"2025-03-01T00:00:00Z""#,
                ),
                "payload.rMSSD",
            ),
            (
                &base(
                    r#""userId":"u","date":"2025-03-01","rMSSD":1e999,"capturedAt":"2025-03-01T00:00:00Z""#,
                ),
                "not valid JSON",
            ),
            (
                &base(r#""userId":"u","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00""#),
                "payload.capturedAt",
            ),
            (
                &base(r#""userId":"u","date":"2025-03-01","rMSSD":4"#),
                "payload.capturedAt",
            ),
            (
                &base(
                    r#""userId":"u","date":"2025-03-01","rMSSD":4,"lnRMSSD":"x","capturedAt":"2025-03-01T00:00:00Z""#,
                ),
                "payload.lnRMSSD",
            ),
        ];
        for (body, needle) in cases {
            let e = err(body).to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn long_user_ids_are_refused() {
        let long = "x".repeat(129);
        let body = format!(
            r#"{{"payload":{{"userId":"{long}","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z"}}}}"#
        );
        assert!(err(&body).to_string().contains("128"));
    }
}
