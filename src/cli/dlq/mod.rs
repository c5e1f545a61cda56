//! `normalize-service dlq …`: inspect, replay and purge dead letters.
//!
//! Owns the operator side of the dead-letter stream (`STREAM_DLQ_NAME`, `AA_DLQ`): reading dead
//! letters back with their `Dlq-*` headers, republishing the original bytes to the original subject,
//! and deleting them. The publishing side is [`crate::dlq`].
//!
//! Exit codes (scripts rely on them; keep `exit_codes!` and docs/DLQ.md in step):
//! 0 success, 1 operational failure (NATS unreachable, a request timed out, a replay publish or a
//! delete failed), 2 usage or configuration error, 3 not found (the dead-letter stream is missing,
//! or a requested sequence does not exist). When several apply, 1 wins over 3.
//!
//! `letters` reads, replays and deletes (a replay's headers come from [`crate::dlq::replay_headers`]); `print`
//! renders the answers.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use crate::cli::output::{self, Failure, EXIT_CONFIG, EXIT_FAILED, EXIT_NOT_FOUND};
use crate::config::{Config, ConfigError, ConsumerKind};

mod letters;
mod print;

pub use letters::{consumer_of, delete_letter, DeadLetter, Deleted};

use letters::{exit_code_for, Dlq, ItemResult};

/// `dlq list` shows this many dead letters unless `--limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 50;

/// A replay of more dead letters than this needs `--yes` (or a "y" on a terminal).
pub const CONFIRM_OVER: usize = 100;

/// The exit codes of `dlq`, for its `--help` (keep docs/DLQ.md in step).
macro_rules! exit_codes {
    () => {
        "Exit codes: 0 success; 1 operational failure (NATS unreachable, a request timed out, a \
         replay publish or a delete failed); 2 usage or configuration error (also: a replay of \
         more than 100 without --yes outside a terminal); 3 not found (the dead-letter stream is \
         missing or a requested sequence does not exist). 1 wins over 3."
    };
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: sequence, time, consumer, reason, origin, deliveries, error.
    #[command(after_help = concat!("Example:\n  normalize-service dlq list --reason max-deliver --since 2h\n  normalize-service dlq list --limit 0 --json | jq '.deadLetters[].sequence'\n\n", exit_codes!()))]
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most N dead letters (0: all). A footer says how many matched.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
        limit: usize,
        /// Oldest first (default: newest first, so `--limit` shows the latest).
        #[arg(long)]
        oldest: bool,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Headers and body of one dead letter (the body pretty-printed when it is JSON).
    #[command(after_help = concat!("Example:\n  normalize-service dlq show 1234\n\n", exit_codes!()))]
    Show {
        /// Sequence of the dead letter in the dead-letter stream (1 or more).
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        seq: u64,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their original subject with JetStream (awaiting the PubAck).
    ///
    /// The original bytes and headers are sent with `Nats-Msg-Id: replay:<dlq stream>:<seq>` (so a
    /// repeated replay inside the duplicate window is deduplicated) and `Dlq-Replayed-From`. The
    /// store is idempotent and never lets an older `capturedAt` overwrite a newer row, so a replay
    /// cannot duplicate or regress data. The dead letter is kept unless --purge-replayed is given.
    #[command(after_help = concat!("Example:\n  normalize-service dlq replay --reason max-deliver --since 2h --dry-run\n  normalize-service dlq replay --reason max-deliver --since 2h --yes --purge-replayed\n\n", exit_codes!()))]
    Replay {
        #[command(flatten)]
        select: Selection,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// Delete each dead letter once its replay was acknowledged by JetStream.
        #[arg(long)]
        purge_replayed: bool,
        /// Confirm replaying more than 100 dead letters selected by a filter or --all (asked on a
        /// terminal, refused with exit 2 otherwise).
        #[arg(long)]
        yes: bool,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters. Without --yes, only says what would be removed.
    #[command(after_help = concat!("Example:\n  normalize-service dlq purge --consumer oura --reason schema-invalid\n  normalize-service dlq purge --consumer oura --reason schema-invalid --yes\n\n", exit_codes!()))]
    Purge {
        #[command(flatten)]
        select: Selection,
        /// Really delete (otherwise nothing is removed).
        #[arg(long)]
        yes: bool,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Counts of dead letters by consumer and reason.
    #[command(after_help = concat!("Example:\n  normalize-service dlq stats --since 1d\n\n", exit_codes!()))]
    Stats {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters a command applies to; all given filters must match.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only dead letters of this consumer (by dead-letter subject prefix, else `Dlq-Durable`).
    #[arg(long, value_enum)]
    pub consumer: Option<ConsumerKind>,
    /// Only dead letters with this reason (`Dlq-Reason`).
    #[arg(long, value_enum)]
    pub reason: Option<crate::dlq::Reason>,
    /// Only dead letters stored at or after T: RFC 3339 (2025-03-01T00:00:00Z) or a duration ago
    /// (90s, 30m, 2h, 7d, 1w).
    #[arg(long, value_name = "T", value_parser = parse_since)]
    pub since: Option<Since>,
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.consumer.is_none() && self.reason.is_none() && self.since.is_none()
    }
}

/// Either explicit sequences, or filters, or `--all`; never nothing (that would be a footgun).
#[derive(Debug, Clone, Args)]
#[group(id = "selection", required = true, multiple = true, args = ["seqs", "consumer", "reason", "since", "all"])]
pub struct Selection {
    /// Sequences of dead letters in the dead-letter stream (1 or more).
    #[arg(value_name = "SEQ", conflicts_with_all = ["consumer", "reason", "since", "all"],
          value_parser = clap::value_parser!(u64).range(1..))]
    pub seqs: Vec<u64>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Every dead letter in the stream.
    #[arg(long, conflicts_with_all = ["consumer", "reason", "since"])]
    pub all: bool,
}

/// A `--since` bound: an absolute instant, or a duration before "now" (resolved when used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    At(DateTime<Utc>),
    Ago(Duration),
}

