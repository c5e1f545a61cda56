//! Configuration: the environment, parsed once into a validated, typed [`Config`].
//!
//! Every variable the service reads is a field of [`RawEnv`] (deserialized with `envy`), so the
//! list of variables lives in one place; `.env.example` and the README document the same list,
//! and a test keeps them in agreement. Parsing errors name the variable and the accepted values.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// One invalid variable: which one, and what would have been accepted.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {var}: {shown} (expected {expected})")]
pub struct ConfigError {
    pub var: &'static str,
    /// The offending value, or `<redacted>` for secrets.
    pub shown: String,
    pub expected: String,
}

/// The environment as read, before validation. Field names are the variable names, lower-cased.
#[derive(Debug, Default, Deserialize)]
pub struct RawEnv {
    pub nats_url: Option<String>,
    pub nats_creds_file: Option<String>,
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    pub nats_token: Option<String>,
    pub nats_tls_ca_file: Option<String>,
    pub database_url: Option<String>,
    pub database_max_connections: Option<String>,
    pub database_acquire_timeout_ms: Option<String>,
    pub database_statement_timeout_ms: Option<String>,
    pub run_migrations: Option<String>,
    pub event_stream_mode: Option<String>,
    pub topology_provision: Option<String>,
    pub stream_replicas: Option<String>,
    pub stream_core_name: Option<String>,
    pub stream_vendor_name: Option<String>,
    pub stream_dlq_name: Option<String>,
    pub stream_legacy_name: Option<String>,
    // HRV
    pub hrv_durable: Option<String>,
    pub normalize_hrv_durable: Option<String>,
    pub normalize_hrv_subject: Option<String>,
    pub normalize_hrv_dlq_subject: Option<String>,
    pub normalize_hrv_max_deliver: Option<String>,
    pub normalize_hrv_ack_wait_ms: Option<String>,
    pub hrv_batch_size: Option<String>,
    pub hrv_expires_ms: Option<String>,
    pub hrv_idle_backoff_ms: Option<String>,
    pub hrv_pull_mode: Option<String>,
    pub hrv_max_ack_pending: Option<String>,
    pub hrv_pipeline_depth: Option<String>,
    // Sleep
    pub normalize_sleep_durable: Option<String>,
    pub normalize_sleep_subject: Option<String>,
    pub normalize_sleep_dlq_subject: Option<String>,
    pub normalize_sleep_max_deliver: Option<String>,
    pub normalize_sleep_ack_wait_ms: Option<String>,
    pub sleep_batch_size: Option<String>,
    pub sleep_expires_ms: Option<String>,
    pub sleep_idle_backoff_ms: Option<String>,
    pub sleep_pull_mode: Option<String>,
    pub sleep_max_ack_pending: Option<String>,
    pub sleep_pipeline_depth: Option<String>,
    // Oura
    pub normalize_oura_durable: Option<String>,
    pub normalize_durable_name: Option<String>,
    pub normalize_oura_subject: Option<String>,
    pub normalize_oura_dlq_subject: Option<String>,
    pub normalize_dlq_subject: Option<String>,
    pub normalize_oura_max_deliver: Option<String>,
    pub normalize_oura_ack_wait_ms: Option<String>,
    pub oura_batch_size: Option<String>,
    pub oura_expires_ms: Option<String>,
    pub oura_idle_backoff_ms: Option<String>,
    pub oura_pull_mode: Option<String>,
    pub oura_max_ack_pending: Option<String>,
    pub oura_pipeline_depth: Option<String>,
    // Behaviour
    pub normalize_retry_backoff_ms: Option<String>,
    pub max_payload_bytes: Option<String>,
    pub max_future_skew_ms: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    pub metrics_port: Option<String>,
    pub rebind_interval_ms: Option<String>,
    pub consumer_info_interval_ms: Option<String>,
    pub shutdown_timeout_ms: Option<String>,
    pub log_format: Option<String>,
    pub rust_log: Option<String>,
}

