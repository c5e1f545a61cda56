//! Shared health state: what each consumer loop reports about itself, and the JSON of
//! `/health`. The loops write; the HTTP handlers and the watchdog read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::config::{ConsumerKind, StreamMode};

/// One consumer's state, as reported on `/health`.
#[derive(Debug, Clone, Default)]
pub struct ConsumerState {
    pub durable: String,
    /// The stream of the binding that takes new messages; `None` while unbound.
    pub stream: Option<String>,
    pub fallback: bool,
    /// Other streams whose durable is still being drained (live rebinding).
    pub draining: Vec<String>,
    pub pending: u64,
    pub ack_pending: u64,
    pub redelivered: u64,
    pub last_pull_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    /// Last time the loop made progress (completed a pull or settled a message).
    pub last_progress: Option<Instant>,
    /// 3 × the pull expiry: no progress for longer means stalled.
    pub stall_after: Duration,
    pub stalled: bool,
    /// False after a dead-letter publish failed, until one succeeds.
    pub dead_letter_ok: bool,
    /// Why the consumer is unbound, for operators.
    pub bind_error: Option<String>,
}

pub struct Health {
    pub mode: StreamMode,
    consumers: Mutex<BTreeMap<ConsumerKind, ConsumerState>>,
    shutting_down: AtomicBool,
    database_ready: AtomicBool,
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
    pub bound: bool,
    pub dead_letter: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HealthJson {
    pub status: &'static str,
    pub mode: &'static str,
    pub stream: Option<String>,
    pub consumers: BTreeMap<&'static str, ConsumerJson>,
    pub nats: &'static str,
    pub database: &'static str,
    pub version: &'static str,
}

fn ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl Health {
    pub fn new(mode: StreamMode, consumers: &[(ConsumerKind, String, Duration)]) -> Health {
        let map = consumers
            .iter()
            .map(|(kind, durable, expires)| {
                (
                    *kind,
                    ConsumerState {
                        durable: durable.clone(),
                        stall_after: *expires * 3,
                        dead_letter_ok: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Health {
            mode,
            consumers: Mutex::new(map),
            shutting_down: AtomicBool::new(false),
            database_ready: AtomicBool::new(false),
        }
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

    /// Marks consumers stalled or not; returns the (kind, stalled) list for the gauge.
    pub fn check_stalls(&self, now: Instant) -> Vec<(ConsumerKind, bool)> {
        let mut map = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        map.iter_mut()
            .map(|(kind, s)| {
                s.stalled = s.stream.is_some()
                    && s.last_progress
                        .is_some_and(|p| now.saturating_duration_since(p) > s.stall_after);
                (*kind, s.stalled)
            })
            .collect()
    }

    /// Evaluated now, not at the watchdog's last tick.
    pub fn any_stalled(&self) -> bool {
        self.check_stalls(Instant::now())
            .iter()
            .any(|(_, stalled)| *stalled)
    }

    pub fn all_bound(&self) -> bool {
        self.snapshot().values().all(|s| s.stream.is_some())
    }

    /// Ready: not stopping, NATS connected, database answering, every consumer bound.
    pub fn ready(&self, nats_connected: bool, database_up: bool) -> bool {
        !self.shutting_down() && nats_connected && database_up && self.database_ready() && self.all_bound()
    }

    pub fn to_json(&self, nats_connected: bool, database_up: bool) -> HealthJson {
        let snapshot = self.snapshot();
        let ready = self.ready(nats_connected, database_up);
        let troubled = snapshot.values().any(|s| s.stalled || !s.dead_letter_ok);
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
                (
                    kind.as_str(),
                    ConsumerJson {
                        bound: s.stream.is_some(),
                        durable: s.durable,
                        stream: s.stream,
                        fallback: s.fallback,
                        draining: s.draining,
                        pending: s.pending,
                        ack_pending: s.ack_pending,
                        redelivered: s.redelivered,
                        last_pull_at: ts(s.last_pull_at),
                        last_message_at: ts(s.last_message_at),
                        stalled: s.stalled,
                        dead_letter: if s.dead_letter_ok { "ok" } else { "unavailable" },
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
            version: crate::VERSION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(
            StreamMode::Multi,
            &[(ConsumerKind::Hrv, "d".into(), Duration::from_secs(1))],
        )
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
        h.update(ConsumerKind::Hrv, |s| s.dead_letter_ok = false);
        assert_eq!(h.to_json(true, true).status, "degraded");
        assert_eq!(h.to_json(true, false).status, "unavailable");
        h.set_shutting_down();
        assert!(!h.ready(true, true));
    }

    #[test]
    fn stall_detection() {
        let h = health();
        let t0 = Instant::now();
        h.update(ConsumerKind::Hrv, |s| {
            s.stream = Some("S".into());
            s.last_progress = Some(t0);
        });
        assert_eq!(
            h.check_stalls(t0 + Duration::from_secs(2)),
            vec![(ConsumerKind::Hrv, false)]
        );
        assert_eq!(
            h.check_stalls(t0 + Duration::from_secs(4)),
            vec![(ConsumerKind::Hrv, true)]
        );
        // any_stalled looks at the clock now: a loop that last progressed 5 s ago is stalled.
        h.update(ConsumerKind::Hrv, |s| {
            s.last_progress = Instant::now().checked_sub(Duration::from_secs(5))
        });
        assert!(h.any_stalled());
        h.update(ConsumerKind::Hrv, |s| s.last_progress = Some(Instant::now()));
        assert!(!h.any_stalled());
    }
}
