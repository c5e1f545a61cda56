//! The mapping cut-over (`migrate --cutover mapping`, issue "Zero-gap, gradual, instantly
//! reversible subject moves"): publishers that NEVER retry lose nothing through every forward
//! step, rollback, weighted shift and phase 3, on the default and on a named account. On a
//! nats-server before 2.10 the mapping is refused, naming the version.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use normalize_service::config::StreamNames;
use normalize_service::topology;
use serde_json::Value;

use crate::support::*;

/// One publish: the step it happened in, its PubAck latency, whether it was acknowledged.
#[derive(Clone, Copy)]
struct Sample {
    step: usize,
    micros: u64,
    ok: bool,
}

#[derive(Default)]
struct Published {
    /// Acknowledged events: (hrv, sleep, webhooks).
    hrv: usize,
    sleep: usize,
    hooks: usize,
    samples: Vec<Sample>,
}

/// Publishes HRV events, sleep events and Oura webhooks from several tasks at a steady rate,
/// each publish awaiting its PubAck and never retried: a publish that fails is lost.
struct Publisher {
    stop: Arc<AtomicBool>,
    step: Arc<AtomicUsize>,
    out: Arc<Mutex<Published>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

const TASKS: usize = 16;
/// Per task at most 400 publishes/s, 6,400/s in all (each task awaits every PubAck first; the
/// rate reached is printed, about 2,000–2,500/s on a 2-core machine with the daemon consuming).
const INTERVAL: Duration = Duration::from_micros(2500);

impl Publisher {
    fn start(js: &jetstream::Context, prefix: &'static str) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let step = Arc::new(AtomicUsize::new(0));
        let out = Arc::new(Mutex::new(Published::default()));
        let tasks = (0..TASKS)
            .map(|t| {
                let (js, stop, step, out) = (js.clone(), stop.clone(), step.clone(), out.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(INTERVAL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut i = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        tick.tick().await;
                        let n = i * TASKS + t;
                        i += 1;
                        let kind = n % 3;
                        let user = format!("{prefix}-u{n}");
                        let (subject, body) = match kind {
                            0 => (HRV_SUBJECT, hrv_event(&user, "2025-03-01", 40.0, "2025-03-01T06:00:00Z")),
                            1 => (SLEEP_SUBJECT, sleep_event(&user)),
                            _ => (OURA_SUBJECT, serde_json::json!({"user_id": user, "timestamp": "2025-03-01T06:00:00Z", "data": {}}).to_string()),
                        };
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", format!("{prefix}-{n}").as_str());
                        let at = step.load(Ordering::SeqCst);
                        let sent = Instant::now();
                        let acked = match js.publish_with_headers(subject, headers, body.into()).await {
                            Ok(ack) => matches!(tokio::time::timeout(Duration::from_secs(5), ack).await, Ok(Ok(_))),
                            Err(_) => false,
                        };
                        let sample = Sample {
                            step: at,
                            micros: sent.elapsed().as_micros() as u64,
                            ok: acked,
                        };
                        let mut o = out.lock().unwrap();
                        o.samples.push(sample);
                        if acked {
                            match kind {
                                0 => o.hrv += 1,
                                1 => o.sleep += 1,
                                _ => o.hooks += 1,
                            }
                        }
                    }
                })
            })
            .collect();
        Publisher {
            stop,
            step,
            out,
            tasks,
            started: Instant::now(),
        }
    }

    /// Publishes from now on count for step `n` (0 = before any step).
    fn step(&self, n: usize) {
        self.step.store(n, Ordering::SeqCst);
    }

    async fn finish(self) -> (Published, f64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let out = std::mem::take(&mut *self.out.lock().unwrap());
        (out, elapsed)
    }
}

fn sleep_event(user: &str) -> String {
    serde_json::json!({"payload": {"userId": user, "date": "2025-03-01", "durationMinutes": 420.0,
        "capturedAt": "2025-03-01T08:00:00Z", "raw": {"source": "Oura"}}})
    .to_string()
}

