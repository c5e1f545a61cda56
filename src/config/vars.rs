//! The variables the service reads, listed once: [`Var`] for the service-wide ones, the kind
//! table ([`super::kinds`]) for the per-consumer ones. [`VARIABLES`], the reference list that
//! `.env.example` and docs/CONFIGURATION.md are checked against, and [`Env`], which reads values, are both
//! derived from them, so no variable can be read without being listed or listed without being
//! read (a unit test checks the second).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use super::kinds::{ConsumerKind, PerKind};
use super::ConfigError;

/// Declares [`Var`] and [`Var::ALL`] from one list of (variant, variable name).
macro_rules! variables {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// A service-wide variable (the per-consumer ones are [`KindVars`]).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Var {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Var {
            pub const ALL: &'static [Var] = &[$(Var::$variant,)+];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Var::$variant => $name,)+
                }
            }
        }
    };
}

variables! {
    NatsUrl = "NATS_URL",
    NatsCredsFile = "NATS_CREDS_FILE",
    NatsUser = "NATS_USER",
    NatsPassword = "NATS_PASSWORD",
    NatsToken = "NATS_TOKEN",
    NatsTlsCaFile = "NATS_TLS_CA_FILE",
    DatabaseUrl = "DATABASE_URL",
    DatabaseMaxConnections = "DATABASE_MAX_CONNECTIONS",
    DatabaseAcquireTimeoutMs = "DATABASE_ACQUIRE_TIMEOUT_MS",
    DatabaseStatementTimeoutMs = "DATABASE_STATEMENT_TIMEOUT_MS",
    RunMigrations = "RUN_MIGRATIONS",
    EventStreamMode = "EVENT_STREAM_MODE",
    TopologyProvision = "TOPOLOGY_PROVISION",
    StreamReplicas = "STREAM_REPLICAS",
    StreamCoreName = "STREAM_CORE_NAME",
    StreamVendorName = "STREAM_VENDOR_NAME",
    StreamDlqName = "STREAM_DLQ_NAME",
    StreamLegacyName = "STREAM_LEGACY_NAME",
    NormalizeRetryBackoffMs = "NORMALIZE_RETRY_BACKOFF_MS",
    MaxPayloadBytes = "MAX_PAYLOAD_BYTES",
    MaxFutureSkewMs = "MAX_FUTURE_SKEW_MS",
    Host = "HOST",
    Port = "PORT",
    MetricsPort = "METRICS_PORT",
    RebindIntervalMs = "REBIND_INTERVAL_MS",
    ConsumerInfoIntervalMs = "CONSUMER_INFO_INTERVAL_MS",
    ShutdownTimeoutMs = "SHUTDOWN_TIMEOUT_MS",
    LogFormat = "LOG_FORMAT",
    /// Read by the log filter (`logging`), not by [`super::Config`].
    RustLog = "RUST_LOG",
}

/// One consumer kind's variables, named from its [`super::kinds::KindSpec`].
#[derive(Debug)]
pub struct KindVars {
    /// In precedence order; the first is the one errors name.
    pub durable: &'static [&'static str],
    pub subject: String,
    /// In precedence order.
    pub dlq: &'static [&'static str],
    pub max_deliver: String,
    pub ack_wait_ms: String,
    pub batch_size: String,
    pub expires_ms: String,
    pub idle_backoff_ms: String,
    pub pull_mode: String,
    pub max_ack_pending: String,
    pub pipeline_depth: String,
}

impl KindVars {
    fn of(kind: ConsumerKind) -> KindVars {
        let spec = kind.spec();
        let var = |suffix: &str| format!("{}_{suffix}", spec.prefix);
        let nvar = |suffix: &str| format!("{}_{suffix}", spec.normalize_prefix);
        KindVars {
            durable: spec.durable_vars,
            subject: nvar("SUBJECT"),
            dlq: spec.dlq_vars,
            max_deliver: nvar("MAX_DELIVER"),
            ack_wait_ms: nvar("ACK_WAIT_MS"),
            batch_size: var("BATCH_SIZE"),
            expires_ms: var("EXPIRES_MS"),
            idle_backoff_ms: var("IDLE_BACKOFF_MS"),
            pull_mode: var("PULL_MODE"),
            max_ack_pending: var("MAX_ACK_PENDING"),
            pipeline_depth: var("PIPELINE_DEPTH"),
        }
    }

    /// Every name, in the order of the reference list.
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.durable.to_vec();
        names.push(&self.subject);
        names.extend_from_slice(self.dlq);
        names.extend(
            [
                &self.max_deliver,
                &self.ack_wait_ms,
                &self.batch_size,
                &self.expires_ms,
                &self.idle_backoff_ms,
                &self.pull_mode,
                &self.max_ack_pending,
                &self.pipeline_depth,
            ]
            .map(String::as_str),
        );
        names
    }
}

