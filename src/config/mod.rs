//! Configuration: the environment, parsed once into a validated, typed [`Config`].
//!
//! Every variable the service reads is listed once ([`vars`] for the service-wide ones, the kind
//! table [`kinds`] for the per-consumer ones); [`VARIABLES`] is derived from them, and
//! `.env.example` and docs/CONFIGURATION.md are checked against it. Parsing errors name the variable and
//! the accepted values.

mod kinds;
mod parse;
mod vars;

use std::time::Duration;

pub use kinds::{ConsumerKind, KindSpec, PerKind};
use vars::Env;
pub use vars::{kind_vars, KindVars, Var, VARIABLES};

/// An invalid variable: which one, and what would have been accepted. When several variables are
/// invalid, the first is described by the fields and the others follow in `more`, so one start-up
/// reports them all.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub var: &'static str,
    /// The offending value, or `<redacted>` for secrets.
    pub shown: String,
    pub expected: String,
    /// The other invalid variables, in the order they were read.
    pub more: Vec<ConfigError>,
}

impl ConfigError {
    pub(crate) fn new(
        var: &'static str,
        shown: impl Into<String>,
        expected: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            var,
            shown: shown.into(),
            expected: expected.into(),
            more: Vec::new(),
        }
    }

    /// Every invalid variable's name, the first one included.
    pub fn vars(&self) -> Vec<&'static str> {
        std::iter::once(self.var)
            .chain(self.more.iter().map(|e| e.var))
            .collect()
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.more.is_empty() {
            write!(f, "{} invalid variables:\n  ", self.more.len() + 1)?;
        }
        write!(
            f,
            "invalid value for {}: {} (expected {})",
            self.var, self.shown, self.expected
        )?;
        for e in &self.more {
            write!(
                f,
                "\n  invalid value for {}: {} (expected {})",
                e.var, e.shown, e.expected
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamMode {
    Single,
    Multi,
}

impl StreamMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamMode::Single => "single",
            StreamMode::Multi => "multi",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provision {
    /// Create absent streams (when their subjects collide with no existing stream) and absent
    /// durables; never change or delete what exists.
    Missing,
    /// Create nothing; operators run `normalize-service topology apply`.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullMode {
    /// Repeated batch requests bounded by `*_EXPIRES_MS`.
    Fetch,
    /// One continuous `messages()` stream that keeps pull requests outstanding.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Which of the new streams is a consumer's primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRole {
    Core,
    Vendor,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    pub core: String,
    pub vendor: String,
    pub dlq: String,
    pub legacy: String,
}

impl Default for StreamNames {
    fn default() -> Self {
        StreamNames {
            core: "AA_CORE_HOT".into(),
            vendor: "AA_VENDOR_HOT".into(),
            dlq: "AA_DLQ".into(),
            legacy: "ATHLETE_ALLY_EVENTS".into(),
        }
    }
}

impl StreamNames {
    pub fn primary(&self, role: StreamRole) -> &str {
        match role {
            StreamRole::Core => &self.core,
            StreamRole::Vendor => &self.vendor,
        }
    }
}

/// Everything one consumer loop needs to know.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub kind: ConsumerKind,
    pub durable: String,
    pub filter_subject: String,
    /// Dead letters go to `<dlq_prefix>.<reason>`.
    pub dlq_prefix: String,
    pub primary: StreamRole,
    pub batch_size: usize,
    pub expires: Duration,
    pub idle_backoff: Duration,
    pub pull_mode: PullMode,
    /// The daemon's delivery limit: a retryable failure on this delivery is dead-lettered.
    pub max_deliver: i64,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    /// How many batches may be between "received" and "settled" at once: batch N+1 is
    /// decoded and written while batch N's write commits and its PubAcks and acks complete.
    /// 1 processes strictly one batch after the other.
    pub pipeline_depth: usize,
}

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub urls: Vec<String>,
    pub creds_file: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub tls_ca_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub database_url: String,
    pub database_max_connections: u32,
    pub database_acquire_timeout: Duration,
    /// `statement_timeout` and `lock_timeout` of every pooled connection: no statement can hold
    /// its messages (progress acks) indefinitely; a statement that hits it fails with 57014 or
    /// 55P03, a transient error, so its messages are NAKed and retried. Migrations run on their
    /// own connection without it (see `store::connect`).
    pub database_statement_timeout: Duration,
    pub run_migrations: bool,
    pub mode: StreamMode,
    pub provision: Provision,
    pub replicas: usize,
    pub streams: StreamNames,
    /// One per [`ConsumerKind`], in [`ConsumerKind::ALL`] order.
    pub consumers: Vec<ConsumerConfig>,
    /// NAK delays indexed by delivery count (the last one repeats).
    pub retry_backoff: Vec<Duration>,
    pub max_payload_bytes: usize,
    /// `MAX_FUTURE_SKEW_MS`: how far ahead of processing time an event's `capturedAt` or
    /// `timestamp` may be. A later one is schema-invalid: a far-future time would win every
    /// comparison for its row key and pin the row until that time has passed. A chrono duration,
    /// as it is only ever added to a `DateTime`.
    pub max_future_skew: chrono::Duration,
    pub host: String,
    pub port: u16,
    pub metrics_port: u16,
    pub rebind_interval: Duration,
    pub consumer_info_interval: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/athlete_normalize";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Batches in flight per consumer by default. Small batches are bound by round trips, not CPU:
/// at the default batch of 10 the benchmark gains 10–20 % from 3 to 5 and nothing more at 8
/// (BENCHMARKS.md); large batches are bound by `max_ack_pending` and CPU, not by this.
pub const DEFAULT_PIPELINE_DEPTH: usize = 5;
/// The pool by default: one connection per batch in flight of the three consumers at the
/// default depth, and one to spare.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 16;

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(std::env::vars())
    }

    /// Reads and validates the given variables (tests pass their own).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Config, ConfigError> {
        Config::from_env_values(&Env::new(vars)?)
    }

    fn from_env_values(env: &Env) -> Result<Config, ConfigError> {
        let nats = NatsConfig {
            urls: env.check(parse::nats_urls(env.get(Var::NatsUrl)), Vec::new()),
            creds_file: owned(env.get(Var::NatsCredsFile)),
            user: owned(env.get(Var::NatsUser)),
            password: owned(env.get(Var::NatsPassword)),
            token: owned(env.get(Var::NatsToken)),
            tls_ca_file: owned(env.get(Var::NatsTlsCaFile)),
        };
        if nats.password.is_some() && nats.user.is_none() {
            env.bad(ConfigError::new(
                Var::NatsUser.name(),
                "<unset>",
                "a user name whenever NATS_PASSWORD is set",
            ));
        }
        // A user alone would connect anonymously (and skip the URL's credentials): refused.
        if nats.user.is_some() && nats.password.is_none() {
            env.bad(ConfigError::new(
                Var::NatsPassword.name(),
                "<unset>",
                "a password whenever NATS_USER is set",
            ));
        }
        let database_url = env.check(parse::database_url(env.get(Var::DatabaseUrl)), String::new());
        let mode = env.choice(
            Var::EventStreamMode,
            StreamMode::Multi,
            &[("single", StreamMode::Single), ("multi", StreamMode::Multi)],
        );
        let provision = env.choice(
            Var::TopologyProvision,
            Provision::Missing,
            &[("missing", Provision::Missing), ("off", Provision::Off)],
        );
        let stream = |var: Var, default: &str| {
            env.check(
                parse::stream_name(var.name(), env.get(var), default),
                default.to_string(),
            )
        };
        let streams = StreamNames {
            core: stream(Var::StreamCoreName, "AA_CORE_HOT"),
            vendor: stream(Var::StreamVendorName, "AA_VENDOR_HOT"),
            dlq: stream(Var::StreamDlqName, "AA_DLQ"),
            legacy: stream(Var::StreamLegacyName, "ATHLETE_ALLY_EVENTS"),
        };

        let consumers = ConsumerKind::ALL
            .into_iter()
            .map(|kind| consumer(env, kind))
            .collect::<Vec<_>>();
        for (i, a) in consumers.iter().enumerate() {
            for b in &consumers[i + 1..] {
                if a.durable == b.durable && a.primary == b.primary {
                    env.bad(ConfigError::new(
                        b.kind
                            .spec()
                            .durable_vars
                            .first()
                            .copied()
                            .unwrap_or("environment"),
                        format!("{:?}", b.durable),
                        format!("a durable name different from the {} consumer's", a.kind),
                    ));
                }
            }
        }

        let port = env.num::<u16>(Var::Port, 4102, 0, u16::MAX);
        let metrics_port = env.num::<u16>(Var::MetricsPort, 9464, 0, u16::MAX);
        let log_format = env.choice(
            Var::LogFormat,
            LogFormat::Json,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        );

        let config = Config {
            nats,
            database_url,
            database_max_connections: env.num(
                Var::DatabaseMaxConnections,
                DEFAULT_DATABASE_MAX_CONNECTIONS,
                1,
                1000,
            ),
            database_acquire_timeout: env.ms(Var::DatabaseAcquireTimeoutMs, 3000, 10, 600_000),
            database_statement_timeout: env.ms(Var::DatabaseStatementTimeoutMs, 5000, 1, 3_600_000),
            run_migrations: env.flag(Var::RunMigrations, true),
            mode,
            provision,
            replicas: env.num(Var::StreamReplicas, 1, 1, 5),
            streams,
            consumers,
            retry_backoff: env.check(parse::backoff(env.get(Var::NormalizeRetryBackoffMs)), Vec::new()),
            max_payload_bytes: env.num(Var::MaxPayloadBytes, 1024 * 1024, 1, 64 * 1024 * 1024),
            max_future_skew: chrono::Duration::milliseconds(env.num(
                Var::MaxFutureSkewMs,
                86_400_000i64,
                1,
                // A year: anything longer is no protection at all.
                31_536_000_000,
            )),
            host: env.get(Var::Host).unwrap_or("0.0.0.0").to_string(),
            port,
            metrics_port,
            rebind_interval: env.ms(Var::RebindIntervalMs, 15_000, 10, 86_400_000),
            consumer_info_interval: env.ms(Var::ConsumerInfoIntervalMs, 10_000, 10, 86_400_000),
            shutdown_timeout: env.ms(Var::ShutdownTimeoutMs, 25_000, 100, 3_600_000),
            log_format,
        };
        // Every variable was read; report all the invalid ones at once.
        env.finish().map(|()| config)
    }

    pub fn consumer(&self, kind: ConsumerKind) -> Option<&ConsumerConfig> {
        self.consumers.iter().find(|c| c.kind == kind)
    }
}