/// Every variable the service reads, in the order of [`RawEnv`]. Kept in step with `RawEnv` by a
/// unit test, and with `.env.example` and the README by an integration test.
pub const VARIABLES: &[&str] = &[
    "NATS_URL",
    "NATS_CREDS_FILE",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_TLS_CA_FILE",
    "DATABASE_URL",
    "DATABASE_MAX_CONNECTIONS",
    "DATABASE_ACQUIRE_TIMEOUT_MS",
    "DATABASE_STATEMENT_TIMEOUT_MS",
    "RUN_MIGRATIONS",
    "EVENT_STREAM_MODE",
    "TOPOLOGY_PROVISION",
    "STREAM_REPLICAS",
    "STREAM_CORE_NAME",
    "STREAM_VENDOR_NAME",
    "STREAM_DLQ_NAME",
    "STREAM_LEGACY_NAME",
    "HRV_DURABLE",
    "NORMALIZE_HRV_DURABLE",
    "NORMALIZE_HRV_SUBJECT",
    "NORMALIZE_HRV_DLQ_SUBJECT",
    "NORMALIZE_HRV_MAX_DELIVER",
    "NORMALIZE_HRV_ACK_WAIT_MS",
    "HRV_BATCH_SIZE",
    "HRV_EXPIRES_MS",
    "HRV_IDLE_BACKOFF_MS",
    "HRV_PULL_MODE",
    "HRV_MAX_ACK_PENDING",
    "HRV_PIPELINE_DEPTH",
    "NORMALIZE_SLEEP_DURABLE",
    "NORMALIZE_SLEEP_SUBJECT",
    "NORMALIZE_SLEEP_DLQ_SUBJECT",
    "NORMALIZE_SLEEP_MAX_DELIVER",
    "NORMALIZE_SLEEP_ACK_WAIT_MS",
    "SLEEP_BATCH_SIZE",
    "SLEEP_EXPIRES_MS",
    "SLEEP_IDLE_BACKOFF_MS",
    "SLEEP_PULL_MODE",
    "SLEEP_MAX_ACK_PENDING",
    "SLEEP_PIPELINE_DEPTH",
    "NORMALIZE_OURA_DURABLE",
    "NORMALIZE_DURABLE_NAME",
    "NORMALIZE_OURA_SUBJECT",
    "NORMALIZE_OURA_DLQ_SUBJECT",
    "NORMALIZE_DLQ_SUBJECT",
    "NORMALIZE_OURA_MAX_DELIVER",
    "NORMALIZE_OURA_ACK_WAIT_MS",
    "OURA_BATCH_SIZE",
    "OURA_EXPIRES_MS",
    "OURA_IDLE_BACKOFF_MS",
    "OURA_PULL_MODE",
    "OURA_MAX_ACK_PENDING",
    "OURA_PIPELINE_DEPTH",
    "NORMALIZE_RETRY_BACKOFF_MS",
    "MAX_PAYLOAD_BYTES",
    "MAX_FUTURE_SKEW_MS",
    "HOST",
    "PORT",
    "METRICS_PORT",
    "REBIND_INTERVAL_MS",
    "CONSUMER_INFO_INTERVAL_MS",
    "SHUTDOWN_TIMEOUT_MS",
    "LOG_FORMAT",
    "RUST_LOG",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The three event types this service consumes. Adding one means a variant here, a file in
/// `pipeline/`, a migration and a match arm in `pipeline::decode`/`store::write`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConsumerKind {
    Hrv,
    Sleep,
    Oura,
}

impl ConsumerKind {
    pub const ALL: [ConsumerKind; 3] = [ConsumerKind::Hrv, ConsumerKind::Sleep, ConsumerKind::Oura];

    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::Hrv => "hrv",
            ConsumerKind::Sleep => "sleep",
            ConsumerKind::Oura => "oura",
        }
    }
}

