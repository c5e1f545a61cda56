//! PostgreSQL: the pool, migrations, and one function per statement.
//!
//! The batch path ([`write_batch`]) writes a whole fetched batch atomically with one multi-row
//! `INSERT … SELECT FROM UNNEST(…) ON CONFLICT …` per table; [`write`] writes one
//! message in one transaction (the unroll-and-retry path, when a batch statement fails for a
//! non-transient reason). Either way a message is acked only when all its rows are committed.
//! Upserts never let an older `captured_at` replace a newer row, and a missing optional field
//! never erases a stored value.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, ConnectOptions, Connection, PgConnection, PgPool, Postgres, Row, Transaction};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{hrv, sleep, Decoded, HrvRecord, OuraWebhook, SleepRecord};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const HRV_NORMALIZED_SUBJECT: &str = "athlete-ally.hrv.normalized-stored";
pub const SLEEP_NORMALIZED_SUBJECT: &str = "athlete-ally.sleep.normalized-stored";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Where a message came from; stored with each row for tracing back to the stream.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub stream: &'a str,
    pub seq: u64,
}

/// A normalized event to publish once the transaction has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    pub subject: &'static str,
    /// Distinguishes several events derived from one message (the Oura webhook) in `Nats-Msg-Id`.
    pub id_suffix: Option<&'static str>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// Creates the database if needed, applies migrations when asked to, and connects the pool.
///
/// Migrations run on a connection of their own, without `DATABASE_STATEMENT_TIMEOUT_MS`: a
/// migration may legitimately take longer than any statement of the message path (an index
/// build, a table rewrite), and the bound would make it fail on every start, forever. The
/// server's own `statement_timeout`/`lock_timeout` (none by default, or what the role or
/// database sets) apply to them. A second instance waits on the migrator's advisory lock
/// meanwhile, also unbounded.
pub async fn connect(config: &Config) -> Result<PgPool, StoreError> {
    let url = &config.database_url;
    if !Postgres::database_exists(url).await? {
        // Two instances starting together may race here; losing the race is fine.
        if let Err(e) = Postgres::create_database(url).await {
            if !Postgres::database_exists(url).await.unwrap_or(false) {
                return Err(e.into());
            }
        }
    }
    if config.run_migrations {
        let mut conn = migration_options(config)?.connect().await?;
        let migrated = MIGRATOR.run_direct(&mut conn).await;
        // Closing politely is best effort; the migration's result is what matters.
        let _ = conn.close().await;
        migrated?;
    }
    let pool = pool_options(config).connect_with(pooled_options(config)?).await?;
    Ok(pool)
}

/// A pool that connects lazily, for starting without a reachable database (readiness says so).
pub fn lazy_pool(config: &Config) -> Result<PgPool, StoreError> {
    Ok(pool_options(config).connect_lazy_with(pooled_options(config)?))
}

/// The options of the daemon's pooled connections: [`connect_options`] with every statement
/// bounded by `DATABASE_STATEMENT_TIMEOUT_MS`, as `statement_timeout` (the whole statement,
/// lock waits included) and `lock_timeout` (named separately so a lock wait reports 55P03).
/// Both fail the statement with a transient SQLSTATE ([`is_transient_sqlstate`]), so its
/// messages are NAKed with backoff instead of held by progress acks behind a stuck statement.
/// Sent as startup parameters (`options=-c …`), after any `options` of `DATABASE_URL`, so the
/// variable wins.
pub fn pooled_options(config: &Config) -> Result<PgConnectOptions, StoreError> {
    let limit = format!("{}ms", config.database_statement_timeout.as_millis());
    Ok(connect_options(config)?.options([
        ("statement_timeout", limit.as_str()),
        ("lock_timeout", limit.as_str()),
    ]))
}

/// The options of the migration connection: [`connect_options`] without the statement bound
/// (see [`connect`]).
pub fn migration_options(config: &Config) -> Result<PgConnectOptions, StoreError> {
    connect_options(config)
}

