//! Each table's statements: the normalized tables as [`Table`] descriptions (their upsert and
//! re-read are generated from them, see [`super::merge`]), how their rows read back, and the raw
//! webhook insert.

use std::sync::LazyLock;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::merge::{Optional, OptionalValue, Required, Table, Value};
use super::unnest::seq_i64;
use super::BatchEntry;
use crate::config::ConsumerKind;
use crate::metrics::Metrics;
use crate::pipeline::{HrvRecord, HrvRow, OuraWebhook, SleepRecord, SleepRow, StoredRow, Vendor};

/// The vendor column: a stored vendor is replaced only by an event that names one.
const fn vendor<R>(get: fn(&R) -> Option<&str>) -> Optional<R> {
    Optional {
        column: "vendor",
        prefix: "vendor",
        default: Some("'unknown'"),
        value: OptionalValue::Text(get),
    }
}

pub static HRV: Table<HrvRecord> = Table {
    name: "hrv_data",
    user_id: |r| &r.user_id,
    date: |r| r.date,
    captured_at: |r| r.captured_at,
    required: &[
        Required {
            column: "rmssd",
            value: Value::Float8(|r| r.rmssd),
        },
        Required {
            column: "ln_rmssd",
            value: Value::Float8(|r| r.ln_rmssd),
        },
        Required {
            column: "readiness_score",
            value: Value::Float8(|r| r.readiness_score),
        },
    ],
    optional: &[vendor(|r| r.vendor.map(Vendor::as_str))],
    row: |row| {
        Ok(StoredRow::Hrv(HrvRow {
            user_id: row.try_get("user_id")?,
            date: row.try_get("date")?,
            rmssd: row.try_get("rmssd")?,
            ln_rmssd: row.try_get("ln_rmssd")?,
            readiness_score: row.try_get("readiness_score")?,
            vendor: row.try_get("vendor")?,
            captured_at: row.try_get("captured_at")?,
            version: row.try_get("version")?,
        }))
    },
    sql: LazyLock::new(|| HRV.statements()),
};

pub static SLEEP: Table<SleepRecord> = Table {
    name: "sleep_data",
    user_id: |r| &r.user_id,
    date: |r| r.date,
    captured_at: |r| r.captured_at,
    required: &[
        Required {
            column: "duration_minutes",
            value: Value::Int4(|r| r.duration_minutes),
        },
        Required {
            column: "captured_at_defaulted",
            value: Value::Bool(|r| r.captured_at_defaulted),
        },
    ],
    optional: &[
        vendor(|r| r.vendor.map(Vendor::as_str)),
        Optional {
            column: "quality_score",
            prefix: "quality",
            default: None,
            value: OptionalValue::Int4(|r| r.quality_score),
        },
    ],
    row: |row| {
        Ok(StoredRow::Sleep(SleepRow {
            user_id: row.try_get("user_id")?,
            date: row.try_get("date")?,
            duration_minutes: row.try_get("duration_minutes")?,
            quality_score: row.try_get("quality_score")?,
            vendor: row.try_get("vendor")?,
            captured_at: row.try_get("captured_at")?,
            version: row.try_get("version")?,
        }))
    },
    sql: LazyLock::new(|| SLEEP.statements()),
};

/// Stores the raw webhooks, one row per idempotency key. Of several copies under one key (the
/// same body in two streams, a publisher reusing an id) the row keeps the one at the lowest
/// position (stream name in byte order, then sequence), whatever the order they arrive in:
/// `hooks` come sorted by key and then position, so the first copy of a key in a batch is its
/// lowest one and the rest are left out of the statement.
pub(super) async fn insert_webhooks(
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
        if keys.last() == Some(&w.idempotency_key.as_str()) {
            continue;
        }
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
         ON CONFLICT (idempotency_key) DO UPDATE
         SET user_id = EXCLUDED.user_id, payload = EXCLUDED.payload,
             source_stream = EXCLUDED.source_stream, source_seq = EXCLUDED.source_seq
         WHERE (EXCLUDED.source_stream COLLATE \"C\", EXCLUDED.source_seq)
             < (vendor_webhook_events.source_stream COLLATE \"C\", vendor_webhook_events.source_seq)",
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

/// How many rows the migration probe's event of `kind` left: its `user_id`'s rows captured at or
/// after `since` in the kind's table, or (a webhook) the raw row stored under `msg_id`.
pub async fn probe_rows(
    pool: &PgPool,
    kind: ConsumerKind,
    user_id: &str,
    msg_id: &str,
    since: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let rows_since =
        |table: &str| format!("SELECT count(*) FROM {table} WHERE user_id = $1 AND captured_at >= $2");
    let query = match kind {
        ConsumerKind::Hrv => rows_since(HRV.name),
        ConsumerKind::Sleep => rows_since(SLEEP.name),
        ConsumerKind::Oura => {
            return sqlx::query_scalar(
                "SELECT count(*) FROM vendor_webhook_events WHERE idempotency_key = $1",
            )
            .bind(msg_id)
            .fetch_one(pool)
            .await
        }
    };
    sqlx::query_scalar(&query)
        .bind(user_id)
        .bind(since)
        .fetch_one(pool)
        .await
}

/// The order key columns of a returned row (the event its required fields came from) and of
/// each optional field (`None`: never carried).
pub(super) type SourceKey = (DateTime<Utc>, String, i64);

pub(super) fn source(row: &PgRow, prefix: &str) -> Result<Option<SourceKey>, sqlx::Error> {
    let at: Option<DateTime<Utc>> = row.try_get(format!("{prefix}_at").as_str())?;
    let stream: Option<String> = row.try_get(format!("{prefix}_stream").as_str())?;
    let seq: Option<i64> = row.try_get(format!("{prefix}_seq").as_str())?;
    Ok(at.map(|at| (at, stream.unwrap_or_default(), seq.unwrap_or_default())))
}

pub(super) fn key(row: &PgRow) -> Result<(String, NaiveDate), sqlx::Error> {
    Ok((row.try_get("user_id")?, row.try_get("date")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_names_every_column_once_and_compares_bytewise() {
        let sql = &HRV.sql.upsert;
        assert!(sql.contains("INSERT INTO hrv_data (user_id, date, captured_at, source_stream, source_seq, rmssd, ln_rmssd, readiness_score, vendor, vendor_at, vendor_stream, vendor_seq, version, changed_tx)"));
        assert!(sql.contains("$12::int8[]"));
        assert!(!sql.contains("$13"));
        assert!(sql.contains("COALESCE(x.vendor, 'unknown')"));
        assert!(sql.contains("COLLATE \"C\""));
        let sleep = &SLEEP.sql.upsert;
        assert!(sleep.contains("$15::int8[]"));
        assert!(sleep.contains("$8::text[]"));
        assert!(sleep.contains("$12::int4[]"));
        assert!(sleep.contains("x.quality_score"));
        assert!(!sleep.contains("COALESCE(x.quality_score"));
        assert!(SLEEP
            .sql
            .select
            .contains("quality_at, quality_stream, quality_seq"));
    }
}
