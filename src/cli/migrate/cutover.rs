//! The steps of the mapping cut-over ([`super::mapping`] has the mechanism): route a subject
//! group to its new stream, all at once or by a weighted share, back again, and — in phase 3 —
//! hand the real subjects to the new stream and leave no mapping and no private namespace
//! behind. Every change of route is verified by probe publishes before the step goes on.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;

use super::mapping::{self, Block, Observation, Routes};
use super::phase::{
    effective_state, group_subjects, holds_all, mapped_group, move_refusal, private_group, Move, Step,
    Subjects,
};
use super::StepArgs;
use crate::cli::output::{ActionKind, Report};
use crate::cli::server::{consumers_of, Ctx, OpsError};
use crate::config::StreamRole;

/// How a subject group changes stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cutover {
    /// An account subject mapping switches publishes between the streams (nats-server ≥ 2.10):
    /// no publish fails, the shift can be gradual, rollback is a mapping change.
    Mapping,
    /// Remove the subjects from one stream, then add them to the other: publishes to them fail
    /// for the milliseconds in between and must be retried by the publisher.
    Move,
}

/// Probes per round when a group must be entirely on one side, and when it is split.
const PROBES_WHOLE: usize = 200;
const PROBES_SPLIT: usize = 400;
/// How far the observed share of a split may be from the asked one: 4 standard deviations of
/// the share over [`PROBES_SPLIT`] probes, in percentage points (±6 at 10 %, ±10 at 50 %), so a
/// round of a correctly applied split fails about once in 15,000 (and is probed again).
pub fn split_tolerance(percent: u8) -> f64 {
    let p = f64::from(percent) / 100.0;
    4.0 * (p * (1.0 - p) / PROBES_SPLIT as f64).sqrt() * 100.0
}
/// Probes per group when `migrate plan` or a step reads where publishes go now.
const PROBES_READ: usize = 100;
/// Probes (through every server) that must all be mapped before phase 3 takes a group's
/// subjects off the legacy stream: a 99 % split passes 2,000 of them with probability 2e-9.
const PROBES_HANDOVER: usize = 2000;

/// The cut-over a step uses: the one asked for; else mapping when the server is ≥ 2.10 and
/// move before. `Err` is the refusal (mapping asked of a 2.9 server).
pub fn resolve(asked: Option<Cutover>, version: &str) -> Result<Cutover, String> {
    let capable = crate::server_version::parse(version).is_some_and(|v| v >= mapping::MIN_SERVER);
    match asked {
        Some(Cutover::Move) => Ok(Cutover::Move),
        Some(Cutover::Mapping) if !capable => Err(format!(
            "--cutover mapping needs nats-server 2.10 or later (stream subject transforms); the server reports {version}: use --cutover move (publishes to the moved subjects fail for a few milliseconds and must be retried)"
        )),
        Some(Cutover::Mapping) => Ok(Cutover::Mapping),
        None if capable => Ok(Cutover::Mapping),
        None => Ok(Cutover::Move),
    }
}

/// Percent of each group's publishes the account mapping sends to the group's new stream now,
/// read with probes; 0 without probing for a group the mapping cannot route (its new stream
/// does not listen on the private namespace, or the legacy stream no longer holds its subjects).
pub async fn routes_now(c: &Ctx, state: &Subjects) -> Result<Routes, OpsError> {
    let mut routes = Routes { vendor: 0, core: 0 };
    for role in [StreamRole::Vendor, StreamRole::Core] {
        if !mapped_group(state, &c.config.streams, role) {
            continue;
        }
        let obs = mapping::observe(&c.client, &c.js, role, PROBES_READ)
            .await
            .map_err(|e| OpsError::nats("probing where publishes go", e))?;
        routes = routes.with(role, obs.mapped_percent().round() as u8);
    }
    Ok(routes)
}

/// The routes the next mapping block starts from: the config file's state line when the tool
/// manages a file, else what the probes saw.
fn base_routes(args: &StepArgs, observed: Routes) -> Routes {
    match args.nats_config.as_deref().map(mapping::read_state) {
        Some(Ok(Some(Block::Routes(r)))) => r,
        Some(Ok(Some(Block::Cleared))) => Routes { vendor: 0, core: 0 },
        _ => observed,
    }
}

