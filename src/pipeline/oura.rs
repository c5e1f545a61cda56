//! Oura vendor webhooks (`vendor.oura.webhook.received`), as forwarded by ingest.
//!
//! The body is kept whole (stored raw as JSONB); HRV and sleep values it carries are derived
//! into the same records the HRV and sleep consumers produce.
//!
//! Any JSON object with a usable `user_id` is stored (SPEC §4): a section that cannot be derived
//! (`data.hrv`, `data.sleep`, or a `data` that is not an object; an invalid or far-future
//! `timestamp` invalidates every section present) does not stop the raw body being stored or the
//! other section being derived. It is reported in [`OuraWebhook::invalid_sections`], and the
//! batch path dead-letters it on its own.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::hrv::rmssd;
use super::{
    clamp_score, minutes, number, optional_object, parse_object, timestamp, user_id, Clock, Member, Scalar,
    SchemaError, Vendor,
};
use super::{HrvRecord, SleepRecord};

/// The section names [`InvalidSection::section`] takes: a bounded set (a metric label).
pub const SECTION_HRV: &str = "data.hrv";
pub const SECTION_SLEEP: &str = "data.sleep";
/// `data` itself was present but not an object: no section could be read.
pub const SECTION_DATA: &str = "data";
pub const SECTIONS: [&str; 3] = [SECTION_HRV, SECTION_SLEEP, SECTION_DATA];

/// A part of an accepted webhook that could not be derived into a record.
#[derive(Debug)]
pub struct InvalidSection {
    /// One of [`SECTIONS`].
    pub section: &'static str,
    pub error: SchemaError,
}

/// Compared by section and message: `SchemaError` holds a `serde_json::Error`, which has no
/// equality, and two decodes of the same bytes give the same text.
impl PartialEq for InvalidSection {
    fn eq(&self, other: &Self) -> bool {
        self.section == other.section && self.error.to_string() == other.error.to_string()
    }
}

