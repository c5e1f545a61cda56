//! Invariants of `normalize_service::pipeline::decode`, checked on every input the fuzz targets
//! and the property tests produce. A violated invariant panics, which libFuzzer records as a
//! crash and proptest as a failing case.
//!
//! Shared by `fuzz/` (as a library module) and `tests/it/properties.rs` (through `#[path]`), so
//! it only uses `normalize_service`, `chrono` and `serde_json`, never `crate::`.

use chrono::{DateTime, TimeZone, Utc};
use normalize_service::config::ConsumerKind;
use normalize_service::pipeline::{
    self, oura, Decoded, Envelope, HrvRecord, SchemaError, SleepRecord, Vendor,
};
use normalize_service::pipeline::{HrvRow, NormalizedRow as StoredRow, SleepRow};
use serde_json::{Map, Value};

/// The daemon's default `MAX_PAYLOAD_BYTES`.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The processing time handed to the decoders (fixed, so results are reproducible).
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 2, 12, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// The raw message's JetStream timestamp handed to the decoders: a sleep event without
/// `capturedAt` takes it, truncated to microseconds (it has sub-microsecond digits on purpose).
pub fn stable_time() -> DateTime<Utc> {
    Utc.timestamp_opt(1_740_909_600, 123_456_789)
        .single()
        .unwrap_or_else(Utc::now)
}

/// The daemon's default `MAX_FUTURE_SKEW_MS` (24 h).
pub fn max_future_skew() -> chrono::Duration {
    chrono::Duration::hours(24)
}

/// The latest event time a decoder may accept.
pub fn latest() -> DateTime<Utc> {
    now() + max_future_skew()
}

pub fn envelope(msg_id: Option<&str>) -> Envelope<'_> {
    Envelope {
        msg_id,
        stable_time: stable_time(),
        now: now(),
        max_future_skew: max_future_skew(),
        max_payload_bytes: MAX_PAYLOAD_BYTES,
    }
}

/// A stored time: whole microseconds (what PostgreSQL keeps, so in-memory and stored comparisons
/// agree) and not beyond `now + MAX_FUTURE_SKEW_MS`.
pub fn check_time(t: DateTime<Utc>) {
    assert_eq!(
        t.timestamp_subsec_nanos() % 1000,
        0,
        "{t:?} has sub-microsecond digits"
    );
    assert!(t <= latest(), "{t:?} is beyond the future skew");
}

/// `given` truncated to microseconds is `stored`. A leap second (`…:59:60.x`) counts as the next
/// second's `.x`, as PostgreSQL stores it (chrono alone would order it before that second).
fn assert_truncated(given: DateTime<Utc>, stored: DateTime<Utc>) {
    let nanos = given.timestamp_subsec_nanos();
    let given = match nanos.checked_sub(1_000_000_000) {
        Some(rest) => DateTime::from_timestamp(given.timestamp() + 1, rest).unwrap_or(given),
        None => given,
    };
    assert!(
        stored.timestamp_subsec_nanos() < 1_000_000_000,
        "{stored:?} kept a leap second"
    );
    let lost = given - stored;
    assert!(
        lost >= chrono::Duration::zero() && lost < chrono::Duration::microseconds(1),
        "{given:?} stored as {stored:?}"
    );
}