impl Since {
    fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Since::At(t) => t,
            Since::Ago(d) => chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }
}

/// A `--since` value that is neither.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is neither an RFC 3339 time nor a duration like 30m, 2h, 7d")]
pub struct InvalidSince {
    input: String,
}

/// RFC 3339, or a duration ([`crate::cli::parse_duration`]: 30m, 2h, 7d, 1w, …).
pub fn parse_since(s: &str) -> Result<Since, InvalidSince> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(t.with_timezone(&Utc)));
    }
    crate::cli::parse_duration(s)
        .map(Since::Ago)
        .ok_or_else(|| InvalidSince { input: s.into() })
}

/// Why a command could not do its job; each variant maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("configuration error")]
    Config(#[from] ConfigError),
    #[error(
        "the dead-letter stream {stream} does not exist on this NATS server (set STREAM_DLQ_NAME if \
         it has another name; the daemon or `topology apply` creates it)"
    )]
    StreamMissing { stream: String },
    #[error("no dead letter with sequence {seq} in {stream}")]
    NotFound { stream: String, seq: u64 },
    #[error(
        "not replaying {count} dead letters without confirmation (more than {CONFIRM_OVER}): \
         check them with `dlq replay … --dry-run`, then re-run with --yes"
    )]
    Unconfirmed { count: usize },
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        servers: String,
        #[source]
        source: crate::cli::server::CommandConnectError,
    },
    #[error("NATS request failed while {doing}")]
    Nats {
        doing: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

impl Failure for DlqError {
    fn exit_code(&self) -> u8 {
        match self {
            DlqError::Config(_) | DlqError::Unconfirmed { .. } => EXIT_CONFIG,
            DlqError::StreamMissing { .. } | DlqError::NotFound { .. } => EXIT_NOT_FOUND,
            DlqError::Connect { .. } | DlqError::Nats { .. } => EXIT_FAILED,
        }
    }
}

impl DlqError {
    fn nats(doing: &'static str, e: impl Into<async_nats::Error>) -> DlqError {
        DlqError::Nats {
            doing,
            source: e.into(),
        }
    }
}

impl DlqCommand {
    fn json(&self) -> bool {
        match self {
            DlqCommand::List { json, .. }
            | DlqCommand::Show { json, .. }
            | DlqCommand::Replay { json, .. }
            | DlqCommand::Purge { json, .. }
            | DlqCommand::Stats { json, .. } => *json,
        }
    }
}

pub async fn run(cmd: DlqCommand) -> ExitCode {
    let json = cmd.json();
    match execute(cmd).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                output::print_json_error(&e);
            }
            output::fail("normalize-service dlq", &e)
        }
    }
}