/// Connections name themselves `normalize-service` in `pg_stat_activity.application_name`,
/// unless `DATABASE_URL` names them (`?application_name=…`).
fn connect_options(config: &Config) -> Result<PgConnectOptions, StoreError> {
    let options = config.database_url.parse::<PgConnectOptions>()?;
    let options = if options.get_application_name().is_none() {
        options.application_name("normalize-service")
    } else {
        options
    };
    Ok(options
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2)))
}

fn pool_options(config: &Config) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(config.database_acquire_timeout)
}

/// `SELECT 1` within the given time: the readiness probe of the database.
pub async fn ping(pool: &PgPool, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, sqlx::query("SELECT 1").execute(pool)).await,
        Ok(Ok(_))
    )
}

/// Writes everything one message carries in one transaction; returns the events to publish.
pub async fn write(
    pool: &PgPool,
    metrics: &Metrics,
    decoded: &Decoded,
    source: &Source<'_>,
) -> Result<Vec<Normalized>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::new();
    match decoded {
        Decoded::Hrv(r) => {
            if let Some(n) = upsert_hrv(&mut tx, metrics, r, source).await? {
                out.push(n);
            }
        }
        Decoded::Sleep(r) => {
            if let Some(n) = upsert_sleep(&mut tx, metrics, r, source).await? {
                out.push(n);
            }
        }
        Decoded::Oura(w) => {
            insert_webhook(&mut tx, metrics, w, source).await?;
            if let Some(r) = &w.hrv {
                if let Some(mut n) = upsert_hrv(&mut tx, metrics, r, source).await? {
                    n.id_suffix = Some("hrv");
                    out.push(n);
                }
            }
            if let Some(r) = &w.sleep {
                if let Some(mut n) = upsert_sleep(&mut tx, metrics, r, source).await? {
                    n.id_suffix = Some("sleep");
                    out.push(n);
                }
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// One message of a batch, decoded.
#[derive(Debug, Clone)]
pub struct BatchEntry<'a> {
    pub decoded: &'a Decoded,
    pub source: Source<'a>,
}

/// What the batch write did for one entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryOutcome {
    /// Normalized events to publish for rows this entry wrote.
    pub normalized: Vec<Normalized>,
    /// A newer record with the same key in the same batch replaced this entry's record(s).
    pub superseded: bool,
}

/// Marks, for each candidate, whether it wins its key: the newest `captured_at`, then the
/// highest stream sequence (the order a one-at-a-time writer would have left in the table).
/// Pure, so the rule is unit-tested.
pub fn winners<K: Eq + Hash>(candidates: &[(K, DateTime<Utc>, u64)]) -> Vec<bool> {
    let mut best: HashMap<&K, usize> = HashMap::with_capacity(candidates.len());
    for (i, (key, at, seq)) in candidates.iter().enumerate() {
        match best.get(key) {
            Some(&j) if (candidates[j].1, candidates[j].2) >= (*at, *seq) => {}
            _ => {
                best.insert(key, i);
            }
        }
    }
    let mut out = vec![false; candidates.len()];
    for i in best.into_values() {
        out[i] = true;
    }
    out
}

/// A record to upsert, with the entry it came from.
struct Cand<'a, R> {
    entry: usize,
    record: &'a R,
    id_suffix: Option<&'static str>,
}

