//! The 1 → 3 stream migration (issue #4): the daemon follows every step without a restart,
//! publishers that retry with the same Nats-Msg-Id lose nothing, and the CLI refuses what
//! JetStream would refuse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use normalize_service::config::StreamNames;
use normalize_service::topology;
use serde_json::Value;

use crate::support::*;

/// Runs the CLI with `--json`, which must succeed, and returns its output.
async fn ok(vars: &HashMap<String, String>, args: &[&str]) -> Value {
    cli_json(vars, args, 0).await
}

/// Publishes HRV events and Oura webhooks until stopped, retrying each failed publish with the
/// same Nats-Msg-Id (what publishers must do across the subject-move gap).
struct Publisher {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<(usize, usize, usize)>,
}

impl Publisher {
    fn start(js: jetstream::Context, prefix: &'static str) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            let (mut hrv, mut hooks, mut retries) = (0usize, 0usize, 0usize);
            let mut i = 0usize;
            while !s.load(Ordering::SeqCst) {
                let (subject, id, body) = if i % 2 == 0 {
                    hrv += 1;
                    (
                        HRV_SUBJECT,
                        format!("{prefix}-hrv-{i}"),
                        hrv_event(
                            &format!("{prefix}-user-{i}"),
                            "2025-03-01",
                            40.0,
                            "2025-03-01T06:00:00Z",
                        ),
                    )
                } else {
                    hooks += 1;
                    (
                        OURA_SUBJECT,
                        format!("{prefix}-hook-{i}"),
                        serde_json::json!({"user_id": format!("{prefix}-o-{i}"), "timestamp": "2025-03-01T06:00:00Z", "data": {}})
                            .to_string(),
                    )
                };
                retries += publish_until_acked(
                    &js,
                    subject,
                    &id,
                    &body,
                    Duration::from_secs(10),
                    Duration::from_millis(2),
                )
                .await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            (hrv, hooks, retries)
        });
        Publisher { stop, handle }
    }

    async fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap()
    }
}

async fn legacy_topology(js: &jetstream::Context) {
    js.create_stream(topology::legacy_spec(&StreamNames::default(), 1).to_config())
        .await
        .unwrap();
}

async fn stream_names(js: &jetstream::Context) -> Vec<String> {
    let mut names: Vec<String> = topology::existing_streams(js)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    names.sort();
    names
}

async fn wait_rows(db: &TestDb, prefix: &str, hrv: usize, hooks: usize) {
    let pool = db.pool().await;
    let hrv_sql = format!("SELECT count(*) FROM hrv_data WHERE user_id LIKE '{prefix}-user-%'");
    let hook_sql = format!("SELECT count(*) FROM vendor_webhook_events WHERE user_id LIKE '{prefix}-o-%'");
    wait_for(
        "every published event stored",
        Duration::from_secs(60),
        || async {
            count(&pool, &hrv_sql).await == hrv as i64 && count(&pool, &hook_sql).await == hooks as i64
        },
    )
    .await;
    // Exactly one row per event (the unique keys make more impossible; fewer is loss).
    assert_eq!(count(&pool, &hrv_sql).await, hrv as i64);
    assert_eq!(count(&pool, &hook_sql).await, hooks as i64);
}

/// The servers with the legacy stream, and daemons that rebind quickly.
async fn legacy_stack() -> Stack {
    let stack = Stack::builder()
        .env(&[("REBIND_INTERVAL_MS", "300")])
        .start()
        .await;
    legacy_topology(&stack.js).await;
    stack
}

