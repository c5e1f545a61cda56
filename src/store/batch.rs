//! The batch write: a whole fetched batch atomically, with one multi-row
//! `INSERT … SELECT FROM UNNEST(…) ON CONFLICT …` per table. The records of one row key are first
//! collapsed by the per-field rule ([`merge::merge`]); the upsert applies the same rule against the
//! table, so the rows depend only on the set of events. The same code for every table: a table
//! is its [`Table`] description (see [`super::tables`]).

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Acquire, PgConnection, PgPool};

use super::merge::{self, Merged, OrderKey, Table};
use super::tables::{self, SourceKey};
use super::unnest::{self, seq_i64, RowValues};
use super::{BatchEntry, Written};
use crate::metrics::Metrics;
use crate::pipeline::{Decoded, HrvRecord, OuraWebhook, SleepRecord, StoredRow};

/// How many times a batch write is tried when PostgreSQL reports a deadlock.
pub const DEADLOCK_ATTEMPTS: u32 = 5;

/// Writes a whole batch atomically (one transaction, or a single statement that commits on its
/// own): the Oura raw rows with one statement, then each table with one multi-row upsert.
/// Returns one outcome per entry, in order.
///
/// Batches of this path never deadlock with each other (tables in a fixed order, rows in key
/// order), but other writers can cross them (an instance of an older version): a deadlock
/// (40P01) is retried at once, up to [`DEADLOCK_ATTEMPTS`] times; PostgreSQL aborted the
/// victim's whole transaction, so nothing of it was committed.
pub async fn upsert_batch(
    pool: &PgPool,
    metrics: &Metrics,
    entries: &[BatchEntry<'_>],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut attempt = 1;
    loop {
        match upsert_batch_once(pool, metrics, entries).await {
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

fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("40P01"))
}

/// A record to upsert, with the entry it came from.
struct Cand<'a, R> {
    entry: usize,
    record: &'a R,
}

/// One table's candidates of a batch, collapsed by row key.
struct Rows<'a, R: 'static> {
    table: &'static Table<R>,
    cands: Vec<Cand<'a, R>>,
    merged: Vec<Merged>,
}

/// What one batch writes: the raw webhooks, then each normalized table. Destructured without
/// `..` wherever it is walked, so a new table cannot be left out of any step.
struct Batch<'a> {
    hooks: Vec<(usize, &'a OuraWebhook)>,
    hrv: Rows<'a, HrvRecord>,
    sleep: Rows<'a, SleepRecord>,
}

impl<'a, R> Rows<'a, R> {
    /// Collapses the candidates by the per-field rule; rows come out in key order.
    fn merge(table: &'static Table<R>, cands: Vec<Cand<'a, R>>, entries: &[BatchEntry<'a>]) -> Rows<'a, R> {
        let keys: Vec<_> = cands.iter().map(|c| table.key(c.record)).collect();
        let order: Vec<_> = cands.iter().map(|c| cand_order(table, c, entries)).collect();
        let carries: Vec<Vec<bool>> = cands
            .iter()
            .map(|c| table.optional.iter().map(|o| o.value.carried(c.record)).collect())
            .collect();
        let merged = merge::merge(&keys, &order, &carries, table.optional.len());
        Rows { table, cands, merged }
    }

    fn key(&self, i: usize) -> (&'a str, NaiveDate) {
        self.table.key(self.cands[i].record)
    }

    /// Marks every entry whose record gives a field to a row, and every entry with a record.
    fn mark(&self, used: &mut [bool], has_record: &mut [bool]) {
        for c in &self.cands {
            has_record[c.entry] = true;
        }
        for m in &self.merged {
            for i in std::iter::once(m.main).chain(m.optional.iter().flatten().copied()) {
                used[self.cands[i].entry] = true;
            }
        }
    }

    /// Upserts the rows and reports the stored changes to the entries that made them.
    async fn upsert(
        &self,
        conn: &mut PgConnection,
        metrics: &Metrics,
        entries: &[BatchEntry<'a>],
        out: &mut [Written],
    ) -> Result<(), sqlx::Error> {
        if self.merged.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let placed = |i: usize| {
            (
                self.cands[i].record,
                cand_order(self.table, &self.cands[i], entries),
            )
        };
        let values: Vec<RowValues<'a, R>> = self
            .merged
            .iter()
            .map(|m| RowValues {
                main: placed(m.main),
                optional: m.optional.iter().map(|o| o.map(placed)).collect(),
            })
            .collect();
        let returned = unnest::upsert(self.table, &values).fetch_all(&mut *conn).await?;
        metrics.observe_db_write(self.table.name, started.elapsed());
        self.announce(conn, entries, &returned, out).await
    }

    /// Reports the rows the upsert changed (`returned`). A row this statement did not change
    /// may still hold a change that an earlier delivery of one of its records committed while
    /// that delivery's announcement was lost (it was NAKed, or dead-lettered and replayed): when
    /// a redelivered record is still the source of one of the row's fields, the row is reported
    /// again for that record — announced under its identity and the row's version, the same id
    /// as the lost announcement when nothing changed the row since, so JetStream drops it if
    /// that one was stored after all; otherwise an announcement of the row as it now is.
    async fn announce(
        &self,
        conn: &mut PgConnection,
        entries: &[BatchEntry<'a>],
        returned: &[PgRow],
        out: &mut [Written],
    ) -> Result<(), sqlx::Error> {
        let read = |rows: &[PgRow]| {
            rows.iter()
                .map(|r| Returned::read(self.table, r))
                .collect::<Result<Vec<_>, _>>()
        };
        let stored = read(returned)?;
        let by_key: HashMap<(&str, NaiveDate), &Returned> = stored.iter().map(|r| (r.key(), r)).collect();
        let redelivered = |m: &Merged| {
            m.members
                .iter()
                .any(|&i| entries[self.cands[i].entry].source.redelivered)
        };
        let mut unchanged: Vec<&Merged> = Vec::new();
        let mut missing: Vec<(&str, NaiveDate)> = Vec::new();
        for m in &self.merged {
            let entry = self.cands[m.main].entry;
            match by_key.get(&self.key(m.main)) {
                Some(row) if row.changed => out[entry].stored.push(row.row.clone()),
                Some(_) if redelivered(m) => unchanged.push(m),
                None if redelivered(m) => {
                    unchanged.push(m);
                    missing.push(self.key(m.main));
                }
                Some(_) | None => {}
            }
        }
        if unchanged.is_empty() {
            return Ok(());
        }
        let current = if missing.is_empty() {
            Vec::new()
        } else {
            let (users, dates): (Vec<&str>, Vec<NaiveDate>) = missing.into_iter().unzip();
            let rows = sqlx::query(&self.table.sql.select)
                .bind(&users)
                .bind(&dates)
                .fetch_all(&mut *conn)
                .await?;
            read(&rows)?
        };
        let now: HashMap<(&str, NaiveDate), &Returned> = current.iter().map(|r| (r.key(), r)).collect();
        for m in unchanged {
            let key = self.key(m.main);
            let Some(row) = by_key.get(&key).or_else(|| now.get(&key)) else {
                continue;
            };
            let source = m.members.iter().map(|&i| &self.cands[i]).find(|c| {
                let e = &entries[c.entry];
                e.source.redelivered
                    && row.holds((
                        (self.table.captured_at)(c.record),
                        e.source.stream,
                        seq_i64(e.source.seq),
                    ))
            });
            if let Some(c) = source {
                out[c.entry].stored.push(row.row.clone());
            }
        }
        Ok(())
    }
}

/// A candidate's place in the order: its record's time and its entry's stream position.
fn cand_order<'a, R>(table: &Table<R>, c: &Cand<'a, R>, entries: &[BatchEntry<'a>]) -> OrderKey<'a> {
    let s = &entries[c.entry].source;
    OrderKey {
        at: (table.captured_at)(c.record),
        stream: s.stream,
        seq: s.seq,
    }
}

/// A row as the upsert (or the re-read) returns it: the row as stored, and the bookkeeping
/// that says whether this statement changed it and which events its fields came from.
#[derive(Debug)]
struct Returned {
    row: StoredRow,
    key: (String, NaiveDate),
    /// The order key of the event its required fields came from.
    order: SourceKey,
    /// Per optional field, the order key of the event it came from.
    sources: Vec<Option<SourceKey>>,
    /// Changed by the statement that returned it (not bookkeeping only).
    changed: bool,
}

impl Returned {
    fn read<R>(table: &Table<R>, row: &PgRow) -> Result<Returned, sqlx::Error> {
        use sqlx::Row;
        Ok(Returned {
            row: (table.row)(row)?,
            key: tables::key(row)?,
            order: (
                row.try_get("captured_at")?,
                row.try_get::<Option<String>, _>("source_stream")?
                    .unwrap_or_default(),
                row.try_get::<Option<i64>, _>("source_seq")?.unwrap_or_default(),
            ),
            sources: table
                .optional
                .iter()
                .map(|o| tables::source(row, o.prefix))
                .collect::<Result<_, _>>()?,
            changed: row.try_get::<Option<bool>, _>("changed")?.unwrap_or(false),
        })
    }

    fn key(&self) -> (&str, NaiveDate) {
        (self.key.0.as_str(), self.key.1)
    }

    /// Whether the event with this order key gave the row any of its fields.
    fn holds(&self, key: (DateTime<Utc>, &str, i64)) -> bool {
        let is = |s: &SourceKey| (s.0, s.1.as_str(), s.2) == key;
        is(&self.order) || self.sources.iter().flatten().any(is)
    }
}

async fn upsert_batch_once(
    pool: &PgPool,
    metrics: &Metrics,
    entries: &[BatchEntry<'_>],
) -> Result<Vec<Written>, sqlx::Error> {
    let mut out = vec![Written::default(); entries.len()];
    let mut hooks = Vec::new();
    let mut hrv = Vec::new();
    let mut sleep = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.decoded {
            Decoded::Hrv(r) => hrv.push(Cand { entry: i, record: r }),
            Decoded::Sleep(r) => sleep.push(Cand { entry: i, record: r }),
            Decoded::Oura(w) => {
                hooks.push((i, w));
                if let Some(r) = &w.hrv {
                    hrv.push(Cand { entry: i, record: r });
                }
                if let Some(r) = &w.sleep {
                    sleep.push(Cand { entry: i, record: r });
                }
            }
        }
    }
    // Concurrent batches take their locks in one global order: tables in a fixed order, rows
    // in key order (merge returns them so), raw webhooks by key.
    // Within a key, by position: the first copy is the one the row keeps.
    hooks.sort_by(|a, b| {
        let position = |i: usize| entries.get(i).map(|e| (e.source.stream, e.source.seq));
        (a.1.idempotency_key.as_str(), position(a.0)).cmp(&(b.1.idempotency_key.as_str(), position(b.0)))
    });
    let batch = Batch {
        hooks,
        hrv: Rows::merge(&tables::HRV, hrv, entries),
        sleep: Rows::merge(&tables::SLEEP, sleep, entries),
    };
    batch.mark_superseded(&mut out);

    // One statement commits on its own; only several need an explicit transaction (BEGIN and
    // COMMIT are two more round trips, a large share of a small batch's write).
    let mut conn = pool.acquire().await?;
    if batch.statements() <= 1 {
        batch.write(&mut conn, metrics, entries, &mut out).await?;
    } else {
        let mut tx = conn.begin().await?;
        batch.write(&mut tx, metrics, entries, &mut out).await?;
        tx.commit().await?;
    }
    Ok(out)
}

impl<'a> Batch<'a> {
    /// An entry is superseded when it has records and newer records of the same keys in the
    /// batch took every one of their fields: nothing of it is written.
    fn mark_superseded(&self, out: &mut [Written]) {
        let Batch { hooks: _, hrv, sleep } = self;
        let mut used = vec![false; out.len()];
        let mut has_record = vec![false; out.len()];
        hrv.mark(&mut used, &mut has_record);
        sleep.mark(&mut used, &mut has_record);
        for (i, o) in out.iter_mut().enumerate() {
            o.superseded = has_record[i] && !used[i];
        }
    }

    fn statements(&self) -> usize {
        let Batch { hooks, hrv, sleep } = self;
        usize::from(!hooks.is_empty())
            + usize::from(!hrv.merged.is_empty())
            + usize::from(!sleep.merged.is_empty())
    }

    /// The statements, on a connection or in a transaction, tables in a fixed order.
    async fn write(
        &self,
        conn: &mut PgConnection,
        metrics: &Metrics,
        entries: &[BatchEntry<'a>],
        out: &mut [Written],
    ) -> Result<(), sqlx::Error> {
        let Batch { hooks, hrv, sleep } = self;
        if !hooks.is_empty() {
            tables::insert_webhooks(conn, metrics, hooks, entries).await?;
        }
        hrv.upsert(conn, metrics, entries, out).await?;
        sleep.upsert(conn, metrics, entries, out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_row_is_held_by_every_event_that_gave_it_a_field() {
        let row = Returned {
            row: StoredRow::Sleep(crate::pipeline::SleepRow {
                user_id: "u".into(),
                date: NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
                duration_minutes: 421,
                quality_score: Some(100),
                vendor: "oura".into(),
                captured_at: at("2025-03-01T08:00:00Z"),
                version: 1,
            }),
            key: ("u".into(), NaiveDate::from_ymd_opt(2025, 3, 1).unwrap()),
            order: (at("2025-03-01T08:00:00Z"), "AA_CORE_HOT".into(), 9),
            sources: vec![None, Some((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT".into(), 4))],
            changed: false,
        };
        // The event that gave the quality is a source of the row too; an unrelated one is not.
        assert!(row.holds((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT", 4)));
        assert!(row.holds((at("2025-03-01T08:00:00Z"), "AA_CORE_HOT", 9)));
        assert!(!row.holds((at("2025-03-01T07:00:00Z"), "AA_CORE_HOT", 5)));
    }
}