/// Writes a whole batch atomically (one transaction, or a single statement that commits on its
/// own): the Oura raw rows with one statement, then each table with one multi-row upsert per
/// run of records that do or do not name a vendor (see [`vendor_runs`]). Records with the same
/// key are collapsed first (see [`winners`]); the losers are reported `superseded` and get no
/// normalized event, since nothing of theirs was stored. Returns one outcome per entry, in
/// order.
///
/// Batches of this path never deadlock with each other (locks in one global order), but other
/// writers can cross them (the one-message-per-transaction unroll path, an instance of an
/// older version): a deadlock (40P01) is retried at once, up to [`DEADLOCK_ATTEMPTS`] times;
/// PostgreSQL aborted the victim's whole transaction, so nothing of it was committed.
pub async fn write_batch(
    pool: &PgPool,
    metrics: &Metrics,
    entries: &[BatchEntry<'_>],
) -> Result<Vec<EntryOutcome>, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match write_batch_once(pool, metrics, entries).await {
            Err(e) if attempt < DEADLOCK_ATTEMPTS && is_deadlock(&e) => {
                tracing::warn!(
                    attempt,
                    size = entries.len(),
                    "batch write chosen as a deadlock victim; retrying it"
                );
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// How many times a batch write is tried when PostgreSQL reports a deadlock.
pub const DEADLOCK_ATTEMPTS: u32 = 5;

fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01"))
}

async fn write_batch_once(
    pool: &PgPool,
    metrics: &Metrics,
    entries: &[BatchEntry<'_>],
) -> Result<Vec<EntryOutcome>, sqlx::Error> {
    let mut out = vec![EntryOutcome::default(); entries.len()];
    let mut hooks: Vec<(usize, &OuraWebhook)> = Vec::new();
    let mut hrvs: Vec<Cand<'_, HrvRecord>> = Vec::new();
    let mut sleeps: Vec<Cand<'_, SleepRecord>> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.decoded {
            Decoded::Hrv(r) => hrvs.push(Cand {
                entry: i,
                record: r,
                id_suffix: None,
            }),
            Decoded::Sleep(r) => sleeps.push(Cand {
                entry: i,
                record: r,
                id_suffix: None,
            }),
            Decoded::Oura(w) => {
                hooks.push((i, w));
                if let Some(r) = &w.hrv {
                    hrvs.push(Cand {
                        entry: i,
                        record: r,
                        id_suffix: Some("hrv"),
                    });
                }
                if let Some(r) = &w.sleep {
                    sleeps.push(Cand {
                        entry: i,
                        record: r,
                        id_suffix: Some("sleep"),
                    });
                }
            }
        }
    }
    let mut hrvs = collapse(hrvs, entries, &mut out, |r| {
        ((r.user_id.as_str(), r.date), r.captured_at)
    });
    let mut sleeps = collapse(sleeps, entries, &mut out, |r| {
        ((r.user_id.as_str(), r.date), r.captured_at)
    });
    // Batches in flight at once write concurrently (see consumer::batch::InFlight): rows in key
    // order make every transaction take its row locks in the same order, so two batches that
    // share keys wait for each other instead of deadlocking.
    hooks.sort_by(|a, b| a.1.idempotency_key.cmp(&b.1.idempotency_key));
    hrvs.sort_by(|a, b| (&a.record.user_id, a.record.date).cmp(&(&b.record.user_id, b.record.date)));
    sleeps.sort_by(|a, b| (&a.record.user_id, a.record.date).cmp(&(&b.record.user_id, b.record.date)));

    let hrv_runs = vendor_runs(&hrvs, |r| r.vendor.is_some());
    let sleep_runs = vendor_runs(&sleeps, |r| r.vendor.is_some());

    // One statement commits on its own; only several need an explicit transaction (BEGIN and
    // COMMIT are two more round trips, a large share of a small batch's write).
    let statements = usize::from(!hooks.is_empty()) + hrv_runs.len() + sleep_runs.len();
    let mut conn = pool.acquire().await?;
    if statements <= 1 {
        write_tables(
            &mut conn,
            metrics,
            &hooks,
            &hrv_runs,
            &sleep_runs,
            entries,
            &mut out,
        )
        .await?;
    } else {
        let mut tx = conn.begin().await?;
        write_tables(
            &mut tx,
            metrics,
            &hooks,
            &hrv_runs,
            &sleep_runs,
            entries,
            &mut out,
        )
        .await?;
        tx.commit().await?;
    }
    Ok(out)
}

/// Consecutive key-ordered records that all name a vendor (`true`) or all do not.
type Runs<'c, 'a, R> = Vec<(&'c [Cand<'a, R>], bool)>;

/// The statements of [`write_batch`], on a connection or in a transaction.
async fn write_tables(
    conn: &mut PgConnection,
    metrics: &Metrics,
    hooks: &[(usize, &OuraWebhook)],
    hrv_runs: &Runs<'_, '_, HrvRecord>,
    sleep_runs: &Runs<'_, '_, SleepRecord>,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    // Tables in a fixed order, and each table's rows in key order across its statements: every
    // transaction takes its locks in one global order, so concurrent batches never deadlock.
    if !hooks.is_empty() {
        insert_webhooks(conn, metrics, hooks, entries).await?;
    }
    for &(run, vendor_given) in hrv_runs {
        upsert_hrv_batch(conn, metrics, run, vendor_given, entries, out).await?;
    }
    for &(run, vendor_given) in sleep_runs {
        upsert_sleep_batch(conn, metrics, run, vendor_given, entries, out).await?;
    }
    Ok(())
}

