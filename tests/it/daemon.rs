//! The daemon as a process: signals, start-up errors, the healthcheck subcommand.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::support::*;

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon did not exit within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_http_ready(port: u16) {
    wait_for("daemon process ready", Duration::from_secs(30), || async {
        matches!(
            normalize_service::http::http_get("127.0.0.1", port, "/health/ready", Duration::from_secs(2))
                .await,
            Ok((200, _))
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_flowing_exits_zero_and_loses_nothing() {
    for mode in ["single", "multi"] {
        let nats = NatsServer::start().await;
        let db = TestDb::new().await;
        let port = free_port();
        let vars = with(
            base_vars(&nats, &db.url),
            &[
                ("EVENT_STREAM_MODE", mode),
                ("PORT", &port.to_string()),
                ("METRICS_PORT", &free_port().to_string()),
            ],
        );
        let mut child = spawn_daemon(&vars);
        wait_http_ready(port).await;

        const TOTAL: usize = 400;
        let js = nats.js().await;
        let publisher = {
            let js = js.clone();
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
        let pool = db.pool().await;
        wait_for("some rows before SIGTERM", Duration::from_secs(30), || async {
            count(&pool, "SELECT count(*) FROM hrv_data").await >= 50
        })
        .await;
        signal(&child, "TERM");
        let status = wait_exit(&mut child, Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
        publisher.await.unwrap();

        let mut child = spawn_daemon(&vars);
        let stream = if mode == "single" {
            "ATHLETE_ALLY_EVENTS"
        } else {
            "AA_CORE_HOT"
        };
        wait_for(
            "every event stored after restart",
            Duration::from_secs(60),
            || async { count(&pool, "SELECT count(*) FROM hrv_data").await == TOTAL as i64 },
        )
        .await;
        wait_drained(&js, stream, "normalize-hrv-durable").await;
        assert_eq!(
            count(&pool, "SELECT count(DISTINCT user_id) FROM hrv_data").await,
            TOTAL as i64
        );
        let normalized = stream_contents(&js, stream)
            .await
            .into_iter()
            .filter(|m| m.subject.as_str() == "athlete-ally.hrv.normalized-stored")
            .count();
        assert_eq!(
            normalized, TOTAL,
            "one normalized event per event, duplicates removed by Nats-Msg-Id"
        );
        assert_eq!(stream_messages(&js, "AA_DLQ").await, 0);
        signal(&child, "INT");
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(15)).await.code(),
            Some(0),
            "SIGINT exits 0"
        );
    }
}

#[tokio::test]
async fn invalid_configuration_stops_start_up_naming_the_variable() {
    for (var, value) in [
        ("EVENT_STREAM_MODE", "dual"),
        ("HRV_BATCH_SIZE", "lots"),
        ("TOPOLOGY_PROVISION", "sometimes"),
        ("NORMALIZE_HRV_ACK_WAIT_MS", "-5"),
    ] {
        let out = Command::new(BIN)
            .arg("run")
            .env_clear()
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(stderr.contains(value), "{var}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_follows_readiness() {
    let port = free_port();
    // Nothing listening: exit 1.
    let out = Command::new(BIN)
        .arg("healthcheck")
        .env_clear()
        .env("PORT", port.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    let nats = NatsServer::start().await;
    let db = TestDb::new().await;
    let vars = with(
        base_vars(&nats, &db.url),
        &[
            ("PORT", &port.to_string()),
            ("METRICS_PORT", &free_port().to_string()),
        ],
    );
    let mut child = spawn_daemon(&vars);
    wait_http_ready(port).await;
    let out = Command::new(BIN)
        .arg("healthcheck")
        .env_clear()
        .env("PORT", port.to_string())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    signal(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(15)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_up_not_ready_until_something_can_be_bound() {
    let nats = NatsServer::start().await;
    let db = TestDb::new().await;
    // Provisioning off and no streams: nothing can be bound.
    let app = TestApp::spawn(with(base_vars(&nats, &db.url), &[("TOPOLOGY_PROVISION", "off")])).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, h) = app.health().await;
    assert_eq!(code, 503);
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["consumers"]["hrv"]["bound"], false);
    assert_eq!(app.get("/health/live").await.0, 200, "alive: not a crash loop");
    assert_eq!(app.get("/health/ready").await.0, 503);
    // An operator applies the topology; the daemon binds without a restart.
    let js = nats.js().await;
    let names = normalize_service::config::StreamNames::default();
    let specs =
        normalize_service::topology::stream_specs(normalize_service::config::StreamMode::Multi, &names, 1);
    create_topology(&js, &base_vars(&nats, &db.url), &specs).await;
    app.wait_ready().await;
    assert_eq!(app.health().await.1["stream"], "AA_CORE_HOT");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_loops_survive_a_nats_restart() {
    for pull_mode in ["fetch", "stream"] {
        let mut nats = NatsServer::start().await;
        let db = TestDb::new().await;
        let app = TestApp::spawn(with(base_vars(&nats, &db.url), &[("HRV_PULL_MODE", pull_mode)])).await;
        app.wait_ready().await;
        nats.kill();
        wait_for("outage visible on /health", Duration::from_secs(15), || async {
            let (code, h) = app.health().await;
            code == 503 && h["nats"] == "disconnected"
        })
        .await;
        nats.restart().await;
        app.wait_ready().await;
        let js = nats.js().await;
        for i in 0..20 {
            publish(
                &js,
                HRV_SUBJECT,
                hrv_event(&format!("n{i}"), "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
            )
            .await;
        }
        let pool = db.pool().await;
        wait_for("rows after the restart", Duration::from_secs(30), || async {
            count(&pool, "SELECT count(*) FROM hrv_data").await == 20
        })
        .await;
        assert_eq!(app.get("/health/live").await.0, 200);
        app.stop().await.unwrap();
    }
}
