//! Operator commands: `topology apply|status` and `migrate plan|phase0..3|rollback|verify`.
//!
//! The 1 → 3 stream migration moves subjects between streams. JetStream refuses overlapping
//! subjects (10065), so a subject moves only by removing it from the old stream, then adding it
//! to the new one; publishes in between (about a millisecond) fail with "no responders" and
//! must be retried by the publisher with the same `Nats-Msg-Id`. Durables can be created on the
//! new stream only once it holds the subject (10093 on 2.9). Every step is idempotent: it looks
//! at the current state and does only what is missing.
//!
//! Phases:
//! - phase0: create `AA_DLQ`, and `AA_CORE_HOT` / `AA_VENDOR_HOT` parked on a placeholder subject
//!   (their own name), so the later moves are two quick stream updates.
//! - phase1: move `vendor.>` legacy → `AA_VENDOR_HOT`, create the oura durable there.
//! - phase2: move `athlete-ally.>`, `sleep.*` legacy → `AA_CORE_HOT`, create hrv/sleep durables.
//! - phase3: delete the legacy stream once it holds no subjects, no consumer has anything pending
//!   and no message is newer than the quiet period.
//! - rollback phase2 / phase1: the reverse moves; the new durables are kept (never deleted), and
//!   a multi-mode daemon drains them.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use clap::{Args, Subcommand, ValueEnum};
use futures::TryStreamExt;
use serde::Serialize;

use crate::config::{Config, ConsumerConfig, ConsumerKind, StreamMode, StreamNames, StreamRole};
use crate::topology::{self, StreamSpec};

