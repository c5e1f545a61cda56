//! "Same events, same rows" (docs/CONTRACT.md): regression tests for the per-field rule, the
//! normalized events' version, and announcements only for stored changes. The differential
//! test (`differential`) checks the same rule on random event sets.

use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};
use sqlx::Row;

use crate::support::*;

fn sleep(user: &str, minutes: u32, captured_at: &str, quality: Option<u32>, source: Option<&str>) -> String {
    let mut raw = serde_json::Map::new();
    if let Some(q) = quality {
        raw.insert("qualityScore".into(), json!(q));
    }
    if let Some(s) = source {
        raw.insert("source".into(), json!(s));
    }
    json!({"payload": {"userId": user, "date": "2025-03-01", "durationMinutes": minutes,
                       "capturedAt": captured_at, "raw": raw}})
    .to_string()
}

async fn sleep_row(db: &TestDb, user: &str) -> Option<(i32, Option<i32>, String, i64)> {
    let pool = db.pool().await;
    sqlx::query("SELECT duration_minutes, quality_score, vendor, version FROM sleep_data WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&pool)
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

/// Normalized events on `subject`, as (Nats-Msg-Id, record) pairs in stream order.
async fn announcements(js: &jetstream::Context, subject: &str) -> Vec<(String, Value)> {
    stream_contents(js, "AA_CORE_HOT")
        .await
        .into_iter()
        .filter(|m| m.subject.as_str() == subject)
        .map(|m| {
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            (id, v["record"].clone())
        })
        .collect()
}

/// Item 1: an older event with `raw.qualityScore` and `raw.source`, a newer one without them —
/// in one batch, in separate batches, and with the newer one arriving first: the row always
/// has the newer duration and the older quality and vendor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_fields_of_an_older_event_survive_a_newer_event_without_them() {
    // Published before the daemon starts: both arrive in one pull and one batch.
    let older = |u: &str| sleep(u, 300, "2025-03-01T06:00:00Z", Some(55), Some("WHOOP"));
    let newer = |u: &str| sleep(u, 420, "2025-03-01T08:00:00Z", None, None);
    let (stack, app) = Stack::app_with_env(&[("SLEEP_BATCH_SIZE", "10")]).await;
    let (js, db) = (&stack.js, &stack.db);
    // One batch: both published before the pull sees them (a tight burst).
    let a = js.publish(SLEEP_SUBJECT, older("together").into()).await.unwrap();
    let b = js.publish(SLEEP_SUBJECT, newer("together").into()).await.unwrap();
    a.await.unwrap();
    b.await.unwrap();
    // Apart, oldest first.
    publish(js, SLEEP_SUBJECT, older("apart")).await;
    wait_for("first row", Duration::from_secs(10), || async {
        sleep_row(db, "apart").await.is_some()
    })
    .await;
    publish(js, SLEEP_SUBJECT, newer("apart")).await;
    // Apart, newest first: the older event still fills the fields the newer one lacks.
    publish(js, SLEEP_SUBJECT, newer("reversed")).await;
    wait_for("first row", Duration::from_secs(10), || async {
        sleep_row(db, "reversed").await.is_some()
    })
    .await;
    publish(js, SLEEP_SUBJECT, older("reversed")).await;
    wait_drained(js, "AA_CORE_HOT", "normalize-sleep-durable").await;
    for user in ["together", "apart", "reversed"] {
        let (minutes, quality, vendor, _) = sleep_row(db, user).await.unwrap();
        assert_eq!(
            (minutes, quality, vendor.as_str()),
            (420, Some(55), "whoop"),
            "{user}: duration from the newest event, quality and vendor from the newest carrying them"
        );
    }
    // Every announcement of a row describes it as stored, with increasing versions; the last
    // one equals the final row.
    let events = announcements(js, "athlete-ally.sleep.normalized-stored").await;
    for user in ["together", "apart", "reversed"] {
        let mine: Vec<&Value> = events
            .iter()
            .filter(|(_, r)| r["userId"] == user)
            .map(|(_, r)| r)
            .collect();
        let versions: Vec<i64> = mine.iter().map(|r| r["version"].as_i64().unwrap()).collect();
        let (_, _, _, version) = sleep_row(db, user).await.unwrap();
        assert_eq!(versions.iter().max(), Some(&version), "{user}: {versions:?}");
        let last = mine
            .iter()
            .find(|r| r["version"].as_i64() == Some(version))
            .unwrap();
        assert_eq!(last["durationMinutes"], 420);
        assert_eq!(last["qualityScore"], 55);
        assert_eq!(last["vendor"], "whoop");
    }
    let ids: std::collections::HashSet<&String> = events.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), events.len(), "no announcement twice");
    app.stop().await.unwrap();
}

