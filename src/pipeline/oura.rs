//! Oura vendor webhooks (`vendor.oura.webhook.received`), as forwarded by ingest.
//!
//! The body is kept whole (stored raw as JSONB); HRV and sleep values it carries are derived
//! into the same records the HRV and sleep consumers produce.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::hrv::rmssd;
use super::{
    clamp_score, minutes, number, optional_object, parse_object, timestamp, user_id, SchemaError, Vendor,
};
use super::{HrvRecord, SleepRecord};

#[derive(Debug, Clone, PartialEq)]
pub struct OuraWebhook {
    /// `Nats-Msg-Id` when the publisher set one, else the SHA-256 of the body (hex).
    pub idempotency_key: String,
    pub user_id: String,
    pub payload: Value,
    /// The webhook's own `timestamp`, when present.
    pub timestamp: Option<DateTime<Utc>>,
    pub hrv: Option<HrvRecord>,
    pub sleep: Option<SleepRecord>,
}

pub fn decode(body: &[u8], msg_id: Option<&str>) -> Result<OuraWebhook, SchemaError> {
    let root = parse_object(body)?;
    let user_id = user_id(&root, "user_id", "user_id")?;
    let ts = timestamp(root.get("timestamp"), "timestamp")?;
    let data = optional_object(&root, "data", "data")?;
    let hrv = match data
        .map(|d| optional_object(d, "hrv", "data.hrv"))
        .transpose()?
        .flatten()
    {
        Some(h) => Some(derive_hrv(&user_id, h, ts)?),
        None => None,
    };
    let sleep = match data
        .map(|d| optional_object(d, "sleep", "data.sleep"))
        .transpose()?
        .flatten()
    {
        Some(s) => Some(derive_sleep(&user_id, s, ts)?),
        None => None,
    };
    let idempotency_key = match msg_id.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => id.to_string(),
        None => sha256_hex(body),
    };
    Ok(OuraWebhook {
        idempotency_key,
        user_id,
        payload: Value::Object(root),
        timestamp: ts,
        hrv,
        sleep,
    })
}

fn require_ts(ts: Option<DateTime<Utc>>) -> Result<DateTime<Utc>, SchemaError> {
    ts.ok_or(SchemaError::Missing("timestamp"))
}

fn derive_hrv(
    user_id: &str,
    h: &Map<String, Value>,
    ts: Option<DateTime<Utc>>,
) -> Result<HrvRecord, SchemaError> {
    let captured_at = require_ts(ts)?;
    let rmssd = rmssd(h.get("rmssd"), "data.hrv.rmssd")?;
    Ok(HrvRecord {
        user_id: user_id.to_string(),
        date: captured_at.date_naive(),
        rmssd,
        ln_rmssd: rmssd.ln(),
        vendor: Some(Vendor::Oura),
        captured_at,
        readiness_score: 0.0,
    })
}

fn derive_sleep(
    user_id: &str,
    s: &Map<String, Value>,
    ts: Option<DateTime<Utc>>,
) -> Result<SleepRecord, SchemaError> {
    let captured_at = require_ts(ts)?;
    let hours = number(s.get("duration"), "data.sleep.duration")?
        .ok_or(SchemaError::Missing("data.sleep.duration"))?;
    let duration_minutes = minutes(hours * 60.0, "data.sleep.duration")?;
    let quality_score = number(s.get("score"), "data.sleep.score")?.map(clamp_score);
    Ok(SleepRecord {
        user_id: user_id.to_string(),
        date: captured_at.date_naive(),
        duration_minutes,
        quality_score,
        vendor: Some(Vendor::Oura),
        captured_at,
        captured_at_defaulted: false,
    })
}

pub fn sha256_hex(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_webhook_derives_both_records() {
        let body = br#"{"user_id":"u9","timestamp":"2025-03-01T23:30:00-02:00","data":{"hrv":{"rmssd":45.2,"sdnn":52.8},"sleep":{"duration":7.5,"score":83}}}"#;
        let w = decode(body, None).unwrap();
        assert_eq!(w.idempotency_key, sha256_hex(body));
        assert_eq!(w.idempotency_key.len(), 64);
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
        for (body, needle) in [
            (&b"[]"[..], "body is not a JSON object"),
            (br#""text""#, "body is not a JSON object"),
            (br#"{"timestamp":"2025-03-01T00:00:00Z"}"#, "user_id"),
            (
                br#"{"user_id":"u","data":{"hrv":{"rmssd":0}},"timestamp":"2025-03-01T00:00:00Z"}"#,
                "data.hrv.rmssd",
            ),
            (br#"{"user_id":"u","data":{"hrv":{"rmssd":4}}}"#, "timestamp"),
            (
                br#"{"user_id":"u","timestamp":"2025-03-01T00:00:00Z","data":{"sleep":{"duration":25}}}"#,
                "data.sleep.duration",
            ),
        ] {
            let e = decode(body, None).unwrap_err().to_string();
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
    }
}