// ------------------------------------------------------------------------------------------
// CLI surface

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Single,
    Multi,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Create or update streams and durables to the spec tables (never deletes); shows the diff
    /// first and refuses changes that would overlap another stream's subjects.
    Apply {
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Replicas for the streams (default: STREAM_REPLICAS).
        #[arg(long)]
        replicas: Option<usize>,
        /// Show the diff and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Streams, consumers, and the migration phase this state corresponds to.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct StepArgs {
    /// Show what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm a step that moves subjects or deletes a stream.
    #[arg(long)]
    pub yes: bool,
    #[arg(long)]
    pub json: bool,
    /// Skip the end-to-end probe (publish a probe event, see its row and the durable's ack floor).
    #[arg(long)]
    pub no_probe: bool,
    /// Seconds to wait for the probe's row.
    #[arg(long, default_value_t = 30)]
    pub probe_timeout: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PhaseArg {
    Phase0,
    Phase1,
    Phase2,
    Phase3,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RollbackArg {
    Phase1,
    Phase2,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// The current phase and the next command.
    Plan {
        #[arg(long)]
        json: bool,
    },
    /// Create AA_DLQ and park AA_CORE_HOT / AA_VENDOR_HOT on placeholder subjects.
    Phase0(StepArgs),
    /// Move vendor.> to AA_VENDOR_HOT and create the oura durable there.
    Phase1(StepArgs),
    /// Move athlete-ally.> and sleep.* to AA_CORE_HOT and create the hrv/sleep durables there.
    Phase2(StepArgs),
    /// Delete the drained, quiet legacy stream.
    Phase3 {
        #[command(flatten)]
        step: StepArgs,
        /// Refuse while the legacy stream has a message newer than this (e.g. 14d, 2h, 0s).
        #[arg(long, default_value = "14d")]
        quiet_period: String,
    },
    /// Reverse a subject move (the new durables are kept until drained).
    Rollback {
        #[arg(value_enum)]
        phase: RollbackArg,
        #[command(flatten)]
        step: StepArgs,
    },
    /// Run a phase's checks alone.
    Verify {
        #[arg(value_enum)]
        phase: PhaseArg,
        #[command(flatten)]
        step: StepArgs,
    },
}

/// Exit codes scripts can rely on.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
/// Refused: a pre-check failed, an overlap, or confirmation (`--yes`) missing.
pub const EXIT_REFUSED: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Nats(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl OpsError {
    fn code(&self) -> u8 {
        match self {
            OpsError::Config(_) => EXIT_CONFIG,
            OpsError::Refused(_) => EXIT_REFUSED,
            OpsError::Nats(_) | OpsError::Failed(_) => EXIT_FAILED,
        }
    }
}

fn nats_err(context: &str) -> impl Fn(&dyn std::fmt::Display) -> OpsError + '_ {
    move |e| OpsError::Nats(format!("{context}: {e}"))
}

struct Ctx {
    config: Config,
    js: jetstream::Context,
    client: async_nats::Client,
}

async fn ctx() -> Result<Ctx, OpsError> {
    let config = Config::from_env()?;
    let client = crate::app::connect_nats(&config.nats)
        .await
        .map_err(|e| OpsError::Nats(format!("{e:#}")))?;
    // Operator commands need an answer now, not a background reconnect.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.connection_state() != async_nats::connection::State::Connected {
        if Instant::now() > deadline {
            return Err(OpsError::Nats("NATS unreachable (NATS_URL)".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = jetstream::new(client.clone());
    Ok(Ctx { config, js, client })
}

fn finish<T: Serialize>(result: Result<Report<T>, OpsError>, json: bool) -> ExitCode {
    match result {
        Ok(report) => {
            if json {
                use std::io::Write;
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => {
                        let _ = writeln!(std::io::stdout().lock(), "{s}");
                    }
                    Err(e) => eprintln!("cannot encode report: {e}"),
                }
            } else {
                report.print();
            }
            ExitCode::from(report.exit)
        }
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            }
            eprintln!("normalize-service: {e}");
            ExitCode::from(e.code())
        }
    }
}

pub async fn topology(cmd: TopologyCommand) -> ExitCode {
    match cmd {
        TopologyCommand::Apply {
            mode,
            replicas,
            dry_run,
            json,
        } => finish(apply(mode, replicas, dry_run).await, json),
        TopologyCommand::Status { json } => finish(status().await, json),
    }
}

pub async fn migrate(cmd: MigrateCommand) -> ExitCode {
    match cmd {
        MigrateCommand::Plan { json } => finish(plan().await, json),
        MigrateCommand::Phase0(a) => {
            let json = a.json;
            finish(step(Step::Phase0, a, Duration::ZERO).await, json)
        }
        MigrateCommand::Phase1(a) => {
            let json = a.json;
            finish(step(Step::Phase1, a, Duration::ZERO).await, json)
        }
        MigrateCommand::Phase2(a) => {
            let json = a.json;
            finish(step(Step::Phase2, a, Duration::ZERO).await, json)
        }
        MigrateCommand::Phase3 {
            step: a,
            quiet_period,
        } => {
            let json = a.json;
            match parse_duration(&quiet_period) {
                Some(q) => finish(step(Step::Phase3, a, q).await, json),
                None => finish::<()>(
                    Err(OpsError::Refused(format!(
                        "--quiet-period {quiet_period:?}: expected a duration like 14d, 2h, 30m, 0s"
                    ))),
                    json,
                ),
            }
        }
        MigrateCommand::Rollback { phase, step: a } => {
            let json = a.json;
            let s = match phase {
                RollbackArg::Phase1 => Step::Rollback1,
                RollbackArg::Phase2 => Step::Rollback2,
            };
            finish(step(s, a, Duration::ZERO).await, json)
        }
        MigrateCommand::Verify { phase, step: a } => {
            let json = a.json;
            finish(verify_only(phase, a).await, json)
        }
    }
}

/// `14d`, `2h`, `30m`, `45s`, `0s`, `0`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

// ------------------------------------------------------------------------------------------
// State and phases (pure)

/// Subjects of each existing stream (by name).
pub type Subjects = BTreeMap<String, Vec<String>>;

pub fn core_subjects() -> Vec<String> {
    vec!["athlete-ally.>".into(), "sleep.*".into()]
}

pub fn vendor_subjects() -> Vec<String> {
    vec!["vendor.>".into()]
}

/// The subject a parked stream holds: its own name (JetStream's default), which overlaps nothing.
pub fn placeholder(name: &str) -> Vec<String> {
    vec![name.to_string()]
}

fn holds_all(state: &Subjects, stream: &str, subjects: &[String]) -> bool {
    state
        .get(stream)
        .is_some_and(|have| subjects.iter().all(|s| have.contains(s)))
}

fn holds_any(state: &Subjects, stream: &str, subjects: &[String]) -> bool {
    state
        .get(stream)
        .is_some_and(|have| subjects.iter().any(|s| have.contains(s)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No streams at all: a new installation (`topology apply`).
    Empty,
    /// The legacy stream holds everything; phase0 not done.
    Legacy,
    /// phase0 done: new streams parked, DLQ present.
    Prepared,
    /// phase1 done: vendor.> on the vendor stream.
    VendorMoved,
    /// phase2 done: everything on the new streams; the legacy stream still exists.
    CoreMoved,
    /// phase3 done: the legacy stream is gone.
    Migrated,
    /// Anything else; the text says what is odd.
    Mixed(String),
}

impl Phase {
    pub fn describe(&self) -> String {
        match self {
            Phase::Empty => "no streams yet (new installation)".into(),
            Phase::Legacy => "legacy single-stream topology; phase0 not run".into(),
            Phase::Prepared => "phase0 done: new streams parked, AA_DLQ present".into(),
            Phase::VendorMoved => "phase1 done: vendor.> on the vendor stream".into(),
            Phase::CoreMoved => {
                "phase2 done: all subjects on the new streams; legacy stream still present".into()
            }
            Phase::Migrated => "phase3 done: three-stream topology".into(),
            Phase::Mixed(why) => format!("mixed state: {why}"),
        }
    }

    pub fn next_command(&self) -> Option<&'static str> {
        match self {
            Phase::Empty => Some("normalize-service topology apply --mode multi"),
            Phase::Legacy => Some("normalize-service migrate phase0"),
            Phase::Prepared => Some("normalize-service migrate phase1 --yes"),
            Phase::VendorMoved => Some("normalize-service migrate phase2 --yes"),
            Phase::CoreMoved => Some("normalize-service migrate phase3 --yes (after the legacy durables drain and the quiet period)"),
            Phase::Migrated => None,
            Phase::Mixed(_) => None,
        }
    }
}

pub fn classify(state: &Subjects, n: &StreamNames) -> Phase {
    let core = core_subjects();
    let vendor = vendor_subjects();
    let legacy_exists = state.contains_key(&n.legacy);
    let new_exist =
        state.contains_key(&n.core) && state.contains_key(&n.vendor) && state.contains_key(&n.dlq);
    if state.is_empty() {
        return Phase::Empty;
    }
    let core_on_legacy = holds_all(state, &n.legacy, &core);
    let vendor_on_legacy = holds_all(state, &n.legacy, &vendor);
    let core_on_new = holds_all(state, &n.core, &core);
    let vendor_on_new = holds_all(state, &n.vendor, &vendor);
    match (
        legacy_exists,
        core_on_legacy,
        vendor_on_legacy,
        core_on_new,
        vendor_on_new,
    ) {
        (true, true, true, false, false) => {
            if new_exist {
                Phase::Prepared
            } else {
                Phase::Legacy
            }
        }
        (true, true, false, false, true) => Phase::VendorMoved,
        (true, false, false, true, true)
            if !holds_any(state, &n.legacy, &[core.clone(), vendor.clone()].concat()) =>
        {
            Phase::CoreMoved
        }
        (false, _, _, true, true) => Phase::Migrated,
        (true, false, true, true, false) => Phase::Mixed(format!(
            "core subjects on {} but vendor.> still on {}: run `migrate phase1` or `migrate rollback phase2`",
            n.core, n.legacy
        )),
        _ => Phase::Mixed(format!("unexpected subject ownership: {state:?}")),
    }
}

/// Which migration step moves a subject off the legacy stream.
pub fn step_for_subject(subject: &str) -> &'static str {
    if vendor_subjects().iter().any(|s| s == subject) {
        "normalize-service migrate phase1"
    } else {
        "normalize-service migrate phase2"
    }
}

// ------------------------------------------------------------------------------------------
// Reports

#[derive(Debug, Serialize)]
pub struct Item {
    pub what: String,
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct Report<T: Serialize> {
    pub command: String,
    pub ok: bool,
    #[serde(skip)]
    pub exit: u8,
    pub phase_before: Option<Phase>,
    pub phase_after: Option<Phase>,
    pub actions: Vec<Item>,
    pub checks: Vec<Item>,
    pub data: Option<T>,
    pub next: Option<String>,
}

impl<T: Serialize> Report<T> {
    fn new(command: &str) -> Report<T> {
        Report {
            command: command.into(),
            ok: true,
            exit: EXIT_OK,
            phase_before: None,
            phase_after: None,
            actions: Vec::new(),
            checks: Vec::new(),
            data: None,
            next: None,
        }
    }

    fn action(&mut self, what: impl Into<String>, status: impl Into<String>) {
        self.actions.push(Item {
            what: what.into(),
            status: status.into(),
        });
    }

    fn check(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        self.checks.push(Item {
            what: what.into(),
            status: if ok {
                format!("ok {detail}")
            } else {
                format!("FAILED {detail}")
            },
        });
        if !ok {
            self.ok = false;
            if self.exit == EXIT_OK {
                self.exit = EXIT_FAILED;
            }
        }
    }

    fn refuse(&mut self, why: impl Into<String>) {
        self.ok = false;
        self.exit = EXIT_REFUSED;
        self.checks.push(Item {
            what: "refused".into(),
            status: why.into(),
        });
    }

    /// Human-readable output. Write errors (a closed pipe such as `| head`) are ignored
    /// rather than panicking.
    fn print(&self) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}: {}", self.command, if self.ok { "ok" } else { "NOT OK" });
        if let Some(p) = &self.phase_before {
            let _ = writeln!(out, "  phase before: {}", p.describe());
        }
        for a in &self.actions {
            let _ = writeln!(out, "  action  {} — {}", a.what, a.status);
        }
        for c in &self.checks {
            let _ = writeln!(out, "  check   {} — {}", c.what, c.status);
        }
        if let Some(p) = &self.phase_after {
            let _ = writeln!(out, "  phase after:  {}", p.describe());
        }
        if let Some(d) = &self.data {
            if let Ok(s) = serde_json::to_string_pretty(d) {
                let _ = writeln!(out, "{s}");
            }
        }
        if let Some(n) = &self.next {
            let _ = writeln!(out, "  next: {n}");
        }
    }
}

// ------------------------------------------------------------------------------------------
// Reading the server

async fn stream_infos(js: &jetstream::Context) -> Result<Vec<stream::Info>, OpsError> {
    js.streams()
        .try_collect()
        .await
        .map_err(|e| OpsError::Nats(format!("listing streams: {e}")))
}

async fn subjects_state(js: &jetstream::Context) -> Result<Subjects, OpsError> {
    Ok(stream_infos(js)
        .await?
        .into_iter()
        .map(|i| (i.config.name, i.config.subjects))
        .collect())
}

async fn consumer_infos(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<jetstream::consumer::Info>, OpsError> {
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| nats_err("get stream")(&e))?;
    s.consumers()
        .try_collect()
        .await
        .map_err(|e| OpsError::Nats(format!("listing consumers of {stream}: {e}")))
}

// ------------------------------------------------------------------------------------------
// topology status / apply

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub subjects: Vec<String>,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub first_time: Option<String>,
    pub last_seq: u64,
    pub last_time: Option<String>,
    pub replicas: usize,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub filter_subject: String,
    pub pending: u64,
    pub ack_pending: usize,
    pub redelivered: usize,
    pub ack_floor: u64,
    pub last_active: Option<String>,
}

