//! `topology apply|status`: create or update the streams and durables to the spec tables
//! ([`crate::topology`]), never deleting, and show what exists and which migration phase it is.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream::stream;
use clap::Subcommand;
use serde::Serialize;

use crate::cli::migrate::{self, classify, step_for_subject, vendor_subjects, Subjects};
use crate::cli::output::{finish, finish_with, outln, table, ActionKind, Report, Text, EXIT_REFUSED};
use crate::cli::server::{consumer_infos, stream_infos, subjects_state, Ctx, OpsError};
use crate::config::{Config, ConsumerConfig, StreamMode};
use crate::topology::{self, StreamSpec};

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Create or update streams and durables to the spec tables (never deletes); shows the diff
    /// first and refuses changes that would overlap another stream's subjects.
    #[command(after_help = concat!(
        "Example:\n  normalize-service topology apply --mode multi --dry-run\n  normalize-service topology apply --mode multi\n\n",
        crate::cli::ops_exit_codes!()
    ))]
    Apply {
        /// `single`: the legacy stream; `multi`: the core, vendor and dead-letter streams.
        #[arg(long, value_enum)]
        mode: StreamMode,
        /// Replicas for the streams (default: STREAM_REPLICAS).
        #[arg(long)]
        replicas: Option<usize>,
        /// Show the diff and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as one JSON document (docs/CLI-JSON.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Streams, consumers, and the migration phase this state corresponds to.
    #[command(after_help = concat!(
        "Example:\n  normalize-service topology status\n  normalize-service topology status --json | jq '.data[].consumers[] | {name, pending}'\n\n",
        crate::cli::ops_exit_codes!()
    ))]
    Status {
        /// Print the report as one JSON document (docs/CLI-JSON.md) instead of text.
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
        TopologyCommand::Status { json } => finish_with(status().await, json, status_text),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
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
#[serde(rename_all = "camelCase")]
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
    out.sort_by(|a, b| a.name.cmp(&b.name));
    for s in &mut out {
        s.consumers.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let state: Subjects = out.iter().map(|s| (s.name.clone(), s.subjects.clone())).collect();
    let phase = classify(&state, &c.config.streams);
    report.next = phase.next_command().map(String::from);
    report.phase_after = Some(phase);
    report.data = Some(out);
    Ok(report)
}

/// `topology status` as text: the phase, one aligned row per stream and one per durable,
/// sorted by name (as `nats stream report` does), and the next step.
pub fn status_text(report: &Report<Vec<StreamStatus>>) -> Text {
    let mut t = Text::default();
    outln!(
        t,
        "{}: {}",
        report.command,
        if report.ok { "ok" } else { "NOT OK" }
    );
    if let Some(p) = &report.phase_after {
        outln!(t, "phase: {}", p.describe());
    }
    let streams = report.data.as_deref().unwrap_or_default();
    outln!(t);
    if streams.is_empty() {
        outln!(t, "no streams");
    } else {
        let rows: Vec<Vec<String>> = streams
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.subjects.join(", "),
                    s.messages.to_string(),
                    s.bytes.to_string(),
                    s.consumers.len().to_string(),
                ]
            })
            .collect();
        let headers = ["STREAM", "SUBJECTS", "MESSAGES", "BYTES", "CONSUMERS"];
        for l in table(&headers, &[false, false, true, true, true], &rows) {
            outln!(t, "{l}");
        }
        let rows: Vec<Vec<String>> = streams
            .iter()
            .flat_map(|s| {
                s.consumers.iter().map(|c| {
                    vec![
                        s.name.clone(),
                        c.name.clone(),
                        c.filter_subject.clone(),
                        c.pending.to_string(),
                        c.ack_pending.to_string(),
                        c.redelivered.to_string(),
                    ]
                })
            })
            .collect();
        if !rows.is_empty() {
            outln!(t);
            let headers = [
                "STREAM",
                "DURABLE",
                "FILTER",
                "PENDING",
                "ACK PENDING",
                "REDELIVERED",
            ];
            for l in table(&headers, &[false, false, false, true, true, true], &rows) {
                outln!(t, "{l}");
            }
        }
    }
    for c in &report.checks {
        outln!(t, "check   {} — {}", c.what, c.status);
    }
    if let Some(n) = &report.next {
        outln!(t);
        outln!(t, "next: {n}");
    }
    t
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