impl fmt::Display for ConsumerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(std::env::vars())
    }

    /// Reads and validates the given variables (tests pass their own).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Config, ConfigError> {
        // Only our own variables are handed to envy, so unrelated variables (PATH, …) can never
        // fail deserialization.
        let ours = vars.into_iter().filter(|(k, _)| VARIABLES.contains(&k.as_str()));
        let raw: RawEnv = envy::from_iter(ours).map_err(|e| ConfigError {
            var: "environment",
            shown: String::new(),
            expected: e.to_string(),
        })?;
        Config::from_raw(raw)
    }

    pub fn from_raw(raw: RawEnv) -> Result<Config, ConfigError> {
        let nats = NatsConfig {
            urls: parse_nats_urls(raw.nats_url.as_deref())?,
            creds_file: non_empty(raw.nats_creds_file),
            user: non_empty(raw.nats_user),
            password: non_empty(raw.nats_password),
            token: non_empty(raw.nats_token),
            tls_ca_file: non_empty(raw.nats_tls_ca_file),
        };
        if nats.password.is_some() && nats.user.is_none() {
            return Err(ConfigError {
                var: "NATS_USER",
                shown: "<unset>".into(),
                expected: "a user name whenever NATS_PASSWORD is set".into(),
            });
        }
        let database_url = non_empty(raw.database_url).unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        match url::Url::parse(&database_url) {
            Ok(u) if u.scheme() == "postgres" || u.scheme() == "postgresql" => {}
            _ => {
                return Err(ConfigError {
                    var: "DATABASE_URL",
                    shown: crate::redact::redact_url(&database_url),
                    expected: "a postgres:// URL".into(),
                })
            }
        }
        let mode = parse_enum(
            "EVENT_STREAM_MODE",
            raw.event_stream_mode.as_deref(),
            StreamMode::Multi,
            &[("single", StreamMode::Single), ("multi", StreamMode::Multi)],
        )?;
        let provision = parse_enum(
            "TOPOLOGY_PROVISION",
            raw.topology_provision.as_deref(),
            Provision::Missing,
            &[("missing", Provision::Missing), ("off", Provision::Off)],
        )?;
        let streams = StreamNames {
            core: stream_name("STREAM_CORE_NAME", raw.stream_core_name, "AA_CORE_HOT")?,
            vendor: stream_name("STREAM_VENDOR_NAME", raw.stream_vendor_name, "AA_VENDOR_HOT")?,
            dlq: stream_name("STREAM_DLQ_NAME", raw.stream_dlq_name, "AA_DLQ")?,
            legacy: stream_name(
                "STREAM_LEGACY_NAME",
                raw.stream_legacy_name,
                "ATHLETE_ALLY_EVENTS",
            )?,
        };

        let hrv = consumer(
            ConsumerKind::Hrv,
            StreamRole::Core,
            Names {
                durable: first_of(&[
                    ("HRV_DURABLE", raw.hrv_durable),
                    ("NORMALIZE_HRV_DURABLE", raw.normalize_hrv_durable),
                ]),
                durable_default: "normalize-hrv-durable",
                subject: (
                    "NORMALIZE_HRV_SUBJECT",
                    raw.normalize_hrv_subject,
                    "athlete-ally.hrv.raw-received",
                ),
                dlq: first_of(&[("NORMALIZE_HRV_DLQ_SUBJECT", raw.normalize_hrv_dlq_subject)]),
                dlq_default: "dlq.normalize.hrv.raw-received",
                ack_wait_default_ms: 60_000,
            },
            Knobs {
                prefix: "HRV",
                normalize_prefix: "NORMALIZE_HRV",
                batch_size: raw.hrv_batch_size,
                expires_ms: raw.hrv_expires_ms,
                idle_backoff_ms: raw.hrv_idle_backoff_ms,
                pull_mode: raw.hrv_pull_mode,
                max_ack_pending: raw.hrv_max_ack_pending,
                pipeline_depth: raw.hrv_pipeline_depth,
                max_deliver: raw.normalize_hrv_max_deliver,
                ack_wait_ms: raw.normalize_hrv_ack_wait_ms,
            },
        )?;
        let sleep = consumer(
            ConsumerKind::Sleep,
            StreamRole::Core,
            Names {
                durable: first_of(&[("NORMALIZE_SLEEP_DURABLE", raw.normalize_sleep_durable)]),
                durable_default: "normalize-sleep-durable",
                subject: (
                    "NORMALIZE_SLEEP_SUBJECT",
                    raw.normalize_sleep_subject,
                    "athlete-ally.sleep.raw-received",
                ),
                dlq: first_of(&[("NORMALIZE_SLEEP_DLQ_SUBJECT", raw.normalize_sleep_dlq_subject)]),
                dlq_default: "dlq.normalize.sleep.raw-received",
                ack_wait_default_ms: 60_000,
            },
            Knobs {
                prefix: "SLEEP",
                normalize_prefix: "NORMALIZE_SLEEP",
                batch_size: raw.sleep_batch_size,
                expires_ms: raw.sleep_expires_ms,
                idle_backoff_ms: raw.sleep_idle_backoff_ms,
                pull_mode: raw.sleep_pull_mode,
                max_ack_pending: raw.sleep_max_ack_pending,
                pipeline_depth: raw.sleep_pipeline_depth,
                max_deliver: raw.normalize_sleep_max_deliver,
                ack_wait_ms: raw.normalize_sleep_ack_wait_ms,
            },
        )?;
        let oura = consumer(
            ConsumerKind::Oura,
            StreamRole::Vendor,
            Names {
                durable: first_of(&[
                    ("NORMALIZE_OURA_DURABLE", raw.normalize_oura_durable),
                    ("NORMALIZE_DURABLE_NAME", raw.normalize_durable_name),
                ]),
                durable_default: "normalize-oura",
                subject: (
                    "NORMALIZE_OURA_SUBJECT",
                    raw.normalize_oura_subject,
                    "vendor.oura.webhook.received",
                ),
                dlq: first_of(&[
                    ("NORMALIZE_OURA_DLQ_SUBJECT", raw.normalize_oura_dlq_subject),
                    ("NORMALIZE_DLQ_SUBJECT", raw.normalize_dlq_subject),
                ]),
                dlq_default: "dlq.vendor.oura.webhook",
                ack_wait_default_ms: 15_000,
            },
            Knobs {
                prefix: "OURA",
                normalize_prefix: "NORMALIZE_OURA",
                batch_size: raw.oura_batch_size,
                expires_ms: raw.oura_expires_ms,
                idle_backoff_ms: raw.oura_idle_backoff_ms,
                pull_mode: raw.oura_pull_mode,
                max_ack_pending: raw.oura_max_ack_pending,
                pipeline_depth: raw.oura_pipeline_depth,
                max_deliver: raw.normalize_oura_max_deliver,
                ack_wait_ms: raw.normalize_oura_ack_wait_ms,
            },
        )?;
        let consumers = vec![hrv, sleep, oura];
        for (i, a) in consumers.iter().enumerate() {
            for b in &consumers[i + 1..] {
                if a.durable == b.durable && a.primary == b.primary {
                    return Err(ConfigError {
                        var: durable_var(b.kind),
                        shown: format!("{:?}", b.durable),
                        expected: format!("a durable name different from the {} consumer's", a.kind),
                    });
                }
            }
        }

        let port = parse_num::<u16>("PORT", raw.port.as_deref(), 4102, 0, u16::MAX)?;
        let metrics_port = parse_num::<u16>("METRICS_PORT", raw.metrics_port.as_deref(), 9464, 0, u16::MAX)?;
        let log_format = parse_enum(
            "LOG_FORMAT",
            raw.log_format.as_deref(),
            LogFormat::Json,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        )?;

        Ok(Config {
            nats,
            database_url,
            database_max_connections: parse_num(
                "DATABASE_MAX_CONNECTIONS",
                raw.database_max_connections.as_deref(),
                10,
                1,
                1000,
            )?,
            database_acquire_timeout: ms(
                "DATABASE_ACQUIRE_TIMEOUT_MS",
                raw.database_acquire_timeout_ms.as_deref(),
                3000,
                10,
                600_000,
            )?,
            database_statement_timeout: ms(
                "DATABASE_STATEMENT_TIMEOUT_MS",
                raw.database_statement_timeout_ms.as_deref(),
                5000,
                1,
                3_600_000,
            )?,
            run_migrations: parse_bool("RUN_MIGRATIONS", raw.run_migrations.as_deref(), true)?,
            mode,
            provision,
            replicas: parse_num("STREAM_REPLICAS", raw.stream_replicas.as_deref(), 1, 1, 5)?,
            streams,
            consumers,
            retry_backoff: parse_backoff(raw.normalize_retry_backoff_ms.as_deref())?,
            max_payload_bytes: parse_num(
                "MAX_PAYLOAD_BYTES",
                raw.max_payload_bytes.as_deref(),
                1024 * 1024,
                1,
                64 * 1024 * 1024,
            )?,
            max_future_skew: chrono::Duration::milliseconds(parse_num(
                "MAX_FUTURE_SKEW_MS",
                raw.max_future_skew_ms.as_deref(),
                86_400_000i64,
                1,
                // A year: anything longer is no protection at all.
                31_536_000_000,
            )?),
            host: non_empty(raw.host).unwrap_or_else(|| "0.0.0.0".into()),
            port,
            metrics_port,
            rebind_interval: ms(
                "REBIND_INTERVAL_MS",
                raw.rebind_interval_ms.as_deref(),
                15_000,
                10,
                86_400_000,
            )?,
            consumer_info_interval: ms(
                "CONSUMER_INFO_INTERVAL_MS",
                raw.consumer_info_interval_ms.as_deref(),
                10_000,
                10,
                86_400_000,
            )?,
            shutdown_timeout: ms(
                "SHUTDOWN_TIMEOUT_MS",
                raw.shutdown_timeout_ms.as_deref(),
                25_000,
                100,
                3_600_000,
            )?,
            log_format,
        })
    }

    pub fn consumer(&self, kind: ConsumerKind) -> Option<&ConsumerConfig> {
        self.consumers.iter().find(|c| c.kind == kind)
    }
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

