//! `migrate plan|phase0..3|rollback|verify`: the 1 → 3 stream migration, phase by phase.
//!
//! The migration moves subjects between streams. JetStream refuses overlapping subjects
//! (10065), so a subject moves only by removing it from the old stream, then adding it to the
//! new one; publishes in between (about a millisecond) fail with "no responders" and must be
//! retried by the publisher with the same `Nats-Msg-Id`. Durables can be created on the new
//! stream only once it holds the subject (10093 on 2.9). Every step is idempotent: it looks at
//! the current state and does only what is missing.
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
//!
//! `phase` is the pure core (classification, refusals, subject lists), `steps` runs one
//! function per step, `verify` holds the checks and the end-to-end probe.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::cli::output::{finish, Report, EXIT_REFUSED};
use crate::cli::server::{subjects_state, Ctx, OpsError};

mod cutover;
mod mapping;
mod phase;
mod steps;
mod verify;

pub use cutover::Cutover;
pub use phase::{
    classify, core_subjects, placeholder, step_for_subject, vendor_subjects, Group, Phase, PhaseStep,
    RollbackStep, Step, Subjects,
};
pub use verify::PROBE_USER;

/// What every step and `migrate verify` take: the output form and the probe.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Print the report as one JSON document (docs/CLI-JSON.md) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Skip the end-to-end probe (publish a probe event, see its row and the durable's ack floor).
    #[arg(long)]
    pub no_probe: bool,
    /// Seconds to wait for the probe's row (at most 86400).
    #[arg(long, default_value_t = 30, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(..=crate::cli::MAX_WAIT_SECS))]
    pub probe_timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct StepArgs {
    /// Show what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm a step that moves subjects or deletes a stream.
    #[arg(long)]
    pub yes: bool,
    /// How a subject group changes stream: `mapping` (an account subject mapping; no publish
    /// fails; the default on nats-server ≥ 2.10) or `move` (remove, then add; publishes fail
    /// for a few milliseconds; the only one on 2.9). docs/MIGRATION.md.
    #[arg(long, value_enum)]
    pub cutover: Option<Cutover>,
    /// With `--cutover mapping`: the nats-server config file whose managed mappings block the
    /// step rewrites (appended at the end, the default account, unless the file has the block's
    /// markers, e.g. inside an account). Without it the step prints the mapping to apply.
    #[arg(long, value_name = "FILE")]
    pub nats_config: Option<std::path::PathBuf>,
    /// With `--nats-config`: the nats-server process to reload (SIGHUP) after writing the file.
    #[arg(long, value_name = "PID", requires = "nats_config")]
    pub reload_pid: Option<i32>,
    /// With `--cutover mapping`: every server of the cluster to probe through (repeat, or
    /// comma-separate; the client URL of each, credentials as in NATS_URL). Needed when the
    /// cluster does not advertise its servers (`no_advertise`, as the NATS Helm chart sets) or
    /// when the advertised addresses are not reachable from here; by default the servers in the
    /// connected server's INFO `connect_urls`.
    #[arg(long = "server", value_name = "URL", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// With `--cutover mapping`: the account named in the printed `nsc` commands.
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
    /// With `--cutover mapping`: seconds to wait for probe publishes to show a mapping in
    /// effect; the step never goes on before (at most 86400).
    #[arg(long, default_value_t = 300, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(..=crate::cli::MAX_WAIT_SECS))]
    pub mapping_timeout: u64,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

const PLAN_HELP: &str = concat!(
    "Example:\n  normalize-service migrate plan\n\n",
    crate::cli::ops_exit_codes!()
);

const PHASE0_HELP: &str = concat!(
    "Example:\n  normalize-service migrate phase0 --dry-run\n  normalize-service migrate phase0\n\n",
    crate::cli::ops_exit_codes!()
);

const PHASE1_HELP: &str = concat!(
    "Example:\n  normalize-service migrate phase1 --dry-run\n  normalize-service migrate phase1 --yes\n\n",
    crate::cli::ops_exit_codes!()
);

const PHASE2_HELP: &str = concat!(
    "Example:\n  normalize-service migrate phase2 --yes --probe-timeout 60\n\n",
    crate::cli::ops_exit_codes!()
);

const PHASE3_HELP: &str = concat!(
    "Example:\n  normalize-service migrate phase3 --yes --quiet-period 14d\n\n",
    crate::cli::ops_exit_codes!()
);

const SHIFT_HELP: &str = concat!(
    "Example:\n  normalize-service migrate shift vendor 10 --yes --nats-config /etc/nats/nats.conf --reload-pid 1234\n  normalize-service migrate shift vendor 50 --yes\n  normalize-service migrate shift vendor 100 --yes   # the same as phase1\n\n",
    crate::cli::ops_exit_codes!()
);

const ROLLBACK_HELP: &str = concat!(
    "Example:\n  normalize-service migrate rollback phase2 --yes\n\n",
    crate::cli::ops_exit_codes!()
);

const VERIFY_HELP: &str = concat!(
    "Example:\n  normalize-service migrate verify phase1 --probe-timeout 60\n\n",
    crate::cli::ops_exit_codes!()
);

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// The current phase and the next command.
    #[command(after_help = PLAN_HELP)]
    Plan {
        /// Print the report as one JSON document (docs/CLI-JSON.md) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create AA_DLQ and park AA_CORE_HOT / AA_VENDOR_HOT on placeholder subjects.
    #[command(after_help = PHASE0_HELP)]
    Phase0(StepArgs),
    /// Move vendor.> to AA_VENDOR_HOT and create the oura durable there.
    #[command(after_help = PHASE1_HELP)]
    Phase1(StepArgs),
    /// Move athlete-ally.> and sleep.* to AA_CORE_HOT and create the hrv/sleep durables there.
    #[command(after_help = PHASE2_HELP)]
    Phase2(StepArgs),
    /// Delete the drained, quiet legacy stream.
    #[command(after_help = PHASE3_HELP)]
    Phase3 {
        #[command(flatten)]
        step: StepArgs,
        /// Refuse while the legacy stream has a message newer than this (e.g. 14d, 2h, 0s).
        #[arg(long, default_value = "14d", value_parser = crate::cli::duration_arg)]
        quiet_period: std::time::Duration,
    },
    /// Route PERCENT of a group's publishes to its new stream (mapping cut-over only): 0 is the
    /// rollback, 100 the phase's full move; each step is verified by probe publishes.
    #[command(after_help = SHIFT_HELP)]
    Shift {
        #[arg(value_enum)]
        group: Group,
        /// 0 to 100.
        #[arg(value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
        #[command(flatten)]
        step: StepArgs,
    },
    /// Reverse a subject move (the new durables are kept until drained).
    #[command(after_help = ROLLBACK_HELP)]
    Rollback {
        #[arg(value_enum)]
        phase: RollbackStep,
        #[command(flatten)]
        step: StepArgs,
    },
    /// Run a phase's checks alone.
    #[command(after_help = VERIFY_HELP)]
    Verify {
        #[arg(value_enum)]
        phase: PhaseStep,
        #[command(flatten)]
        probe: ProbeArgs,
    },
}

pub async fn run(cmd: MigrateCommand) -> ExitCode {
    let forward = |p, args: StepArgs| (Step::Forward(p), args);
    let (step, args) = match cmd {
        MigrateCommand::Plan { json } => return finish(plan().await, json),
        MigrateCommand::Verify { phase, probe } => {
            let json = probe.json;
            return finish(verify::verify_only(phase, probe).await, json);
        }
        MigrateCommand::Phase3 { step, quiet_period } => {
            let json = step.probe.json;
            return finish(
                steps::run(Step::Forward(PhaseStep::Phase3), step, quiet_period).await,
                json,
            );
        }
        MigrateCommand::Phase0(args) => forward(PhaseStep::Phase0, args),
        MigrateCommand::Phase1(args) => forward(PhaseStep::Phase1, args),
        MigrateCommand::Phase2(args) => forward(PhaseStep::Phase2, args),
        MigrateCommand::Rollback { phase, step } => (Step::Rollback(phase), step),
        MigrateCommand::Shift { group, percent, step } => (Step::Shift(group, percent), step),
    };
    let json = args.probe.json;
    finish(steps::run(step, args, std::time::Duration::ZERO).await, json)
}

async fn plan() -> Result<Report<()>, OpsError> {
    let c = Ctx::open().await?;
    let state = subjects_state(&c.js).await?;
    let routes = cutover::routes_now(&c, &state).await?;
    let phase = phase::classify_routed(&state, &c.config.streams, routes);
    let mut report = Report::new("migrate plan");
    report.next = phase.next_command().map(String::from);
    if let Phase::Mixed(_) = phase {
        report.ok = false;
        report.exit = EXIT_REFUSED;
    }
    report.phase_after = Some(phase);
    Ok(report)
}

#[cfg(test)]
mod tests;
