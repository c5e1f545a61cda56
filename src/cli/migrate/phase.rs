//! The migration's pure core: which phase a server's subject ownership corresponds to, the
//! steps and what each must leave behind, and the refusals and subject lists of a move.

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::Serialize;

use super::mapping::Routes;
use crate::config::{StreamNames, StreamRole};
use crate::topology;

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

pub fn holds_all(state: &Subjects, stream: &str, subjects: &[String]) -> bool {
    state
        .get(stream)
        .is_some_and(|have| subjects.iter().all(|s| have.contains(s)))
}

pub fn holds_any(state: &Subjects, stream: &str, subjects: &[String]) -> bool {
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
    /// A weighted mapping sends about this percent of `vendor.>` to the vendor stream, the
    /// rest to the legacy stream (`migrate shift vendor N`).
    VendorShifting(u8),
    /// The same for the core subjects, with `vendor.>` moved.
    CoreShifting(u8),
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
            Phase::VendorShifting(p) => {
                format!("shifting vendor.>: about {p} % of its publishes go to the vendor stream")
            }
            Phase::CoreShifting(p) => format!(
                "shifting the core subjects: about {p} % of their publishes go to the core stream (vendor.> moved)"
            ),
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
            Phase::VendorShifting(_) => Some(
                "normalize-service migrate shift vendor 100 --yes (or migrate rollback phase1 --yes)",
            ),
            Phase::CoreShifting(_) => Some(
                "normalize-service migrate shift core 100 --yes (or migrate rollback phase2 --yes)",
            ),
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

/// The phase with the mapping cut-over taken into account: `routes` (percent of each group's
/// publishes mapped to its new stream, from probes) counts a group mapped entirely as moved,
/// and a partly mapped group as shifting. Only groups whose new stream listens on the private
/// namespace while the legacy stream still holds their subjects are affected.
pub fn classify_routed(state: &Subjects, n: &StreamNames, routes: Routes) -> Phase {
    let (effective, shifting) = effective_state(state, n, routes);
    let phase = classify(&effective, n);
    match (shifting, &phase) {
        (Some((StreamRole::Vendor, p)), Phase::Prepared) => Phase::VendorShifting(p),
        (Some((StreamRole::Core, p)), Phase::VendorMoved) => Phase::CoreShifting(p),
        (Some((role, p)), _) => Phase::Mixed(format!(
            "{p} % of {:?} mapped to {} while the other group is not where the plan's order puts it ({})",
            group_subjects(role),
            n.primary(role),
            phase.describe()
        )),
        (None, _) => phase,
    }
}

/// The subject ownership as publishers see it: a group the mapping sends entirely to its new
/// stream counts as held by that stream (and not by the legacy one). Also the first group that
/// is split, with its percent.
pub fn effective_state(
    state: &Subjects,
    n: &StreamNames,
    routes: Routes,
) -> (Subjects, Option<(StreamRole, u8)>) {
    let mut effective = state.clone();
    let mut shifting = None;
    for role in [StreamRole::Vendor, StreamRole::Core] {
        let percent = routes.get(role);
        if percent == 0 || !mapped_group(state, n, role) {
            continue;
        }
        if percent < 100 {
            shifting.get_or_insert((role, percent));
            continue;
        }
        let group = group_subjects(role);
        let new_stream = n.primary(role).to_string();
        if let Some(legacy) = effective.get_mut(&n.legacy) {
            legacy.retain(|s| !group.contains(s));
        }
        if let Some(new) = effective.get_mut(&new_stream) {
            new.retain(|s| *s != new_stream);
            new.extend(group);
        }
    }
    (effective, shifting)
}

/// The subjects of a group (`vendor.>`; `athlete-ally.>`, `sleep.*`).
pub fn group_subjects(role: StreamRole) -> Vec<String> {
    match role {
        StreamRole::Core => core_subjects(),
        StreamRole::Vendor => vendor_subjects(),
    }
}

/// Whether the mapping routes a group: its new stream listens on the private namespace and
/// does not hold the group's real subjects yet (before phase 3 hands them over).
pub fn mapped_group(state: &Subjects, n: &StreamNames, role: StreamRole) -> bool {
    private_group(state, n, role) && !holds_all(state, n.primary(role), &group_subjects(role))
}

/// Whether a group's new stream listens on the private namespace (the mapping cut-over was
/// prepared for it and phase 3 has not finished it).
pub fn private_group(state: &Subjects, n: &StreamNames, role: StreamRole) -> bool {
    state
        .get(n.primary(role))
        .is_some_and(|subs| super::mapping::listens_privately(subs, role))
}

/// Which migration step moves a subject off the legacy stream.
pub fn step_for_subject(subject: &str) -> &'static str {
    if vendor_subjects().iter().any(|s| s == subject) {
        "normalize-service migrate phase1"
    } else {
        "normalize-service migrate phase2"
    }
}