/// A leap second (`06:59:60.9`, valid RFC 3339) is `07:00:00.9` in the table: it is newer than
/// `07:00:00.5` whether the two arrive in one batch (compared in memory) or apart (compared by
/// the upsert), in either order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leap_second_is_ordered_the_same_in_a_batch_and_in_the_table() {
    let leap = |u: &str| hrv_event(u, "2025-03-01", 40.0, "2025-03-01T06:59:60.9Z");
    let later_looking = |u: &str| hrv_event(u, "2025-03-01", 50.0, "2025-03-01T07:00:00.5Z");
    let stack = Stack::builder().env(&[("HRV_BATCH_SIZE", "10")]).start().await;
    let js = &stack.js;
    js.create_stream(
        normalize_service::topology::core_spec(&normalize_service::config::StreamNames::default(), 1)
            .to_config(),
    )
    .await
    .unwrap();
    // Published before the daemon starts: one pull, one batch.
    publish(js, HRV_SUBJECT, later_looking("together")).await;
    publish(js, HRV_SUBJECT, leap("together")).await;
    let app = stack.app().await;
    let pool = stack.pool().await;
    let rmssd = |user: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>("SELECT rmssd FROM hrv_data WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    for (user, first, second) in [
        ("apart", later_looking("apart"), leap("apart")),
        ("reversed", leap("reversed"), later_looking("reversed")),
    ] {
        publish(js, HRV_SUBJECT, first).await;
        wait_for("first row", Duration::from_secs(10), || async {
            rmssd(user).await.is_some()
        })
        .await;
        publish(js, HRV_SUBJECT, second).await;
        wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    }
    for user in ["together", "apart", "reversed"] {
        assert_eq!(
            rmssd(user).await,
            Some(40.0),
            "{user}: the leap second is the newer event"
        );
    }
    app.stop().await.unwrap();
}

/// Item 3: the same Oura body published twice (no Nats-Msg-Id, 1.5 s apart) stores one raw row
/// and announces each derived row once: the second changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_webhook_announces_nothing_new() {
    let (stack, app) = Stack::builder().app().await;
    let (js, db) = (&stack.js, &stack.db);
    let body = json!({"user_id": "dup-hook", "timestamp": "2025-03-01T07:00:00Z",
                      "data": {"hrv": {"rmssd": 45.2, "sdnn": 52.8}, "sleep": {"duration": 7.5, "score": 83}}})
    .to_string();
    publish(js, OURA_SUBJECT, body.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(js, OURA_SUBJECT, body).await;
    wait_drained(js, "AA_VENDOR_HOT", "normalize-oura").await;
    let pool = db.pool().await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM vendor_webhook_events").await,
        1
    );
    assert_eq!(
        announcements(js, "athlete-ally.hrv.normalized-stored")
            .await
            .len(),
        1
    );
    assert_eq!(
        announcements(js, "athlete-ally.sleep.normalized-stored")
            .await
            .len(),
        1
    );
    app.stop().await.unwrap();
}