fn fmt_time(t: async_nats::datetime::DateTime) -> String {
    chrono::DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

async fn status() -> Result<Report<Vec<StreamStatus>>, OpsError> {
    let c = ctx().await?;
    let mut report = Report::new("topology status");
    let mut out = Vec::new();
    for info in stream_infos(&c.js).await? {
        let consumers = consumer_infos(&c.js, &info.config.name)
            .await?
            .into_iter()
            .map(|ci| ConsumerStatus {
                name: ci.name,
                filter_subject: ci.config.filter_subject,
                pending: ci.num_pending,
                ack_pending: ci.num_ack_pending,
                redelivered: ci.num_redelivered,
                ack_floor: ci.ack_floor.stream_sequence,
                last_active: ci.ack_floor.last_active.map(fmt_time),
            })
            .collect();
        out.push(StreamStatus {
            name: info.config.name.clone(),
            subjects: info.config.subjects.clone(),
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            first_time: (info.state.messages > 0).then(|| fmt_time(info.state.first_timestamp)),
            last_seq: info.state.last_sequence,
            last_time: (info.state.messages > 0).then(|| fmt_time(info.state.last_timestamp)),
            replicas: info.config.num_replicas,
            consumers,
        });
    }
    let state: Subjects = out.iter().map(|s| (s.name.clone(), s.subjects.clone())).collect();
    let phase = classify(&state, &c.config.streams);
    report.next = phase.next_command().map(String::from);
    report.phase_after = Some(phase);
    report.data = Some(out);
    Ok(report)
}

/// How an existing stream differs from its spec, for the fields that can change in place.
fn stream_drift(have: &stream::Config, want: &StreamSpec) -> Vec<String> {
    let mut d = Vec::new();
    let mut hs = have.subjects.clone();
    let mut ws = want.subjects.clone();
    hs.sort();
    ws.sort();
    if hs != ws {
        d.push(format!("subjects {:?} → {:?}", have.subjects, want.subjects));
    }
    if have.max_age != want.max_age {
        d.push(format!("max_age {:?} → {:?}", have.max_age, want.max_age));
    }
    if have.num_replicas != want.replicas {
        d.push(format!("replicas {} → {}", have.num_replicas, want.replicas));
    }
    if have.duplicate_window != Duration::from_secs(120) {
        d.push(format!("duplicate_window {:?} → 120s", have.duplicate_window));
    }
    if have.discard != stream::DiscardPolicy::Old {
        d.push("discard → old".into());
    }
    d
}

fn consumer_stream<'a>(config: &'a Config, mode: StreamMode, cc: &ConsumerConfig) -> &'a str {
    match mode {
        StreamMode::Single => &config.streams.legacy,
        StreamMode::Multi => config.streams.primary(cc.primary),
    }
}