/// A forward step (`migrate phaseN`, `migrate verify phaseN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PhaseStep {
    Phase0,
    Phase1,
    Phase2,
    Phase3,
}

/// A subject group `migrate shift` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Group {
    Vendor,
    Core,
}

impl Group {
    pub fn role(self) -> StreamRole {
        match self {
            Group::Vendor => StreamRole::Vendor,
            Group::Core => StreamRole::Core,
        }
    }
}

/// A subject move `migrate rollback` reverses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RollbackStep {
    Phase1,
    Phase2,
}

impl PhaseStep {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseStep::Phase0 => "phase0",
            PhaseStep::Phase1 => "phase1",
            PhaseStep::Phase2 => "phase2",
            PhaseStep::Phase3 => "phase3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Forward(PhaseStep),
    Rollback(RollbackStep),
    /// `migrate shift GROUP PERCENT` (mapping cut-over only).
    Shift(Group, u8),
}

/// The subject group a move step handles, the new stream's role, and its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub group: Vec<String>,
    pub role: StreamRole,
    /// legacy → new stream; otherwise new stream → legacy (a rollback).
    pub forward: bool,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Forward(PhaseStep::Phase0) => "migrate phase0",
            Step::Forward(PhaseStep::Phase1) => "migrate phase1",
            Step::Forward(PhaseStep::Phase2) => "migrate phase2",
            Step::Forward(PhaseStep::Phase3) => "migrate phase3",
            Step::Rollback(RollbackStep::Phase1) => "migrate rollback phase1",
            Step::Rollback(RollbackStep::Phase2) => "migrate rollback phase2",
            Step::Shift(Group::Vendor, _) => "migrate shift vendor",
            Step::Shift(Group::Core, _) => "migrate shift core",
        }
    }

    /// What to run when this step's checks or probes failed: never the next phase. A forward
    /// move is undone by its rollback; the other steps are re-run once the cause is fixed.
    pub fn recovery(self) -> &'static str {
        match self {
            Step::Forward(PhaseStep::Phase0) => {
                "fix the cause, then re-run `normalize-service migrate phase0` (nothing moved; it is idempotent)"
            }
            Step::Forward(PhaseStep::Phase1) => "normalize-service migrate rollback phase1 --yes",
            Step::Forward(PhaseStep::Phase2) => "normalize-service migrate rollback phase2 --yes",
            Step::Forward(PhaseStep::Phase3) => {
                "fix the cause, then re-run `normalize-service migrate phase3 --yes` (see `migrate plan`)"
            }
            Step::Rollback(RollbackStep::Phase1) => {
                "fix the cause, then re-run `normalize-service migrate rollback phase1 --yes`"
            }
            Step::Rollback(RollbackStep::Phase2) => {
                "fix the cause, then re-run `normalize-service migrate rollback phase2 --yes`"
            }
            Step::Shift(Group::Vendor, _) => "normalize-service migrate rollback phase1 --yes",
            Step::Shift(Group::Core, _) => "normalize-service migrate rollback phase2 --yes",
        }
    }
}

/// Where the runbook for a failed step is.
pub const FAILED_STEP_DOCS: &str = "docs/MIGRATION.md#a-step-failed";

impl Move {
    /// The group of the `role` stream, moved legacy → new (`forward`) or back.
    pub fn new(role: StreamRole, forward: bool) -> Move {
        let group = match role {
            StreamRole::Core => core_subjects(),
            StreamRole::Vendor => vendor_subjects(),
        };
        Move { group, role, forward }
    }
}

/// What a step leaves behind, to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Where `vendor.>` must be; `None` = not this step's business.
    pub vendor_home: Option<String>,
    pub core_home: Option<String>,
    pub new_streams: bool,
    pub exactly_three: bool,
}