/// Decodes `body` as `kind`, checks every invariant, and returns the result.
pub fn check(kind: ConsumerKind, body: &[u8], msg_id: Option<&str>) -> Result<Decoded, SchemaError> {
    let result = pipeline::decode(kind, body, envelope(msg_id));

    // Deterministic: the same bytes always give the same outcome (redeliveries agree).
    let again = pipeline::decode(kind, body, envelope(msg_id));
    match (&result, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "decode is not deterministic"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "decode is not deterministic"),
        _ => panic!("decode is not deterministic"),
    }

    // The size limit is checked before parsing: any body over the limit is refused as such.
    if !body.is_empty() {
        let small = Envelope {
            max_payload_bytes: body.len() - 1,
            ..envelope(msg_id)
        };
        assert!(
            matches!(
                pipeline::decode(kind, body, small),
                Err(SchemaError::TooLarge { size, max }) if size == body.len() && max == body.len() - 1
            ),
            "a body over MAX_PAYLOAD_BYTES must be refused before parsing"
        );
    }

    match &result {
        Ok(Decoded::Hrv(r)) => {
            assert_eq!(kind, ConsumerKind::Hrv, "wrong record type");
            check_hrv_event(body, r);
        }
        Ok(Decoded::Sleep(r)) => {
            assert_eq!(kind, ConsumerKind::Sleep, "wrong record type");
            check_sleep_event(body, r);
        }
        Ok(Decoded::Oura(w)) => {
            assert_eq!(kind, ConsumerKind::Oura, "wrong record type");
            check_oura(body, msg_id, w);
        }
        Err(e) => {
            // The error becomes the Dlq-Error header (≤ 1 KiB) and a log field: it names the
            // field and the reason, and stays short whatever the input.
            let text = e.to_string();
            assert!(!text.is_empty());
            assert!(text.len() <= 256, "error message of {} bytes", text.len());
        }
    }
    result
}

/// Equal, or neighbouring finite floats of the same sign at most 2 ULP apart.
pub fn ulps_close(a: f64, b: f64) -> bool {
    a == b
        || (a.is_finite()
            && b.is_finite()
            && a.is_sign_negative() == b.is_sign_negative()
            && a.to_bits().abs_diff(b.to_bits()) <= 2)
}

fn root(body: &[u8]) -> Map<String, Value> {
    // Not `serde_json::from_slice::<Value>`: with the `raw_value` feature on (through sqlx) it
    // reads serde_json's private `$serde_json::private::RawValue` key specially
    // (`src/pipeline/tree.rs`).
    match pipeline::parse_json(body) {
        Ok(Value::Object(m)) => m,
        other => panic!("accepted a body that is not a JSON object: {other:?}"),
    }
}

fn payload(body: &[u8]) -> Map<String, Value> {
    match root(body).remove("payload") {
        Some(Value::Object(p)) => p,
        other => panic!("accepted an event without a payload object: {other:?}"),
    }
}

/// A stored user id: the given string, 1..=128 characters, not blank, no NUL.
pub fn check_user_id(user_id: &str, given: Option<&Value>) {
    assert_eq!(given.and_then(Value::as_str), Some(user_id), "user id changed");
    assert!(!user_id.contains('\0'), "user id with NUL accepted");
    assert!(!user_id.trim().is_empty(), "blank user id accepted");
    assert!(user_id.chars().count() <= 128, "user id over 128 characters");
}

/// A stored date is a real calendar date that round-trips through `YYYY-MM-DD`.
pub fn check_date(date: chrono::NaiveDate, given: Option<&Value>) {
    let shown = date.format("%Y-%m-%d").to_string();
    assert_eq!(
        pipeline::parse_date(&shown),
        Some(date),
        "date does not round-trip"
    );
    if let Some(given) = given {
        assert_eq!(given.as_str(), Some(shown.as_str()), "date changed");
    }
}

pub fn check_hrv_record(r: &HrvRecord) {
    check_time(r.captured_at);
    assert!(!r.user_id.contains('\0'), "user id with NUL accepted");
    assert!(r.rmssd.is_finite() && r.rmssd > 0.0, "rMSSD {} accepted", r.rmssd);
    assert!(r.ln_rmssd.is_finite(), "lnRMSSD {} stored", r.ln_rmssd);
    assert!(
        r.readiness_score.is_finite() && (0.0..=100.0).contains(&r.readiness_score),
        "readinessScore {}",
        r.readiness_score
    );
    check_date(r.date, None);
    let vendor = r.vendor.map(Vendor::as_str).unwrap_or("unknown");
    let body = HrvRow::of(r, vendor, 1).body();
    let n: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rec = &n["record"];
    assert!(rec["rMSSD"].is_number(), "rMSSD not a JSON number: {rec}");
    assert!(rec["lnRMSSD"].is_number(), "lnRMSSD not a JSON number: {rec}");
    assert!(rec["readinessScore"].is_number());
    assert!(matches!(
        rec["vendor"].as_str(),
        Some("oura" | "whoop" | "unknown")
    ));
    // The numbers read back from the body are the stored ones, within 2 ULP, not exactly:
    // serde_json's default float parser is not correctly rounded (no `float_roundtrip`
    // feature), see docs/RELIABILITY.md, "Findings".
    let back = |k: &str| rec[k].as_f64().unwrap_or(f64::NAN);
    assert!(
        ulps_close(back("rMSSD"), r.rmssd) && ulps_close(back("lnRMSSD"), r.ln_rmssd),
        "normalized event does not round-trip: {n} vs {r:?}"
    );
    assert!(
        ulps_close(back("readinessScore"), r.readiness_score),
        "readinessScore does not round-trip: {n} vs {r:?}"
    );
    let at = rec["capturedAt"].as_str().unwrap_or_default();
    assert_eq!(
        DateTime::parse_from_rfc3339(at)
            .map(|t| t.timestamp_millis())
            .ok(),
        Some(r.captured_at.timestamp_millis()),
        "capturedAt does not round-trip"
    );
}