fn durable_var(kind: ConsumerKind) -> &'static str {
    match kind {
        ConsumerKind::Hrv => "HRV_DURABLE",
        ConsumerKind::Sleep => "NORMALIZE_SLEEP_DURABLE",
        ConsumerKind::Oura => "NORMALIZE_OURA_DURABLE",
    }
}

struct Names {
    /// The first set variable among the aliases, in precedence order.
    durable: Option<(&'static str, String)>,
    durable_default: &'static str,
    subject: (&'static str, Option<String>, &'static str),
    dlq: Option<(&'static str, String)>,
    dlq_default: &'static str,
    ack_wait_default_ms: u64,
}

struct Knobs {
    prefix: &'static str,
    normalize_prefix: &'static str,
    batch_size: Option<String>,
    expires_ms: Option<String>,
    idle_backoff_ms: Option<String>,
    pull_mode: Option<String>,
    max_ack_pending: Option<String>,
    pipeline_depth: Option<String>,
    max_deliver: Option<String>,
    ack_wait_ms: Option<String>,
}

fn leak(s: String) -> &'static str {
    // Variable names are built once at start-up from a fixed set; leaking them keeps
    // ConfigError free of lifetimes.
    Box::leak(s.into_boxed_str())
}

fn consumer(
    kind: ConsumerKind,
    primary: StreamRole,
    n: Names,
    k: Knobs,
) -> Result<ConsumerConfig, ConfigError> {
    let durable = match n.durable {
        Some((var, v)) => durable_name(var, v)?,
        None => n.durable_default.to_string(),
    };
    let (subject_var, subject, subject_default) = n.subject;
    let filter_subject = match non_empty(subject) {
        Some(s) => subject_value(subject_var, s, false)?,
        None => subject_default.to_string(),
    };
    let dlq_prefix = match n.dlq {
        Some((var, v)) => {
            let v = subject_value(var, v, false)?;
            if !v.starts_with("dlq.") {
                return Err(ConfigError {
                    var,
                    shown: format!("{v:?}"),
                    expected: "a subject starting with \"dlq.\" (the AA_DLQ stream captures dlq.>)".into(),
                });
            }
            v
        }
        None => n.dlq_default.to_string(),
    };
    let var = |suffix: &str| leak(format!("{}_{}", k.prefix, suffix));
    let nvar = |suffix: &str| leak(format!("{}_{}", k.normalize_prefix, suffix));
    let pull_mode = parse_enum(
        var("PULL_MODE"),
        k.pull_mode.as_deref(),
        PullMode::Fetch,
        &[("fetch", PullMode::Fetch), ("stream", PullMode::Stream)],
    )?;
    Ok(ConsumerConfig {
        kind,
        durable,
        filter_subject,
        dlq_prefix,
        primary,
        batch_size: parse_num(var("BATCH_SIZE"), k.batch_size.as_deref(), 10, 1, 10_000)?,
        expires: ms(var("EXPIRES_MS"), k.expires_ms.as_deref(), 5000, 100, 300_000)?,
        idle_backoff: ms(
            var("IDLE_BACKOFF_MS"),
            k.idle_backoff_ms.as_deref(),
            50,
            0,
            60_000,
        )?,
        pull_mode,
        max_deliver: parse_num(nvar("MAX_DELIVER"), k.max_deliver.as_deref(), 5, 1, 1_000_000)?,
        ack_wait: ms(
            nvar("ACK_WAIT_MS"),
            k.ack_wait_ms.as_deref(),
            n.ack_wait_default_ms,
            100,
            3_600_000,
        )?,
        max_ack_pending: parse_num(
            var("MAX_ACK_PENDING"),
            k.max_ack_pending.as_deref(),
            1000,
            1,
            1_000_000,
        )?,
        pipeline_depth: parse_num(var("PIPELINE_DEPTH"), k.pipeline_depth.as_deref(), 3, 1, 16)?,
    })
}

fn first_of(candidates: &[(&'static str, Option<String>)]) -> Option<(&'static str, String)> {
    candidates
        .iter()
        .find_map(|(var, v)| non_empty(v.clone()).map(|v| (*var, v)))
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn durable_name(var: &'static str, v: String) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(v)
    } else {
        Err(ConfigError {
            var,
            shown: format!("{v:?}"),
            expected: "a durable name of letters, digits, '-' and '_' (no dots, spaces or wildcards)".into(),
        })
    }
}

fn stream_name(var: &'static str, v: Option<String>, default: &str) -> Result<String, ConfigError> {
    match non_empty(v) {
        None => Ok(default.to_string()),
        Some(v) => durable_name(var, v).map_err(|mut e| {
            e.expected = "a stream name of letters, digits, '-' and '_'".into();
            e
        }),
    }
}

/// A NATS subject: dot-separated non-empty tokens; wildcards only when `wildcards` is true.
fn subject_value(var: &'static str, v: String, wildcards: bool) -> Result<String, ConfigError> {
    let valid = !v.is_empty()
        && v.split('.').all(|t| {
            !t.is_empty() && !t.chars().any(char::is_whitespace) && (wildcards || (t != "*" && t != ">"))
        });
    if valid {
        Ok(v)
    } else {
        Err(ConfigError {
            var,
            shown: format!("{v:?}"),
            expected: "a NATS subject of non-empty dot-separated tokens without spaces or wildcards".into(),
        })
    }
}

fn parse_enum<T: Copy>(
    var: &'static str,
    v: Option<&str>,
    default: T,
    accepted: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(raw) = v.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    let lower = raw.to_ascii_lowercase();
    accepted
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, value)| *value)
        .ok_or_else(|| ConfigError {
            var,
            shown: format!("{raw:?}"),
            expected: format!(
                "one of {}",
                accepted.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        })
}

fn parse_num<T>(var: &'static str, v: Option<&str>, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let Some(raw) = v.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(default);
    };
    match raw.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError {
            var,
            shown: format!("{raw:?}"),
            expected: format!("a whole number from {min} to {max}"),
        }),
    }
}