/// Splits key-ordered candidates into consecutive runs that all name a vendor or all do not
/// (the two cases need different upserts), keeping the key order: one statement per run.
/// Typical batches are one run; a batch that alternates is many small statements, still in key
/// order.
fn vendor_runs<'c, 'a, R>(cands: &'c [Cand<'a, R>], vendor_given: impl Fn(&R) -> bool) -> Runs<'c, 'a, R> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=cands.len() {
        let flag = |j: usize| vendor_given(cands[j].record);
        if i == cands.len() || flag(i) != flag(start) {
            runs.push((&cands[start..i], flag(start)));
            start = i;
        }
    }
    runs
}

/// Keeps the winner of each key and marks the losers' entries superseded.
fn collapse<'a, R>(
    cands: Vec<Cand<'a, R>>,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
    key: impl Fn(&'a R) -> ((&'a str, NaiveDate), DateTime<Utc>),
) -> Vec<Cand<'a, R>> {
    let keyed: Vec<_> = cands
        .iter()
        .map(|c| {
            let (k, at) = key(c.record);
            (k, at, entries[c.entry].source.seq)
        })
        .collect();
    let win = winners(&keyed);
    cands
        .into_iter()
        .zip(win)
        .filter_map(|(c, w)| {
            if !w {
                out[c.entry].superseded = true;
            }
            w.then_some(c)
        })
        .collect()
}

const HRV_BATCH_VENDOR: &str = "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq)
     SELECT * FROM UNNEST($1::text[], $2::date[], $3::float8[], $4::float8[], $5::text[], $6::timestamptz[], $7::text[], $8::int8[])
     ON CONFLICT (user_id, date) DO UPDATE SET
         rmssd = EXCLUDED.rmssd,
         ln_rmssd = EXCLUDED.ln_rmssd,
         vendor = EXCLUDED.vendor,
         captured_at = EXCLUDED.captured_at,
         source_stream = EXCLUDED.source_stream,
         source_seq = EXCLUDED.source_seq,
         updated_at = now()
     WHERE hrv_data.captured_at <= EXCLUDED.captured_at
     RETURNING user_id, date, vendor";

/// Records that name no vendor insert `unknown` but keep a stored vendor on update.
const HRV_BATCH_NO_VENDOR: &str = "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq)
     SELECT * FROM UNNEST($1::text[], $2::date[], $3::float8[], $4::float8[], $5::text[], $6::timestamptz[], $7::text[], $8::int8[])
     ON CONFLICT (user_id, date) DO UPDATE SET
         rmssd = EXCLUDED.rmssd,
         ln_rmssd = EXCLUDED.ln_rmssd,
         captured_at = EXCLUDED.captured_at,
         source_stream = EXCLUDED.source_stream,
         source_seq = EXCLUDED.source_seq,
         updated_at = now()
     WHERE hrv_data.captured_at <= EXCLUDED.captured_at
     RETURNING user_id, date, vendor";

