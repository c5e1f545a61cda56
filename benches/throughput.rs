//! Throughput benchmark (not a test): `cargo bench --bench throughput`.
//!
//! Every scenario gets its own nats-server (free port, temp store) and a fresh database, started
//! by the integration tests' harness (`tests/it/support.rs`), with the core stream (`AA_CORE_HOT`,
//! `athlete-ally.>`: it captures the raw events and the `*.normalized-stored` events alike, as the
//! daemon needs it), is preloaded with N HRV events (pipelined publishes), then drained by
//! - the daemon binary (`normalize-service run`, a child process) at several `HRV_BATCH_SIZE`s,
//!   normalized-event publishing on, its durable's `max_ack_pending` sized by the rule of
//!   docs/OPERATIONS.md (instances × batch × (depth + 1), at least the default 1,000);
//! - the bare loop: fetch → one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO UPDATE` → ack
//!   (this binary re-executed as a child, so its RSS and CPU are its own);
//! - `bare+publish`, the ceiling for the daemon's work: the bare loop that also, after the commit
//!   and before the acks, publishes one normalized event per stored row (the statement's
//!   `RETURNING`) to `athlete-ally.hrv.normalized-stored` with a `Nats-Msg-Id` and a body like
//!   the daemon's, sending all of a batch's publishes and then awaiting all their PubAcks.
//!
//! Each round runs bare, bare+publish and daemon back to back per batch size; the medians of
//! the rounds (and every round's value) are printed last. Every run is measured the same way
//! from outside: events/s from the first delivery to "nothing pending or unacked" (every loop
//! acks after its commit; that each event stored its row is checked afterwards, outside the
//! timing), per-batch latency p50/p99, peak RSS (VmHWM) of the process that consumed, CPU
//! seconds during the run of that process, of nats-server and of the PostgreSQL backends serving
//! it (`pg_stat_activity` by `application_name`) — printed as µs of CPU per event per component
//! and events per CPU-second of the three — and for the daemon its achieved batch size (the
//! mean of its `normalize_batch_size` histogram, messages per completed pull, scraped before it
//! stops; and the events per processed batch, from the count of
//! `normalize_batch_duration_seconds`, since one pull may be processed as several batches). The ratios the
//! issue-18 targets use are printed with the targets: daemon / bare+publish in events per
//! CPU-second and in events/s, daemon / bare in events/s. Then a steady 1,000 events/s run
//! measures publish → stored-and-announced latency (p50/p99) through the daemon. Every figure of
//! one invocation is measured side by side on the same machine, so the ratios are what to
//! compare. Nothing here asserts a timing.
//!
//! Options (environment): `BENCH_EVENTS` (200000), `BENCH_SINGLE_EVENTS` (events for the
//! one-message-at-a-time mode, default min(BENCH_EVENTS, 20000): the rate is what is compared),
//! `BENCH_BATCH_SIZES` (`500,10`), `BENCH_ROUNDS` (3: rounds per batch size; medians are
//! printed), `BENCH_STEADY_SECS` (10), `BENCH_STEADY_RATE` (1000), `BENCH_INSTANCES` (`1,2,3`:
//! daemon instances sharing the durable, issue #7's scale-out figure) and
//! `BENCH_INSTANCES_BATCH` (10), `BENCH_SKIP` (comma list of
//! `bare,publish,daemon,single,instances,steady`; `publish` is bare+publish),
//! `BENCH_PIPELINE_DEPTH` (the daemon's `HRV_PIPELINE_DEPTH` in the batch, instance and soak
//! runs; its default when unset), `BENCH_MAX_ACK_PENDING` (the daemons' durable's
//! `HRV_MAX_ACK_PENDING`; the rule above when unset), `BENCH_PULL_MODE` (the daemons'
//! `HRV_PULL_MODE`; the default `fetch` when unset), `TEST_DATABASE_URL`, `NATS_SERVER_BIN`.
//!
//! Knobs off by default:
//! - `BENCH_PRELOAD_ROWS` (0): rows already in `hrv_data` before each run of the rounds (bare,
//!   bare+publish, daemon), inserted by one `INSERT … SELECT … FROM generate_series` into the
//!   run's database, then `VACUUM ANALYZE` and `CHECKPOINT` so the run does not pay for them.
//!   Their keys are the events' user ids on the days before the events' (new keys for every
//!   event) unless `BENCH_PRELOAD_OVERLAP=1`: then they are the events' own keys, captured
//!   earlier, so every event (of the first `BENCH_PRELOAD_ROWS`) updates a row. 10 million rows
//!   take a minute or two per run to insert.
//! - `BENCH_SOAK_EVENTS` (0): a separate daemon run of that many events at `HRV_BATCH_SIZE=500`
//!   reporting its peak RSS and its RSS sampled every second (to show it stays flat).
//! - `BENCH_NORMALIZED_STORAGE` (`file|memory`), `BENCH_DUPLICATE_WINDOW_MS`, `BENCH_ATOMIC=1`
//!   (nats-server 2.12 or later): where and how the normalized events are stored, to measure what
//!   would move the ceiling (issue 18 item 5; see [`Ceiling`]). They change the benchmark's
//!   streams only, never the daemon. `BENCH_CEILINGS=shared,window1s,own-file,memory,atomic`
//!   instead runs bare+publish and the daemon once per variant in every round and prints each
//!   variant's ratios to the first one ([`compare_ceilings`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures::StreamExt;
use normalize_service::config::StreamNames;
use normalize_service::topology;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

// The integration tests' harness: the same servers and the same daemon runner.
#[allow(dead_code, unused_imports, unused_macros)]
#[path = "../tests/it/support.rs"]
mod support;

use support::{vars, DaemonProcess, Stack};

const SUBJECT: &str = "athlete-ally.hrv.raw-received";
/// Where the daemon announces a stored HRV row (src/pipeline/hrv.rs); bare+publish too.
const NORMALIZED_SUBJECT: &str = "athlete-ally.hrv.normalized-stored";
const STREAM: &str = "AA_CORE_HOT";
const DURABLE: &str = "normalize-hrv-durable";
/// The events' user ids cycle through this many users; each cycle is one more day.
const USERS: u64 = 5000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Issue 18 item 5: what would move the ceiling, measured by changing where the normalized events
/// are stored (knobs, never the shipped topology):
/// - `BENCH_NORMALIZED_STORAGE=file|memory`: the normalized events in a stream of their own,
///   `AA_NORMALIZED` (`athlete-ally.*.normalized-stored`), of that storage; the core stream keeps
///   only the raw subjects;
/// - `BENCH_DUPLICATE_WINDOW_MS`: the duplicate window of the stream that stores the normalized
///   events (the shipped one: 2 minutes);
/// - `BENCH_ATOMIC=1` (nats-server 2.12 or later): that stream allows atomic batches, and the
///   bare+publish loop publishes each batch's normalized events as one atomic batch (only the
///   first and the committing message get a reply; the daemon is not changed).
#[derive(Debug, Clone, Copy, Default)]
struct Ceiling {
    storage: Option<jetstream::stream::StorageType>,
    duplicate_window: Option<Duration>,
    atomic: bool,
}

