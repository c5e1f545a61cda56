//! Property tests of the pure decoders (`pipeline::decode`): no servers.
//!
//! Generated valid events decode and keep the normalization invariants (lnRMSSD consistency,
//! dates that round-trip, sleep rounding and bounds, score clamping, a bounded vendor set);
//! arbitrary bytes, arbitrary JSON and single-field corruptions of valid events never panic and
//! never produce a record that breaks an invariant. The invariants themselves are shared with the
//! fuzz targets (`fuzz/src/invariants.rs`). `PROPTEST_CASES` raises the number of cases.
//!
//! Event times are kept at microseconds and at most `MAX_FUTURE_SKEW_MS` ahead of processing time;
//! a user id never holds NUL, nor an Oura body anywhere (PostgreSQL text and JSONB refuse it).

use chrono::{DateTime, Duration as ChronoDuration, FixedOffset, NaiveDate, SecondsFormat, TimeZone, Utc};
use normalize_service::config::ConsumerKind;
use normalize_service::pipeline::{to_micros, Decoded, SchemaError, Vendor};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{json, Map, Value};

#[path = "../../fuzz/src/invariants.rs"]
#[allow(dead_code)]
mod invariants;

use invariants::{check, ulps_close};

fn config() -> ProptestConfig {
    // 512 cases per property by default; PROPTEST_CASES overrides (the env var wins).
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// --- generators ----------------------------------------------------------------------------

/// A user id the spec accepts: 1..=128 characters, not blank (any Unicode, controls included,
/// except NUL, which PostgreSQL text cannot hold).
fn user_id() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(proptest::char::range('a', 'z'), 1..=128),
        proptest::collection::vec(any::<char>(), 1..=128),
    ]
    .prop_map(|cs| {
        cs.into_iter()
            .map(|c| if c == '\0' { '\u{1}' } else { c })
            .collect::<String>()
    })
    .prop_filter("not blank", |s| !s.trim().is_empty())
}

/// Any calendar date of years 1000..=9999 (four-digit years, as `YYYY-MM-DD` requires).
fn date() -> impl Strategy<Value = NaiveDate> {
    let first = NaiveDate::from_ymd_opt(1000, 1, 1).unwrap();
    let last = NaiveDate::from_ymd_opt(9999, 12, 31).unwrap();
    (0..=(last - first).num_days()).prop_map(move |d| first + ChronoDuration::days(d))
}

/// An instant with a UTC offset of -23:59..=+23:59, rendered as RFC 3339 in several styles, at
/// most `MAX_FUTURE_SKEW_MS` after the decoders' "now" (with sub-microsecond digits, which are
/// truncated at decode).
fn timestamp() -> impl Strategy<Value = (DateTime<Utc>, String)> {
    timestamp_in(0, invariants::latest().timestamp())
}

/// A time too far in the future: from just past `now + MAX_FUTURE_SKEW_MS` to year 9999.
fn future_timestamp() -> impl Strategy<Value = (DateTime<Utc>, String)> {
    timestamp_in(invariants::latest().timestamp() + 1, 253_402_214_400)
}

fn timestamp_in(from_secs: i64, to_secs: i64) -> impl Strategy<Value = (DateTime<Utc>, String)> {
    (
        // With milli/micro/nanosecond fractions.
        from_secs..to_secs,
        0u32..1_000_000_000,
        -(24 * 60 - 1)..(24 * 60),
        0..3usize,
    )
        .prop_map(|(secs, nanos, offset_min, style)| {
            // The millisecond style cannot carry finer fractions: generate whole milliseconds.
            let nanos = if style == 2 {
                nanos - nanos % 1_000_000
            } else {
                nanos
            };
            let utc = Utc.timestamp_opt(secs, nanos).single().unwrap();
            let offset = FixedOffset::east_opt(offset_min * 60).unwrap();
            let local = utc.with_timezone(&offset);
            let text = match style {
                0 => local.to_rfc3339_opts(SecondsFormat::AutoSi, false),
                1 => local.to_rfc3339_opts(SecondsFormat::Nanos, false),
                _ => utc.to_rfc3339_opts(SecondsFormat::Millis, true),
            };
            (utc, text)
        })
}