/// Sets planned action `i` to its outcome; a failure is also a failed check.
fn done(report: &mut Report<()>, i: usize, what: String, result: Result<(), String>) {
    let status = match &result {
        Ok(()) => "done".to_string(),
        Err(_) => "FAILED".to_string(),
    };
    if let Some(a) = report.actions.get_mut(i) {
        a.status = status;
    }
    if let Err(e) = result {
        report.check(what, false, e);
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
                    ActionKind::CreateStream,
                    format!(
                        "+ create stream {} subjects={:?} max_age={}h replicas={}",
                        spec.name,
                        spec.subjects,
                        spec.max_age.as_secs() / 3600,
                        spec.replicas
                    ),
                    "planned",
                );
                changes.push((report.actions.len() - 1, Change::Create(spec)));
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
                    report.action(
                        ActionKind::StreamUpToDate,
                        format!("= stream {}", spec.name),
                        "up to date",
                    );
                } else {
                    report.action(
                        ActionKind::UpdateStream,
                        format!("~ update stream {}: {}", spec.name, drift.join(", ")),
                        "planned",
                    );
                    changes.push((report.actions.len() - 1, Change::Update(spec)));
                }
            }
        }
    }
    let mut durables = Vec::new();
    for cc in &c.config.consumers {
        let stream = consumer_stream(&c.config, mode, cc);
        if c.has_durable(stream, &cc.durable).await {
            report.action(
                ActionKind::ConsumerExists,
                format!("= durable {} on {stream}", cc.durable),
                "exists (left as is)",
            );
        } else {
            report.action(
                ActionKind::CreateConsumer,
                format!(
                    "+ create durable {} on {stream} filter={}",
                    cc.durable, cc.filter_subject
                ),
                "planned",
            );
            durables.push((report.actions.len() - 1, cc, stream.to_string()));
        }
    }
    if report.exit == EXIT_REFUSED {
        report.action(ActionKind::Nothing, "nothing changed", "refused");
        return Ok(report);
    }
    if dry_run {
        report.action(ActionKind::Nothing, "dry run", "nothing changed");
        return Ok(report);
    }
    // Each planned action is shown once, its status becoming the outcome.
    for (i, change) in changes {
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
        done(&mut report, i, format!("{verb} stream {}", spec.name), result);
    }
    for (i, cc, stream) in durables {
        let result = match c.js.get_stream(&stream).await {
            Ok(s) => s
                .create_consumer(topology::durable_config(cc))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("stream: {e}")),
        };
        done(
            &mut report,
            i,
            format!("create durable {} on {stream}", cc.durable),
            result,
        );
    }
    let state = subjects_state(&c.js).await?;
    report.phase_after = Some(migrate::classify(&state, &c.config.streams));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::migrate::Phase;

    fn consumer(name: &str, filter: &str, pending: u64) -> ConsumerStatus {
        ConsumerStatus {
            name: name.into(),
            filter_subject: filter.into(),
            pending,
            ack_pending: 2,
            redelivered: 0,
            ack_floor: 0,
            last_active: None,
        }
    }

    fn stream(name: &str, subjects: &[&str], messages: u64, consumers: Vec<ConsumerStatus>) -> StreamStatus {
        StreamStatus {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            messages,
            bytes: messages * 100,
            first_seq: 1,
            first_time: None,
            last_seq: messages,
            last_time: None,
            replicas: 1,
            consumers,
        }
    }

    #[test]
    fn status_is_an_aligned_table_not_json() {
        let mut report: Report<Vec<StreamStatus>> = Report::new("topology status");
        report.phase_after = Some(Phase::Migrated);
        report.data = Some(vec![
            stream(
                "AA_CORE_HOT",
                &["athlete-ally.>", "sleep.*"],
                1234,
                vec![
                    consumer("normalize-hrv-durable", "athlete-ally.hrv.raw-received", 15),
                    consumer("normalize-sleep-durable", "sleep.raw-received", 0),
                ],
            ),
            stream("AA_DLQ", &["dlq.>"], 7, vec![]),
        ]);
        let expected = "\
topology status: ok
phase: phase3 done: three-stream topology

STREAM       SUBJECTS                 MESSAGES   BYTES  CONSUMERS
AA_CORE_HOT  athlete-ally.>, sleep.*      1234  123400          2
AA_DLQ       dlq.>                           7     700          0

STREAM       DURABLE                  FILTER                         PENDING  ACK PENDING  REDELIVERED
AA_CORE_HOT  normalize-hrv-durable    athlete-ally.hrv.raw-received       15            2            0
AA_CORE_HOT  normalize-sleep-durable  sleep.raw-received                   0            2            0
";
        assert_eq!(status_text(&report).as_str(), expected);
    }
}