impl Ceiling {
    /// A named variant of `BENCH_CEILINGS`: `shared` (the shipped topology), `window1s`,
    /// `own-file`, `memory` (own stream in memory), `atomic` (own file stream, atomic batches:
    /// bare+publish only).
    fn variant(name: &str) -> Ceiling {
        use jetstream::stream::StorageType::{File, Memory};
        match name {
            "shared" => Ceiling::default(),
            "window1s" => Ceiling {
                duplicate_window: Some(Duration::from_secs(1)),
                ..Ceiling::default()
            },
            "own-file" => Ceiling {
                storage: Some(File),
                ..Ceiling::default()
            },
            "memory" => Ceiling {
                storage: Some(Memory),
                ..Ceiling::default()
            },
            "atomic" => Ceiling {
                storage: Some(File),
                atomic: true,
                ..Ceiling::default()
            },
            other => panic!("BENCH_CEILINGS: unknown variant {other}"),
        }
    }

    /// The knobs that give this ceiling, for the bare loop's child process.
    fn to_env(self, cmd: &mut Command) {
        let storage = match self.storage {
            Some(jetstream::stream::StorageType::Memory) => "memory",
            Some(jetstream::stream::StorageType::File) => "file",
            None => "",
        };
        cmd.env("BENCH_NORMALIZED_STORAGE", storage);
        match self.duplicate_window {
            Some(w) => cmd.env("BENCH_DUPLICATE_WINDOW_MS", w.as_millis().to_string()),
            None => cmd.env_remove("BENCH_DUPLICATE_WINDOW_MS"),
        };
        cmd.env("BENCH_ATOMIC", if self.atomic { "1" } else { "0" });
    }

    fn from_env() -> Ceiling {
        let storage = match std::env::var("BENCH_NORMALIZED_STORAGE").as_deref() {
            Ok("memory") => Some(jetstream::stream::StorageType::Memory),
            Ok("file") => Some(jetstream::stream::StorageType::File),
            _ => None,
        };
        let duplicate_window = std::env::var("BENCH_DUPLICATE_WINDOW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        let atomic = std::env::var("BENCH_ATOMIC").is_ok_and(|v| v.trim() == "1");
        Ceiling {
            storage,
            duplicate_window,
            atomic,
        }
    }
}

fn event(i: u64) -> String {
    let base = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    let date = base + chrono::Days::new(i / USERS);
    let captured = format!("{date}T07:30:00Z");
    serde_json::json!({
        "payload": {"userId": format!("user-{:05}", i % USERS), "date": date.to_string(), "rMSSD": 40.0 + (i % 50) as f64,
                    "capturedAt": captured, "raw": {"source": "oura"}}
    })
    .to_string()
}

async fn preload(js: &jetstream::Context, n: u64) -> Duration {
    let started = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        acks.push(js.publish(SUBJECT, event(i).into()).await.unwrap().into_future());
        while acks.len() >= 4096 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
    started.elapsed()
}

/// Rows already in `hrv_data` before a run (`BENCH_PRELOAD_ROWS`, `BENCH_PRELOAD_OVERLAP`).
#[derive(Debug, Default, Clone, Copy)]
struct Preload {
    rows: u64,
    /// The rows are the events' own keys (captured earlier, so each event updates its row);
    /// otherwise the same users on the days before the events'.
    overlap: bool,
}

/// Inserts the preload's rows in one statement, then leaves the table as a long-running one
/// would be (visibility settled, statistics current, nothing left for a checkpoint) so that the
/// run measures its own work only.
async fn preload_rows(pool: &PgPool, p: Preload) {
    if p.rows == 0 {
        return;
    }
    let started = Instant::now();
    // Day k of user u: the events' key of event k * USERS + u with overlap, else the day k + 1
    // before the events' first day. Captured at 06:00, before the events' 07:30, so an
    // overlapping event is newer than its row in every field.
    sqlx::query(
        "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, readiness_score, vendor, captured_at,
                               source_stream, source_seq, vendor_at, vendor_stream, vendor_seq, version)
         SELECT 'user-' || lpad((g % $3)::text, 5, '0'), k.d, 40 + (g % 50), ln(40 + (g % 50)), 0, 'oura',
                (k.d + time '06:00') AT TIME ZONE 'UTC', '', 0, (k.d + time '06:00') AT TIME ZONE 'UTC', '', 0, 1
         FROM generate_series(0::bigint, $1 - 1) AS g,
              LATERAL (SELECT CASE WHEN $2 THEN date '2024-01-01' + (g / $3)::int
                                   ELSE date '2024-01-01' - 1 - (g / $3)::int END AS d) AS k",
    )
    .bind(p.rows as i64)
    .bind(p.overlap)
    .bind(USERS as i64)
    .execute(pool)
    .await
    .unwrap();
    let inserted = started.elapsed();
    // Simple-protocol statements: VACUUM runs outside any transaction block.
    sqlx::raw_sql("VACUUM ANALYZE hrv_data")
        .execute(pool)
        .await
        .unwrap();
    // Needs a superuser (the tests' server has one); without it a checkpoint may fall in the run.
    let _ = sqlx::raw_sql("CHECKPOINT").execute(pool).await;
    eprintln!(
        "  preloaded {} rows into hrv_data ({}) in {:.1} s, vacuum and checkpoint {:.1} s",
        p.rows,
        if p.overlap {
            "the events' keys"
        } else {
            "keys apart from the events'"
        },
        inserted.as_secs_f64(),
        (started.elapsed() - inserted).as_secs_f64()
    );
}

/// CPU seconds during a run, per component.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    /// The process that consumed (daemon or bare loop).
    consumer: f64,
    nats: f64,
    /// The PostgreSQL backends serving the consumer.
    pg: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.consumer + self.nats + self.pg
    }
}

