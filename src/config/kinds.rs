//! The event types this service consumes: [`ConsumerKind`], and the table ([`KindSpec`]) that
//! every per-kind thing is derived from — the consumer set, each consumer's variables and
//! defaults, and its message counter.
//!
//! Adding an event type is a variant in [`consumer_kinds!`] below, its [`KindSpec`] in
//! [`ConsumerKind::spec`], a file in `pipeline/`, a table in `store/` and a migration; the
//! compiler names every other place (no match on the kind has a wildcard arm).

use std::fmt;
use std::ops::Index;

use super::StreamRole;

/// Declares [`ConsumerKind`] and [`ConsumerKind::ALL`] from one list, so the consumer set cannot
/// leave a kind out.
macro_rules! consumer_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)+) => {
        /// The event types this service consumes, one consumer each. The value names are those
        /// of metric labels, `/health` and the CLI (`--consumer`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
        pub enum ConsumerKind {
            $($(#[doc = $doc])* #[value(name = $name)] $variant,)+
        }

        impl ConsumerKind {
            /// Every kind, in declaration order (which is also their order as map keys).
            pub const ALL: [ConsumerKind; [$($name),+].len()] = [$(ConsumerKind::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ConsumerKind::$variant => $name,)+
                }
            }
        }
    };
}

consumer_kinds! {
    /// Raw HRV readings.
    Hrv = "hrv",
    /// Raw sleep records.
    Sleep = "sleep",
    /// Oura vendor webhooks (stored raw; their HRV and sleep sections are derived).
    Oura = "oura",
}

impl ConsumerKind {
    /// The kind's position in [`ConsumerKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Everything about the kind that is not code: names, defaults, stream.
    pub const fn spec(self) -> &'static KindSpec {
        match self {
            ConsumerKind::Hrv => &HRV,
            ConsumerKind::Sleep => &SLEEP,
            ConsumerKind::Oura => &OURA,
        }
    }
}

impl fmt::Display for ConsumerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One consumer kind's row of the table. Its variables are `<durable_vars>`,
/// `<normalize_prefix>_SUBJECT`, `<dlq_vars>`, `<normalize_prefix>_MAX_DELIVER` and
/// `_ACK_WAIT_MS`, and `<prefix>_BATCH_SIZE`, `_EXPIRES_MS`, `_IDLE_BACKOFF_MS`, `_PULL_MODE`,
/// `_MAX_ACK_PENDING`, `_PIPELINE_DEPTH` (see [`super::vars`]).
#[derive(Debug)]
pub struct KindSpec {
    /// The stream the consumer's subject lives on in multi-stream mode.
    pub primary: StreamRole,
    /// Prefix of the pull knobs (`HRV` → `HRV_BATCH_SIZE`).
    pub prefix: &'static str,
    /// Prefix of the subject and delivery variables (`NORMALIZE_HRV` → `NORMALIZE_HRV_SUBJECT`).
    pub normalize_prefix: &'static str,
    /// The variables naming the durable, in precedence order (older names included); the first
    /// is the one errors name.
    pub durable_vars: &'static [&'static str],
    pub durable_default: &'static str,
    pub subject_default: &'static str,
    /// The variables naming the dead-letter subject prefix, in precedence order.
    pub dlq_vars: &'static [&'static str],
    pub dlq_default: &'static str,
    pub ack_wait_default_ms: u64,
    /// What the help text of `normalize_<kind>_messages_total` calls its messages.
    pub messages: &'static str,
}

static HRV: KindSpec = KindSpec {
    primary: StreamRole::Core,
    prefix: "HRV",
    normalize_prefix: "NORMALIZE_HRV",
    durable_vars: &["HRV_DURABLE", "NORMALIZE_HRV_DURABLE"],
    durable_default: "normalize-hrv-durable",
    subject_default: "athlete-ally.hrv.raw-received",
    dlq_vars: &["NORMALIZE_HRV_DLQ_SUBJECT"],
    dlq_default: "dlq.normalize.hrv.raw-received",
    ack_wait_default_ms: 60_000,
    messages: "HRV",
};

