//! The migration steps, one function each: [`phase0`] prepares the new streams,
//! [`move_group`] moves a subject group (phase1, phase2 and their rollbacks), [`phase3`] deletes
//! the legacy stream. [`run`] reads the state first and verifies after.

use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::cutover::{self, Cutover};
use super::mapping::Routes;
use super::phase::{
    already_moved, classify_routed, expect_for, move_ends, move_refusal, moved_subjects, placeholder,
    private_group, unmanaged_overlap, Move, Phase, PhaseStep, RollbackStep, Step, Subjects, FAILED_STEP_DOCS,
};
use super::verify::verify;
use super::StepArgs;
use crate::cli::output::{ActionKind, Report, EXIT_FAILED};
use crate::cli::server::{consumer_infos, consumers_of, subjects_state, Ctx, OpsError};
use crate::config::StreamRole;
use crate::topology;

/// Whether a step got far enough to be verified (a refusal or a failed move stops it).
enum Flow {
    Verify,
    Stop,
}

/// Runs `step` (with `quiet` the quiet period of phase3), then verifies what it left.
pub async fn run(step: Step, args: StepArgs, quiet: Duration) -> Result<Report<()>, OpsError> {
    let c = Ctx::open().await?;
    let mut report = Report::new(step.name());
    let state = subjects_state(&c.js).await?;
    let routes = cutover::routes_now(&c, &state).await?;
    let before = classify_routed(&state, &c.config.streams, routes);
    report.phase_before = Some(before.clone());
    let version = c.client.server_info().version;
    let strategy = match cutover::resolve(args.cutover, &version) {
        Ok(s) => s,
        Err(why) => {
            report.refuse(why);
            return Ok(report);
        }
    };
    let flow = match (step, strategy) {
        (Step::Forward(PhaseStep::Phase0), _) => phase0(&c, &state, &before, &args, &mut report).await,
        (Step::Forward(PhaseStep::Phase3), _) => {
            phase3(&c, &state, routes, strategy, quiet, &args, &mut report).await?
        }
        (Step::Shift(..), Cutover::Move) => {
            report.refuse(
                "a gradual shift needs --cutover mapping (nats-server 2.10 or later); `--cutover move` moves a group all at once",
            );
            Flow::Stop
        }
        (_, Cutover::Mapping) => {
            let Some((role, percent)) = route_of(step) else {
                return Ok(report);
            };
            if cutover::route_group(&c, step, role, percent, &state, routes, &args, &mut report).await {
                Flow::Verify
            } else {
                Flow::Stop
            }
        }
        (_, Cutover::Move) => {
            let Some((role, percent)) = route_of(step) else {
                return Ok(report);
            };
            if routes.get(role) > 0 && percent == 0 {
                report.refuse(format!(
                    "a mapping routes {} % of {:?} to the new stream: roll back with --cutover mapping",
                    routes.get(role),
                    super::phase::group_subjects(role)
                ));
                Flow::Stop
            } else {
                if version_is_old(&version) || args.cutover.is_none() {
                    report.action(
                        ActionKind::Nothing,
                        format!("--cutover move on nats-server {version}"),
                        "publishes to the moved subjects fail for a few milliseconds; publishers must retry with the same Nats-Msg-Id",
                    );
                }
                let m = Move::new(role, percent > 0);
                move_group(&c, step, &m, &state, &args, &mut report).await
            }
        }
    };
    if let Flow::Stop = flow {
        point_back(step, &mut report);
        return Ok(report);
    }
    // From here on the step may have changed NATS: an error no longer replaces the report (the
    // operator needs the actions taken and the rollback), it becomes a failed check in it.
    if !args.dry_run && report.ok {
        if let Err(e) = verify(&c, &expect_for(step, &c.config.streams), &args.probe, &mut report).await {
            report.check_failed("verify", &e);
        }
    }
    match phase_now(&c).await {
        Ok(after) => {
            report.next = after.next_command().map(String::from);
            report.phase_after = Some(after);
        }
        Err(e) => report.check_failed("phase after the step", &e),
    }
    point_back(step, &mut report);
    Ok(report)
}

/// The phase the streams and the mapping's routes correspond to now.
pub(super) async fn phase_now(c: &Ctx) -> Result<Phase, OpsError> {
    let state = subjects_state(&c.js).await?;
    let routes = cutover::routes_now(c, &state).await?;
    Ok(classify_routed(&state, &c.config.streams, routes))
}

/// The group a routing step changes and the percent of its publishes it sends to the new
/// stream (phase1/phase2: 100, their rollbacks: 0).
fn route_of(step: Step) -> Option<(StreamRole, u8)> {
    match step {
        Step::Forward(PhaseStep::Phase1) => Some((StreamRole::Vendor, 100)),
        Step::Forward(PhaseStep::Phase2) => Some((StreamRole::Core, 100)),
        Step::Rollback(RollbackStep::Phase1) => Some((StreamRole::Vendor, 0)),
        Step::Rollback(RollbackStep::Phase2) => Some((StreamRole::Core, 0)),
        Step::Shift(group, percent) => Some((group.role(), percent)),
        Step::Forward(PhaseStep::Phase0 | PhaseStep::Phase3) => None,
    }
}

