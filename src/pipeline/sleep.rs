//! Raw sleep records (`athlete-ally.sleep.raw-received`).

use chrono::{DateTime, NaiveDate, Utc};

use super::{
    clamp_score, date, minutes, number, object, optional_object, parse_object, timestamp, user_id, vendor,
    Clock, SchemaError, Vendor,
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
    let root = parse_object(body)?;
    let event_id = super::event_id(&root)?;
    let p = object(&root, "payload", "payload")?;
    let user_id = user_id(p, "userId", "payload.userId")?;
    let date = date(p, "date", "payload.date")?;
    let duration = number(p.get("durationMinutes"), "payload.durationMinutes")?
        .ok_or(SchemaError::Missing("payload.durationMinutes"))?;
    let duration_minutes = minutes(duration, "payload.durationMinutes")?;
    let captured = timestamp(p.get("capturedAt"), "payload.capturedAt", clock)?;
    let raw = optional_object(p, "raw", "payload.raw")?;
    let quality_score = number(
        raw.and_then(|r| r.get("qualityScore")),
        "payload.raw.qualityScore",
    )?
    .map(clamp_score);
    Ok(SleepRecord {
        user_id,
        date,
        duration_minutes,
        quality_score,
        vendor: vendor(raw),
        captured_at: captured.unwrap_or(stable_time),
        captured_at_defaulted: captured.is_none(),
        event_id,
    })
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
    fn invalid_sleep_is_refused() {
        for (body, needle) in [
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":1441}}"#,
                "durationMinutes",
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":-1}}"#,
                "durationMinutes",
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01"}}"#,
                "durationMinutes",
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-04-31","durationMinutes":3}}"#,
                "payload.date",
            ),
            (
                r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":3,"raw":{"qualityScore":"high"}}}"#,
                "qualityScore",
            ),
        ] {
            let e = dec(body.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }
}
