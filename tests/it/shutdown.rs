//! Issue "Nothing silently lost, stranded or pinned", item 5: SIGTERM ends the process within
//! `SHUTDOWN_TIMEOUT_MS` (plus a short grace) whatever the database, NATS or an HTTP client is
//! doing, and at once when nothing is in flight. The daemon runs as a child process and the
//! test measures from the signal to the exit.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::*;

const DEADLINE: Duration = Duration::from_millis(4000);
/// What the process may take past `SHUTDOWN_TIMEOUT_MS`.
const GRACE: Duration = Duration::from_secs(2);

/// Own servers and the daemon as a process with `SHUTDOWN_TIMEOUT_MS` = `DEADLINE`, ready.
async fn start() -> (Stack, DaemonProcess) {
    start_with(&[]).await
}

/// [`start`] with `extra` variables.
async fn start_with(extra: &[(&str, &str)]) -> (Stack, DaemonProcess) {
    let stack = Stack::builder()
        .env(&[("SHUTDOWN_TIMEOUT_MS", &DEADLINE.as_millis().to_string())])
        .env(extra)
        .start()
        .await;
    let daemon = stack.daemon().await;
    (stack, daemon)
}

/// Waits until the daemon's readiness says NATS is gone.
async fn wait_sees_nats_gone(daemon: &DaemonProcess) {
    wait_for("the daemon sees NATS gone", Duration::from_secs(10), || async {
        normalize_service::http::http_get("127.0.0.1", daemon.port, "/health/ready", Duration::from_secs(2))
            .await
            .is_ok_and(|(code, _)| code == 503)
    })
    .await;
}

/// Sends SIGTERM and returns the exit code and the time from the signal to the exit; panics
/// (after killing the process) if it is still running `DEADLINE` + 10 s later.
async fn sigterm_and_wait(daemon: &mut DaemonProcess) -> (Option<i32>, Duration) {
    let (status, took) = daemon.terminate(DEADLINE + Duration::from_secs(10)).await;
    match status {
        Some(status) => (status.code(), took),
        None => panic!(
            "daemon still running {took:?} after SIGTERM (SHUTDOWN_TIMEOUT_MS={}); logs:\n{}",
            DEADLINE.as_millis(),
            daemon.stderr()
        ),
    }
}

/// Healthy servers, nothing in flight: a prompt, clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_when_idle_exits_zero_promptly() {
    let (_stack, mut daemon) = start().await;
    let (code, took) = sigterm_and_wait(&mut daemon).await;
    eprintln!("idle, healthy: exit {code:?} {took:?} after SIGTERM");
    assert_eq!(code, Some(0), "logs:\n{}", daemon.stderr());
    assert!(
        took < DEADLINE,
        "nothing in flight, yet the stop took {took:?}; logs:\n{}",
        daemon.stderr()
    );
}

/// A batch blocked on a table lock held by another session: the in-flight batch cannot finish,
/// so the stop is forced at the deadline, and the pool (whose connection is still inside the
/// blocked statement) must not hold the process past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_batch_blocked_on_a_table_lock_exits_by_the_deadline() {
    let (stack, mut daemon) = start().await;
    let (js, db) = (&stack.js, &stack.db);
    let mut locker = lock_hrv_data(&db.url).await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("locked", "2025-03-01", 42.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_blocked_on_a_lock(&pool, &db.name).await;

    let (code, took) = sigterm_and_wait(&mut daemon).await;
    eprintln!("batch blocked on a lock: exit {code:?} {took:?} after SIGTERM");
    let logs = daemon.stderr();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    assert!(took < DEADLINE + GRACE, "stop took {took:?}; logs:\n{logs}");
    assert_eq!(
        code,
        Some(0),
        "a stop forced by the deadline exits 0; logs:\n{logs}"
    );
    // The message was not settled, so it is still there to be redelivered.
    assert_eq!(
        consumer_backlog(js, "AA_CORE_HOT", "normalize-hrv-durable").await,
        Some((0, 1)),
        "the unsettled message stays pending ack"
    );
}