fn check_hrv_event(body: &[u8], r: &HrvRecord) {
    check_hrv_record(r);
    let p = payload(body);
    check_user_id(&r.user_id, p.get("userId"));
    check_date(r.date, p.get("date"));
    let given_rmssd = p.get("rMSSD").or_else(|| p.get("rmssd")).and_then(Value::as_f64);
    assert_eq!(given_rmssd, Some(r.rmssd), "rMSSD changed");
    // lnRMSSD: the given value when there is one, else ln(rMSSD) exactly.
    let given_ln = [p.get("lnRMSSD"), p.get("lnRmssd")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect::<Vec<_>>();
    if given_ln.is_empty() {
        assert_eq!(r.ln_rmssd, r.rmssd.ln(), "ln_rmssd != ln(rmssd)");
    } else {
        assert!(
            given_ln.contains(&r.ln_rmssd) || r.ln_rmssd == r.rmssd.ln(),
            "ln_rmssd {} is neither given nor ln(rmssd)",
            r.ln_rmssd
        );
    }
    let at = p.get("capturedAt").and_then(Value::as_str).unwrap_or_default();
    let given = DateTime::parse_from_rfc3339(at.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc));
    match given {
        Some(given) => assert_truncated(given, r.captured_at),
        None => panic!("capturedAt {at:?} accepted"),
    }
    let source = p.get("raw").and_then(|raw| raw.get("source"));
    match source {
        None | Some(Value::Null) => assert_eq!(r.vendor, None),
        Some(Value::String(s)) => assert_eq!(r.vendor, Some(Vendor::from_source(s))),
        Some(_) => assert_eq!(r.vendor, Some(Vendor::Unknown)),
    }
}

pub fn check_sleep_record(r: &SleepRecord) {
    check_time(r.captured_at);
    assert!(!r.user_id.contains('\0'), "user id with NUL accepted");
    assert!(
        (0..=1440).contains(&r.duration_minutes),
        "duration {}",
        r.duration_minutes
    );
    if let Some(q) = r.quality_score {
        assert!((0..=100).contains(&q), "qualityScore {q}");
    }
    check_date(r.date, None);
    let vendor = r.vendor.map(Vendor::as_str).unwrap_or("unknown");
    let body = SleepRow::of(r, vendor, 1).body();
    let n: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let rec = &n["record"];
    assert_eq!(
        rec["durationMinutes"].as_i64(),
        Some(i64::from(r.duration_minutes))
    );
    assert_eq!(
        rec.get("qualityScore").and_then(Value::as_i64),
        r.quality_score.map(i64::from)
    );
}