/// Failed publishes and the PubAck p99 (ms) per step, printed (docs/MIGRATION.md records them).
fn per_step(samples: &[Sample], names: &[&str]) -> Vec<(usize, usize, f64)> {
    let mut rows = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut lat: Vec<u64> = samples.iter().filter(|s| s.step == i).map(|s| s.micros).collect();
        let failed = samples.iter().filter(|s| s.step == i && !s.ok).count();
        lat.sort_unstable();
        let p99 = lat
            .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0;
        println!(
            "cut-over step {name:<28} publishes {:>6}  failed {failed}  PubAck p99 {p99:.2} ms",
            lat.len()
        );
        rows.push((lat.len(), failed, p99));
    }
    rows
}

async fn wait_rows(db: &TestDb, prefix: &str, p: &Published) {
    let pool = db.pool().await;
    let sql = |table: &str, col: &str| format!("SELECT count(*) FROM {table} WHERE {col} LIKE '{prefix}-u%'");
    let (hrv, sleep, hooks) = (
        sql("hrv_data", "user_id"),
        sql("sleep_data", "user_id"),
        sql("vendor_webhook_events", "user_id"),
    );
    let want = (p.hrv as i64, p.sleep as i64, p.hooks as i64);
    wait_for(
        "every acknowledged event stored",
        Duration::from_secs(120),
        || async {
            (
                count(&pool, &hrv).await,
                count(&pool, &sleep).await,
                count(&pool, &hooks).await,
            ) == want
        },
    )
    .await;
}

/// The server's version, from its INFO.
async fn server_version(stack: &Stack) -> String {
    stack.nats.client().await.server_info().version
}

fn at_least_2_10(version: &str) -> bool {
    normalize_service::server_version::parse(version).is_some_and(|v| v >= (2, 10, 0))
}

/// The mapping arguments for the stack's own server: its config file and its pid.
fn mapping_args(stack: &Stack) -> Vec<String> {
    vec![
        "--nats-config".into(),
        stack.nats.store.path().join("nats.conf").display().to_string(),
        "--reload-pid".into(),
        stack.nats.pid().unwrap().to_string(),
        "--mapping-timeout".into(),
        "30".into(),
    ]
}

async fn step(vars: &HashMap<String, String>, args: &[&str], extra: &[String]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    cli_json(vars, &all, 0).await
}

fn cli_vars(stack: &Stack) -> HashMap<String, String> {
    stack.vars_with(&[])
}

