//! The servers a test owns: a nats-server, a database, a proxy in front of PostgreSQL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::free_port;

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

    /// The server process, while it runs (the benchmark measures its CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Rewrites the config file with `extra_conf` in place of what followed its `jetstream`
    /// block (account subject mappings, …) and has the running server reload it (SIGHUP).
    /// The reload is asynchronous: wait for its effect. A restart uses the original extra config.
    #[allow(dead_code)]
    pub fn reload_with(&self, extra_conf: &str) {
        let path = self.store.path().join("nats.conf");
        let conf = std::fs::read_to_string(&path).unwrap();
        let end = conf.find("\n}\n").expect("the jetstream block") + 3;
        std::fs::write(&path, format!("{}{extra_conf}\n", &conf[..end])).unwrap();
        let pid = self.pid().expect("a running nats-server");
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP {pid}");
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

/// A TCP proxy to PostgreSQL that a test can cut (connection refused, live connections
/// dropped) and restore on the same port: a database outage without stopping the server.
pub struct DbProxy {
    pub port: u16,
    token: std::sync::Mutex<Option<CancellationToken>>,
}

impl DbProxy {
    pub async fn start() -> DbProxy {
        let p = DbProxy {
            port: free_port(),
            token: std::sync::Mutex::new(None),
        };
        p.restore().await;
        p
    }

    pub fn cut(&self) {
        if let Some(t) = self.token.lock().unwrap().take() {
            t.cancel();
        }
    }

    pub async fn restore(&self) {
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
        *self.token.lock().unwrap() = Some(token);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