#[derive(Debug, Default, Clone)]
struct Figures {
    label: String,
    events: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    cpu: Cpu,
    /// The daemon's mean messages per completed pull (`normalize_batch_size` sum / count).
    achieved_batch: Option<f64>,
    /// The daemon's mean messages per processed batch (events / `normalize_batch_duration_seconds`
    /// count): a pull's messages may be processed as several batches.
    processed_batch: Option<f64>,
    /// VmRSS sampled every second during the run (the soak run only), MiB.
    rss_series: Vec<f64>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }

    /// µs of CPU per event of `secs` CPU seconds.
    fn us_per_event(&self, secs: f64) -> f64 {
        secs / self.events as f64 * 1e6
    }

    /// Events per CPU-second of the consumer, nats-server and PostgreSQL together.
    fn per_cpu_sec(&self) -> f64 {
        self.events as f64 / self.cpu.total()
    }
}

fn proc_status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Peak RSS of a process so far.
fn vm_hwm_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM:")
}

/// Waits for the first delivery to `durable`, then until nothing is pending or unacked;
/// returns the elapsed time between the two (polled every 2 ms / 5 ms). Both loops ack after the
/// commit, so all rows are committed by then; that every event made its row (or its row's newer
/// version over a preloaded one) is checked afterwards, outside the timing (a count over a
/// preloaded table takes a while).
async fn time_drain(js: &jetstream::Context, pool: &PgPool, durable: &str, n: u64) -> Duration {
    let stream = js.get_stream(STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    let t0 = loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.delivered.consumer_sequence > 0 {
                break Instant::now();
            }
        }
        assert!(Instant::now() < deadline, "no delivery to {durable}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break t0.elapsed();
            }
        }
        assert!(Instant::now() < deadline, "{durable} did not drain");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Preloaded rows carry position 0; every event's row carries the event's.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM hrv_data WHERE source_seq > 0")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored as u64, n, "{durable}: one stored row per event");
    took
}

/// CPU seconds used so far by the PostgreSQL backends of this database whose connections are
/// named `application_name`.
async fn backend_cpu(pool: &PgPool, application_name: &str) -> f64 {
    let backends: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(application_name)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    backends.iter().map(|&p| cpu_secs(p.unsigned_abs())).sum()
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: indexes 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Mean of a Prometheus histogram (`_sum / _count`) over the series whose labels contain
/// `label`.
fn histogram_mean(text: &str, name: &str, label: &str) -> f64 {
    let sum_of = |suffix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}_{suffix}")) && l.contains(label))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    let count = sum_of("count");
    if count == 0.0 {
        f64::NAN
    } else {
        sum_of("sum") / count
    }
}

/// The daemon as a process with the service's defaults (not the tests' tuned ones) but
/// `HRV_BATCH_SIZE`, `HRV_MAX_ACK_PENDING` ([`max_ack_pending`]), `HRV_PIPELINE_DEPTH` (`depth`,
/// the daemon's default when `None`) and `HRV_PULL_MODE` (`BENCH_PULL_MODE`), on the stack's
/// servers; `instances`: how many daemons share the durable.
fn start_daemon(stack: &Stack, batch: usize, depth: Option<usize>, instances: usize) -> DaemonProcess {
    let mut vars = vars(&[
        ("NATS_URL", &stack.nats.url()),
        ("DATABASE_URL", &stack.db.url),
        ("HOST", "127.0.0.1"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "warn"),
        ("HRV_BATCH_SIZE", &batch.to_string()),
        (
            "HRV_MAX_ACK_PENDING",
            &max_ack_pending(batch, depth, instances).to_string(),
        ),
    ]);
    if let Some(d) = depth {
        vars.insert("HRV_PIPELINE_DEPTH".into(), d.to_string());
    }
    if let Ok(m) = std::env::var("BENCH_PULL_MODE") {
        vars.insert("HRV_PULL_MODE".into(), m);
    }
    DaemonProcess::spawn_showing_stderr(&vars)
}

/// The daemon's pipeline depth when `HRV_PIPELINE_DEPTH` is not set.
const DEFAULT_DEPTH: usize = normalize_service::config::DEFAULT_PIPELINE_DEPTH;

/// The durable's `max_ack_pending` the daemons get: `BENCH_MAX_ACK_PENDING`, else the rule of
/// docs/OPERATIONS.md, room for every instance's pipeline and prefetched pull (instances ×
/// batch × (depth + 1)), and never below the service's default of 1,000. At batch 500 the
/// default would hold two of the three batches in flight, and the server would hold the third
/// pull until the first one's acks arrived.
fn max_ack_pending(batch: usize, depth: Option<usize>, instances: usize) -> usize {
    match std::env::var("BENCH_MAX_ACK_PENDING") {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            panic!("BENCH_MAX_ACK_PENDING={v:?} is not a number of messages (1 or more)")
        }),
        Err(_) => (instances * batch * (depth.unwrap_or(DEFAULT_DEPTH) + 1)).max(1000),
    }
}

/// The daemon's mean messages per completed pull of the HRV consumer.
fn achieved_batch(text: &str) -> f64 {
    histogram_mean(text, "normalize_batch_size", "consumer=\"hrv\"")
}

/// SIGTERM, and SIGKILL if the daemon is still running 30 s later.
async fn stop_daemon(mut daemon: DaemonProcess) {
    let _ = daemon.terminate(Duration::from_secs(30)).await;
}

/// The nats-server's process id, for its CPU time.
fn nats_pid(stack: &Stack) -> u32 {
    stack.nats.pid().expect("nats-server runs")
}

/// Quantile from a Prometheus histogram (cumulative buckets), interpolated linearly inside the
/// bucket as `histogram_quantile` does.
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let v: f64 = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return prev.0 * 1000.0;
            }
            let frac = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return (prev.0 + (le - prev.0) * frac) * 1000.0;
        }
        prev = (le, c);
    }
    f64::NAN
}

/// Own servers (the tests' harness) with the core stream (which also captures the normalized
/// events, as the daemon needs it), migrated, `preload` rows in `hrv_data`, and `n` events
/// in the stream.
async fn setup(n: u64, rows: Preload, ceiling: Ceiling) -> (Stack, jetstream::Context, PgPool) {
    let stack = Stack::start().await;
    let js = stack.js.clone();
    let mut core = topology::core_spec(&StreamNames::default(), 1).to_config();
    match ceiling.storage {
        // The normalized events in a stream of their own; the core stream keeps the raw ones.
        Some(storage) => {
            core.subjects = vec!["athlete-ally.*.raw-received".into(), "sleep.*".into()];
            js.create_stream(jetstream::stream::Config {
                name: "AA_NORMALIZED".into(),
                subjects: vec!["athlete-ally.*.normalized-stored".into()],
                storage,
                duplicate_window: ceiling.duplicate_window.unwrap_or(core.duplicate_window),
                allow_atomic_publish: ceiling.atomic,
                ..core.clone()
            })
            .await
            .unwrap();
        }
        None => {
            core.duplicate_window = ceiling.duplicate_window.unwrap_or(core.duplicate_window);
            core.allow_atomic_publish = ceiling.atomic;
        }
    }
    js.create_stream(core).await.unwrap();
    let pool = stack.pool().await;
    normalize_service::store::MIGRATOR.run(&pool).await.unwrap();
    preload_rows(&pool, rows).await;
    let took = preload(&js, n).await;
    eprintln!(
        "  preloaded {n} events in {:.2} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    (stack, js, pool)
}

/// VmRSS of `pid` every second until `stop` fires.
fn sample_rss(pid: u32, mut stop: tokio::sync::oneshot::Receiver<()>) -> tokio::task::JoinHandle<Vec<f64>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => samples.push(proc_status_mib(pid, "VmRSS:")),
                _ = &mut stop => return samples,
            }
        }
    })
}