pub fn expect_for(step: Step, n: &StreamNames) -> Expect {
    let (vendor_home, core_home, new_streams, exactly_three) = match step {
        Step::Rollback(RollbackStep::Phase1) => (Some(&n.legacy), None, false, false),
        Step::Rollback(RollbackStep::Phase2) => (None, Some(&n.legacy), false, false),
        Step::Forward(PhaseStep::Phase0) => (None, None, true, false),
        Step::Forward(PhaseStep::Phase1) => (Some(&n.vendor), None, true, false),
        Step::Forward(PhaseStep::Phase2) => (Some(&n.vendor), Some(&n.core), true, false),
        Step::Forward(PhaseStep::Phase3) => (Some(&n.vendor), Some(&n.core), true, true),
        // A partial shift has no single home; the shift checks the shares itself.
        Step::Shift(Group::Vendor, p) => (full_home(p, &n.vendor, &n.legacy), None, true, false),
        Step::Shift(Group::Core, p) => (Some(&n.vendor), full_home(p, &n.core, &n.legacy), true, false),
    };
    Expect {
        vendor_home: vendor_home.cloned(),
        core_home: core_home.cloned(),
        new_streams,
        exactly_three,
    }
}

fn full_home<'a>(percent: u8, new: &'a String, legacy: &'a String) -> Option<&'a String> {
    match percent {
        0 => Some(legacy),
        100 => Some(new),
        _ => None,
    }
}

/// The streams a move takes its subjects `from` and gives them `to`.
pub fn move_ends(m: &Move, n: &StreamNames) -> (String, String) {
    let new_stream = n.primary(m.role).to_string();
    if m.forward {
        (n.legacy.clone(), new_stream)
    } else {
        (new_stream, n.legacy.clone())
    }
}

/// Why a move step must not start in `state`, if it must not.
pub fn move_refusal(step: Step, m: &Move, state: &Subjects, n: &StreamNames) -> Option<String> {
    let (_, to) = move_ends(m, n);
    if !state.contains_key(&n.dlq) {
        return Some(format!(
            "{} missing: run `normalize-service migrate phase0` first",
            n.dlq
        ));
    }
    if !state.contains_key(&to) {
        return Some(format!(
            "stream {to} missing: {}",
            if m.forward {
                "run `normalize-service migrate phase0` first"
            } else {
                "cannot roll back to a deleted legacy stream; recreate it with `topology apply --mode single` after moving subjects off the new streams"
            }
        ));
    }
    match step {
        Step::Forward(PhaseStep::Phase2) if !holds_all(state, &n.vendor, &vendor_subjects()) => Some(
            "vendor.> is not on the vendor stream yet: run `normalize-service migrate phase1` first".into(),
        ),
        Step::Rollback(RollbackStep::Phase1) | Step::Shift(Group::Vendor, 0..=99)
            if holds_all(state, &n.core, &core_subjects()) =>
        {
            Some(
                "core subjects are on the core stream: run `normalize-service migrate rollback phase2` first"
                    .into(),
            )
        }
        Step::Shift(Group::Core, _) if !holds_all(state, &n.vendor, &vendor_subjects()) => Some(
            "vendor.> is not on the vendor stream yet: run `normalize-service migrate phase1` first".into(),
        ),
        Step::Forward(_) | Step::Rollback(_) | Step::Shift(..) => None,
    }
}

/// Whether the move is already done: the group is on `to` and nowhere on `from`.
pub fn already_moved(m: &Move, state: &Subjects, from: &str, to: &str) -> bool {
    holds_all(state, to, &m.group) && !holds_any(state, from, &m.group)
}

/// A stream other than the two ends whose subjects overlap the group (JetStream would refuse
/// the move, and this migration does not manage that stream).
pub fn unmanaged_overlap<'a>(m: &Move, state: &'a Subjects, from: &str, to: &str) -> Option<&'a str> {
    state
        .iter()
        .find(|(name, subs)| {
            name.as_str() != from
                && name.as_str() != to
                && m.group
                    .iter()
                    .any(|g| subs.iter().any(|s| topology::patterns_overlap(s, g)))
        })
        .map(|(name, _)| name.as_str())
}

/// The subjects `from` and `to` hold after the move: `from` keeps the rest (or its placeholder
/// when nothing is left), `to` drops its placeholder and gains the group.
pub fn moved_subjects(m: &Move, state: &Subjects, from: &str, to: &str) -> (Vec<String>, Vec<String>) {
    let from_subjects: Vec<String> = state
        .get(from)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !m.group.contains(s))
        .collect();
    let from_subjects = if from_subjects.is_empty() {
        placeholder(from)
    } else {
        from_subjects
    };
    let mut to_subjects: Vec<String> = state
        .get(to)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s != to)
        .collect();
    for g in &m.group {
        if !to_subjects.contains(g) {
            to_subjects.push(g.clone());
        }
    }
    (from_subjects, to_subjects)
}