fn version_is_old(version: &str) -> bool {
    crate::server_version::parse(version).is_none_or(|v| v < super::mapping::MIN_SERVER)
}

/// A step whose check, probe or move failed (exit 1) never points forward: it names the
/// rollback (or the re-run) and the runbook instead. A refusal (exit 3) changed nothing and
/// keeps its own explanation.
pub(super) fn point_back(step: Step, report: &mut Report<()>) {
    if report.exit == EXIT_FAILED {
        report.next = None;
        report.rollback = Some(format!("{} (runbook: {FAILED_STEP_DOCS})", step.recovery()));
    }
}

/// phase0: `AA_DLQ`, and the core and vendor streams parked on their placeholder subjects.
async fn phase0(c: &Ctx, state: &Subjects, before: &Phase, args: &StepArgs, report: &mut Report<()>) -> Flow {
    let n = &c.config.streams;
    if !state.contains_key(&n.legacy) && !matches!(before, Phase::Migrated) {
        report.refuse(format!("legacy stream {} not found: nothing to migrate from (new installation: `normalize-service topology apply --mode multi`)", n.legacy));
        return Flow::Stop;
    }
    let replicas = c.config.replicas;
    for (spec, parked) in [
        (topology::dlq_spec(n, replicas), false),
        (topology::core_spec(n, replicas), true),
        (topology::vendor_spec(n, replicas), true),
    ] {
        if state.contains_key(&spec.name) {
            report.action(
                ActionKind::StreamExists,
                format!("stream {}", spec.name),
                "exists",
            );
            continue;
        }
        let mut spec = spec;
        if parked {
            spec.subjects = placeholder(&spec.name);
        }
        let what = format!("create stream {} subjects={:?}", spec.name, spec.subjects);
        if args.dry_run {
            report.action(ActionKind::CreateStream, what, "dry run");
            continue;
        }
        match c.js.create_stream(spec.to_config()).await {
            Ok(_) => report.action(ActionKind::CreateStream, what, "done"),
            Err(e) => report.check(format!("create stream {}", spec.name), false, e.to_string()),
        }
    }
    Flow::Verify
}

/// phase1, phase2 and their rollbacks: move the group, then make sure its durables exist
/// where the subjects now are. The durables left behind are kept (multi-mode daemons drain them).
async fn move_group(
    c: &Ctx,
    step: Step,
    m: &Move,
    state: &Subjects,
    args: &StepArgs,
    report: &mut Report<()>,
) -> Flow {
    let n = &c.config.streams;
    let (from, to) = move_ends(m, n);
    if let Some(why) = move_refusal(step, m, state, n) {
        report.refuse(why);
        return Flow::Stop;
    }
    let group = &m.group;
    if already_moved(m, state, &from, &to) {
        report.action(
            ActionKind::SubjectsInPlace,
            format!("subjects {group:?} already on {to}"),
            "nothing to move",
        );
    } else {
        if let Some(other) = unmanaged_overlap(m, state, &from, &to) {
            report.refuse(format!(
                "subjects {group:?} overlap stream {other}, which this migration does not manage"
            ));
            return Flow::Stop;
        }
        if !args.yes && !args.dry_run {
            report.refuse(format!(
                "moving {group:?} from {from} to {to} makes publishes to them fail for about a millisecond (publishers retry with the same Nats-Msg-Id); re-run with --yes (or --dry-run)"
            ));
            return Flow::Stop;
        }
        let (from_subjects, to_subjects) = moved_subjects(m, state, &from, &to);
        let status = if args.dry_run { "dry run" } else { "pending" };
        report.action(
            ActionKind::RemoveSubjects,
            format!("1. {from}: subjects → {from_subjects:?}"),
            status,
        );
        report.action(
            ActionKind::AddSubjects,
            format!("2. {to}: subjects → {to_subjects:?}"),
            status,
        );
        if !args.dry_run {
            match move_subjects(&c.js, &from, from_subjects, &to, to_subjects).await {
                Ok(gap) => {
                    // The two pending lines become one line saying what was done.
                    report.actions.truncate(report.actions.len() - 2);
                    report.action(
                        ActionKind::MoveSubjects,
                        format!("removed {group:?} from {from}, added to {to}"),
                        format!("done; publish gap {} µs", gap.as_micros()),
                    );
                }
                Err(e) => {
                    report.check_failed("subject move", &e);
                    return Flow::Stop;
                }
            }
        }
    }
    for cc in consumers_of(&c.config, m.role) {
        if args.dry_run {
            report.action(
                ActionKind::CreateConsumer,
                format!("ensure durable {} on {to}", cc.durable),
                "dry run",
            );
        } else {
            c.ensure_durable(cc, &to, report).await;
        }
    }
    for cc in consumers_of(&c.config, m.role) {
        if let Ok(s) = c.js.get_stream(&from).await {
            if let Ok(info) = s.consumer_info(&cc.durable).await {
                report.action(
                    ActionKind::KeepConsumer,
                    format!("kept durable {} on {from}", cc.durable),
                    format!(
                        "pending {} ack pending {} (never deleted while not drained)",
                        info.num_pending, info.num_ack_pending
                    ),
                );
            }
        }
    }
    Flow::Verify
}

