//! The HRV consumer against real servers: SPEC §1–8 as issue #2 lists them.

use std::time::Duration;

use async_nats::jetstream;
use normalize_service::config::StreamNames;
use normalize_service::topology;
use serde_json::Value;
use sqlx::Row;

use crate::support::*;

test_cases!(valid_event_is_stored_published_and_acked {
    fetch_single: ("fetch", "single"),
    fetch_multi: ("fetch", "multi"),
    stream_single: ("stream", "single"),
    stream_multi: ("stream", "multi"),
});
async fn valid_event_is_stored_published_and_acked(pull_mode: &str, mode: &str) {
    let (stack, app) = Stack::builder()
        .mode(mode)
        .env(&[("HRV_PULL_MODE", pull_mode)])
        .app()
        .await;
    let js = &stack.js;
    let body = hrv_event("user-1", "2025-03-01", 42.5, "2025-03-01T07:30:00+02:00");
    let seq = publish(js, HRV_SUBJECT, body).await;
    let pool = stack.pool().await;
    wait_for("hrv row", Duration::from_secs(15), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 1
    })
    .await;
    let row = sqlx::query(
                "SELECT user_id, date::text AS date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq FROM hrv_data",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
    let stream = core_stream(mode);
    assert_eq!(row.get::<String, _>("user_id"), "user-1");
    assert_eq!(row.get::<String, _>("date"), "2025-03-01");
    assert_eq!(row.get::<f64, _>("rmssd"), 42.5);
    assert!((row.get::<f64, _>("ln_rmssd") - 42.5f64.ln()).abs() < 1e-9);
    assert_eq!(row.get::<String, _>("vendor"), "oura");
    let captured: chrono::DateTime<chrono::Utc> = row.get("captured_at");
    assert_eq!(
        captured.to_rfc3339(),
        "2025-03-01T05:30:00+00:00",
        "the event's capturedAt, not processing time"
    );
    assert_eq!(row.get::<String, _>("source_stream"), stream);
    assert_eq!(row.get::<i64, _>("source_seq"), seq as i64);

    // The normalized event is in the stream, with a deduplicating id.
    let s = js.get_stream(stream).await.unwrap();
    wait_for("normalized event", Duration::from_secs(10), || async {
        s.get_last_raw_message_by_subject("athlete-ally.hrv.normalized-stored")
            .await
            .is_ok()
    })
    .await;
    let normalized = s
        .get_last_raw_message_by_subject("athlete-ally.hrv.normalized-stored")
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&normalized.payload).unwrap();
    assert_eq!(v["record"]["userId"], "user-1");
    assert_eq!(v["record"]["date"], "2025-03-01");
    assert_eq!(v["record"]["rMSSD"], 42.5);
    assert_eq!(v["record"]["vendor"], "oura");
    assert_eq!(v["record"]["readinessScore"], 0);
    assert_eq!(v["record"]["capturedAt"], "2025-03-01T05:30:00.000Z");
    let id = normalized
        .headers
        .get("Nats-Msg-Id")
        .unwrap()
        .as_str()
        .to_string();
    // Named by the event's own identity (its eventId), the kind and the row version,
    // wherever it was stored.
    assert_eq!(id, "evt-user-1-2025-03-01:hrv:v1");
    assert_eq!(v["record"]["version"], 1);

    wait_drained(js, stream, "normalize-hrv-durable").await;
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0, "nothing dead-lettered");
    app.stop().await.unwrap();
}

