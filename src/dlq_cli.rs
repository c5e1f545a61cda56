//! `normalize-service dlq …`: inspect, replay and purge dead letters.
//!
//! Owns the operator side of the dead-letter stream (`STREAM_DLQ_NAME`, `AA_DLQ`): reading dead
//! letters back with their `Dlq-*` headers, republishing the original bytes to the original subject,
//! and deleting them. The publishing side is [`crate::dlq`].
//!
//! Exit codes (scripts rely on them; keep `EXIT_CODES_HELP` and docs/DLQ.md in step):
//! 0 success, 1 operational failure (NATS unreachable, a request timed out, a replay publish or a
//! delete failed), 2 usage or configuration error, 3 not found (the dead-letter stream is missing,
//! or a requested sequence does not exist). When several apply, 1 wins over 3.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, message::StreamMessage, stream::Stream};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, ConfigError, ConsumerKind, NatsConfig};
use crate::dlq::{
    REPLAYED_FROM, REPLAY_ORIGINAL_MSG_ID, REPLAY_ORIGINAL_SEQUENCE, REPLAY_ORIGINAL_STREAM,
    REPLAY_ORIGINAL_TIMESTAMP,
};

const EXIT_CODES_HELP: &str = "Exit codes: 0 success; 1 operational failure (NATS unreachable, a \
request timed out, a replay publish or a delete failed); 2 usage or configuration error; 3 not \
found (the dead-letter stream is missing or a requested sequence does not exist). 1 wins over 3.";

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter: sequence, time, consumer, reason, origin, deliveries, error.
    #[command(after_help = EXIT_CODES_HELP)]
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most N dead letters (the oldest matching first).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Headers and body of one dead letter (the body pretty-printed when it is JSON).
    #[command(after_help = EXIT_CODES_HELP)]
    Show {
        /// Sequence of the dead letter in the dead-letter stream.
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
    #[command(after_help = EXIT_CODES_HELP)]
    Replay {
        #[command(flatten)]
        select: Selection,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// Delete each dead letter once its replay was acknowledged by JetStream.
        #[arg(long)]
        purge_replayed: bool,
        /// Print one JSON document on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters. Without --yes, only says what would be removed.
    #[command(after_help = EXIT_CODES_HELP)]
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
    #[command(after_help = EXIT_CODES_HELP)]
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
    pub consumer: Option<ConsumerArg>,
    /// Only dead letters with this reason (`Dlq-Reason`).
    #[arg(long, value_enum)]
    pub reason: Option<ReasonArg>,
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
    /// Sequences of dead letters in the dead-letter stream.
    #[arg(value_name = "SEQ", conflicts_with_all = ["consumer", "reason", "since", "all"])]
    pub seqs: Vec<u64>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Every dead letter in the stream.
    #[arg(long, conflicts_with_all = ["consumer", "reason", "since"])]
    pub all: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsumerArg {
    Hrv,
    Sleep,
    Oura,
}

impl ConsumerArg {
    fn kind(self) -> ConsumerKind {
        match self {
            ConsumerArg::Hrv => ConsumerKind::Hrv,
            ConsumerArg::Sleep => ConsumerKind::Sleep,
            ConsumerArg::Oura => ConsumerKind::Oura,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReasonArg {
    SchemaInvalid,
    NonRetryable,
    MaxDeliver,
}

impl ReasonArg {
    fn as_str(self) -> &'static str {
        match self {
            ReasonArg::SchemaInvalid => "schema-invalid",
            ReasonArg::NonRetryable => "non-retryable",
            ReasonArg::MaxDeliver => "max-deliver",
        }
    }
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

/// RFC 3339, or `<n><unit>` with unit s, m, h, d or w.
pub fn parse_since(s: &str) -> Result<Since, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Since::At(t.with_timezone(&Utc)));
    }
    let invalid = || format!("{s:?} is neither an RFC 3339 time nor a duration like 30m, 2h, 7d");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| invalid())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(invalid()),
    };
    n.checked_mul(secs)
        .map(|s| Since::Ago(Duration::from_secs(s)))
        .ok_or_else(invalid)
}