fn check_sleep_event(body: &[u8], r: &SleepRecord) {
    check_sleep_record(r);
    let p = payload(body);
    check_user_id(&r.user_id, p.get("userId"));
    check_date(r.date, p.get("date"));
    let given = p
        .get("durationMinutes")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN);
    assert!((0.0..=1440.0).contains(&given), "duration {given} accepted");
    assert!(
        (f64::from(r.duration_minutes) - given).abs() <= 0.5,
        "duration {given} rounded to {}",
        r.duration_minutes
    );
    match p.get("capturedAt") {
        None | Some(Value::Null) => {
            assert!(r.captured_at_defaulted);
            // The message's JetStream timestamp, never processing time.
            assert_truncated(stable_time(), r.captured_at);
        }
        Some(at) => {
            assert!(!r.captured_at_defaulted);
            let given = at
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
                .map(|t| t.with_timezone(&Utc));
            match given {
                Some(given) => assert_truncated(given, r.captured_at),
                None => panic!("capturedAt {at} accepted"),
            }
        }
    }
    let q = p
        .get("raw")
        .and_then(|raw| raw.get("qualityScore"))
        .and_then(Value::as_f64);
    if let (Some(given), Some(stored)) = (q, r.quality_score) {
        let clamped = given.clamp(0.0, 100.0);
        assert!(
            (f64::from(stored) - clamped).abs() <= 0.5,
            "score {given} → {stored}"
        );
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn check_oura(body: &[u8], msg_id: Option<&str>, w: &oura::OuraWebhook) {
    let root = root(body);
    check_user_id(&w.user_id, root.get("user_id"));
    assert_eq!(
        w.payload,
        Value::Object(root.clone()),
        "stored payload differs from the body"
    );
    match msg_id.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => assert_eq!(w.idempotency_key, id),
        None => {
            assert_eq!(w.idempotency_key, oura::sha256_hex(body));
            assert_eq!(w.idempotency_key.len(), 64);
            assert!(w.idempotency_key.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
    assert!(
        !has_nul(&w.payload),
        "a body with NUL accepted (JSONB refuses it)"
    );
    if let Some(t) = w.timestamp {
        check_time(t);
        let given = root
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
            .map(|t| t.with_timezone(&Utc));
        match given {
            Some(given) => assert_truncated(given, t),
            None => panic!("timestamp {:?} accepted", root.get("timestamp")),
        }
    }
    let data_value = root.get("data");
    let data = data_value.and_then(Value::as_object);
    let present = |k: &str| data.and_then(|d| d.get(k)).is_some_and(|v| !v.is_null());
    let invalid = |section: &str| w.invalid_sections.iter().any(|s| s.section == section);
    for s in &w.invalid_sections {
        assert!(
            oura::SECTIONS.contains(&s.section),
            "unknown section {}",
            s.section
        );
        let text = s.error.to_string();
        assert!(
            !text.is_empty() && text.len() <= 256,
            "section error of {} bytes",
            text.len()
        );
    }
    assert_eq!(
        invalid(oura::SECTION_DATA),
        data_value.is_some_and(|d| !d.is_null() && !d.is_object()),
        "data reported invalid iff it is present and not an object"
    );
    // Every present section is either derived or reported, never both, never silently dropped.
    for (key, section, derived) in [
        ("hrv", oura::SECTION_HRV, w.hrv.is_some()),
        ("sleep", oura::SECTION_SLEEP, w.sleep.is_some()),
    ] {
        assert_eq!(
            derived || invalid(section),
            present(key),
            "{section} present iff derived or reported invalid"
        );
        assert!(
            !(derived && invalid(section)),
            "{section} both derived and invalid"
        );
    }
    if let Some(h) = &w.hrv {
        check_hrv_record(h);
        assert_eq!(h.user_id, w.user_id);
        assert_eq!(h.ln_rmssd, h.rmssd.ln(), "derived lnRMSSD != ln(rmssd)");
        assert_eq!(h.vendor, Some(Vendor::Oura));
        assert_eq!(Some(h.captured_at), w.timestamp);
        assert_eq!(
            h.date,
            h.captured_at.date_naive(),
            "date is not the UTC date of timestamp"
        );
    }
    if let Some(s) = &w.sleep {
        check_sleep_record(s);
        assert_eq!(s.user_id, w.user_id);
        assert_eq!(s.vendor, Some(Vendor::Oura));
        assert_eq!(Some(s.captured_at), w.timestamp);
        assert_eq!(s.date, s.captured_at.date_naive());
        assert!(!s.captured_at_defaulted);
        let hours = data
            .and_then(|d| d.get("sleep"))
            .and_then(|s| s.get("duration"))
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        assert!((f64::from(s.duration_minutes) - hours * 60.0).abs() <= 0.5);
    }
}
