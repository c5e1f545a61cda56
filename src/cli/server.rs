//! What `topology` and `migrate` share: the configuration and NATS connection they run with,
//! their typed error, and the read-only queries of the server's streams and consumers.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::TryStreamExt;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::cli::migrate::Subjects;
use crate::cli::output::{ActionKind, Failure, Report, EXIT_CONFIG, EXIT_FAILED};
use crate::config::{Config, ConsumerConfig, NatsConfig, StreamRole};
use crate::topology;

/// Why a `topology` or `migrate` command could not do its job (a refused step or a failed
/// check is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        servers: String,
        #[source]
        source: CommandConnectError,
    },
    #[error("{doing}")]
    Nats {
        doing: String,
        #[source]
        source: async_nats::Error,
    },
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
            OpsError::Connect { .. } | OpsError::Nats { .. } | OpsError::Database { .. } => EXIT_FAILED,
        }
    }
}

/// Why an operator command could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum CommandConnectError {
    #[error("no server answers (check NATS_URL)")]
    Unreachable {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] crate::nats::ConnectError),
}

/// How long an operator command waits for a TCP answer from each NATS server.
const TCP_WAIT: Duration = Duration::from_secs(2);

/// Connects an operator command (`topology`, `migrate`, `dlq`): a bare TCP connect to each
/// server first, so an unreachable NATS fails at once with its cause ("Connection refused")
/// instead of after the client's wait; then [`crate::nats::connect_now`] as the daemon connects.
pub async fn connect_command(cfg: &NatsConfig) -> Result<async_nats::Client, CommandConnectError> {
    let mut failure = None;
    for url in &cfg.urls {
        // An address the client cannot parse is its to explain.
        let Ok(addr) = url.parse::<async_nats::ServerAddr>() else {
            failure = None;
            break;
        };
        match tokio::time::timeout(TCP_WAIT, TcpStream::connect((addr.host(), addr.port()))).await {
            Ok(Ok(_)) => {
                failure = None;
                break;
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => {
                failure = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", TCP_WAIT.as_secs()),
                ))
            }
        }
    }
    if let Some(source) = failure {
        return Err(CommandConnectError::Unreachable { source });
    }
    Ok(crate::nats::connect_now(cfg, crate::nats::COMMAND_WAIT).await?)
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
        let client = connect_command(&config.nats)
            .await
            .map_err(|source| OpsError::Connect {
                servers: crate::nats::servers(&config.nats),
                source,
            })?;
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