fn ms(var: &'static str, v: Option<&str>, default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    parse_num(var, v, default, min, max).map(Duration::from_millis)
}

fn parse_bool(var: &'static str, v: Option<&str>, default: bool) -> Result<bool, ConfigError> {
    parse_enum(
        var,
        v,
        default,
        &[
            ("true", true),
            ("1", true),
            ("yes", true),
            ("false", false),
            ("0", false),
            ("no", false),
        ],
    )
}

fn parse_backoff(v: Option<&str>) -> Result<Vec<Duration>, ConfigError> {
    let default = || vec![1000, 5000, 15000, 30000];
    let raw = v.map(str::trim).filter(|s| !s.is_empty());
    let list = match raw {
        None => default(),
        Some(raw) => {
            let parsed: Result<Vec<u64>, _> = raw.split(',').map(|p| p.trim().parse::<u64>()).collect();
            match parsed {
                Ok(list) if !list.is_empty() && list.iter().all(|&n| n <= 3_600_000) => list,
                _ => {
                    return Err(ConfigError {
                        var: "NORMALIZE_RETRY_BACKOFF_MS",
                        shown: format!("{raw:?}"),
                        expected: "a comma-separated list of milliseconds, e.g. 1000,5000,15000,30000".into(),
                    })
                }
            }
        }
    };
    Ok(list.into_iter().map(Duration::from_millis).collect())
}