/// A client that sends half a request to the metrics port and idles: the HTTP server's
/// graceful shutdown would wait for it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_half_sent_http_request_exits_promptly() {
    let (_stack, mut daemon) = start().await;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", daemon.metrics_port))
        .await
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Let the server accept it and start reading the request.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (code, took) = sigterm_and_wait(&mut daemon).await;
    eprintln!("half-sent HTTP request: exit {code:?} {took:?} after SIGTERM");
    drop(slow);
    let logs = daemon.stderr();
    assert!(took < DEADLINE + GRACE, "stop took {took:?}; logs:\n{logs}");
    assert!(
        took < DEADLINE,
        "nothing in flight, yet the stop waited {took:?} for the HTTP client; logs:\n{logs}"
    );
    assert_eq!(code, Some(0), "logs:\n{logs}");
}

/// NATS killed and nothing in flight: flushing acks to a server that is gone cannot succeed,
/// so the stop must not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_unreachable_and_nothing_in_flight_exits_promptly() {
    let (mut stack, mut daemon) = start().await;
    stack.nats.kill();
    wait_sees_nats_gone(&daemon).await;

    let (code, took) = sigterm_and_wait(&mut daemon).await;
    eprintln!("NATS unreachable, nothing in flight: exit {code:?} {took:?} after SIGTERM");
    let logs = daemon.stderr();
    assert!(took < DEADLINE + GRACE, "stop took {took:?}; logs:\n{logs}");
    assert!(
        took < DEADLINE,
        "nothing in flight, yet the stop waited {took:?} for NATS; logs:\n{logs}"
    );
    assert_eq!(code, Some(0), "logs:\n{logs}");
}

/// NATS killed a while before the signal, with the rebind tick and the info refresher busy
/// (every 200 ms): while the client reconnects, each of their requests waits its whole timeout
/// (10 s, longer than the deadline). The stop cuts them short instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_gone_does_not_wait_for_the_supervisors_requests() {
    let (mut stack, mut daemon) = start_with(&[
        ("EVENT_STREAM_MODE", "multi"),
        ("REBIND_INTERVAL_MS", "200"),
        ("CONSUMER_INFO_INTERVAL_MS", "200"),
    ])
    .await;
    stack.nats.kill();
    wait_sees_nats_gone(&daemon).await;
    // Every consumer's supervisor and refresher is now inside a request that cannot complete.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (code, took) = sigterm_and_wait(&mut daemon).await;
    eprintln!("NATS gone, supervisors waiting: exit {code:?} {took:?} after SIGTERM");
    let logs = daemon.stderr();
    assert!(
        took < DEADLINE,
        "nothing in flight, yet the stop waited {took:?} for the supervisors; logs:\n{logs}"
    );
    assert_eq!(code, Some(0), "logs:\n{logs}");
}

/// While the daemon runs, a client that starts a request and stops half-way is disconnected
/// after `http::HEADER_READ_TIMEOUT` instead of holding its connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_http_request_is_disconnected_after_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let (_stack, mut daemon) = start().await;
    for port in [daemon.metrics_port, daemon.port] {
        let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let limit = normalize_service::http::HEADER_READ_TIMEOUT + Duration::from_secs(3);
        let closed = tokio::time::timeout(limit, slow.read_to_end(&mut buf)).await;
        eprintln!(
            "port {port}: half-sent request closed after {:?} ({} bytes back)",
            started.elapsed(),
            buf.len()
        );
        assert!(
            closed.is_ok(),
            "port {port}: connection still open {limit:?} after a half-sent request"
        );
    }
    // The listeners still serve complete requests.
    let (code, _) = normalize_service::http::http_get(
        "127.0.0.1",
        daemon.metrics_port,
        "/metrics",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    let (code, _) = sigterm_and_wait(&mut daemon).await;
    assert_eq!(code, Some(0), "logs:\n{}", daemon.stderr());
}