/// A positive finite rMSSD, from subnormal to huge.
fn rmssd() -> impl Strategy<Value = f64> {
    prop_oneof![
        1.0f64..300.0,
        (f64::MIN_POSITIVE / 1e10)..1.0,
        any::<f64>().prop_filter("positive finite", |v| v.is_finite() && *v > 0.0),
    ]
}

/// `raw.source`: known vendors in any case and padding, other strings, or non-strings.
fn source() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        (
            prop_oneof![
                Just("oura"),
                Just("whoop"),
                Just("garmin"),
                Just(""),
                Just("ourа")
            ],
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(s, upper, pad)| {
                let s = if upper { s.to_uppercase() } else { s.to_string() };
                Some(json!(if pad { format!("  {s}\t") } else { s }))
            }),
        any::<i32>().prop_map(|n| Some(json!(n))),
    ]
}

fn expected_vendor(source: &Option<Value>) -> Option<Vendor> {
    match source {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let v = match s.trim().to_ascii_lowercase().as_str() {
                "oura" => Vendor::Oura,
                "whoop" => Vendor::Whoop,
                _ => Vendor::Unknown,
            };
            Some(v)
        }
        Some(_) => Some(Vendor::Unknown),
    }
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        proptest::collection::vec(any::<char>(), 0..24)
            .prop_map(|c| json!(c.into_iter().collect::<String>())),
        prop_oneof![
            Just("2025-03-01"),
            Just("2024-02-29"),
            Just("2025-02-30"),
            Just("2025-03-01T00:00:00Z"),
            Just("payload"),
            Just("userId"),
            Just("oura"),
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Object keys: mostly the ones the decoders read, so the generator reaches deep code paths.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop_oneof![
            Just("payload"), Just("eventId"), Just("userId"), Just("date"), Just("rMSSD"),
            Just("rmssd"), Just("lnRMSSD"), Just("lnRmssd"), Just("capturedAt"), Just("raw"),
            Just("source"), Just("readinessScore"), Just("durationMinutes"), Just("qualityScore"),
            Just("user_id"), Just("timestamp"), Just("data"), Just("hrv"), Just("sleep"),
            Just("duration"), Just("score"),
        ]
        .prop_map(str::to_string),
        1 => proptest::collection::vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect()),
    ]
}

// --- valid HRV --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct HrvCase {
    user: String,
    date: NaiveDate,
    rmssd: f64,
    legacy_keys: bool,
    ln: Option<f64>,
    captured: (DateTime<Utc>, String),
    source: Option<Value>,
    readiness: Option<f64>,
}

fn hrv_case() -> impl Strategy<Value = HrvCase> {
    (
        user_id(),
        date(),
        rmssd(),
        any::<bool>(),
        proptest::option::of(-1e6f64..1e6),
        timestamp(),
        source(),
        proptest::option::of(-50.0f64..150.0),
    )
        .prop_map(
            |(user, date, rmssd, legacy_keys, ln, captured, source, readiness)| HrvCase {
                user,
                date,
                rmssd,
                legacy_keys,
                ln,
                captured,
                source,
                readiness,
            },
        )
}