/// phase3: delete the legacy stream once it holds no event subjects, its durables are drained
/// and its newest message is older than `quiet`.
async fn phase3(
    c: &Ctx,
    state: &Subjects,
    routes: Routes,
    strategy: Cutover,
    quiet: Duration,
    args: &StepArgs,
    report: &mut Report<()>,
) -> Result<Flow, OpsError> {
    let n = &c.config.streams;
    let Some(legacy_subjects) = state.get(&n.legacy) else {
        report.action(
            ActionKind::StreamDeleted,
            format!("legacy stream {}", n.legacy),
            "already deleted",
        );
        return Ok(Flow::Verify);
    };
    // Subjects the mapping routes elsewhere are handed over by this step (mapping cut-over).
    let handed_over: Vec<String> = [StreamRole::Vendor, StreamRole::Core]
        .into_iter()
        .filter(|r| private_group(state, n, *r))
        .flat_map(super::phase::group_subjects)
        .collect();
    let event_subjects: Vec<&String> = legacy_subjects
        .iter()
        .filter(|s| **s != n.legacy && !handed_over.contains(s))
        .collect();
    let mut refusals = Vec::new();
    if !handed_over.is_empty() && strategy == Cutover::Move {
        refusals.push(format!(
            "{handed_over:?} are routed by a mapping (the new streams listen on the private namespace): run phase3 with --cutover mapping"
        ));
    } else if let Some(why) = cutover::finish_refusal(c, state, routes, args).await {
        refusals.push(why);
    }
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
            .map_err(|e| OpsError::nats("get legacy stream", e))?;
    let info = legacy
        .info()
        .await
        .map_err(|e| OpsError::nats("legacy stream info", e))?;
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
        return Ok(Flow::Stop);
    }
    if !args.yes && !args.dry_run {
        report.refuse(format!(
            "deleting stream {} is irreversible; re-run with --yes",
            n.legacy
        ));
        return Ok(Flow::Stop);
    }
    if strategy == Cutover::Mapping && !cutover::finish(c, state, routes, args, report).await {
        return Ok(Flow::Stop);
    }
    let what = format!("delete stream {}", n.legacy);
    if args.dry_run {
        report.action(ActionKind::DeleteStream, what, "dry run");
    } else {
        match c.js.delete_stream(&n.legacy).await {
            Ok(_) => report.action(ActionKind::DeleteStream, what, "done"),
            Err(e) => report.check(what, false, e.to_string()),
        }
    }
    Ok(Flow::Verify)
}

/// Why a subject move failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("get {stream}")]
    Get {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("removing subjects from {from}")]
    Remove {
        from: String,
        #[source]
        source: jetstream::context::UpdateStreamError,
    },
    #[error(
        "adding subjects to {to} failed after removing them from {from} — publishes to them fail until fixed; re-run the same step"
    )]
    Add {
        from: String,
        to: String,
        #[source]
        source: jetstream::context::UpdateStreamError,
    },
}

/// Removes the subjects from one stream, then adds them to the other; returns the gap.
async fn move_subjects(
    js: &jetstream::Context,
    from: &str,
    from_subjects: Vec<String>,
    to: &str,
    to_subjects: Vec<String>,
) -> Result<Duration, MoveError> {
    let config_of = |stream: &str| {
        let stream = stream.to_string();
        async move {
            match js.get_stream(&stream).await {
                Ok(s) => Ok(s.cached_info().config.clone()),
                Err(source) => Err(MoveError::Get { stream, source }),
            }
        }
    };
    let mut from_cfg = config_of(from).await?;
    let mut to_cfg = config_of(to).await?;
    from_cfg.subjects = from_subjects;
    to_cfg.subjects = to_subjects;
    let started = Instant::now();
    js.update_stream(from_cfg)
        .await
        .map_err(|source| MoveError::Remove {
            from: from.to_string(),
            source,
        })?;
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
            Err(source) => {
                return Err(MoveError::Add {
                    from: from.to_string(),
                    to: to.to_string(),
                    source,
                })
            }
        }
    }
}