/// The per-kind variable names, built once: a `&'static str` into it can name a variable in a
/// [`ConfigError`].
static KIND_VARS: LazyLock<PerKind<KindVars>> = LazyLock::new(|| PerKind::new(KindVars::of));

/// One kind's variables.
pub fn kind_vars(kind: ConsumerKind) -> &'static KindVars {
    &KIND_VARS[kind]
}

/// Every variable the service reads: the service-wide ones, then each consumer kind's. Checked
/// against `.env.example` and docs/CONFIGURATION.md by an integration test.
pub static VARIABLES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let per_kind = ConsumerKind::ALL.into_iter().flat_map(|k| kind_vars(k).names());
    Var::ALL.iter().map(|v| v.name()).chain(per_kind).collect()
});

/// Anything that names a variable.
pub trait Name: Copy {
    fn name(self) -> &'static str;
}

impl Name for Var {
    fn name(self) -> &'static str {
        Var::name(self)
    }
}

impl Name for &'static str {
    fn name(self) -> &'static str {
        self
    }
}

impl Name for &'static String {
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// The service's variables as given: trimmed, an empty one counted as unset.
#[derive(Debug, Default)]
pub(crate) struct Env {
    values: HashMap<&'static str, String>,
    /// The invalid values found so far; reading goes on so that all are reported at once.
    errors: std::cell::RefCell<Vec<ConfigError>>,
    /// The names looked up, for the test that every listed variable is read.
    #[cfg(test)]
    pub(super) read: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Env {
    /// Keeps the listed variables only, so unrelated ones (PATH, …) never matter.
    pub fn new<I: IntoIterator<Item = (String, String)>>(vars: I) -> Result<Env, ConfigError> {
        let mut env = Env::default();
        for (k, v) in vars {
            let Some(name) = VARIABLES.iter().copied().find(|n| *n == k) else {
                continue;
            };
            if env.values.insert(name, v).is_some() {
                return Err(ConfigError::new(
                    "environment",
                    String::new(),
                    format!("duplicate field `{}`", name.to_ascii_lowercase()),
                ));
            }
        }
        Ok(env)
    }

    /// The trimmed value, `None` when unset or blank.
    pub fn get(&self, var: impl Name) -> Option<&str> {
        let name = var.name();
        #[cfg(test)]
        self.read.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
        self.values.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The first set variable among aliases in precedence order, with its name.
    pub fn first_of(&self, vars: &[&'static str]) -> Option<(&'static str, &str)> {
        // Every alias is looked up, set or not (so the read test sees them all).
        let found: Vec<_> = vars.iter().map(|&v| (v, self.get(v))).collect();
        found.into_iter().find_map(|(var, v)| v.map(|v| (var, v)))
    }

    /// Records an invalid value; [`Env::finish`] reports it with all the others.
    pub fn bad(&self, error: ConfigError) {
        self.errors.borrow_mut().push(error);
    }

    /// The parsed value, or `fallback` after recording the error.
    pub fn check<T>(&self, parsed: Result<T, ConfigError>, fallback: T) -> T {
        parsed.unwrap_or_else(|e| {
            self.bad(e);
            fallback
        })
    }

    /// `Ok` when every value read was valid; otherwise all the invalid ones, first one first.
    pub fn finish(&self) -> Result<(), ConfigError> {
        let mut errors = self.errors.take().into_iter();
        match errors.next() {
            None => Ok(()),
            Some(mut first) => {
                first.more.extend(errors);
                Err(first)
            }
        }
    }

    /// A whole number in `min..=max`, `default` when unset (and, recorded, when invalid).
    pub fn num<T>(&self, var: impl Name, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(var) else {
            return default;
        };
        match raw.parse::<T>() {
            Ok(n) if n >= min && n <= max => n,
            _ => {
                self.bad(ConfigError::new(
                    var.name(),
                    format!("{raw:?}"),
                    format!("a whole number from {min} to {max}"),
                ));
                default
            }
        }
    }

    /// Milliseconds in `min..=max`, `default` when unset (and, recorded, when invalid).
    pub fn ms(&self, var: impl Name, default: u64, min: u64, max: u64) -> Duration {
        Duration::from_millis(self.num(var, default, min, max))
    }

    /// One of `accepted` (case-insensitive), `default` when unset (and, recorded, when invalid).
    pub fn choice<T: Copy>(&self, var: impl Name, default: T, accepted: &[(&str, T)]) -> T {
        let Some(raw) = self.get(var) else {
            return default;
        };
        let lower = raw.to_ascii_lowercase();
        match accepted.iter().find(|(name, _)| *name == lower) {
            Some((_, value)) => *value,
            None => {
                self.bad(ConfigError::new(
                    var.name(),
                    format!("{raw:?}"),
                    format!(
                        "one of {}",
                        accepted.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    ),
                ));
                default
            }
        }
    }

    pub fn flag(&self, var: impl Name, default: bool) -> bool {
        self.choice(
            var,
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
}
