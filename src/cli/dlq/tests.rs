use std::time::Duration;

use async_nats::header::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::letters::{exit_code_for, rfc3339, ItemResult};
use super::print::body_view;
use super::*;
use crate::dlq::{
    idempotency_msg_id, REPLAYED_FROM, REPLAY_ORIGINAL_MSG_ID, REPLAY_ORIGINAL_SEQUENCE,
    REPLAY_ORIGINAL_STREAM, REPLAY_ORIGINAL_TIMESTAMP,
};

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
fn replay_headers_keep_the_original_and_drop_bookkeeping() {
    let mut dead = HeaderMap::new();
    dead.insert("Nats-Msg-Id", "dlq:AA_CORE_HOT:7");
    dead.insert("Dlq-Reason", "max-deliver");
    dead.insert("Dlq-Original-Msg-Id", "ingest-42");
    dead.insert("dlq-error", "lower-case too");
    dead.insert("Nats-Expected-Last-Sequence", "3");
    dead.insert("Trace-Id", "t1");
    dead.append("Multi", "a");
    dead.append("Multi", "b");
    let h = replay_headers(&dead, "AA_DLQ", 12);
    assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "replay:AA_DLQ:12");
    assert_eq!(h.get("Dlq-Replayed-From").unwrap().as_str(), "AA_DLQ:12");
    assert_eq!(h.get("Replay-Original-Msg-Id").unwrap().as_str(), "ingest-42");
    assert_eq!(h.get("Trace-Id").unwrap().as_str(), "t1");
    assert_eq!(h.get_all("Multi").count(), 2);
    for gone in [
        "Dlq-Reason",
        "Dlq-Original-Msg-Id",
        "dlq-error",
        "Nats-Expected-Last-Sequence",
    ] {
        assert!(h.get(gone).is_none(), "{gone}");
    }
}

#[test]
fn replays_are_keyed_by_the_first_publishers_id() {
    let mut first = HeaderMap::new();
    first.insert("Nats-Msg-Id", "ingest-42");
    assert_eq!(idempotency_msg_id(Some(&first)), Some("ingest-42"));
    assert_eq!(idempotency_msg_id(None), None);
    let mut dead = HeaderMap::new();
    dead.insert("Dlq-Original-Msg-Id", "ingest-42");
    let replay = replay_headers(&dead, "AA_DLQ", 3);
    assert_eq!(idempotency_msg_id(Some(&replay)), Some("ingest-42"));
    let anonymous = replay_headers(&HeaderMap::new(), "AA_DLQ", 4);
    assert_eq!(idempotency_msg_id(Some(&anonymous)), None);
}

/// The dead letter the daemon writes for `msg` (stream AA_CORE_HOT unless replayed elsewhere).
fn letter_of(msg: &HeaderMap, stream: &str, seq: u64, published: &str) -> HeaderMap {
    let origin = crate::dlq::Origin {
        subject: "athlete-ally.sleep.raw-received",
        stream,
        seq,
        durable: "d",
        delivered: 1,
        published: DateTime::parse_from_rfc3339(published)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
    };
    crate::dlq::dead_letter_headers(Some(msg), &origin, crate::dlq::Reason::NonRetryable, "e")
}

#[test]
fn the_first_origin_survives_two_rounds() {
    let mut first = HeaderMap::new();
    first.insert("Nats-Msg-Id", "ingest-42");
    first.insert("Trace-Id", "t1");
    let first_at = "2025-03-01T06:00:00.123456789Z";
    let letter1 = letter_of(&first, "AA_CORE_HOT", 17, first_at);
    assert_eq!(letter1.get("Dlq-Original-Timestamp").unwrap().as_str(), first_at);
    let replay1 = replay_headers(&letter1, "AA_DLQ", 3);
    let expected = [
        (REPLAY_ORIGINAL_MSG_ID, "ingest-42"),
        (REPLAY_ORIGINAL_STREAM, "AA_CORE_HOT"),
        (REPLAY_ORIGINAL_SEQUENCE, "17"),
        (REPLAY_ORIGINAL_TIMESTAMP, first_at),
    ];
    for (name, value) in expected {
        assert_eq!(
            replay1.get(name).map(|v| v.as_str()),
            Some(value),
            "round 1 {name}"
        );
    }
    // The replay is stored at AA_CORE_HOT:90 an hour later and dead-lettered again.
    let letter2 = letter_of(&replay1, "AA_CORE_HOT", 90, "2025-03-01T07:00:00Z");
    assert_eq!(letter2.get("Dlq-Original-Msg-Id").unwrap().as_str(), "ingest-42");
    assert_eq!(letter2.get("Dlq-Original-Sequence").unwrap().as_str(), "90");
    let replay2 = replay_headers(&letter2, "AA_DLQ", 8);
    for (name, value) in expected {
        assert_eq!(
            replay2.get(name).map(|v| v.as_str()),
            Some(value),
            "round 2 {name}"
        );
        assert_eq!(replay2.get_all(name).count(), 1, "{name} repeated");
    }
    assert_eq!(replay2.get("Nats-Msg-Id").unwrap().as_str(), "replay:AA_DLQ:8");
    assert_eq!(replay2.get(REPLAYED_FROM).unwrap().as_str(), "AA_DLQ:8");
    assert_eq!(replay2.get("Trace-Id").unwrap().as_str(), "t1");
    let published = DateTime::parse_from_rfc3339("2025-03-01T08:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let origin = crate::dlq::event_origin(Some(&replay2), "AA_CORE_HOT", 120, published);
    assert_eq!(origin.stream, "AA_CORE_HOT");
    assert_eq!(origin.seq, 17);
    assert_eq!(crate::dlq::precise_time(origin.time), first_at);
    assert_eq!(origin.msg_id.as_deref(), Some("ingest-42"));

    // Without a publisher's id, no round invents one (least of all `replay:…`).
    let anonymous = HeaderMap::new();
    let letter1 = letter_of(&anonymous, "AA_CORE_HOT", 18, first_at);
    let replay1 = replay_headers(&letter1, "AA_DLQ", 4);
    let letter2 = letter_of(&replay1, "AA_CORE_HOT", 91, "2025-03-01T07:00:00Z");
    let replay2 = replay_headers(&letter2, "AA_DLQ", 9);
    assert!(replay2.get(REPLAY_ORIGINAL_MSG_ID).is_none());
    assert_eq!(replay2.get(REPLAY_ORIGINAL_SEQUENCE).unwrap().as_str(), "18");
    assert_eq!(idempotency_msg_id(Some(&replay2)), None);

    // A letter written before dead letters kept the event's identity: its
    // Dlq-Original-Msg-Id is the replay's own id, and it is not taken for the event's.
    let mut old = HeaderMap::new();
    old.insert(REPLAYED_FROM, "AA_DLQ:4");
    old.insert("Dlq-Original-Msg-Id", "replay:AA_DLQ:4");
    assert!(replay_headers(&old, "AA_DLQ", 10)
        .get(REPLAY_ORIGINAL_MSG_ID)
        .is_none());
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
}
