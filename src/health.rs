//! Shared health state: what each consumer loop reports about itself, and the JSON of
//! `/health`. The loops write; the HTTP handlers and the watchdog read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::{ConsumerKind, PerKind, StreamMode};

/// One consumer's state, as reported on `/health`.
#[derive(Debug, Clone, Default)]
pub struct ConsumerState {
    pub durable: String,
    /// The stream of the binding that takes new messages; `None` while unbound.
    pub stream: Option<String>,
    pub fallback: bool,
    /// Other streams whose durable is still being drained (live rebinding).
    pub draining: Vec<String>,
    /// Per stream consumed, its durable's (pending, ack pending, redelivered) from the last
    /// consumer info; `/health` shows the sums (two bindings are live during a migration).
    pub backlog: BTreeMap<String, Backlog>,
    pub last_pull_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    /// Last time the loop made progress (completed a pull or settled a message).
    pub last_progress: Option<Instant>,
    /// 3 × the pull expiry: no progress for longer means stalled.
    pub stall_after: Duration,
    pub stalled: bool,
    /// 3 × ack_wait: holding messages and settling none for longer means stuck.
    pub stuck_after: Duration,
    /// Messages are held (delivered to this process, not settled) and none was settled for
    /// `stuck_after`, while NATS and the database are up.
    pub stuck: bool,
    /// Messages delivered to this process and not settled yet (from [`Activity`]).
    pub held: u64,
    /// False after a dead-letter publish failed, until one succeeds or none has failed for
    /// [`DEAD_LETTER_FAILURE_KEPT`] or `stuck_after`, whichever is longer (no message waits for
    /// one any more: a held last delivery retries its dead letter within a third of ack_wait plus
    /// a PubAck timeout, a NAKed one comes back within the backoff).
    pub dead_letter_ok: bool,
    /// When the last dead-letter publish failed.
    pub dead_letter_failed_at: Option<Instant>,
    /// Why the consumer is unbound, for operators.
    pub bind_error: Option<String>,
}

/// The shortest time a failed dead letter keeps `deadLetter` at `unavailable` without a new
/// failure: longer than a retry of a held message (a third of ack_wait plus a PubAck timeout)
/// even with a short ack_wait, so the stuck check is not switched back on while it still fails.
pub const DEAD_LETTER_FAILURE_KEPT: Duration = Duration::from_secs(60);

/// One durable's counts from its consumer info.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub pending: u64,
    pub ack_pending: u64,
    pub redelivered: u64,
}

impl ConsumerState {
    /// The counts summed over the streams consumed now (the active one and those drained).
    pub fn backlog_total(&self) -> Backlog {
        let consumed =
            |stream: &String| self.stream.as_ref() == Some(stream) || self.draining.contains(stream);
        self.backlog
            .iter()
            .filter(|(stream, _)| consumed(stream))
            .fold(Backlog::default(), |t, (_, b)| Backlog {
                pending: t.pending + b.pending,
                ack_pending: t.ack_pending + b.ack_pending,
                redelivered: t.redelivered + b.redelivered,
            })
    }
}

/// What the watchdog last saw of a dependency (NATS, the database), and since when.
#[derive(Debug, Clone, Default)]
pub struct DependencyState {
    /// `None` until first observed.
    pub up: Option<bool>,
    /// When the current state began.
    pub since: Option<DateTime<Utc>>,
    since_instant: Option<Instant>,
    /// Why it is (or, once up again, was) down.
    pub error: Option<String>,
}

/// A change of a dependency's state, to be logged once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyChange {
    /// It went down (or was down when first observed).
    Down { error: String },
    /// It came back after `outage` down because of `cause`.
    Up { outage: Duration, cause: String },
    /// Up when first observed.
    FirstUp,
}

impl DependencyState {
    /// Records an observation; returns the change it makes, if any.
    fn observe(&mut self, now: Instant, result: Result<(), String>) -> Option<DependencyChange> {
        let previous = self.up;
        let changed = previous != Some(result.is_ok());
        if changed {
            self.since = Some(Utc::now());
        }
        let down_since = self.since_instant;
        if changed {
            self.since_instant = Some(now);
        }
        self.up = Some(result.is_ok());
        match result {
            Err(error) => {
                self.error = Some(error.clone());
                changed.then_some(DependencyChange::Down { error })
            }
            Ok(()) if !changed => None,
            Ok(()) => Some(match (previous, down_since) {
                (Some(false), Some(at)) => DependencyChange::Up {
                    outage: now.saturating_duration_since(at),
                    cause: self.error.clone().unwrap_or_default(),
                },
                _ => DependencyChange::FirstUp,
            }),
        }
    }
}

