//! The batch pipeline (issue #5): same-key collapsing inside a batch, and unroll-and-retry
//! when a batch statement fails for a non-transient reason.
//!
//! Events are published while no daemon runs, so the first pull delivers them together.

use std::time::Duration;

use async_nats::jetstream;
use normalize_service::config::StreamNames;
use normalize_service::topology;
use serde_json::Value;
use sqlx::Row;

use crate::support::*;

const DURABLE: &str = "normalize-hrv-durable";
const STREAM: &str = "AA_CORE_HOT";
const NORMALIZED: &str = "athlete-ally.hrv.normalized-stored";

async fn create_core_stream(js: &jetstream::Context) {
    js.create_stream(topology::core_spec(&StreamNames::default(), 1).to_config())
        .await
        .unwrap();
}

fn hrv(user: &str, rmssd: f64, captured_at: &str) -> String {
    hrv_event(user, "2025-03-01", rmssd, captured_at)
}

async fn normalized_events(js: &jetstream::Context) -> Vec<Value> {
    stream_contents(js, STREAM)
        .await
        .into_iter()
        .filter(|m| m.subject.as_str() == NORMALIZED)
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_in_a_batch_newest_wins_and_all_are_acked() {
    let stack = Stack::start().await;
    let js = &stack.js;
    create_core_stream(js).await;
    // Key "dup": the newest capturedAt (second message) wins. Key "tie": same capturedAt, the
    // highest stream sequence wins. Written one at a time in stream order, both keys would
    // have been written twice and announced twice.
    let _dup1 = publish(js, HRV_SUBJECT, hrv("dup", 10.0, "2025-03-01T06:00:00Z")).await;
    let dup2 = publish(js, HRV_SUBJECT, hrv("dup", 20.0, "2025-03-01T08:00:00Z")).await;
    let _dup3 = publish(js, HRV_SUBJECT, hrv("dup", 30.0, "2025-03-01T07:00:00Z")).await;
    let _tie1 = publish(js, HRV_SUBJECT, hrv("tie", 40.0, "2025-03-01T05:00:00Z")).await;
    let tie2 = publish(js, HRV_SUBJECT, hrv("tie", 50.0, "2025-03-01T05:00:00Z")).await;
    let solo = publish(js, HRV_SUBJECT, hrv("solo", 60.0, "2025-03-01T05:00:00Z")).await;

    let app = stack.spawn_app().await;
    wait_for("durable bound", Duration::from_secs(20), || async {
        consumer_backlog(js, STREAM, DURABLE).await.is_some()
    })
    .await;
    wait_drained(js, STREAM, DURABLE).await;

    let pool = stack.pool().await;
    let rows = sqlx::query("SELECT user_id, rmssd, source_seq FROM hrv_data ORDER BY user_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let got: Vec<(String, f64, i64)> = rows
        .iter()
        .map(|r| (r.get("user_id"), r.get("rmssd"), r.get("source_seq")))
        .collect();
    assert_eq!(
        got,
        vec![
            ("dup".to_string(), 20.0, dup2 as i64),
            ("solo".to_string(), 60.0, solo as i64),
            ("tie".to_string(), 50.0, tie2 as i64),
        ]
    );

    // One normalized event per stored row: the superseded records were acked unannounced.
    wait_for("normalized events", Duration::from_secs(10), || async {
        normalized_events(js).await.len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = normalized_events(js).await;
    let mut announced: Vec<(String, f64)> = events
        .iter()
        .map(|v| {
            (
                v["record"]["userId"].as_str().unwrap().to_string(),
                v["record"]["rMSSD"].as_f64().unwrap(),
            )
        })
        .collect();
    announced.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        announced,
        vec![
            ("dup".to_string(), 20.0),
            ("solo".to_string(), 60.0),
            ("tie".to_string(), 50.0)
        ]
    );

    assert_eq!(stream_messages(js, "AA_DLQ").await, 0, "nothing dead-lettered");
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "normalize_hrv_messages_total", &[("result", "success")]),
        Some(6.0),
        "every message acked as a success"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "normalize_batch_superseded_messages_total",
            &[("consumer", "hrv")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&metrics, "normalize_batch_unrolled_total", &[("consumer", "hrv")]),
        Some(0.0),
        "the batch statement itself succeeded"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_violation_mid_batch_dead_letters_only_that_record() {
    // First run: migrations and topology.
    let (stack, app) = Stack::builder().app().await;
    app.stop().await.unwrap();
    // A non-transient failure the decoder cannot foresee (SQLSTATE 23514), on this test's own
    // database only.
    let pool = stack.pool().await;
    sqlx::query("ALTER TABLE hrv_data ADD CONSTRAINT test_rmssd_cap CHECK (rmssd < 1000)")
        .execute(&pool)
        .await
        .unwrap();

    let js = &stack.js;
    let mut seqs = Vec::new();
    for (i, rmssd) in [41.0, 42.0, 5000.0, 44.0, 45.0].into_iter().enumerate() {
        seqs.push(
            publish(
                js,
                HRV_SUBJECT,
                hrv(&format!("u{i}"), rmssd, "2025-03-01T06:00:00Z"),
            )
            .await,
        );
    }
    let bad = seqs[2];

    let app = stack.spawn_app().await;
    wait_for("dead letter", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await >= 1
    })
    .await;
    wait_drained(js, STREAM, DURABLE).await;

    let users: Vec<String> = sqlx::query_scalar("SELECT user_id FROM hrv_data ORDER BY user_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        users,
        vec!["u0", "u1", "u3", "u4"],
        "the rest of the batch is stored"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(letters.len(), 1, "only the bad record is dead-lettered");
    let l = &letters[0];
    assert_eq!(l.subject.as_str(), "dlq.normalize.hrv.raw-received.non-retryable");
    let h = |n: &str| {
        l.headers
            .get(n)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(h("Dlq-Reason"), "non-retryable");
    assert_eq!(h("Dlq-Original-Sequence"), bad.to_string());
    assert_eq!(h("Dlq-Delivery-Count"), "1", "dead-lettered at once, not retried");

    let events = normalized_events(js).await;
    assert_eq!(events.len(), 4, "one normalized event per stored row");

    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "normalize_batch_unrolled_total", &[("consumer", "hrv")]),
        Some(1.0),
        "the batch statement failed once and was retried message by message"
    );
    assert_eq!(
        metric_value(&metrics, "normalize_hrv_messages_total", &[("result", "success")]),
        Some(4.0)
    );
    assert_eq!(
        metric_value(&metrics, "normalize_hrv_messages_total", &[("result", "dlq")]),
        Some(1.0)
    );
    app.stop().await.unwrap();
}

/// Batches in flight at once (`HRV_PIPELINE_DEPTH`) write concurrently. Here every batch
/// touches the same few keys in a shuffled order: without a common lock order two batches would
/// deadlock (SQLSTATE 40P01); with it they wait for each other. A third of the events name no
/// vendor, so many batches write `hrv_data` in several statements (runs with and without a
/// vendor), which must keep the key order across statements too. No deadlock may happen at all
/// (not even one retried inside the write), the newest `captured_at` of every key must end in
/// the table, and every message must be acked exactly once, first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_sharing_keys_keep_the_newest_and_never_deadlock() {
    const KEYS: usize = 12;
    const PER_KEY: usize = 60;
    let stack = Stack::builder()
        .env(&[("HRV_BATCH_SIZE", "6"), ("HRV_PIPELINE_DEPTH", "4")])
        .start()
        .await;
    let js = &stack.js;
    create_core_stream(js).await;

    // Event j of key k is captured at minute perm(j): a different order per key, so the
    // newest of a key is anywhere in the stream. Keys are interleaved in a shuffled order
    // (a fixed LCG, so a failure reproduces).
    let mut events: Vec<(usize, usize)> = (0..KEYS)
        .flat_map(|k| (0..PER_KEY).map(move |j| (k, j)))
        .collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..events.len()).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        events.swap(i, (state >> 33) as usize % (i + 1));
    }
    let minute = |k: usize, j: usize| (j * 7 + k * 13) % PER_KEY; // a bijection of j for each k
    let mut sends = Vec::with_capacity(events.len());
    for &(k, j) in &events {
        let m = minute(k, j);
        let mut body: Value = serde_json::from_str(&hrv(
            &format!("k{k:02}"),
            (1 + m) as f64,
            &format!("2025-03-01T06:{m:02}:00Z"),
        ))
        .unwrap();
        if (k + j) % 3 == 0 {
            body["payload"].as_object_mut().unwrap().remove("raw");
        }
        let body = body.to_string();
        sends.push(js.publish(HRV_SUBJECT, body.into()).await.unwrap());
    }
    for ack in sends {
        ack.await.unwrap();
    }

    let app = stack.spawn_app().await;
    wait_for("durable bound", Duration::from_secs(20), || async {
        consumer_backlog(js, STREAM, DURABLE).await.is_some()
    })
    .await;
    wait_drained(js, STREAM, DURABLE).await;

    let pool = stack.pool().await;
    let rows = sqlx::query("SELECT user_id, rmssd, to_char(captured_at AT TIME ZONE 'UTC', 'HH24:MI') AS at FROM hrv_data ORDER BY user_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let got: Vec<(String, f64, String)> = rows
        .iter()
        .map(|r| (r.get("user_id"), r.get("rmssd"), r.get("at")))
        .collect();
    let want: Vec<(String, f64, String)> = (0..KEYS)
        .map(|k| {
            (
                format!("k{k:02}"),
                PER_KEY as f64,
                format!("06:{:02}", PER_KEY - 1),
            )
        })
        .collect();
    assert_eq!(got, want, "the newest capturedAt of every key is stored");

    let total = (KEYS * PER_KEY) as f64;
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "normalize_hrv_messages_total", &[("result", "success")]),
        Some(total),
        "every message acked as a success"
    );
    for result in ["retry", "dlq", "schema_invalid"] {
        assert!(
            metric_value(&metrics, "normalize_hrv_messages_total", &[("result", result)]).unwrap_or(0.0)
                == 0.0,
            "no message ended as {result}"
        );
    }
    let info = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .consumer_info(DURABLE)
        .await
        .unwrap();
    assert_eq!(
        info.num_redelivered, 0,
        "nothing was redelivered (no deadlock, no NAK)"
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0, "nothing dead-lettered");
    // Not even a deadlock retried inside a write (PostgreSQL counts them per database; its
    // statistics are flushed within a second of a transaction's end).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadlocks: i64 =
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(deadlocks, 0, "no transaction was chosen as a deadlock victim");
    let batches = metric_value(
        &metrics,
        "normalize_batch_duration_seconds_count",
        &[("consumer", "hrv")],
    );
    assert!(
        batches.is_some_and(|b| b >= total / 6.0),
        "processed in batches of at most 6: {batches:?}"
    );
    app.stop().await.unwrap();
}