fn parse_nats_urls(v: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let raw = v
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_NATS_URL);
    let mut urls = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let with_scheme = if part.contains("://") {
            part.to_string()
        } else {
            format!("nats://{part}")
        };
        match url::Url::parse(&with_scheme) {
            Ok(u) if matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") && u.host_str().is_some() => {
                urls.push(with_scheme)
            }
            _ => {
                return Err(ConfigError {
                    var: "NATS_URL",
                    shown: crate::redact::redact_url(part),
                    expected: "a comma-separated list of nats://host:port (or tls://) URLs".into(),
                })
            }
        }
    }
    if urls.is_empty() {
        return Err(ConfigError {
            var: "NATS_URL",
            shown: "\"\"".into(),
            expected: "at least one nats://host:port URL".into(),
        });
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.mode, StreamMode::Multi);
        assert_eq!(c.provision, Provision::Missing);
        assert_eq!(c.port, 4102);
        assert_eq!(c.metrics_port, 9464);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
        let hrv = c.consumer(ConsumerKind::Hrv).unwrap();
        assert_eq!(hrv.durable, "normalize-hrv-durable");
        assert_eq!(hrv.filter_subject, "athlete-ally.hrv.raw-received");
        assert_eq!(hrv.dlq_prefix, "dlq.normalize.hrv.raw-received");
        assert_eq!(hrv.ack_wait, Duration::from_millis(60_000));
        assert_eq!(hrv.batch_size, 10);
        assert_eq!(hrv.expires, Duration::from_millis(5000));
        assert_eq!(hrv.idle_backoff, Duration::from_millis(50));
        assert_eq!(hrv.max_deliver, 5);
        assert_eq!(hrv.max_ack_pending, 1000);
        assert_eq!(hrv.pipeline_depth, 3);
        assert_eq!(hrv.pull_mode, PullMode::Fetch);
        let oura = c.consumer(ConsumerKind::Oura).unwrap();
        assert_eq!(oura.durable, "normalize-oura");
        assert_eq!(oura.ack_wait, Duration::from_millis(15_000));
        assert_eq!(oura.dlq_prefix, "dlq.vendor.oura.webhook");
        assert_eq!(oura.primary, StreamRole::Vendor);
        let sleep = c.consumer(ConsumerKind::Sleep).unwrap();
        assert_eq!(sleep.durable, "normalize-sleep-durable");
        assert_eq!(sleep.dlq_prefix, "dlq.normalize.sleep.raw-received");
        assert_eq!(
            c.retry_backoff,
            [1000, 5000, 15000, 30000].map(Duration::from_millis).to_vec()
        );
        assert_eq!(c.max_payload_bytes, 1024 * 1024);
        assert_eq!(c.max_future_skew, chrono::Duration::hours(24));
        assert_eq!(c.database_statement_timeout, Duration::from_millis(5000));
        // Well under the smallest default ack_wait (Oura's 15 s).
        assert!(c
            .consumers
            .iter()
            .all(|cc| c.database_statement_timeout < cc.ack_wait));
    }

    #[test]
    fn durable_aliases_follow_precedence() {
        let c = cfg(&[("HRV_DURABLE", "a"), ("NORMALIZE_HRV_DURABLE", "b")]).unwrap();
        assert_eq!(c.consumer(ConsumerKind::Hrv).unwrap().durable, "a");
        let c = cfg(&[("NORMALIZE_HRV_DURABLE", "b")]).unwrap();
        assert_eq!(c.consumer(ConsumerKind::Hrv).unwrap().durable, "b");
        let c = cfg(&[("NORMALIZE_OURA_DURABLE", "x"), ("NORMALIZE_DURABLE_NAME", "y")]).unwrap();
        assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().durable, "x");
        let c = cfg(&[
            ("NORMALIZE_DURABLE_NAME", "y"),
            ("NORMALIZE_DLQ_SUBJECT", "dlq.o"),
        ])
        .unwrap();
        assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().durable, "y");
        assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().dlq_prefix, "dlq.o");
        let c = cfg(&[
            ("NORMALIZE_OURA_DLQ_SUBJECT", "dlq.a"),
            ("NORMALIZE_DLQ_SUBJECT", "dlq.b"),
        ])
        .unwrap();
        assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().dlq_prefix, "dlq.a");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("EVENT_STREAM_MODE", "dual"),
            ("TOPOLOGY_PROVISION", "always"),
            ("HRV_BATCH_SIZE", "ten"),
            ("HRV_BATCH_SIZE", "0"),
            ("HRV_PIPELINE_DEPTH", "0"),
            ("OURA_PIPELINE_DEPTH", "17"),
            ("SLEEP_EXPIRES_MS", "-1"),
            ("OURA_PULL_MODE", "push"),
            ("NORMALIZE_HRV_MAX_DELIVER", "0"),
            ("NORMALIZE_OURA_ACK_WAIT_MS", "abc"),
            ("PORT", "70000"),
            ("PORT", "-1"),
            ("METRICS_PORT", "x"),
            ("NORMALIZE_RETRY_BACKOFF_MS", "1000,,2"),
            ("RUN_MIGRATIONS", "maybe"),
            ("LOG_FORMAT", "xml"),
            ("HRV_DURABLE", "has.dot"),
            ("NORMALIZE_HRV_SUBJECT", "a..b"),
            ("NORMALIZE_HRV_DLQ_SUBJECT", "other.prefix"),
            ("NATS_URL", "http://x"),
            ("DATABASE_URL", "mysql://x"),
            ("STREAM_REPLICAS", "7"),
            ("MAX_PAYLOAD_BYTES", "0"),
            ("MAX_FUTURE_SKEW_MS", "0"),
            ("MAX_FUTURE_SKEW_MS", "-1"),
            ("MAX_FUTURE_SKEW_MS", "1h"),
            ("MAX_FUTURE_SKEW_MS", "31536000001"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "0"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "-5"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "5s"),
        ];
        for (var, value) in cases {
            let err = cfg(&[(var, value)]).expect_err(var);
            assert_eq!(err.var, *var, "{var}={value}");
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn secrets_are_not_echoed() {
        let err = cfg(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = cfg(&[("NATS_URL", "http://u:hunter2@h:4222")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn nats_url_list() {
        let c = cfg(&[("NATS_URL", "nats://a:4222, b:4223")]).unwrap();
        assert_eq!(c.nats.urls, vec!["nats://a:4222", "nats://b:4223"]);
    }

    #[test]
    fn retry_delay_is_indexed_by_delivery_count() {
        let b = [1, 5, 15].map(Duration::from_millis);
        assert_eq!(retry_delay(&b, 1), Duration::from_millis(1));
        assert_eq!(retry_delay(&b, 3), Duration::from_millis(15));
        assert_eq!(retry_delay(&b, 9), Duration::from_millis(15));
        assert_eq!(retry_delay(&b, 0), Duration::from_millis(1));
    }

    #[test]
    fn variables_list_matches_raw_env() {
        // Every listed variable must deserialize into RawEnv (envy ignores unknown keys, so a
        // typo in VARIABLES would otherwise silently never be read).
        let raw: RawEnv =
            envy::from_iter(VARIABLES.iter().map(|v| (v.to_string(), "x".to_string()))).unwrap();
        let debug = format!("{raw:?}");
        assert_eq!(debug.matches("Some(\"x\")").count(), VARIABLES.len());
        assert_eq!(debug.matches("None").count(), 0);
    }
}