async fn apply(mode: ModeArg, replicas: Option<usize>, dry_run: bool) -> Result<Report<()>, OpsError> {
    let c = ctx().await?;
    let mode = match mode {
        ModeArg::Single => StreamMode::Single,
        ModeArg::Multi => StreamMode::Multi,
    };
    let replicas = replicas.unwrap_or(c.config.replicas);
    let mut report = Report::new(&format!("topology apply --mode {}", mode.as_str()));
    let infos = stream_infos(&c.js).await?;
    let existing: Vec<topology::ExistingStream> = infos
        .iter()
        .map(|i| topology::ExistingStream {
            name: i.config.name.clone(),
            subjects: i.config.subjects.clone(),
        })
        .collect();
    let state: Subjects = existing
        .iter()
        .map(|e| (e.name.clone(), e.subjects.clone()))
        .collect();
    report.phase_before = Some(classify(&state, &c.config.streams));

    // Plan everything first; refuse the whole apply on any overlap.
    enum Change {
        Create(StreamSpec),
        Update(StreamSpec),
    }
    let mut changes = Vec::new();
    for spec in topology::stream_specs(mode, &c.config.streams, replicas) {
        for subject in &spec.subjects {
            if let Some(holder) = topology::holder_of(&existing, subject, &spec.name) {
                let step =
                    if holder.name == c.config.streams.legacy {
                        format!(
                            "run `{}` (see `normalize-service migrate plan`)",
                            step_for_subject(subject)
                        )
                    } else if spec.name == c.config.streams.legacy {
                        format!(
                        "this is a migrated topology: `normalize-service migrate rollback {}` moves it back",
                        if vendor_subjects().contains(subject) { "phase1" } else { "phase2" }
                    )
                    } else {
                        "move it with the `normalize-service migrate` steps".to_string()
                    };
                report.refuse(format!(
                    "subject {subject} is held by stream {}; giving it to {} would overlap (JetStream error 10065): {step}",
                    holder.name, spec.name
                ));
            }
        }
        match infos.iter().find(|i| i.config.name == spec.name) {
            None => {
                report.action(
                    format!(
                        "+ create stream {} subjects={:?} max_age={}h replicas={}",
                        spec.name,
                        spec.subjects,
                        spec.max_age.as_secs() / 3600,
                        spec.replicas
                    ),
                    "planned",
                );
                changes.push(Change::Create(spec));
            }
            Some(info) => {
                let drift = stream_drift(&info.config, &spec);
                if info.config.storage != stream::StorageType::File
                    || info.config.retention != stream::RetentionPolicy::Limits
                {
                    report.refuse(format!(
                        "stream {} has storage {:?} / retention {:?}; these cannot change in place",
                        spec.name, info.config.storage, info.config.retention
                    ));
                }
                if drift.is_empty() {
                    report.action(format!("= stream {}", spec.name), "up to date");
                } else {
                    report.action(
                        format!("~ update stream {}: {}", spec.name, drift.join(", ")),
                        "planned",
                    );
                    changes.push(Change::Update(spec));
                }
            }
        }
    }
    for cc in &c.config.consumers {
        let stream = consumer_stream(&c.config, mode, cc);
        let exists = match c.js.get_stream(stream).await {
            Ok(s) => s.consumer_info(&cc.durable).await.is_ok(),
            Err(_) => false,
        };
        if exists {
            report.action(
                format!("= durable {} on {stream}", cc.durable),
                "exists (left as is)",
            );
        } else {
            report.action(
                format!(
                    "+ create durable {} on {stream} filter={}",
                    cc.durable, cc.filter_subject
                ),
                "planned",
            );
        }
    }
    if report.exit == EXIT_REFUSED {
        report.action("nothing changed", "refused");
        return Ok(report);
    }
    if dry_run {
        report.action("dry run", "nothing changed");
        return Ok(report);
    }
    for change in changes {
        let (verb, spec) = match &change {
            Change::Create(s) => ("create", s),
            Change::Update(s) => ("update", s),
        };
        let result = match change {
            Change::Create(ref s) => {
                c.js.create_stream(s.to_config())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Change::Update(ref s) => {
                c.js.update_stream(s.to_config())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        match result {
            Ok(()) => report.action(format!("{verb} stream {}", spec.name), "done"),
            Err(e) => report.check(format!("{verb} stream {}", spec.name), false, e),
        }
    }
    for cc in &c.config.consumers {
        let stream = consumer_stream(&c.config, mode, cc).to_string();
        ensure_durable(&c, cc, &stream, &mut report).await;
    }
    let state = subjects_state(&c.js).await?;
    report.phase_after = Some(classify(&state, &c.config.streams));
    Ok(report)
}

/// Creates the durable on `stream` when absent; never changes an existing one.
async fn ensure_durable<T: Serialize>(c: &Ctx, cc: &ConsumerConfig, stream: &str, report: &mut Report<T>) {
    let s = match c.js.get_stream(stream).await {
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
        report.action(format!("durable {} on {stream}", cc.durable), "exists");
        return;
    }
    match s.create_consumer(topology::durable_config(cc)).await {
        Ok(_) => report.action(format!("create durable {} on {stream}", cc.durable), "done"),
        Err(e) => report.check(
            format!("create durable {} on {stream}", cc.durable),
            false,
            e.to_string(),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// migrate

async fn plan() -> Result<Report<()>, OpsError> {
    let c = ctx().await?;
    let state = subjects_state(&c.js).await?;
    let phase = classify(&state, &c.config.streams);
    let mut report = Report::new("migrate plan");
    report.next = phase.next_command().map(String::from);
    if let Phase::Mixed(_) = phase {
        report.ok = false;
        report.exit = EXIT_REFUSED;
    }
    report.phase_after = Some(phase);
    Ok(report)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Phase0,
    Phase1,
    Phase2,
    Phase3,
    Rollback1,
    Rollback2,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Phase0 => "migrate phase0",
            Step::Phase1 => "migrate phase1",
            Step::Phase2 => "migrate phase2",
            Step::Phase3 => "migrate phase3",
            Step::Rollback1 => "migrate rollback phase1",
            Step::Rollback2 => "migrate rollback phase2",
        }
    }

    /// The subject group a move step handles, the new stream's role, and the consumers it concerns.
    fn group(self) -> Option<(Vec<String>, StreamRole)> {
        match self {
            Step::Phase1 | Step::Rollback1 => Some((vendor_subjects(), StreamRole::Vendor)),
            Step::Phase2 | Step::Rollback2 => Some((core_subjects(), StreamRole::Core)),
            _ => None,
        }
    }
}

fn consumers_of(config: &Config, role: StreamRole) -> Vec<&ConsumerConfig> {
    config.consumers.iter().filter(|c| c.primary == role).collect()
}

async fn step(step: Step, args: StepArgs, quiet: Duration) -> Result<Report<()>, OpsError> {
    let c = ctx().await?;
    let n = c.config.streams.clone();
    let mut report = Report::new(step.name());
    let state = subjects_state(&c.js).await?;
    let before = classify(&state, &n);
    report.phase_before = Some(before.clone());
    let destructive = !matches!(step, Step::Phase0);
    let confirm_needed = destructive && !args.yes && !args.dry_run;

    match step {
        Step::Phase0 => {
            if !state.contains_key(&n.legacy) && !matches!(before, Phase::Migrated) {
                report.refuse(format!("legacy stream {} not found: nothing to migrate from (new installation: `normalize-service topology apply --mode multi`)", n.legacy));
                return Ok(report);
            }
            let replicas = c.config.replicas;
            for (spec, parked) in [
                (topology::dlq_spec(&n, replicas), false),
                (topology::core_spec(&n, replicas), true),
                (topology::vendor_spec(&n, replicas), true),
            ] {
                if state.contains_key(&spec.name) {
                    report.action(format!("stream {}", spec.name), "exists");
                    continue;
                }
                let mut spec = spec;
                if parked {
                    spec.subjects = placeholder(&spec.name);
                }
                if args.dry_run {
                    report.action(
                        format!("create stream {} subjects={:?}", spec.name, spec.subjects),
                        "dry run",
                    );
                    continue;
                }
                match c.js.create_stream(spec.to_config()).await {
                    Ok(_) => report.action(
                        format!("create stream {} subjects={:?}", spec.name, spec.subjects),
                        "done",
                    ),
                    Err(e) => report.check(format!("create stream {}", spec.name), false, e.to_string()),
                }
            }
        }
        Step::Phase1 | Step::Phase2 | Step::Rollback1 | Step::Rollback2 => {
            let Some((group, role)) = step.group() else {
                return Err(OpsError::Failed("internal: step without subject group".into()));
            };
            let forward = matches!(step, Step::Phase1 | Step::Phase2);
            let new_stream = n.primary(role).to_string();
            let (from, to) = if forward {
                (n.legacy.clone(), new_stream.clone())
            } else {
                (new_stream.clone(), n.legacy.clone())
            };
            // Pre-checks.
            if !state.contains_key(&n.dlq) {
                report.refuse(format!(
                    "{} missing: run `normalize-service migrate phase0` first",
                    n.dlq
                ));
                return Ok(report);
            }
            if !state.contains_key(&to) {
                report.refuse(format!(
                    "stream {to} missing: {}",
                    if forward { "run `normalize-service migrate phase0` first" } else { "cannot roll back to a deleted legacy stream; recreate it with `topology apply --mode single` after moving subjects off the new streams" }
                ));
                return Ok(report);
            }
            if step == Step::Phase2 && !holds_all(&state, &n.vendor, &vendor_subjects()) {
                report.refuse(
                    "vendor.> is not on the vendor stream yet: run `normalize-service migrate phase1` first",
                );
                return Ok(report);
            }
            if step == Step::Rollback1 && holds_all(&state, &n.core, &core_subjects()) {
                report.refuse("core subjects are on the core stream: run `normalize-service migrate rollback phase2` first");
                return Ok(report);
            }
            let already = holds_all(&state, &to, &group) && !holds_any(&state, &from, &group);
            if already {
                report.action(format!("subjects {group:?} already on {to}"), "nothing to move");
            } else {
                if let Some((other, _)) = state.iter().find(|(name, subs)| {
                    **name != from
                        && **name != to
                        && group
                            .iter()
                            .any(|g| subs.iter().any(|s| topology::patterns_overlap(s, g)))
                }) {
                    report.refuse(format!(
                        "subjects {group:?} overlap stream {other}, which this migration does not manage"
                    ));
                    return Ok(report);
                }
                if confirm_needed {
                    report.refuse(format!(
                        "moving {group:?} from {from} to {to} makes publishes to them fail for about a millisecond (publishers retry with the same Nats-Msg-Id); re-run with --yes (or --dry-run)"
                    ));
                    return Ok(report);
                }
                let from_subjects: Vec<String> = state
                    .get(&from)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| !group.contains(s))
                    .collect();
                let from_subjects = if from_subjects.is_empty() {
                    placeholder(&from)
                } else {
                    from_subjects
                };
                let mut to_subjects: Vec<String> = state
                    .get(&to)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|s| *s != to)
                    .collect();
                for g in &group {
                    if !to_subjects.contains(g) {
                        to_subjects.push(g.clone());
                    }
                }
                report.action(
                    format!("1. {from}: subjects → {from_subjects:?}"),
                    if args.dry_run { "dry run" } else { "pending" },
                );
                report.action(
                    format!("2. {to}: subjects → {to_subjects:?}"),
                    if args.dry_run { "dry run" } else { "pending" },
                );
                if !args.dry_run {
                    let gap = move_subjects(&c.js, &from, from_subjects, &to, to_subjects).await;
                    match gap {
                        Ok(gap) => {
                            report.actions.truncate(report.actions.len() - 2);
                            report.action(
                                format!("removed {group:?} from {from}, added to {to}"),
                                format!("done; publish gap {} µs", gap.as_micros()),
                            );
                        }
                        Err(e) => {
                            report.check("subject move", false, e);
                            return Ok(report);
                        }
                    }
                }
            }
            // Durables where the subjects now are.
            for cc in consumers_of(&c.config, role) {
                if args.dry_run {
                    report.action(format!("ensure durable {} on {to}", cc.durable), "dry run");
                } else {
                    ensure_durable(&c, cc, &to, &mut report).await;
                }
            }
            // Durables left behind are kept (and drained by multi-mode daemons).
            for cc in consumers_of(&c.config, role) {
                if let Ok(s) = c.js.get_stream(&from).await {
                    if let Ok(info) = s.consumer_info(&cc.durable).await {
                        report.action(
                            format!("kept durable {} on {from}", cc.durable),
                            format!(
                                "pending {} ack pending {} (never deleted while not drained)",
                                info.num_pending, info.num_ack_pending
                            ),
                        );
                    }
                }
            }
        }
        Step::Phase3 => {
            if !state.contains_key(&n.legacy) {
                report.action(format!("legacy stream {}", n.legacy), "already deleted");
            } else {
                let legacy_subjects = state.get(&n.legacy).cloned().unwrap_or_default();
                let event_subjects: Vec<&String> =
                    legacy_subjects.iter().filter(|s| **s != n.legacy).collect();
                let mut refusals = Vec::new();
                if !event_subjects.is_empty() {
                    refusals.push(format!(
                        "{} still holds subjects {event_subjects:?}: run phase1 and phase2 first",
                        n.legacy
                    ));
                }
                for ci in consumer_infos(&c.js, &n.legacy).await? {
                    if ci.num_pending > 0 || ci.num_ack_pending > 0 {
                        refusals.push(format!(
                            "durable {} on {} has {} pending and {} unacked messages: let the daemon drain it",
                            ci.name, n.legacy, ci.num_pending, ci.num_ack_pending
                        ));
                    }
                }
                let mut legacy =
                    c.js.get_stream(&n.legacy)
                        .await
                        .map_err(|e| nats_err("get legacy stream")(&e))?;
                let info = legacy
                    .info()
                    .await
                    .map_err(|e| nats_err("legacy stream info")(&e))?
                    .clone();
                if info.state.messages > 0 {
                    let last = info.state.last_timestamp.unix_timestamp();
                    let age = chrono::Utc::now().timestamp().saturating_sub(last);
                    if (age.max(0) as u64) < quiet.as_secs() {
                        refusals.push(format!(
                            "{} has a message {age}s old, newer than --quiet-period {}s",
                            n.legacy,
                            quiet.as_secs()
                        ));
                    }
                }
                if !refusals.is_empty() {
                    for r in refusals {
                        report.refuse(r);
                    }
                    return Ok(report);
                }
                if confirm_needed {
                    report.refuse(format!(
                        "deleting stream {} is irreversible; re-run with --yes",
                        n.legacy
                    ));
                    return Ok(report);
                }
                if args.dry_run {
                    report.action(format!("delete stream {}", n.legacy), "dry run");
                } else {
                    match c.js.delete_stream(&n.legacy).await {
                        Ok(_) => report.action(format!("delete stream {}", n.legacy), "done"),
                        Err(e) => report.check(format!("delete stream {}", n.legacy), false, e.to_string()),
                    }
                }
            }
        }
    }
    if !args.dry_run && report.ok {
        let expect = match step {
            Step::Phase0 => expect_for(PhaseArg::Phase0, None, &n),
            Step::Phase1 => expect_for(PhaseArg::Phase1, None, &n),
            Step::Phase2 => expect_for(PhaseArg::Phase2, None, &n),
            Step::Phase3 => expect_for(PhaseArg::Phase3, None, &n),
            Step::Rollback1 => expect_for(PhaseArg::Phase0, Some(RollbackArg::Phase1), &n),
            Step::Rollback2 => expect_for(PhaseArg::Phase0, Some(RollbackArg::Phase2), &n),
        };
        verify(&c, &expect, &args, &mut report).await?;
    }
    let state = subjects_state(&c.js).await?;
    let after = classify(&state, &n);
    report.next = after.next_command().map(String::from);
    report.phase_after = Some(after);
    Ok(report)
}

/// Removes the subjects from one stream, then adds them to the other; returns the gap.
async fn move_subjects(
    js: &jetstream::Context,
    from: &str,
    from_subjects: Vec<String>,
    to: &str,
    to_subjects: Vec<String>,
) -> Result<Duration, String> {
    let mut from_cfg = js
        .get_stream(from)
        .await
        .map_err(|e| format!("get {from}: {e}"))?
        .cached_info()
        .config
        .clone();
    let mut to_cfg = js
        .get_stream(to)
        .await
        .map_err(|e| format!("get {to}: {e}"))?
        .cached_info()
        .config
        .clone();
    from_cfg.subjects = from_subjects;
    to_cfg.subjects = to_subjects;
    let started = Instant::now();
    js.update_stream(from_cfg)
        .await
        .map_err(|e| format!("removing subjects from {from}: {e}"))?;
    // From here until the next update, publishes to the moved subjects find no stream.
    let mut attempt = 0;
    loop {
        match js.update_stream(to_cfg.clone()).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(stream = %to, error = %e, attempt, "adding subjects failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(format!(
                    "adding subjects to {to} failed after removing them from {from} — publishes to them fail until fixed; re-run the same step: {e}"
                ))
            }
        }
    }
}

