//! The daemon as a process: signals, start-up errors, the healthcheck subcommand.

use std::time::Duration;

use crate::support::*;

per_mode!(sigterm_while_flowing_exits_zero_and_loses_nothing);
async fn sigterm_while_flowing_exits_zero_and_loses_nothing(mode: &str) {
    let stack = Stack::builder().mode(mode).start().await;
    let mut daemon = stack.daemon().await;

    const TOTAL: usize = 400;
    let publisher = {
        let js = stack.js.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL {
                let body = hrv_event(
                    &format!("user-{i}"),
                    "2025-03-01",
                    40.0 + i as f64,
                    "2025-03-01T06:00:00Z",
                );
                publish_with_id(&js, HRV_SUBJECT, &format!("e-{i}"), body).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let pool = stack.pool().await;
    wait_for("some rows before SIGTERM", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await >= 50
    })
    .await;
    daemon.signal("TERM");
    let status = daemon.expect_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    publisher.await.unwrap();

    let mut daemon = DaemonProcess::spawn(&stack.vars);
    let stream = core_stream(mode);
    wait_for(
        "every event stored after restart",
        Duration::from_secs(60),
        || async { count(&pool, "SELECT count(*) FROM hrv_data").await == TOTAL as i64 },
    )
    .await;
    wait_drained(&stack.js, stream, "normalize-hrv-durable").await;
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT user_id) FROM hrv_data").await,
        TOTAL as i64
    );
    let normalized = stream_contents(&stack.js, stream)
        .await
        .into_iter()
        .filter(|m| m.subject.as_str() == "athlete-ally.hrv.normalized-stored")
        .count();
    assert_eq!(
        normalized, TOTAL,
        "one normalized event per event, duplicates removed by Nats-Msg-Id"
    );
    assert_eq!(stream_messages(&stack.js, "AA_DLQ").await, 0);
    daemon.signal("INT");
    assert_eq!(
        daemon.expect_exit(Duration::from_secs(15)).await.code(),
        Some(0),
        "SIGINT exits 0"
    );
}

#[tokio::test]
async fn invalid_configuration_stops_start_up_naming_the_variable() {
    for (var, value) in [
        ("EVENT_STREAM_MODE", "dual"),
        ("HRV_BATCH_SIZE", "lots"),
        ("TOPOLOGY_PROVISION", "sometimes"),
        ("NORMALIZE_HRV_ACK_WAIT_MS", "-5"),
    ] {
        let out = cli(&vars(&[(var, value)]), &["run"]).await;
        assert_ne!(out.code, 0, "{var}={value} must fail");
        assert!(out.stderr.contains(var), "{var}: {}", out.stderr);
        assert!(out.stderr.contains(value), "{var}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_follows_readiness() {
    let port = free_port();
    let healthcheck_env = vars(&[("PORT", &port.to_string())]);
    // Nothing listening: exit 1.
    let out = cli(&healthcheck_env, &["healthcheck"]).await;
    assert_eq!(out.code, 1);
    // A configuration it cannot read: 1 too (container runtimes reserve other codes).
    let out = cli(&vars(&[("PORT", "not-a-port")]), &["healthcheck"]).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("PORT"), "{}", out.stderr);

    let stack = Stack::builder().env(&[("PORT", &port.to_string())]).start().await;
    let mut daemon = stack.daemon().await;
    let out = cli(&healthcheck_env, &["healthcheck"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    daemon.signal("TERM");
    assert_eq!(daemon.expect_exit(Duration::from_secs(15)).await.code(), Some(0));
}

/// Listening on one specific address (`HOST`), which loopback does not reach: `healthcheck`
/// asks that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_asks_the_address_the_daemon_listens_on() {
    let port = free_port();
    let env = [("HOST", "127.0.0.2"), ("PORT", &port.to_string())];
    let stack = Stack::builder().env(&env).start().await;
    let mut daemon = DaemonProcess::spawn(&stack.vars);
    let healthcheck_env = vars(&env);
    wait_for("healthcheck passes", Duration::from_secs(30), || async {
        cli(&healthcheck_env, &["healthcheck"]).await.code == 0
    })
    .await;
    assert!(
        normalize_service::http::http_get("127.0.0.1", port, "/health/ready", Duration::from_secs(2))
            .await
            .is_err(),
        "the daemon listens on 127.0.0.2 only"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.expect_exit(Duration::from_secs(15)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_up_not_ready_until_something_can_be_bound() {
    // Provisioning off and no streams: nothing can be bound.
    let stack = Stack::builder()
        .env(&[("TOPOLOGY_PROVISION", "off")])
        .start()
        .await;
    let app = stack.spawn_app().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, h) = app.health().await;
    assert_eq!(code, 503);
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["consumers"]["hrv"]["bound"], false);
    assert_eq!(app.get("/health/live").await.0, 200, "alive: not a crash loop");
    assert_eq!(app.get("/health/ready").await.0, 503);
    // An operator applies the topology; the daemon binds without a restart.
    let names = normalize_service::config::StreamNames::default();
    let specs =
        normalize_service::topology::stream_specs(normalize_service::config::StreamMode::Multi, &names, 1);
    create_topology(&stack.js, &base_vars(&stack.nats, &stack.db.url), &specs).await;
    app.wait_ready().await;
    assert_eq!(app.health().await.1["stream"], "AA_CORE_HOT");
    app.stop().await.unwrap();
}

test_cases!(pull_loops_survive_a_nats_restart {
    fetch: ("fetch"),
    stream: ("stream")
});
async fn pull_loops_survive_a_nats_restart(pull_mode: &str) {
    let (mut stack, app) = Stack::app_with_env(&[("HRV_PULL_MODE", pull_mode)]).await;
    stack.nats.kill();
    wait_for("outage visible on /health", Duration::from_secs(15), || async {
        let (code, h) = app.health().await;
        code == 503 && h["nats"] == "disconnected"
    })
    .await;
    stack.nats.restart().await;
    app.wait_ready().await;
    let js = stack.nats.js().await;
    for i in 0..20 {
        publish(
            &js,
            HRV_SUBJECT,
            hrv_event(&format!("n{i}"), "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
        )
        .await;
    }
    let pool = stack.pool().await;
    wait_for("rows after the restart", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 20
    })
    .await;
    assert_eq!(app.get("/health/live").await.0, 200);
    app.stop().await.unwrap();
}