fn hrv_body(c: &HrvCase) -> Vec<u8> {
    let (rk, lk) = if c.legacy_keys {
        ("rmssd", "lnRmssd")
    } else {
        ("rMSSD", "lnRMSSD")
    };
    let mut p = Map::new();
    p.insert("userId".into(), json!(c.user));
    p.insert("date".into(), json!(c.date.format("%Y-%m-%d").to_string()));
    p.insert(rk.into(), json!(c.rmssd));
    if let Some(ln) = c.ln {
        p.insert(lk.into(), json!(ln));
    }
    p.insert("capturedAt".into(), json!(c.captured.1));
    let mut raw = Map::new();
    if let Some(s) = &c.source {
        raw.insert("source".into(), s.clone());
    }
    if let Some(r) = c.readiness {
        raw.insert("readinessScore".into(), json!(r));
    }
    p.insert("raw".into(), Value::Object(raw));
    serde_json::to_vec(&json!({"eventId": "e", "payload": p})).unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_hrv_events_normalize(c in hrv_case()) {
        let body = hrv_body(&c);
        let r = match check(ConsumerKind::Hrv, &body, None) {
            Ok(Decoded::Hrv(r)) => r,
            other => panic!("valid HRV event refused: {other:?}\n{}", String::from_utf8_lossy(&body)),
        };
        prop_assert_eq!(&r.user_id, &c.user);
        prop_assert_eq!(r.date, c.date);
        // serde_json's default float parsing may land 1 ULP off the shortest representation.
        prop_assert!(ulps_close(r.rmssd, c.rmssd), "{} vs {}", r.rmssd, c.rmssd);
        match c.ln {
            // lnRMSSD absent: exactly ln of the stored rMSSD.
            None => prop_assert_eq!(r.ln_rmssd, r.rmssd.ln()),
            Some(ln) => prop_assert!(ulps_close(r.ln_rmssd, ln), "{} vs {}", r.ln_rmssd, ln),
        }
        prop_assert!(r.ln_rmssd.is_finite());
        prop_assert_eq!(r.captured_at, to_micros(c.captured.0));
        prop_assert_eq!(r.vendor, expected_vendor(&c.source));
        let readiness = c.readiness.filter(|s| (0.0..=100.0).contains(s)).unwrap_or(0.0);
        prop_assert!(ulps_close(r.readiness_score, readiness), "{} vs {}", r.readiness_score, readiness);
    }

    #[test]
    fn hrv_rmssd_must_be_positive(c in hrv_case(), bad in prop_oneof![Just(0.0f64), Just(-0.0), -1e300f64..0.0]) {
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        let k = if c.legacy_keys { "rmssd" } else { "rMSSD" };
        v["payload"][k] = json!(bad);
        let e = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("payload.rMSSD"), "{}", e);
    }

    #[test]
    fn invalid_dates_are_refused(c in hrv_case(), y in 0u32..10000, m in 0u32..16, d in 0u32..40) {
        let text = format!("{y:04}-{m:02}-{d:02}");
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        v["payload"]["date"] = json!(text);
        let result = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None);
        match NaiveDate::from_ymd_opt(y as i32, m, d) {
            Some(real) => prop_assert!(matches!(result, Ok(Decoded::Hrv(r)) if r.date == real)),
            None => prop_assert!(result.unwrap_err().to_string().contains("payload.date")),
        }
    }

    /// A schema error names the field, never echoes the personal data in the event.
    #[test]
    fn errors_never_echo_the_user_id(c in hrv_case(), field in 0..5usize, junk in json_value()) {
        let secret = format!("SECRET-{}", c.user.len());
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        v["payload"]["userId"] = json!(secret);
        let k = ["date", "rMSSD", "capturedAt", "raw", "userId"][field];
        if k == "userId" {
            v["payload"]["userId"] = json!(format!("{secret}{}", "x".repeat(130)));
        } else {
            v["payload"][k] = junk;
        }
        if let Err(e) = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None) {
            prop_assert!(!e.to_string().contains("SECRET"), "{}", e);
        }
    }
}