/// The stream the hrv (or other) consumer is active on, and the ones it also consumes.
async fn bindings(app: &TestApp, consumer: &str) -> Vec<String> {
    let h = app.health().await.1;
    let c = &h["consumers"][consumer];
    let mut all: Vec<String> = c["draining"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    if let Some(s) = c["stream"].as_str() {
        all.insert(0, s.to_string());
    }
    all
}

/// A new event published now lands in `stream` (its PubAck says so) and its row appears within
/// 10 s: less than the daemon's rebind interval (15 s by default), so it was consumed where it
/// landed without waiting for a rebind.
async fn stored_via(stack: &Stack, kind: &str, stream: &str, tag: &str) {
    let user = format!("via-{tag}");
    let (subject, body, sql) = match kind {
        "hrv" => (
            HRV_SUBJECT,
            hrv_event(&user, "2025-03-02", 41.0, "2025-03-02T06:00:00Z"),
            format!("SELECT count(*) FROM hrv_data WHERE user_id = '{user}'"),
        ),
        _ => (
            OURA_SUBJECT,
            serde_json::json!({"user_id": user, "timestamp": "2025-03-02T06:00:00Z", "data": {}}).to_string(),
            format!("SELECT count(*) FROM vendor_webhook_events WHERE user_id = '{user}'"),
        ),
    };
    let ack = stack
        .js
        .publish(subject, body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, stream, "{kind} event published after {tag}");
    let pool = stack.db.pool().await;
    wait_for(
        &format!("the {kind} event of {tag} stored"),
        Duration::from_secs(10),
        || async { count(&pool, &sql).await == 1 },
    )
    .await;
}

/// On a server before 2.10 the mapping cut-over is refused, naming the version, and the
/// default is the move (the existing migration tests walk it).
async fn refused_before_2_10(stack: &Stack, version: &str) {
    let vars = cli_vars(stack);
    cli_json(&vars, &["migrate", "phase0"], 0).await;
    let r = cli_json(&vars, &["migrate", "phase1", "--yes", "--cutover", "mapping"], 3).await;
    let text = r.to_string();
    assert!(text.contains(version) && text.contains("--cutover move"), "{r}");
    let r = cli_json(&vars, &["migrate", "shift", "vendor", "10", "--yes"], 3).await;
    assert!(r.to_string().contains("--cutover mapping"), "{r}");
    println!("nats-server {version}: the mapping cut-over is refused (as it must be before 2.10)");
}

async fn legacy_stack(extra_conf: &str) -> Stack {
    let stack = Stack::builder()
        .nats_conf(extra_conf)
        .env(&[
            ("EVENT_STREAM_MODE", "multi"),
            ("HRV_BATCH_SIZE", "100"),
            ("SLEEP_BATCH_SIZE", "100"),
            ("OURA_BATCH_SIZE", "100"),
        ])
        .start()
        .await;
    stack
        .js
        .create_stream(topology::legacy_spec(&StreamNames::default(), 1).to_config())
        .await
        .unwrap();
    stack
}

/// Forward 0 → 3 with rollbacks of phase 2 and phase 1 on the way, under a publisher that never retries:
/// no publish fails, every event is one row, nothing is dead-lettered, the daemon (never
/// restarted) consumes where the events are, and phase 3 leaves exactly the plan's topology
/// with no mapping and no private namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mapping_cut_over_loses_no_publish_forward_and_back() {
    let stack = legacy_stack("").await;
    let version = server_version(&stack).await;
    if !at_least_2_10(&version) {
        return refused_before_2_10(&stack, &version).await;
    }
    let map = mapping_args(&stack);
    let (failed, rate) = walk(&stack, "cut", &map).await;
    assert_eq!(failed, 0, "publishes failed during the mapping cut-over");
    // Not a performance claim (the rate falls when the whole suite shares the 2 cores): a walk
    // at a trickle would prove little.
    assert!(rate >= 250.0, "the publisher reached only {rate:.0}/s");
    let conf = std::fs::read_to_string(stack.nats.store.path().join("nats.conf")).unwrap();
    assert!(
        conf.contains("mappings = { }"),
        "the mappings block is emptied:\n{conf}"
    );
    assert!(!conf.contains("mig."), "no mapping left:\n{conf}");
}

/// The same walk and publisher with `--cutover move` (any server version): the publishes that
/// fail in the remove-then-add windows are counted and printed (the comparison in
/// docs/MIGRATION.md); every acknowledged one is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_move_cut_over_stores_every_acknowledged_publish() {
    let stack = legacy_stack("").await;
    let (failed, _) = walk(&stack, "mov", &["--cutover".to_string(), "move".to_string()]).await;
    println!("--cutover move: {failed} publishes failed in the move windows (none retried)");
}

