//! Sleep and Oura consumers beside HRV (issue #3): valid, invalid and retry paths per
//! consumer, webhook idempotency, derived rows, and independence of the three loops.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Row;

use crate::support::*;

fn sleep_event(user: &str, date: &str, minutes: f64, source: &str) -> String {
    json!({"payload": {"userId": user, "date": date, "durationMinutes": minutes,
        "capturedAt": "2025-03-01T08:00:00Z", "raw": {"source": source, "qualityScore": 82.6}}})
    .to_string()
}

fn webhook(user: &str, hrv: Option<f64>, sleep_hours: Option<f64>) -> String {
    let mut data = serde_json::Map::new();
    if let Some(r) = hrv {
        data.insert("hrv".into(), json!({"rmssd": r, "sdnn": 52.8}));
    }
    if let Some(h) = sleep_hours {
        data.insert("sleep".into(), json!({"duration": h, "score": 83}));
    }
    json!({"user_id": user, "timestamp": "2025-03-01T07:00:00Z", "data": data}).to_string()
}

per_mode!(sleep_valid_invalid_and_rounding);
async fn sleep_valid_invalid_and_rounding(mode: &str) {
    let (stack, app) = Stack::builder().mode(mode).app().await;
    let js = &stack.js;
    let core = core_stream(mode);
    publish(js, SLEEP_SUBJECT, sleep_event("s1", "2025-03-01", 420.5, "Oura")).await;
    publish(
        js,
        SLEEP_SUBJECT,
        r#"{"payload":{"userId":"s2","date":"2025-03-01","durationMinutes":2000}}"#,
    )
    .await;
    let pool = stack.pool().await;
    wait_for("sleep row", Duration::from_secs(15), || async {
        count(&pool, "SELECT count(*) FROM sleep_data").await == 1
    })
    .await;
    wait_drained(js, core, "normalize-sleep-durable").await;
    let row =
        sqlx::query("SELECT duration_minutes, quality_score, vendor, captured_at_defaulted FROM sleep_data")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        row.get::<i32, _>("duration_minutes"),
        421,
        "420.5 rounds half away from zero"
    );
    assert_eq!(row.get::<Option<i32>, _>("quality_score"), Some(83));
    assert_eq!(row.get::<String, _>("vendor"), "oura");
    assert!(!row.get::<bool, _>("captured_at_defaulted"));
    let core_hot = js.get_stream(core).await.unwrap();
    let n = core_hot
        .get_last_raw_message_by_subject("athlete-ally.sleep.normalized-stored")
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(
        v["record"]["vendor"], "oura",
        "same mapping in the row and the event"
    );
    assert_eq!(v["record"]["durationMinutes"], 421);
    assert_eq!(v["record"]["qualityScore"], 83);
    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].subject.as_str(),
        "dlq.normalize.sleep.raw-received.schema-invalid"
    );

    // A later event without the optional quality score does not erase the stored one.
    let later = json!({"payload": {"userId": "s1", "date": "2025-03-01", "durationMinutes": 400,
            "capturedAt": "2025-03-01T09:00:00Z"}})
    .to_string();
    publish(js, SLEEP_SUBJECT, later).await;
    wait_for("sleep update", Duration::from_secs(15), || async {
        count(
            &pool,
            "SELECT count(*) FROM sleep_data WHERE duration_minutes = 400",
        )
        .await
            == 1
    })
    .await;
    let (q, vendor): (Option<i32>, String) = sqlx::query_as("SELECT quality_score, vendor FROM sleep_data")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(q, Some(83));
    assert_eq!(vendor, "oura");
    let m = app.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "normalize_sleep_messages_total",
            &[("result", "success"), ("stream", core)]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "normalize_sleep_messages_total",
            &[("result", "schema_invalid")]
        ),
        Some(1.0)
    );
    app.stop().await.unwrap();
}

