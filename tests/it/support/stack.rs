//! `Stack`: a test's servers and the variables its daemons get, built by `Stack::builder()`;
//! `TestApp`: the daemon in this test process.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use normalize_service::app::Application;
use normalize_service::config::Config;
use normalize_service::topology::StreamSpec;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

/// One test's servers: its nats-server, its database (through a cuttable proxy when asked
/// for), a JetStream context, and the variables its daemons get.
pub struct Stack {
    pub nats: NatsServer,
    pub db: TestDb,
    pub js: jetstream::Context,
    /// `base_vars` plus the builder's overrides: what `app()` and `daemon()` run with.
    pub vars: HashMap<String, String>,
    proxy: Option<DbProxy>,
    /// The database as the daemons reach it (through the proxy, if there is one).
    db_url: String,
}

/// What `Stack::builder()` sets up before anything runs.
#[derive(Default)]
pub struct StackBuilder {
    env: Vec<(String, String)>,
    nats_conf: String,
    nats_client: Option<async_nats::ConnectOptions>,
    proxy: bool,
    topology: Option<Vec<StreamSpec>>,
}

impl StackBuilder {
    /// Variables for the daemons, over `base_vars`.
    pub fn env(mut self, pairs: &[(&str, &str)]) -> Self {
        self.env
            .extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// `EVENT_STREAM_MODE`.
    pub fn mode(self, mode: &str) -> Self {
        self.env(&[("EVENT_STREAM_MODE", mode)])
    }

    /// Appended to the nats-server's config file (auth, tls, …).
    pub fn nats_conf(mut self, extra: &str) -> Self {
        self.nats_conf = extra.to_string();
        self
    }

    /// How the stack's own client (`Stack::js`) connects: credentials, TLS roots.
    pub fn nats_client(mut self, options: async_nats::ConnectOptions) -> Self {
        self.nats_client = Some(options);
        self
    }

    /// The daemons reach the database through a `DbProxy` (`Stack::proxy`) that the test can cut.
    pub fn db_proxy(mut self) -> Self {
        self.proxy = true;
        self
    }

    /// The topology an operator would apply (these streams, the durables on them, see
    /// `create_topology`) instead of the daemon's provisioning (`TOPOLOGY_PROVISION=off`).
    pub fn topology(mut self, specs: Vec<StreamSpec>) -> Self {
        self.topology = Some(specs);
        self
    }

    /// The servers, and the topology if one was asked for; no daemon yet.
    pub async fn start(self) -> Stack {
        let nats = NatsServer::start_with(&self.nats_conf).await;
        let db = TestDb::new().await;
        let proxy = if self.proxy {
            Some(DbProxy::start().await)
        } else {
            None
        };
        let db_url = proxy.as_ref().map_or(db.url.clone(), |p| db.url_via(p.port));
        let mut vars = base_vars(&nats, &db_url);
        if self.topology.is_some() {
            vars.insert("TOPOLOGY_PROVISION".into(), "off".into());
        }
        vars.extend(self.env);
        let js = match self.nats_client {
            Some(options) => jetstream::new(options.connect(nats.url()).await.unwrap()),
            None => nats.js().await,
        };
        if let Some(specs) = &self.topology {
            create_topology(&js, &vars, specs).await;
        }
        Stack {
            nats,
            db,
            js,
            vars,
            proxy,
            db_url,
        }
    }

    /// The servers and the daemon in-process, ready.
    pub async fn app(self) -> (Stack, TestApp) {
        let stack = self.start().await;
        let app = stack.app().await;
        (stack, app)
    }
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// The servers with the default variables.
    pub async fn start() -> Stack {
        Self::builder().start().await
    }

    /// The servers with `env` over the default variables, and the daemon in-process, ready.
    pub async fn app_with_env(env: &[(&str, &str)]) -> (Stack, TestApp) {
        Self::builder().env(env).app().await
    }

    pub async fn pool(&self) -> PgPool {
        self.db.pool().await
    }

    /// The proxy between the daemons and the database (`StackBuilder::db_proxy`).
    pub fn proxy(&self) -> &DbProxy {
        self.proxy.as_ref().expect("a stack built with db_proxy()")
    }

    /// `base_vars` of this stack, without the builder's overrides.
    pub fn base_vars(&self) -> HashMap<String, String> {
        base_vars(&self.nats, &self.db_url)
    }

    /// `self.vars` with `extra` over them.
    pub fn vars_with(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        with(self.vars.clone(), extra)
    }

    /// A daemon in-process with the stack's variables, ready.
    pub async fn app(&self) -> TestApp {
        self.app_with(&[]).await
    }

    /// A daemon in-process with `extra` over the stack's variables, ready.
    pub async fn app_with(&self, extra: &[(&str, &str)]) -> TestApp {
        let app = TestApp::spawn(self.vars_with(extra)).await;
        app.wait_ready().await;
        app
    }

    /// A daemon in-process with the stack's variables, not waited for.
    pub async fn spawn_app(&self) -> TestApp {
        TestApp::spawn(self.vars.clone()).await
    }

    /// The daemon as a child process with the stack's variables, ready.
    pub async fn daemon(&self) -> DaemonProcess {
        self.daemon_with(&[]).await
    }

    /// The daemon as a child process with `extra` over the stack's variables, ready.
    pub async fn daemon_with(&self, extra: &[(&str, &str)]) -> DaemonProcess {
        let mut d = DaemonProcess::spawn(&self.vars_with(extra));
        d.wait_ready().await;
        d
    }
}

/// What an operator's `topology apply` would leave, minus what a test leaves out: the given
/// streams, and each consumer's durable on the first of its candidate streams (the primary in
/// multi mode, the legacy stream in single mode) as the daemon configured by `vars` sees them.
pub async fn create_topology(js: &jetstream::Context, vars: &HashMap<String, String>, specs: &[StreamSpec]) {
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