fn cli_vars(nats: &NatsServer, db: &TestDb) -> HashMap<String, String> {
    let mut v = HashMap::new();
    v.insert("NATS_URL".to_string(), nats.url());
    v.insert("DATABASE_URL".to_string(), db.url.clone());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_migration_without_restart_loses_nothing() {
    let stack = legacy_stack().await;
    let (js, db) = (&stack.js, &stack.db);
    let app = stack.app_with(&[("EVENT_STREAM_MODE", "multi")]).await;
    assert_eq!(app.health().await.1["stream"], "ATHLETE_ALLY_EVENTS");
    let cli_env = cli_vars(&stack.nats, db);
    let publisher = Publisher::start(js.clone(), "fwd");

    let plan = ok(&cli_env, &["migrate", "plan"]).await;
    assert_eq!(plan["phaseAfter"], "legacy");
    ok(&cli_env, &["migrate", "phase0"]).await;
    let r = ok(&cli_env, &["migrate", "phase1", "--cutover", "move", "--yes"]).await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    wait_for(
        "oura consumer on the vendor stream",
        Duration::from_secs(10),
        || async { app.health().await.1["consumers"]["oura"]["stream"] == "AA_VENDOR_HOT" },
    )
    .await;
    let r = ok(&cli_env, &["migrate", "phase2", "--cutover", "move", "--yes"]).await;
    assert_eq!(r["phaseAfter"], "core-moved", "{r}");
    wait_for(
        "hrv consumer on the core stream",
        Duration::from_secs(10),
        || async {
            let h = app.health().await.1;
            h["stream"] == "AA_CORE_HOT" && h["consumers"]["hrv"]["fallback"] == false
        },
    )
    .await;
    // Running a step twice is harmless.
    ok(
        &cli_env,
        &["migrate", "phase1", "--cutover", "move", "--yes", "--no-probe"],
    )
    .await;
    ok(&cli_env, &["migrate", "phase0"]).await;

    let (hrv, hooks, retries) = publisher.finish().await;
    assert!(
        hrv > 20 && hooks > 20,
        "the publisher ran through the steps ({hrv}, {hooks}, {retries} retries)"
    );
    wait_rows(db, "fwd", hrv, hooks).await;
    for durable in [
        "normalize-hrv-durable",
        "normalize-sleep-durable",
        "normalize-oura",
    ] {
        wait_drained(js, "ATHLETE_ALLY_EVENTS", durable).await;
    }
    wait_for("draining finished", Duration::from_secs(10), || async {
        app.health().await.1["consumers"]["hrv"]["draining"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    })
    .await;
    // The legacy durables are no longer consumed: their consumer-info gauges are gone (stale
    // values would keep lag alerts firing), the new ones are there; every dead-letter reason
    // has its series from the start.
    let m = app.metrics().await;
    for gauge in [
        "normalize_consumer_pending_messages",
        "normalize_consumer_ack_pending_messages",
        "normalize_consumer_redelivered_messages",
    ] {
        assert_eq!(
            metric_value(&m, gauge, &[("stream", "ATHLETE_ALLY_EVENTS")]),
            None,
            "{gauge}: {m}"
        );
        assert!(
            metric_value(&m, gauge, &[("stream", "AA_CORE_HOT"), ("consumer", "hrv")]).is_some(),
            "{gauge}: {m}"
        );
    }
    assert_eq!(
        metric_value(
            &m,
            "dlq_messages_total",
            &[
                ("consumer", "sleep"),
                ("reason", "non-retryable"),
                ("stream", "AA_CORE_HOT")
            ]
        ),
        Some(0.0),
        "{m}"
    );
    let r = ok(&cli_env, &["migrate", "phase3", "--yes", "--quiet-period", "0s"]).await;
    assert_eq!(r["phaseAfter"], "migrated", "{r}");
    assert_eq!(stream_names(js).await, ["AA_CORE_HOT", "AA_DLQ", "AA_VENDOR_HOT"]);
    for (stream, durable) in [
        ("AA_CORE_HOT", "normalize-hrv-durable"),
        ("AA_CORE_HOT", "normalize-sleep-durable"),
        ("AA_VENDOR_HOT", "normalize-oura"),
    ] {
        assert!(
            consumer_backlog(js, stream, durable).await.is_some(),
            "{durable} on {stream}"
        );
    }
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0, "nothing dead-lettered");
    let m = app.metrics().await;
    assert!(
        metric_value(
            &m,
            "normalize_stream_fallback_total",
            &[
                ("consumer", "hrv"),
                ("from", "ATHLETE_ALLY_EVENTS"),
                ("to", "AA_CORE_HOT")
            ]
        ) == Some(1.0),
        "{m}"
    );
    // Phase 3 done twice is harmless too.
    ok(&cli_env, &["migrate", "phase3", "--yes", "--quiet-period", "0s"]).await;
    app.wait_ready().await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_the_daemon_to_legacy_without_restart() {
    let stack = legacy_stack().await;
    let (js, db) = (&stack.js, &stack.db);
    let app = stack.app_with(&[("EVENT_STREAM_MODE", "multi")]).await;
    let cli_env = cli_vars(&stack.nats, db);
    let publisher = Publisher::start(js.clone(), "rb");
    ok(&cli_env, &["migrate", "phase0"]).await;
    ok(&cli_env, &["migrate", "phase1", "--cutover", "move", "--yes"]).await;
    ok(&cli_env, &["migrate", "phase2", "--cutover", "move", "--yes"]).await;
    wait_for("on the core stream", Duration::from_secs(10), || async {
        app.health().await.1["stream"] == "AA_CORE_HOT"
    })
    .await;
    // Out of order: rolling back phase1 while the core subjects are moved is refused.
    let out = cli(
        &cli_env,
        &["migrate", "rollback", "phase1", "--cutover", "move", "--yes"],
    )
    .await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    let r = ok(
        &cli_env,
        &["migrate", "rollback", "phase2", "--cutover", "move", "--yes"],
    )
    .await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    let r = ok(
        &cli_env,
        &["migrate", "rollback", "phase1", "--cutover", "move", "--yes"],
    )
    .await;
    assert_eq!(r["phaseAfter"], "prepared", "{r}");
    wait_for("back on the legacy stream", Duration::from_secs(10), || async {
        let h = app.health().await.1;
        h["stream"] == "ATHLETE_ALLY_EVENTS" && h["consumers"]["oura"]["stream"] == "ATHLETE_ALLY_EVENTS"
    })
    .await;
    let (hrv, hooks, _) = publisher.finish().await;
    wait_rows(db, "rb", hrv, hooks).await;
    // The new durables were kept, and drained by the daemon.
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    wait_drained(js, "AA_VENDOR_HOT", "normalize-oura").await;
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    let plan = ok(&cli_env, &["migrate", "plan"]).await;
    assert_eq!(plan["phaseAfter"], "prepared");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_refuses_overlaps_and_dry_runs_change_nothing() {
    let stack = Stack::start().await;
    let (js, db) = (&stack.js, &stack.db);
    let cli_env = cli_vars(&stack.nats, db);

    // Empty server: a dry run changes nothing; a real apply creates; a second apply is a no-op.
    let r = ok(&cli_env, &["topology", "apply", "--mode", "multi", "--dry-run"]).await;
    assert!(
        r["actions"].to_string().contains("create stream AA_CORE_HOT"),
        "{r}"
    );
    assert!(stream_names(js).await.is_empty());
    ok(&cli_env, &["topology", "apply", "--mode", "multi"]).await;
    assert_eq!(stream_names(js).await, ["AA_CORE_HOT", "AA_DLQ", "AA_VENDOR_HOT"]);
    assert!(consumer_backlog(js, "AA_CORE_HOT", "normalize-hrv-durable")
        .await
        .is_some());
    let again = ok(&cli_env, &["topology", "apply", "--mode", "multi"]).await;
    assert!(!again["actions"].to_string().contains("create stream"), "{again}");
    let status = ok(&cli_env, &["topology", "status"]).await;
    assert_eq!(status["phaseAfter"], "migrated");
    assert_eq!(status["data"].as_array().unwrap().len(), 3);

    // Legacy topology: apply --mode multi refuses with the explanation and changes nothing.
    let nats2 = NatsServer::start().await;
    let js2 = nats2.js().await;
    legacy_topology(&js2).await;
    let env2 = cli_vars(&nats2, db);
    let before = stream_names(&js2).await;
    let out = cli(&env2, &["topology", "apply", "--mode", "multi"]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("held by stream ATHLETE_ALLY_EVENTS"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("migrate phase2"), "{}", out.stdout);
    assert!(out.stdout.contains("migrate phase1"), "{}", out.stdout);
    assert_eq!(stream_names(&js2).await, before, "nothing changed");
    // Dry runs of migration steps change nothing either.
    ok(&env2, &["migrate", "phase0", "--dry-run"]).await;
    assert_eq!(stream_names(&js2).await, before);
    // A subject move without --yes is refused, not performed.
    ok(&env2, &["migrate", "phase0"]).await;
    let out = cli(&env2, &["migrate", "phase1", "--cutover", "move"]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    let legacy = js2.get_stream("ATHLETE_ALLY_EVENTS").await.unwrap();
    assert!(legacy
        .cached_info()
        .config
        .subjects
        .contains(&"vendor.>".to_string()));
    // Phase 3 refuses while the legacy stream holds subjects.
    let out = cli(&env2, &["migrate", "phase3", "--yes", "--quiet-period", "0s"]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(js2.get_stream("ATHLETE_ALLY_EVENTS").await.is_ok());
    // A bad variable stops the CLI with the variable named.
    let mut bad = env2.clone();
    bad.insert("EVENT_STREAM_MODE".into(), "dual".into());
    let out = cli(&bad, &["migrate", "plan"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("EVENT_STREAM_MODE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase3_refuses_while_legacy_has_recent_messages() {
    let stack = legacy_stack().await;
    let (js, db) = (&stack.js, &stack.db);
    let app = stack.app_with(&[("EVENT_STREAM_MODE", "multi")]).await;
    let cli_env = cli_vars(&stack.nats, db);
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("q", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    ok(&cli_env, &["migrate", "phase0"]).await;
    ok(&cli_env, &["migrate", "phase1", "--cutover", "move", "--yes"]).await;
    ok(&cli_env, &["migrate", "phase2", "--cutover", "move", "--yes"]).await;
    let out = cli(&cli_env, &["migrate", "phase3", "--yes"]).await;
    assert_eq!(out.code, 3, "default quiet period of 14d refuses: {}", out.stdout);
    assert!(out.stdout.contains("quiet-period"), "{}", out.stdout);
    assert!(js.get_stream("ATHLETE_ALLY_EVENTS").await.is_ok());
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_pair_through_the_migration() {
    let stack = legacy_stack().await;
    let (js, db) = (&stack.js, &stack.db);
    let blue = TestApp::spawn(stack.vars_with(&[("EVENT_STREAM_MODE", "single")])).await;
    let green = TestApp::spawn(stack.vars_with(&[("EVENT_STREAM_MODE", "multi")])).await;
    blue.wait_ready().await;
    green.wait_ready().await;
    let cli_env = cli_vars(&stack.nats, db);
    let publisher = Publisher::start(js.clone(), "bg");
    ok(&cli_env, &["migrate", "phase0"]).await;
    ok(&cli_env, &["migrate", "phase1", "--cutover", "move", "--yes"]).await;
    ok(&cli_env, &["migrate", "phase2", "--cutover", "move", "--yes"]).await;
    let (hrv, hooks, _) = publisher.finish().await;
    wait_rows(db, "bg", hrv, hooks).await;
    for durable in ["normalize-hrv-durable", "normalize-oura"] {
        wait_drained(js, "ATHLETE_ALLY_EVENTS", durable).await;
    }
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    wait_drained(js, "AA_VENDOR_HOT", "normalize-oura").await;
    // One normalized event per HRV event across both streams (Nats-Msg-Id dedupes retries).
    let mut normalized = 0;
    for s in ["ATHLETE_ALLY_EVENTS", "AA_CORE_HOT"] {
        normalized += stream_contents(js, s)
            .await
            .iter()
            .filter(|m| m.subject.as_str() == "athlete-ally.hrv.normalized-stored")
            .filter(|m| {
                serde_json::from_slice::<Value>(&m.payload).ok().is_some_and(|v| {
                    v["record"]["userId"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("bg-user-"))
                })
            })
            .count();
    }
    assert_eq!(normalized, hrv, "no event stored twice");
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    ok(&cli_env, &["migrate", "phase3", "--yes", "--quiet-period", "0s"]).await;
    // Blue (single) has lost its stream and says so; green carries on.
    wait_for(
        "blue not ready without its stream",
        Duration::from_secs(20),
        || async { blue.get("/health/ready").await.0 == 503 },
    )
    .await;
    green.wait_ready().await;
    blue.stop().await.unwrap();
    green.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_points_to_the_rollback_not_the_next_phase() {
    let stack = legacy_stack().await;
    let (js, db) = (&stack.js, &stack.db);
    let cli_env = cli_vars(&stack.nats, db);
    ok(&cli_env, &["migrate", "phase0"]).await;

    // No daemon runs, so the probe after the move fails: exit 1, the rollback, no next phase.
    let out = cli(
        &cli_env,
        &[
            "migrate",
            "phase1",
            "--cutover",
            "move",
            "--yes",
            "--probe-timeout",
            "1",
        ],
    )
    .await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("FAILED"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("rollback: normalize-service migrate rollback phase1 --yes"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("docs/MIGRATION.md#a-step-failed"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("next:"), "{}", out.stdout);
    assert!(!out.stdout.contains("phase2 --yes"), "{}", out.stdout);
    let out = cli(&cli_env, &["migrate", "verify", "phase1", "--probe-timeout", "1"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("migrate rollback phase1 --yes"),
        "{}",
        out.stdout
    );

    // The printed rollback works.
    ok(
        &cli_env,
        &[
            "migrate",
            "rollback",
            "phase1",
            "--cutover",
            "move",
            "--yes",
            "--no-probe",
        ],
    )
    .await;
    let legacy = js.get_stream("ATHLETE_ALLY_EVENTS").await.unwrap();
    assert!(legacy
        .cached_info()
        .config
        .subjects
        .contains(&"vendor.>".to_string()));

    // A move interrupted between remove and add: `plan` says the state is mixed (exit 3) and
    // re-running the same step finishes it (docs/MIGRATION.md, "A step failed").
    let mut cfg = legacy.cached_info().config.clone();
    cfg.subjects.retain(|s| s != "vendor.>");
    js.update_stream(cfg).await.unwrap();
    let out = cli(&cli_env, &["migrate", "plan"]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("mixed state"), "{}", out.stdout);
    ok(
        &cli_env,
        &["migrate", "phase1", "--cutover", "move", "--yes", "--no-probe"],
    )
    .await;
    let vendor = js.get_stream("AA_VENDOR_HOT").await.unwrap();
    assert!(vendor
        .cached_info()
        .config
        .subjects
        .contains(&"vendor.>".to_string()));
}

/// An error after the step changed NATS (here: the probe cannot open its database) does not
/// replace the report: the actions taken, the error as a failed check, the phase after and the
/// rollback are printed, text and `--json`, with exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_the_move_keeps_the_report_and_the_rollback() {
    let stack = legacy_stack().await;
    let mut cli_env = cli_vars(&stack.nats, &stack.db);
    ok(&cli_env, &["migrate", "phase0"]).await;
    // A database that does not exist fails the connection at once (a refused connection would be
    // retried by sqlx for its acquire timeout).
    let (base, _) = stack.db.url.rsplit_once('/').unwrap();
    cli_env.insert("DATABASE_URL".into(), format!("{base}/{}_missing", stack.db.name));

    let out = cli(
        &cli_env,
        &["migrate", "phase1", "--cutover", "move", "--yes", "--json"],
    )
    .await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert!(v.get("error").is_none(), "a report, not an error: {v}");
    assert_eq!(v["ok"], false, "{v}");
    let kinds: Vec<&str> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"moveSubjects"), "{v}");
    let failed: Vec<&Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert!(
        failed
            .iter()
            .any(|c| c["status"].as_str().unwrap_or("").contains("DATABASE_URL")),
        "{v}"
    );
    assert_eq!(v["phaseAfter"], "vendor-moved", "{v}");
    assert_eq!(v["next"], Value::Null, "{v}");
    assert!(
        v["rollback"]
            .as_str()
            .unwrap_or("")
            .starts_with("normalize-service migrate rollback phase1 --yes"),
        "{v}"
    );

    // The same in text, on a re-run (the subjects are already in place).
    let out = cli(&cli_env, &["migrate", "phase1", "--cutover", "move", "--yes"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    for needle in [
        "action  subjects [\"vendor.>\"] already on AA_VENDOR_HOT",
        "check   verify — FAILED DATABASE_URL",
        "phase after:",
        "rollback: normalize-service migrate rollback phase1 --yes",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    let out = cli(&cli_env, &["migrate", "verify", "phase1", "--json"]).await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let v = out.json();
    assert!(v.get("error").is_none(), "{v}");
    assert!(
        v["checks"].as_array().unwrap().len() > 1,
        "the checks made before the error: {v}"
    );
}