per_mode!(oura_webhook_is_stored_once_and_derives_rows);
async fn oura_webhook_is_stored_once_and_derives_rows(mode: &str) {
    let (stack, app) = Stack::builder().mode(mode).app().await;
    let js = &stack.js;
    let (core, vendor_stream) = (core_stream(mode), vendor_stream(mode));
    let body = webhook("o1", Some(45.2), None);
    // Published twice (no Nats-Msg-Id: the body hash is the key) — one raw row, one HRV row.
    publish(js, OURA_SUBJECT, body.clone()).await;
    publish(js, OURA_SUBJECT, body.clone()).await;
    // Same logical webhook retried by ingest with a Nats-Msg-Id outside the dedupe window.
    publish_with_id(js, OURA_SUBJECT, "hook-2", webhook("o2", None, Some(7.01))).await;
    // Not an object / no user_id.
    publish(js, OURA_SUBJECT, "[1,2,3]").await;
    publish(js, OURA_SUBJECT, r#"{"timestamp":"2025-03-01T07:00:00Z"}"#).await;
    wait_drained(js, vendor_stream, "normalize-oura").await;
    let pool = stack.pool().await;
    wait_for("webhook rows", Duration::from_secs(15), || async {
        count(&pool, "SELECT count(*) FROM vendor_webhook_events").await == 2
    })
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 1);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM hrv_data WHERE user_id='o1' AND vendor='oura' AND date='2025-03-01'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sleep_data").await,
        1,
        "sleep-only webhook: only a sleep row"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id='o2'").await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM sleep_data WHERE user_id='o2' AND duration_minutes=421"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM vendor_webhook_events WHERE idempotency_key='hook-2'"
        )
        .await,
        1
    );
    let payload: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM vendor_webhook_events WHERE user_id='o1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        payload,
        serde_json::from_str::<Value>(&body).unwrap(),
        "stored raw"
    );
    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(letters.len(), 2);
    assert!(letters
        .iter()
        .all(|l| l.subject.as_str() == "dlq.vendor.oura.webhook.schema-invalid"));
    // Derived events are published as normalized events too, vendor `oura`.
    let core_hot = js.get_stream(core).await.unwrap();
    let n = core_hot
        .get_last_raw_message_by_subject("athlete-ally.hrv.normalized-stored")
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(v["record"]["vendor"], "oura");
    assert!(n
        .headers
        .get("Nats-Msg-Id")
        .unwrap()
        .as_str()
        .ends_with(":hrv:v1"));
    let m = app.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "normalize_oura_messages_total",
            &[
                ("result", "success"),
                ("stream", vendor_stream),
                ("durable", "normalize-oura")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "normalize_oura_messages_total",
            &[("result", "schema_invalid")]
        ),
        Some(2.0)
    );
    app.stop().await.unwrap();
}

per_mode!(every_consumer_retries_through_a_database_outage);
async fn every_consumer_retries_through_a_database_outage(mode: &str) {
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(&[
            ("NORMALIZE_HRV_MAX_DELIVER", "1000"),
            ("NORMALIZE_SLEEP_MAX_DELIVER", "1000"),
            ("NORMALIZE_OURA_MAX_DELIVER", "1000"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "500"),
        ])
        .mode(mode)
        .app()
        .await;
    stack.proxy().cut();
    let js = &stack.js;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("r", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    publish(js, SLEEP_SUBJECT, sleep_event("r", "2025-03-01", 400.0, "whoop")).await;
    publish(js, OURA_SUBJECT, webhook("r2", Some(30.0), Some(6.0))).await;
    wait_for("retries on every consumer", Duration::from_secs(20), || async {
        let m = app.metrics().await;
        [
            "normalize_hrv_messages_total",
            "normalize_sleep_messages_total",
            "normalize_oura_messages_total",
        ]
        .iter()
        .all(|name| metric_value(&m, name, &[("result", "retry")]).unwrap_or(0.0) >= 2.0)
    })
    .await;
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    stack.proxy().restore().await;
    let pool = stack.pool().await;
    wait_for("rows after recovery", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 2
            && count(&pool, "SELECT count(*) FROM sleep_data").await == 2
            && count(&pool, "SELECT count(*) FROM vendor_webhook_events").await == 1
    })
    .await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sleep_data WHERE vendor='whoop'").await,
        1
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_consumer_does_not_slow_the_others() {
    // No dead-letter stream: every invalid sleep message keeps coming back.
    let names = normalize_service::config::StreamNames::default();
    let stack = Stack::builder()
        .env(&[("NORMALIZE_RETRY_BACKOFF_MS", "50")])
        .topology(vec![
            normalize_service::topology::core_spec(&names, 1),
            normalize_service::topology::vendor_spec(&names, 1),
        ])
        .start()
        .await;
    let js = &stack.js;
    for i in 0..50 {
        publish(js, SLEEP_SUBJECT, format!("poison-{i}")).await;
    }
    let app = stack.app().await;
    for i in 0..20 {
        publish(
            js,
            HRV_SUBJECT,
            hrv_event(&format!("h{i}"), "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
        )
        .await;
        publish(js, OURA_SUBJECT, webhook(&format!("o{i}"), None, Some(7.0))).await;
    }
    let pool = stack.pool().await;
    wait_for("hrv and oura keep flowing", Duration::from_secs(20), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 20
            && count(&pool, "SELECT count(*) FROM vendor_webhook_events").await == 20
    })
    .await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    wait_drained(js, "AA_VENDOR_HOT", "normalize-oura").await;
    let (code, h) = app.health().await;
    assert_eq!(code, 200);
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["consumers"]["sleep"]["deadLetter"], "unavailable", "{h}");
    assert_eq!(h["consumers"]["hrv"]["deadLetter"], "ok");
    assert_eq!(h["consumers"]["oura"]["deadLetter"], "ok");
    let (pending, ack_pending) = consumer_backlog(js, "AA_CORE_HOT", "normalize-sleep-durable")
        .await
        .unwrap();
    assert_eq!(
        pending + ack_pending as u64,
        50,
        "poison kept, never acked without a dead letter"
    );
    // The only sleep rows are those derived from the Oura webhooks.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sleep_data WHERE vendor = 'oura'").await,
        20
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM sleep_data").await, 20);
    app.stop().await.unwrap();
}

