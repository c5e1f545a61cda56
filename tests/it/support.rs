//! The isolated stack each test gets: its own nats-server (free port, own store dir, killed on
//! drop), its own PostgreSQL database (dropped on drop), and the daemon in-process or as a
//! child process.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use normalize_service::app::Application;
use normalize_service::config::Config;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        nanos
    )
}

pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

/// A private nats-server with JetStream.
pub struct NatsServer {
    pub port: u16,
    pub store: tempfile::TempDir,
    child: Option<Child>,
    extra_conf: String,
    bin: String,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        Self::start_with("").await
    }

    /// `extra_conf` is appended to the server's config file (auth, tls, …).
    pub async fn start_with(extra_conf: &str) -> NatsServer {
        Self::start_bin_with(&nats_server_bin(), extra_conf).await
    }

    /// A server from a given binary rather than `NATS_SERVER_BIN` (tests that compare versions).
    pub async fn start_bin_with(bin: &str, extra_conf: &str) -> NatsServer {
        let mut s = NatsServer {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
            extra_conf: extra_conf.to_string(),
            bin: bin.to_string(),
        };
        s.spawn().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A server value that was never started, for building variables around another NATS_URL.
    pub fn placeholder() -> NatsServer {
        NatsServer {
            port: 0,
            store: tempfile::tempdir().unwrap(),
            child: None,
            extra_conf: String::new(),
            bin: nats_server_bin(),
        }
    }

    async fn spawn(&mut self) {
        let conf_path: PathBuf = self.store.path().join("nats.conf");
        let conf = format!(
            "listen: 127.0.0.1:{}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n}}\n{}\n",
            self.port,
            self.store.path().join("js").display(),
            self.extra_conf
        );
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }

    pub async fn js(&self) -> jetstream::Context {
        jetstream::new(self.client().await)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database on the shared PostgreSQL server, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = unique("nstest");
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0.to_string();
        TestDb {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// The same database, reached through a different host:port (a proxy).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.name)
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Variables every test daemon gets; tests override what they exercise.
pub fn base_vars(nats: &NatsServer, db_url: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (k, v) in [
        ("NATS_URL", nats.url()),
        ("DATABASE_URL", db_url.to_string()),
        ("PORT", "0".into()),
        ("METRICS_PORT", "0".into()),
        ("HOST", "127.0.0.1".into()),
        ("LOG_FORMAT", "pretty".into()),
        ("HRV_EXPIRES_MS", "1000".into()),
        ("SLEEP_EXPIRES_MS", "1000".into()),
        ("OURA_EXPIRES_MS", "1000".into()),
        ("NORMALIZE_RETRY_BACKOFF_MS", "100,200".into()),
        ("CONSUMER_INFO_INTERVAL_MS", "200".into()),
        ("REBIND_INTERVAL_MS", "500".into()),
        ("SHUTDOWN_TIMEOUT_MS", "10000".into()),
    ] {
        m.insert(k.to_string(), v);
    }
    m
}

pub fn with(mut vars: HashMap<String, String>, extra: &[(&str, &str)]) -> HashMap<String, String> {
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

/// The daemon running in this test process.
pub struct TestApp {
    pub port: u16,
    pub metrics_port: u16,
    token: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(vars: HashMap<String, String>) -> TestApp {
        // Through the test writer, so logs show only for failing tests.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn")),
            )
            .with_test_writer()
            .try_init();
        let config = Config::from_vars(vars).unwrap();
        let app = Application::build(config).await.unwrap();
        let port = app.port();
        let metrics_port = app.metrics_port();
        let token = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(token.clone()));
        TestApp {
            port,
            metrics_port,
            token,
            handle: Some(handle),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        normalize_service::http::http_get("127.0.0.1", self.port, path, Duration::from_secs(5))
            .await
            .unwrap()
    }

    pub async fn health(&self) -> (u16, serde_json::Value) {
        let (code, body) = self.get("/health").await;
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    pub async fn wait_ready(&self) {
        wait_for("daemon ready", Duration::from_secs(20), || async {
            self.get("/health/ready").await.0 == 200
        })
        .await;
    }

    /// Stops like SIGTERM does and returns the daemon's result. Every test that stops its
    /// daemon this way also proves that no delivered message was released unsettled.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let metrics = self.metrics().await;
        let unsettled = metric_value(&metrics, "normalize_messages_released_unsettled_total", &[]);
        assert!(
            unsettled.is_some_and(|n| n == 0.0)
                || !metrics.contains("normalize_messages_released_unsettled_total{"),
            "delivered messages were released unsettled: {unsettled:?}"
        );
        self.token.cancel();
        self.handle.take().unwrap().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Polls `check` until it is true; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes with JetStream and waits for the PubAck.
pub async fn publish(js: &jetstream::Context, subject: &str, body: impl Into<bytes::Bytes>) -> u64 {
    js.publish(subject.to_string(), body.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

pub async fn publish_with_id(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    body: impl Into<bytes::Bytes>,
) -> u64 {
    let msg = jetstream::message::PublishMessage::build()
        .payload(body.into())
        .message_id(id);
    js.send_publish(subject.to_string(), msg)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Publishes with `Nats-Msg-Id` = `id` until JetStream acknowledges it, through outages,
/// elections and subject moves (the id makes a retry a no-op); returns how many attempts
/// failed. Panics when nothing was acknowledged within `within`.
pub async fn publish_until_acked(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    body: &str,
    within: Duration,
    pause: Duration,
) -> usize {
    let started = std::time::Instant::now();
    let mut failed = 0;
    loop {
        let msg = jetstream::message::PublishMessage::build()
            .payload(body.to_string().into())
            .message_id(id);
        let acked = match js.send_publish(subject.to_string(), msg).await {
            Ok(f) => f.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            return failed;
        }
        failed += 1;
        assert!(started.elapsed() < within, "publish of {id} never acked");
        tokio::time::sleep(pause).await;
    }
}

pub fn hrv_event(user: &str, date: &str, rmssd: f64, captured_at: &str) -> String {
    serde_json::json!({
        "eventId": format!("evt-{user}-{date}"),
        "payload": {"userId": user, "date": date, "rMSSD": rmssd, "capturedAt": captured_at, "raw": {"source": "Oura"}}
    })
    .to_string()
}

pub const HRV_SUBJECT: &str = "athlete-ally.hrv.raw-received";
pub const SLEEP_SUBJECT: &str = "athlete-ally.sleep.raw-received";
pub const OURA_SUBJECT: &str = "vendor.oura.webhook.received";

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Messages stored in a stream (0 when it does not exist).
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// (num_pending, num_ack_pending) of a durable.
pub async fn consumer_backlog(js: &jetstream::Context, stream: &str, durable: &str) -> Option<(u64, usize)> {
    let s = js.get_stream(stream).await.ok()?;
    let info = s.consumer_info(durable).await.ok()?;
    Some((info.num_pending, info.num_ack_pending))
}

pub async fn wait_drained(js: &jetstream::Context, stream: &str, durable: &str) {
    wait_for(
        &format!("{stream}/{durable} drained"),
        Duration::from_secs(30),
        || async { consumer_backlog(js, stream, durable).await == Some((0, 0)) },
    )
    .await;
}

/// The value of one series in a metrics scrape, matched by name and every given label.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .reduce(|a, b| a + b)
}

/// All messages of a stream, as raw stored messages.
pub async fn stream_contents(js: &jetstream::Context, name: &str) -> Vec<jetstream::message::StreamMessage> {
    let mut out = Vec::new();
    let Ok(mut stream) = js.get_stream(name).await else {
        return out;
    };
    let info = stream.info().await.unwrap().clone();
    if info.state.messages == 0 {
        return out;
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// Another session holding `hrv_data` in an open transaction: every write of the daemon waits
/// on this lock until the test sends `COMMIT` on the returned connection.
pub async fn lock_hrv_data(db_url: &str) -> PgConnection {
    let mut locker = PgConnection::connect(db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE hrv_data IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// A TCP proxy to PostgreSQL that a test can cut (connection refused, live connections
/// dropped) and restore on the same port: a database outage without stopping the server.
pub struct DbProxy {
    pub port: u16,
    token: Option<CancellationToken>,
}

impl DbProxy {
    pub async fn start() -> DbProxy {
        let mut p = DbProxy {
            port: free_port(),
            token: None,
        };
        p.restore().await;
        p
    }

    pub fn cut(&mut self) {
        if let Some(t) = self.token.take() {
            t.cancel();
        }
    }

    pub async fn restore(&mut self) {
        let token = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let t = token.clone();
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = t.cancelled() => { conns.abort_all(); return; }
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            }
                        });
                    }
                }
            }
        });
        self.token = Some(token);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The daemon binary, for tests that run it as a process.
pub const BIN: &str = env!("CARGO_BIN_EXE_normalize-service");

/// Starts `normalize-service run` with exactly these variables (plus PATH).
pub fn spawn_daemon(vars: &HashMap<String, String>) -> Child {
    Command::new(BIN)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What an operator's `topology apply` would leave, minus what a test leaves out: the given
/// streams, and each consumer's durable on the first of its candidate streams (the primary in
/// multi mode, the legacy stream in single mode) as the daemon configured by `vars` sees them.
pub async fn create_topology(
    js: &jetstream::Context,
    vars: &HashMap<String, String>,
    specs: &[normalize_service::topology::StreamSpec],
) {
    for s in specs {
        js.create_stream(s.to_config()).await.unwrap();
    }
    let config = Config::from_vars(vars.clone()).unwrap();
    for cc in &config.consumers {
        let target = normalize_service::topology::candidates(&config, cc)[0].clone();
        js.get_stream(&target)
            .await
            .unwrap()
            .create_consumer(normalize_service::topology::durable_config(cc))
            .await
            .unwrap();
    }
}
