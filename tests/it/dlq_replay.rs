//! `normalize-service dlq replay` as an operator runs it (issue #8): the binary as a child
//! process against a private nats-server, with the daemon in-process producing real dead
//! letters and storing what is replayed.

use std::time::Duration;

use async_nats::jetstream;
use sqlx::Row;

use crate::dlq_cli::seqs_of;
use crate::support::*;

const DURABLE: &str = "normalize-hrv-durable";

/// Waits until the durable has acked (or terminated) everything up to `seq` of its stream.
async fn wait_processed(js: &jetstream::Context, stream: &str, seq: u64) {
    wait_settled(js, stream, DURABLE, seq).await
}

async fn wait_settled(js: &jetstream::Context, stream: &str, durable: &str, seq: u64) {
    wait_for(
        &format!("{stream}:{seq} settled"),
        Duration::from_secs(30),
        || async {
            let Ok(s) = js.get_stream(stream).await else {
                return false;
            };
            match s.consumer_info(durable).await {
                Ok(i) => i.ack_floor.stream_sequence >= seq && i.num_ack_pending == 0,
                Err(_) => false,
            }
        },
    )
    .await;
}

/// Daemons that give up on a message after two deliveries while the database is away.
const OUTAGE: &[(&str, &str)] = &[
    ("NORMALIZE_HRV_MAX_DELIVER", "2"),
    ("DATABASE_ACQUIRE_TIMEOUT_MS", "300"),
    ("NORMALIZE_RETRY_BACKOFF_MS", "100"),
];