// --- valid sleep --------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_sleep_events_normalize(
        user in user_id(),
        date in date(),
        minutes in prop_oneof![0.0f64..=1440.0, Just(0.0), Just(1440.0), Just(0.5), Just(1439.5), (0u32..=1440).prop_map(f64::from)],
        captured in proptest::option::of(timestamp()),
        source in source(),
        quality in proptest::option::of(prop_oneof![-1e9f64..1e9, -10.0f64..110.0]),
    ) {
        let mut p = json!({"userId": user, "date": date.format("%Y-%m-%d").to_string(), "durationMinutes": minutes});
        if let Some((_, text)) = &captured { p["capturedAt"] = json!(text); }
        let mut raw = Map::new();
        if let Some(s) = &source { raw.insert("source".into(), s.clone()); }
        if let Some(q) = quality { raw.insert("qualityScore".into(), json!(q)); }
        p["raw"] = Value::Object(raw);
        let body = serde_json::to_vec(&json!({"payload": p})).unwrap();
        let r = match check(ConsumerKind::Sleep, &body, None) {
            Ok(Decoded::Sleep(r)) => r,
            other => panic!("valid sleep event refused: {other:?}"),
        };
        // Nearest minute, halves away from zero, within 0..=1440.
        prop_assert_eq!(r.duration_minutes, minutes.round() as i32);
        prop_assert!((0..=1440).contains(&r.duration_minutes));
        prop_assert_eq!(r.quality_score, quality.map(|q| q.clamp(0.0, 100.0).round() as i32));
        prop_assert_eq!(r.date, date);
        prop_assert_eq!(r.vendor, expected_vendor(&source));
        match captured {
            Some((at, _)) => { prop_assert_eq!(r.captured_at, to_micros(at)); prop_assert!(!r.captured_at_defaulted); }
            None => {
                // The message's JetStream timestamp at PostgreSQL's precision, never processing time.
                prop_assert_eq!(r.captured_at, to_micros(invariants::stable_time()));
                prop_assert!(r.captured_at_defaulted);
            }
        }
    }

    #[test]
    fn sleep_outside_a_day_is_refused(
        minutes in prop_oneof![(1440.0f64 + 1e-6)..1e12, -1e12f64..-1e-6, Just(f64::MAX), Just(-f64::MAX)],
    ) {
        let body = json!({"payload": {"userId": "u", "date": "2025-03-01", "durationMinutes": minutes}}).to_string();
        let e = check(ConsumerKind::Sleep, body.as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("payload.durationMinutes"), "{}", e);
    }
}

// --- Oura webhooks ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn oura_webhooks_derive_bounded_records(
        user in user_id(),
        ts in timestamp(),
        rmssd in proptest::option::of(rmssd()),
        hours in proptest::option::of(prop_oneof![0.0f64..=24.0, Just(24.0), Just(0.0)]),
        score in proptest::option::of(-1e6f64..1e6),
        msg_id in proptest::option::of(prop_oneof![Just(""), Just("  "), Just("id-1"), Just(" id-2 ")]),
    ) {
        let mut data = Map::new();
        if let Some(r) = rmssd { data.insert("hrv".into(), json!({"rmssd": r, "sdnn": 1.5})); }
        if let Some(h) = hours {
            let mut s = json!({"duration": h});
            if let Some(q) = score { s["score"] = json!(q); }
            data.insert("sleep".into(), s);
        }
        let body = serde_json::to_vec(&json!({"user_id": user, "timestamp": ts.1, "data": data})).unwrap();
        let w = match check(ConsumerKind::Oura, &body, msg_id) {
            Ok(Decoded::Oura(w)) => w,
            other => panic!("valid webhook refused: {other:?}"),
        };
        prop_assert_eq!(w.timestamp, Some(to_micros(ts.0)));
        prop_assert!(w.invalid_sections.is_empty());
        prop_assert_eq!(w.hrv.is_some(), rmssd.is_some());
        if let (Some(h), Some(r)) = (&w.hrv, rmssd) {
            prop_assert!(ulps_close(h.rmssd, r), "{} vs {}", h.rmssd, r);
        }
        if let Some(h) = &w.hrv {
            prop_assert_eq!(h.ln_rmssd, h.rmssd.ln());
            prop_assert_eq!(h.date, to_micros(ts.0).date_naive());
        }
        prop_assert_eq!(w.sleep.as_ref().map(|s| s.duration_minutes), hours.map(|h| (h * 60.0).round() as i32));
        if let Some(s) = &w.sleep {
            prop_assert_eq!(s.quality_score, score.map(|q| q.clamp(0.0, 100.0).round() as i32));
        }
    }
}