/// The daemon drains `n` events at `batch`; `sample`: its RSS every second (the soak run).
async fn run_daemon(
    n: u64,
    batch: usize,
    depth: Option<usize>,
    rows: Preload,
    sample: bool,
    ceiling: Ceiling,
) -> Figures {
    let (stack, js, pool) = setup(n, rows, ceiling).await;
    let daemon = start_daemon(&stack, batch, depth, 1);
    let (nats_cpu0, pid) = (cpu_secs(nats_pid(&stack)), daemon.pid());
    let daemon_cpu0 = cpu_secs(pid);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let sampler = sample.then(|| sample_rss(pid, stopped));
    let took = time_drain(&js, &pool, DURABLE, n).await;
    let nats_cpu = cpu_secs(nats_pid(&stack)) - nats_cpu0;
    let daemon_cpu = cpu_secs(pid) - daemon_cpu0;
    let _ = stop.send(());
    let rss_series = match sampler {
        Some(s) => s.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let text = daemon.metrics().await;
    // The daemon's pool connected when it started; what its backends used before the run
    // (migrations) is a few milliseconds.
    let pg_cpu = backend_cpu(&pool, "normalize-service").await;
    let batches = text
        .lines()
        .find(|l| l.starts_with("normalize_batch_duration_seconds_count") && l.contains("consumer=\"hrv\""))
        .and_then(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .unwrap_or(f64::NAN);
    eprintln!(
        "  breakdown: batches {batches:.0}, achieved batch {:.1} per pull, mean batch {:.2} ms, mean hrv_data statement {:.2} ms; CPU during the run: daemon {:.2} s, nats-server {:.2} s, PostgreSQL backends {:.2} s (wall {:.2} s)",
        achieved_batch(&text),
        histogram_mean(&text, "normalize_batch_duration_seconds", "consumer=\"hrv\"") * 1000.0,
        histogram_mean(&text, "normalize_db_write_duration_seconds", "table=\"hrv_data\"") * 1000.0,
        daemon_cpu,
        nats_cpu,
        pg_cpu,
        took.as_secs_f64()
    );
    let name = "normalize_batch_duration_seconds";
    let f = Figures {
        label: format!(
            "daemon HRV_BATCH_SIZE={batch}{} max_ack_pending {}",
            depth.map(|d| format!(" depth {d}")).unwrap_or_default(),
            max_ack_pending(batch, depth, 1)
        ),
        events: n,
        secs: took.as_secs_f64(),
        p50_ms: histogram_quantile(&text, name, 0.5),
        p99_ms: histogram_quantile(&text, name, 0.99),
        rss_mib: vm_hwm_mib(daemon.pid()),
        cpu: Cpu {
            consumer: daemon_cpu,
            nats: nats_cpu,
            pg: pg_cpu,
        },
        achieved_batch: Some(achieved_batch(&text)),
        processed_batch: Some(n as f64 / batches),
        rss_series,
    };
    let normalized = topology_count(&js, NORMALIZED_SUBJECT).await;
    assert_eq!(normalized, n, "one normalized event per event");
    stop_daemon(daemon).await;
    pool.close().await;
    drop(stack);
    f
}

/// Messages of `subject` in the stream (an ephemeral consumer's pending count).
async fn topology_count(js: &jetstream::Context, subject: &str) -> u64 {
    let name = js.stream_by_subject(subject).await.unwrap();
    let s = js.get_stream(name).await.unwrap();
    let mut c: jetstream::consumer::PullConsumer = s
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.info().await.map(|i| i.num_pending).unwrap_or(0)
}

/// The record of a normalized-stored event, as the daemon renders an `hrv_data` row
/// (src/pipeline/hrv.rs: keys in alphabetical order, `{"record": …}`).
#[derive(serde::Serialize)]
struct StoredHrv<'a> {
    #[serde(rename = "capturedAt")]
    captured_at: String,
    date: String,
    #[serde(rename = "lnRMSSD")]
    ln_rmssd: f64,
    #[serde(rename = "rMSSD")]
    rmssd: f64,
    #[serde(rename = "readinessScore")]
    readiness_score: i64,
    #[serde(rename = "userId")]
    user_id: &'a str,
    vendor: &'a str,
    version: i64,
}

#[derive(serde::Serialize)]
struct Announcement<'a> {
    record: StoredHrv<'a>,
}

/// The bare loop's statement; bare+publish adds `RETURNING` to learn which rows were stored.
const BARE_UPSERT: &str =
    "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq)
     SELECT u, d, r, l, 'oura', c, 'AA_CORE_HOT', s
     FROM UNNEST($1::text[], $2::date[], $3::float8[], $4::float8[], $5::timestamptz[], $6::int8[]) AS t(u, d, r, l, c, s)
     ON CONFLICT (user_id, date) DO UPDATE SET rmssd = EXCLUDED.rmssd, ln_rmssd = EXCLUDED.ln_rmssd,
         captured_at = EXCLUDED.captured_at, source_seq = EXCLUDED.source_seq, updated_at = now()
     WHERE hrv_data.captured_at <= EXCLUDED.captured_at";

