//! What a step must leave behind, checked: subject ownership, streams, durables where the
//! subjects are, and an end-to-end probe through each moved subject group (a sample event
//! published, its row seen in PostgreSQL, the durable's ack floor past it).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use serde::Serialize;

use super::phase::{
    classify_routed, core_subjects, effective_state, expect_for, holds_all, vendor_subjects, Expect,
    PhaseStep, Step,
};
use super::ProbeArgs;
use crate::cli::output::{error_text, Report};
use crate::cli::server::{consumers_of, subjects_state, Ctx, OpsError};
use crate::config::{ConsumerConfig, ConsumerKind, StreamRole};

/// `migrate verify <phase>`: a phase's checks alone.
pub async fn verify_only(phase: PhaseStep, args: ProbeArgs) -> Result<Report<()>, OpsError> {
    let c = Ctx::open().await?;
    let mut report = Report::new(&format!("migrate verify {}", phase.as_str()));
    let state = subjects_state(&c.js).await?;
    let routes = super::cutover::routes_now(&c, &state).await?;
    report.phase_before = Some(classify_routed(&state, &c.config.streams, routes));
    let expect = expect_for(Step::Forward(phase), &c.config.streams);
    // The checks made before an error stay in the report, with the error as a failed check.
    if let Err(e) = verify(&c, &expect, &args, &mut report).await {
        report.check_failed("verify", &e);
    }
    super::steps::point_back(Step::Forward(phase), &mut report);
    Ok(report)
}

/// The kind whose sample event probes a stream role's subject group.
fn probe_kind(role: StreamRole) -> ConsumerKind {
    match role {
        StreamRole::Core => ConsumerKind::Hrv,
        StreamRole::Vendor => ConsumerKind::Oura,
    }
}

/// The checks: subject ownership, streams, durables where the subjects are, and the
/// end-to-end probe through each moved subject group.
pub async fn verify<T: Serialize>(
    c: &Ctx,
    expect: &Expect,
    args: &ProbeArgs,
    report: &mut Report<T>,
) -> Result<(), OpsError> {
    let n = &c.config.streams;
    let raw = subjects_state(&c.js).await?;
    // Where publishes land: a group the mapping routes entirely counts as on its new stream.
    let routes = super::cutover::routes_now(c, &raw).await?;
    let (state, _) = effective_state(&raw, n, routes);
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
            let exists = c.has_durable(home, &cc.durable).await;
            report.check(format!("durable {} on {home}", cc.durable), exists, "");
        }
        probes.push((probe_kind(role), home.clone()));
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
        .map_err(|source| OpsError::Database { source })?;
    for (kind, home) in probes {
        let Some(cc) = c.config.consumer(kind) else {
            continue;
        };
        match probe(c, &pool, cc, &home, timeout).await {
            Ok(detail) => report.check(format!("probe {kind} via {home}"), true, detail),
            Err(e) => report.check(format!("probe {kind} via {home}"), false, error_text(&e)),
        }
    }
    pool.close().await;
    // The probes' publishes are already acknowledged; this only makes the goodbye tidy.
    if let Err(e) = c.client.flush().await {
        tracing::debug!(error = %e, "flush after the probes failed");
    }
    Ok(())
}

pub const PROBE_USER: &str = "migration-probe";

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("publish")]
    Publish {
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("publish ack")]
    PublishAck {
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("probe stored in {stored} instead of {home}")]
    WrongStream { stored: String, home: String },
    #[error(
        "after {}s: row {}, {durable} ack floor {floor} < {sequence} — is a multi-mode daemon running?",
        waited.as_secs(),
        if *stored { "stored" } else { "missing" }
    )]
    NotProcessed {
        waited: Duration,
        stored: bool,
        durable: String,
        floor: u64,
        sequence: u64,
    },
}

/// Publishes a probe event, waits for its row in PostgreSQL and for the durable's ack floor
/// to pass it. The probe rows (user id `migration-probe`) stay in the tables.
async fn probe(
    c: &Ctx,
    pool: &sqlx::PgPool,
    cc: &ConsumerConfig,
    home: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let now = Utc::now();
    let id = crate::pipeline::probe_msg_id(cc.kind, PROBE_USER, now);
    let body = crate::pipeline::probe_event(cc.kind, PROBE_USER, now);
    let msg = jetstream::message::PublishMessage::build()
        .payload(body.to_string().into())
        .message_id(id.clone());
    let started = Instant::now();
    let ack =
        c.js.send_publish(cc.filter_subject.clone(), msg)
            .await
            .map_err(|source| ProbeError::Publish { source })?
            .await
            .map_err(|source| ProbeError::PublishAck { source })?;
    if ack.stream != home {
        return Err(ProbeError::WrongStream {
            stored: ack.stream,
            home: home.to_string(),
        });
    }
    let deadline = started + timeout;
    loop {
        let since = now - chrono::Duration::milliseconds(1);
        let rows = crate::store::probe_rows(pool, cc.kind, PROBE_USER, &id, since)
            .await
            .unwrap_or(0);
        let floor = match c.js.get_stream(home).await {
            Ok(s) => s
                .consumer_info(&cc.durable)
                .await
                .map(|i| i.ack_floor.stream_sequence)
                .unwrap_or(0),
            Err(_) => 0,
        };
        if rows > 0 && floor >= ack.sequence {
            return Ok(format!(
                "row stored and {} ack floor at {floor} ≥ {} after {} ms",
                cc.durable,
                ack.sequence,
                started.elapsed().as_millis()
            ));
        }
        if Instant::now() > deadline {
            return Err(ProbeError::NotProcessed {
                waited: timeout,
                stored: rows > 0,
                durable: cc.durable.clone(),
                floor,
                sequence: ack.sequence,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