/// `migrate phase1|phase2|shift|rollback` with the mapping cut-over: the group's new stream
/// listens on the private namespace, the durables exist there (and on the legacy stream while it
/// keeps a share), then the mapping routes `percent` of the group's publishes to it, verified
/// by probes.
#[allow(clippy::too_many_arguments)]
pub async fn route_group(
    c: &Ctx,
    step: Step,
    role: StreamRole,
    percent: u8,
    state: &Subjects,
    routes: Routes,
    args: &StepArgs,
    report: &mut Report<()>,
) -> bool {
    let n = &c.config.streams;
    let new_stream = n.primary(role).to_string();
    let group = group_subjects(role);
    let (effective, _) = effective_state(state, n, routes);
    let forward = percent > 0;
    // The refusals of the move steps (DLQ and streams present, the plan's order), on the
    // subjects as publishers see them.
    let m = Move::new(role, forward);
    if let Some(why) = move_refusal(step, &m, &effective, n) {
        report.refuse(why);
        return false;
    }
    if !holds_all(state, &n.legacy, &group) {
        if holds_all(state, &new_stream, &group) && percent == 100 {
            report.action(
                ActionKind::SubjectsInPlace,
                format!("subjects {group:?} already on {new_stream}"),
                "nothing to route",
            );
            return true;
        }
        report.refuse(format!(
            "{} does not hold {group:?} (they were moved with --cutover move, or phase3 finished the cut-over): the mapping cannot route them; use --cutover move",
            n.legacy
        ));
        return false;
    }
    if role == StreamRole::Vendor && percent < 100 && routes.core > 0 {
        report.refuse(format!(
            "{} % of the core subjects go to {}: run `normalize-service migrate rollback phase2` first",
            routes.core, n.core
        ));
        return false;
    }
    if !args.yes && !args.dry_run {
        report.refuse(format!(
            "routing {percent} % of {group:?} to {new_stream} (the rest to {}) changes where publishes go; no publish fails; re-run with --yes (or --dry-run)",
            n.legacy
        ));
        return false;
    }
    // Every server must be reachable for the probes before anything changes.
    if !args.dry_run {
        if let Err(why) = servers(c, args).await {
            report.refuse(why);
            return false;
        }
    }
    if !listen_privately(c, role, args, report).await {
        return false;
    }
    // A durable on every stream the mapping sends publishes to: the new one, and the legacy
    // one while it still gets a share (after a rollback, all of it). A daemon under
    // `TOPOLOGY_PROVISION=off` consumes only durables that exist.
    let mut homes = vec![new_stream.clone()];
    if percent < 100 {
        homes.push(n.legacy.clone());
    }
    for cc in consumers_of(&c.config, role) {
        for home in &homes {
            if args.dry_run {
                report.action(
                    ActionKind::CreateConsumer,
                    format!("ensure durable {} on {home}", cc.durable),
                    "dry run",
                );
            } else {
                c.ensure_durable(cc, home, report).await;
            }
        }
    }
    if !report.ok {
        return false;
    }
    let block = Block::Routes(base_routes(args, routes).with(role, percent));
    if !apply(args, block, report) {
        return false;
    }
    if args.dry_run {
        return true;
    }
    let expect = Expected {
        percent,
        mapped_home: new_stream.clone(),
        unmapped_home: n.legacy.clone(),
    };
    await_route(c, role, &expect, args, report).await
}