/// What a phase (or rollback) leaves behind, to check.
struct Expect {
    /// Where `vendor.>` must be; `None` = not this step's business.
    vendor_home: Option<String>,
    core_home: Option<String>,
    new_streams: bool,
    exactly_three: bool,
}

fn expect_for(phase: PhaseArg, rollback: Option<RollbackArg>, n: &StreamNames) -> Expect {
    match (rollback, phase) {
        (Some(RollbackArg::Phase1), _) => Expect {
            vendor_home: Some(n.legacy.clone()),
            core_home: None,
            new_streams: false,
            exactly_three: false,
        },
        (Some(RollbackArg::Phase2), _) => Expect {
            vendor_home: None,
            core_home: Some(n.legacy.clone()),
            new_streams: false,
            exactly_three: false,
        },
        (None, PhaseArg::Phase0) => Expect {
            vendor_home: None,
            core_home: None,
            new_streams: true,
            exactly_three: false,
        },
        (None, PhaseArg::Phase1) => Expect {
            vendor_home: Some(n.vendor.clone()),
            core_home: None,
            new_streams: true,
            exactly_three: false,
        },
        (None, PhaseArg::Phase2) => Expect {
            vendor_home: Some(n.vendor.clone()),
            core_home: Some(n.core.clone()),
            new_streams: true,
            exactly_three: false,
        },
        (None, PhaseArg::Phase3) => Expect {
            vendor_home: Some(n.vendor.clone()),
            core_home: Some(n.core.clone()),
            new_streams: true,
            exactly_three: true,
        },
    }
}

