//! What `topology` and `migrate` share: the configuration and NATS connection they run with,
//! their typed error, and the read-only queries of the server's streams and consumers.

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use serde::Serialize;

use crate::cli::migrate::Subjects;
use crate::cli::output::{ActionKind, Failure, Report, EXIT_CONFIG, EXIT_FAILED, EXIT_REFUSED};
use crate::config::{Config, ConsumerConfig, StreamRole};
use crate::topology;

/// Why a `topology` or `migrate` command could not do its job (a refused step or a failed
/// check is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] crate::nats::ConnectError),
    #[error("{doing}")]
    Nats {
        doing: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("refused: --quiet-period {input:?}: expected a duration like 14d, 2h, 30m, 0s")]
    QuietPeriod { input: String },
    #[error("DATABASE_URL")]
    Database {
        #[source]
        source: sqlx::Error,
    },
}

impl OpsError {
    pub fn nats(doing: impl Into<String>, e: impl Into<async_nats::Error>) -> OpsError {
        OpsError::Nats {
            doing: doing.into(),
            source: e.into(),
        }
    }
}

impl Failure for OpsError {
    fn exit_code(&self) -> u8 {
        match self {
            OpsError::Config(_) => EXIT_CONFIG,
            OpsError::QuietPeriod { .. } => EXIT_REFUSED,
            OpsError::Connect(_) | OpsError::Nats { .. } | OpsError::Database { .. } => EXIT_FAILED,
        }
    }
}

/// The configuration and the connection an operator command runs with.
pub struct Ctx {
    pub config: Config,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
}

impl Ctx {
    /// Reads the environment and connects as the daemon does ([`crate::nats::connect`]).
    pub async fn open() -> Result<Ctx, OpsError> {
        let config = Config::from_env()?;
        let client = crate::nats::connect_now(&config.nats, crate::nats::COMMAND_WAIT).await?;
        let js = jetstream::new(client.clone());
        Ok(Ctx { config, js, client })
    }

    /// Whether `stream` exists and has the durable `durable`.
    pub async fn has_durable(&self, stream: &str, durable: &str) -> bool {
        match self.js.get_stream(stream).await {
            Ok(s) => s.consumer_info(durable).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Creates the durable on `stream` when absent; never changes an existing one.
    pub async fn ensure_durable<T: Serialize>(
        &self,
        cc: &ConsumerConfig,
        stream: &str,
        report: &mut Report<T>,
    ) {
        let s = match self.js.get_stream(stream).await {
            Ok(s) => s,
            Err(e) => {
                report.check(
                    format!("durable {} on {stream}", cc.durable),
                    false,
                    format!("stream: {e}"),
                );
                return;
            }
        };
        if s.consumer_info(&cc.durable).await.is_ok() {
            report.action(
                ActionKind::ConsumerExists,
                format!("durable {} on {stream}", cc.durable),
                "exists",
            );
            return;
        }
        match s.create_consumer(topology::durable_config(cc)).await {
            Ok(_) => report.action(
                ActionKind::CreateConsumer,
                format!("create durable {} on {stream}", cc.durable),
                "done",
            ),
            Err(e) => report.check(
                format!("create durable {} on {stream}", cc.durable),
                false,
                e.to_string(),
            ),
        }
    }
}

pub async fn stream_infos(js: &jetstream::Context) -> Result<Vec<stream::Info>, OpsError> {
    js.streams()
        .try_collect()
        .await
        .map_err(|e| OpsError::nats("listing streams", e))
}

/// The subjects of every stream.
pub async fn subjects_state(js: &jetstream::Context) -> Result<Subjects, OpsError> {
    Ok(stream_infos(js)
        .await?
        .into_iter()
        .map(|i| (i.config.name, i.config.subjects))
        .collect())
}

pub async fn consumer_infos(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<jetstream::consumer::Info>, OpsError> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| OpsError::nats("get stream", e))?;
    s.consumers()
        .try_collect()
        .await
        .map_err(|e| OpsError::nats(format!("listing consumers of {stream}"), e))
}

/// The consumers whose primary stream has `role`.
pub fn consumers_of(config: &Config, role: StreamRole) -> Vec<&ConsumerConfig> {
    config.consumers.iter().filter(|c| c.primary == role).collect()
}