async fn upsert_hrv_batch(
    conn: &mut PgConnection,
    metrics: &Metrics,
    part: &[Cand<'_, HrvRecord>],
    vendor_given: bool,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let n = part.len();
    let (mut users, mut dates, mut rmssd, mut ln, mut vendors, mut at, mut streams, mut seqs) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for c in part {
        let r = c.record;
        let src = &entries[c.entry].source;
        users.push(r.user_id.as_str());
        dates.push(r.date);
        rmssd.push(r.rmssd);
        ln.push(r.ln_rmssd);
        vendors.push(r.vendor.map_or("unknown", |v| v.as_str()));
        at.push(r.captured_at);
        streams.push(src.stream);
        seqs.push(seq(src));
    }
    let sql = if vendor_given {
        HRV_BATCH_VENDOR
    } else {
        HRV_BATCH_NO_VENDOR
    };
    let rows = sqlx::query(sql)
        .bind(&users)
        .bind(&dates)
        .bind(&rmssd)
        .bind(&ln)
        .bind(&vendors)
        .bind(&at)
        .bind(&streams)
        .bind(&seqs)
        .fetch_all(&mut *conn)
        .await?;
    metrics.observe_db_write("hrv_data", started.elapsed());
    // Keys are unique after collapsing, so a returned row names exactly one candidate.
    let mut written: HashMap<(String, NaiveDate), String> = HashMap::with_capacity(rows.len());
    for row in rows {
        written.insert(
            (row.try_get("user_id")?, row.try_get("date")?),
            row.try_get("vendor")?,
        );
    }
    for c in part {
        let r = c.record;
        if let Some(vendor) = written.get(&(r.user_id.clone(), r.date)) {
            out[c.entry].normalized.push(Normalized {
                subject: HRV_NORMALIZED_SUBJECT,
                id_suffix: c.id_suffix,
                body: hrv::normalized(r, vendor),
            });
        }
    }
    Ok(())
}

const SLEEP_BATCH_VENDOR: &str = "INSERT INTO sleep_data (user_id, date, duration_minutes, quality_score, vendor, captured_at,
                             captured_at_defaulted, source_stream, source_seq)
     SELECT * FROM UNNEST($1::text[], $2::date[], $3::int4[], $4::int4[], $5::text[], $6::timestamptz[], $7::bool[], $8::text[], $9::int8[])
     ON CONFLICT (user_id, date) DO UPDATE SET
         duration_minutes = EXCLUDED.duration_minutes,
         quality_score = COALESCE(EXCLUDED.quality_score, sleep_data.quality_score),
         vendor = EXCLUDED.vendor,
         captured_at = EXCLUDED.captured_at,
         captured_at_defaulted = EXCLUDED.captured_at_defaulted,
         source_stream = EXCLUDED.source_stream,
         source_seq = EXCLUDED.source_seq,
         updated_at = now()
     WHERE sleep_data.captured_at <= EXCLUDED.captured_at
     RETURNING user_id, date, vendor, quality_score";

const SLEEP_BATCH_NO_VENDOR: &str = "INSERT INTO sleep_data (user_id, date, duration_minutes, quality_score, vendor, captured_at,
                             captured_at_defaulted, source_stream, source_seq)
     SELECT * FROM UNNEST($1::text[], $2::date[], $3::int4[], $4::int4[], $5::text[], $6::timestamptz[], $7::bool[], $8::text[], $9::int8[])
     ON CONFLICT (user_id, date) DO UPDATE SET
         duration_minutes = EXCLUDED.duration_minutes,
         quality_score = COALESCE(EXCLUDED.quality_score, sleep_data.quality_score),
         captured_at = EXCLUDED.captured_at,
         captured_at_defaulted = EXCLUDED.captured_at_defaulted,
         source_stream = EXCLUDED.source_stream,
         source_seq = EXCLUDED.source_seq,
         updated_at = now()
     WHERE sleep_data.captured_at <= EXCLUDED.captured_at
     RETURNING user_id, date, vendor, quality_score";