/// Why a command could not do its job; each variant maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("configuration error: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "the dead-letter stream {stream} does not exist on this NATS server (set STREAM_DLQ_NAME if \
         it has another name; the daemon or `topology apply` creates it)"
    )]
    StreamMissing { stream: String },
    #[error("no dead letter with sequence {seq} in {stream}")]
    NotFound { stream: String, seq: u64 },
    #[error("cannot connect to NATS at {servers}: {source}")]
    Connect {
        servers: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("NATS request failed while {doing}: {source}")]
    Nats {
        doing: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

impl DlqError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DlqError::Config(_) => 2,
            DlqError::StreamMissing { .. } | DlqError::NotFound { .. } => 3,
            DlqError::Connect { .. } | DlqError::Nats { .. } => 1,
        }
    }

    fn nats(doing: &'static str, e: impl Into<async_nats::Error>) -> DlqError {
        DlqError::Nats {
            doing,
            source: e.into(),
        }
    }
}

pub async fn run(cmd: DlqCommand) -> ExitCode {
    match execute(cmd).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("normalize-service dlq: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Runs one command; `Ok` carries the exit code of a command that reported per-item results.
async fn execute(cmd: DlqCommand) -> Result<u8, DlqError> {
    let config = Config::from_env()?;
    let client = connect(&config.nats).await?;
    let js = jetstream::new(client.clone());
    let dlq = Dlq::open(&js, &config).await?;
    let code = match cmd {
        DlqCommand::List { filter, limit, json } => {
            let mut letters = dlq.scan(&filter).await?;
            if let Some(n) = limit {
                letters.truncate(n);
            }
            print_list(&dlq.name, &letters, json);
            0
        }
        DlqCommand::Show { seq, json } => {
            let letter = dlq.get(seq).await?.ok_or_else(|| DlqError::NotFound {
                stream: dlq.name.clone(),
                seq,
            })?;
            print_show(&letter, json);
            0
        }
        DlqCommand::Stats { filter, json } => {
            let letters = dlq.scan(&filter).await?;
            print_stats(&dlq.name, &letters, json);
            0
        }
        DlqCommand::Replay {
            select,
            dry_run,
            purge_replayed,
            json,
        } => {
            let (letters, missing) = dlq.select(&select).await?;
            let mut results: Vec<ItemResult> = missing.iter().map(|&s| ItemResult::not_found(s)).collect();
            for l in &letters {
                results.push(if dry_run {
                    ItemResult::planned(l, "would-replay")
                } else {
                    dlq.replay(&js, l, purge_replayed).await
                });
            }
            results.sort_by_key(|r| r.dlq_sequence);
            print_results("replay", &dlq.name, &results, json);
            exit_code_for(&results)
        }
        DlqCommand::Purge { select, yes, json } => {
            let (letters, missing) = dlq.select(&select).await?;
            let mut results: Vec<ItemResult> = missing.iter().map(|&s| ItemResult::not_found(s)).collect();
            for l in &letters {
                results.push(if yes {
                    dlq.purge(l).await
                } else {
                    ItemResult::planned(l, "would-purge")
                });
            }
            results.sort_by_key(|r| r.dlq_sequence);
            print_results("purge", &dlq.name, &results, json);
            if !yes && !letters.is_empty() && !json {
                eprintln!("nothing was removed: add --yes to purge these dead letters");
            }
            exit_code_for(&results)
        }
    };
    // Replays and deletes are already acknowledged; this only makes the goodbye tidy.
    let _ = client.drain().await;
    Ok(code)
}

/// Connects once, without the daemon's endless retry: an operator command should fail fast.
/// Connects as the daemon does ([`crate::app::connect_nats`]: credentials in `NATS_URL`, the
/// explicit variables, the TLS CA check), then waits briefly for the connection: an operator
/// command needs an answer now, not a background reconnect.
async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, DlqError> {
    let servers = cfg
        .urls
        .iter()
        .map(|u| crate::redact::redact_url(u))
        .collect::<Vec<_>>()
        .join(",");
    let fail = |source: anyhow::Error| DlqError::Connect {
        servers: servers.clone(),
        source,
    };
    let client = crate::app::connect_nats(cfg).await.map_err(fail)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.connection_state() != State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(fail(anyhow::anyhow!("not connected within 5 s")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(client)
}

/// One dead letter as read back from the stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub subject: String,
    pub consumer: Option<ConsumerKind>,
    pub headers: HeaderMap,
    pub payload: bytes::Bytes,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// `Dlq-Reason`, else the last token of the dead-letter subject.
    pub fn reason(&self) -> &str {
        self.header("Dlq-Reason")
            .unwrap_or_else(|| self.subject.rsplit('.').next().unwrap_or(""))
    }

    fn consumer_str(&self) -> &'static str {
        self.consumer.map(|c| c.as_str()).unwrap_or("unknown")
    }

    fn summary(&self) -> Summary<'_> {
        Summary {
            sequence: self.seq,
            time: rfc3339(self.time),
            subject: &self.subject,
            consumer: self.consumer_str(),
            reason: self.reason(),
            original_subject: self.header("Dlq-Original-Subject"),
            original_stream: self.header("Dlq-Original-Stream"),
            original_sequence: self.header("Dlq-Original-Sequence").and_then(|s| s.parse().ok()),
            durable: self.header("Dlq-Durable"),
            delivery_count: self.header("Dlq-Delivery-Count").and_then(|s| s.parse().ok()),
            failed_at: self.header("Dlq-Failed-At"),
            error: self.header("Dlq-Error"),
            size: self.payload.len(),
        }
    }

    fn matches(&self, f: &FilterArgs, since: Option<DateTime<Utc>>) -> bool {
        f.consumer.is_none_or(|c| self.consumer == Some(c.kind()))
            && f.reason.is_none_or(|r| self.reason() == r.as_str())
            && since.is_none_or(|t| self.time >= t)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary<'a> {
    sequence: u64,
    time: String,
    subject: &'a str,
    consumer: &'a str,
    reason: &'a str,
    original_subject: Option<&'a str>,
    original_stream: Option<&'a str>,
    original_sequence: Option<u64>,
    durable: Option<&'a str>,
    delivery_count: Option<u64>,
    failed_at: Option<&'a str>,
    error: Option<&'a str>,
    size: usize,
}

/// Which consumer a dead letter belongs to: the longest configured `<prefix>.` its subject starts
/// with, else the consumer whose durable is in `Dlq-Durable`.
pub fn consumer_of(config: &Config, subject: &str, durable: Option<&str>) -> Option<ConsumerKind> {
    config
        .consumers
        .iter()
        .filter(|c| {
            subject
                .strip_prefix(c.dlq_prefix.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .max_by_key(|c| c.dlq_prefix.len())
        .or_else(|| {
            let d = durable?;
            config.consumers.iter().find(|c| c.durable == d)
        })
        .map(|c| c.kind)
}

/// Headers a replay must not carry: the dead letter's own identity and bookkeeping, and publish
/// expectations that were meant for the first publish.
fn replay_drops(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "nats-msg-id" || lower.starts_with("dlq-") || lower.starts_with("nats-expected-")
}

/// The message a replay publishes: the original headers, a deduplicating id derived from the
/// dead letter, where it came from, and the event's first origin (`Replay-Original-Msg-Id`,
/// `-Stream`, `-Sequence`, `-Timestamp`), which the consumer uses as the event's identity, position
/// and default time ([`crate::dlq::event_origin`]). Each is the letter's inherited
/// `Replay-Original-*` header when it has one (the letter of a replay inherits the replay's
/// headers), else its `Dlq-Original-*` one, so the first origin survives any number of
/// dead-letter/replay rounds.
pub fn replay_headers(dead: &HeaderMap, dlq_stream: &str, dlq_seq: u64) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in dead.iter() {
        if replay_drops(name.as_ref()) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    let header = |name: &str| {
        dead.get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    // The letter of a replay: its `Dlq-Original-Msg-Id` may be the replay's own id (letters
    // written before dead letters kept the event's identity), never the event's.
    let of_a_replay = dead.get(REPLAYED_FROM).is_some();
    let msg_id = header(REPLAY_ORIGINAL_MSG_ID).or_else(|| {
        if of_a_replay {
            None
        } else {
            header("Dlq-Original-Msg-Id")
        }
    });
    if let Some(id) = msg_id {
        out.insert(REPLAY_ORIGINAL_MSG_ID, id);
    }
    for (replay_name, dlq_name) in [
        (REPLAY_ORIGINAL_STREAM, "Dlq-Original-Stream"),
        (REPLAY_ORIGINAL_SEQUENCE, "Dlq-Original-Sequence"),
        (REPLAY_ORIGINAL_TIMESTAMP, "Dlq-Original-Timestamp"),
    ] {
        if let Some(v) = header(replay_name).or_else(|| header(dlq_name)) {
            out.insert(replay_name, v);
        }
    }
    out.insert("Nats-Msg-Id", format!("replay:{dlq_stream}:{dlq_seq}").as_str());
    out.insert(REPLAYED_FROM, format!("{dlq_stream}:{dlq_seq}").as_str());
    out
}

/// Kept here for callers of its first home; it belongs to the daemon side ([`crate::dlq`]).
pub use crate::dlq::idempotency_msg_id;

struct Dlq {
    name: String,
    stream: Stream,
    config: Config,
}

impl Dlq {
    async fn open(js: &jetstream::Context, config: &Config) -> Result<Dlq, DlqError> {
        let name = config.streams.dlq.clone();
        match js.get_stream(&name).await {
            Ok(stream) => Ok(Dlq {
                name,
                stream,
                config: config.clone(),
            }),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Err(DlqError::StreamMissing { stream: name })
                }
                _ => Err(DlqError::nats("looking up the dead-letter stream", e)),
            },
        }
    }

    fn letter(&self, m: StreamMessage) -> DeadLetter {
        let time = DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond())
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let subject = m.subject.to_string();
        let consumer = consumer_of(
            &self.config,
            &subject,
            m.headers.get("Dlq-Durable").map(|v| v.as_str()),
        );
        DeadLetter {
            seq: m.sequence,
            time,
            subject,
            consumer,
            headers: m.headers,
            payload: m.payload,
        }
    }

    async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, DlqError> {
        match self.stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(self.letter(m))),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(DlqError::nats("reading a dead letter", e)),
        }
    }

    /// Every dead letter that matches, in sequence order. One request per stored message:
    /// `next_by_subject` skips deleted sequences server-side.
    async fn scan(&self, filter: &FilterArgs) -> Result<Vec<DeadLetter>, DlqError> {
        let since = filter.since.map(|s| s.resolve(Utc::now()));
        let mut stream = self.stream.clone();
        let state = stream
            .info()
            .await
            .map_err(|e| DlqError::nats("reading the dead-letter stream's state", e))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let mut seq = state.first_sequence;
        while seq <= state.last_sequence {
            let got = self
                .stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(">")
                .send()
                .await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(DlqError::nats("reading dead letters", e)),
            };
            if m.sequence > state.last_sequence {
                break;
            }
            seq = m.sequence + 1;
            let l = self.letter(m);
            if l.matches(filter, since) {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// The dead letters a replay or purge applies to, and the requested sequences that are absent.
    async fn select(&self, s: &Selection) -> Result<(Vec<DeadLetter>, Vec<u64>), DlqError> {
        if s.seqs.is_empty() {
            // clap guarantees filters or --all here.
            debug_assert!(s.all || !s.filter.is_empty());
            return Ok((self.scan(&s.filter).await?, Vec::new()));
        }
        let mut seqs = s.seqs.clone();
        seqs.sort_unstable();
        seqs.dedup();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for seq in seqs {
            match self.get(seq).await? {
                Some(l) => found.push(l),
                None => missing.push(seq),
            }
        }
        Ok((found, missing))
    }

    async fn replay(&self, js: &jetstream::Context, l: &DeadLetter, purge: bool) -> ItemResult {
        let mut r = ItemResult::planned(l, "replayed");
        let Some(subject) = l.header("Dlq-Original-Subject").map(str::to_string) else {
            r.result = "failed";
            r.error = Some("no Dlq-Original-Subject header: the original subject is unknown".into());
            return r;
        };
        let headers = replay_headers(&l.headers, &self.name, l.seq);
        let msg = PublishMessage::build()
            .payload(l.payload.clone())
            .headers(headers);
        let acked = match js.send_publish(subject, msg).await {
            Ok(ack) => ack.await.map_err(async_nats::Error::from),
            Err(e) => Err(e.into()),
        };
        match acked {
            Ok(ack) => {
                if ack.duplicate {
                    r.result = "duplicate";
                }
                r.replayed_to = Some(Replayed {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                });
                if purge {
                    match self.stream.delete_message(l.seq).await {
                        Ok(_) => r.purged = true,
                        Err(e) => {
                            r.result = "failed";
                            r.error = Some(format!("replayed, but deleting the dead letter failed: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                r.result = "failed";
                r.error = Some(format!(
                    "publish to {} failed: {e}",
                    r.original_subject.as_deref().unwrap_or("?")
                ));
            }
        }
        r
    }

    async fn purge(&self, l: &DeadLetter) -> ItemResult {
        let mut r = ItemResult::planned(l, "purged");
        match self.stream.delete_message(l.seq).await {
            Ok(_) => r.purged = true,
            Err(e) => {
                r.result = "failed";
                r.error = Some(format!("delete failed: {e}"));
            }
        }
        r
    }
}

/// What happened to one selected dead letter.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemResult {
    dlq_sequence: u64,
    /// `replayed`, `duplicate` (JetStream had this replay id already), `purged`, `would-replay`,
    /// `would-purge`, `not-found` or `failed`.
    result: &'static str,
    consumer: Option<&'static str>,
    reason: Option<String>,
    original_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed_to: Option<Replayed>,
    purged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Replayed {
    stream: String,
    sequence: u64,
    duplicate: bool,
}

impl ItemResult {
    fn planned(l: &DeadLetter, result: &'static str) -> ItemResult {
        ItemResult {
            dlq_sequence: l.seq,
            result,
            consumer: Some(l.consumer_str()),
            reason: Some(l.reason().to_string()),
            original_subject: l.header("Dlq-Original-Subject").map(str::to_string),
            replayed_to: None,
            purged: false,
            error: None,
        }
    }

    fn not_found(seq: u64) -> ItemResult {
        ItemResult {
            dlq_sequence: seq,
            result: "not-found",
            consumer: None,
            reason: None,
            original_subject: None,
            replayed_to: None,
            purged: false,
            error: Some("no dead letter with this sequence".into()),
        }
    }
}

/// 1 if anything failed, else 3 if a requested sequence was absent, else 0.
fn exit_code_for(results: &[ItemResult]) -> u8 {
    if results.iter().any(|r| r.result == "failed") {
        1
    } else if results.iter().any(|r| r.result == "not-found") {
        3
    } else {
        0
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn one_line(s: &str, max: usize) -> String {
    let flat = crate::dlq::header_safe(s, usize::MAX);
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn print_list(stream: &str, letters: &[DeadLetter], json: bool) {
    if json {
        let items: Vec<Summary<'_>> = letters.iter().map(DeadLetter::summary).collect();
        println!(
            "{}",
            json!({"stream": stream, "count": items.len(), "deadLetters": items})
        );
        return;
    }
    if letters.is_empty() {
        println!("no dead letters in {stream} match");
        return;
    }
    println!(
        "{:>8}  {:<24}  {:<8}  {:<14}  {:<45}  {:>5}  ERROR",
        "SEQ", "TIME", "CONSUMER", "REASON", "ORIGINAL (subject stream:seq)", "DELIV"
    );
    for l in letters {
        let s = l.summary();
        let origin = format!(
            "{} {}:{}",
            s.original_subject.unwrap_or("?"),
            s.original_stream.unwrap_or("?"),
            s.original_sequence
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into())
        );
        println!(
            "{:>8}  {:<24}  {:<8}  {:<14}  {:<45}  {:>5}  {}",
            s.sequence,
            s.time,
            s.consumer,
            s.reason,
            origin,
            s.delivery_count
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            one_line(s.error.unwrap_or(""), 160)
        );
    }
}

/// The body for display: parsed JSON when it is JSON, else text, else hex.
fn body_view(payload: &[u8]) -> (&'static str, Value) {
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        return ("json", v);
    }
    match std::str::from_utf8(payload) {
        Ok(s) => ("text", Value::String(s.to_string())),
        Err(_) => {
            let mut hex = String::with_capacity(payload.len() * 2);
            for b in payload {
                let _ = write!(hex, "{b:02x}");
            }
            ("hex", Value::String(hex))
        }
    }
}

fn headers_json(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    h.iter()
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.as_str().to_string()).collect()))
        .collect()
}

fn print_show(l: &DeadLetter, json: bool) {
    let (encoding, body) = body_view(&l.payload);
    if json {
        println!(
            "{}",
            json!({
                "summary": l.summary(),
                "headers": headers_json(&l.headers),
                "bodyEncoding": encoding,
                "body": body,
            })
        );
        return;
    }
    println!("Sequence: {}", l.seq);
    println!("Stored:   {}", rfc3339(l.time));
    println!("Subject:  {}", l.subject);
    println!("Consumer: {}", l.consumer_str());
    println!("Size:     {} bytes", l.payload.len());
    println!();
    for (name, values) in headers_json(&l.headers) {
        for v in values {
            println!("{name}: {v}");
        }
    }
    println!();
    match (encoding, body) {
        ("json", v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        ("text", Value::String(s)) => println!("{s}"),
        (_, Value::String(hex)) => println!("(not UTF-8; hex) {hex}"),
        (_, v) => println!("{v}"),
    }
}

fn print_stats(stream: &str, letters: &[DeadLetter], json: bool) {
    let mut by: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for l in letters {
        *by.entry(l.consumer_str())
            .or_default()
            .entry(l.reason())
            .or_default() += 1;
    }
    let first = letters.first().map(|l| rfc3339(l.time));
    let last = letters.last().map(|l| rfc3339(l.time));
    if json {
        println!(
            "{}",
            json!({"stream": stream, "total": letters.len(), "byConsumer": by, "oldest": first, "newest": last})
        );
        return;
    }
    println!("{} dead letters in {stream}", letters.len());
    if let (Some(f), Some(l)) = (first, last) {
        println!("oldest {f}, newest {l}");
    }
    for (consumer, reasons) in &by {
        for (reason, n) in reasons {
            println!("{consumer:<8} {reason:<16} {n:>8}");
        }
    }
}

fn print_results(action: &str, stream: &str, results: &[ItemResult], json: bool) {
    if json {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for r in results {
            *counts.entry(r.result).or_default() += 1;
        }
        println!(
            "{}",
            json!({"stream": stream, "action": action, "counts": counts, "results": results})
        );
        return;
    }
    if results.is_empty() {
        println!("no dead letters in {stream} match: nothing to {action}");
        return;
    }
    for r in results {
        let mut line = format!("{:>8}  {:<12}", r.dlq_sequence, r.result);
        if let Some(s) = &r.original_subject {
            let _ = write!(line, "  {s}");
        }
        if let Some(to) = &r.replayed_to {
            let _ = write!(line, "  -> {}:{}", to.stream, to.sequence);
        }
        if r.purged && action == "replay" {
            line.push_str("  (dead letter purged)");
        }
        if let Some(e) = &r.error {
            let _ = write!(line, "  error: {}", one_line(e, 200));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_rfc3339_and_durations() {
        assert_eq!(parse_since("30m"), Ok(Since::Ago(Duration::from_secs(1800))));
        assert_eq!(parse_since("2h"), Ok(Since::Ago(Duration::from_secs(7200))));
        assert_eq!(parse_since("7d"), Ok(Since::Ago(Duration::from_secs(7 * 86400))));
        assert_eq!(parse_since("1w"), Ok(Since::Ago(Duration::from_secs(7 * 86400))));
        assert_eq!(parse_since("90s"), Ok(Since::Ago(Duration::from_secs(90))));
        let t = DateTime::parse_from_rfc3339("2025-03-01T02:00:00+02:00").unwrap();
        assert_eq!(
            parse_since("2025-03-01T02:00:00+02:00"),
            Ok(Since::At(t.with_timezone(&Utc)))
        );
        for bad in [
            "",
            "m",
            "5",
            "5x",
            "-5m",
            "2025-03-01",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn since_ago_is_relative_to_now() {
        let now = DateTime::parse_from_rfc3339("2025-03-02T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            rfc3339(Since::Ago(Duration::from_secs(86400)).resolve(now)),
            "2025-03-01T00:00:00.000Z"
        );
        assert_eq!(
            Since::Ago(Duration::from_secs(u64::MAX)).resolve(now),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[test]
    fn consumer_is_found_by_prefix_then_durable() {
        let c = Config::from_vars([
            ("NORMALIZE_HRV_DLQ_SUBJECT".to_string(), "dlq.a".to_string()),
            ("NORMALIZE_SLEEP_DLQ_SUBJECT".to_string(), "dlq.a.b".to_string()),
        ])
        .unwrap();
        assert_eq!(
            consumer_of(&c, "dlq.a.max-deliver", None),
            Some(ConsumerKind::Hrv)
        );
        assert_eq!(
            consumer_of(&c, "dlq.a.b.max-deliver", None),
            Some(ConsumerKind::Sleep)
        );
        assert_eq!(
            consumer_of(&c, "dlq.vendor.oura.webhook.schema-invalid", None),
            Some(ConsumerKind::Oura)
        );
        // "dlq.ab" is not under "dlq.a".
        assert_eq!(consumer_of(&c, "dlq.ab.x", None), None);
        assert_eq!(
            consumer_of(&c, "dlq.moved.x", Some("normalize-oura")),
            Some(ConsumerKind::Oura)
        );
        assert_eq!(consumer_of(&c, "dlq.moved.x", Some("someone-else")), None);
    }

    #[test]
    fn replay_headers_keep_the_original_and_drop_bookkeeping() {
        let mut dead = HeaderMap::new();
        dead.insert("Nats-Msg-Id", "dlq:AA_CORE_HOT:7");
        dead.insert("Dlq-Reason", "max-deliver");
        dead.insert("Dlq-Original-Msg-Id", "ingest-42");
        dead.insert("dlq-error", "lower-case too");
        dead.insert("Nats-Expected-Last-Sequence", "3");
        dead.insert("Trace-Id", "t1");
        dead.append("Multi", "a");
        dead.append("Multi", "b");
        let h = replay_headers(&dead, "AA_DLQ", 12);
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "replay:AA_DLQ:12");
        assert_eq!(h.get("Dlq-Replayed-From").unwrap().as_str(), "AA_DLQ:12");
        assert_eq!(h.get("Replay-Original-Msg-Id").unwrap().as_str(), "ingest-42");
        assert_eq!(h.get("Trace-Id").unwrap().as_str(), "t1");
        assert_eq!(h.get_all("Multi").count(), 2);
        for gone in [
            "Dlq-Reason",
            "Dlq-Original-Msg-Id",
            "dlq-error",
            "Nats-Expected-Last-Sequence",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn replays_are_keyed_by_the_first_publishers_id() {
        let mut first = HeaderMap::new();
        first.insert("Nats-Msg-Id", "ingest-42");
        assert_eq!(idempotency_msg_id(Some(&first)), Some("ingest-42"));
        assert_eq!(idempotency_msg_id(None), None);
        let mut dead = HeaderMap::new();
        dead.insert("Dlq-Original-Msg-Id", "ingest-42");
        let replay = replay_headers(&dead, "AA_DLQ", 3);
        assert_eq!(idempotency_msg_id(Some(&replay)), Some("ingest-42"));
        let anonymous = replay_headers(&HeaderMap::new(), "AA_DLQ", 4);
        assert_eq!(idempotency_msg_id(Some(&anonymous)), None);
    }

    /// The dead letter the daemon writes for `msg` (stream AA_CORE_HOT unless replayed elsewhere).
    fn letter_of(msg: &HeaderMap, stream: &str, seq: u64, published: &str) -> HeaderMap {
        let origin = crate::dlq::Origin {
            subject: "athlete-ally.sleep.raw-received",
            stream,
            seq,
            durable: "d",
            delivered: 1,
            published: DateTime::parse_from_rfc3339(published)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        };
        crate::dlq::dead_letter_headers(Some(msg), &origin, crate::dlq::Reason::NonRetryable, "e")
    }

    #[test]
    fn the_first_origin_survives_two_rounds() {
        let mut first = HeaderMap::new();
        first.insert("Nats-Msg-Id", "ingest-42");
        first.insert("Trace-Id", "t1");
        let first_at = "2025-03-01T06:00:00.123456789Z";
        let letter1 = letter_of(&first, "AA_CORE_HOT", 17, first_at);
        assert_eq!(letter1.get("Dlq-Original-Timestamp").unwrap().as_str(), first_at);
        let replay1 = replay_headers(&letter1, "AA_DLQ", 3);
        let expected = [
            (REPLAY_ORIGINAL_MSG_ID, "ingest-42"),
            (REPLAY_ORIGINAL_STREAM, "AA_CORE_HOT"),
            (REPLAY_ORIGINAL_SEQUENCE, "17"),
            (REPLAY_ORIGINAL_TIMESTAMP, first_at),
        ];
        for (name, value) in expected {
            assert_eq!(
                replay1.get(name).map(|v| v.as_str()),
                Some(value),
                "round 1 {name}"
            );
        }
        // The replay is stored at AA_CORE_HOT:90 an hour later and dead-lettered again.
        let letter2 = letter_of(&replay1, "AA_CORE_HOT", 90, "2025-03-01T07:00:00Z");
        assert_eq!(letter2.get("Dlq-Original-Msg-Id").unwrap().as_str(), "ingest-42");
        assert_eq!(letter2.get("Dlq-Original-Sequence").unwrap().as_str(), "90");
        let replay2 = replay_headers(&letter2, "AA_DLQ", 8);
        for (name, value) in expected {
            assert_eq!(
                replay2.get(name).map(|v| v.as_str()),
                Some(value),
                "round 2 {name}"
            );
            assert_eq!(replay2.get_all(name).count(), 1, "{name} repeated");
        }
        assert_eq!(replay2.get("Nats-Msg-Id").unwrap().as_str(), "replay:AA_DLQ:8");
        assert_eq!(replay2.get(REPLAYED_FROM).unwrap().as_str(), "AA_DLQ:8");
        assert_eq!(replay2.get("Trace-Id").unwrap().as_str(), "t1");
        let published = DateTime::parse_from_rfc3339("2025-03-01T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let origin = crate::dlq::event_origin(Some(&replay2), "AA_CORE_HOT", 120, published);
        assert_eq!(origin.stream, "AA_CORE_HOT");
        assert_eq!(origin.seq, 17);
        assert_eq!(crate::dlq::precise_time(origin.time), first_at);
        assert_eq!(origin.msg_id.as_deref(), Some("ingest-42"));

        // Without a publisher's id, no round invents one (least of all `replay:…`).
        let anonymous = HeaderMap::new();
        let letter1 = letter_of(&anonymous, "AA_CORE_HOT", 18, first_at);
        let replay1 = replay_headers(&letter1, "AA_DLQ", 4);
        let letter2 = letter_of(&replay1, "AA_CORE_HOT", 91, "2025-03-01T07:00:00Z");
        let replay2 = replay_headers(&letter2, "AA_DLQ", 9);
        assert!(replay2.get(REPLAY_ORIGINAL_MSG_ID).is_none());
        assert_eq!(replay2.get(REPLAY_ORIGINAL_SEQUENCE).unwrap().as_str(), "18");
        assert_eq!(idempotency_msg_id(Some(&replay2)), None);

        // A letter written before dead letters kept the event's identity: its
        // Dlq-Original-Msg-Id is the replay's own id, and it is not taken for the event's.
        let mut old = HeaderMap::new();
        old.insert(REPLAYED_FROM, "AA_DLQ:4");
        old.insert("Dlq-Original-Msg-Id", "replay:AA_DLQ:4");
        assert!(replay_headers(&old, "AA_DLQ", 10)
            .get(REPLAY_ORIGINAL_MSG_ID)
            .is_none());
    }

    #[test]
    fn body_view_prefers_json_then_text_then_hex() {
        assert_eq!(body_view(br#"{"a":1}"#).0, "json");
        assert_eq!(body_view(b"{broken").0, "text");
        assert_eq!(body_view(&[0xff, 0x00]), ("hex", Value::String("ff00".into())));
    }

    #[test]
    fn failures_outrank_not_found() {
        let r = |result| ItemResult {
            dlq_sequence: 1,
            result,
            consumer: None,
            reason: None,
            original_subject: None,
            replayed_to: None,
            purged: false,
            error: None,
        };
        assert_eq!(exit_code_for(&[r("replayed"), r("duplicate")]), 0);
        assert_eq!(exit_code_for(&[r("replayed"), r("not-found")]), 3);
        assert_eq!(exit_code_for(&[r("not-found"), r("failed")]), 1);
    }
}