/// Runs one command; `Ok` carries the exit code of a command that reported per-item results.
async fn execute(cmd: DlqCommand) -> Result<u8, DlqError> {
    let config = Config::from_env()?;
    let client = crate::cli::server::connect_command(&config.nats)
        .await
        .map_err(|source| DlqError::Connect {
            servers: crate::nats::servers(&config.nats),
            source,
        })?;
    let js = jetstream::new(client.clone());
    let dlq = Dlq::open(&js, &config).await?;
    let code = match cmd {
        DlqCommand::List {
            filter,
            limit,
            oldest,
            json,
        } => {
            let mut letters = dlq.scan(&filter).await?;
            let total = letters.len();
            if !oldest {
                letters.reverse();
            }
            if limit > 0 {
                letters.truncate(limit);
            }
            print::list(&dlq.name, &letters, total, json);
            0
        }
        DlqCommand::Show { seq, json } => {
            let letter = dlq.get(seq).await?.ok_or_else(|| DlqError::NotFound {
                stream: dlq.name.clone(),
                seq,
            })?;
            print::show(&letter, json);
            0
        }
        DlqCommand::Stats { filter, json } => {
            let letters = dlq.scan(&filter).await?;
            print::stats(&dlq.name, &letters, json);
            0
        }
        DlqCommand::Replay {
            select,
            dry_run,
            purge_replayed,
            yes,
            json,
        } => {
            let (letters, missing) = dlq.select(&select).await?;
            // Sequences named one by one are already explicit; a filter or --all is not.
            let by_filter = select.seqs.is_empty();
            if by_filter && !dry_run && !yes && letters.len() > CONFIRM_OVER && !confirmed(letters.len()) {
                return Err(DlqError::Unconfirmed { count: letters.len() });
            }
            let mut results: Vec<ItemResult> = missing.iter().map(|&s| ItemResult::not_found(s)).collect();
            let mut lost = false;
            for l in &letters {
                results.push(if dry_run {
                    ItemResult::planned(l, "would-replay")
                } else if !connected(&client, &mut lost).await {
                    ItemResult::not_attempted(l)
                } else {
                    dlq.replay(&js, l, purge_replayed).await
                });
            }
            results.sort_by_key(|r| r.dlq_sequence);
            print::results("replay", &dlq.name, &results, json);
            exit_code_for(&results)
        }
        DlqCommand::Purge { select, yes, json } => {
            let (letters, missing) = dlq.select(&select).await?;
            let mut results: Vec<ItemResult> = missing.iter().map(|&s| ItemResult::not_found(s)).collect();
            let mut lost = false;
            for l in &letters {
                results.push(if !yes {
                    ItemResult::planned(l, "would-purge")
                } else if !connected(&client, &mut lost).await {
                    ItemResult::not_attempted(l)
                } else {
                    dlq.purge(l).await
                });
            }
            results.sort_by_key(|r| r.dlq_sequence);
            print::results("purge", &dlq.name, &results, json);
            if !yes && !letters.is_empty() && !json {
                output::eprint_line("nothing was removed: add --yes to purge these dead letters");
            }
            exit_code_for(&results)
        }
    };
    // Replays and deletes are already acknowledged; this only makes the goodbye tidy (and is
    // skipped when the connection is gone).
    if client.connection_state() != async_nats::connection::State::Connected {
        return Ok(code);
    }
    if let Err(e) = client.drain().await {
        tracing::debug!(error = %e, "draining the connection failed");
    }
    Ok(code)
}

/// Whether the connection is up, or comes back within [`RECONNECT_GRACE`] (a blip: a rolling
/// restart, a move to another cluster node). Once it is lost for longer, a long replay or purge
/// stops and reports the rest as not attempted (`lost` is set, the rest are not waited for),
/// instead of waiting out each request's timeout (5 s) for every remaining letter.
async fn connected(client: &async_nats::Client, lost: &mut bool) -> bool {
    if *lost {
        return false;
    }
    let up = || client.connection_state() == async_nats::connection::State::Connected;
    let deadline = tokio::time::Instant::now() + RECONNECT_GRACE;
    while !up() {
        if tokio::time::Instant::now() >= deadline {
            *lost = true;
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    true
}

/// How long a replay or purge waits for a lost connection to come back before it stops.
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks on the terminal whether to go on with `count` dead letters; `false` when stdin is not a
/// terminal (a script must say `--yes`) or the answer is not yes.
fn confirmed(count: usize) -> bool {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return false;
    }
    let mut err = std::io::stderr();
    if write!(err, "replay {count} dead letters? [y/N] ")
        .and_then(|()| err.flush())
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    if stdin.lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim(), "y" | "Y" | "yes")
}

#[cfg(test)]
mod tests;
