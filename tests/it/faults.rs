//! Fault tolerance (issue #7, scenarios 1–7): real servers started and stopped by PID, and
//! every scenario ends with exactly one row or one dead letter per published event.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sqlx::{Connection, PgConnection};

use crate::support::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private PostgreSQL cluster (initdb + pg_ctl as the postgres user) that a test can stop
/// and start on the same port.
struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
}

fn as_postgres(program: &str, args: &[&str]) -> std::process::ExitStatus {
    Command::new("runuser")
        .args(["-u", "postgres", "--", program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

impl PgCluster {
    fn start() -> PgCluster {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
        let data = dir.path().join("data");
        let status = as_postgres(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(status.success(), "initdb");
        let c = PgCluster {
            dir,
            port: free_port(),
        };
        c.up();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().to_string()
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("pg.log");
        let status = as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
        assert!(status.success(), "pg_ctl start");
    }

    fn down(&self) {
        as_postgres(
            &format!("{PG_BIN}/pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/athlete_normalize", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.down();
    }
}

/// Publishes `n` HRV events (unique users) with ids `<prefix>-<i>`, retrying each failed
/// publish with the same id; every `invalid_every`-th one is schema-invalid.
fn publish_events(
    js: jetstream::Context,
    prefix: &'static str,
    n: usize,
    invalid_every: Option<usize>,
) -> (tokio::task::JoinHandle<usize>, Arc<AtomicUsize>) {
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let handle = tokio::spawn(async move {
        let mut retries = 0;
        for i in 0..n {
            let invalid = invalid_every.is_some_and(|k| i % k == 0);
            let body = if invalid {
                format!("{{\"payload\": {{\"userId\": \"{prefix}-bad-{i}\"}}}}")
            } else {
                hrv_event(
                    &format!("{prefix}-{i}"),
                    "2025-03-01",
                    40.0,
                    "2025-03-01T06:00:00Z",
                )
            };
            let id = format!("{prefix}-{i}");
            retries += publish_until_acked(
                &js,
                HRV_SUBJECT,
                &id,
                &body,
                Duration::from_secs(60),
                Duration::from_millis(50),
            )
            .await;
            d.fetch_add(1, Ordering::SeqCst);
        }
        retries
    });
    (handle, done)
}

async fn rows(url: &str, prefix: &str) -> i64 {
    match PgConnection::connect(url).await {
        Ok(mut c) => sqlx::query_scalar::<_, i64>(&format!(
            "SELECT count(*) FROM hrv_data WHERE user_id LIKE '{prefix}-%'"
        ))
        .fetch_one(&mut c)
        .await
        .unwrap_or(-1),
        Err(_) => -1,
    }
}

async fn normalized_count(js: &jetstream::Context, stream: &str) -> usize {
    stream_contents(js, stream)
        .await
        .iter()
        .filter(|m| m.subject.as_str() == "athlete-ally.hrv.normalized-stored")
        .count()
}

/// 1. nats-server SIGKILLed and restarted (same port and store) while events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_flow() {
    const N: usize = 10_000;
    // Acks in flight when the server dies are lost; a short ack wait redelivers those messages
    // (processed already, stored idempotently) soon after the restart.
    let (mut stack, app) =
        Stack::app_with_env(&[("HRV_BATCH_SIZE", "100"), ("NORMALIZE_HRV_ACK_WAIT_MS", "5000")]).await;
    let (publisher, published) = publish_events(stack.js.clone(), "nk", N, None);
    wait_for("a quarter published", Duration::from_secs(60), || async {
        published.load(Ordering::SeqCst) >= N / 4
    })
    .await;
    stack.nats.kill();
    let outage_started = Instant::now();
    wait_for("/health shows the outage", Duration::from_secs(15), || async {
        let (code, h) = app.health().await;
        code == 503 && h["nats"] == "disconnected"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.nats.restart().await;
    app.wait_ready().await;
    let recovered_in = outage_started.elapsed();
    let retries = publisher.await.unwrap();
    let pool = stack.pool().await;
    wait_for("every event stored", Duration::from_secs(120), || async {
        rows(&stack.db.url, "nk").await == N as i64
    })
    .await;
    let js = stack.nats.js().await;
    wait_drained(&js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, N as i64);
    assert_eq!(stream_messages(&js, "AA_DLQ").await, 0);
    eprintln!("scenario 1: {N} events, nats down ~2 s, ready again {recovered_in:?} after the kill, {retries} publish retries");
    app.stop().await.unwrap();
}

/// 2. A PostgreSQL outage of 10+ s on a private cluster: retried with backoff, nothing
/// dead-lettered, readiness 503 meanwhile, everything stored after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_of_ten_seconds() {
    const N: usize = 200;
    let nats = NatsServer::start().await;
    let pg = PgCluster::start();
    let app = TestApp::spawn(with(
        base_vars(&nats, &pg.url()),
        &[
            ("NORMALIZE_RETRY_BACKOFF_MS", "1000,2000,4000,8000"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "1000"),
            // With batches in flight concurrently on nats-server 2.9.10, about one run in four
            // leaves one NAKed (with delay) message unredelivered until ack_wait instead of
            // its delay (every delivery was settled: see docs/RELIABILITY.md, scenario 2).
            // A 10 s ack_wait bounds that here; the default for HRV is 60 s.
            ("NORMALIZE_HRV_ACK_WAIT_MS", "10000"),
        ],
    ))
    .await;
    app.wait_ready().await;
    let js = nats.js().await;
    pg.down();
    let stopped = Instant::now();
    let (publisher, _) = publish_events(js.clone(), "pg", N, None);
    publisher.await.unwrap();
    wait_for(
        "readiness 503 during the outage",
        Duration::from_secs(10),
        || async {
            let (code, h) = app.health().await;
            code == 503 && h["database"] == "unavailable"
        },
    )
    .await;
    let wait = Duration::from_secs(10).saturating_sub(stopped.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(
        stream_messages(&js, "AA_DLQ").await,
        0,
        "nothing dead-lettered during the outage"
    );
    let m = app.metrics().await;
    assert!(
        metric_value(&m, "normalize_hrv_messages_total", &[("result", "retry")]).unwrap_or(0.0) >= 1.0,
        "messages were NAKed for retry during the outage"
    );
    pg.up();
    let restarted = Instant::now();
    wait_for(
        "every event stored after recovery",
        Duration::from_secs(60),
        || async { rows(&pg.url(), "pg").await == N as i64 },
    )
    .await;
    eprintln!(
        "scenario 2: {N} events, outage {:?}, all stored {:?} after PostgreSQL came back",
        restarted - stopped,
        restarted.elapsed()
    );
    wait_drained(&js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(stream_messages(&js, "AA_DLQ").await, 0);
    app.wait_ready().await;
    app.stop().await.unwrap();
}

/// 3. The daemon SIGKILLed mid-flow and restarted: no loss, no duplicate rows, no duplicate
/// normalized events (Nats-Msg-Id inside the duplicate window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sigkilled_mid_batch() {
    const N: usize = 3_000;
    let stack = Stack::builder()
        .env(&[("NORMALIZE_HRV_ACK_WAIT_MS", "2000"), ("HRV_BATCH_SIZE", "50")])
        .start()
        .await;
    let mut daemon = DaemonProcess::spawn(&stack.vars);
    let js = &stack.js;
    let db = &stack.db;
    let (publisher, _) = publish_events(js.clone(), "sk", N, None);
    wait_for("some rows", Duration::from_secs(60), || async {
        rows(&db.url, "sk").await >= 300
    })
    .await;
    daemon.kill();
    let at_kill = rows(&db.url, "sk").await;
    publisher.await.unwrap();
    let mut daemon = DaemonProcess::spawn(&stack.vars);
    wait_for(
        "every event stored after restart",
        Duration::from_secs(120),
        || async { rows(&db.url, "sk").await == N as i64 },
    )
    .await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(
        count(&db.pool().await, "SELECT count(DISTINCT user_id) FROM hrv_data").await,
        N as i64
    );
    assert_eq!(
        normalized_count(js, "AA_CORE_HOT").await,
        N,
        "no duplicate normalized events"
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    eprintln!("scenario 3: {N} events, SIGKILL at {at_kill} rows, all stored after restart");
    daemon.kill();
}

test_cases!(several_instances_share_the_durables { two: (2), three: (3) });
/// 4. Two and three instances on the same durables: every event processed once in effect.
async fn several_instances_share_the_durables(instances: usize) {
    const N: usize = 3_000;
    let stack = Stack::builder().env(&[("HRV_BATCH_SIZE", "20")]).start().await;
    let (js, db) = (&stack.js, &stack.db);
    let mut apps = Vec::new();
    for _ in 0..instances {
        apps.push(stack.app().await);
    }
    let (publisher, _) = publish_events(js.clone(), "mi", N, None);
    publisher.await.unwrap();
    wait_for("every event stored", Duration::from_secs(120), || async {
        rows(&db.url, "mi").await == N as i64
    })
    .await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    assert_eq!(
        normalized_count(js, "AA_CORE_HOT").await,
        N,
        "each event published once"
    );
    let mut per_instance = Vec::new();
    for app in &apps {
        let m = app.metrics().await;
        per_instance
            .push(metric_value(&m, "normalize_hrv_messages_total", &[("result", "success")]).unwrap_or(0.0));
    }
    let total: f64 = per_instance.iter().sum();
    assert!(total >= N as f64, "{per_instance:?}");
    assert!(
        per_instance.iter().filter(|n| **n > 0.0).count() >= 2,
        "work was shared: {per_instance:?}"
    );
    eprintln!("scenario 4: {instances} instances, {N} events, successes per instance {per_instance:?}");
    for app in apps {
        app.stop().await.unwrap();
    }
}

/// 7. A storm of 10,000 invalid messages mixed with 10,000 valid ones: all invalid
/// dead-lettered with reasons, all valid stored, memory bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_invalid_messages() {
    const N: usize = 20_000;
    let stack = Stack::builder().env(&[("HRV_BATCH_SIZE", "100")]).start().await;
    let mut daemon = DaemonProcess::spawn(&stack.vars);
    let (js, db) = (&stack.js, &stack.db);
    let (publisher, _) = publish_events(js.clone(), "st", N, Some(2));
    publisher.await.unwrap();
    wait_for(
        "all valid stored and all invalid dead-lettered",
        Duration::from_secs(180),
        || async {
            rows(&db.url, "st").await == (N / 2) as i64
                && stream_messages(js, "AA_DLQ").await == (N / 2) as u64
        },
    )
    .await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    let letters = stream_contents(js, "AA_DLQ").await;
    assert!(letters.iter().all(
        |l| l.headers.get("Dlq-Reason").map(|v| v.as_str().to_string()) == Some("schema-invalid".into())
    ));
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!(
        "scenario 7: {N} messages (half invalid), peak RSS {} MiB",
        hwm_kib / 1024
    );
    assert!(
        hwm_kib < 256 * 1024,
        "peak RSS {hwm_kib} KiB: memory must stay bounded"
    );
    daemon.kill();
}

/// A three-node JetStream cluster on loopback, each node a process the test can kill.
struct Cluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    async fn start() -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let route_list: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n}}\ncluster {{\n  name: c1\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                ports[i],
                dir.path().join("js").display(),
                routes[i],
                route_list.join(", ")
            );
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, conf).unwrap();
            let child = Command::new(nats_server_bin())
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            nodes.push(Some(child));
            dirs.push(dir);
        }
        Cluster {
            nodes,
            ports,
            _dirs: dirs,
        }
    }

    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill(&mut self, name: &str) {
        let i: usize = name.trim_start_matches('n').parse().unwrap();
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.nodes.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// 5. R3 streams on a three-node cluster; the stream leader is killed mid-flow and
/// processing continues after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_in_a_three_node_cluster() {
    const N: usize = 3_000;
    let mut cluster = Cluster::start().await;
    let db = TestDb::new().await;
    let url = cluster.url();
    // `topology apply --replicas 3` once the cluster has elected its meta leader.
    let mut applied = false;
    for _ in 0..60 {
        // Acks sent to a leader that dies are lost; a short ack wait redelivers them soon.
        let env = vars(&[("NATS_URL", &url), ("NORMALIZE_HRV_ACK_WAIT_MS", "5000")]);
        let out = cli(&env, &["topology", "apply", "--mode", "multi", "--replicas", "3"]).await;
        if out.code == 0 {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(applied, "topology apply --replicas 3 on the cluster");
    let client = async_nats::ConnectOptions::new()
        .connect(url.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client);
    let mut core = js.get_stream("AA_CORE_HOT").await.unwrap();
    assert_eq!(core.info().await.unwrap().config.num_replicas, 3);
    let mut vars = base_vars(&NatsServer::placeholder(), &db.url);
    vars.insert("NATS_URL".into(), url.clone());
    vars.insert("TOPOLOGY_PROVISION".into(), "off".into());
    vars.insert("HRV_BATCH_SIZE".into(), "50".into());
    // Publishes of normalized events fail (no responders) until the election ends: the retry
    // backoff must span it, as the default (1 s … 30 s) does; base_vars' 100/200 ms would use
    // up the five deliveries within a second.
    vars.insert("NORMALIZE_RETRY_BACKOFF_MS".into(), "1000,2000,4000,8000".into());
    let app = TestApp::spawn(vars).await;
    app.wait_ready().await;
    let (publisher, published) = publish_events(js.clone(), "cl", N, None);
    wait_for("a third published", Duration::from_secs(60), || async {
        published.load(Ordering::SeqCst) >= N / 3
    })
    .await;
    let leader = core
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap();
    cluster.kill(&leader);
    let killed = Instant::now();
    publisher.await.unwrap();
    wait_for(
        "every event stored after the election",
        Duration::from_secs(120),
        || async { rows(&db.url, "cl").await == N as i64 },
    )
    .await;
    let new_leader = core
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone());
    assert!(
        new_leader.is_some() && new_leader.as_deref() != Some(leader.as_str()),
        "a new leader was elected"
    );
    wait_drained(&js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    let letters: Vec<String> = stream_contents(&js, "AA_DLQ")
        .await
        .iter()
        .map(|m| {
            let h = |k: &str| {
                m.headers
                    .get(k)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            format!(
                "{} {} (delivery {})",
                h("Dlq-Reason"),
                h("Dlq-Error"),
                h("Dlq-Delivery-Count")
            )
        })
        .collect();
    assert!(letters.is_empty(), "dead letters: {letters:?}");
    eprintln!(
        "scenario 5: {N} events, killed stream leader {leader}, new leader {new_leader:?}, all stored {:?} after the kill",
        killed.elapsed()
    );
    app.stop().await.unwrap();
}

/// 6. Slow writes: a lock held on the table for longer than ack_wait. Progress acks keep the
/// messages from being redelivered while they are being worked on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_acks_cover_writes_slower_than_ack_wait() {
    const N: usize = 5;
    // A write may be slower than ack_wait without reaching the statement timeout; this test is
    // about the progress acks, so the lock must outlast ack_wait, not the timeout.
    let (stack, app) = Stack::app_with_env(&[
        ("NORMALIZE_HRV_ACK_WAIT_MS", "1500"),
        ("HRV_EXPIRES_MS", "1000"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "30000"),
    ])
    .await;
    let (js, db) = (&stack.js, &stack.db);
    let mut locker = lock_hrv_data(&db.url).await;
    for i in 0..N {
        publish(
            js,
            HRV_SUBJECT,
            hrv_event(&format!("slow-{i}"), "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
        )
        .await;
    }
    // Hold the lock for more than three ack waits.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    wait_for(
        "rows once the lock is released",
        Duration::from_secs(30),
        || async { rows(&db.url, "slow").await == N as i64 },
    )
    .await;
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;
    let info = js
        .get_stream("AA_CORE_HOT")
        .await
        .unwrap()
        .consumer_info("normalize-hrv-durable")
        .await
        .unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(
        info.delivered.consumer_sequence, N as u64,
        "each message delivered exactly once: progress acks kept them from redelivery"
    );
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}