/// One consumer's configuration, from its row of the kind table and its variables.
fn consumer(env: &Env, kind: ConsumerKind) -> ConsumerConfig {
    let spec = kind.spec();
    let v = kind_vars(kind);
    let durable = match env.first_of(v.durable) {
        Some((var, name)) => env.check(parse::durable_name(var, name), spec.durable_default.to_string()),
        None => spec.durable_default.to_string(),
    };
    let filter_subject = match env.get(&v.subject) {
        Some(s) => env.check(parse::subject(&v.subject, s), spec.subject_default.to_string()),
        None => spec.subject_default.to_string(),
    };
    let dlq_prefix = match env.first_of(v.dlq) {
        Some((var, prefix)) => env.check(parse::dlq_prefix(var, prefix), spec.dlq_default.to_string()),
        None => spec.dlq_default.to_string(),
    };
    ConsumerConfig {
        kind,
        durable,
        filter_subject,
        dlq_prefix,
        primary: spec.primary,
        pull_mode: env.choice(
            &v.pull_mode,
            PullMode::Fetch,
            &[("fetch", PullMode::Fetch), ("stream", PullMode::Stream)],
        ),
        batch_size: env.num(&v.batch_size, 10, 1, 10_000),
        expires: env.ms(&v.expires_ms, 5000, 100, 300_000),
        idle_backoff: env.ms(&v.idle_backoff_ms, 50, 0, 60_000),
        max_deliver: env.num(&v.max_deliver, 5, 1, 1_000_000),
        ack_wait: env.ms(&v.ack_wait_ms, spec.ack_wait_default_ms, 100, 3_600_000),
        max_ack_pending: env.num(&v.max_ack_pending, 1000, 1, 1_000_000),
        pipeline_depth: env.num(&v.pipeline_depth, DEFAULT_PIPELINE_DEPTH, 1, 16),
    }
}

fn owned(v: Option<&str>) -> Option<String> {
    v.map(str::to_string)
}

/// The NAK delay for a message on its `delivered`-th delivery (1-based); the last one repeats.
pub fn retry_delay(backoff: &[Duration], delivered: i64) -> Duration {
    let idx = usize::try_from(delivered.saturating_sub(1)).unwrap_or(0);
    backoff
        .get(idx)
        .or_else(|| backoff.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests;
