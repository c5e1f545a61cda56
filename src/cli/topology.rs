//! `topology apply|status`: create or update the streams and durables to the spec tables
//! ([`crate::topology`]), never deleting, and show what exists and which migration phase it is.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::stream;
use clap::Subcommand;
use serde::Serialize;

use crate::cli::migrate::{self, classify, step_for_subject, vendor_subjects, Subjects};
use crate::cli::output::{finish, Report, EXIT_REFUSED};
use crate::cli::server::{consumer_infos, stream_infos, subjects_state, Ctx, OpsError};
use crate::config::{Config, ConsumerConfig, StreamMode};
use crate::topology::{self, StreamSpec};

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Create or update streams and durables to the spec tables (never deletes); shows the diff
    /// first and refuses changes that would overlap another stream's subjects.
    Apply {
        #[arg(long, value_enum)]
        mode: StreamMode,
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

pub async fn run(cmd: TopologyCommand) -> ExitCode {
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
    let c = Ctx::open().await?;
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

/// A planned stream change.
enum Change {
    Create(StreamSpec),
    Update(StreamSpec),
}

/// What to do about a subject `spec` wants that another stream holds.
fn overlap_advice(config: &Config, holder: &str, spec: &str, subject: &str) -> String {
    if holder == config.streams.legacy {
        format!(
            "run `{}` (see `normalize-service migrate plan`)",
            step_for_subject(subject)
        )
    } else if spec == config.streams.legacy {
        format!(
            "this is a migrated topology: `normalize-service migrate rollback {}` moves it back",
            if vendor_subjects().iter().any(|s| s == subject) {
                "phase1"
            } else {
                "phase2"
            }
        )
    } else {
        "move it with the `normalize-service migrate` steps".to_string()
    }
}

async fn apply(mode: StreamMode, replicas: Option<usize>, dry_run: bool) -> Result<Report<()>, OpsError> {
    let c = Ctx::open().await?;
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
    let mut changes = Vec::new();
    for spec in topology::stream_specs(mode, &c.config.streams, replicas) {
        for subject in &spec.subjects {
            if let Some(holder) = topology::holder_of(&existing, subject, &spec.name) {
                let advice = overlap_advice(&c.config, &holder.name, &spec.name, subject);
                report.refuse(format!(
                    "subject {subject} is held by stream {}; giving it to {} would overlap (JetStream error 10065): {advice}",
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
        if c.has_durable(stream, &cc.durable).await {
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
        let (verb, spec, result) = match change {
            Change::Create(spec) => {
                let r = c.js.create_stream(spec.to_config()).await.map(|_| ());
                ("create", spec, r.map_err(|e| e.to_string()))
            }
            Change::Update(spec) => {
                let r = c.js.update_stream(spec.to_config()).await.map(|_| ());
                ("update", spec, r.map_err(|e| e.to_string()))
            }
        };
        match result {
            Ok(()) => report.action(format!("{verb} stream {}", spec.name), "done"),
            Err(e) => report.check(format!("{verb} stream {}", spec.name), false, e),
        }
    }
    for cc in &c.config.consumers {
        let stream = consumer_stream(&c.config, mode, cc).to_string();
        c.ensure_durable(cc, &stream, &mut report).await;
    }
    let state = subjects_state(&c.js).await?;
    report.phase_after = Some(migrate::classify(&state, &c.config.streams));
    Ok(report)
}
