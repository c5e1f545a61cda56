//! Publishing the normalized events with the PubAcks of a batch collected on one subscription
//! (issue 18): a missing PubAck is a publish failure, never an ack; no stream for the subject is
//! retried; once the events can be stored, every message is acked and every normalized event
//! is in the stream once.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use normalize_service::config::StreamNames;
use normalize_service::topology::{self, StreamSpec};

use crate::support::*;

const NORMALIZED: &str = "athlete-ally.hrv.normalized-stored";

/// The core stream without the normalized subjects: raw events are delivered, their
/// normalized events find no stream (until the test adds the subject).
fn topology_without_normalized() -> Vec<StreamSpec> {
    let n = StreamNames::default();
    let mut core = topology::core_spec(&n, 1);
    core.subjects = vec![HRV_SUBJECT.into(), SLEEP_SUBJECT.into()];
    vec![core, topology::vendor_spec(&n, 1), topology::dlq_spec(&n, 1)]
}

async fn add_normalized_subject(js: &jetstream::Context) {
    let mut config = js
        .get_stream("AA_CORE_HOT")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.subjects.push(NORMALIZED.into());
    js.update_stream(config).await.unwrap();
}

async fn normalized_in_stream(js: &jetstream::Context) -> u64 {
    let s = js.get_stream("AA_CORE_HOT").await.unwrap();
    let info = s.info_with_subjects(NORMALIZED).await.unwrap();
    let mut n = 0;
    let mut subjects = info;
    while let Some(Ok((_, count))) = subjects.next().await {
        n += count as u64;
    }
    n
}

async fn acked_floor(js: &jetstream::Context) -> u64 {
    let s = js.get_stream("AA_CORE_HOT").await.unwrap();
    s.consumer_info("normalize-hrv-durable")
        .await
        .unwrap()
        .ack_floor
        .stream_sequence
}

fn stack_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("NORMALIZE_RETRY_BACKOFF_MS", "200"),
        ("NORMALIZE_HRV_MAX_DELIVER", "1000"),
        ("HRV_BATCH_SIZE", "50"),
    ]
}

async fn publish_events(js: &jetstream::Context, prefix: &str, n: usize) {
    for i in 0..n {
        publish(
            js,
            HRV_SUBJECT,
            hrv_event(
                &format!("{prefix}-{i}"),
                "2025-03-01",
                40.0 + i as f64,
                "2025-03-01T06:00:00Z",
            ),
        )
        .await;
    }
}

/// No stream captures the normalized subject: every publish gets "no responders", the messages
/// are NAKed (rows committed, nothing acked), and once the subject is added they are announced
/// once each and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stream_for_the_normalized_events_is_retried_never_acked() {
    let (stack, app) = Stack::builder()
        .topology(topology_without_normalized())
        .env(&stack_env())
        .app()
        .await;
    publish_events(&stack.js, "nostream", 20).await;
    let pool = stack.pool().await;
    wait_for("the rows committed", Duration::from_secs(20), || async {
        count(
            &pool,
            "SELECT count(*) FROM hrv_data WHERE user_id LIKE 'nostream-%'",
        )
        .await
            == 20
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acked_floor(&stack.js).await,
        0,
        "nothing acked without its normalized event"
    );
    add_normalized_subject(&stack.js).await;
    wait_drained(&stack.js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(
        normalized_in_stream(&stack.js).await,
        20,
        "each event announced once"
    );
    assert_eq!(stream_messages(&stack.js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

/// Something answers on the subject but never with a PubAck (a core subscriber that swallows
/// it): after the batch's deadline the publishes count as failed and the messages are NAKed,
/// not acked; once a stream stores them, each is announced once and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_that_never_comes_is_a_failure_not_an_ack() {
    let (stack, app) = Stack::builder()
        .topology(topology_without_normalized())
        .env(&stack_env())
        .app()
        .await;
    let client = stack.nats.client().await;
    let swallow = client.subscribe(NORMALIZED).await.unwrap();
    client.flush().await.unwrap();
    publish_events(&stack.js, "silent", 10).await;
    let pool = stack.pool().await;
    wait_for("the rows committed", Duration::from_secs(20), || async {
        count(
            &pool,
            "SELECT count(*) FROM hrv_data WHERE user_id LIKE 'silent-%'",
        )
        .await
            == 10
    })
    .await;
    // Past the 5 s PubAck deadline: still nothing acked, and the messages came back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(acked_floor(&stack.js).await, 0, "a missing PubAck must not ack");
    let info = stack
        .js
        .get_stream("AA_CORE_HOT")
        .await
        .unwrap()
        .consumer_info("normalize-hrv-durable")
        .await
        .unwrap()
        .clone();
    assert!(
        info.num_redelivered > 0 || info.delivered.stream_sequence >= 10,
        "the messages were NAKed and redelivered: {info:?}"
    );
    drop(swallow);
    add_normalized_subject(&stack.js).await;
    wait_drained(&stack.js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(
        normalized_in_stream(&stack.js).await,
        10,
        "each event announced once"
    );
    assert_eq!(stream_messages(&stack.js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}