async fn hrv_row(pool: &sqlx::PgPool, user: &str) -> Option<(f64, String, i64)> {
    sqlx::query("SELECT rmssd, captured_at, source_seq FROM hrv_data WHERE user_id = $1")
        .bind(user)
        .fetch_optional(pool)
        .await
        .unwrap()
        .map(|r| {
            let at: chrono::DateTime<chrono::Utc> = r.get("captured_at");
            (r.get("rmssd"), at.to_rfc3339(), r.get("source_seq"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replay_stores_them_once_the_cause_is_fixed() {
    // The first daemon accepts at most 1 KiB: a bigger event is schema-invalid.
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(OUTAGE)
        .env(&[("MAX_PAYLOAD_BYTES", "1024")])
        .app()
        .await;
    let (js, vars) = (&stack.js, stack.vars.clone());

    let big = serde_json::json!({
        "payload": {"userId": "big", "date": "2025-03-01", "rMSSD": 41.0,
                    "capturedAt": "2025-03-01T06:00:00Z", "raw": {"pad": "x".repeat(2000)}}
    })
    .to_string();
    let big_seq = publish_with_id(js, HRV_SUBJECT, "ingest-big", big.clone()).await;
    let broken_seq = publish(js, HRV_SUBJECT, "{still broken").await;
    wait_for(
        "two schema-invalid dead letters",
        Duration::from_secs(20),
        || async { stream_messages(js, "AA_DLQ").await == 2 },
    )
    .await;

    // A database outage long enough to exhaust the daemon's two deliveries.
    stack.proxy().cut();
    let outage = hrv_event("outage", "2025-03-01", 55.0, "2025-03-01T07:00:00Z");
    let outage_seq = publish(js, HRV_SUBJECT, outage.clone()).await;
    wait_for("max-deliver dead letter", Duration::from_secs(30), || async {
        stream_messages(js, "AA_DLQ").await == 3
    })
    .await;
    wait_processed(js, "AA_CORE_HOT", outage_seq).await;

    // list: one entry per dead letter, with origin, reason, deliveries and error.
    let list = cli_json(&vars, &["dlq", "list"], 0).await;
    assert_eq!(list["stream"], "AA_DLQ");
    assert_eq!(list["count"], 3);
    let items = list["deadLetters"].as_array().unwrap();
    let by_orig = |seq: u64| {
        items
            .iter()
            .find(|d| d["originalSequence"] == seq)
            .unwrap_or_else(|| panic!("no dead letter for {seq}: {list}"))
            .clone()
    };
    let big_dl = by_orig(big_seq);
    assert_eq!(big_dl["reason"], "schema-invalid");
    assert_eq!(big_dl["consumer"], "hrv");
    assert_eq!(big_dl["originalSubject"], HRV_SUBJECT);
    assert_eq!(big_dl["originalStream"], "AA_CORE_HOT");
    assert_eq!(big_dl["deliveryCount"], 1);
    assert!(
        big_dl["error"].as_str().unwrap().contains("MAX_PAYLOAD_BYTES"),
        "{big_dl}"
    );
    let outage_dl = by_orig(outage_seq);
    assert_eq!(outage_dl["reason"], "max-deliver");
    assert_eq!(outage_dl["deliveryCount"], 2);
    assert_eq!(by_orig(broken_seq)["reason"], "schema-invalid");
    assert!(chrono::DateTime::parse_from_rfc3339(outage_dl["time"].as_str().unwrap()).is_ok());

    // Filters and limit.
    let only = cli_json(&vars, &["dlq", "list", "--reason", "max-deliver"], 0).await;
    assert_eq!(seqs_of(&only), vec![outage_dl["sequence"].as_u64().unwrap()]);
    assert_eq!(
        cli_json(&vars, &["dlq", "list", "--consumer", "sleep"], 0).await["count"],
        0
    );
    assert_eq!(
        cli_json(&vars, &["dlq", "list", "--since", "1h", "--limit", "2"], 0).await["count"],
        2
    );
    assert_eq!(
        cli_json(&vars, &["dlq", "list", "--since", "2999-01-01T00:00:00Z"], 0).await["count"],
        0
    );
    let stats = cli_json(&vars, &["dlq", "stats"], 0).await;
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["byConsumer"]["hrv"]["schema-invalid"], 2);
    assert_eq!(stats["byConsumer"]["hrv"]["max-deliver"], 1);
    let text = cli(&vars, &["dlq", "list"]).await;
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert_eq!(
        text.stdout.lines().count(),
        4,
        "a header and one line each:\n{}",
        text.stdout
    );

    // show: headers and the pretty-printed body.
    let big_dlq_seq = big_dl["sequence"].as_u64().unwrap();
    let shown = cli_json(&vars, &["dlq", "show", &big_dlq_seq.to_string()], 0).await;
    assert_eq!(shown["bodyEncoding"], "json");
    assert_eq!(shown["body"]["payload"]["userId"], "big");
    assert_eq!(shown["headers"]["Dlq-Reason"][0], "schema-invalid");
    let shown_text = cli(&vars, &["dlq", "show", &big_dlq_seq.to_string()]).await;
    assert!(shown_text
        .stdout
        .contains("Dlq-Original-Subject: athlete-ally.hrv.raw-received"));
    assert!(shown_text.stdout.contains("\"userId\": \"big\""), "pretty JSON");

    // A dry run publishes nothing.
    let core_before = stream_messages(js, "AA_CORE_HOT").await;
    let dry = cli_json(&vars, &["dlq", "replay", "--all", "--dry-run"], 0).await;
    assert_eq!(dry["counts"]["would-replay"], 3);
    assert_eq!(stream_messages(js, "AA_CORE_HOT").await, core_before);

    // Fix both causes: the database is back, and the daemon accepts bigger payloads.
    stack.proxy().restore().await;
    app.stop().await.unwrap();
    let fixed_vars = with(vars.clone(), &[("MAX_PAYLOAD_BYTES", "1048576")]);
    let app = TestApp::spawn(fixed_vars.clone()).await;
    app.wait_ready().await;

    let replay = cli_json(&fixed_vars, &["dlq", "replay", "--all"], 0).await;
    assert_eq!(replay["counts"]["replayed"], 3, "{replay}");
    let results = replay["results"].as_array().unwrap();
    let last_replayed = results
        .iter()
        .map(|r| r["replayedTo"]["sequence"].as_u64().unwrap())
        .max()
        .unwrap();
    for r in results {
        assert_eq!(r["replayedTo"]["stream"], "AA_CORE_HOT");
        assert_eq!(r["purged"], false);
    }
    wait_processed(js, "AA_CORE_HOT", last_replayed).await;
    let pool = stack.pool().await;
    let (rmssd, at, _) = hrv_row(&pool, "big")
        .await
        .expect("the oversized event is stored");
    assert_eq!((rmssd, at.as_str()), (41.0, "2025-03-01T06:00:00+00:00"));
    let (rmssd, at, _) = hrv_row(&pool, "outage")
        .await
        .expect("the outage event is stored");
    assert_eq!((rmssd, at.as_str()), (55.0, "2025-03-01T07:00:00+00:00"));
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 2);

    // The replayed message: original bytes, a replay id, its provenance, the original headers.
    let core = stream_contents(js, "AA_CORE_HOT").await;
    let replayed_big = core
        .iter()
        .find(|m| m.sequence > core_before && m.payload[..] == *big.as_bytes())
        .expect("replayed bytes in the core stream");
    let h = |n: &str| replayed_big.headers.get(n).map(|v| v.as_str().to_string());
    assert_eq!(h("Nats-Msg-Id"), Some(format!("replay:AA_DLQ:{big_dlq_seq}")));
    assert_eq!(h("Dlq-Replayed-From"), Some(format!("AA_DLQ:{big_dlq_seq}")));
    assert_eq!(h("Replay-Original-Msg-Id").as_deref(), Some("ingest-big"));
    assert_eq!(h("Dlq-Reason"), None);

    // The still-broken event is dead-lettered again, marked as a replay; the replayed dead letters
    // are kept (no --purge-replayed).
    wait_for(
        "the broken replay is dead-lettered again",
        Duration::from_secs(20),
        || async { stream_messages(js, "AA_DLQ").await == 4 },
    )
    .await;
    let again = cli_json(&fixed_vars, &["dlq", "list"], 0).await;
    // Newest first by default.
    let newest = again["deadLetters"].as_array().unwrap().first().unwrap().clone();
    let shown = cli_json(&fixed_vars, &["dlq", "show", &newest["sequence"].to_string()], 0).await;
    assert_eq!(shown["body"], "{still broken");
    assert_eq!(shown["bodyEncoding"], "text");
    assert!(shown["headers"]["Dlq-Replayed-From"][0]
        .as_str()
        .unwrap()
        .starts_with("AA_DLQ:"));

    // Replaying again inside the duplicate window is deduplicated by JetStream: no new message,
    // and the rows stay one per event either way.
    let seq_list: Vec<String> = seqs_of(&list).iter().map(u64::to_string).collect();
    let mut args = vec!["dlq", "replay"];
    args.extend(seq_list.iter().map(String::as_str));
    let twice = cli_json(&fixed_vars, &args, 0).await;
    assert_eq!(twice["counts"]["duplicate"], 3, "{twice}");
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 2);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stale_event_does_not_overwrite_a_newer_row() {
    let (stack, app) = Stack::builder().db_proxy().env(OUTAGE).app().await;
    let js = &stack.js;

    stack.proxy().cut();
    let old_seq = publish(
        js,
        HRV_SUBJECT,
        hrv_event("stale", "2025-03-01", 30.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for("max-deliver dead letter", Duration::from_secs(30), || async {
        stream_messages(js, "AA_DLQ").await == 1
    })
    .await;
    wait_processed(js, "AA_CORE_HOT", old_seq).await;
    // The outage is over. The daemon restarts with the default delivery limit: with only two
    // deliveries, a message caught while the pool reconnects could be dead-lettered again.
    stack.proxy().restore().await;
    app.stop().await.unwrap();
    let vars = stack.base_vars();
    let app = TestApp::spawn(vars.clone()).await;
    app.wait_ready().await;

    let new_seq = publish(
        js,
        HRV_SUBJECT,
        hrv_event("stale", "2025-03-01", 50.0, "2025-03-01T08:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_for("the newer row", Duration::from_secs(30), || async {
        hrv_row(&pool, "stale").await.is_some()
    })
    .await;
    let newer = hrv_row(&pool, "stale").await.unwrap();
    assert_eq!(newer, (50.0, "2025-03-01T08:00:00+00:00".into(), new_seq as i64));

    let replay = cli_json(
        &vars,
        &["dlq", "replay", "--consumer", "hrv", "--reason", "max-deliver"],
        0,
    )
    .await;
    assert_eq!(replay["counts"]["replayed"], 1, "{replay}");
    let replayed_seq = replay["results"][0]["replayedTo"]["sequence"].as_u64().unwrap();
    assert!(replayed_seq > new_seq);
    wait_processed(js, "AA_CORE_HOT", replayed_seq).await;

    assert_eq!(
        hrv_row(&pool, "stale").await.unwrap(),
        newer,
        "the older capturedAt lost"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 1);
    assert_eq!(
        stream_messages(js, "AA_DLQ").await,
        1,
        "the replay was not dead-lettered"
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_webhooks_keep_their_idempotency_key() {
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(OUTAGE)
        .env(&[("NORMALIZE_OURA_MAX_DELIVER", "2")])
        .app()
        .await;
    let js = &stack.js;

    stack.proxy().cut();
    let hook = |user: &str| {
        serde_json::json!({"user_id": user, "timestamp": "2025-03-01T06:00:00Z",
                           "data": {"hrv": {"rmssd": 45.2}}})
        .to_string()
    };
    let with_id = publish_with_id(js, OURA_SUBJECT, "hook-1", hook("with-id")).await;
    let without_id = publish(js, OURA_SUBJECT, hook("without-id")).await;
    wait_for(
        "two max-deliver dead letters",
        Duration::from_secs(30),
        || async { stream_messages(js, "AA_DLQ").await == 2 },
    )
    .await;
    wait_settled(js, "AA_VENDOR_HOT", "normalize-oura", without_id.max(with_id)).await;
    stack.proxy().restore().await;
    app.stop().await.unwrap();
    let vars = stack.base_vars();
    let app = TestApp::spawn(vars.clone()).await;
    app.wait_ready().await;

    let replay = cli_json(&vars, &["dlq", "replay", "--consumer", "oura"], 0).await;
    assert_eq!(replay["counts"]["replayed"], 2, "{replay}");
    let last = replay["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replayedTo"]["sequence"].as_u64().unwrap())
        .max()
        .unwrap();
    wait_settled(js, "AA_VENDOR_HOT", "normalize-oura", last).await;
    let pool = stack.pool().await;
    let keys: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, idempotency_key FROM vendor_webhook_events ORDER BY user_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let body_hash = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(hook("without-id").as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(
        keys,
        vec![
            ("with-id".to_string(), "hook-1".to_string()),
            ("without-id".to_string(), body_hash)
        ],
        "the same keys a first delivery would have used, not the replay's Nats-Msg-Id"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 2);
    app.stop().await.unwrap();
}

fn header<'a>(h: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Two dead-letter/replay rounds through the real daemon and the real CLI: a sleep event without
/// `capturedAt` fails twice (database cut), is replayed twice, and is finally stored with the
/// first publish's JetStream timestamp as `captured_at`; every replay carries the first origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_generation_replay_keeps_the_first_origin_and_time() {
    const SLEEP_DURABLE: &str = "normalize-sleep-durable";
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(OUTAGE)
        .env(&[("NORMALIZE_SLEEP_MAX_DELIVER", "2")])
        .app()
        .await;
    let (js, vars) = (&stack.js, stack.vars.clone());
    let letters = |n: u64| {
        let js = js.clone();
        async move {
            wait_for(&format!("{n} dead letters"), Duration::from_secs(30), || async {
                stream_messages(&js, "AA_DLQ").await == n
            })
            .await;
            stream_contents(&js, "AA_DLQ").await
        }
    };

    stack.proxy().cut();
    let body = r#"{"payload":{"userId":"s1","date":"2025-03-01","durationMinutes":420}}"#;
    let first_seq = publish_with_id(js, SLEEP_SUBJECT, "sleep-1", body).await;
    let first = js
        .get_stream("AA_CORE_HOT")
        .await
        .unwrap()
        .get_raw_message(first_seq)
        .await
        .unwrap();
    let first_at =
        chrono::DateTime::from_timestamp(first.time.unix_timestamp(), first.time.nanosecond()).unwrap();
    let dlq = letters(1).await;
    let letter1 = dlq[0].headers.clone();
    assert_eq!(header(Some(&letter1), "Dlq-Original-Msg-Id"), Some("sleep-1"));
    let stamped = header(Some(&letter1), "Dlq-Original-Timestamp").unwrap();
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(stamped).unwrap(),
        first_at,
        "Dlq-Original-Timestamp is the original's JetStream timestamp, at full precision"
    );
    wait_settled(js, "AA_CORE_HOT", SLEEP_DURABLE, first_seq).await;

    // Round 2: the replay fails too (the database is still cut).
    let replay = cli_json(&vars, &["dlq", "replay", &dlq[0].sequence.to_string()], 0).await;
    let replay1_seq = replay["results"][0]["replayedTo"]["sequence"].as_u64().unwrap();
    let dlq = letters(2).await;
    let letter2 = dlq[1].headers.clone();
    assert_eq!(
        header(Some(&letter2), "Dlq-Original-Msg-Id"),
        Some("sleep-1"),
        "a replay's dead letter names the event's id, not the replay's own"
    );
    assert_eq!(
        header(Some(&letter2), "Dlq-Original-Sequence"),
        Some(replay1_seq.to_string().as_str())
    );
    wait_settled(js, "AA_CORE_HOT", SLEEP_DURABLE, replay1_seq).await;

    // Round 3: the database is back; the second-generation replay is stored.
    // A fresh daemon with the default delivery limit, as in the test above: the pool of the
    // first one may still hold connections the cut broke.
    stack.proxy().restore().await;
    app.stop().await.unwrap();
    let app = TestApp::spawn(stack.base_vars()).await;
    app.wait_ready().await;
    let replay = cli_json(&vars, &["dlq", "replay", &dlq[1].sequence.to_string()], 0).await;
    let replay2_seq = replay["results"][0]["replayedTo"]["sequence"].as_u64().unwrap();
    wait_settled(js, "AA_CORE_HOT", SLEEP_DURABLE, replay2_seq).await;
    let stream = js.get_stream("AA_CORE_HOT").await.unwrap();
    for seq in [replay1_seq, replay2_seq] {
        let m = stream.get_raw_message(seq).await.unwrap();
        let h = Some(&m.headers);
        assert_eq!(
            header(h, "Replay-Original-Msg-Id"),
            Some("sleep-1"),
            "replay at {seq}"
        );
        assert_eq!(
            header(h, "Replay-Original-Stream"),
            Some("AA_CORE_HOT"),
            "replay at {seq}"
        );
        assert_eq!(
            header(h, "Replay-Original-Sequence"),
            Some(first_seq.to_string().as_str()),
            "replay at {seq}"
        );
        assert_eq!(
            header(h, "Replay-Original-Timestamp"),
            Some(stamped),
            "replay at {seq}"
        );
        assert_eq!(m.headers.get_all("Replay-Original-Sequence").count(), 1);
    }
    let dlq = stream_contents(js, "AA_DLQ").await;
    assert_eq!(
        dlq.len(),
        2,
        "nothing dead-lettered a third time: {:?}",
        dlq.last().map(|m| &m.headers)
    );
    let pool = stack.pool().await;
    let (captured_at, defaulted): (chrono::DateTime<chrono::Utc>, bool) =
        sqlx::query_as("SELECT captured_at, captured_at_defaulted FROM sleep_data WHERE user_id = 's1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(defaulted);
    assert_eq!(
        captured_at,
        chrono::SubsecRound::trunc_subsecs(first_at, 6),
        "captured_at is the first publish's JetStream timestamp, not the replay's or processing time"
    );
    app.stop().await.unwrap();
}

/// A message that fits the server's `max_payload` but not with the dead-letter headers: its
/// letter is stored without the body (instead of being retried for ever, the message never
/// settled), the message is settled at once, and `dlq replay` republishes the original body,
/// read from the original stream position, and says so clearly once that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_too_large_for_max_payload_is_stored_without_its_body_and_replayed_from_the_original() {
    const MAX: usize = 64 * 1024;
    let (stack, app) = Stack::builder()
        .nats_conf(&format!("max_payload: {MAX}"))
        .app()
        .await;
    let (js, vars) = (&stack.js, stack.vars.clone());
    assert_eq!(
        js.client().server_info().max_payload,
        MAX,
        "the test server's limit"
    );

    // Schema-invalid (no userId); with its id header 260 bytes below the limit, while the
    // dead-letter headers take more.
    let head = r#"{"payload": {"date": "2025-03-01", "rMSSD": 41.0, "raw": {"pad": ""#;
    let tail = r#""}}}"#;
    let pad = MAX - 300 - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), MAX - 300);
    let seq = publish_with_id(js, HRV_SUBJECT, "ingest-huge", body.clone()).await;
    wait_for("one dead letter", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await == 1
    })
    .await;
    wait_processed(js, "AA_CORE_HOT", seq).await;
    let info = js
        .get_stream("AA_CORE_HOT")
        .await
        .unwrap()
        .consumer_info(DURABLE)
        .await
        .unwrap()
        .clone();
    assert_eq!(info.num_redelivered, 0, "settled on its first delivery");
    assert_eq!(
        metric_value(&app.metrics().await, "normalize_dlq_publish_failures_total", &[]).unwrap_or(0.0),
        0.0
    );
    assert_eq!(app.health().await.1["status"], "ok");

    let list = cli_json(&vars, &["dlq", "list"], 0).await;
    let letter = &list["deadLetters"][0];
    assert_eq!(letter["reason"], "schema-invalid", "{list}");
    assert_eq!(letter["originalSequence"], seq);
    assert_eq!(letter["size"], 0);
    assert_eq!(letter["bodyOmitted"], body.len());
    let dlq_seq = letter["sequence"].as_u64().unwrap().to_string();
    let shown = cli(&vars, &["dlq", "show", &dlq_seq]).await;
    assert!(
        shown.stdout.contains("stored without its body") && shown.stdout.contains("AA_CORE_HOT at"),
        "{}",
        shown.stdout
    );

    // Replayed with the original body, taken from AA_CORE_HOT.
    let replay = cli_json(&vars, &["dlq", "replay", &dlq_seq], 0).await;
    assert_eq!(replay["counts"]["replayed"], 1, "{replay}");
    let replayed = replay["results"][0]["replayedTo"]["sequence"].as_u64().unwrap();
    let core = js.get_stream("AA_CORE_HOT").await.unwrap();
    let m = core.get_raw_message(replayed).await.unwrap();
    assert_eq!(m.payload, body.as_bytes(), "the original body, byte for byte");
    assert_eq!(
        m.headers.get("Replay-Original-Msg-Id").unwrap().as_str(),
        "ingest-huge"
    );
    // Still invalid: dead-lettered again, the same way.
    wait_processed(js, "AA_CORE_HOT", replayed).await;
    wait_for("the replay's dead letter", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await == 2
    })
    .await;

    // Once the original is gone, the replay fails and says why; the letter stays.
    core.delete_message(seq).await.unwrap();
    let again = cli(&vars, &["dlq", "replay", &dlq_seq, "--json"]).await;
    assert_eq!(again.code, 1, "{}\n{}", again.stdout, again.stderr);
    let again = again.json();
    assert_eq!(again["results"][0]["result"], "failed");
    let error = again["results"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("stored without its body") && error.contains("no longer holds sequence"),
        "{error}"
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 2);
    app.stop().await.unwrap();
}
