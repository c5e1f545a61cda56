//! PostgreSQL: the pool, migrations, and the writes of decoded events.
//!
//! The batch path ([`upsert_batch`]) writes a whole fetched batch atomically with one multi-row
//! `INSERT … SELECT FROM UNNEST(…) ON CONFLICT …` per table; [`upsert`] writes one message in one
//! transaction (the unroll-and-retry path, when a batch statement fails for a non-transient
//! reason). Either way a message is acked only when all its rows are committed. Upserts never let
//! an older `captured_at` replace a newer row, and a missing optional field never erases a stored
//! value. The writes return the stored rows; `pipeline` renders their normalized events.
//!
//! - `batch`: the batch write, the same for every table
//! - `merge`: the per-field rule, in Rust and as SQL generated from a table's description
//! - `unnest`: a table's upsert parameters, one array per column
//! - `tables`: each table's description and statements

mod batch;
pub mod merge;
mod tables;
mod unnest;

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{Decoded, StoredRow};

pub use batch::{upsert_batch, DEADLOCK_ATTEMPTS};
pub use tables::probe_rows;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
        if let Err(e) = conn.close().await {
            tracing::debug!(error = %e, "closing the migration connection failed");
        }
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
    round_trip(pool, within).await.is_ok()
}

/// A database round trip within `within`; the error says why not. When every pooled connection
/// is busy (batches waiting on a lock or a slow server), it goes over a connection of its own: a
/// busy pool is not a database that is down, and waiting for a pooled connection would report it
/// so (and hold readiness at 503 while PostgreSQL answers).
pub async fn round_trip(pool: &PgPool, within: Duration) -> Result<(), String> {
    use sqlx::Connection as _;
    let exhausted = pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections();
    let round_trip = async {
        if exhausted {
            let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
            sqlx::query("SELECT 1").execute(&mut conn).await?;
            conn.close().await
        } else {
            sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
        }
    };
    match tokio::time::timeout(within, round_trip).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", within.as_millis())),
    }
}

/// One message of a batch, decoded.
#[derive(Debug, Clone)]
pub struct BatchEntry<'a> {
    pub decoded: &'a Decoded,
    pub source: Source<'a>,
}

/// What the batch write did for one entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    /// Rows to announce on behalf of this entry: stored changes it made (as the newest event of
    /// its row in the batch), and rows whose earlier announcement for it may have been lost.
    /// [`StoredRow::announcement`] with the entry's identity renders each.
    pub stored: Vec<StoredRow>,
    /// Newer records of the same keys in the same batch took every field of this entry's
    /// record(s): nothing of it was written.
    pub superseded: bool,
}

/// Writes everything one message carries in one transaction (the unroll-and-retry path); the
/// same statements as [`upsert_batch`], for a batch of one.
pub async fn upsert(
    pool: &PgPool,
    metrics: &Metrics,
    entry: &BatchEntry<'_>,
) -> Result<Vec<StoredRow>, sqlx::Error> {
    let mut out = upsert_batch(pool, metrics, std::slice::from_ref(entry)).await?;
    Ok(out.pop().map(|w| w.stored).unwrap_or_default())
}

/// Whether a database error is worth retrying: the connection or pool failed, or the server
/// asked us to try again. Decided by error kind and SQLSTATE, never by message text.
pub fn is_transient(e: &sqlx::Error) -> bool {
    #[allow(
        clippy::wildcard_enum_match_arm,
        reason = "sqlx::Error is non-exhaustive: whatever is not listed as transient is permanent"
    )]
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
/// - the outages of [`is_outage_sqlstate`];
/// - 57P05 idle session timeout;
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
        || code.starts_with("42")
        || code.starts_with("57P")
        || is_outage_sqlstate(code)
}

/// SQLSTATEs that say the database as a whole is down or refuses this service, whatever the
/// message: class 08 connection exceptions; class 53 insufficient resources (out of connection
/// slots, disk full, out of memory); 57P01..57P04 the server shutting down, crashed, starting
/// up, or the database dropped; class 28 credentials refused (a changed password or
/// `pg_hba.conf`); 3D000 no such database; 25006 a read-only server (a failover in progress).
/// Retried like every transient error; the rest of the batch is not tried (each would wait for
/// the same answer). Before, 28xxx, 3D000 and 25006 were dead-lettered at once as
/// `non-retryable`, although no message can cause them.
pub fn is_outage_sqlstate(code: &str) -> bool {
    matches!(code, "57P01" | "57P02" | "57P03" | "57P04" | "3D000" | "25006")
        || code.starts_with("08")
        || code.starts_with("28")
        || code.starts_with("53")
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
        for c in [
            "08006", "08001", "53300", "53100", "57P01", "57P03", "28P01", "28000", "3D000", "25006",
        ] {
            assert!(is_outage_sqlstate(c), "{c}");
            assert!(is_transient_sqlstate(c), "{c}");
        }
        // A statement's own trouble is retried within the delivery limit.
        for c in ["40001", "40P01", "57014", "55P03", "42P01", "57P05"] {
            assert!(!is_outage_sqlstate(c), "{c}");
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