/// Makes the new stream of `role` listen on its private namespace with the transform (its
/// placeholder subject dropped); leaves a stream that already does alone.
async fn listen_privately(c: &Ctx, role: StreamRole, args: &StepArgs, report: &mut Report<()>) -> bool {
    let name = c.config.streams.primary(role).to_string();
    let mut config = match c.js.get_stream(&name).await {
        Ok(s) => s.cached_info().config.clone(),
        Err(e) => {
            report.check_failed(format!("stream {name}"), &e);
            return false;
        }
    };
    let private = mapping::private_subjects(role);
    let transform = mapping::transform();
    let listens = mapping::listens_privately(&config.subjects, role)
        && config.subject_transform.as_ref() == Some(&transform);
    if listens {
        report.action(
            ActionKind::StreamUpToDate,
            format!(
                "{name} listens on {private:?} ({} → {})",
                transform.source, transform.destination
            ),
            "in place",
        );
        return true;
    }
    config.subjects.retain(|s| *s != name);
    for p in &private {
        if !config.subjects.contains(p) {
            config.subjects.push(p.clone());
        }
    }
    config.subject_transform = Some(transform.clone());
    let what = format!(
        "{name}: subjects → {:?}, transform {} → {}",
        config.subjects, transform.source, transform.destination
    );
    if args.dry_run {
        report.action(ActionKind::UpdateStream, what, "dry run");
        return true;
    }
    match c.js.update_stream(config).await {
        Ok(info) if info.config.subject_transform.as_ref() == Some(&transform) => {
            report.action(ActionKind::UpdateStream, what, "done");
            true
        }
        Ok(_) => {
            report.check(
                format!("{name} keeps the subject transform"),
                false,
                "the server dropped it (nats-server before 2.10?)",
            );
            false
        }
        Err(e) => {
            report.check_failed(what, &e);
            false
        }
    }
}