// --- times, NUL and partially valid webhooks ----------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// A time beyond `now + MAX_FUTURE_SKEW_MS` would pin its row: refused, naming the field.
    #[test]
    fn future_times_beyond_the_skew_are_refused(c in hrv_case(), future in future_timestamp(), sleep_has_hrv in any::<bool>()) {
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        v["payload"]["capturedAt"] = json!(future.1);
        let e = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("payload.capturedAt"), "{}", e);
        let sleep = json!({"payload": {"userId": "u", "date": "2025-03-01", "durationMinutes": 30, "capturedAt": future.1}});
        let e = check(ConsumerKind::Sleep, sleep.to_string().as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("payload.capturedAt"), "{}", e);
        // An Oura webhook is still stored; every section it has is reported, none derived.
        let mut data = json!({"sleep": {"duration": 7}});
        if sleep_has_hrv { data["hrv"] = json!({"rmssd": 40}); }
        let hook = json!({"user_id": "u", "timestamp": future.1, "data": data});
        let w = match check(ConsumerKind::Oura, hook.to_string().as_bytes(), None) {
            Ok(Decoded::Oura(w)) => w,
            other => panic!("webhook with a future timestamp refused whole: {other:?}"),
        };
        prop_assert!(w.hrv.is_none() && w.sleep.is_none() && w.timestamp.is_none());
        prop_assert_eq!(w.invalid_sections.len(), if sleep_has_hrv { 2 } else { 1 });
        prop_assert!(w.invalid_sections.iter().all(|s| s.error.to_string().contains("timestamp")));
    }

    /// A NUL anywhere in a user id is refused at decode (PostgreSQL text: SQLSTATE 22021), and
    /// anywhere in an Oura body (JSONB: 22P05).
    #[test]
    fn nul_is_refused_at_decode(c in hrv_case(), at in any::<prop::sample::Index>(), junk in json_value(), in_key in any::<bool>()) {
        let mut chars: Vec<char> = c.user.chars().collect();
        chars.insert(at.index(chars.len() + 1), '\0');
        let user: String = chars.into_iter().collect();
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        v["payload"]["userId"] = json!(user);
        let e = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("payload.userId"), "{}", e);
        let sleep = json!({"payload": {"userId": user, "date": "2025-03-01", "durationMinutes": 30}});
        prop_assert!(check(ConsumerKind::Sleep, sleep.to_string().as_bytes(), None).is_err());
        let hook = json!({"user_id": user});
        prop_assert!(check(ConsumerKind::Oura, hook.to_string().as_bytes(), None).is_err());
        // Elsewhere in a webhook: nested under junk, as a value or as a key.
        let nul = if in_key { json!({"k\u{0}": 1}) } else { json!(["x\u{0}y"]) };
        let hook = json!({"user_id": "u", "extra": junk, "data": {"hrv": {"deep": {"deeper": nul}}}});
        let e = check(ConsumerKind::Oura, hook.to_string().as_bytes(), None).unwrap_err();
        prop_assert!(e.to_string().contains("NUL"), "{}", e);
    }

    /// An Oura webhook with a usable user_id is always stored: a bad section is reported, the
    /// good one still derived.
    #[test]
    fn oura_bad_sections_do_not_lose_the_webhook(
        ts in timestamp(),
        bad_hrv in any::<bool>(),
        // NUL refuses the whole body (tested above).
        junk in json_value().prop_filter("no NUL", |v| !v.to_string().contains("\\u0000")),
    ) {
        let good_hrv = json!({"rmssd": 40});
        let good_sleep = json!({"duration": 7});
        let bad = match &junk { Value::Object(_) | Value::Null => json!({"rmssd": -1, "duration": 99}), j => j.clone() };
        let data = if bad_hrv { json!({"hrv": bad, "sleep": good_sleep}) } else { json!({"hrv": good_hrv, "sleep": bad}) };
        let hook = json!({"user_id": "u", "timestamp": ts.1, "data": data});
        let w = match check(ConsumerKind::Oura, hook.to_string().as_bytes(), Some("id")) {
            Ok(Decoded::Oura(w)) => w,
            other => panic!("webhook with one bad section refused whole: {other:?}"),
        };
        let sections: Vec<&str> = w.invalid_sections.iter().map(|s| s.section).collect();
        prop_assert_eq!(sections, vec![if bad_hrv { "data.hrv" } else { "data.sleep" }]);
        prop_assert_eq!(w.hrv.is_some(), !bad_hrv);
        prop_assert_eq!(w.sleep.is_some(), bad_hrv);
        prop_assert_eq!(w.payload, hook);
    }
}

