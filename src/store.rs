//! PostgreSQL: the pool, migrations, and one function per statement.
//!
//! Every write of one message happens in one transaction, so a message is acked only when all
//! its rows are committed. Upserts never let an older `captured_at` replace a newer row, and a
//! missing optional field never erases a stored value.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, Row, Transaction};

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
    pub body: Value,
}

/// Creates the database if needed, connects, and applies migrations when asked to.
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
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name("normalize-service")
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    let pool = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(config.database_acquire_timeout)
        .connect_with(options)
        .await?;
    if config.run_migrations {
        MIGRATOR.run(&pool).await?;
    }
    Ok(pool)
}

/// A pool that connects lazily, for starting without a reachable database (readiness says so).
pub fn lazy_pool(config: &Config) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = config.database_url.parse::<PgConnectOptions>()?;
    Ok(PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(config.database_acquire_timeout)
        .connect_lazy_with(options))
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

/// SQLSTATEs that mean "not now" rather than "never": serialization failure, deadlock,
/// connection exceptions (class 08), insufficient resources (class 53), operator intervention
/// (57P01..57P05, 57014 query cancelled by a timeout), lock not available.
pub fn is_transient_sqlstate(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "55P03" | "57014")
        || code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for c in [
            "40001", "40P01", "08006", "08001", "53300", "57P01", "57P03", "57014",
        ] {
            assert!(is_transient_sqlstate(c), "{c}");
        }
        for c in ["23505", "22001", "22P02", "42P01", "23514"] {
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