per_mode!(invalid_events_are_dead_lettered_once_with_headers);
async fn invalid_events_are_dead_lettered_once_with_headers(mode: &str) {
    let (stack, app) = Stack::builder().mode(mode).app().await;
    let js = &stack.js;
    let huge = format!(
        r#"{{"payload":{{"userId":"u","date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z","raw":{{"pad":"{}"}}}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let cases: Vec<(String, &str)> = vec![
            ("{not json".into(), "not valid JSON"),
            (r#"{"payload":{"date":"2025-03-01","rMSSD":4,"capturedAt":"2025-03-01T00:00:00Z"}}"#.into(), "payload.userId"),
            (hrv_event("u", "2025-02-30", 4.0, "2025-03-01T00:00:00Z"), "payload.date"),
            (hrv_event("u", "2025-03-01", 0.0, "2025-03-01T00:00:00Z"), "payload.rMSSD"),
            (hrv_event("u", "2025-03-01", -5.0, "2025-03-01T00:00:00Z"), "payload.rMSSD"),
            (r#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":"NaN","capturedAt":"2025-03-01T00:00:00Z"}}"#.into(), "payload.rMSSD"),
            (r#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":"Infinity","capturedAt":"2025-03-01T00:00:00Z"}}"#.into(), "payload.rMSSD"),
            (r#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":1e400,"capturedAt":"2025-03-01T00:00:00Z"}}"#.into(), "not valid JSON"),
            (huge, "MAX_PAYLOAD_BYTES"),
        ];
    let mut seqs = Vec::new();
    for (i, (body, _)) in cases.iter().enumerate() {
        seqs.push(publish_with_id(js, HRV_SUBJECT, &format!("bad-{i}"), body.clone()).await);
    }
    wait_for("dead letters", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await >= cases.len() as u64
    })
    .await;
    let stream = core_stream(mode);
    wait_drained(js, stream, "normalize-hrv-durable").await;
    // Settle, then check nothing was dead-lettered twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(letters.len(), cases.len());
    for (i, (body, needle)) in cases.iter().enumerate() {
        let l = letters
            .iter()
            .find(|l| {
                l.headers
                    .get("Dlq-Original-Sequence")
                    .map(|v| v.as_str().to_string())
                    == Some(seqs[i].to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for case {i}"));
        assert_eq!(
            l.subject.as_str(),
            "dlq.normalize.hrv.raw-received.schema-invalid"
        );
        assert_eq!(
            &l.payload[..],
            body.as_bytes(),
            "original bytes intact (case {i})"
        );
        let h = |n: &str| {
            l.headers
                .get(n)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        assert_eq!(h("Dlq-Reason"), "schema-invalid");
        assert!(h("Dlq-Error").contains(needle), "case {i}: {}", h("Dlq-Error"));
        assert!(h("Dlq-Error").len() <= 1024);
        assert_eq!(h("Dlq-Original-Subject"), HRV_SUBJECT);
        assert_eq!(h("Dlq-Original-Stream"), stream);
        assert_eq!(h("Dlq-Durable"), "normalize-hrv-durable");
        assert_eq!(h("Dlq-Delivery-Count"), "1");
        assert_eq!(h("Nats-Msg-Id"), format!("dlq:{stream}:{}", seqs[i]));
        assert_eq!(h("Dlq-Original-Msg-Id"), format!("bad-{i}"));
        assert!(chrono::DateTime::parse_from_rfc3339(&h("Dlq-Failed-At")).is_ok());
    }
    // Terminated: the durable has nothing pending or unacked, and no row was written.
    assert_eq!(
        consumer_backlog(js, stream, "normalize-hrv-durable").await,
        Some((0, 0))
    );
    assert_eq!(
        count(&stack.pool().await, "SELECT count(*) FROM hrv_data").await,
        0
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "normalize_hrv_messages_total",
            &[("result", "schema_invalid"), ("stream", stream)]
        ),
        Some(cases.len() as f64)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "dlq_messages_total",
            &[("reason", "schema-invalid"), ("consumer", "hrv")]
        ),
        Some(cases.len() as f64)
    );
    app.stop().await.unwrap();
}

per_mode!(database_outage_retries_without_dead_lettering);
async fn database_outage_retries_without_dead_lettering(mode: &str) {
    let (stack, app) = Stack::builder()
        .db_proxy()
        .mode(mode)
        .env(&[
            ("NORMALIZE_HRV_MAX_DELIVER", "1000"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "500"),
        ])
        .app()
        .await;
    stack.proxy().cut();
    let js = &stack.js;
    for i in 0..5 {
        publish(
            js,
            HRV_SUBJECT,
            hrv_event(&format!("u{i}"), "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
        )
        .await;
    }
    // Retried (NAKed with delay), never dead-lettered, while the database is away.
    wait_for("retries during the outage", Duration::from_secs(20), || async {
        metric_value(
            &app.metrics().await,
            "normalize_hrv_messages_total",
            &[("result", "retry")],
        )
        .unwrap_or(0.0)
            >= 10.0
    })
    .await;
    let (code, health) = app.health().await;
    assert_eq!(code, 503, "not ready while the database is away: {health}");
    assert_eq!(health["database"], "unavailable");
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    stack.proxy().restore().await;
    let pool = stack.pool().await;
    wait_for("all rows after recovery", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 5
    })
    .await;
    wait_drained(js, core_stream(mode), "normalize-hrv-durable").await;
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0, "nothing dead-lettered");
    app.wait_ready().await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failure_on_last_delivery_is_dead_lettered_as_max_deliver() {
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(&[
            ("NORMALIZE_HRV_MAX_DELIVER", "3"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "300"),
        ])
        .app()
        .await;
    stack.proxy().cut();
    let js = &stack.js;
    let body = hrv_event("u", "2025-03-01", 40.0, "2025-03-01T06:00:00Z");
    let seq = publish(js, HRV_SUBJECT, body.clone()).await;
    wait_for("max-deliver dead letter", Duration::from_secs(30), || async {
        stream_messages(js, "AA_DLQ").await == 1
    })
    .await;
    let letters = stream_contents(js, "AA_DLQ").await;
    let l = &letters[0];
    assert_eq!(l.subject.as_str(), "dlq.normalize.hrv.raw-received.max-deliver");
    assert_eq!(l.headers.get("Dlq-Delivery-Count").unwrap().as_str(), "3");
    assert_eq!(
        l.headers.get("Dlq-Original-Sequence").unwrap().as_str(),
        seq.to_string()
    );
    assert_eq!(&l.payload[..], body.as_bytes());
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    stack.proxy().restore().await;
    app.stop().await.unwrap();
}

/// Creates the given streams (and nothing else) the way `topology apply` would.
async fn create_streams(js: &jetstream::Context, specs: &[topology::StreamSpec]) {
    for s in specs {
        js.create_stream(s.to_config()).await.unwrap();
    }
}

per_mode!(dead_letter_unavailable_keeps_the_original_until_dlq_exists);
async fn dead_letter_unavailable_keeps_the_original_until_dlq_exists(mode: &str) {
    let names = StreamNames::default();
    let stream = core_stream(mode);
    // Streams and durables exist, but no stream captures dlq.>.
    let specs = if mode == "single" {
        vec![topology::legacy_spec(&names, 1)]
    } else {
        vec![topology::core_spec(&names, 1), topology::vendor_spec(&names, 1)]
    };
    let (stack, app) = Stack::builder().mode(mode).topology(specs).app().await;
    let js = &stack.js;
    let body = "{broken";
    let seq = publish(js, HRV_SUBJECT, body).await;
    wait_for(
        "dead letter failure reported",
        Duration::from_secs(15),
        || async {
            let (_, h) = app.health().await;
            h["status"] == "degraded" && h["consumers"]["hrv"]["deadLetter"] == "unavailable"
        },
    )
    .await;
    // Neither acked nor terminated: still owed to the durable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (pending, ack_pending) = consumer_backlog(js, stream, "normalize-hrv-durable")
        .await
        .unwrap();
    assert_eq!(pending + ack_pending as u64, 1, "the original is kept");
    let s = js.get_stream(stream).await.unwrap();
    let info = s.consumer_info("normalize-hrv-durable").await.unwrap();
    assert_eq!(info.ack_floor.stream_sequence, seq - 1, "not acked or terminated");
    assert!(
        metric_value(
            &app.metrics().await,
            "normalize_hrv_messages_total",
            &[("result", "retry")]
        )
        .unwrap()
            >= 1.0
    );

    create_streams(js, &[topology::dlq_spec(&names, 1)]).await;
    wait_for(
        "dead letter stored once AA_DLQ exists",
        Duration::from_secs(20),
        || async { stream_messages(js, "AA_DLQ").await == 1 },
    )
    .await;
    wait_drained(js, stream, "normalize-hrv-durable").await;
    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(&letters[0].payload[..], body.as_bytes());
    assert_eq!(
        letters[0].headers.get("Dlq-Reason").unwrap().as_str(),
        "schema-invalid"
    );
    wait_for("health ok again", Duration::from_secs(10), || async {
        app.health().await.1["status"] == "ok"
    })
    .await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mode_falls_back_to_the_legacy_stream() {
    let stack = Stack::builder().mode("multi").start().await;
    let js = &stack.js;
    create_streams(js, &[topology::legacy_spec(&StreamNames::default(), 1)]).await;
    let app = stack.app().await;
    let (code, h) = app.health().await;
    assert_eq!(code, 200);
    assert_eq!(h["mode"], "multi");
    assert_eq!(h["stream"], "ATHLETE_ALLY_EVENTS");
    assert_eq!(h["consumers"]["hrv"]["stream"], "ATHLETE_ALLY_EVENTS");
    assert_eq!(h["consumers"]["hrv"]["fallback"], true);
    // The core stream could not be created: its subjects are held by the legacy stream.
    assert!(js.get_stream("AA_CORE_HOT").await.is_err());
    let m = app.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "normalize_stream_fallback_total",
            &[
                ("consumer", "hrv"),
                ("from", "AA_CORE_HOT"),
                ("to", "ATHLETE_ALLY_EVENTS")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "normalize_consumer_bound",
            &[
                ("consumer", "hrv"),
                ("stream", "ATHLETE_ALLY_EVENTS"),
                ("durable", "normalize-hrv-durable")
            ]
        ),
        Some(1.0)
    );
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("u", "2025-03-01", 30.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_for("row via legacy", Duration::from_secs(15), || async {
        count(
            &pool,
            "SELECT count(*) FROM hrv_data WHERE source_stream = 'ATHLETE_ALLY_EVENTS'",
        )
        .await
            == 1
    })
    .await;
    app.stop().await.unwrap();
}

per_mode!(older_events_never_overwrite_newer_rows);
async fn older_events_never_overwrite_newer_rows(mode: &str) {
    let stream = core_stream(mode);
    let (stack, app) = Stack::builder().mode(mode).app().await;
    let js = &stack.js;
    let pool = stack.pool().await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("u", "2025-03-01", 50.0, "2025-03-01T08:00:00Z"),
    )
    .await;
    wait_for("newer row", Duration::from_secs(15), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 1
    })
    .await;
    // A stale redelivery / replay of an older reading for the same user and day.
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("u", "2025-03-01", 10.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_drained(js, stream, "normalize-hrv-durable").await;
    let rmssd: f64 = sqlx::query_scalar("SELECT rmssd FROM hrv_data WHERE user_id = 'u'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rmssd, 50.0, "older captured_at lost");
    app.stop().await.unwrap();

    // Two events for the same user and date in one batch: both handled, newest wins.
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("v", "2025-03-02", 70.0, "2025-03-02T09:00:00Z"),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("v", "2025-03-02", 20.0, "2025-03-02T05:00:00Z"),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("w", "2025-03-02", 20.0, "2025-03-02T05:00:00Z"),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("w", "2025-03-02", 80.0, "2025-03-02T09:00:00Z"),
    )
    .await;
    let app = stack.spawn_app().await;
    wait_drained(js, stream, "normalize-hrv-durable").await;
    let rows: Vec<(String, f64)> =
        sqlx::query_as("SELECT user_id, rmssd FROM hrv_data WHERE date = '2025-03-02' ORDER BY user_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![("v".to_string(), 70.0), ("w".to_string(), 80.0)]);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_stream_and_durable_labels_with_correct_counts() {
    let (stack, app) = Stack::app_with_env(&[("HRV_DURABLE", "custom-hrv")]).await;
    let js = &stack.js;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("a", "2025-03-01", 30.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("b", "2025-03-01", 31.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    publish(js, HRV_SUBJECT, "[]").await;
    wait_drained(js, "AA_CORE_HOT", "custom-hrv").await;
    for text in [app.metrics().await, {
        normalize_service::http::http_get("127.0.0.1", app.metrics_port, "/metrics", Duration::from_secs(5))
            .await
            .unwrap()
            .1
    }] {
        let labels = |result| {
            [
                ("result", result),
                ("subject", HRV_SUBJECT),
                ("stream", "AA_CORE_HOT"),
                ("durable", "custom-hrv"),
            ]
        };
        assert_eq!(
            metric_value(&text, "normalize_hrv_messages_total", &labels("success")),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            metric_value(&text, "normalize_hrv_messages_total", &labels("schema_invalid")),
            Some(1.0)
        );
        assert_eq!(
            metric_value(&text, "normalize_hrv_messages_total", &labels("retry")),
            Some(0.0)
        );
        assert_eq!(
            metric_value(&text, "normalize_hrv_messages_total", &labels("dlq")),
            Some(0.0)
        );
        assert_eq!(
            metric_value(
                &text,
                "normalize_processing_duration_seconds_count",
                &[
                    ("consumer", "hrv"),
                    ("stream", "AA_CORE_HOT"),
                    ("durable", "custom-hrv")
                ]
            ),
            Some(3.0)
        );
        assert!(text.contains("normalize_build_info{git_revision="));
        assert!(text.contains("normalize_consumer_pending_messages{consumer=\"hrv\",durable=\"custom-hrv\",stream=\"AA_CORE_HOT\"}"));
        // The durable's own setting, for the ack-pending alert: the default, as the daemon
        // created it.
        assert_eq!(
            metric_value(
                &text,
                "normalize_consumer_max_ack_pending",
                &[
                    ("consumer", "hrv"),
                    ("stream", "AA_CORE_HOT"),
                    ("durable", "custom-hrv")
                ]
            ),
            Some(1000.0)
        );
    }
    app.stop().await.unwrap();
}

test_cases!(database_connections_are_named_in_pg_stat_activity {
    by_default: ("", "normalize-service"),
    by_database_url: ("?application_name=blue", "blue"),
});
/// The daemon's connections say who they are in `pg_stat_activity`, unless `DATABASE_URL`
/// names them itself.
async fn database_connections_are_named_in_pg_stat_activity(query: &str, want: &str) {
    let stack = Stack::start().await;
    let app = stack
        .app_with(&[("DATABASE_URL", &format!("{}{query}", stack.db.url))])
        .await;
    let js = &stack.js;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("named", "2025-03-01", 42.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_for("row stored", Duration::from_secs(20), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 1
    })
    .await;
    let names: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(names.iter().any(|n| n == want), "{query}: {names:?}");
    app.stop().await.unwrap();
}
