//! PostgreSQL: the pool, migrations, and one function per statement.
//!
//! The batch path ([`write_batch`]) writes a whole fetched batch atomically with one multi-row
//! `INSERT … SELECT FROM UNNEST(…) ON CONFLICT …` per table; [`write`] writes one
//! message in one transaction (the unroll-and-retry path, when a batch statement fails for a
//! non-transient reason). Either way a message is acked only when all its rows are committed.
//! Upserts never let an older `captured_at` replace a newer row, and a missing optional field
//! never erases a stored value.

pub mod announce;
pub mod merge;

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, ConnectOptions, Connection, PgConnection, PgPool, Postgres};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{Decoded, HrvRecord, OuraWebhook, SleepRecord};
use merge::{Merged, OrderKey};

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
    /// The event's first position (a replay keeps the one it was dead-lettered from): with its
    /// time, its place in the order of docs/CONTRACT.md.
    pub stream: &'a str,
    pub seq: u64,
    /// The publisher's id (`Nats-Msg-Id`, a replay's original id), the event's `eventId`, or
    /// else `<durable>:<stream>:<seq>`: the stem of its normalized events' ids.
    pub identity: &'a str,
    /// Delivered before: a change it made may be committed while its announcement was lost.
    pub redelivered: bool,
}

/// A normalized event to publish once the transaction has committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    pub subject: &'static str,
    /// Its `Nats-Msg-Id`: the identity of the event that made the change, the kind and the
    /// row's version (docs/CONTRACT.md), so a repeated announcement of one change is dropped.
    pub id: String,
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

/// Writes everything one message carries in one transaction (the unroll-and-retry path); the
/// same statements as [`write_batch`], for a batch of one.
pub async fn write(
    pool: &PgPool,
    metrics: &Metrics,
    entry: &BatchEntry<'_>,
) -> Result<Vec<Normalized>, sqlx::Error> {
    let mut out = write_batch(pool, metrics, std::slice::from_ref(entry)).await?;
    Ok(out.pop().map(|o| o.normalized).unwrap_or_default())
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
    /// Normalized events to publish for stored changes this entry made (as the newest event
    /// of its row in the batch).
    pub normalized: Vec<Normalized>,
    /// Newer records of the same keys in the same batch took every field of this entry's
    /// record(s): nothing of it was written.
    pub superseded: bool,
}

/// A record to upsert, with the entry it came from.
struct Cand<'a, R> {
    entry: usize,
    record: &'a R,
}

/// Writes a whole batch atomically (one transaction, or a single statement that commits on its
/// own): the Oura raw rows with one statement, then each table with one multi-row upsert. The
/// records of one key are first merged by the per-field rule ([`merge::merge`]); the upsert
/// applies the same rule against the table, so the rows depend only on the set of events.
/// Returns one outcome per entry, in order.
///
/// Batches of this path never deadlock with each other (tables in a fixed order, rows in key
/// order), but other writers can cross them (an instance of an older version): a deadlock
/// (40P01) is retried at once, up to [`DEADLOCK_ATTEMPTS`] times; PostgreSQL aborted the
/// victim's whole transaction, so nothing of it was committed.
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

/// The merge of one table's candidates.
struct Rows<'c, 'a, R> {
    cands: &'c [Cand<'a, R>],
    merged: Vec<Merged>,
}

fn order_of<'a>(entries: &[BatchEntry<'a>], entry: usize, at: DateTime<Utc>) -> OrderKey<'a> {
    let s = &entries[entry].source;
    OrderKey {
        at,
        stream: s.stream,
        seq: s.seq,
    }
}

/// Merges one table's candidates by the per-field rule; `carries(r)[j]`: `r` carries optional
/// field `j` of the table.
fn merge_rows<'c, 'a, R: Keyed>(
    cands: &'c [Cand<'a, R>],
    entries: &[BatchEntry<'_>],
    carries: impl Fn(&R) -> Vec<bool>,
    optional: usize,
) -> Rows<'c, 'a, R> {
    let keys: Vec<_> = cands.iter().map(|c| c.record.key()).collect();
    let order: Vec<_> = cands
        .iter()
        .map(|c| order_of(entries, c.entry, c.record.captured_at()))
        .collect();
    let carries: Vec<_> = cands.iter().map(|c| carries(c.record)).collect();
    Rows {
        cands,
        merged: merge::merge(&keys, &order, &carries, optional),
    }
}