/// phase0 → 1 → 2 → rollback 2 → rollback 1 → 1 → 2 → 3 with `extra` on every step,
/// under the never-retrying publisher; checks the rows, the DLQ, the daemon's bindings and the
/// end topology; returns the number of failed publishes and the publish rate.
async fn walk(stack: &Stack, prefix: &'static str, extra: &[String]) -> (usize, f64) {
    let vars = cli_vars(stack);
    let app = stack.app().await;
    let publisher = Publisher::start(&stack.js, prefix);
    let names = [
        "(before)",
        "phase0",
        "phase1 (vendor)",
        "phase2 (core)",
        "rollback phase2",
        "rollback phase1",
        "phase1 again",
        "phase2 again",
        "phase3",
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;

    publisher.step(1);
    step(&vars, &["migrate", "phase0"], &[]).await;
    publisher.step(2);
    let r = step(&vars, &["migrate", "phase1", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    wait_for(
        "oura consumes the vendor stream",
        Duration::from_secs(20),
        || async { bindings(&app, "oura").await.first().map(String::as_str) == Some("AA_VENDOR_HOT") },
    )
    .await;
    stored_via(stack, "oura", "AA_VENDOR_HOT", "phase1").await;
    publisher.step(3);
    let r = step(&vars, &["migrate", "phase2", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "core-moved", "{r}");
    wait_for(
        "hrv consumes the core stream",
        Duration::from_secs(20),
        || async { bindings(&app, "hrv").await.first().map(String::as_str) == Some("AA_CORE_HOT") },
    )
    .await;
    stored_via(stack, "hrv", "AA_CORE_HOT", "phase2").await;
    publisher.step(4);
    let r = step(&vars, &["migrate", "rollback", "phase2", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    wait_for(
        "hrv consumes the legacy stream again",
        Duration::from_secs(20),
        || async {
            bindings(&app, "hrv")
                .await
                .iter()
                .any(|s| s == "ATHLETE_ALLY_EVENTS")
        },
    )
    .await;
    stored_via(stack, "hrv", "ATHLETE_ALLY_EVENTS", "rollback-phase2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publisher.step(5);
    let r = step(&vars, &["migrate", "rollback", "phase1", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "prepared", "{r}");
    wait_for(
        "oura consumes the legacy stream again",
        Duration::from_secs(20),
        || async {
            bindings(&app, "oura")
                .await
                .iter()
                .any(|s| s == "ATHLETE_ALLY_EVENTS")
        },
    )
    .await;
    stored_via(stack, "oura", "ATHLETE_ALLY_EVENTS", "rollback-phase1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publisher.step(6);
    let r = step(&vars, &["migrate", "phase1", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    publisher.step(7);
    let r = step(&vars, &["migrate", "phase2", "--yes"], extra).await;
    assert_eq!(r["phaseAfter"], "core-moved", "{r}");
    // A phase's checks alone agree with the step, whichever the cut-over.
    let r = cli_json(&vars, &["migrate", "verify", "phase2"], 0).await;
    assert_eq!(r["ok"], true, "{r}");
    for durable in [
        "normalize-hrv-durable",
        "normalize-sleep-durable",
        "normalize-oura",
    ] {
        wait_drained(&stack.js, "ATHLETE_ALLY_EVENTS", durable).await;
    }
    publisher.step(8);
    let r = step(
        &vars,
        &["migrate", "phase3", "--yes", "--quiet-period", "0s"],
        extra,
    )
    .await;
    assert_eq!(r["phaseAfter"], "migrated", "{r}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (published, secs) = publisher.finish().await;
    let rate = published.samples.len() as f64 / secs;
    println!(
        "publisher {prefix}: {} publishes in {secs:.1} s ({rate:.0}/s), none retried",
        published.samples.len()
    );
    let rows = per_step(&published.samples, &names);
    assert!(
        rows[2].0 > 0 && rows[3].0 > 0 && rows[4].0 > 0 && rows[5].0 > 0 && rows[8].0 > 0,
        "the publisher ran through the steps"
    );
    wait_rows(&stack.db, prefix, &published).await;
    assert_eq!(
        stream_messages(&stack.js, "AA_DLQ").await,
        0,
        "nothing dead-lettered"
    );

    // Exactly the plan's topology: no private namespace, no transform.
    let mut names_now: Vec<String> = topology::existing_streams(&stack.js)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    names_now.sort();
    assert_eq!(names_now, ["AA_CORE_HOT", "AA_DLQ", "AA_VENDOR_HOT"]);
    for (name, subjects) in [
        ("AA_CORE_HOT", vec!["athlete-ally.>", "sleep.*"]),
        ("AA_VENDOR_HOT", vec!["vendor.>"]),
    ] {
        let info = stack
            .js
            .get_stream(name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        let mut have = info.config.subjects.clone();
        have.sort();
        assert_eq!(have, subjects, "{name}");
        assert!(
            info.config.subject_transform.is_none(),
            "{name} keeps a transform"
        );
    }
    let ack = stack
        .js
        .publish("athlete-ally.after-migration", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, "AA_CORE_HOT");
    app.stop().await.unwrap();
    (rows.iter().map(|r| r.1).sum(), rate)
}

/// A weighted shift of the vendor subjects 10 → 50 → 100 %: each step verified by the probes'
/// observed share, `migrate plan` says it is shifting, the daemon consumes both streams
/// meanwhile, nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_weighted_shift_moves_the_share_it_says() {
    let stack = legacy_stack("").await;
    let version = server_version(&stack).await;
    if !at_least_2_10(&version) {
        return refused_before_2_10(&stack, &version).await;
    }
    let vars = cli_vars(&stack);
    let map = mapping_args(&stack);
    let app = stack.app().await;
    step(&vars, &["migrate", "phase0"], &[]).await;
    let publisher = Publisher::start(&stack.js, "shift");
    for (i, percent) in [10u8, 50, 100].into_iter().enumerate() {
        publisher.step(i + 1);
        let p = percent.to_string();
        let r = step(&vars, &["migrate", "shift", "vendor", &p, "--yes"], &map).await;
        let check = r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["what"].as_str().is_some_and(|w| w.starts_with("mapping of")))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(check["ok"], true, "{r}");
        println!("shift vendor {percent}: {}", check["status"]);
        if percent < 100 {
            let plan = cli_json(&vars, &["migrate", "plan"], 0).await;
            let seen = plan["phaseAfter"]["vendor-shifting"].as_u64().unwrap_or(0);
            // `plan` reads 100 probes: 4 standard deviations of their share.
            let p = f64::from(percent) / 100.0;
            let tolerance = (400.0 * (p * (1.0 - p) / 100.0).sqrt()).ceil() as i64;
            assert!(
                (seen as i64 - i64::from(percent)).abs() <= tolerance,
                "plan sees {seen} % for {percent} %: {plan}"
            );
            wait_for("oura consumes both streams", Duration::from_secs(20), || async {
                let b = bindings(&app, "oura").await;
                b.iter().any(|s| s == "AA_VENDOR_HOT") && b.iter().any(|s| s == "ATHLETE_ALLY_EVENTS")
            })
            .await;
            let m = app.metrics().await;
            for stream in ["AA_VENDOR_HOT", "ATHLETE_ALLY_EVENTS"] {
                assert_eq!(
                    metric_value(
                        &m,
                        "normalize_consumer_bound",
                        &[("consumer", "oura"), ("stream", stream)]
                    ),
                    Some(1.0),
                    "{stream} bound during the shift"
                );
            }
        } else {
            assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (published, _) = publisher.finish().await;
    let rows = per_step(
        &published.samples,
        &["(before)", "shift 10 %", "shift 50 %", "shift 100 %"],
    );
    assert_eq!(rows.iter().map(|r| r.1).sum::<usize>(), 0, "publishes failed");
    wait_rows(&stack.db, "shift", &published).await;
    assert_eq!(stream_messages(&stack.js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

/// On a named account the tool edits the block the operator placed inside the account; the
/// rollback (identity mapping) sends the vendor subjects back to the legacy stream at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollback_by_mapping_on_a_named_account() {
    let conf = "accounts {\n  APP {\n    jetstream: enabled\n    users: [{user: app, password: app-pw}]\n    # BEGIN normalize-service migrate: managed, do not edit between these lines\n    # END normalize-service migrate\n  }\n}\nno_auth_user: app\n";
    let stack = legacy_stack(conf).await;
    let version = server_version(&stack).await;
    if !at_least_2_10(&version) {
        return refused_before_2_10(&stack, &version).await;
    }
    let vars = cli_vars(&stack);
    let map = mapping_args(&stack);
    let app = stack.app().await;
    step(&vars, &["migrate", "phase0"], &[]).await;
    let r = step(&vars, &["migrate", "phase1", "--yes"], &map).await;
    assert_eq!(r["phaseAfter"], "vendor-moved", "{r}");
    let file = std::fs::read_to_string(stack.nats.store.path().join("nats.conf")).unwrap();
    let account = file.find("APP {").unwrap();
    let block = file.find("mappings = {").unwrap();
    assert!(
        block > account && file[block..].contains("\"vendor.>\": \"mig.vendor.>\""),
        "{file}"
    );
    assert!(
        file.trim_end().ends_with("no_auth_user: app"),
        "the block stayed inside the account:\n{file}"
    );

    let publisher = Publisher::start(&stack.js, "acct");
    publisher.step(1);
    let r = step(&vars, &["migrate", "rollback", "phase1", "--yes"], &map).await;
    assert_eq!(r["phaseAfter"], "prepared", "{r}");
    let ack = stack
        .js
        .publish("vendor.after-rollback", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, "ATHLETE_ALLY_EVENTS");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (published, _) = publisher.finish().await;
    let rows = per_step(&published.samples, &["(before)", "rollback phase1 (identity)"]);
    assert_eq!(rows.iter().map(|r| r.1).sum::<usize>(), 0, "publishes failed");
    wait_rows(&stack.db, "acct", &published).await;
    app.stop().await.unwrap();
}

/// A JetStream cluster of three: the operator applies the printed mapping to one server after
/// the other, slowly. The step probes through every server the INFO advertises and goes on only
/// once all three route the group; until then it keeps waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_waits_until_every_server_of_a_cluster_routes_the_group() {
    let probe = NatsServer::start().await;
    let version = probe.client().await.server_info().version;
    if !at_least_2_10(&version) {
        println!("nats-server {version}: the mapping cut-over is refused before 2.10 (see the other tests)");
        return;
    }
    drop(probe);
    let (servers, cluster_conf) = cluster(false).await;
    let db = TestDb::new().await;
    let mut vars = HashMap::new();
    vars.insert("NATS_URL".to_string(), servers[0].url());
    vars.insert("DATABASE_URL".to_string(), db.url.clone());
    cli_json(&vars, &["migrate", "phase0"], 0).await;

    let mut child = tokio::process::Command::new(BIN)
        .args([
            "migrate",
            "phase1",
            "--yes",
            "--no-probe",
            "--mapping-timeout",
            "90",
            "--json",
        ])
        .env_clear()
        .envs(&vars)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The block as printed for the operator, applied verbatim.
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut block = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the step prints the mapping")
        .unwrap()
    {
        let l = line.trim();
        if l.starts_with("mappings = {") || !block.is_empty() {
            block.push(l.to_string());
        }
        if l == "}" && !block.is_empty() {
            break;
        }
    }
    let block = block.join("\n");
    assert!(block.contains("\"vendor.>\": \"mig.vendor.>\""), "{block}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    for (i, server) in servers.iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "the step went on with {i} of 3 servers routing the group"
        );
        server.reload_with(&format!("{}{block}\n", cluster_conf(i)));
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the step ends once every server routes the group")
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report}");
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["what"].as_str().is_some_and(|w| w.starts_with("mapping of")))
        .cloned()
        .unwrap_or(Value::Null);
    assert!(
        check["status"]
            .as_str()
            .is_some_and(|s| s.contains("through 3 server(s)")),
        "{report}"
    );
    // Through each server a publish now lands in the vendor stream.
    for server in &servers {
        let ack = server
            .js()
            .await
            .publish("vendor.through-each", "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.stream, "AA_VENDOR_HOT");
    }
}

/// Three nats-servers in one JetStream cluster (advertising their client URLs unless
/// `no_advertise`), the legacy stream created; also the cluster part of each one's config.
async fn cluster(no_advertise: bool) -> (Vec<NatsServer>, impl Fn(usize) -> String) {
    let routes = [free_port(), free_port(), free_port()];
    let cluster_conf = move |i: usize| {
        let others: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
            .collect();
        format!(
            "server_name: n{i}\ncluster {{\n  name: mig\n  listen: 127.0.0.1:{}\n  routes: [{}]\n  no_advertise: {no_advertise}\n}}\n",
            routes[i],
            others.join(", ")
        )
    };
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(NatsServer::start_with(&cluster_conf(i)).await);
    }
    let js = servers[0].js().await;
    // The stream can be created once the cluster has elected its meta leader.
    wait_for("the JetStream cluster", Duration::from_secs(30), || async {
        js.create_stream(topology::legacy_spec(&StreamNames::default(), 1).to_config())
            .await
            .is_ok()
    })
    .await;
    (servers, cluster_conf)
}

/// A cluster that does not advertise its servers (`no_advertise`, as the NATS Helm chart sets
/// it): probing through the one connected server would prove nothing about the others, so the
/// step is refused before anything changes unless every server is listed with `--server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_that_hides_its_servers_needs_them_listed() {
    let probe = NatsServer::start().await;
    let version = probe.client().await.server_info().version;
    if !at_least_2_10(&version) {
        println!("nats-server {version}: the mapping cut-over is refused before 2.10 (see the other tests)");
        return;
    }
    drop(probe);
    let (servers, _) = cluster(true).await;
    let db = TestDb::new().await;
    let mut vars = HashMap::new();
    vars.insert("NATS_URL".to_string(), servers[0].url());
    vars.insert("DATABASE_URL".to_string(), db.url.clone());
    cli_json(&vars, &["migrate", "phase0"], 0).await;
    let r = cli_json(&vars, &["migrate", "phase1", "--yes", "--no-probe"], 3).await;
    assert!(r.to_string().contains("--server"), "{r}");
    // Nothing changed: the vendor stream is still parked.
    let info = servers[0]
        .js()
        .await
        .get_stream("AA_VENDOR_HOT")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.subjects, ["AA_VENDOR_HOT"]);
    // Listed, the servers are reached (the step then waits for the mapping: not applied here).
    let list = servers.iter().map(NatsServer::url).collect::<Vec<_>>().join(",");
    let r = cli_json(
        &vars,
        &[
            "migrate",
            "phase1",
            "--yes",
            "--no-probe",
            "--server",
            &list,
            "--mapping-timeout",
            "1",
        ],
        1,
    )
    .await;
    let text = r.to_string();
    assert!(text.contains("not within 1 s through"), "{r}");
}

/// A shift leaves both streams receiving the group's subjects: `migrate shift` makes sure the
/// durables exist on the legacy stream too (the previous service never consumed Oura, so it may
/// have none there), or a daemon under `TOPOLOGY_PROVISION=off` would leave the legacy share
/// unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_creates_the_durables_on_the_legacy_stream_too() {
    let stack = legacy_stack("").await;
    let version = server_version(&stack).await;
    if !at_least_2_10(&version) {
        return refused_before_2_10(&stack, &version).await;
    }
    let vars = cli_vars(&stack);
    let map = mapping_args(&stack);
    step(&vars, &["migrate", "phase0"], &[]).await;
    let legacy = stack.js.get_stream("ATHLETE_ALLY_EVENTS").await.unwrap();
    if legacy.consumer_info("normalize-oura").await.is_ok() {
        legacy.delete_consumer("normalize-oura").await.unwrap();
    }
    let r = step(&vars, &["migrate", "shift", "vendor", "10", "--yes"], &map).await;
    assert!(
        r.to_string()
            .contains("create durable normalize-oura on ATHLETE_ALLY_EVENTS"),
        "{r}"
    );
    for stream in ["ATHLETE_ALLY_EVENTS", "AA_VENDOR_HOT"] {
        assert!(
            consumer_backlog(&stack.js, stream, "normalize-oura")
                .await
                .is_some(),
            "normalize-oura on {stream}"
        );
    }
}