// --- hostile input --------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        for kind in ConsumerKind::ALL {
            let _ = check(kind, &bytes, None);
        }
        let _ = check(ConsumerKind::Oura, &bytes, Some("id"));
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        let body = v.to_string();
        let wrapped = json!({"payload": v.clone()}).to_string();
        for kind in ConsumerKind::ALL {
            let _ = check(kind, body.as_bytes(), None);
            let _ = check(kind, wrapped.as_bytes(), None);
        }
    }

    /// One field of a valid event replaced by anything: refused with a schema error naming a
    /// field, or accepted with every invariant intact.
    #[test]
    fn corrupted_fields_never_break_invariants(c in hrv_case(), field in key(), junk in json_value(), nest in any::<bool>()) {
        let mut v: Value = serde_json::from_slice(&hrv_body(&c)).unwrap();
        if nest {
            v["payload"][field.as_str()] = junk.clone();
        } else {
            v[field.as_str()] = junk.clone();
        }
        let _ = check(ConsumerKind::Hrv, v.to_string().as_bytes(), None);
        let sleep = json!({"payload": {"userId": "u", "date": "2025-03-01", "durationMinutes": 30, (field.clone()): junk.clone()}});
        let _ = check(ConsumerKind::Sleep, sleep.to_string().as_bytes(), None);
        let oura = json!({"user_id": "u", "timestamp": "2025-03-01T00:00:00Z", "data": {(field): junk}});
        let _ = check(ConsumerKind::Oura, oura.to_string().as_bytes(), None);
    }

    /// Truncating a valid event anywhere gives a clean JSON error, never a panic or a record.
    #[test]
    fn truncated_events_are_refused(c in hrv_case(), cut in 0.0f64..1.0) {
        let body = hrv_body(&c);
        let at = ((body.len() as f64) * cut) as usize;
        let at = at.min(body.len() - 1);
        let e = check(ConsumerKind::Hrv, &body[..at], None).unwrap_err();
        prop_assert!(matches!(e, SchemaError::Json(_)), "{}", e);
    }
}

/// The checks are not vacuous: refused inputs are refused, and a record that breaks a bound is
/// caught by the shared invariants.
#[test]
fn invariant_checks_can_fail() {
    let refused = [
        (
            ConsumerKind::Hrv,
            r#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":0,"capturedAt":"2025-03-01T00:00:00Z"}}"#,
        ),
        (
            ConsumerKind::Sleep,
            r#"{"payload":{"userId":"u","date":"2025-03-01","durationMinutes":1441}}"#,
        ),
        (ConsumerKind::Oura, r#"{"timestamp":"2025-03-01T00:00:00Z"}"#),
    ];
    for (kind, body) in refused {
        assert!(check(kind, body.as_bytes(), None).is_err(), "{kind}: {body}");
    }
    let caught = std::panic::catch_unwind(|| {
        invariants::check_sleep_record(&normalize_service::pipeline::SleepRecord {
            user_id: "u".into(),
            date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
            duration_minutes: 1441,
            quality_score: Some(101),
            vendor: None,
            captured_at: invariants::now(),
            captured_at_defaulted: false,
            event_id: None,
        })
    });
    assert!(caught.is_err(), "the sleep invariant must reject 1441 minutes");
    let valid = normalize_service::pipeline::SleepRecord {
        user_id: "u".into(),
        date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
        duration_minutes: 60,
        quality_score: None,
        vendor: None,
        captured_at: invariants::now(),
        captured_at_defaulted: false,
        event_id: None,
    };
    invariants::check_sleep_record(&valid);
    let broken = [
        normalize_service::pipeline::SleepRecord {
            captured_at: invariants::now() + ChronoDuration::nanoseconds(1),
            ..valid.clone()
        },
        normalize_service::pipeline::SleepRecord {
            captured_at: invariants::latest() + ChronoDuration::microseconds(1),
            ..valid.clone()
        },
        normalize_service::pipeline::SleepRecord {
            user_id: "a\0".into(),
            ..valid.clone()
        },
    ];
    for r in broken {
        let shown = format!("{r:?}");
        assert!(
            std::panic::catch_unwind(|| invariants::check_sleep_record(&r)).is_err(),
            "not caught: {shown}"
        );
    }
}
