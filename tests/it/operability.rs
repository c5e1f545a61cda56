//! What an operator sees of a running daemon (issue "An operator's daemon", items 1, 2, 7 and
//! 10): one JSON log line per state transition, asserted by its fields, not its text.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The daemon's JSON log lines so far.
fn log_lines(d: &DaemonProcess) -> Vec<Value> {
    d.stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The lines whose `event` field is `event`.
fn events(d: &DaemonProcess, event: &str) -> Vec<Value> {
    log_lines(d).into_iter().filter(|l| l["event"] == event).collect()
}

async fn wait_event(d: &DaemonProcess, event: &str, n: usize) -> Value {
    wait_for(
        &format!("{n} log line(s) with event {event}"),
        Duration::from_secs(30),
        || async { events(d, event).len() >= n },
    )
    .await;
    events(d, event)[n - 1].clone()
}

/// `normalize_consumer_oldest_pending_age_seconds` of `consumer`'s durable on AA_CORE_HOT.
async fn lag_seconds(app: &TestApp, consumer: &str) -> Option<f64> {
    metric_value(
        &app.metrics().await,
        "normalize_consumer_oldest_pending_age_seconds",
        &[("consumer", consumer), ("stream", "AA_CORE_HOT")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_and_dependency_transitions_are_logged_once_each() {
    let mut stack = Stack::builder().db_proxy().start().await;
    let d = stack.daemon_with(&[("LOG_FORMAT", "json")]).await;

    // Start-up: the effective configuration (redacted), the listener, and readiness.
    let starting = wait_event(&d, "starting", 1).await;
    assert_eq!(starting["level"], "INFO");
    for field in ["version", "git_revision", "mode", "nats", "database", "consumers"] {
        assert!(starting[field].is_string(), "{field} in {starting}");
    }
    let listening = wait_event(&d, "listening", 1).await;
    assert!(
        listening["address"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", d.port)),
        "{listening}"
    );
    wait_event(&d, "ready", 1).await;

    // A database outage: one line down (with the cause), one line up (with its duration).
    stack.proxy().cut();
    let down = wait_event(&d, "database_down", 1).await;
    assert_eq!(down["level"], "WARN");
    assert!(!down["error"].as_str().unwrap_or_default().is_empty(), "{down}");
    // Health names the failing check, its error and since when.
    let (code, body) = d.get("/health/ready").await;
    assert_eq!(code, 503);
    assert!(body.starts_with("not ready: database unavailable ("), "{body}");
    let (_, health) = d.get("/health").await;
    let health: Value = serde_json::from_str(&health).unwrap();
    let db = &health["dependencies"]["database"];
    assert_eq!(db["status"], "unavailable", "{health}");
    assert!(db["error"].is_string() && db["since"].is_string(), "{health}");
    assert_eq!(health["database"], "unavailable");
    assert!(
        health["notReady"][0]
            .as_str()
            .unwrap()
            .starts_with("database unavailable"),
        "{health}"
    );
    assert_eq!(health["dependencies"]["nats"]["status"], "connected");
    assert!(health["dependencies"]["nats"].get("error").is_none(), "{health}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stack.proxy().restore().await;
    let up = wait_event(&d, "database_up", 1).await;
    assert_eq!(up["level"], "INFO");
    assert!(up["outage_ms"].as_u64().unwrap() >= 2000, "{up}");
    assert!(up["cause"].is_string(), "{up}");
    assert_eq!(events(&d, "database_down").len(), 1, "one line per transition");

    // A NATS restart: disconnected, then reconnected (counted), once each.
    stack.nats.restart().await;
    let lost = wait_event(&d, "nats_disconnected", 1).await;
    assert_eq!(lost["level"], "WARN");
    let back = wait_event(&d, "nats_reconnected", 1).await;
    assert!(back["outage_ms"].is_u64(), "{back}");
    assert_eq!(events(&d, "nats_disconnected").len(), 1);
    wait_for("the reconnection counted", Duration::from_secs(10), || async {
        metric_value(&d.metrics().await, "normalize_nats_reconnects_total", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(events(&d, "ready").len(), 1, "ready is announced once");
    for l in log_lines(&d) {
        let text = l.to_string();
        assert!(!text.contains("\"ERROR\""), "no ERROR line: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_summarised_at_warn_not_logged_per_message() {
    let stack = Stack::start().await;
    let mut d = stack.daemon_with(&[("LOG_FORMAT", "json")]).await;
    for i in 0..3 {
        publish(&stack.js, HRV_SUBJECT, format!("{{not json {i}")).await;
    }
    wait_for("three dead letters", Duration::from_secs(20), || async {
        stream_messages(&stack.js, "AA_DLQ").await >= 3
    })
    .await;
    // Nothing per message above DEBUG; the summary comes at the latest when the daemon stops.
    d.stop().await;
    let lines = log_lines(&d);
    let summaries: Vec<&Value> = lines.iter().filter(|l| l["event"] == "dead_letters").collect();
    assert_eq!(summaries.len(), 1, "{lines:?}");
    let s = summaries[0];
    assert_eq!(s["level"], "WARN");
    assert_eq!(s["consumer"], "hrv");
    assert_eq!(s["count"], 3);
    assert_eq!(s["by_reason"], "schema-invalid=3");
    assert_eq!(s["first_dlq_seq"], 1);
    assert_eq!(s["last_dlq_seq"], 3);
    let per_message = lines
        .iter()
        .filter(|l| l["level"] == "ERROR" || l["level"] == "WARN")
        .filter(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("normalize_service::consumer"))
        })
        .count();
    assert_eq!(per_message, 0, "no per-message WARN or ERROR: {lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_call_metrics_are_present_and_move() {
    let (stack, app) = Stack::builder().app().await;
    let text = app.metrics().await;
    for name in [
        "normalize_nats_reconnects_total",
        "normalize_database_pool_connections",
        "normalize_database_pool_idle_connections",
    ] {
        assert!(metric_value(&text, name, &[]).is_some(), "{name} in\n{text}");
    }
    assert!(text.contains("normalize_build_info{git_revision=\""), "{text}");
    assert_eq!(
        metric_value(
            &text,
            "normalize_last_store_timestamp_seconds",
            &[("consumer", "hrv")]
        ),
        Some(0.0)
    );
    let before = chrono::Utc::now().timestamp() as f64;
    publish(
        &stack.js,
        HRV_SUBJECT,
        hrv_event("m", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for("the store timestamp", Duration::from_secs(20), || async {
        metric_value(
            &app.metrics().await,
            "normalize_last_store_timestamp_seconds",
            &[("consumer", "hrv")],
        )
        .unwrap_or(0.0)
            >= before - 1.0
    })
    .await;
    // Nothing pending: the lag in seconds is 0 for the bound durable.
    wait_for("the lag in seconds", Duration::from_secs(20), || async {
        lag_seconds(&app, "hrv").await == Some(0.0)
    })
    .await;
    app.stop().await.unwrap();
}

/// `normalize_dlq_depth_messages` is read from the DLQ stream: every reason present at 0 from
/// the start, moving with dead letters, and the same after a restart (not a per-process counter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_depth_gauge_is_read_from_the_stream_by_reason() {
    let (stack, app) = Stack::builder()
        .env(&[("CONSUMER_INFO_INTERVAL_MS", "200")])
        .app()
        .await;
    let depth = |text: &str, reason: &str| {
        metric_value(
            text,
            "normalize_dlq_depth_messages",
            &[("stream", "AA_DLQ"), ("reason", reason)],
        )
    };
    wait_for("the depth series at 0", Duration::from_secs(20), || async {
        let text = app.metrics().await;
        ["schema-invalid", "non-retryable", "max-deliver", "other"]
            .iter()
            .all(|r| depth(&text, r) == Some(0.0))
    })
    .await;
    for i in 0..2 {
        publish(&stack.js, HRV_SUBJECT, format!("{{broken {i}")).await;
    }
    wait_for("a depth of 2 schema-invalid", Duration::from_secs(20), || async {
        depth(&app.metrics().await, "schema-invalid") == Some(2.0)
    })
    .await;
    assert_eq!(depth(&app.metrics().await, "max-deliver"), Some(0.0));
    app.stop().await.unwrap();

    // A new process reports what the stream holds, not what it dead-lettered itself.
    let app = stack.app().await;
    wait_for("the depth after a restart", Duration::from_secs(20), || async {
        depth(&app.metrics().await, "schema-invalid") == Some(2.0)
    })
    .await;
    app.stop().await.unwrap();
}

/// Several invalid variables: one start-up names them all (exit 2), before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_variable_is_named_in_one_start_up() {
    let vars: std::collections::HashMap<String, String> = [
        ("DATABASE_MAX_CONNECTIONS", "0"),
        ("LOG_FORMAT", "xml"),
        ("HRV_BATCH_SIZE", "0"),
        ("NORMALIZE_SLEEP_DLQ_SUBJECT", "errors.sleep"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut daemon = DaemonProcess::spawn(&vars);
    let code = daemon.expect_exit(Duration::from_secs(30)).await.code();
    let stderr = daemon.stderr();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("4 invalid variables"), "{stderr}");
    for var in [
        "DATABASE_MAX_CONNECTIONS",
        "LOG_FORMAT",
        "HRV_BATCH_SIZE",
        "NORMALIZE_SLEEP_DLQ_SUBJECT",
    ] {
        assert!(
            stderr.contains(&format!("invalid value for {var}:")),
            "{var} not named:\n{stderr}"
        );
    }
}

/// A message that cannot be stored (the database is cut) ages: that age is the lag in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_message_age_is_the_lag_in_seconds() {
    let (stack, app) = Stack::builder()
        .db_proxy()
        .env(&[("NORMALIZE_HRV_MAX_DELIVER", "1000")])
        .app()
        .await;
    stack.proxy().cut();
    publish(
        &stack.js,
        HRV_SUBJECT,
        hrv_event("lag", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for("an age of 2 s", Duration::from_secs(30), || async {
        lag_seconds(&app, "hrv").await.unwrap_or(0.0) >= 2.0
    })
    .await;
    // The sleep consumer shares the stream; its own durable has nothing pending.
    assert_eq!(lag_seconds(&app, "sleep").await, Some(0.0));
    stack.proxy().restore().await;
    wait_for("the lag back to 0", Duration::from_secs(30), || async {
        lag_seconds(&app, "hrv").await == Some(0.0)
    })
    .await;
    app.stop().await.unwrap();
}

/// An invalid `RUST_LOG` is said, not ignored; pretty logs into a file carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rust_log_is_reported_and_pretty_logs_to_a_file_are_plain() {
    let stack = Stack::start().await;
    let mut d = stack
        .daemon_with(&[("LOG_FORMAT", "pretty"), ("RUST_LOG", "info,x=nonsense")])
        .await;
    d.stop().await;
    let err = d.stderr();
    assert!(err.contains("RUST_LOG is not a valid filter"), "{err}");
    assert!(err.contains("invalid_rust_log"), "{err}");
    assert!(!err.contains('\u{1b}'), "no ANSI escape in a file:\n{err}");
    assert!(
        err.contains("consumer bound"),
        "the default filter applies:\n{err}"
    );
}