impl Clone for InvalidSection {
    fn clone(&self) -> Self {
        let error = match &self.error {
            SchemaError::Missing(f) => SchemaError::Missing(f),
            SchemaError::NotObject(f) => SchemaError::NotObject(f),
            SchemaError::Invalid { field, reason } => SchemaError::Invalid { field, reason },
            SchemaError::TooLarge { size, max } => SchemaError::TooLarge {
                size: *size,
                max: *max,
            },
            // Never produced for a section (the body was already parsed); kept total anyway.
            SchemaError::Json(_) => SchemaError::Invalid {
                field: self.section,
                reason: "invalid JSON",
            },
        };
        InvalidSection {
            section: self.section,
            error,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OuraWebhook {
    /// `Nats-Msg-Id` when the publisher set one, else the SHA-256 of the body (hex).
    pub idempotency_key: String,
    pub user_id: String,
    pub payload: Value,
    /// The webhook's own `timestamp`, when present and valid.
    pub timestamp: Option<DateTime<Utc>>,
    pub hrv: Option<HrvRecord>,
    pub sleep: Option<SleepRecord>,
    /// Sections present but not derivable, in body order (`data`, then `data.hrv`, `data.sleep`).
    /// Empty for a fully valid webhook.
    pub invalid_sections: Vec<InvalidSection>,
}

pub(crate) fn decode(body: &[u8], msg_id: Option<&str>, clock: Clock) -> Result<OuraWebhook, SchemaError> {
    let root = parse_object(body)?;
    let user_id = user_id(Scalar::of(root.get("user_id")), "user_id")?;
    for (k, v) in &root {
        if k.contains('\0') || has_nul(v) {
            // JSONB refuses U+0000 in any string or key (SQLSTATE 22P05): the body can never be
            // stored, whatever the retries.
            return Err(SchemaError::Invalid {
                field: "body",
                reason: "must not contain NUL (\\u0000) in any string or key",
            });
        }
    }
    // Re-evaluated for each section that needs it: `SchemaError` is not `Clone`.
    let ts = || timestamp(Scalar::of(root.get("timestamp")), "timestamp", clock);
    let mut invalid_sections = Vec::new();
    let mut hrv = None;
    let mut sleep = None;
    match optional_object(Member::of(root.get("data")), "data") {
        Err(error) => invalid_sections.push(InvalidSection {
            section: SECTION_DATA,
            error,
        }),
        Ok(None) => {}
        Ok(Some(data)) => {
            let section =
                |key: &str, name: &'static str| match optional_object(Member::of(data.get(key)), name) {
                    Err(e) => Err(e),
                    Ok(None) => Ok(None),
                    Ok(Some(obj)) => match ts().and_then(require_ts) {
                        Err(e) => Err(e),
                        Ok(t) => Ok(Some((obj, t))),
                    },
                };
            match section("hrv", SECTION_HRV)
                .and_then(|s| s.map(|(h, t)| derive_hrv(&user_id, h, t)).transpose())
            {
                Ok(r) => hrv = r,
                Err(error) => invalid_sections.push(InvalidSection {
                    section: SECTION_HRV,
                    error,
                }),
            }
            match section("sleep", SECTION_SLEEP)
                .and_then(|s| s.map(|(sl, t)| derive_sleep(&user_id, sl, t)).transpose())
            {
                Ok(r) => sleep = r,
                Err(error) => invalid_sections.push(InvalidSection {
                    section: SECTION_SLEEP,
                    error,
                }),
            }
        }
    }
    let idempotency_key = match msg_id.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => id.to_string(),
        None => sha256_hex(body),
    };
    Ok(OuraWebhook {
        idempotency_key,
        user_id,
        timestamp: ts().ok().flatten(),
        payload: Value::Object(root),
        hrv,
        sleep,
        invalid_sections,
    })
}

/// Whether a NUL appears in any string or key of `v`. Iterative: a deeply nested body (up to
/// serde_json's recursion limit) costs no stack here.
fn has_nul(v: &Value) -> bool {
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => todo.extend(a),
            Value::Object(o) => {
                for (k, v) in o {
                    if k.contains('\0') {
                        return true;
                    }
                    todo.push(v);
                }
            }
            Value::String(_) | Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    false
}

fn require_ts(ts: Option<DateTime<Utc>>) -> Result<DateTime<Utc>, SchemaError> {
    ts.ok_or(SchemaError::Missing("timestamp"))
}

fn derive_hrv(
    user_id: &str,
    h: &Map<String, Value>,
    captured_at: DateTime<Utc>,
) -> Result<HrvRecord, SchemaError> {
    let rmssd = rmssd(Scalar::of(h.get("rmssd")), "data.hrv.rmssd")?;
    Ok(HrvRecord {
        user_id: user_id.to_string(),
        date: captured_at.date_naive(),
        rmssd,
        ln_rmssd: rmssd.ln(),
        vendor: Some(Vendor::Oura),
        captured_at,
        readiness_score: 0.0,
        event_id: None,
    })
}

fn derive_sleep(
    user_id: &str,
    s: &Map<String, Value>,
    captured_at: DateTime<Utc>,
) -> Result<SleepRecord, SchemaError> {
    let hours = number(Scalar::of(s.get("duration")), "data.sleep.duration")?
        .ok_or(SchemaError::Missing("data.sleep.duration"))?;
    let duration_minutes = minutes(hours * 60.0, "data.sleep.duration")?;
    let quality_score = number(Scalar::of(s.get("score")), "data.sleep.score")?.map(clamp_score);
    Ok(SleepRecord {
        user_id: user_id.to_string(),
        date: captured_at.date_naive(),
        duration_minutes,
        quality_score,
        vendor: Some(Vendor::Oura),
        captured_at,
        captured_at_defaulted: false,
        event_id: None,
    })
}

pub fn sha256_hex(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A valid webhook of `user_id` sent `at`, without sections (its message id is its identity).
pub(crate) fn probe_event(user_id: &str, at: DateTime<Utc>) -> Value {
    serde_json::json!({
        "user_id": user_id,
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Shape::{self, Invalid, Missing, NotObject};

    fn decode(body: &[u8], msg_id: Option<&str>) -> Result<OuraWebhook, SchemaError> {
        super::decode(body, msg_id, crate::pipeline::test_envelope().clock())
    }

    fn sections(w: &OuraWebhook) -> Vec<(&'static str, Shape)> {
        w.invalid_sections
            .iter()
            .map(|s| (s.section, Shape::of(&s.error)))
            .collect()
    }

    #[test]
    fn full_webhook_derives_both_records() {
        let body = br#"{"user_id":"u9","timestamp":"2025-03-01T23:30:00-02:00","data":{"hrv":{"rmssd":45.2,"sdnn":52.8},"sleep":{"duration":7.5,"score":83}}}"#;
        let w = decode(body, None).unwrap();
        assert_eq!(w.idempotency_key, sha256_hex(body));
        assert_eq!(w.idempotency_key.len(), 64);
        assert!(w.invalid_sections.is_empty());
        let h = w.hrv.unwrap();
        // UTC date of the timestamp, not the local one.
        assert_eq!(h.date.to_string(), "2025-03-02");
        assert_eq!(h.vendor, Some(Vendor::Oura));
        let s = w.sleep.unwrap();
        assert_eq!(s.duration_minutes, 450);
        assert_eq!(s.quality_score, Some(83));
    }

    #[test]
    fn msg_id_is_the_idempotency_key() {
        let w = decode(br#"{"user_id":"u","data":{}}"#, Some("abc")).unwrap();
        assert_eq!(w.idempotency_key, "abc");
        assert!(w.hrv.is_none() && w.sleep.is_none());
    }

    #[test]
    fn sleep_only_webhook() {
        let w = decode(
            br#"{"user_id":"u","timestamp":"2025-03-01T00:00:00Z","data":{"sleep":{"duration":7.00833}}}"#,
            None,
        )
        .unwrap();
        assert!(w.hrv.is_none());
        assert_eq!(w.sleep.unwrap().duration_minutes, 420);
    }

    #[test]
    fn schema_invalid_webhooks() {
        let nul = Invalid("body", "must not contain NUL (\\u0000) in any string or key");
        for (body, shape) in [
            (&b"[]"[..], NotObject("body")),
            (br#""text""#, NotObject("body")),
            (br#"{"timestamp":"2025-03-01T00:00:00Z"}"#, Missing("user_id")),
            (
                br#"{"user_id":"a\u0000b"}"#,
                Invalid("user_id", "must not contain NUL (U+0000)"),
            ),
            (br#"{"user_id":"u","note":"x\u0000"}"#, nul),
            (br#"{"user_id":"u","x\u0000":1}"#, nul),
            (
                br#"{"user_id":"u","data":{"hrv":{"tags":[{"k":"\u0000"}]}}}"#,
                nul,
            ),
            (br#"{"user_id":"u","data":{"hrv":{"\u0000":1}}}"#, nul),
        ] {
            let e = decode(body, None).unwrap_err();
            assert_eq!(Shape::of(&e), shape, "{}", String::from_utf8_lossy(body));
        }
        // An escaped backslash before u0000 is not a NUL.
        assert!(decode(br#"{"user_id":"u","note":"\\u0000"}"#, None).is_ok());
    }

    #[test]
    fn invalid_sections_are_reported_and_the_rest_is_kept() {
        let bad_time = Invalid("timestamp", "must be an RFC 3339 timestamp with offset");
        /// Body, HRV derived, sleep derived, the invalid sections and their errors.
        type Case<'a> = (&'a [u8], bool, bool, Vec<(&'a str, Shape)>);
        let cases: &[Case<'_>] = &[
            (
                br#"{"user_id":"u","data":{"hrv":{"rmssd":0},"sleep":{"duration":7}},"timestamp":"2025-03-01T00:00:00Z"}"#,
                false,
                true,
                vec![("data.hrv", Invalid("data.hrv.rmssd", "must be greater than 0"))],
            ),
            (
                br#"{"user_id":"u","data":{"hrv":{"rmssd":4}}}"#,
                false,
                false,
                vec![("data.hrv", Missing("timestamp"))],
            ),
            (
                br#"{"user_id":"u","timestamp":"2025-03-01T00:00:00Z","data":{"hrv":{"rmssd":4},"sleep":{"duration":25}}}"#,
                true,
                false,
                vec![(
                    "data.sleep",
                    Invalid("data.sleep.duration", "must be between 0 and 1440 minutes"),
                )],
            ),
            (
                br#"{"user_id":"u","timestamp":"yesterday","data":{"hrv":{"rmssd":4},"sleep":{"duration":7}}}"#,
                false,
                false,
                vec![("data.hrv", bad_time), ("data.sleep", bad_time)],
            ),
            (
                br#"{"user_id":"u","timestamp":"2030-01-01T00:00:00Z","data":{"sleep":{"duration":7}}}"#,
                false,
                false,
                vec![(
                    "data.sleep",
                    Invalid(
                        "timestamp",
                        "is further in the future than MAX_FUTURE_SKEW_MS allows",
                    ),
                )],
            ),
            (
                br#"{"user_id":"u","timestamp":"2025-03-01T00:00:00Z","data":{"hrv":[1],"sleep":"x"}}"#,
                false,
                false,
                vec![
                    ("data.hrv", NotObject("data.hrv")),
                    ("data.sleep", NotObject("data.sleep")),
                ],
            ),
            (
                br#"{"user_id":"u","data":7}"#,
                false,
                false,
                vec![("data", NotObject("data"))],
            ),
        ];
        for (body, hrv, sleep, invalid) in cases {
            let w = decode(body, Some("id")).unwrap_or_else(|e| panic!("{e}"));
            let shown = String::from_utf8_lossy(body);
            assert_eq!(w.hrv.is_some(), *hrv, "{shown}");
            assert_eq!(w.sleep.is_some(), *sleep, "{shown}");
            assert_eq!(&sections(&w), invalid, "{shown}");
            // The raw body is kept whole.
            assert_eq!(w.payload, serde_json::from_slice::<Value>(body).unwrap());
        }
        // A bad timestamp without sections is no error at all: nothing needed it.
        let w = decode(br#"{"user_id":"u","timestamp":"nope"}"#, None).unwrap();
        assert!(w.invalid_sections.is_empty() && w.timestamp.is_none());
    }

    #[test]
    fn the_probe_event_is_a_valid_webhook() {
        let t = DateTime::parse_from_rfc3339("2025-03-01T05:30:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let body = probe_event("migration-probe", t).to_string();
        assert_eq!(
            body,
            r#"{"data":{},"timestamp":"2025-03-01T05:30:00.123456Z","user_id":"migration-probe"}"#
        );
        let w = decode(body.as_bytes(), Some("migration-probe:oura:1")).unwrap();
        assert_eq!(w.idempotency_key, "migration-probe:oura:1");
        assert!(w.invalid_sections.is_empty() && w.hrv.is_none() && w.sleep.is_none());
    }

    #[test]
    fn timestamps_are_truncated_to_microseconds() {
        let w = decode(
            br#"{"user_id":"u","timestamp":"2025-03-01T00:00:00.123456789+01:00","data":{"hrv":{"rmssd":4}}}"#,
            None,
        )
        .unwrap();
        let t = w.timestamp.unwrap();
        assert_eq!(t.to_rfc3339(), "2025-02-28T23:00:00.123456+00:00");
        assert_eq!(w.hrv.unwrap().captured_at, t);
    }
}