impl<R> Rows<'_, '_, R> {
    /// Marks `used[entry]` for every entry whose record gives a field to a row.
    fn mark_used(&self, used: &mut [bool]) {
        for m in &self.merged {
            for i in std::iter::once(m.main).chain(m.optional.iter().flatten().copied()) {
                used[self.cands[i].entry] = true;
            }
        }
    }
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
    let mut has_record = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        match e.decoded {
            Decoded::Hrv(r) => hrvs.push(Cand { entry: i, record: r }),
            Decoded::Sleep(r) => sleeps.push(Cand { entry: i, record: r }),
            Decoded::Oura(w) => {
                hooks.push((i, w));
                if let Some(r) = &w.hrv {
                    hrvs.push(Cand { entry: i, record: r });
                }
                if let Some(r) = &w.sleep {
                    sleeps.push(Cand { entry: i, record: r });
                }
            }
        }
    }
    for c in &hrvs {
        has_record[c.entry] = true;
    }
    for c in &sleeps {
        has_record[c.entry] = true;
    }
    let hrv_rows = merge_rows(&hrvs, entries, |r| vec![r.vendor.is_some()], 1);
    let sleep_rows = merge_rows(
        &sleeps,
        entries,
        |r| vec![r.vendor.is_some(), r.quality_score.is_some()],
        2,
    );
    let mut used = vec![false; entries.len()];
    hrv_rows.mark_used(&mut used);
    sleep_rows.mark_used(&mut used);
    for (i, o) in out.iter_mut().enumerate() {
        o.superseded = has_record[i] && !used[i];
    }
    // Concurrent batches take their locks in one global order: tables in a fixed order, rows
    // in key order (merge returns them so), raw webhooks by key.
    hooks.sort_by(|a, b| a.1.idempotency_key.cmp(&b.1.idempotency_key));

    // One statement commits on its own; only several need an explicit transaction (BEGIN and
    // COMMIT are two more round trips, a large share of a small batch's write).
    let statements = usize::from(!hooks.is_empty())
        + usize::from(!hrv_rows.merged.is_empty())
        + usize::from(!sleep_rows.merged.is_empty());
    let mut conn = pool.acquire().await?;
    if statements <= 1 {
        write_tables(
            &mut conn,
            metrics,
            &hooks,
            &hrv_rows,
            &sleep_rows,
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
            &hrv_rows,
            &sleep_rows,
            entries,
            &mut out,
        )
        .await?;
        tx.commit().await?;
    }
    Ok(out)
}

/// The statements of [`write_batch`], on a connection or in a transaction.
async fn write_tables(
    conn: &mut PgConnection,
    metrics: &Metrics,
    hooks: &[(usize, &OuraWebhook)],
    hrv_rows: &Rows<'_, '_, HrvRecord>,
    sleep_rows: &Rows<'_, '_, SleepRecord>,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    if !hooks.is_empty() {
        insert_webhooks(conn, metrics, hooks, entries).await?;
    }
    if !hrv_rows.merged.is_empty() {
        upsert_hrv(conn, metrics, hrv_rows, entries, out).await?;
    }
    if !sleep_rows.merged.is_empty() {
        upsert_sleep(conn, metrics, sleep_rows, entries, out).await?;
    }
    Ok(())
}

static HRV_UPSERT: LazyLock<String> = LazyLock::new(|| merge::HRV.upsert_sql());
static HRV_SELECT: LazyLock<String> = LazyLock::new(|| merge::HRV.select_sql());
static SLEEP_UPSERT: LazyLock<String> = LazyLock::new(|| merge::SLEEP.upsert_sql());
static SLEEP_SELECT: LazyLock<String> = LazyLock::new(|| merge::SLEEP.select_sql());

/// An optional field's value and order key, as bound (NULLs when no event carried it).
type OptionalCols<'a, T> = (
    Vec<Option<T>>,
    Vec<Option<DateTime<Utc>>>,
    Vec<Option<&'a str>>,
    Vec<Option<i64>>,
);