/// Dead letters stored since the last summary, for the periodic WARN line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterTally {
    pub by_reason: BTreeMap<&'static str, u64>,
    pub first_dlq_seq: u64,
    pub last_dlq_seq: u64,
}

impl DeadLetterTally {
    pub fn count(&self) -> u64 {
        self.by_reason.values().sum()
    }

    /// `reason=count` pairs, comma-separated.
    pub fn by_reason_text(&self) -> String {
        self.by_reason
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub struct Health {
    pub mode: StreamMode,
    dead_letters: Mutex<BTreeMap<ConsumerKind, DeadLetterTally>>,
    nats: Mutex<DependencyState>,
    database: Mutex<DependencyState>,
    consumers: Mutex<BTreeMap<ConsumerKind, ConsumerState>>,
    /// Per consumer kind, updated on every delivery and settlement without taking the lock.
    activity: PerKind<Activity>,
    shutting_down: AtomicBool,
    /// When the shutdown must be complete (`SHUTDOWN_TIMEOUT_MS` after it began).
    shutdown_deadline: Mutex<Option<Instant>>,
    database_ready: AtomicBool,
    /// NATS connected and the database answering, as the watchdog last saw them. While a
    /// dependency is down, waiting is not stalling: the stall and stuck clocks are held.
    dependencies_up: AtomicBool,
}

/// How many messages a consumer holds and when it last settled one.
pub struct Activity {
    epoch: Instant,
    held: AtomicI64,
    /// Milliseconds since `epoch` of the last settlement, or of the moment the consumer
    /// started holding messages after holding none (the stuck clock starts there).
    last_settled_ms: AtomicU64,
}

impl Activity {
    fn new(epoch: Instant) -> Activity {
        Activity {
            epoch,
            held: AtomicI64::new(0),
            last_settled_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `delta` messages started (+) or stopped (-) being held.
    pub fn held(&self, delta: i64) {
        // The stuck clock starts when holding starts: restart it before the count shows it.
        if delta > 0 && self.held.load(Ordering::Acquire) <= 0 {
            self.settled_now();
        }
        self.held.fetch_add(delta, Ordering::AcqRel);
    }

    pub fn settled_now(&self) {
        self.last_settled_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Restarts the stuck clock at `at` (the watchdog's notion of now).
    fn settled_at(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        self.last_settled_ms.fetch_max(ms, Ordering::AcqRel);
    }

    pub fn holding(&self) -> u64 {
        u64::try_from(self.held.load(Ordering::Acquire)).unwrap_or(0)
    }

    fn since_settled(&self, now: Instant) -> Duration {
        let at = self.epoch + Duration::from_millis(self.last_settled_ms.load(Ordering::Acquire));
        now.saturating_duration_since(at)
    }
}

/// A consumer's place in the watchdog's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub kind: ConsumerKind,
    pub stalled: bool,
    pub stuck: bool,
    pub held: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerJson {
    pub durable: String,
    pub stream: Option<String>,
    pub fallback: bool,
    pub draining: Vec<String>,
    pub pending: u64,
    pub ack_pending: u64,
    pub redelivered: u64,
    pub last_pull_at: Option<String>,
    pub last_message_at: Option<String>,
    pub stalled: bool,
    pub stuck: bool,
    pub held: u64,
    pub bound: bool,
    pub dead_letter: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One dependency on `/health`: its state now, since when (as the watchdog saw it change), and
/// why it is down.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DependencyJson {
    pub status: &'static str,
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthJson {
    pub status: &'static str,
    pub mode: &'static str,
    pub stream: Option<String>,
    pub consumers: BTreeMap<&'static str, ConsumerJson>,
    pub nats: &'static str,
    pub database: &'static str,
    /// `nats` and `database` in detail.
    pub dependencies: BTreeMap<&'static str, DependencyJson>,
    /// Why the instance is not ready (empty when ready); what `/health/ready` says too.
    pub not_ready: Vec<String>,
    pub version: &'static str,
}

/// `state` is the watchdog's; `up` is the answer of now, which wins for the status (the error
/// is shown only while down).
fn dependency_json(
    up: bool,
    up_text: &'static str,
    down_text: &'static str,
    state: DependencyState,
) -> DependencyJson {
    DependencyJson {
        status: if up { up_text } else { down_text },
        since: ts(state.since),
        error: if up { None } else { state.error },
    }
}

fn ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl Health {
    /// `consumers`: (kind, durable, pull expiry, ack_wait) of each consumer.
    pub fn new(mode: StreamMode, consumers: &[(ConsumerKind, String, Duration, Duration)]) -> Health {
        let epoch = Instant::now();
        let map = consumers
            .iter()
            .map(|(kind, durable, expires, ack_wait)| {
                (
                    *kind,
                    ConsumerState {
                        durable: durable.clone(),
                        stall_after: *expires * 3,
                        stuck_after: *ack_wait * 3,
                        dead_letter_ok: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Health {
            mode,
            consumers: Mutex::new(map),
            nats: Mutex::default(),
            database: Mutex::default(),
            dead_letters: Mutex::default(),
            activity: PerKind::new(|_| Activity::new(epoch)),
            shutting_down: AtomicBool::new(false),
            shutdown_deadline: Mutex::new(None),
            database_ready: AtomicBool::new(false),
            dependencies_up: AtomicBool::new(false),
        }
    }

    pub fn activity(&self, kind: ConsumerKind) -> &Activity {
        &self.activity[kind]
    }

    /// Counts a dead letter stored at `dlq_seq` for the next summary.
    pub fn count_dead_letter(&self, kind: ConsumerKind, reason: &'static str, dlq_seq: u64) {
        let mut map = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
        let t = map.entry(kind).or_default();
        if t.by_reason.is_empty() {
            t.first_dlq_seq = dlq_seq;
        }
        *t.by_reason.entry(reason).or_default() += 1;
        t.first_dlq_seq = t.first_dlq_seq.min(dlq_seq);
        t.last_dlq_seq = t.last_dlq_seq.max(dlq_seq);
    }

    /// The dead letters counted since the last call, per consumer that had any.
    pub fn take_dead_letters(&self) -> BTreeMap<ConsumerKind, DeadLetterTally> {
        std::mem::take(&mut *self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The watchdog's observation of NATS: `Err` carries why it is down.
    pub fn observe_nats(&self, now: Instant, result: Result<(), String>) -> Option<DependencyChange> {
        self.nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(now, result)
    }

    /// The watchdog's observation of the database: `Err` carries why it is down.
    pub fn observe_database(&self, now: Instant, result: Result<(), String>) -> Option<DependencyChange> {
        self.database
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(now, result)
    }

    pub fn nats_state(&self) -> DependencyState {
        self.nats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn database_state(&self) -> DependencyState {
        self.database.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Set by the watchdog from the NATS connection state and a database ping.
    pub fn set_dependencies_up(&self, up: bool) {
        self.dependencies_up.store(up, Ordering::SeqCst);
    }

    pub fn dependencies_up(&self) -> bool {
        self.dependencies_up.load(Ordering::SeqCst)
    }

    /// Applies a change to one consumer's state.
    pub fn update(&self, kind: ConsumerKind, f: impl FnOnce(&mut ConsumerState)) {
        let mut map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = map.get_mut(&kind) {
            f(state);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<ConsumerKind, ConsumerState> {
        self.consumers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Records when the shutdown must be complete; the first call wins.
    pub fn set_shutdown_deadline(&self, deadline: Instant) {
        let mut d = self.shutdown_deadline.lock().unwrap_or_else(|p| p.into_inner());
        d.get_or_insert(deadline);
    }

    pub fn shutdown_deadline(&self) -> Option<Instant> {
        *self.shutdown_deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Set once migrations have run: until then the consumers do not bind.
    pub fn set_database_ready(&self) {
        self.database_ready.store(true, Ordering::SeqCst);
    }

    pub fn database_ready(&self) -> bool {
        self.database_ready.load(Ordering::SeqCst)
    }

    /// Marks consumers stalled (the loop made no progress for 3 × expires) and stuck (holding
    /// messages and settling none for 3 × ack_wait). Both say something about *this process*:
    /// while NATS or the database is down a loop that waits is not wedged, so both clocks are
    /// held (restarted) and nothing is stalled or stuck; readiness reports the dependencies.
    pub fn check_stalls(&self, now: Instant) -> Vec<Verdict> {
        // A stopping process is bounded by its deadline and no longer pulls: neither stalled
        // nor stuck (liveness stays 200 while it drains), as while a dependency is down.
        let deps_up = self.dependencies_up() && !self.shutting_down();
        let mut map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        map.iter_mut()
            .map(|(kind, s)| {
                let activity = self.activity(*kind);
                s.held = activity.holding();
                let kept = s.stuck_after.max(DEAD_LETTER_FAILURE_KEPT);
                if !s.dead_letter_ok
                    && s.dead_letter_failed_at
                        .is_some_and(|t| now.saturating_duration_since(t) > kept)
                {
                    s.dead_letter_ok = true;
                }
                if deps_up {
                    s.stalled = s.stream.is_some()
                        && s.last_progress
                            .is_some_and(|p| now.saturating_duration_since(p) > s.stall_after);
                    // Messages held for a dead letter that cannot be stored wait on a
                    // dependency too (the DLQ stream): not stuck.
                    s.stuck = s.held > 0 && s.dead_letter_ok && activity.since_settled(now) > s.stuck_after;
                } else {
                    s.last_progress = s.last_progress.map(|p| p.max(now));
                    activity.settled_at(now);
                    s.stalled = false;
                    s.stuck = false;
                }
                Verdict {
                    kind: *kind,
                    stalled: s.stalled,
                    stuck: s.stuck,
                    held: s.held,
                }
            })
            .collect()
    }

    /// Liveness, evaluated now: no consumer stalled or stuck.
    pub fn live(&self) -> bool {
        self.check_stalls(Instant::now())
            .iter()
            .all(|v| !v.stalled && !v.stuck)
    }

    pub fn all_bound(&self) -> bool {
        self.snapshot().values().all(|s| s.stream.is_some())
    }

    /// Ready: not stopping, NATS connected, database answering, every consumer bound.
    pub fn ready(&self, nats_connected: bool, database_up: bool) -> bool {
        !self.shutting_down() && nats_connected && database_up && self.database_ready() && self.all_bound()
    }

    /// The failing readiness checks, each naming what fails and why; empty when ready.
    pub fn not_ready_reasons(&self, nats_connected: bool, database_up: bool) -> Vec<String> {
        let with_error = |what: &str, error: Option<String>| match error {
            Some(e) => format!("{what} ({e})"),
            None => what.to_string(),
        };
        let mut reasons = Vec::new();
        if self.shutting_down() {
            reasons.push("shutting down".to_string());
        }
        if !nats_connected {
            reasons.push(with_error("NATS disconnected", self.nats_state().error));
        }
        if !database_up {
            reasons.push(with_error("database unavailable", self.database_state().error));
        } else if !self.database_ready() {
            reasons.push("database not prepared yet (migrations)".to_string());
        }
        for (kind, s) in self.snapshot() {
            if s.stream.is_none() {
                reasons.push(with_error(&format!("consumer {kind} not bound"), s.bind_error));
            }
        }
        reasons
    }

    pub fn to_json(&self, nats_connected: bool, database_up: bool) -> HealthJson {
        let snapshot = self.snapshot();
        let ready = self.ready(nats_connected, database_up);
        let troubled = snapshot
            .values()
            .any(|s| s.stalled || s.stuck || !s.dead_letter_ok);
        let status = if !ready {
            "unavailable"
        } else if troubled {
            "degraded"
        } else {
            "ok"
        };
        let stream = snapshot.get(&ConsumerKind::Hrv).and_then(|s| s.stream.clone());
        let consumers = snapshot
            .into_iter()
            .map(|(kind, s)| {
                let bound = s.stream.is_some();
                let backlog = s.backlog_total();
                (
                    kind.as_str(),
                    ConsumerJson {
                        bound,
                        durable: s.durable,
                        stream: s.stream,
                        fallback: s.fallback,
                        draining: s.draining,
                        pending: backlog.pending,
                        ack_pending: backlog.ack_pending,
                        redelivered: backlog.redelivered,
                        last_pull_at: ts(s.last_pull_at),
                        last_message_at: ts(s.last_message_at),
                        stalled: s.stalled,
                        stuck: s.stuck,
                        held: self.activity(kind).holding(),
                        // Nothing bound has dead-lettered nothing: whether it could is unknown.
                        dead_letter: match (s.dead_letter_ok, bound) {
                            (false, _) => "unavailable",
                            (true, true) => "ok",
                            (true, false) => "unknown",
                        },
                        error: s.bind_error,
                    },
                )
            })
            .collect();
        HealthJson {
            status,
            mode: self.mode.as_str(),
            stream,
            consumers,
            nats: if nats_connected {
                "connected"
            } else {
                "disconnected"
            },
            database: if database_up { "connected" } else { "unavailable" },
            dependencies: [
                (
                    "nats",
                    dependency_json(nats_connected, "connected", "disconnected", self.nats_state()),
                ),
                (
                    "database",
                    dependency_json(database_up, "connected", "unavailable", self.database_state()),
                ),
            ]
            .into_iter()
            .collect(),
            not_ready: self.not_ready_reasons(nats_connected, database_up),
            version: crate::VERSION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_summed_over_the_streams_consumed_now() {
        let b = |pending, ack_pending, redelivered| Backlog {
            pending,
            ack_pending,
            redelivered,
        };
        let mut s = ConsumerState {
            stream: Some("AA_CORE_HOT".into()),
            draining: vec!["ATHLETE_ALLY_EVENTS".into()],
            ..ConsumerState::default()
        };
        s.backlog.insert("AA_CORE_HOT".into(), b(5, 2, 1));
        s.backlog.insert("ATHLETE_ALLY_EVENTS".into(), b(7, 1, 0));
        // A stream no longer consumed (its loop ended) does not count.
        s.backlog.insert("OLD".into(), b(100, 100, 100));
        assert_eq!(s.backlog_total(), b(12, 3, 1));
        s.draining.clear();
        assert_eq!(s.backlog_total(), b(5, 2, 1));
    }

    fn health() -> Health {
        Health::new(
            StreamMode::Multi,
            &[(
                ConsumerKind::Hrv,
                "d".into(),
                Duration::from_secs(1),
                Duration::from_secs(2),
            )],
        )
    }

    fn verdict(h: &Health, at: Instant) -> (bool, bool) {
        let v = h.check_stalls(at)[0];
        (v.stalled, v.stuck)
    }

    #[test]
    fn dependency_changes_are_reported_once_with_the_outage() {
        let h = health();
        let t0 = Instant::now();
        assert_eq!(h.observe_database(t0, Ok(())), Some(DependencyChange::FirstUp));
        assert_eq!(h.observe_database(t0, Ok(())), None);
        assert_eq!(
            h.observe_database(t0, Err("refused".into())),
            Some(DependencyChange::Down {
                error: "refused".into()
            })
        );
        assert_eq!(
            h.observe_database(t0 + Duration::from_secs(1), Err("timeout".into())),
            None
        );
        assert_eq!(
            h.observe_database(t0 + Duration::from_secs(3), Ok(())),
            Some(DependencyChange::Up {
                outage: Duration::from_secs(3),
                cause: "timeout".into()
            })
        );
        let s = h.database_state();
        assert_eq!(s.up, Some(true));
        assert!(s.since.is_some());
        assert_eq!(
            h.observe_nats(t0, Err("disconnected".into())),
            Some(DependencyChange::Down {
                error: "disconnected".into()
            })
        );
    }

    #[test]
    fn dead_letters_are_tallied_until_taken() {
        let h = health();
        assert!(h.take_dead_letters().is_empty());
        h.count_dead_letter(ConsumerKind::Hrv, "schema-invalid", 7);
        h.count_dead_letter(ConsumerKind::Hrv, "schema-invalid", 9);
        h.count_dead_letter(ConsumerKind::Hrv, "max-deliver", 8);
        let t = h.take_dead_letters().remove(&ConsumerKind::Hrv).unwrap();
        assert_eq!(t.count(), 3);
        assert_eq!((t.first_dlq_seq, t.last_dlq_seq), (7, 9));
        assert_eq!(t.by_reason_text(), "max-deliver=1,schema-invalid=2");
        assert!(h.take_dead_letters().is_empty());
    }

    #[test]
    fn not_ready_names_the_failing_checks() {
        let h = health();
        h.observe_database(Instant::now(), Err("connection refused".into()));
        let j = h.to_json(true, false);
        assert_eq!(
            j.not_ready,
            vec![
                "database unavailable (connection refused)".to_string(),
                "consumer hrv not bound".to_string()
            ]
        );
        assert_eq!(
            j.dependencies["database"].error.as_deref(),
            Some("connection refused")
        );
        assert!(j.dependencies["database"].since.is_some());
        assert_eq!(j.consumers["hrv"].dead_letter, "unknown", "nothing bound");
        h.set_database_ready();
        h.update(ConsumerKind::Hrv, |s| s.stream = Some("S".into()));
        let j = h.to_json(true, true);
        assert!(j.not_ready.is_empty(), "{:?}", j.not_ready);
        assert_eq!(j.consumers["hrv"].dead_letter, "ok");
        assert_eq!(j.dependencies["database"].error, None);
        let text = serde_json::to_value(&j).unwrap();
        assert!(text["notReady"].is_array() && text["dependencies"]["nats"]["status"].is_string());
    }

    #[test]
    fn readiness_needs_everything() {
        let h = health();
        h.set_database_ready();
        assert!(!h.ready(true, true), "unbound");
        h.update(ConsumerKind::Hrv, |s| s.stream = Some("AA_CORE_HOT".into()));
        assert!(h.ready(true, true));
        assert!(!h.ready(false, true));
        assert!(!h.ready(true, false));
        assert_eq!(h.to_json(true, true).status, "ok");
        let failed = Instant::now();
        h.update(ConsumerKind::Hrv, |s| {
            s.dead_letter_ok = false;
            s.dead_letter_failed_at = Some(failed);
        });
        assert_eq!(h.to_json(true, true).status, "degraded");
        // No dead letter has failed for the stuck period (3 × ack wait, at least a minute):
        // nothing waits for one.
        let stuck_after = h.snapshot()[&ConsumerKind::Hrv]
            .stuck_after
            .max(DEAD_LETTER_FAILURE_KEPT);
        h.check_stalls(failed + stuck_after);
        assert_eq!(h.to_json(true, true).status, "degraded", "not yet");
        h.check_stalls(failed + stuck_after + Duration::from_millis(1));
        assert_eq!(h.to_json(true, true).status, "ok", "no failure for 3 × ack wait");
        h.update(ConsumerKind::Hrv, |s| s.dead_letter_ok = false);
        assert_eq!(h.to_json(true, false).status, "unavailable");
        h.set_shutting_down();
        assert!(!h.ready(true, true));
    }

    #[test]
    fn stall_detection() {
        let h = health();
        h.set_dependencies_up(true);
        let t0 = Instant::now();
        h.update(ConsumerKind::Hrv, |s| {
            s.stream = Some("S".into());
            s.last_progress = Some(t0);
        });
        assert_eq!(verdict(&h, t0 + Duration::from_secs(2)), (false, false));
        assert_eq!(verdict(&h, t0 + Duration::from_secs(4)), (true, false));
        // live() looks at the clock now: a loop that last progressed 5 s ago is stalled.
        h.update(ConsumerKind::Hrv, |s| {
            s.last_progress = Instant::now().checked_sub(Duration::from_secs(5))
        });
        assert!(!h.live());
        h.update(ConsumerKind::Hrv, |s| s.last_progress = Some(Instant::now()));
        assert!(h.live());
        // A stopping process drains within its deadline: still live, however long since the
        // last pull.
        h.update(ConsumerKind::Hrv, |s| {
            s.last_progress = Instant::now().checked_sub(Duration::from_secs(5))
        });
        h.set_shutting_down();
        assert!(h.live());
    }

    #[test]
    fn waiting_on_a_dependency_is_neither_stalled_nor_stuck() {
        let h = health();
        h.set_dependencies_up(false);
        let t0 = Instant::now();
        h.update(ConsumerKind::Hrv, |s| {
            s.stream = Some("S".into());
            s.last_progress = Some(t0);
        });
        h.activity(ConsumerKind::Hrv).held(3);
        // An outage far longer than both limits: nothing is stalled or stuck, and the clocks
        // restart, so recovery does not flag the loop at once either.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(verdict(&h, later), (false, false));
        h.set_dependencies_up(true);
        assert_eq!(verdict(&h, later + Duration::from_secs(1)), (false, false));
    }

    #[test]
    fn holding_without_settling_is_stuck_until_something_settles() {
        let h = health();
        h.set_dependencies_up(true);
        let a = h.activity(ConsumerKind::Hrv);
        h.update(ConsumerKind::Hrv, |s| {
            s.stream = Some("S".into());
            s.last_progress = Some(Instant::now() + Duration::from_secs(3600));
        });
        // Idle for long, then messages arrive: the stuck clock starts when holding starts.
        a.held(2);
        let now = Instant::now();
        assert_eq!(verdict(&h, now + Duration::from_secs(5)), (false, false));
        assert_eq!(verdict(&h, now + Duration::from_secs(7)), (false, true));
        assert_eq!(h.to_json(true, true).consumers["hrv"].held, 2);
        // One settles: the clock restarts; all settle: holding nothing is never stuck.
        a.held(-1);
        a.settled_now();
        assert_eq!(
            verdict(&h, Instant::now() + Duration::from_secs(1)),
            (false, false)
        );
        a.held(-1);
        assert_eq!(
            verdict(&h, Instant::now() + Duration::from_secs(600)),
            (false, false)
        );
    }
}