/// Item 6: each stored change of a row gets the next version, carried by its announcement and
/// in its id; a stale event changes nothing and announces nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_change_has_the_next_version() {
    let (stack, app) = Stack::builder().app().await;
    let js = &stack.js;
    for (rmssd, at) in [
        (40.0, "2025-03-01T06:00:00Z"),
        (41.0, "2025-03-01T07:00:00Z"),
        (39.0, "2025-03-01T05:00:00Z"),
    ] {
        publish(js, HRV_SUBJECT, hrv_event("versioned", "2025-03-01", rmssd, at)).await;
        wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    }
    let events = announcements(js, "athlete-ally.hrv.normalized-stored").await;
    let got: Vec<(i64, f64)> = events
        .iter()
        .map(|(_, r)| (r["version"].as_i64().unwrap(), r["rMSSD"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![(1, 40.0), (2, 41.0)],
        "the stale third event changed nothing"
    );
    assert!(events[1].0.ends_with(":hrv:v2"), "{}", events[1].0);
    app.stop().await.unwrap();
}

/// Item 7, input edges: a NUL in a user id and a time far in the future are schema-invalid at
/// decode (not a database error, not a row pinned forever); an Oura webhook with a valid
/// `user_id` and an invalid section is stored raw, derives what is valid, and reports the
/// invalid section with a dead letter and a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_edges_are_refused_or_reported_at_decode() {
    let (stack, app) = Stack::builder().app().await;
    let (js, db) = (&stack.js, &stack.db);
    publish(
        js,
        HRV_SUBJECT,
        json!({"payload": {"userId": "nul\u{0}user", "date": "2025-03-01", "rMSSD": 40.0,
                           "capturedAt": "2025-03-01T06:00:00Z"}})
        .to_string(),
    )
    .await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("future", "2025-03-01", 40.0, "9999-12-31T00:00:00Z"),
    )
    .await;
    // An eventId names the event's announcements (a header value): a line break in it would
    // make the publish panic, so it is refused at decode.
    publish(
        js,
        HRV_SUBJECT,
        json!({"eventId": "evt\r\nInjected: 1", "payload": {"userId": "crlf", "date": "2025-03-01",
               "rMSSD": 40.0, "capturedAt": "2025-03-01T06:00:00Z"}})
        .to_string(),
    )
    .await;
    publish(
        js,
        OURA_SUBJECT,
        json!({"user_id": "partial", "timestamp": "2025-03-01T07:00:00Z",
               "data": {"hrv": {"rmssd": -3}, "sleep": {"duration": 7.5, "score": 83}}})
        .to_string(),
    )
    .await;
    wait_for("four dead letters", Duration::from_secs(15), || async {
        stream_messages(js, "AA_DLQ").await == 4
    })
    .await;
    wait_drained(js, "AA_VENDOR_HOT", "normalize-oura").await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    let letters = stream_contents(js, "AA_DLQ").await;
    assert!(
        letters
            .iter()
            .all(|l| l.subject.as_str().ends_with(".schema-invalid")),
        "{:?}",
        letters.iter().map(|l| l.subject.to_string()).collect::<Vec<_>>()
    );
    let oura = letters
        .iter()
        .find(|l| l.subject.as_str().starts_with("dlq.vendor.oura"))
        .unwrap();
    assert!(oura
        .headers
        .get("Dlq-Error")
        .unwrap()
        .as_str()
        .contains("data.hrv"));
    let pool = db.pool().await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 0);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM vendor_webhook_events WHERE user_id = 'partial'"
        )
        .await,
        1,
        "the raw webhook is stored"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM sleep_data WHERE user_id = 'partial' AND duration_minutes = 450"
        )
        .await,
        1,
        "its valid section is derived"
    );
    // The daemon is alive and consuming.
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("after", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for("the next event stored", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'after'").await == 1
    })
    .await;
    let m = app.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "normalize_oura_invalid_sections_total",
            &[("section", "data.hrv")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "normalize_oura_messages_total", &[("result", "success")]),
        Some(1.0),
        "the webhook itself was processed"
    );
    app.stop().await.unwrap();
}