fn push_optional<'a, T>(cols: &mut OptionalCols<'a, T>, v: Option<(T, OrderKey<'a>)>) {
    match v {
        Some((value, k)) => {
            cols.0.push(Some(value));
            cols.1.push(Some(k.at));
            cols.2.push(Some(k.stream));
            cols.3.push(Some(seq_i64(k.seq)));
        }
        None => {
            cols.0.push(None);
            cols.1.push(None);
            cols.2.push(None);
            cols.3.push(None);
        }
    }
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

async fn upsert_hrv(
    conn: &mut PgConnection,
    metrics: &Metrics,
    rows: &Rows<'_, '_, HrvRecord>,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let n = rows.merged.len();
    let mut users = Vec::with_capacity(n);
    let mut dates = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut rmssd = Vec::with_capacity(n);
    let mut ln = Vec::with_capacity(n);
    let mut readiness = Vec::with_capacity(n);
    let mut vendor: OptionalCols<'_, &str> = Default::default();
    for m in &rows.merged {
        let c = &rows.cands[m.main];
        let r = c.record;
        let k = order_of(entries, c.entry, r.captured_at);
        users.push(r.user_id.as_str());
        dates.push(r.date);
        at.push(k.at);
        streams.push(k.stream);
        seqs.push(seq_i64(k.seq));
        rmssd.push(r.rmssd);
        ln.push(r.ln_rmssd);
        readiness.push(r.readiness_score);
        push_optional(
            &mut vendor,
            m.optional[0].and_then(|j| {
                let c = &rows.cands[j];
                c.record
                    .vendor
                    .map(|v| (v.as_str(), order_of(entries, c.entry, c.record.captured_at)))
            }),
        );
    }
    let returned = sqlx::query(&HRV_UPSERT)
        .bind(&users)
        .bind(&dates)
        .bind(&at)
        .bind(&streams)
        .bind(&seqs)
        .bind(&rmssd)
        .bind(&ln)
        .bind(&readiness)
        .bind(&vendor.0)
        .bind(&vendor.1)
        .bind(&vendor.2)
        .bind(&vendor.3)
        .fetch_all(&mut *conn)
        .await?;
    metrics.observe_db_write("hrv_data", started.elapsed());
    announce::<_, announce::HrvRow>(conn, rows, entries, &returned, &HRV_SELECT, out).await
}

async fn upsert_sleep(
    conn: &mut PgConnection,
    metrics: &Metrics,
    rows: &Rows<'_, '_, SleepRecord>,
    entries: &[BatchEntry<'_>],
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let n = rows.merged.len();
    let mut users = Vec::with_capacity(n);
    let mut dates = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut streams = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut defaulted = Vec::with_capacity(n);
    let mut vendor: OptionalCols<'_, &str> = Default::default();
    let mut quality: OptionalCols<'_, i32> = Default::default();
    for m in &rows.merged {
        let c = &rows.cands[m.main];
        let r = c.record;
        let k = order_of(entries, c.entry, r.captured_at);
        users.push(r.user_id.as_str());
        dates.push(r.date);
        at.push(k.at);
        streams.push(k.stream);
        seqs.push(seq_i64(k.seq));
        durations.push(r.duration_minutes);
        defaulted.push(r.captured_at_defaulted);
        push_optional(
            &mut vendor,
            m.optional[0].and_then(|j| {
                let c = &rows.cands[j];
                c.record
                    .vendor
                    .map(|v| (v.as_str(), order_of(entries, c.entry, c.record.captured_at)))
            }),
        );
        push_optional(
            &mut quality,
            m.optional[1].and_then(|j| {
                let c = &rows.cands[j];
                c.record
                    .quality_score
                    .map(|q| (q, order_of(entries, c.entry, c.record.captured_at)))
            }),
        );
    }
    let returned = sqlx::query(&SLEEP_UPSERT)
        .bind(&users)
        .bind(&dates)
        .bind(&at)
        .bind(&streams)
        .bind(&seqs)
        .bind(&durations)
        .bind(&defaulted)
        .bind(&vendor.0)
        .bind(&vendor.1)
        .bind(&vendor.2)
        .bind(&vendor.3)
        .bind(&quality.0)
        .bind(&quality.1)
        .bind(&quality.2)
        .bind(&quality.3)
        .fetch_all(&mut *conn)
        .await?;
    metrics.observe_db_write("sleep_data", started.elapsed());
    announce::<_, announce::SleepRow>(conn, rows, entries, &returned, &SLEEP_SELECT, out).await
}

/// The normalized event of a stored change, given to the entry of the row's newest record:
/// its id is that event's identity, the kind and the row's version.
fn announcement(entry: &BatchEntry<'_>, row: &impl announce::StoredRow) -> Normalized {
    let (subject, kind) = row.subject();
    Normalized {
        subject,
        id: format!("{}:{kind}:v{}", entry.source.identity, row.version()),
        body: row.body(),
    }
}

/// Announces the rows the upsert changed (`returned`). A row this statement did not change
/// may still hold a change that an earlier delivery of one of its records committed while that
/// delivery's announcement was lost (it was NAKed, or dead-lettered and replayed): when a
/// redelivered record is still the source of one of the row's fields, the row is announced
/// again under that record's identity and the row's version — the same id as the lost
/// announcement when nothing changed the row since, so JetStream drops it if that one was stored
/// after all; otherwise an announcement of the row as it now is.
async fn announce<R: Keyed, S: announce::StoredRow>(
    conn: &mut PgConnection,
    rows: &Rows<'_, '_, R>,
    entries: &[BatchEntry<'_>],
    returned: &[sqlx::postgres::PgRow],
    select: &str,
    out: &mut [EntryOutcome],
) -> Result<(), sqlx::Error> {
    let stored = returned.iter().map(S::from_row).collect::<Result<Vec<_>, _>>()?;
    let by_key: HashMap<(&str, NaiveDate), &S> = stored.iter().map(|r| (r.key(), r)).collect();
    let redelivered = |m: &Merged| {
        m.members
            .iter()
            .any(|&i| entries[rows.cands[i].entry].source.redelivered)
    };
    let mut unchanged: Vec<&Merged> = Vec::new();
    let mut missing: Vec<(&str, NaiveDate)> = Vec::new();
    for m in &rows.merged {
        let c = &rows.cands[m.main];
        match by_key.get(&c.record.key()) {
            Some(row) if row.changed() => out[c.entry]
                .normalized
                .push(announcement(&entries[c.entry], *row)),
            Some(_) if redelivered(m) => unchanged.push(m),
            None if redelivered(m) => {
                unchanged.push(m);
                missing.push(c.record.key());
            }
            _ => {}
        }
    }
    if unchanged.is_empty() {
        return Ok(());
    }
    let current = if missing.is_empty() {
        Vec::new()
    } else {
        let (users, dates): (Vec<&str>, Vec<NaiveDate>) = missing.into_iter().unzip();
        let rows = sqlx::query(select)
            .bind(&users)
            .bind(&dates)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(S::from_row).collect::<Result<Vec<_>, _>>()?
    };
    let now: HashMap<(&str, NaiveDate), &S> = current.iter().map(|r| (r.key(), r)).collect();
    for m in unchanged {
        let key = rows.cands[m.main].record.key();
        let Some(row) = by_key.get(&key).or_else(|| now.get(&key)) else {
            continue;
        };
        let source = m.members.iter().map(|&i| &rows.cands[i]).find(|c| {
            let e = &entries[c.entry];
            e.source.redelivered
                && row.holds((c.record.captured_at(), e.source.stream, seq_i64(e.source.seq)))
        });
        if let Some(c) = source {
            out[c.entry]
                .normalized
                .push(announcement(&entries[c.entry], *row));
        }
    }
    Ok(())
}

/// What the announcement helpers need of a record.
trait Keyed {
    fn key(&self) -> (&str, NaiveDate);
    fn captured_at(&self) -> DateTime<Utc>;
}

impl Keyed for HrvRecord {
    fn key(&self) -> (&str, NaiveDate) {
        (self.user_id.as_str(), self.date)
    }
    fn captured_at(&self) -> DateTime<Utc> {
        self.captured_at
    }
}

impl Keyed for SleepRecord {
    fn key(&self) -> (&str, NaiveDate) {
        (self.user_id.as_str(), self.date)
    }
    fn captured_at(&self) -> DateTime<Utc> {
        self.captured_at
    }
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
        seqs.push(seq_i64(src.seq));
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