async fn upsert_sleep_batch(
    conn: &mut PgConnection,
    metrics: &Metrics,
    part: &[Cand<'_, SleepRecord>],
    vendor_given: bool,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let n = part.len();
    let mut users = Vec::with_capacity(n);
    let mut dates = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut quality: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut vendors = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut defaulted = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    for c in part {
        let r = c.record;
        let src = &entries[c.entry].source;
        users.push(r.user_id.as_str());
        dates.push(r.date);
        durations.push(r.duration_minutes);
        quality.push(r.quality_score);
        vendors.push(r.vendor.map_or("unknown", |v| v.as_str()));
        at.push(r.captured_at);
        defaulted.push(r.captured_at_defaulted);
        streams.push(src.stream);
        seqs.push(seq(src));
    }
    let sql = if vendor_given {
        SLEEP_BATCH_VENDOR
    } else {
        SLEEP_BATCH_NO_VENDOR
    };
    let rows = sqlx::query(sql)
        .bind(&users)
        .bind(&dates)
        .bind(&durations)
        .bind(&quality)
        .bind(&vendors)
        .bind(&at)
        .bind(&defaulted)
        .bind(&streams)
        .bind(&seqs)
        .fetch_all(&mut *conn)
        .await?;
    metrics.observe_db_write("sleep_data", started.elapsed());
    let mut written: HashMap<(String, NaiveDate), (String, Option<i32>)> = HashMap::with_capacity(rows.len());
    for row in rows {
        written.insert(
            (row.try_get("user_id")?, row.try_get("date")?),
            (row.try_get("vendor")?, row.try_get("quality_score")?),
        );
    }
    for c in part {
        let r = c.record;
        if let Some((vendor, q)) = written.get(&(r.user_id.clone(), r.date)) {
            out[c.entry].normalized.push(Normalized {
                subject: SLEEP_NORMALIZED_SUBJECT,
                id_suffix: c.id_suffix,
                body: sleep::normalized(r, vendor, *q),
            });
        }
    }
    Ok(())
}

/// Stores the raw webhooks, each once per idempotency key (a repeat, even within the same
/// statement, is a no-op).
async fn insert_webhooks(
    conn: &mut PgConnection,
    metrics: &Metrics,
    hooks: &[(usize, &OuraWebhook)],
    entries: &[BatchEntry<'_>],
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let mut keys = Vec::with_capacity(hooks.len());
    let mut users = Vec::with_capacity(hooks.len());
    let mut payloads = Vec::with_capacity(hooks.len());
    let mut streams = Vec::with_capacity(hooks.len());
    let mut seqs = Vec::with_capacity(hooks.len());
    for (i, w) in hooks {
        let src = &entries[*i].source;
        keys.push(w.idempotency_key.as_str());
        users.push(w.user_id.as_str());
        payloads.push(w.payload.to_string());
        streams.push(src.stream);
        seqs.push(seq(src));
    }
    sqlx::query(
        "INSERT INTO vendor_webhook_events (vendor, idempotency_key, user_id, payload, source_stream, source_seq)
         SELECT 'oura', k, u, p::jsonb, s, q
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS t(k, u, p, s, q)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&keys)
    .bind(&users)
    .bind(&payloads)
    .bind(&streams)
    .bind(&seqs)
    .execute(&mut *conn)
    .await?;
    metrics.observe_db_write("vendor_webhook_events", started.elapsed());
    Ok(())
}

fn seq(source: &Source<'_>) -> i64 {
    i64::try_from(source.seq).unwrap_or(i64::MAX)
}

/// Upserts one HRV row; `None` when a newer row already exists (nothing written).
async fn upsert_hrv(
    tx: &mut Transaction<'_, Postgres>,
    metrics: &Metrics,
    r: &HrvRecord,
    source: &Source<'_>,
) -> Result<Option<Normalized>, sqlx::Error> {
    let started = Instant::now();
    let row = sqlx::query(
        "INSERT INTO hrv_data (user_id, date, rmssd, ln_rmssd, vendor, captured_at, source_stream, source_seq)
         VALUES ($1, $2, $3, $4, COALESCE($5, 'unknown'), $6, $7, $8)
         ON CONFLICT (user_id, date) DO UPDATE SET
             rmssd = EXCLUDED.rmssd,
             ln_rmssd = EXCLUDED.ln_rmssd,
             vendor = COALESCE($5, hrv_data.vendor),
             captured_at = EXCLUDED.captured_at,
             source_stream = EXCLUDED.source_stream,
             source_seq = EXCLUDED.source_seq,
             updated_at = now()
         WHERE hrv_data.captured_at <= EXCLUDED.captured_at
         RETURNING vendor",
    )
    .bind(&r.user_id)
    .bind(r.date)
    .bind(r.rmssd)
    .bind(r.ln_rmssd)
    .bind(r.vendor.map(|v| v.as_str()))
    .bind(r.captured_at)
    .bind(source.stream)
    .bind(seq(source))
    .fetch_optional(&mut **tx)
    .await?;
    metrics.observe_db_write("hrv_data", started.elapsed());
    Ok(match row {
        Some(row) => {
            let vendor: String = row.try_get("vendor")?;
            Some(Normalized {
                subject: HRV_NORMALIZED_SUBJECT,
                id_suffix: None,
                body: hrv::normalized(r, &vendor),
            })
        }
        None => None,
    })
}

/// Upserts one sleep row; `None` when a newer row already exists (nothing written).
async fn upsert_sleep(
    tx: &mut Transaction<'_, Postgres>,
    metrics: &Metrics,
    r: &SleepRecord,
    source: &Source<'_>,
) -> Result<Option<Normalized>, sqlx::Error> {
    let started = Instant::now();
    let row = sqlx::query(
        "INSERT INTO sleep_data (user_id, date, duration_minutes, quality_score, vendor, captured_at,
                                 captured_at_defaulted, source_stream, source_seq)
         VALUES ($1, $2, $3, $4, COALESCE($5, 'unknown'), $6, $7, $8, $9)
         ON CONFLICT (user_id, date) DO UPDATE SET
             duration_minutes = EXCLUDED.duration_minutes,
             quality_score = COALESCE(EXCLUDED.quality_score, sleep_data.quality_score),
             vendor = COALESCE($5, sleep_data.vendor),
             captured_at = EXCLUDED.captured_at,
             captured_at_defaulted = EXCLUDED.captured_at_defaulted,
             source_stream = EXCLUDED.source_stream,
             source_seq = EXCLUDED.source_seq,
             updated_at = now()
         WHERE sleep_data.captured_at <= EXCLUDED.captured_at
         RETURNING vendor, quality_score",
    )
    .bind(&r.user_id)
    .bind(r.date)
    .bind(r.duration_minutes)
    .bind(r.quality_score)
    .bind(r.vendor.map(|v| v.as_str()))
    .bind(r.captured_at)
    .bind(r.captured_at_defaulted)
    .bind(source.stream)
    .bind(seq(source))
    .fetch_optional(&mut **tx)
    .await?;
    metrics.observe_db_write("sleep_data", started.elapsed());
    Ok(match row {
        Some(row) => {
            let vendor: String = row.try_get("vendor")?;
            let quality: Option<i32> = row.try_get("quality_score")?;
            Some(Normalized {
                subject: SLEEP_NORMALIZED_SUBJECT,
                id_suffix: None,
                body: sleep::normalized(r, &vendor, quality),
            })
        }
        None => None,
    })
}

/// Stores the raw webhook once per idempotency key; a repeat is a no-op.
async fn insert_webhook(
    tx: &mut Transaction<'_, Postgres>,
    metrics: &Metrics,
    w: &OuraWebhook,
    source: &Source<'_>,
) -> Result<bool, sqlx::Error> {
    let started = Instant::now();
    let done = sqlx::query(
        "INSERT INTO vendor_webhook_events (vendor, idempotency_key, user_id, payload, source_stream, source_seq)
         VALUES ('oura', $1, $2, $3, $4, $5)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&w.idempotency_key)
    .bind(&w.user_id)
    .bind(sqlx::types::Json(&w.payload))
    .bind(source.stream)
    .bind(seq(source))
    .execute(&mut **tx)
    .await?;
    metrics.observe_db_write("vendor_webhook_events", started.elapsed());
    Ok(done.rows_affected() == 1)
}

/// Whether a database error is worth retrying: the connection or pool failed, or the server
/// asked us to try again. Decided by error kind and SQLSTATE, never by message text.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_sqlstate(&c)),
        _ => false,
    }
}