/// `ORDERING_SEED`, else one from the clock, printed under `test` (cargo shows a failed test's
/// output), and a xorshift generator over it: `next(n)` is in `0..n`.
fn seeded(test: &str) -> (u64, impl FnMut(u64) -> u64) {
    let seed: u64 = std::env::var("ORDERING_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("{test}: ORDERING_SEED={seed}");
    // xorshift never leaves 0.
    let mut state = seed | 1;
    let next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    (seed, next)
}

/// The `changed` part of the per-field upsert, checked directly against PostgreSQL: over random
/// batches of HRV and sleep records on a few keys (values, times and vendors drawn from small
/// sets, so equal values, ties and records without a vendor or quality are common), after every
/// `store::upsert_batch` each row's version grew by one exactly when one of its published
/// values changed (a new row starts at 1), and exactly the new or changed rows were announced.
/// `ORDERING_SEED` replays a run; the seed is in every failure message.
#[tokio::test]
async fn versions_and_announcements_follow_exactly_the_published_changes() {
    use std::collections::{BTreeMap, BTreeSet};

    use normalize_service::config::ConsumerKind;
    use normalize_service::metrics::Metrics;
    use normalize_service::pipeline::{self, Envelope, StoredRow};
    use normalize_service::store::{self, BatchEntry, Source};

    let (seed, mut next) = seeded("versions_and_announcements");
    let db = TestDb::new().await;
    let pool = db.pool().await;
    store::MIGRATOR.run(&pool).await.unwrap();
    let metrics = Metrics::new().unwrap();
    let now = chrono::Utc::now();
    let snapshot = |pool: sqlx::PgPool| async move {
        let mut rows: BTreeMap<(String, String, String), (String, i64)> = BTreeMap::new();
        for (table, published) in [
            (
                "hrv_data",
                "rmssd, ln_rmssd, readiness_score, captured_at, vendor",
            ),
            (
                "sleep_data",
                "duration_minutes, captured_at_defaulted, captured_at, vendor, quality_score",
            ),
        ] {
            let sql = format!("SELECT user_id, date::text, ROW({published})::text, version FROM {table}");
            for r in sqlx::query(&sql).fetch_all(&pool).await.unwrap() {
                rows.insert((table.to_string(), r.get(0), r.get(1)), (r.get(2), r.get(3)));
            }
        }
        rows
    };
    let mut seq = 0u64;
    for round in 0..60 {
        let size = 1 + next(6) as usize;
        let mut bodies = Vec::new();
        for _ in 0..size {
            let user = format!("u{}", next(2));
            let date = ["2025-03-01", "2025-03-02"][next(2) as usize];
            let at = [
                "2025-03-01T06:00:00Z",
                "2025-03-01T07:00:00Z",
                "2025-03-01T08:00:00Z",
            ][next(3) as usize];
            let source = [None, Some("Oura"), Some("Whoop")][next(3) as usize];
            let mut raw = serde_json::Map::new();
            if let Some(s) = source {
                raw.insert("source".into(), json!(s));
            }
            if next(2) == 0 {
                let rmssd = [40.0, 41.0][next(2) as usize];
                bodies.push((
                    ConsumerKind::Hrv,
                    json!({"payload": {"userId": user, "date": date, "rMSSD": rmssd, "capturedAt": at, "raw": raw}}),
                ));
            } else {
                if next(2) == 0 {
                    raw.insert("qualityScore".into(), json!([70, 80][next(2) as usize]));
                }
                let minutes = [420, 421][next(2) as usize];
                let mut payload =
                    json!({"userId": user, "date": date, "durationMinutes": minutes, "raw": raw});
                // Without capturedAt a sleep record takes the message's time, `captured_at_defaulted`.
                if next(4) != 0 {
                    payload["capturedAt"] = json!(at);
                }
                bodies.push((ConsumerKind::Sleep, json!({ "payload": payload })));
            }
        }
        let decoded: Vec<_> = bodies
            .iter()
            .map(|(kind, body)| {
                let env = Envelope {
                    msg_id: None,
                    stable_time: now,
                    now,
                    max_future_skew: chrono::Duration::days(3650),
                    max_payload_bytes: 1 << 20,
                };
                pipeline::decode(*kind, body.to_string().as_bytes(), env)
                    .unwrap_or_else(|e| panic!("seed {seed}: {body} does not decode: {e}"))
            })
            .collect();
        let identities: Vec<String> = (0..decoded.len()).map(|i| format!("r{round}-{i}")).collect();
        let entries: Vec<BatchEntry<'_>> = decoded
            .iter()
            .zip(&identities)
            .map(|(d, identity)| {
                seq += 1 + next(3);
                BatchEntry {
                    decoded: d,
                    source: Source {
                        stream: ["AA_CORE_HOT", "ATHLETE_ALLY_EVENTS"][next(2) as usize],
                        seq,
                        identity,
                        redelivered: false,
                    },
                }
            })
            .collect();
        let before = snapshot(pool.clone()).await;
        let written = store::upsert_batch(&pool, &metrics, &entries).await.unwrap();
        let after = snapshot(pool.clone()).await;
        let mut expected = BTreeSet::new();
        for (key, (published, version)) in &after {
            match before.get(key) {
                None => {
                    assert_eq!(*version, 1, "seed {seed} round {round}: new row {key:?}");
                    expected.insert(key.clone());
                }
                Some((was, was_version)) => {
                    let changed = was != published;
                    assert_eq!(
                        *version,
                        was_version + i64::from(changed),
                        "seed {seed} round {round}: {key:?} went from {was} to {published}"
                    );
                    if changed {
                        expected.insert(key.clone());
                    }
                }
            }
        }
        let announced: Vec<(String, String, String)> = written
            .iter()
            .flat_map(|w| &w.stored)
            .map(|row| match row {
                StoredRow::Hrv(r) => ("hrv_data".to_string(), r.user_id.clone(), r.date.to_string()),
                StoredRow::Sleep(r) => ("sleep_data".to_string(), r.user_id.clone(), r.date.to_string()),
            })
            .collect();
        // Each once: a list, so a row announced twice fails too.
        let mut announced = announced;
        announced.sort();
        assert_eq!(
            announced,
            expected.into_iter().collect::<Vec<_>>(),
            "seed {seed} round {round}: announced rows are the new or changed ones, each once"
        );
    }
}

/// The rule itself, at the store: a random set of HRV, sleep and Oura events (few keys; equal,
/// offset and leap-second times; webhook copies under one idempotency key with different bodies;
/// copies of one body at two positions), written to two databases in two random orders and
/// batchings (some batches written message by message, some two at once), some events twice (a
/// redelivery), leaves the same rows in both: every column but
/// the arrival bookkeeping (`id`, `version`, `changed_tx`, `created_at`, `updated_at`,
/// `received_at`). `ORDERING_SEED` replays a run; the seed is in every failure message.
#[tokio::test]
async fn the_rows_depend_only_on_the_set_of_events() {
    use normalize_service::config::ConsumerKind;
    use normalize_service::metrics::Metrics;
    use normalize_service::pipeline::{self, Envelope};
    use normalize_service::store::{self, BatchEntry, Source};

    const TIMES: [&str; 7] = [
        "2025-03-01T06:00:00Z",
        "2025-03-01T08:00:00+02:00",
        "2025-03-01T06:59:60.9Z",
        "2025-03-01T07:00:00.5Z",
        "2025-03-01T07:00:00.900000Z",
        "2025-03-01T07:00:00.9000004Z",
        "2025-03-01T09:00:00Z",
    ];
    const STREAMS: [&str; 2] = ["AA_VENDOR_HOT", "ATHLETE_ALLY_EVENTS"];
    let (seed, mut next_u64) = seeded("the_rows_depend_only_on_the_set_of_events");
    let mut next = move |n: usize| next_u64(n as u64) as usize;

    struct Event {
        kind: ConsumerKind,
        body: String,
        msg_id: Option<&'static str>,
        stream: &'static str,
        seq: u64,
        identity: String,
    }
    let dbs = [TestDb::new().await, TestDb::new().await];
    let mut pools = Vec::new();
    for db in &dbs {
        let pool = db.pool().await;
        store::MIGRATOR.run(&pool).await.unwrap();
        pools.push(pool);
    }
    let metrics = Metrics::new().unwrap();
    let now = chrono::Utc::now();
    let base = chrono::DateTime::parse_from_rfc3339("2025-03-01T05:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);

    for round in 0..40 {
        let mut events: Vec<Event> = Vec::new();
        let mut seq = 0u64;
        for _ in 0..4 + next(12) {
            seq += 1;
            let stream = STREAMS[next(2)];
            // A copy of an earlier body at a new position (a retry around a subject move).
            if !events.is_empty() && next(5) == 0 {
                let e = &events[next(events.len())];
                let (kind, body, msg_id) = (e.kind, e.body.clone(), e.msg_id);
                events.push(Event {
                    kind,
                    body,
                    msg_id,
                    stream,
                    seq,
                    identity: msg_id.map_or(format!("id-{seq}"), str::to_string),
                });
                continue;
            }
            let user = format!("u{}", next(2));
            let at = TIMES[next(TIMES.len())];
            let source = [None, Some("Oura"), Some("whoop")][next(3)];
            let (kind, body, msg_id) = match next(3) {
                0 => {
                    let mut raw = json!({});
                    if let Some(s) = source {
                        raw["source"] = json!(s);
                    }
                    if next(2) == 0 {
                        raw["readinessScore"] = json!(([70, 71][next(2)]));
                    }
                    let body = json!({"payload": {"userId": user, "date": "2025-03-01",
                        "rMSSD": ([40.0, 41.5][next(2)]), "capturedAt": at, "raw": raw}});
                    (ConsumerKind::Hrv, body, None)
                }
                1 => {
                    let mut raw = json!({});
                    if let Some(s) = source {
                        raw["source"] = json!(s);
                    }
                    if next(2) == 0 {
                        raw["qualityScore"] = json!(([70, 80][next(2)]));
                    }
                    let mut payload = json!({"userId": user, "date": "2025-03-01",
                        "durationMinutes": ([420, 421][next(2)]), "raw": raw});
                    if next(3) != 0 {
                        payload["capturedAt"] = json!(at);
                    }
                    (ConsumerKind::Sleep, json!({ "payload": payload }), None)
                }
                _ => {
                    let mut data = json!({});
                    if next(3) != 0 {
                        data["hrv"] = json!({"rmssd": ([40.0, 45.5][next(2)])});
                    }
                    if next(2) == 0 {
                        data["sleep"] =
                            json!({"duration": ([7.0, 7.5][next(2)]), "score": ([80, 90][next(2)])});
                    }
                    let body = json!({"user_id": user, "timestamp": at, "data": data});
                    let msg_id = [None, Some("h1"), Some("h2"), Some("h2 ")][next(4)];
                    (ConsumerKind::Oura, body, msg_id)
                }
            };
            events.push(Event {
                kind,
                body: body.to_string(),
                msg_id,
                stream,
                seq,
                identity: msg_id.map_or(format!("id-{seq}"), str::to_string),
            });
        }

        let mut snapshots = Vec::new();
        for pool in &pools {
            sqlx::query("TRUNCATE hrv_data, sleep_data, vendor_webhook_events")
                .execute(pool)
                .await
                .unwrap();
            // A random order, some events twice (a redelivery), cut into random batches that
            // never hold one event twice.
            let mut order: Vec<usize> = (0..events.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, next(i + 1));
            }
            for _ in 0..next(3) {
                let again = next(events.len());
                order.insert(next(order.len() + 1), again);
            }
            let mut batches: Vec<Vec<usize>> = vec![Vec::new()];
            for i in order {
                let full = batches
                    .last()
                    .is_some_and(|b| b.len() > next(5) || b.contains(&i));
                if full {
                    batches.push(Vec::new());
                }
                if let Some(b) = batches.last_mut() {
                    b.push(i);
                }
            }
            let batches: Vec<Vec<usize>> = batches.into_iter().filter(|b| !b.is_empty()).collect();
            let decoded: Vec<Vec<_>> = batches
                .iter()
                .map(|batch| {
                    batch
                        .iter()
                        .map(|&i| {
                            let e = &events[i];
                            let env = Envelope {
                                msg_id: e.msg_id,
                                // The message's JetStream time: fixed per position.
                                stable_time: base + chrono::Duration::seconds(e.seq as i64),
                                now,
                                max_future_skew: chrono::Duration::days(3650),
                                max_payload_bytes: 1 << 20,
                            };
                            pipeline::decode(e.kind, e.body.as_bytes(), env).unwrap_or_else(|err| {
                                panic!("seed {seed}: {} does not decode: {err}", e.body)
                            })
                        })
                        .collect()
                })
                .collect();
            let entries: Vec<Vec<BatchEntry<'_>>> = batches
                .iter()
                .zip(&decoded)
                .map(|(batch, decoded)| {
                    batch
                        .iter()
                        .zip(decoded)
                        .map(|(&i, d)| BatchEntry {
                            decoded: d,
                            source: Source {
                                stream: events[i].stream,
                                seq: events[i].seq,
                                identity: &events[i].identity,
                                redelivered: next(3) == 0,
                            },
                        })
                        .collect()
                })
                .collect();
            // Each batch as one statement or message by message (the unroll path); now and
            // then two batches at once (two pipeline slots or instances).
            async fn write(
                pool: &sqlx::PgPool,
                metrics: &Metrics,
                entries: &[BatchEntry<'_>],
                one_by_one: bool,
            ) -> Result<(), sqlx::Error> {
                if one_by_one {
                    for e in entries {
                        store::upsert(pool, metrics, e).await?;
                    }
                } else {
                    store::upsert_batch(pool, metrics, entries).await?;
                }
                Ok(())
            }
            let mut k = 0;
            while k < entries.len() {
                let (one, two) = (next(4) == 0, next(4) == 0);
                let failed = |e: sqlx::Error| panic!("seed {seed} round {round}: write failed: {e}");
                if k + 1 < entries.len() && next(3) == 0 {
                    let (a, b) = tokio::join!(
                        write(pool, &metrics, &entries[k], one),
                        write(pool, &metrics, &entries[k + 1], two)
                    );
                    a.unwrap_or_else(failed);
                    b.unwrap_or_else(failed);
                    k += 2;
                } else {
                    write(pool, &metrics, &entries[k], one)
                        .await
                        .unwrap_or_else(failed);
                    k += 1;
                }
            }
            let mut rows = Vec::new();
            for table in ["hrv_data", "sleep_data", "vendor_webhook_events"] {
                let sql = format!(
                    "SELECT (to_jsonb(t) - 'id' - 'version' - 'changed_tx' - 'created_at' - 'updated_at' \
                     - 'received_at')::text FROM {table} t ORDER BY 1"
                );
                for r in sqlx::query_scalar::<_, String>(&sql)
                    .fetch_all(pool)
                    .await
                    .unwrap()
                {
                    rows.push(format!("{table} {r}"));
                }
            }
            snapshots.push((rows, batches));
        }
        let [(a, a_batches), (b, b_batches)] = [snapshots.remove(0), snapshots.remove(0)];
        if a != b {
            let bodies: Vec<String> = events
                .iter()
                .enumerate()
                .map(|(i, e)| format!("  #{i} {}:{} {:?} {}", e.stream, e.seq, e.msg_id, e.body))
                .collect();
            panic!(
                "seed {seed} round {round}: the same events left different rows\nevents:\n{}\n\
                 batches {a_batches:?}:\n  {}\nbatches {b_batches:?}:\n  {}",
                bodies.join("\n"),
                a.join("\n  "),
                b.join("\n  ")
            );
        }
    }
}
