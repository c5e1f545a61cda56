//! The zero-gap cut-over of nats-server 2.10+: the new streams listen on a private namespace
//! (`mig.…`) whose subject transform stores each message under its original subject, and an
//! account subject mapping (reloaded with SIGHUP) decides publish by publish which stream a
//! subject reaches. While both streams receive a consumer's subject the daemon consumes both
//! durables, so a weighted shift and an instant rollback by mapping lose nothing and wait for no
//! rebind tick. Every test passes trivially, with a note, on a server older than 2.10.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::stream::{FuturesUnordered, StreamExt};
use normalize_service::config::{Config, StreamNames};
use normalize_service::topology::{self, StreamSpec};

use crate::support::*;

const LEGACY: &str = "ATHLETE_ALLY_EVENTS";
const CORE: &str = "AA_CORE_HOT";
const VENDOR: &str = "AA_VENDOR_HOT";

/// Long enough that an event waiting for a rebind tick would show in the latencies.
const REBIND_MS: &str = "15000";
/// The label of publishes acknowledged while a mapping reload is on its way.
const CHANGING: u8 = u8::MAX;
/// What "stored without waiting for a rebind tick" means here.
const STORED_WITHIN: Duration = Duration::from_secs(5);

/// True on nats-server 2.10+ (the server `client` is connected to); prints why the test does
/// nothing otherwise.
fn transforms_supported(client: &async_nats::Client) -> bool {
    let version = client.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        eprintln!("note: nats-server {version} has no stream subject transforms (2.10+); nothing to test");
        return false;
    }
    true
}

/// A new stream listening on the private namespace, storing under the original subjects.
fn namespaced(spec: StreamSpec, subjects: &[&str]) -> stream::Config {
    let mut c = spec.to_config();
    c.subjects = subjects.iter().map(|s| s.to_string()).collect();
    c.subject_transform = Some(stream::SubjectTransform {
        source: "mig.>".into(),
        destination: ">".into(),
    });
    c
}

/// The daemon's variables for these tests: multi mode, a rebind tick every `rebind_ms`
/// ([`REBIND_MS`]: slow).
fn daemon_env(provision: &'static str, rebind_ms: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("EVENT_STREAM_MODE", "multi"),
        ("REBIND_INTERVAL_MS", rebind_ms),
        ("TOPOLOGY_PROVISION", provision),
    ]
}

/// The legacy stream, the namespaced core and vendor streams, AA_DLQ; each consumer's durable
/// on the new stream when `durables_on_new`, and on the legacy one when `durables_on_legacy`.
async fn cut_over_topology(stack: &Stack, durables_on_new: bool, durables_on_legacy: bool) {
    let js = &stack.js;
    let n = StreamNames::default();
    js.create_stream(topology::legacy_spec(&n, 1).to_config())
        .await
        .unwrap();
    for c in [
        namespaced(topology::core_spec(&n, 1), &["mig.athlete-ally.>", "mig.sleep.*"]),
        namespaced(topology::vendor_spec(&n, 1), &["mig.vendor.>"]),
    ] {
        let info = js.create_stream(c).await.unwrap().cached_info().clone();
        assert!(
            info.config.subject_transform.is_some(),
            "the server kept the transform"
        );
    }
    js.create_stream(topology::dlq_spec(&n, 1).to_config())
        .await
        .unwrap();
    let config = Config::from_vars(stack.vars.clone()).unwrap();
    for cc in &config.consumers {
        for (i, name) in topology::candidates(&config, cc).iter().enumerate() {
            if (i == 0 && !durables_on_new) || (i > 0 && !durables_on_legacy) {
                continue;
            }
            js.get_stream(name)
                .await
                .unwrap()
                .create_consumer(topology::durable_config(cc))
                .await
                .unwrap();
        }
    }
}