async fn verify_only(phase: PhaseArg, args: StepArgs) -> Result<Report<()>, OpsError> {
    let c = ctx().await?;
    let mut report = Report::new(&format!("migrate verify {phase:?}").to_lowercase());
    let state = subjects_state(&c.js).await?;
    report.phase_before = Some(classify(&state, &c.config.streams));
    let expect = expect_for(phase, None, &c.config.streams);
    verify(&c, &expect, &args, &mut report).await?;
    Ok(report)
}

/// The checks: subject ownership, streams, durables where the subjects are, and the
/// end-to-end probe through each moved subject group.
async fn verify<T: Serialize>(
    c: &Ctx,
    expect: &Expect,
    args: &StepArgs,
    report: &mut Report<T>,
) -> Result<(), OpsError> {
    let n = &c.config.streams;
    let state = subjects_state(&c.js).await?;
    report.check(format!("{} exists", n.dlq), state.contains_key(&n.dlq), "");
    if expect.new_streams {
        report.check(format!("{} exists", n.core), state.contains_key(&n.core), "");
        report.check(format!("{} exists", n.vendor), state.contains_key(&n.vendor), "");
    }
    if expect.exactly_three {
        let names: Vec<&String> = state.keys().collect();
        let exactly = state.len() == 3
            && [&n.core, &n.dlq, &n.vendor]
                .iter()
                .all(|e| state.contains_key(*e));
        report.check("exactly the three streams", exactly, format!("{names:?}"));
    }
    let mut probes = Vec::new();
    for (home, group, role) in [
        (&expect.vendor_home, vendor_subjects(), StreamRole::Vendor),
        (&expect.core_home, core_subjects(), StreamRole::Core),
    ] {
        let Some(home) = home else { continue };
        let others_hold = state
            .iter()
            .any(|(name, subs)| name != home && group.iter().any(|g| subs.contains(g)));
        report.check(
            format!("{group:?} on {home} only"),
            holds_all(&state, home, &group) && !others_hold,
            "",
        );
        for cc in consumers_of(&c.config, role) {
            let exists = match c.js.get_stream(home).await {
                Ok(s) => s.consumer_info(&cc.durable).await.is_ok(),
                Err(_) => false,
            };
            report.check(format!("durable {} on {home}", cc.durable), exists, "");
        }
        // One probe per group: HRV for the core subjects, a webhook for vendor.>.
        let kind = if role == StreamRole::Core {
            ConsumerKind::Hrv
        } else {
            ConsumerKind::Oura
        };
        probes.push((kind, home.clone()));
    }
    if probes.is_empty() {
        return Ok(());
    }
    if args.no_probe {
        report.check("probe", true, "(skipped: --no-probe)");
        return Ok(());
    }
    let timeout = Duration::from_secs(args.probe_timeout);
    let pool = sqlx::PgPool::connect(&c.config.database_url)
        .await
        .map_err(|e| OpsError::Failed(format!("DATABASE_URL: {e}")))?;
    for (kind, home) in probes {
        let Some(cc) = c.config.consumer(kind) else {
            continue;
        };
        match probe(c, &pool, cc, &home, timeout).await {
            Ok(detail) => report.check(format!("probe {kind} via {home}"), true, detail),
            Err(e) => report.check(format!("probe {kind} via {home}"), false, e),
        }
    }
    pool.close().await;
    let _ = c.client.flush().await;
    Ok(())
}

