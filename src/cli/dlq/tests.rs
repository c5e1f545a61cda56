use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::letters::{exit_code_for, rfc3339, ItemResult};
use super::print::body_view;
use super::*;

#[test]
fn since_accepts_rfc3339_and_durations() {
    assert_eq!(parse_since("30m"), Ok(Since::Ago(Duration::from_secs(1800))));
    assert_eq!(parse_since("2h"), Ok(Since::Ago(Duration::from_secs(7200))));
    assert_eq!(parse_since("7d"), Ok(Since::Ago(Duration::from_secs(7 * 86400))));
    assert_eq!(parse_since("1w"), Ok(Since::Ago(Duration::from_secs(7 * 86400))));
    assert_eq!(parse_since("90s"), Ok(Since::Ago(Duration::from_secs(90))));
    let t = DateTime::parse_from_rfc3339("2025-03-01T02:00:00+02:00").unwrap();
    assert_eq!(
        parse_since("2025-03-01T02:00:00+02:00"),
        Ok(Since::At(t.with_timezone(&Utc)))
    );
    for bad in [
        "",
        "m",
        "5",
        "5x",
        "-5m",
        "2025-03-01",
        "1.5h",
        "99999999999999999999d",
    ] {
        assert!(parse_since(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn since_ago_is_relative_to_now() {
    let now = DateTime::parse_from_rfc3339("2025-03-02T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(
        rfc3339(Since::Ago(Duration::from_secs(86400)).resolve(now)),
        "2025-03-01T00:00:00.000Z"
    );
    assert_eq!(
        Since::Ago(Duration::from_secs(u64::MAX)).resolve(now),
        DateTime::<Utc>::MIN_UTC
    );
}

#[test]
fn consumer_is_found_by_prefix_then_durable() {
    let c = Config::from_vars([
        ("NORMALIZE_HRV_DLQ_SUBJECT".to_string(), "dlq.a".to_string()),
        ("NORMALIZE_SLEEP_DLQ_SUBJECT".to_string(), "dlq.a.b".to_string()),
    ])
    .unwrap();
    assert_eq!(
        consumer_of(&c, "dlq.a.max-deliver", None),
        Some(ConsumerKind::Hrv)
    );
    assert_eq!(
        consumer_of(&c, "dlq.a.b.max-deliver", None),
        Some(ConsumerKind::Sleep)
    );
    assert_eq!(
        consumer_of(&c, "dlq.vendor.oura.webhook.schema-invalid", None),
        Some(ConsumerKind::Oura)
    );
    // "dlq.ab" is not under "dlq.a".
    assert_eq!(consumer_of(&c, "dlq.ab.x", None), None);
    assert_eq!(
        consumer_of(&c, "dlq.moved.x", Some("normalize-oura")),
        Some(ConsumerKind::Oura)
    );
    assert_eq!(consumer_of(&c, "dlq.moved.x", Some("someone-else")), None);
}

#[test]
fn body_view_prefers_json_then_text_then_hex() {
    assert_eq!(body_view(br#"{"a":1}"#).0, "json");
    assert_eq!(body_view(b"{broken").0, "text");
    assert_eq!(body_view(&[0xff, 0x00]), ("hex", Value::String("ff00".into())));
}

#[test]
fn failures_outrank_not_found() {
    let r = |result| ItemResult {
        dlq_sequence: 1,
        result,
        consumer: None,
        reason: None,
        original_subject: None,
        replayed_to: None,
        purged: false,
        error: None,
    };
    assert_eq!(exit_code_for(&[r("replayed"), r("duplicate")]), 0);
    assert_eq!(exit_code_for(&[r("replayed"), r("not-found")]), 3);
    assert_eq!(exit_code_for(&[r("not-found"), r("failed")]), 1);
    use super::print::summary_line;
    assert_eq!(
        summary_line(
            "replay",
            &[r("replayed"), r("duplicate"), r("failed"), r("not-found")]
        ),
        "replayed 2 (1 already replayed before: duplicate), failed 1, skipped 1"
    );
    assert_eq!(
        summary_line("purge", &[r("purged"), r("purged")]),
        "purged 2, failed 0, skipped 0"
    );
    assert!(summary_line("purge", &[r("would-purge")]).starts_with("would purge 1 "));
}

#[test]
fn list_rows_are_aligned_cut_and_footed() {
    let letter = |seq: u64, error: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Dlq-Reason", "schema-invalid");
        headers.insert("Dlq-Original-Subject", "athlete-ally.hrv.raw-received");
        headers.insert("Dlq-Original-Stream", "AA_CORE_HOT");
        headers.insert("Dlq-Original-Sequence", seq.to_string().as_str());
        headers.insert("Dlq-Delivery-Count", "1");
        headers.insert("Dlq-Error", error);
        DeadLetter {
            seq,
            time: DateTime::parse_from_rfc3339("2025-03-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            subject: "dlq.normalize.hrv.raw-received".into(),
            consumer: Some(crate::config::ConsumerKind::Hrv),
            headers,
            payload: bytes::Bytes::from_static(b"{}"),
        }
    };
    let long = "x".repeat(300);
    let text = print::list_text("AA_DLQ", &[letter(12345, &long), letter(7, "short")], 40);
    let lines: Vec<&str> = text.as_str().lines().collect();
    assert_eq!(lines.len(), 4, "{}", text.as_str());
    assert!(lines[0].starts_with("  SEQ  TIME"), "{}", lines[0]);
    // The columns line up: each row's TIME starts where the header's does.
    let col = lines[0].find("TIME").unwrap();
    assert_eq!(lines[1].find("2025"), Some(col));
    assert_eq!(lines[2].find("2025"), Some(col));
    assert!(
        lines[1].ends_with('…') && lines[1].chars().count() < 200,
        "{}",
        lines[1]
    );
    assert!(lines[2].ends_with("short"));
    assert_eq!(
        lines[3],
        "showing 2 of 40 dead letters (--limit 0 shows all; `dlq show SEQ` the whole error)"
    );
}