/// Writes the block into `--nats-config` (and reloads the server with `--reload-pid`), or
/// prints it for the operator (on stderr, so `--json` output stays one document).
fn apply(args: &StepArgs, block: Block, report: &mut Report<()>) -> bool {
    let statement = mapping::mappings_statement(block);
    let one_line = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    if args.dry_run {
        report.action(ActionKind::ApplyMapping, one_line, "dry run");
        return true;
    }
    match &args.nats_config {
        Some(path) => match mapping::write_block(path, block, args.reload_pid) {
            Ok(()) => {
                let status = match args.reload_pid {
                    Some(pid) => format!("written to {}; SIGHUP sent to pid {pid}", path.display()),
                    None => format!("written to {}; reload the server(s) now", path.display()),
                };
                report.action(ActionKind::ApplyMapping, one_line, status);
                true
            }
            Err(e) => {
                report.check_failed("apply the mapping", &e);
                false
            }
        },
        None => {
            let account = args.account.as_deref().unwrap_or("<ACCOUNT>");
            eprintln!(
                "\nApply this mapping to the account the publishers use ({}), then reload the servers \
                 (`nats-server --signal reload`, SIGHUP, or your config management); a server config \
                 holds it at the top level for the default account, inside `accounts {{ NAME {{ … }} }}` \
                 otherwise:\n\n{}\n\nOperator mode (JWT):\n  {}\n\nWaiting up to {} s for probes to show it in effect …",
                account,
                indent(&statement),
                mapping::nsc_commands(block, account).join("\n  "),
                mapping_wait(args).as_secs()
            );
            report.action(ActionKind::ApplyMapping, one_line, "printed for the operator");
            true
        }
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn mapping_wait(args: &StepArgs) -> Duration {
    Duration::from_secs(args.mapping_timeout)
}

/// What the probes must see for a route to count as in effect.
struct Expected {
    /// Percent of the probes mapped to the private namespace.
    percent: u8,
    /// The stream that must store the mapped probes, and the one for the others.
    mapped_home: String,
    unmapped_home: String,
}

impl Expected {
    fn met_by(&self, obs: &Observation) -> bool {
        let share_ok = match self.percent {
            0 => obs.mapped == 0,
            100 => obs.mapped == obs.probes,
            p => {
                obs.mapped > 0
                    && obs.mapped < obs.probes
                    && (obs.mapped_percent() - f64::from(p)).abs() <= split_tolerance(p)
            }
        };
        let unmapped = obs.probes - obs.mapped;
        let stored_ok = if self.mapped_home == self.unmapped_home {
            obs.stored_in(&self.mapped_home) == obs.probes
        } else {
            obs.stored_in(&self.mapped_home) == obs.mapped && obs.stored_in(&self.unmapped_home) == unmapped
        };
        obs.failed == 0 && share_ok && stored_ok
    }

    fn describe(&self) -> String {
        match self.percent {
            0 => format!("none mapped, all stored in {}", self.unmapped_home),
            100 => format!("all mapped, all stored in {}", self.mapped_home),
            p => format!(
                "{p} ± {:.1} % mapped and stored in {}, the rest in {}",
                split_tolerance(p),
                self.mapped_home,
                self.unmapped_home
            ),
        }
    }
}

/// Probes until the route is in effect through every server of the cluster, or
/// `--mapping-timeout` passes. A step never goes on with an unverified route; a probe that got
/// no PubAck on the way is a publish that would have failed, and fails the step's zero-gap check.
async fn await_route(
    c: &Ctx,
    role: StreamRole,
    expect: &Expected,
    args: &StepArgs,
    report: &mut Report<()>,
) -> bool {
    let per_round = if matches!(expect.percent, 0 | 100) {
        PROBES_WHOLE
    } else {
        PROBES_SPLIT
    };
    await_route_with(c, role, expect, per_round, args, report).await
}

async fn await_route_with(
    c: &Ctx,
    role: StreamRole,
    expect: &Expected,
    per_round: usize,
    args: &StepArgs,
    report: &mut Report<()>,
) -> bool {
    let started = Instant::now();
    let deadline = started + mapping_wait(args);
    let group = group_subjects(role);
    let what = format!("mapping of {group:?} in effect");
    let servers = match servers(c, args).await {
        Ok(s) => s,
        Err(why) => {
            report.check(what, false, why);
            return false;
        }
    };
    let (mut probes, mut failed) = (0usize, 0usize);
    let mut pending: Vec<&Server> = servers.iter().collect();
    let mut seen = Vec::new();
    loop {
        let mut still = Vec::new();
        for server in pending {
            let obs = match mapping::observe(&server.client, &server.js, role, per_round).await {
                Ok(obs) => obs,
                Err(e) => {
                    report.check(what, false, format!("through {}: {e}", server.name));
                    return false;
                }
            };
            probes += obs.probes;
            failed += obs.failed;
            if expect.met_by(&obs) {
                seen.push(format!("{}: {}", server.name, obs.describe()));
            } else if Instant::now() >= deadline {
                report.check(
                    what,
                    false,
                    format!(
                        "not within {} s through {}: {} (expected {}); the step did not go on",
                        args.mapping_timeout,
                        server.name,
                        obs.describe(),
                        expect.describe()
                    ),
                );
                return false;
            } else {
                still.push(server);
            }
        }
        if still.is_empty() {
            report.check(
                what,
                true,
                format!(
                    "after {} ms through {} server(s): {} (expected {})",
                    started.elapsed().as_millis(),
                    servers.len(),
                    seen.join("; "),
                    expect.describe()
                ),
            );
            report.check(
                "no probe publish failed",
                failed == 0,
                format!("{failed} of {probes} probes without PubAck"),
            );
            return failed == 0;
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A server of the cluster, connected to directly for probes.
struct Server {
    name: String,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

/// The servers to probe through, each with its own connection: the `--server` URLs when
/// given, else the server the command is connected to and every other server its INFO
/// advertises (`connect_urls`). A mapping is applied per server at its own reload, so a route
/// counts as in effect only when probes through each of them show it. A clustered server that
/// advertises no peer (`no_advertise`) is refused without `--server`: probing one server of a
/// cluster would prove nothing about the others. Any server that cannot be reached fails.
async fn servers(c: &Ctx, args: &StepArgs) -> Result<Vec<Server>, String> {
    let info = c.client.server_info();
    let configured = c.config.nats.urls.first().map(String::as_str);
    let targets: Vec<String> = if args.servers.is_empty() {
        if info.cluster.as_deref().is_some_and(|c| !c.is_empty()) && info.connect_urls.is_empty() {
            return Err(format!(
                "server {} is in cluster {:?} but advertises no other server (no_advertise?): list every server with --server URL",
                info.server_name,
                info.cluster.clone().unwrap_or_default()
            ));
        }
        info.connect_urls
            .iter()
            .map(|peer| {
                peer_url(configured, peer)
                    .ok_or_else(|| format!("cannot build a URL for cluster server {peer}"))
            })
            .collect::<Result<_, _>>()?
    } else {
        args.servers.clone()
    };
    let mut out = vec![Server {
        name: info.server_name.clone(),
        client: c.client.clone(),
        js: c.js.clone(),
    }];
    for url in targets {
        let cfg = crate::nats::for_server(&c.config.nats, &url);
        let shown = crate::redact::redact_url(&url);
        let client = crate::nats::connect_now(&cfg, Duration::from_secs(5))
            .await
            .map_err(|e| format!("cannot connect to {shown} to probe through it: {e} (list reachable addresses with --server)"))?;
        let name = client.server_info().server_name;
        if out.iter().any(|s| s.name == name) {
            continue;
        }
        let js = async_nats::jetstream::new(client.clone());
        out.push(Server { name, client, js });
    }
    Ok(out)
}

/// `peer` (`host:port` from INFO) with the scheme of the configured URL. No credentials: the
/// connection takes them as every other one does ([`crate::nats::for_server`]).
fn peer_url(configured: Option<&str>, peer: &str) -> Option<String> {
    let base = configured.unwrap_or("nats://127.0.0.1:4222");
    let mut url = url::Url::parse(base).ok()?;
    url.set_password(None).ok()?;
    url.set_username("").ok()?;
    let (host, port) = peer.rsplit_once(':')?;
    // An IPv6 address is set in brackets (`url` refuses it bare).
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let host = if bare.contains(':') {
        format!("[{bare}]")
    } else {
        bare.to_string()
    };
    url.set_host(Some(&host)).ok()?;
    url.set_port(Some(port.parse().ok()?)).ok()?;
    Some(url.to_string().trim_end_matches('/').to_string())
}

/// Phase 3 with the mapping cut-over, for each group the mapping routes entirely to its new
/// stream while the legacy stream still holds its subjects: the legacy stream lets go of them,
/// the new stream takes them beside its private namespace, the mapping goes back to identity
/// (publishes now land there directly), then the private namespace and the transform go. Last,
/// the mappings block is emptied. No step leaves a subject without a stream.
pub async fn finish(
    c: &Ctx,
    state: &Subjects,
    routes: Routes,
    args: &StepArgs,
    report: &mut Report<()>,
) -> bool {
    let n = &c.config.streams;
    // Every group whose new stream still listens privately, wherever an interrupted run left it:
    // each sub-step below is skipped when already done.
    let roles: Vec<StreamRole> = [StreamRole::Vendor, StreamRole::Core]
        .into_iter()
        .filter(|r| private_group(state, n, *r))
        .collect();
    let mut current = base_routes(args, routes);
    for role in &roles {
        let role = *role;
        let new_stream = n.primary(role).to_string();
        let group = group_subjects(role);
        // a. The legacy stream lets go (every publish is mapped to the new stream).
        let legacy_holds = state
            .get(&n.legacy)
            .is_some_and(|subs| group.iter().any(|g| subs.contains(g)));
        if legacy_holds
            && !update_subjects(c, &n.legacy, args, report, |subs| {
                subs.retain(|s| !group.contains(s));
                if subs.is_empty() {
                    subs.push(n.legacy.clone());
                }
            })
            .await
        {
            return false;
        }
        // b. The new stream takes the real subjects beside its private namespace.
        if !holds_all(state, &new_stream, &group)
            && !update_subjects(c, &new_stream, args, report, |subs| {
                for g in &group {
                    if !subs.contains(g) {
                        subs.push(g.clone());
                    }
                }
            })
            .await
        {
            return false;
        }
        // c. Identity mapping: publishes reach the new stream directly.
        current = current.with(role, 0);
        if !apply(args, Block::Routes(current), report) {
            return false;
        }
        let direct = Expected {
            percent: 0,
            mapped_home: new_stream.clone(),
            unmapped_home: new_stream.clone(),
        };
        if !args.dry_run && !await_route(c, role, &direct, args, report).await {
            return false;
        }
        // d. The private namespace and the transform go.
        if !drop_private(c, role, args, report).await {
            return false;
        }
    }
    // The end state: no mapping at all (an empty block, which a reload applies).
    let file_state = args
        .nats_config
        .as_deref()
        .and_then(|p| mapping::read_state(p).ok().flatten());
    if roles.is_empty() {
        match (&args.nats_config, file_state) {
            // A managed file: cleared already, or never used.
            (Some(_), None | Some(Block::Cleared)) => return true,
            (Some(_), Some(Block::Routes(_))) => {}
            // Printed for the operator: a re-run cannot know whether the empty block was
            // applied; say it, without waiting (nothing routes through a mapping any more).
            (None, _) => {
                report.action(
                    ActionKind::Nothing,
                    "no group is routed by a mapping",
                    "if this migration's mappings are still in the server config, leave `mappings = { }` there (identity entries are harmless)",
                );
                return true;
            }
        }
    }
    if !apply(args, Block::Cleared, report) {
        return false;
    }
    if args.dry_run {
        return true;
    }
    for role in [StreamRole::Vendor, StreamRole::Core] {
        let home = n.primary(role).to_string();
        let direct = Expected {
            percent: 0,
            mapped_home: home.clone(),
            unmapped_home: home,
        };
        if !await_route(c, role, &direct, args, report).await {
            return false;
        }
    }
    true
}

/// Whether phase 3 can finish the mapping cut-over: `Some(refusal)` when a group the mapping
/// routes is not entirely on its new stream. Every such group is checked with 2,000 probes
/// through every server, all of which must be mapped and stored in the new stream (a 99 %
/// split would pass the 100 probes of `routes` too often); a `--nats-config` state line below
/// 100 refuses at once. A connection or probe failure is reported as what it is.
pub async fn finish_refusal(c: &Ctx, state: &Subjects, routes: Routes, args: &StepArgs) -> Option<String> {
    let n = &c.config.streams;
    let written = args.nats_config.as_deref().map(mapping::read_state);
    for role in [StreamRole::Vendor, StreamRole::Core] {
        if !mapped_group(state, n, role) {
            continue;
        }
        let next = match role {
            StreamRole::Vendor => "phase1 --yes",
            StreamRole::Core => "phase2 --yes",
        };
        let group = group_subjects(role);
        let short = |percent: String| {
            Some(format!(
                "{percent} of {group:?} go to {}: finish the shift first (`normalize-service migrate {next}`)",
                n.primary(role)
            ))
        };
        if routes.get(role) < 100 {
            return short(format!("about {} %", routes.get(role)));
        }
        if let Some(Ok(Some(Block::Routes(r)))) = &written {
            if r.get(role) < 100 {
                return short(format!("{} % (the state line of --nats-config)", r.get(role)));
            }
        }
        let expect = Expected {
            percent: 100,
            mapped_home: n.primary(role).to_string(),
            unmapped_home: n.legacy.clone(),
        };
        let mut probe_report = Report::<()>::new("hand-over check");
        let once = StepArgs {
            mapping_timeout: 0,
            ..args.clone()
        };
        if !await_route_with(c, role, &expect, PROBES_HANDOVER, &once, &mut probe_report).await {
            let detail = probe_report
                .checks
                .iter()
                .filter(|i| i.ok == Some(false))
                .map(|i| i.status.clone())
                .collect::<Vec<_>>()
                .join("; ");
            return Some(format!(
                "the hand-over check of {group:?} ({PROBES_HANDOVER} probes through every server, all mapped to {}) failed: {detail}; nothing was changed",
                n.primary(role)
            ));
        }
    }
    None
}

/// Updates a stream's subject list with `edit` (a dry run only reports it).
async fn update_subjects(
    c: &Ctx,
    stream: &str,
    args: &StepArgs,
    report: &mut Report<()>,
    edit: impl FnOnce(&mut Vec<String>),
) -> bool {
    update_stream(c, stream, args, report, |config| {
        edit(&mut config.subjects);
        format!("{stream}: subjects → {:?}", config.subjects)
    })
    .await
}

/// Removes the private namespace subjects and the transform from the new stream of `role`.
async fn drop_private(c: &Ctx, role: StreamRole, args: &StepArgs, report: &mut Report<()>) -> bool {
    let name = c.config.streams.primary(role).to_string();
    let private = mapping::private_subjects(role);
    update_stream(c, &name, args, report, |config| {
        config.subjects.retain(|s| !private.contains(s));
        config.subject_transform = None;
        format!("{name}: subjects → {:?}, no transform", config.subjects)
    })
    .await
}

/// Reads a stream's config, changes it with `edit` (which says what it did), and updates the
/// stream; a dry run only reports it.
async fn update_stream(
    c: &Ctx,
    stream: &str,
    args: &StepArgs,
    report: &mut Report<()>,
    edit: impl FnOnce(&mut async_nats::jetstream::stream::Config) -> String,
) -> bool {
    let mut config = match c.js.get_stream(stream).await {
        Ok(s) => s.cached_info().config.clone(),
        Err(e) => {
            report.check_failed(format!("stream {stream}"), &e);
            return false;
        }
    };
    let what = edit(&mut config);
    if args.dry_run {
        report.action(ActionKind::UpdateStream, what, "dry run");
        return true;
    }
    match c.js.update_stream(config).await {
        Ok(_) => {
            report.action(ActionKind::UpdateStream, what, "done");
            true
        }
        Err(e) => {
            report.check_failed(what, &e);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_url_takes_the_scheme_not_the_credentials() {
        assert_eq!(
            peer_url(Some("tls://svc:pw@a:4222"), "10.0.0.2:4223").as_deref(),
            Some("tls://10.0.0.2:4223")
        );
        assert_eq!(
            peer_url(Some("nats://t0k@a:4222"), "[::1]:4222").as_deref(),
            Some("nats://[::1]:4222")
        );
        assert_eq!(peer_url(None, "b:4222").as_deref(), Some("nats://b:4222"));
    }

    #[test]
    fn the_default_cut_over_follows_the_server_version() {
        assert_eq!(resolve(None, "2.14.0"), Ok(Cutover::Mapping));
        assert_eq!(resolve(None, "2.10.0"), Ok(Cutover::Mapping));
        assert_eq!(resolve(None, "2.9.10"), Ok(Cutover::Move));
        assert_eq!(resolve(Some(Cutover::Move), "2.14.0"), Ok(Cutover::Move));
        let refused = resolve(Some(Cutover::Mapping), "2.9.10").unwrap_err();
        assert!(
            refused.contains("2.9.10") && refused.contains("--cutover move"),
            "{refused}"
        );
        // An unreadable version is not taken for a capable one.
        assert_eq!(resolve(None, "unknown"), Ok(Cutover::Move));
        assert!(resolve(Some(Cutover::Mapping), "unknown").is_err());
    }

    fn obs(probes: usize, mapped: usize, stored: &[(&str, usize)], failed: usize) -> Observation {
        Observation {
            probes,
            mapped,
            stored: stored.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            failed,
        }
    }

    #[test]
    fn a_route_is_in_effect_only_when_every_probe_says_so() {
        let to = |percent| Expected {
            percent,
            mapped_home: "NEW".into(),
            unmapped_home: "OLD".into(),
        };
        assert!(to(100).met_by(&obs(20, 20, &[("NEW", 20)], 0)));
        assert!(!to(100).met_by(&obs(20, 19, &[("NEW", 19), ("OLD", 1)], 0)));
        assert!(!to(100).met_by(&obs(20, 20, &[("NEW", 19)], 1)), "a failed probe");
        assert!(to(0).met_by(&obs(20, 0, &[("OLD", 20)], 0)));
        assert!(
            !to(0).met_by(&obs(20, 0, &[("NEW", 20)], 0)),
            "stored in the wrong stream"
        );
        assert!(to(10).met_by(&obs(400, 52, &[("NEW", 52), ("OLD", 348)], 0)));
        assert!(
            !to(10).met_by(&obs(400, 0, &[("OLD", 400)], 0)),
            "not applied at all"
        );
        assert!(
            !to(10).met_by(&obs(400, 68, &[("NEW", 68), ("OLD", 332)], 0)),
            "17 %"
        );
        assert!(to(50).met_by(&obs(400, 230, &[("NEW", 230), ("OLD", 170)], 0)));
        assert!(!to(10).met_by(&obs(400, 100, &[("NEW", 100), ("OLD", 300)], 0)));
        assert!(
            !to(50).met_by(&obs(400, 200, &[("NEW", 150), ("OLD", 250)], 0)),
            "mapped but stored elsewhere"
        );
        let direct = Expected {
            percent: 0,
            mapped_home: "NEW".into(),
            unmapped_home: "NEW".into(),
        };
        assert!(direct.met_by(&obs(20, 0, &[("NEW", 20)], 0)));
        assert!(!direct.met_by(&obs(20, 3, &[("NEW", 20)], 0)), "still mapped");
    }
}