/// A JSON value of `levels` levels, each of 120 arrays around an object whose only key is
/// serde_json's private `$serde_json::private::RawValue`, the level below escaped into its string
/// value. Read by `serde_json::Value` (with the `raw_value` feature sqlx switches on) every level
/// is parsed again with a fresh depth limit: tens of thousands of levels, a stack overflow.
fn nested_through_the_private_key(levels: usize) -> String {
    let escaped = |s: &str| format!("\"{}\"", s.replace('\\', "\\u005c").replace('"', "\\u0022"));
    let mut inner = "1".to_string();
    for _ in 0..levels {
        inner = format!(
            "{}{{\"$serde_json::private::RawValue\":{}}}{}",
            "[".repeat(120),
            escaped(&inner),
            "]".repeat(120)
        );
    }
    inner
}

/// Message content cannot abort the daemon through serde_json's private key: a webhook, an HRV
/// event and a sleep event that nest ~35,000 levels through it (each under 1 MiB) are processed
/// like any other. The webhook is stored exactly as received, the core events are stored (the key
/// is an unknown field), and the daemon goes on to store the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_raw_value_key_cannot_abort_the_daemon() {
    let stack = Stack::builder().mode("multi").start().await;
    let mut daemon = stack.daemon().await;
    let js = &stack.js;
    let deep = nested_through_the_private_key(290);
    let webhook = format!(r#"{{"user_id":"deep-o","timestamp":"2025-03-01T07:00:00Z","x":{deep}}}"#);
    assert!(webhook.len() < 1_000_000, "{} bytes", webhook.len());
    publish(js, OURA_SUBJECT, webhook.clone()).await;
    publish(
        js,
        HRV_SUBJECT,
        format!(
            r#"{{"payload":{{"userId":"deep-h","date":"2025-03-01","rMSSD":40,"capturedAt":"2025-03-01T06:00:00Z","x":{deep}}}}}"#
        ),
    )
    .await;
    publish(
        js,
        SLEEP_SUBJECT,
        format!(
            r#"{{"payload":{{"userId":"deep-s","date":"2025-03-01","durationMinutes":400,"x":{deep}}}}}"#
        ),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("after", "2025-03-01", 41.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_for("every row", Duration::from_secs(30), || async {
        count(
            &pool,
            "SELECT count(*) FROM hrv_data WHERE user_id IN ('deep-h', 'after')",
        )
        .await
            == 2
            && count(&pool, "SELECT count(*) FROM sleep_data WHERE user_id = 'deep-s'").await == 1
            && count(&pool, "SELECT count(*) FROM vendor_webhook_events").await == 1
    })
    .await;
    assert!(daemon.exited().is_none(), "the daemon is still running");
    // As text: sqlx would read JSONB into a `Value` through the very quirk under test.
    let stored: String = sqlx::query_scalar("SELECT payload::text FROM vendor_webhook_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let stored = normalize_service::pipeline::parse_json(stored.as_bytes()).unwrap();
    let received = normalize_service::pipeline::parse_json(webhook.as_bytes()).unwrap();
    assert_eq!(stored, received, "the webhook is stored as received");
    assert!(
        stored["x"].to_string().contains("$serde_json::private::RawValue"),
        "the key is kept as a key"
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
}