/// The bare loop, run in a child process (`throughput --bare <nats> <db> <batch> <n> <publish>`);
/// `publish`: bare+publish.
async fn bare_child(nats_url: &str, db_url: &str, batch: usize, n: u64, publish: bool) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(STREAM).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "bare",
            pull::Config {
                durable_name: Some("bare".into()),
                filter_subject: SUBJECT.into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let options: PgConnectOptions = db_url.parse().unwrap();
    let pool = PgPool::connect_with(options.application_name("bench-bare"))
        .await
        .unwrap();
    let returning = format!("{BARE_UPSERT} RETURNING source_seq, version");
    let ceiling = Ceiling::from_env();
    let mut done = 0u64;
    let mut lat = Vec::new();
    while done < n {
        let mut msgs = consumer
            .fetch()
            .max_messages(batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let mut batch_msgs = Vec::with_capacity(batch);
        let mut first_at = None;
        while let Some(m) = msgs.next().await {
            first_at.get_or_insert_with(Instant::now);
            batch_msgs.push(m.unwrap());
        }
        if batch_msgs.is_empty() {
            continue;
        }
        let (mut users, mut dates, mut rmssd, mut ln, mut at, mut seqs) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for m in &batch_msgs {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let p = &v["payload"];
            let r = p["rMSSD"].as_f64().unwrap();
            users.push(p["userId"].as_str().unwrap().to_string());
            dates.push(NaiveDate::parse_from_str(p["date"].as_str().unwrap(), "%Y-%m-%d").unwrap());
            rmssd.push(r);
            ln.push(r.ln());
            at.push(
                DateTime::parse_from_rfc3339(p["capturedAt"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&Utc),
            );
            seqs.push(m.info().unwrap().stream_sequence as i64);
        }
        if publish {
            let stored: Vec<(i64, i64)> = sqlx::query_as(&returning)
                .bind(&users)
                .bind(&dates)
                .bind(&rmssd)
                .bind(&ln)
                .bind(&at)
                .bind(&seqs)
                .fetch_all(&pool)
                .await
                .unwrap();
            // After the commit, before the acks: every publish of the batch sent, then every
            // PubAck awaited, as the daemon does.
            let index: HashMap<i64, usize> = seqs.iter().enumerate().map(|(i, &s)| (s, i)).collect();
            let mut acks = Vec::with_capacity(stored.len());
            let mut atomic = Vec::with_capacity(if ceiling.atomic { stored.len() } else { 0 });
            for (seq, version) in stored {
                let i = index[&seq];
                let body = serde_json::to_vec(&Announcement {
                    record: StoredHrv {
                        captured_at: at[i].to_rfc3339_opts(SecondsFormat::Millis, true),
                        date: dates[i].to_string(),
                        ln_rmssd: ln[i],
                        rmssd: rmssd[i],
                        readiness_score: 0,
                        user_id: &users[i],
                        vendor: "oura",
                        version,
                    },
                })
                .unwrap();
                let id = format!("bare:{STREAM}:{seq}:hrv:v{version}");
                if ceiling.atomic {
                    atomic.push((id, body));
                    continue;
                }
                let message = jetstream::message::PublishMessage::build()
                    .payload(body.into())
                    .message_id(id);
                acks.push(
                    js.send_publish(NORMALIZED_SUBJECT, message)
                        .await
                        .unwrap()
                        .into_future(),
                );
            }
            futures::future::try_join_all(acks).await.unwrap();
            publish_atomic(&client, atomic).await;
        } else {
            sqlx::query(BARE_UPSERT)
                .bind(&users)
                .bind(&dates)
                .bind(&rmssd)
                .bind(&ln)
                .bind(&at)
                .bind(&seqs)
                .execute(&pool)
                .await
                .unwrap();
        }
        for m in &batch_msgs {
            m.ack_with(AckKind::Ack).await.unwrap();
        }
        client.flush().await.unwrap();
        done += batch_msgs.len() as u64;
        if let Some(t) = first_at {
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let pg_cpu = backend_cpu(&pool, "bench-bare").await;
    println!(
        "BARE {} {} {} {} {}",
        q(0.5),
        q(0.99),
        vm_hwm_mib(std::process::id()),
        cpu_secs(std::process::id()),
        pg_cpu
    );
}

/// One batch's normalized events as one atomic batch (`BENCH_ATOMIC=1`, ADR-50): the first
/// message and the committing last one are requests (an empty reply, then the batch's PubAck),
/// the others plain publishes.
async fn publish_atomic(client: &async_nats::Client, events: Vec<(String, Vec<u8>)>) {
    static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let batch_id = format!(
        "bare-{}-{}",
        std::process::id(),
        BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let last = events.len();
    for (i, (id, body)) in events.into_iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("Nats-Batch-Id", batch_id.as_str());
        headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        if i + 1 == last {
            headers.insert("Nats-Batch-Commit", "1");
        }
        if i == 0 || i + 1 == last {
            let reply = client
                .request_with_headers(NORMALIZED_SUBJECT, headers, body.into())
                .await
                .unwrap();
            if i + 1 == last {
                let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
                assert!(
                    ack.get("error").is_none() && ack["count"].as_u64() == Some(last as u64),
                    "atomic batch refused: {ack}"
                );
            }
        } else {
            client
                .publish_with_headers(NORMALIZED_SUBJECT, headers, body.into())
                .await
                .unwrap();
        }
    }
}

/// The bare loop (`publish`: bare+publish) as a child process draining `n` events at `batch`.
async fn run_bare(n: u64, batch: usize, publish: bool, rows: Preload, ceiling: Ceiling) -> Figures {
    let (stack, js, pool) = setup(n, rows, ceiling).await;
    let exe = std::env::current_exe().unwrap();
    let nats_cpu0 = cpu_secs(nats_pid(&stack));
    let mut command = Command::new(exe);
    ceiling.to_env(&mut command);
    let child = command
        .arg("--bare")
        .arg(stack.nats.url())
        .arg(&stack.db.url)
        .arg(batch.to_string())
        .arg(n.to_string())
        .arg(if publish { "publish" } else { "plain" })
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let took = time_drain(&js, &pool, "bare", n).await;
    let nats_cpu = cpu_secs(nats_pid(&stack)) - nats_cpu0;
    let out = child.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let parts: Vec<f64> = line
        .lines()
        .find(|l| l.starts_with("BARE "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let part = |i: usize| parts.get(i).copied().unwrap_or(f64::NAN);
    let name = if publish { "bare+publish" } else { "bare loop" };
    eprintln!(
        "  breakdown: CPU during the run: {name} {:.2} s, nats-server {:.2} s, PostgreSQL backend {:.2} s (wall {:.2} s)",
        part(3),
        nats_cpu,
        part(4),
        took.as_secs_f64()
    );
    if publish {
        let normalized = topology_count(&js, NORMALIZED_SUBJECT).await;
        assert_eq!(normalized, n, "one normalized event per event");
    }
    pool.close().await;
    drop(stack);
    Figures {
        label: format!("{name} batch={batch}"),
        events: n,
        secs: took.as_secs_f64(),
        p50_ms: part(0),
        p99_ms: part(1),
        rss_mib: part(2),
        cpu: Cpu {
            consumer: part(3),
            nats: nats_cpu,
            pg: part(4),
        },
        achieved_batch: None,
        processed_batch: None,
        rss_series: Vec::new(),
    }
}

/// `k` daemon instances on the same durable drain the preload together (issue #7's scale-out
/// figure): events/s, and how many messages each instance settled.
async fn run_instances(n: u64, batch: usize, depth: Option<usize>, k: usize) -> (Figures, Vec<f64>) {
    let (stack, js, pool) = setup(n, Preload::default(), Ceiling::from_env()).await;
    // Started back to back; each needs the same time to connect and bind, so the skew is a
    // few milliseconds of a run of seconds.
    let daemons: Vec<DaemonProcess> = (0..k).map(|_| start_daemon(&stack, batch, depth, k)).collect();
    let took = time_drain(&js, &pool, DURABLE, n).await;
    let mut shares = Vec::with_capacity(k);
    let mut rss: f64 = 0.0;
    for d in &daemons {
        let text = d.metrics().await;
        shares.push(
            text.lines()
                .find(|l| l.starts_with("normalize_hrv_messages_total{") && l.contains("result=\"success\""))
                .and_then(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .unwrap_or(0.0),
        );
        rss = rss.max(vm_hwm_mib(d.pid()));
    }
    for d in daemons {
        stop_daemon(d).await;
    }
    pool.close().await;
    drop(stack);
    let f = Figures {
        label: format!("{k} instance(s), batch {batch}"),
        events: n,
        secs: took.as_secs_f64(),
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        rss_mib: rss,
        ..Figures::default()
    };
    (f, shares)
}

/// A steady `rate` events/s for `secs` through the daemon: publish → normalized event received
/// (published by the daemon after the commit), so an upper bound of publish → committed row.
async fn run_steady(batch: usize, rate: u64, secs: u64) -> (f64, f64, f64, u64) {
    let (stack, js, pool) = setup(0, Preload::default(), Ceiling::from_env()).await;
    let daemon = start_daemon(&stack, batch, None, 1);
    // Ready when the durable exists.
    let stream = js.get_stream(STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream.consumer_info(DURABLE).await.is_err() {
        assert!(Instant::now() < deadline, "daemon did not bind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = stack.nats.client().await;
    let mut sub = client.subscribe(NORMALIZED_SUBJECT).await.unwrap();
    client.flush().await.unwrap();
    let total = rate * secs;
    let collector = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total as usize);
        while lat.len() < total as usize {
            match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                Ok(Some(m)) => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                    if let Some(at) = v["record"]["capturedAt"]
                        .as_str()
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    {
                        let ms = (Utc::now() - at.with_timezone(&Utc))
                            .num_microseconds()
                            .unwrap_or(0) as f64
                            / 1000.0;
                        lat.push(ms);
                    }
                }
                _ => break,
            }
        }
        lat
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..total {
        tick.tick().await;
        let now = Utc::now();
        let body = serde_json::json!({
            "payload": {"userId": format!("steady-{i}"), "date": "2025-03-01", "rMSSD": 42.0,
                        "capturedAt": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), "raw": {"source": "oura"}}
        })
        .to_string();
        acks.push(js.publish(SUBJECT, body.into()).await.unwrap().into_future());
        while let Some(Some(a)) = futures::FutureExt::now_or_never(acks.next()) {
            a.unwrap();
        }
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
    let mut lat = collector.await.unwrap();
    let received = lat.len() as u64;
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    let rss = vm_hwm_mib(daemon.pid());
    let out = (q(0.5), q(0.99), rss, received);
    stop_daemon(daemon).await;
    pool.close().await;
    drop(stack);
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print(f: &Figures, bare: Option<&Figures>, publish: Option<&Figures>, single: Option<&Figures>) {
    let mut extra = String::new();
    if let Some(b) = bare {
        extra.push_str(&format!("  {:.2}x bare", f.rate() / b.rate()));
    }
    if let Some(p) = publish {
        extra.push_str(&format!("  {:.2}x bare+publish", f.rate() / p.rate()));
    }
    if let Some(s) = single {
        extra.push_str(&format!("  {:.1}x one-at-a-time", f.rate() / s.rate()));
    }
    println!(
        "{:<30} {:>8} ev {:>7.2} s {:>9.0} ev/s  batch p50 {:>7.2} ms  p99 {:>7.2} ms  peak RSS {:>6.1} MiB{extra}",
        f.label,
        f.events,
        f.secs,
        f.rate(),
        f.p50_ms,
        f.p99_ms,
        f.rss_mib
    );
    let achieved = match (f.achieved_batch, f.processed_batch) {
        (Some(pull), Some(processed)) => {
            format!("  achieved batch {pull:.1} per pull, {processed:.1} per processed batch")
        }
        _ => String::new(),
    };
    println!(
        "{:<30} CPU µs/event: consumer {:>6.1}  nats-server {:>6.1}  PostgreSQL {:>6.1}  total {:>6.1}  {:>8.0} ev per CPU-second{achieved}",
        "",
        f.us_per_event(f.cpu.consumer),
        f.us_per_event(f.cpu.nats),
        f.us_per_event(f.cpu.pg),
        f.us_per_event(f.cpu.total()),
        f.per_cpu_sec()
    );
}

/// The three runs of one round at one batch size.
struct Round {
    batch: usize,
    bare: Option<Figures>,
    publish: Option<Figures>,
    daemon: Option<Figures>,
}

/// `median [each round]`, with `decimals` decimals.
fn spread(values: &[f64], decimals: usize) -> String {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    format!("{:.decimals$} [{}]", median(values.to_vec()), each.join(" "))
}

/// The issue-18 targets, by batch size and ratio (daemon / bare+publish per CPU-second,
/// daemon / bare+publish in events/s, daemon / bare in events/s).
fn target(batch: usize, ratio: &str) -> Option<f64> {
    match (batch, ratio) {
        (500, "per-cpu/publish") => Some(0.95),
        (500, "rate/publish") => Some(1.4),
        (500, "rate/bare") => Some(0.9),
        (10, "rate/bare") => Some(1.3),
        _ => None,
    }
}

/// Medians over the rounds of one batch size, each round's values, and the ratios against the
/// targets.
fn summarize(rounds: &[&Round], single: Option<&Figures>) {
    let Some(first) = rounds.first() else { return };
    let batch = first.batch;
    println!("batch {batch}, median of {} round(s) [each round]:", rounds.len());
    let runs: [(&str, Vec<&Figures>); 3] = [
        (
            "bare loop",
            rounds.iter().filter_map(|r| r.bare.as_ref()).collect(),
        ),
        (
            "bare+publish",
            rounds.iter().filter_map(|r| r.publish.as_ref()).collect(),
        ),
        (
            "daemon",
            rounds.iter().filter_map(|r| r.daemon.as_ref()).collect(),
        ),
    ];
    for (name, figures) in &runs {
        if figures.is_empty() {
            continue;
        }
        let of = |f: fn(&Figures) -> f64| figures.iter().map(|x| f(x)).collect::<Vec<f64>>();
        let us = |f: fn(&Cpu) -> f64| median(figures.iter().map(|x| x.us_per_event(f(&x.cpu))).collect());
        let mut line = format!(
            "  {name:<13} {} ev/s  CPU µs/event {} (consumer {:.1}, nats-server {:.1}, PostgreSQL {:.1})  ev per CPU-second {}  peak RSS {:.1} MiB",
            spread(&of(Figures::rate), 0),
            spread(&of(|x| x.us_per_event(x.cpu.total())), 1),
            us(|c| c.consumer),
            us(|c| c.nats),
            us(|c| c.pg),
            spread(&of(Figures::per_cpu_sec), 0),
            of(|x| x.rss_mib).into_iter().fold(f64::NAN, f64::max),
        );
        let achieved: Vec<f64> = figures.iter().filter_map(|x| x.achieved_batch).collect();
        let processed: Vec<f64> = figures.iter().filter_map(|x| x.processed_batch).collect();
        if !achieved.is_empty() {
            line.push_str(&format!(
                "  achieved batch per pull {}, per processed batch {}",
                spread(&achieved, 1),
                spread(&processed, 1)
            ));
        }
        if let (Some(s), "daemon") = (single, *name) {
            line.push_str(&format!(
                "  {:.1}x one-at-a-time",
                median(of(Figures::rate)) / s.rate()
            ));
        }
        println!("{line}");
    }
    // Ratios within each round (runs seconds apart), then their median.
    let ratio = |key: &str, label: &str, of: fn(&Round) -> Option<f64>| {
        let values: Vec<f64> = rounds.iter().filter_map(|r| of(r)).collect();
        if values.is_empty() {
            return;
        }
        let verdict = match target(batch, key) {
            Some(t) if median(values.clone()) >= t => format!("  target >= {t}x: met"),
            Some(t) => format!("  target >= {t}x: not met"),
            None => String::new(),
        };
        println!("  {label:<44} {}x{verdict}", spread(&values, 2));
    };
    ratio(
        "per-cpu/publish",
        "daemon / bare+publish, ev per CPU-second:",
        |r| Some(r.daemon.as_ref()?.per_cpu_sec() / r.publish.as_ref()?.per_cpu_sec()),
    );
    ratio("rate/publish", "daemon / bare+publish, ev/s:", |r| {
        Some(r.daemon.as_ref()?.rate() / r.publish.as_ref()?.rate())
    });
    ratio("rate/bare", "daemon / bare, ev/s:", |r| {
        Some(r.daemon.as_ref()?.rate() / r.bare.as_ref()?.rate())
    });
}

/// `BENCH_CEILINGS=shared,memory,…` (issue 18 item 5): in every round, bare+publish (and the
/// daemon, unless skipped) once per variant of where the normalized events are stored, back to
/// back; then per variant the medians and the median of each round's ratio to the first variant,
/// so that the machine's drift between rounds cancels out.
async fn compare_ceilings(
    n: u64,
    sizes: &[usize],
    rounds: usize,
    depth: Option<usize>,
    variants: &[String],
    skip: &dyn Fn(&str) -> bool,
) {
    for &b in sizes {
        // [variant][round] → (bare+publish, daemon)
        let mut runs: Vec<Vec<(Option<Figures>, Option<Figures>)>> = vec![Vec::new(); variants.len()];
        for round in 1..=rounds {
            for (i, v) in variants.iter().enumerate() {
                let ceiling = Ceiling::variant(v);
                let publish = if skip("publish") {
                    None
                } else {
                    eprintln!("{v}: bare+publish, batch {b} (round {round}/{rounds})");
                    Some(run_bare(n, b, true, Preload::default(), ceiling).await)
                };
                let daemon = if skip("daemon") || ceiling.atomic {
                    None
                } else {
                    eprintln!("{v}: daemon, HRV_BATCH_SIZE={b} (round {round}/{rounds})");
                    Some(run_daemon(n, b, depth, Preload::default(), false, ceiling).await)
                };
                runs[i].push((publish, daemon));
            }
        }
        println!(
            "batch {b}, {rounds} round(s), medians [each round]; ratios to {} in the same round:",
            variants[0]
        );
        for (which, pick) in [("bare+publish", 0usize), ("daemon", 1usize)] {
            let get = |i: usize, r: usize| -> Option<&Figures> {
                let (p, d) = &runs[i][r];
                if pick == 0 {
                    p.as_ref()
                } else {
                    d.as_ref()
                }
            };
            for (i, v) in variants.iter().enumerate() {
                let figs: Vec<&Figures> = (0..rounds).filter_map(|r| get(i, r)).collect();
                if figs.is_empty() {
                    continue;
                }
                let m = |f: &dyn Fn(&Figures) -> f64| median(figs.iter().map(|x| f(x)).collect());
                let ratio = |f: &dyn Fn(&Figures) -> f64| {
                    let per_round: Vec<f64> = (0..rounds)
                        .filter_map(|r| Some(f(get(i, r)?) / f(get(0, r)?)))
                        .collect();
                    if per_round.is_empty() {
                        "—".to_string()
                    } else {
                        spread(&per_round, 2)
                    }
                };
                let us = |f: &Figures, secs: f64| f.us_per_event(secs);
                println!(
                    "  {which:<13} {v:<9} {:>7.0} ev/s (x{})  CPU µs/event {:.1} (x{}): consumer {:.1} (x{}), nats-server {:.1} (x{}), PostgreSQL {:.1}",
                    m(&|f| f.rate()),
                    ratio(&|f| f.rate()),
                    m(&|f| us(f, f.cpu.total())),
                    ratio(&|f| us(f, f.cpu.total())),
                    m(&|f| us(f, f.cpu.consumer)),
                    ratio(&|f| us(f, f.cpu.consumer)),
                    m(&|f| us(f, f.cpu.nats)),
                    ratio(&|f| us(f, f.cpu.nats)),
                    m(&|f| us(f, f.cpu.pg)),
                );
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Some(i) = args.iter().position(|a| a == "--bare") {
        let a = &args[i + 1..];
        rt.block_on(bare_child(
            &a[0],
            &a[1],
            a[2].parse().unwrap(),
            a[3].parse().unwrap(),
            a[4] == "publish",
        ));
        return;
    }
    let n: u64 = env_or("BENCH_EVENTS", 200_000);
    let single_n: u64 = env_or("BENCH_SINGLE_EVENTS", n.min(20_000));
    let sizes: Vec<usize> = std::env::var("BENCH_BATCH_SIZES")
        .unwrap_or_else(|_| "500,10".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let skip_list = std::env::var("BENCH_SKIP").unwrap_or_default();
    let skip = |name: &str| {
        skip_list
            .split(',')
            .any(|s| s.trim() == name || (name == "publish" && s.trim() == "bare+publish"))
    };
    let rounds: usize = env_or("BENCH_ROUNDS", 3).max(1);
    let depth: Option<usize> = std::env::var("BENCH_PIPELINE_DEPTH")
        .ok()
        .and_then(|d| d.trim().parse().ok());
    let steady_secs: u64 = env_or("BENCH_STEADY_SECS", 10);
    let steady_rate: u64 = env_or("BENCH_STEADY_RATE", 1000);
    let rows = Preload {
        rows: env_or("BENCH_PRELOAD_ROWS", 0),
        overlap: std::env::var("BENCH_PRELOAD_OVERLAP").is_ok_and(|v| v.trim() == "1"),
    };
    let soak: u64 = env_or("BENCH_SOAK_EVENTS", 0);
    let ceiling = Ceiling::from_env();
    let variants: Vec<String> = std::env::var("BENCH_CEILINGS")
        .unwrap_or_default()
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if !variants.is_empty() {
        rt.block_on(compare_ceilings(n, &sizes, rounds, depth, &variants, &skip));
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "normalize-service throughput benchmark: {n} HRV events per run; load average at start: {}",
        load.trim()
    );
    if rows.rows > 0 {
        println!(
            "hrv_data holds {} rows before each run of the rounds ({})",
            rows.rows,
            if rows.overlap {
                "the events' own keys: every event updates a row"
            } else {
                "other keys: every event inserts a row"
            }
        );
    }
    rt.block_on(async {
        // Each round runs bare, bare+publish and the daemon back to back, so every ratio compares
        // runs made seconds apart; the medians over rounds are the figures to quote.
        let mut results: Vec<Round> = Vec::new();
        for &b in &sizes {
            for round in 1..=rounds {
                let bare = if skip("bare") {
                    None
                } else {
                    eprintln!("bare loop, batch {b} (round {round}/{rounds})");
                    Some(run_bare(n, b, false, rows, ceiling).await)
                };
                let publish = if skip("publish") {
                    None
                } else {
                    eprintln!("bare+publish, batch {b} (round {round}/{rounds})");
                    Some(run_bare(n, b, true, rows, ceiling).await)
                };
                let daemon = if skip("daemon") {
                    None
                } else {
                    eprintln!("daemon, HRV_BATCH_SIZE={b} (round {round}/{rounds})");
                    Some(run_daemon(n, b, depth, rows, false, ceiling).await)
                };
                results.push(Round {
                    batch: b,
                    bare,
                    publish,
                    daemon,
                });
            }
        }
        let single = if skip("single") {
            None
        } else {
            // The previous service's way: one message, written, announced and acked before the
            // next one starts (batch 1, no pipelining).
            eprintln!("daemon, HRV_BATCH_SIZE=1 HRV_PIPELINE_DEPTH=1 ({single_n} events)");
            Some(run_daemon(single_n, 1, Some(1), Preload::default(), false, ceiling).await)
        };
        println!();
        for r in &results {
            if let Some(b) = &r.bare {
                print(b, None, None, None);
            }
            if let Some(p) = &r.publish {
                print(p, r.bare.as_ref(), None, None);
            }
            if let Some(d) = &r.daemon {
                print(d, r.bare.as_ref(), r.publish.as_ref(), single.as_ref());
            }
        }
        if let Some(s) = &single {
            print(s, None, None, None);
        }
        println!();
        for &b in &sizes {
            let of_size: Vec<&Round> = results.iter().filter(|r| r.batch == b).collect();
            summarize(&of_size, single.as_ref());
        }
        let daemon_rss = results
            .iter()
            .filter_map(|r| r.daemon.as_ref().map(|d| d.rss_mib))
            .fold(f64::NAN, f64::max);
        if !daemon_rss.is_nan() {
            println!(
                "daemon peak RSS, largest of the rounds: {daemon_rss:.1} MiB  target < 64 MiB: {}",
                if daemon_rss < 64.0 { "met" } else { "not met" }
            );
        }
        if soak > 0 {
            eprintln!("soak: daemon, HRV_BATCH_SIZE=500, {soak} events");
            let f = run_daemon(soak, 500, depth, Preload::default(), true, ceiling).await;
            println!();
            print(&f, None, None, None);
            let s = &f.rss_series;
            // At most 60 samples printed, evenly spaced.
            let step = s.len().div_ceil(60).max(1);
            let shown: Vec<String> = s.iter().step_by(step).map(|v| format!("{v:.1}")).collect();
            let half = |part: &[f64]| part.iter().copied().fold(f64::NAN, f64::max);
            println!(
                "soak {soak} events: peak RSS {:.1} MiB; RSS every {step} s (MiB): {}; largest in the first half {:.1}, in the second half {:.1}",
                f.rss_mib,
                shown.join(" "),
                half(&s[..s.len() / 2]),
                half(&s[s.len() / 2..])
            );
        }
        if !skip("instances") {
            let counts: Vec<usize> = std::env::var("BENCH_INSTANCES")
                .unwrap_or_else(|_| "1,2,3".into())
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect();
            let batch: usize = env_or("BENCH_INSTANCES_BATCH", 10);
            let mut one: Option<f64> = None;
            for k in counts {
                eprintln!("{k} instance(s), HRV_BATCH_SIZE={batch}");
                let (f, shares) = run_instances(n, batch, depth, k).await;
                let base = *one.get_or_insert(f.rate());
                let shares: Vec<String> = shares.iter().map(|s| format!("{s:.0}")).collect();
                println!(
                    "{:<30} {:>8} ev {:>7.2} s {:>9.0} ev/s  {:.2}x the first count  settled per instance {}  peak RSS {:.1} MiB",
                    f.label,
                    f.events,
                    f.secs,
                    f.rate(),
                    f.rate() / base,
                    shares.join("/"),
                    f.rss_mib
                );
            }
        }
        if !skip("steady") {
            eprintln!("steady {steady_rate} ev/s for {steady_secs} s");
            for b in [10usize, 500] {
                let (p50, p99, rss, got) = run_steady(b, steady_rate, steady_secs).await;
                println!(
                    "steady {steady_rate} ev/s, HRV_BATCH_SIZE={b:<4}: publish -> stored+announced p50 {p50:.2} ms  p99 {p99:.2} ms  ({got}/{} events)  peak RSS {rss:.1} MiB",
                    steady_rate * steady_secs
                );
            }
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("load average at end: {}", load.trim());
    });
}