/// SQLSTATEs that mean "not now" rather than "never" — an outage of the database, not a fault
/// of the message. Retried (NAK with backoff, then a replayable `max-deliver` dead letter):
/// - 40001 serialization failure, 40P01 deadlock;
/// - class 08, connection exceptions; class 53, insufficient resources;
/// - 57P01..57P05 operator intervention (shutdown, crash recovery, …);
/// - 57014 query cancelled — our `statement_timeout` (or an operator's `pg_cancel_backend`) —
///   and 55P03 lock not available (`lock_timeout`): a statement stuck behind a lock or on an
///   overloaded server;
/// - class 42, syntax error or access rule violation: 42P01 undefined table, 42703 undefined
///   column, 42P10 no unique constraint for `ON CONFLICT`, 42804 datatype mismatch, 42501
///   insufficient privilege, … Every statement of this service is a constant text and every
///   message value is a bound parameter, so a class-42 error never depends on the message
///   (bad values fail in class 22 or 23): it is the database's schema or grants not matching
///   the service (a table dropped or altered under it, a pre-existing table missing a column,
///   a revoked grant), the same for every message. Dead-lettering would empty the stream into
///   the DLQ during such an outage; retrying lets fixing the schema recover everything. The
///   whole class is retried, including 42601 syntax error: that would be a bug in our SQL,
///   which no message can fix either — its messages end as `max-deliver` dead letters after
///   the backoff sequence instead of `non-retryable` ones at once, and are replayed the same
///   way once a fixed version runs.
pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "55P03" | "57014")
        || code.starts_with("08")
        || code.starts_with("42")
        || code.starts_with("53")
        || code.starts_with("57P")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for c in [
            "40001", "40P01", "08006", "08001", "53300", "57P01", "57P03", "57014", "55P03",
        ] {
            assert!(is_transient_sqlstate(c), "{c}");
        }
        // Data and constraint errors depend on the message: dead-lettered at once.
        for c in [
            "23505", "22001", "22P02", "22003", "23514", "23502", "0A000", "XX000",
        ] {
            assert!(!is_transient_sqlstate(c), "{c}");
        }
    }

    #[test]
    fn pooled_connections_are_bounded_and_migrations_are_not() {
        let c =
            Config::from_vars([("DATABASE_STATEMENT_TIMEOUT_MS".to_string(), "1234".to_string())]).unwrap();
        assert_eq!(
            pooled_options(&c).unwrap().get_options(),
            Some("-c statement_timeout=1234ms -c lock_timeout=1234ms")
        );
        assert_eq!(migration_options(&c).unwrap().get_options(), None);
    }

    #[test]
    fn schema_mismatch_of_the_database_is_transient() {
        // undefined table / column / function / object, no constraint for ON CONFLICT,
        // datatype mismatch, insufficient privilege, and a syntax error (class 42 as a whole).
        for c in [
            "42P01", "42703", "42883", "42704", "42P10", "42804", "42501", "42601",
        ] {
            assert!(is_transient_sqlstate(c), "{c}");
        }
        // Neighbouring classes stay permanent.
        for c in ["44000", "25P02", "2BP01"] {
            assert!(!is_transient_sqlstate(c), "{c}");
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn vendor_runs_keep_key_order() {
        let recs = [true, true, false, true, false, false];
        let cands: Vec<Cand<'_, bool>> = recs
            .iter()
            .enumerate()
            .map(|(i, r)| Cand {
                entry: i,
                record: r,
                id_suffix: None,
            })
            .collect();
        let runs: Vec<(Vec<usize>, bool)> = vendor_runs(&cands, |r| *r)
            .into_iter()
            .map(|(run, v)| (run.iter().map(|c| c.entry).collect(), v))
            .collect();
        assert_eq!(
            runs,
            vec![
                (vec![0, 1], true),
                (vec![2], false),
                (vec![3], true),
                (vec![4, 5], false)
            ]
        );
        assert!(vendor_runs(&cands[..0], |r| *r).is_empty());
    }

    #[test]
    fn newest_captured_at_then_highest_seq_wins() {
        let c = [
            ("a", t("2025-03-01T06:00:00Z"), 1),
            ("a", t("2025-03-01T08:00:00Z"), 2),
            ("b", t("2025-03-01T05:00:00Z"), 3),
            ("a", t("2025-03-01T07:00:00Z"), 4),
            ("c", t("2025-03-01T05:00:00Z"), 9),
            ("c", t("2025-03-01T05:00:00Z"), 5),
            ("c", t("2025-03-01T05:00:00Z"), 7),
        ];
        assert_eq!(winners(&c), vec![false, true, true, false, true, false, false]);
        assert!(winners::<&str>(&[]).is_empty());
    }

    #[test]
    fn error_kinds_are_classified() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
