//! Throughput benchmark (not a test): `cargo bench --bench throughput`.
//!
//! Every scenario gets its own nats-server (free port, temp store) and a fresh database, started
//! by the integration tests' harness (`tests/it/support.rs`), is preloaded with N HRV events
//! (pipelined publishes), then drained by
//! - the daemon binary (`normalize-service run`, a child process) at several `HRV_BATCH_SIZE`s,
//!   normalized-event publishing on, and
//! - a bare fetch → one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO UPDATE` → ack loop (this
//!   binary re-executed as a child, so its RSS is its own),
//!
//! measured the same way from outside: events/s from the first delivery to "every row committed
//! and nothing pending or unacked", per-batch latency p50/p99, peak RSS (VmHWM) of the process
//! that consumed. Then a steady 1,000 events/s run measures publish → stored-and-announced
//! latency (p50/p99) through the daemon. Every figure of one invocation is measured side by
//! side on the same machine, so the ratios are what to compare.
//!
//! Options (environment): `BENCH_EVENTS` (200000), `BENCH_SINGLE_EVENTS` (events for the
//! one-message-at-a-time mode, default min(BENCH_EVENTS, 20000): the rate is what is compared),
//! `BENCH_BATCH_SIZES` (`500,10`), `BENCH_ROUNDS` (3: bare loop and daemon run back to back this
//! many times per batch size; medians are printed), `BENCH_STEADY_SECS` (10), `BENCH_STEADY_RATE` (1000),
//! `BENCH_INSTANCES` (`1,2,3`: daemon instances sharing the durable, issue #7's scale-out figure)
//! and `BENCH_INSTANCES_BATCH` (10), `BENCH_SKIP` (comma list of
//! `bare,daemon,single,instances,steady`), `BENCH_PIPELINE_DEPTH` (the
//! daemon's `HRV_PIPELINE_DEPTH` in the batch and instance runs; its default when unset), `TEST_DATABASE_URL`,
//! `NATS_SERVER_BIN`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use chrono::{DateTime, NaiveDate, Utc};
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
const STREAM: &str = "AA_CORE_HOT";
const DURABLE: &str = "normalize-hrv-durable";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(i: u64) -> String {
    let base = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    let date = base + chrono::Days::new(i / 5000);
    let captured = format!("{date}T07:30:00Z");
    serde_json::json!({
        "payload": {"userId": format!("user-{:05}", i % 5000), "date": date.to_string(), "rMSSD": 40.0 + (i % 50) as f64,
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

#[derive(Debug, Default, Clone)]
struct Figures {
    label: String,
    events: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
}

fn vm_hwm_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Waits for the first delivery to `durable`, then for all `n` rows committed with nothing
/// pending or unacked; returns the elapsed time between the two (polled every 2 ms / 5 ms).
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
    loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM hrv_data")
                    .fetch_one(pool)
                    .await
                    .unwrap_or(0);
                if rows as u64 >= n {
                    return t0.elapsed();
                }
            }
        }
        assert!(Instant::now() < deadline, "{durable} did not drain");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

/// Mean of a Prometheus histogram (`_sum / _count`), in milliseconds, over matching series.
fn histogram_mean_ms(text: &str, name: &str, label: &str) -> f64 {
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
        sum_of("sum") / count * 1000.0
    }
}

/// The daemon as a process with the service's defaults (not the tests' tuned ones), on the
/// stack's servers; `depth`: `HRV_PIPELINE_DEPTH`, or the daemon's default when `None`.
fn start_daemon(stack: &Stack, batch: usize, depth: Option<usize>) -> DaemonProcess {
    let batch = batch.to_string();
    let mut vars = vars(&[
        ("NATS_URL", &stack.nats.url()),
        ("DATABASE_URL", &stack.db.url),
        ("HOST", "127.0.0.1"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "warn"),
        ("HRV_BATCH_SIZE", &batch),
    ]);
    if let Some(d) = depth {
        vars.insert("HRV_PIPELINE_DEPTH".into(), d.to_string());
    }
    DaemonProcess::spawn_showing_stderr(&vars)
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

/// Own servers (the tests' harness) with the core stream, migrated, and preloaded with `n`
/// events.
async fn setup(n: u64) -> (Stack, jetstream::Context, PgPool) {
    let stack = Stack::start().await;
    let js = stack.js.clone();
    js.create_stream(topology::core_spec(&StreamNames::default(), 1).to_config())
        .await
        .unwrap();
    let pool = stack.pool().await;
    normalize_service::store::MIGRATOR.run(&pool).await.unwrap();
    let took = preload(&js, n).await;
    eprintln!(
        "  preloaded {n} events in {:.2} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    (stack, js, pool)
}

async fn run_daemon(n: u64, batch: usize, depth: Option<usize>) -> Figures {
    let (stack, js, pool) = setup(n).await;
    let daemon = start_daemon(&stack, batch, depth);
    let (nats_cpu0, pid) = (cpu_secs(nats_pid(&stack)), daemon.pid());
    let daemon_cpu0 = cpu_secs(pid);
    let took = time_drain(&js, &pool, DURABLE, n).await;
    let text = daemon.metrics().await;
    // The daemon's pool connected when it started; what its backends used before the run
    // (migrations) is a few milliseconds.
    let pg_cpu = backend_cpu(&pool, "normalize-service").await;
    eprintln!(
        "  breakdown: batches {:.0}, mean batch {:.2} ms, mean hrv_data statement {:.2} ms; CPU during the run: daemon {:.2} s, nats-server {:.2} s, PostgreSQL backends {:.2} s (wall {:.2} s)",
        text.lines()
            .find(|l| l.starts_with("normalize_batch_duration_seconds_count") && l.contains("consumer=\"hrv\""))
            .and_then(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .unwrap_or(f64::NAN),
        histogram_mean_ms(&text, "normalize_batch_duration_seconds", "consumer=\"hrv\""),
        histogram_mean_ms(&text, "normalize_db_write_duration_seconds", "table=\"hrv_data\""),
        cpu_secs(pid) - daemon_cpu0,
        cpu_secs(nats_pid(&stack)) - nats_cpu0,
        pg_cpu,
        took.as_secs_f64()
    );
    let name = "normalize_batch_duration_seconds";
    let f = Figures {
        label: match depth {
            Some(d) => format!("daemon HRV_BATCH_SIZE={batch} depth {d}"),
            None => format!("daemon HRV_BATCH_SIZE={batch}"),
        },
        events: n,
        secs: took.as_secs_f64(),
        p50_ms: histogram_quantile(&text, name, 0.5),
        p99_ms: histogram_quantile(&text, name, 0.99),
        rss_mib: vm_hwm_mib(daemon.pid()),
    };
    let normalized = topology_count(&js, "athlete-ally.hrv.normalized-stored").await;
    assert_eq!(normalized, n, "one normalized event per event");
    stop_daemon(daemon).await;
    pool.close().await;
    drop(stack);
    f
}

/// Messages of `subject` in the stream (an ephemeral consumer's pending count).
async fn topology_count(js: &jetstream::Context, subject: &str) -> u64 {
    let s = js.get_stream(STREAM).await.unwrap();
    let mut c: jetstream::consumer::PullConsumer = s
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.info().await.map(|i| i.num_pending).unwrap_or(0)
}

/// The bare loop, run in a child process (`throughput --bare <nats> <db> <batch> <n>`).
async fn bare_child(nats_url: &str, db_url: &str, batch: usize, n: u64) {
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
        sqlx::query(
            "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq)
             SELECT u, d, r, l, 'oura', c, 'AA_CORE_HOT', s
             FROM UNNEST($1::text[], $2::date[], $3::float8[], $4::float8[], $5::timestamptz[], $6::int8[]) AS t(u, d, r, l, c, s)
             ON CONFLICT (user_id, date) DO UPDATE SET rmssd = EXCLUDED.rmssd, ln_rmssd = EXCLUDED.ln_rmssd,
                 captured_at = EXCLUDED.captured_at, source_seq = EXCLUDED.source_seq, updated_at = now()
             WHERE hrv_data.captured_at <= EXCLUDED.captured_at",
        )
        .bind(&users)
        .bind(&dates)
        .bind(&rmssd)
        .bind(&ln)
        .bind(&at)
        .bind(&seqs)
        .execute(&pool)
        .await
        .unwrap();
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

async fn run_bare(n: u64, batch: usize) -> Figures {
    let (stack, js, pool) = setup(n).await;
    let exe = std::env::current_exe().unwrap();
    let nats_cpu0 = cpu_secs(nats_pid(&stack));
    let child = Command::new(exe)
        .arg("--bare")
        .arg(stack.nats.url())
        .arg(&stack.db.url)
        .arg(batch.to_string())
        .arg(n.to_string())
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
    eprintln!(
        "  breakdown: CPU during the run: bare loop {:.2} s, nats-server {:.2} s, PostgreSQL backend {:.2} s (wall {:.2} s)",
        parts.get(3).copied().unwrap_or(f64::NAN),
        nats_cpu,
        parts.get(4).copied().unwrap_or(f64::NAN),
        took.as_secs_f64()
    );
    pool.close().await;
    drop(stack);
    Figures {
        label: format!("bare loop batch={batch}"),
        events: n,
        secs: took.as_secs_f64(),
        p50_ms: parts.first().copied().unwrap_or(f64::NAN),
        p99_ms: parts.get(1).copied().unwrap_or(f64::NAN),
        rss_mib: parts.get(2).copied().unwrap_or(f64::NAN),
    }
}

/// `k` daemon instances on the same durable drain the preload together (issue #7's scale-out
/// figure): events/s, and how many messages each instance settled.
async fn run_instances(n: u64, batch: usize, depth: Option<usize>, k: usize) -> (Figures, Vec<f64>) {
    let (stack, js, pool) = setup(n).await;
    // Started back to back; each needs the same time to connect and bind, so the skew is a
    // few milliseconds of a run of seconds.
    let daemons: Vec<DaemonProcess> = (0..k).map(|_| start_daemon(&stack, batch, depth)).collect();
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
    };
    (f, shares)
}

/// A steady `rate` events/s for `secs` through the daemon: publish → normalized event received
/// (published by the daemon after the commit), so an upper bound of publish → committed row.
async fn run_steady(batch: usize, rate: u64, secs: u64) -> (f64, f64, f64, u64) {
    let (stack, js, pool) = setup(0).await;
    let daemon = start_daemon(&stack, batch, None);
    // Ready when the durable exists.
    let stream = js.get_stream(STREAM).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream.consumer_info(DURABLE).await.is_err() {
        assert!(Instant::now() < deadline, "daemon did not bind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = stack.nats.client().await;
    let mut sub = client
        .subscribe("athlete-ally.hrv.normalized-stored")
        .await
        .unwrap();
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

fn print(f: &Figures, bare: Option<&Figures>, single: Option<&Figures>) {
    let mut extra = String::new();
    if let Some(b) = bare {
        extra.push_str(&format!("  {:.2}x bare", f.rate() / b.rate()));
    }
    if let Some(s) = single {
        extra.push_str(&format!("  {:.1}x one-at-a-time", f.rate() / s.rate()));
    }
    println!(
        "{:<28} {:>8} ev {:>7.2} s {:>9.0} ev/s  batch p50 {:>7.2} ms  p99 {:>7.2} ms  peak RSS {:>6.1} MiB{extra}",
        f.label,
        f.events,
        f.secs,
        f.rate(),
        f.p50_ms,
        f.p99_ms,
        f.rss_mib
    );
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
    let skip = std::env::var("BENCH_SKIP").unwrap_or_default();
    let rounds: usize = env_or("BENCH_ROUNDS", 3).max(1);
    let depth: Option<usize> = std::env::var("BENCH_PIPELINE_DEPTH")
        .ok()
        .and_then(|d| d.trim().parse().ok());
    let steady_secs: u64 = env_or("BENCH_STEADY_SECS", 10);
    let steady_rate: u64 = env_or("BENCH_STEADY_RATE", 1000);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "normalize-service throughput benchmark: {n} HRV events per run; load average at start: {}",
        load.trim()
    );
    rt.block_on(async {
        // Each round runs the bare loop and the daemon back to back, so every ratio compares two
        // runs made seconds apart; the medians over rounds are the figures to quote.
        let mut results: Vec<(usize, Option<Figures>, Option<Figures>)> = Vec::new();
        for &b in &sizes {
            for round in 1..=rounds {
                let bare = if skip.contains("bare") {
                    None
                } else {
                    eprintln!("bare loop, batch {b} (round {round}/{rounds})");
                    Some(run_bare(n, b).await)
                };
                let daemon = if skip.contains("daemon") {
                    None
                } else {
                    eprintln!("daemon, HRV_BATCH_SIZE={b} (round {round}/{rounds})");
                    Some(run_daemon(n, b, depth).await)
                };
                results.push((b, bare, daemon));
            }
        }
        let single = if skip.contains("single") {
            None
        } else {
            // The previous service's way: one message, written, announced and acked before the
            // next one starts (batch 1, no pipelining).
            eprintln!("daemon, HRV_BATCH_SIZE=1 HRV_PIPELINE_DEPTH=1 ({single_n} events)");
            Some(run_daemon(single_n, 1, Some(1)).await)
        };
        println!();
        for (_, bare, daemon) in &results {
            if let Some(b) = bare {
                print(b, None, None);
            }
            if let Some(d) = daemon {
                print(d, bare.as_ref(), single.as_ref());
            }
        }
        if let Some(s) = &single {
            print(s, None, None);
        }
        if rounds > 1 {
            for &b in &sizes {
                let of = |r: &(usize, Option<Figures>, Option<Figures>)| r.0 == b;
                let bare: Vec<f64> = results.iter().filter(|r| of(r)).filter_map(|r| r.1.as_ref().map(Figures::rate)).collect();
                let daemon: Vec<f64> = results.iter().filter(|r| of(r)).filter_map(|r| r.2.as_ref().map(Figures::rate)).collect();
                let ratios: Vec<f64> = results
                    .iter()
                    .filter(|r| of(r))
                    .filter_map(|r| Some(r.2.as_ref()?.rate() / r.1.as_ref()?.rate()))
                    .collect();
                let mut line = format!("median of {rounds} rounds, batch {b}:");
                if !daemon.is_empty() {
                    line.push_str(&format!(" daemon {:.0} ev/s", median(daemon)));
                }
                if !bare.is_empty() {
                    line.push_str(&format!(", bare loop {:.0} ev/s", median(bare)));
                }
                if !ratios.is_empty() {
                    line.push_str(&format!(", daemon/bare {:.2}x", median(ratios)));
                }
                if let Some(s) = &single {
                    let rates: Vec<f64> = results.iter().filter(|r| of(r)).filter_map(|r| r.2.as_ref().map(Figures::rate)).collect();
                    if !rates.is_empty() {
                        line.push_str(&format!(", {:.1}x one-at-a-time", median(rates) / s.rate()));
                    }
                }
                println!("{line}");
            }
        }
        if !skip.contains("instances") {
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
                    "{:<28} {:>8} ev {:>7.2} s {:>9.0} ev/s  {:.2}x the first count  settled per instance {}  peak RSS {:.1} MiB",
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
        if !skip.contains("steady") {
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