static SLEEP: KindSpec = KindSpec {
    primary: StreamRole::Core,
    prefix: "SLEEP",
    normalize_prefix: "NORMALIZE_SLEEP",
    durable_vars: &["NORMALIZE_SLEEP_DURABLE"],
    durable_default: "normalize-sleep-durable",
    subject_default: "athlete-ally.sleep.raw-received",
    dlq_vars: &["NORMALIZE_SLEEP_DLQ_SUBJECT"],
    dlq_default: "dlq.normalize.sleep.raw-received",
    ack_wait_default_ms: 60_000,
    messages: "Sleep",
};

static OURA: KindSpec = KindSpec {
    primary: StreamRole::Vendor,
    prefix: "OURA",
    normalize_prefix: "NORMALIZE_OURA",
    durable_vars: &["NORMALIZE_OURA_DURABLE", "NORMALIZE_DURABLE_NAME"],
    durable_default: "normalize-oura",
    subject_default: "vendor.oura.webhook.received",
    dlq_vars: &["NORMALIZE_OURA_DLQ_SUBJECT", "NORMALIZE_DLQ_SUBJECT"],
    dlq_default: "dlq.vendor.oura.webhook",
    ack_wait_default_ms: 15_000,
    messages: "Oura webhook",
};

/// One value per consumer kind (a metric per kind, a counter per kind, …), built from
/// [`ConsumerKind::ALL`] so none is missing, and indexed by kind without a lookup that can fail.
#[derive(Debug, Clone)]
pub struct PerKind<T>(Vec<T>);

impl<T> PerKind<T> {
    pub fn new(f: impl FnMut(ConsumerKind) -> T) -> PerKind<T> {
        PerKind(ConsumerKind::ALL.into_iter().map(f).collect())
    }

    pub fn try_new<E>(f: impl FnMut(ConsumerKind) -> Result<T, E>) -> Result<PerKind<T>, E> {
        ConsumerKind::ALL
            .into_iter()
            .map(f)
            .collect::<Result<_, _>>()
            .map(PerKind)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ConsumerKind, &T)> {
        ConsumerKind::ALL.into_iter().zip(&self.0)
    }
}

impl<T> Index<ConsumerKind> for PerKind<T> {
    type Output = T;

    fn index(&self, kind: ConsumerKind) -> &T {
        // `new`/`try_new` hold one value per kind, in `ALL` order.
        &self.0[kind.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_kind_at_its_index() {
        for (i, kind) in ConsumerKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
        let names = PerKind::new(ConsumerKind::as_str);
        assert_eq!(names[ConsumerKind::Oura], "oura");
        assert_eq!(names.iter().count(), ConsumerKind::ALL.len());
    }

    #[test]
    fn cli_values_are_the_kind_names() {
        use clap::ValueEnum;
        for kind in ConsumerKind::ALL {
            let value = kind.to_possible_value().map(|v| v.get_name().to_string());
            assert_eq!(value.as_deref(), Some(kind.as_str()));
            assert_eq!(ConsumerKind::from_str(kind.as_str(), false), Ok(kind));
        }
    }

    #[test]
    fn every_kind_has_its_own_names() {
        let specs: Vec<&KindSpec> = ConsumerKind::ALL.into_iter().map(ConsumerKind::spec).collect();
        for (i, a) in specs.iter().enumerate() {
            for b in &specs[i + 1..] {
                assert_ne!(a.prefix, b.prefix);
                assert_ne!(a.normalize_prefix, b.normalize_prefix);
                assert_ne!(a.subject_default, b.subject_default);
                assert!(a.durable_vars.iter().all(|v| !b.durable_vars.contains(v)));
                assert!(a.dlq_vars.iter().all(|v| !b.dlq_vars.contains(v)));
            }
            assert!(!a.durable_vars.is_empty() && !a.dlq_vars.is_empty());
        }
    }
}