/// The account subject mappings sending `share` % of each event subject to the private
/// namespace (0: the identity mapping, a rollback).
fn mappings(share: u8) -> String {
    // A destination names a source `*` as `{{wildcard(1)}}`; a `>` stays `>`.
    let entry = |subject: &str, same: &str| {
        let ns = format!("mig.{same}");
        match share {
            0 => format!("  \"{subject}\": \"{same}\"\n"),
            100 => format!("  \"{subject}\": \"{ns}\"\n"),
            s => format!(
                "  \"{subject}\": [{{destination: \"{ns}\", weight: {s}%}}, {{destination: \"{same}\", weight: {}%}}]\n",
                100 - s
            ),
        }
    };
    format!(
        "mappings = {{\n{}{}{}}}\n",
        entry("athlete-ally.>", "athlete-ally.>"),
        entry("sleep.*", "sleep.{{wildcard(1)}}"),
        entry("vendor.>", "vendor.>"),
    )
}

/// Reloads the mappings for `share` and waits until probes (subjects no durable consumes)
/// show it in effect: the share of core and vendor probes landing in the new streams within
/// `lo..=hi`.
async fn shift_to(stack: &Stack, share: u8, lo: f64, hi: f64) {
    stack.nats.reload_with(&mappings(share));
    let js = &stack.js;
    wait_for(
        &format!("mapping {share}% in effect"),
        Duration::from_secs(20),
        || async {
            for (subject, new) in [("athlete-ally.shift-probe", CORE), ("vendor.shift-probe", VENDOR)] {
                let mut landed = 0;
                for _ in 0..100 {
                    let ack = js.publish(subject, "probe".into()).await.unwrap().await.unwrap();
                    if ack.stream == new {
                        landed += 1;
                    }
                }
                if !(lo..=hi).contains(&(f64::from(landed) / 100.0)) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Hrv,
    Sleep,
    Oura,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Hrv, Kind::Sleep, Kind::Oura];

    /// (table, user-id prefix)
    fn table(self, prefix: &str) -> (&'static str, String) {
        match self {
            Kind::Hrv => ("hrv_data", format!("{prefix}-h-")),
            Kind::Sleep => ("sleep_data", format!("{prefix}-s-")),
            Kind::Oura => ("vendor_webhook_events", format!("{prefix}-o-")),
        }
    }

    fn event(self, prefix: &str, i: usize) -> (String, &'static str, String) {
        let user = format!("{}{i}", self.table(prefix).1);
        let (subject, body) = match self {
            Kind::Hrv => (
                HRV_SUBJECT,
                hrv_event(&user, "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
            ),
            Kind::Sleep => (
                SLEEP_SUBJECT,
                serde_json::json!({"payload": {"userId": user, "date": "2025-03-01",
                    "durationMinutes": 420, "capturedAt": "2025-03-01T08:00:00Z"}})
                .to_string(),
            ),
            Kind::Oura => (
                OURA_SUBJECT,
                serde_json::json!({"user_id": user, "timestamp": "2025-03-01T06:00:00Z", "data": {}})
                    .to_string(),
            ),
        };
        (user, subject, body)
    }
}

/// One acknowledged publish.
struct Sent {
    kind: Kind,
    user: String,
    /// The stream the PubAck named.
    stream: String,
    /// Wall clock (Unix seconds) just before the publish.
    sent_at: f64,
    /// The mapping share in effect when it was acknowledged ([`CHANGING`] during a reload).
    share: u8,
}

struct Published {
    sent: Vec<Sent>,
    failed: usize,
    seconds: f64,
}

/// Publishes HRV events, sleep events and Oura webhooks in turn at `rate` per second, never
/// retrying: a publish that is not acknowledged is counted as failed.
struct Publisher {
    stop: Arc<AtomicBool>,
    share: Arc<AtomicU8>,
    handle: tokio::task::JoinHandle<Published>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

impl Publisher {
    fn start(js: jetstream::Context, prefix: &'static str, rate: usize, share: u8) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let share = Arc::new(AtomicU8::new(share));
        let (s, sh) = (stop.clone(), share.clone());
        let handle = tokio::spawn(async move {
            const TICK: Duration = Duration::from_millis(10);
            let per_tick = (rate / 100).max(1);
            let started = std::time::Instant::now();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut acks = FuturesUnordered::new();
            let (mut sent, mut failed, mut i) = (Vec::new(), 0usize, 0usize);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if s.load(Ordering::SeqCst) {
                            break;
                        }
                        for _ in 0..per_tick {
                            let kind = Kind::ALL[i % 3];
                            let (user, subject, body) = kind.event(prefix, i / 3);
                            i += 1;
                            let sent_at = unix_now();
                            match js.publish(subject, body.into()).await {
                                Ok(ack) => acks.push(async move { (kind, user, sent_at, ack.await) }),
                                Err(_) => failed += 1,
                            }
                        }
                    }
                    Some((kind, user, sent_at, ack)) = acks.next(), if !acks.is_empty() => match ack {
                        Ok(ack) => sent.push(Sent { kind, user, stream: ack.stream, sent_at, share: sh.load(Ordering::SeqCst) }),
                        Err(_) => failed += 1,
                    },
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            while let Some((kind, user, sent_at, ack)) = acks.next().await {
                match ack {
                    Ok(ack) => sent.push(Sent {
                        kind,
                        user,
                        stream: ack.stream,
                        sent_at,
                        share: sh.load(Ordering::SeqCst),
                    }),
                    Err(_) => failed += 1,
                }
            }
            Published {
                sent,
                failed,
                seconds,
            }
        });
        Publisher { stop, share, handle }
    }

    /// The share the next acknowledgements are labelled with.
    fn at(&self, share: u8) {
        self.share.store(share, Ordering::SeqCst);
    }

    async fn finish(self) -> Published {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap()
    }
}

/// Waits for one row per acknowledged event of each kind (the unique keys make more
/// impossible; fewer is loss) and returns when each row was written (Unix seconds) by user.
async fn stored(db: &TestDb, prefix: &str, sent: &[Sent]) -> HashMap<String, f64> {
    let pool = db.pool().await;
    for kind in Kind::ALL {
        let (table, users) = kind.table(prefix);
        let expected = sent.iter().filter(|s| s.kind == kind).count() as i64;
        let sql = format!("SELECT count(*) FROM {table} WHERE user_id LIKE '{users}%'");
        wait_for(
            &format!("{expected} rows in {table}"),
            Duration::from_secs(90),
            || async { count(&pool, &sql).await >= expected },
        )
        .await;
        assert_eq!(count(&pool, &sql).await, expected, "one row per event in {table}");
    }
    let mut at = HashMap::new();
    for kind in Kind::ALL {
        let (table, users) = kind.table(prefix);
        let rows: Vec<(String, f64)> = sqlx::query_as(&format!(
            "SELECT user_id, extract(epoch FROM created_at)::float8 FROM {table} WHERE user_id LIKE '{users}%'"
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        at.extend(rows);
    }
    at
}

/// Publish → stored latencies of the selected events, sorted (seconds).
fn latencies<'a>(sent: impl Iterator<Item = &'a Sent>, stored: &HashMap<String, f64>) -> Vec<f64> {
    let mut l: Vec<f64> = sent.map(|s| (stored[&s.user] - s.sent_at).max(0.0)).collect();
    l.sort_by(f64::total_cmp);
    l
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// `what`'s latencies printed and held under [`STORED_WITHIN`] at p99 (and at the maximum,
/// which a rebind tick would exceed by far).
fn assert_latencies(what: &str, l: &[f64]) {
    assert!(!l.is_empty(), "{what}: no events");
    let (p50, p99, max) = (quantile(l, 0.5), quantile(l, 0.99), l[l.len() - 1]);
    eprintln!(
        "{what}: {} events, publish→stored p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        l.len(),
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    assert!(
        p99 < STORED_WITHIN.as_secs_f64() && max < REBIND_MS.parse::<f64>().unwrap() / 1e3,
        "{what}: p99 {p99:.3} s, max {max:.3} s"
    );
}

/// `/health` and `normalize_consumer_bound` show every consumer bound on its new stream with
/// its legacy durable consumed beside it.
async fn both_bound(app: &TestApp) {
    let (_, h) = app.health().await;
    let m = app.metrics().await;
    for (kind, new, durable) in [
        ("hrv", CORE, "normalize-hrv-durable"),
        ("sleep", CORE, "normalize-sleep-durable"),
        ("oura", VENDOR, "normalize-oura"),
    ] {
        let c = &h["consumers"][kind];
        assert_eq!(c["stream"], new, "{kind}: {h}");
        assert_eq!(c["draining"], serde_json::json!([LEGACY]), "{kind}: {h}");
        for stream in [new, LEGACY] {
            let labels = [("consumer", kind), ("stream", stream), ("durable", durable)];
            assert_eq!(
                metric_value(&m, "normalize_consumer_bound", &labels),
                Some(1.0),
                "{kind} on {stream}"
            );
        }
    }
}

async fn wait_both_bound(app: &TestApp) {
    wait_for(
        "every consumer on both streams",
        Duration::from_secs(10),
        || async {
            let (_, h) = app.health().await;
            ["hrv", "sleep", "oura"].iter().all(|k| {
                h["consumers"][k]["draining"]
                    .as_array()
                    .is_some_and(|d| d.len() == 1)
            })
        },
    )
    .await;
    both_bound(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_shift_loses_nothing_and_waits_for_no_tick() {
    let stack = Stack::builder().env(&daemon_env("off", REBIND_MS)).start().await;
    if !transforms_supported(&stack.js.client()) {
        return;
    }
    cut_over_topology(&stack, true, true).await;
    let app = stack.app().await;
    // Both streams receive the subjects (the new ones through the namespace): both consumed
    // from the first bind, before any publish reaches the new streams.
    wait_both_bound(&app).await;

    let publisher = Publisher::start(stack.js.clone(), "ws", 1500, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (share, lo, hi, hold) in [(10, 0.02, 0.3, 3), (50, 0.3, 0.7, 4), (100, 1.0, 1.0, 2)] {
        publisher.at(CHANGING);
        shift_to(&stack, share, lo, hi).await;
        publisher.at(share);
        tokio::time::sleep(Duration::from_secs(hold)).await;
        both_bound(&app).await;
    }
    let published = publisher.finish().await;
    let sent = &published.sent;
    eprintln!(
        "published {} events in {:.1} s ({:.0}/s), {} failed",
        sent.len(),
        published.seconds,
        sent.len() as f64 / published.seconds,
        published.failed
    );
    assert_eq!(published.failed, 0, "no publish failed");
    assert!(sent.len() >= 3000, "only {} events published", sent.len());
    for kind in Kind::ALL {
        for stream in [LEGACY, if kind == Kind::Oura { VENDOR } else { CORE }] {
            assert!(
                sent.iter()
                    .any(|s| s.kind == kind && s.share == 50 && s.stream == stream),
                "{kind:?} events reached {stream} during the 50 % step"
            );
        }
    }

    let at = stored(&stack.db, "ws", sent).await;
    assert_eq!(
        stream_messages(&stack.js, "AA_DLQ").await,
        0,
        "nothing dead-lettered"
    );
    let during_half = |legacy: bool| {
        sent.iter()
            .filter(move |s| s.share == 50 && (s.stream == LEGACY) == legacy)
    };
    assert_latencies("50 % step, legacy stream", &latencies(during_half(true), &at));
    assert_latencies("50 % step, new streams", &latencies(during_half(false), &at));
    assert_latencies("whole shift", &latencies(sent.iter(), &at));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_by_mapping_is_consumed_at_once() {
    // Provisioning on and no durable on the new streams: the daemon creates them there, the
    // filter being received through the namespace.
    let stack = Stack::builder()
        .env(&daemon_env("missing", REBIND_MS))
        .start()
        .await;
    if !transforms_supported(&stack.js.client()) {
        return;
    }
    cut_over_topology(&stack, false, true).await;
    let app = stack.app().await;
    wait_both_bound(&app).await;
    for (stream, durable) in [
        (CORE, "normalize-hrv-durable"),
        (CORE, "normalize-sleep-durable"),
        (VENDOR, "normalize-oura"),
    ] {
        assert!(
            consumer_backlog(&stack.js, stream, durable).await.is_some(),
            "{durable} created on {stream}"
        );
    }
    shift_to(&stack, 100, 1.0, 1.0).await;
    let publisher = Publisher::start(stack.js.clone(), "rb", 600, 100);
    tokio::time::sleep(Duration::from_secs(2)).await;
    publisher.at(CHANGING);
    shift_to(&stack, 0, 0.0, 0.0).await;
    publisher.at(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    both_bound(&app).await;
    let published = publisher.finish().await;
    let sent = &published.sent;
    assert_eq!(published.failed, 0, "no publish failed");
    let rolled_back: Vec<&Sent> = sent.iter().filter(|s| s.share == 0).collect();
    assert!(
        rolled_back.len() > 100 && rolled_back.iter().all(|s| s.stream == LEGACY),
        "after the rollback every publish lands in the legacy stream"
    );
    let at = stored(&stack.db, "rb", sent).await;
    assert_eq!(
        stream_messages(&stack.js, "AA_DLQ").await,
        0,
        "nothing dead-lettered"
    );
    assert_latencies(
        "after the rollback (legacy stream)",
        &latencies(rolled_back.into_iter(), &at),
    );
    assert_latencies(
        "before the rollback (new streams)",
        &latencies(sent.iter().filter(|s| s.share == 100), &at),
    );
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_durable_is_released_once_its_stream_no_longer_receives() {
    let stack = Stack::builder().env(&daemon_env("off", "300")).start().await;
    if !transforms_supported(&stack.js.client()) {
        return;
    }
    cut_over_topology(&stack, true, true).await;
    let app = stack.app().await;
    wait_both_bound(&app).await;
    // Far more than 3 empty rebind ticks: still consumed, its stream still receives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    both_bound(&app).await;

    // Phase 3 of the cut-over, with the mapping at 100 %: the legacy stream gives up the event
    // subjects and the new streams take them beside the namespace.
    shift_to(&stack, 100, 1.0, 1.0).await;
    let js = &stack.js;
    let mut legacy = js.get_stream(LEGACY).await.unwrap().cached_info().config.clone();
    legacy.subjects = vec![LEGACY.into()];
    js.update_stream(legacy).await.unwrap();
    for (name, real) in [
        (CORE, &["athlete-ally.>", "sleep.*"][..]),
        (VENDOR, &["vendor.>"][..]),
    ] {
        let mut c = js.get_stream(name).await.unwrap().cached_info().config.clone();
        c.subjects.extend(real.iter().map(|s| s.to_string()));
        js.update_stream(c).await.unwrap();
    }
    wait_for("legacy durables released", Duration::from_secs(10), || async {
        let (_, h) = app.health().await;
        ["hrv", "sleep", "oura"].iter().all(|k| {
            h["consumers"][k]["draining"]
                .as_array()
                .is_some_and(|d| d.is_empty())
        })
    })
    .await;
    let m = app.metrics().await;
    for (kind, durable) in [("hrv", "normalize-hrv-durable"), ("oura", "normalize-oura")] {
        let labels = [("consumer", kind), ("stream", LEGACY), ("durable", durable)];
        assert_eq!(metric_value(&m, "normalize_consumer_bound", &labels), Some(0.0));
    }
    // Events published now arrive through the real subjects and are stored.
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("p3-h-0", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = stack.pool().await;
    wait_for("row after phase 3", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'p3-h-0'").await == 1
    })
    .await;
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiving_legacy_stream_without_its_durable_gets_one_and_loses_nothing() {
    // Mid-shift, the legacy stream has no durables (the previous service never consumed Oura; an
    // operator deleted the others): half of every subject's publishes land there. With
    // provisioning on, the daemon creates the durable on every stream that receives the
    // subject, not only on the one it binds, and consumes both.
    let stack = Stack::builder()
        .env(&daemon_env("missing", REBIND_MS))
        .start()
        .await;
    if !transforms_supported(&stack.js.client()) {
        return;
    }
    cut_over_topology(&stack, true, false).await;
    shift_to(&stack, 50, 0.3, 0.7).await;
    let app = stack.app().await;
    wait_both_bound(&app).await;
    for durable in [
        "normalize-hrv-durable",
        "normalize-sleep-durable",
        "normalize-oura",
    ] {
        assert!(
            consumer_backlog(&stack.js, LEGACY, durable).await.is_some(),
            "{durable} created on {LEGACY}"
        );
    }
    let publisher = Publisher::start(stack.js.clone(), "nl", 600, 50);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published = publisher.finish().await;
    let sent = &published.sent;
    assert_eq!(published.failed, 0, "no publish failed");
    for kind in Kind::ALL {
        assert!(
            sent.iter().any(|s| s.kind == kind && s.stream == LEGACY),
            "{kind:?} events reached {LEGACY}"
        );
    }
    stored(&stack.db, "nl", sent).await;
    assert_eq!(
        stream_messages(&stack.js, "AA_DLQ").await,
        0,
        "nothing dead-lettered"
    );
    app.stop().await.unwrap();
}

/// The daemon's user (`daemon`) and the test's (`test`); with `deny_core_info` the daemon's
/// stream info requests for AA_CORE_HOT get no answer, as during a stream leader election.
fn users(deny_core_info: bool) -> String {
    let deny = if deny_core_info {
        r#", permissions: {publish: {allow: [">"], deny: ["$JS.API.STREAM.INFO.AA_CORE_HOT"]}}"#
    } else {
        ""
    };
    format!(
        "authorization {{\n  users = [\n    {{user: daemon, password: daemon-pw{deny}}}\n    {{user: test, password: test-pw}}\n  ]\n}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_stream_info_is_no_fallback() {
    // Both streams receive the subjects (the cut-over topology); when the primary's stream
    // info goes unanswered, the daemon cannot tell which stream captures the subject: it keeps
    // its binding instead of reporting a fallback to the legacy stream that did not happen.
    let stack = Stack::builder()
        .nats_conf(&users(false))
        .nats_client(async_nats::ConnectOptions::with_user_and_password(
            "test".into(),
            "test-pw".into(),
        ))
        .env(&daemon_env("off", "300"))
        .env(&[("NATS_USER", "daemon"), ("NATS_PASSWORD", "daemon-pw")])
        .start()
        .await;
    if !transforms_supported(&stack.js.client()) {
        return;
    }
    cut_over_topology(&stack, true, true).await;
    let app = stack.app().await;
    wait_both_bound(&app).await;
    stack.nats.reload_with(&users(true));
    // Several rebind ticks, each waiting for the unanswered request to time out.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (_, h) = app.health().await;
    for kind in ["hrv", "sleep"] {
        let c = &h["consumers"][kind];
        assert_eq!(c["stream"], CORE, "{kind}: {h}");
        assert_eq!(c["fallback"], false, "{kind}: {h}");
    }
    assert_eq!(
        metric_value(&app.metrics().await, "normalize_stream_fallback_total", &[]).unwrap_or(0.0),
        0.0,
        "no fallback counted"
    );
    // Still consumed where events land.
    let ack = stack
        .js
        .publish(
            HRV_SUBJECT,
            hrv_event("ui-h-0", "2025-03-01", 40.0, "2025-03-01T06:00:00Z").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        ack.stream, LEGACY,
        "no mapping: publishes land in the legacy stream"
    );
    let pool = stack.pool().await;
    wait_for("the event stored", Duration::from_secs(10), || async {
        count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'ui-h-0'").await == 1
    })
    .await;
    app.stop().await.unwrap();
}