pub const PROBE_USER: &str = "migration-probe";

/// Publishes a probe event, waits for its row in PostgreSQL and for the durable's ack floor
/// to pass it. The probe rows (user id `migration-probe`) stay in the tables.
async fn probe(
    c: &Ctx,
    pool: &sqlx::PgPool,
    cc: &ConsumerConfig,
    home: &str,
    timeout: Duration,
) -> Result<String, String> {
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let id = format!(
        "{PROBE_USER}:{}:{}",
        cc.kind,
        now.timestamp_nanos_opt().unwrap_or_default()
    );
    let body = match cc.kind {
        ConsumerKind::Oura => serde_json::json!({"user_id": PROBE_USER, "timestamp": ts, "data": {}}),
        _ => {
            serde_json::json!({"eventId": id, "payload": {"userId": PROBE_USER, "date": now.format("%Y-%m-%d").to_string(), "rMSSD": 1.0, "capturedAt": ts, "raw": {"source": "probe"}}})
        }
    };
    let msg = jetstream::message::PublishMessage::build()
        .payload(body.to_string().into())
        .message_id(id.clone());
    let started = Instant::now();
    let ack =
        c.js.send_publish(cc.filter_subject.clone(), msg)
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await
            .map_err(|e| format!("publish ack: {e}"))?;
    if ack.stream != home {
        return Err(format!("probe stored in {} instead of {home}", ack.stream));
    }
    let deadline = started + timeout;
    loop {
        let row = match cc.kind {
            ConsumerKind::Oura => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM vendor_webhook_events WHERE idempotency_key = $1",
                )
                .bind(&id)
                .fetch_one(pool)
                .await
            }
            _ => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM hrv_data WHERE user_id = $1 AND captured_at >= $2",
                )
                .bind(PROBE_USER)
                .bind(now - chrono::Duration::milliseconds(1))
                .fetch_one(pool)
                .await
            }
        }
        .unwrap_or(0);
        let floor = match c.js.get_stream(home).await {
            Ok(s) => s
                .consumer_info(&cc.durable)
                .await
                .map(|i| i.ack_floor.stream_sequence)
                .unwrap_or(0),
            Err(_) => 0,
        };
        if row > 0 && floor >= ack.sequence {
            return Ok(format!(
                "row stored and {} ack floor at {floor} ≥ {} after {} ms",
                cc.durable,
                ack.sequence,
                started.elapsed().as_millis()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after {}s: row {}, {} ack floor {floor} < {} — is a multi-mode daemon running?",
                timeout.as_secs(),
                if row > 0 { "stored" } else { "missing" },
                cc.durable,
                ack.sequence
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(entries: &[(&str, &[&str])]) -> Subjects {
        entries
            .iter()
            .map(|(n, s)| (n.to_string(), s.iter().map(|x| x.to_string()).collect()))
            .collect()
    }

    #[test]
    fn phases_are_recognised() {
        let n = StreamNames::default();
        let legacy: &[&str] = &["athlete-ally.>", "vendor.>", "sleep.*"];
        assert_eq!(classify(&st(&[]), &n), Phase::Empty);
        assert_eq!(
            classify(&st(&[("ATHLETE_ALLY_EVENTS", legacy)]), &n),
            Phase::Legacy
        );
        let prepared = st(&[
            ("ATHLETE_ALLY_EVENTS", legacy),
            ("AA_CORE_HOT", &["AA_CORE_HOT"]),
            ("AA_VENDOR_HOT", &["AA_VENDOR_HOT"]),
            ("AA_DLQ", &["dlq.>"]),
        ]);
        assert_eq!(classify(&prepared, &n), Phase::Prepared);
        let p1 = st(&[
            ("ATHLETE_ALLY_EVENTS", &["athlete-ally.>", "sleep.*"]),
            ("AA_CORE_HOT", &["AA_CORE_HOT"]),
            ("AA_VENDOR_HOT", &["vendor.>"]),
            ("AA_DLQ", &["dlq.>"]),
        ]);
        assert_eq!(classify(&p1, &n), Phase::VendorMoved);
        let p2 = st(&[
            ("ATHLETE_ALLY_EVENTS", &["ATHLETE_ALLY_EVENTS"]),
            ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
            ("AA_VENDOR_HOT", &["vendor.>"]),
            ("AA_DLQ", &["dlq.>"]),
        ]);
        assert_eq!(classify(&p2, &n), Phase::CoreMoved);
        let done = st(&[
            ("AA_CORE_HOT", &["athlete-ally.>", "sleep.*"]),
            ("AA_VENDOR_HOT", &["vendor.>"]),
            ("AA_DLQ", &["dlq.>"]),
        ]);
        assert_eq!(classify(&done, &n), Phase::Migrated);
        assert!(matches!(
            classify(&st(&[("AA_CORE_HOT", &["athlete-ally.>"])]), &n),
            Phase::Mixed(_)
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("14d"), Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5y"), None);
    }

    #[test]
    fn steps_named_for_subjects() {
        assert_eq!(step_for_subject("vendor.>"), "normalize-service migrate phase1");
        assert_eq!(
            step_for_subject("athlete-ally.>"),
            "normalize-service migrate phase2"
        );
    }
}
