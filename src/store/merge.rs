//! The per-field rule of docs/CONTRACT.md, once in Rust (collapsing one batch) and once in SQL
//! (the upsert against the table), built from the same table description so the two cannot
//! drift apart.
//!
//! Per row key, every field holds the value of the newest event that carries it, "newest" by
//! [`OrderKey`]. Required fields (and the row's own `captured_at`, `source_stream`,
//! `source_seq`) come from the newest event; each optional field has its own order key columns
//! (`<prefix>_at`, `<prefix>_stream`, `<prefix>_seq`) and comes from the newest event carrying
//! it. Taking the maximum per field is associative and commutative, so the rows depend only on
//! the set of events, whatever batches they arrived in.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgRow;

use crate::pipeline::StoredRow;

/// An event's place in the order: time (µs, as stored), then stream name (byte order), then
/// stream sequence. Field order is comparison order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrderKey<'a> {
    pub at: DateTime<Utc>,
    pub stream: &'a str,
    pub seq: u64,
}

/// One row's merge of a batch's candidates (indices into the candidate list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The newest candidate: the required fields come from it.
    pub main: usize,
    /// Per optional field, the newest candidate carrying it.
    pub optional: Vec<Option<usize>>,
    /// Every candidate of this row.
    pub members: Vec<usize>,
}

/// Merges candidates by row key: `keys[i]`, `order[i]` and `carries[i][j]` (candidate `i`
/// carries optional field `j`) describe candidate `i`. Rows come out in key order (the lock
/// order of concurrent batches). Pure, so the rule is unit-tested.
pub fn merge<K: Ord + Clone>(
    keys: &[K],
    order: &[OrderKey<'_>],
    carries: &[Vec<bool>],
    optional: usize,
) -> Vec<Merged> {
    let mut rows: BTreeMap<K, Merged> = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        let m = rows.entry(key.clone()).or_insert_with(|| Merged {
            main: i,
            optional: vec![None; optional],
            members: Vec::new(),
        });
        m.members.push(i);
        if order[i] > order[m.main] {
            m.main = i;
        }
        for (j, slot) in m.optional.iter_mut().enumerate() {
            if carries[i].get(j).copied().unwrap_or(false) && slot.is_none_or(|w| order[i] > order[w]) {
                *slot = Some(i);
            }
        }
    }
    rows.into_values().collect()
}

/// A table written by the per-field upsert, described once: the columns bound (from which both
/// the SQL and its parameters are derived) and how a returned row reads back. Columns bound, in
/// order: `user_id`, `date`, `captured_at`, `source_stream`, `source_seq`, each required column,
/// then per optional field its value, `<prefix>_at`, `<prefix>_stream`, `<prefix>_seq`.
pub struct Table<R: 'static> {
    pub name: &'static str,
    /// The row key and the record's time (its place in the order, with its stream position).
    pub user_id: fn(&R) -> &str,
    pub date: fn(&R) -> NaiveDate,
    pub captured_at: fn(&R) -> DateTime<Utc>,
    pub required: &'static [Required<R>],
    pub optional: &'static [Optional<R>],
    /// The row as stored, from the columns the statements return.
    pub row: fn(&PgRow) -> Result<StoredRow, sqlx::Error>,
    /// The statements, built once from the above (`LazyLock::new(|| TABLE.statements())`).
    pub sql: LazyLock<Statements>,
}

/// A column every record has.
pub struct Required<R: 'static> {
    pub column: &'static str,
    pub value: Value<R>,
}

/// A column some records carry; it keeps the value of the newest event that carried it, with
/// that event's order key in `<prefix>_at`, `_stream`, `_seq`.
pub struct Optional<R: 'static> {
    pub column: &'static str,
    pub prefix: &'static str,
    /// SQL inserted when no event of a new row carried it (`None`: NULL).
    pub default: Option<&'static str>,
    pub value: OptionalValue<R>,
}

/// How a required column is read from a record, and its SQL type.
pub enum Value<R: 'static> {
    Float8(fn(&R) -> f64),
    Int4(fn(&R) -> i32),
    Bool(fn(&R) -> bool),
}

/// How an optional column is read from a record (`None`: not carried), and its SQL type.
pub enum OptionalValue<R: 'static> {
    Int4(fn(&R) -> Option<i32>),
    Text(fn(&R) -> Option<&str>),
}

impl<R> Value<R> {
    fn sql_type(&self) -> &'static str {
        match self {
            Value::Float8(_) => "float8",
            Value::Int4(_) => "int4",
            Value::Bool(_) => "bool",
        }
    }
}

impl<R> OptionalValue<R> {
    fn sql_type(&self) -> &'static str {
        match self {
            OptionalValue::Int4(_) => "int4",
            OptionalValue::Text(_) => "text",
        }
    }

    /// Whether the record carries the field.
    pub fn carried(&self, r: &R) -> bool {
        match self {
            OptionalValue::Int4(get) => get(r).is_some(),
            OptionalValue::Text(get) => get(r).is_some(),
        }
    }
}

/// The statements of a table.
pub struct Statements {
    /// The per-field upsert of [`Table::upsert_sql`].
    pub upsert: String,
    /// The re-read of [`Table::select_sql`].
    pub select: String,
}

impl<R> Table<R> {
    /// A record's row key.
    pub fn key<'r>(&self, r: &'r R) -> (&'r str, NaiveDate) {
        ((self.user_id)(r), (self.date)(r))
    }

    /// The columns a normalized event carries (a change of any is a stored change).
    fn published(&self) -> Vec<&'static str> {
        let mut cols: Vec<&'static str> = self.required.iter().map(|c| c.column).collect();
        cols.push("captured_at");
        cols.extend(self.optional.iter().map(|o| o.column));
        cols
    }

    /// Both statements (for [`Table::sql`]).
    pub fn statements(&self) -> Statements {
        Statements {
            upsert: self.upsert_sql(),
            select: self.select_sql(),
        }
    }

    /// The order key columns of the events the row's fields came from: the row's own
    /// position, then each optional field's.
    fn sources(&self) -> Vec<String> {
        let mut cols = vec!["source_stream".to_string(), "source_seq".to_string()];
        for p in self.optional.iter().map(|o| o.prefix) {
            cols.extend([format!("{p}_at"), format!("{p}_stream"), format!("{p}_seq")]);
        }
        cols
    }

    /// `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO UPDATE` applying the per-field rule.
    /// A row is updated when any of its order keys moves forward; its `version` grows, and
    /// `changed_tx` takes the current transaction, only when a published value changes, so
    /// `RETURNING … changed` tells a stored change from bookkeeping (a duplicate, say).
    pub fn upsert_sql(&self) -> String {
        let mut cols: Vec<(String, &str)> = vec![
            ("user_id".into(), "text"),
            ("date".into(), "date"),
            ("captured_at".into(), "timestamptz"),
            ("source_stream".into(), "text"),
            ("source_seq".into(), "int8"),
        ];
        cols.extend(
            self.required
                .iter()
                .map(|c| (c.column.to_string(), c.value.sql_type())),
        );
        for o in self.optional {
            let p = o.prefix;
            cols.push((o.column.to_string(), o.value.sql_type()));
            cols.push((format!("{p}_at"), "timestamptz"));
            cols.push((format!("{p}_stream"), "text"));
            cols.push((format!("{p}_seq"), "int8"));
        }
        let names: Vec<&str> = cols.iter().map(|(c, _)| c.as_str()).collect();
        let params = cols
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let select = cols
            .iter()
            .map(|(c, _)| {
                match self
                    .optional
                    .iter()
                    .find(|o| o.column == c.as_str())
                    .and_then(|o| o.default)
                {
                    Some(default) => format!("COALESCE(x.{c}, {default})"),
                    None => format!("x.{c}"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let t = self.name;
        let main_newer = format!(
            "(EXCLUDED.captured_at, EXCLUDED.source_stream COLLATE \"C\", EXCLUDED.source_seq) > \
             ({t}.captured_at, COALESCE({t}.source_stream, '') COLLATE \"C\", COALESCE({t}.source_seq, 0))"
        );
        let newer = |p: &str| {
            format!(
                "(EXCLUDED.{p}_at IS NOT NULL AND ({t}.{p}_at IS NULL OR \
                 (EXCLUDED.{p}_at, EXCLUDED.{p}_stream COLLATE \"C\", EXCLUDED.{p}_seq) > \
                 ({t}.{p}_at, {t}.{p}_stream COLLATE \"C\", {t}.{p}_seq)))"
            )
        };
        // The value each column takes.
        let mut new_value: Vec<(String, String)> = Vec::new();
        for c in ["captured_at", "source_stream", "source_seq"]
            .into_iter()
            .chain(self.required.iter().map(|c| c.column))
        {
            new_value.push((
                c.to_string(),
                format!("CASE WHEN {main_newer} THEN EXCLUDED.{c} ELSE {t}.{c} END"),
            ));
        }
        for o in self.optional {
            let (c, p) = (o.column, o.prefix);
            let cond = newer(p);
            for col in [
                c.to_string(),
                format!("{p}_at"),
                format!("{p}_stream"),
                format!("{p}_seq"),
            ] {
                new_value.push((
                    col.clone(),
                    format!("CASE WHEN {cond} THEN EXCLUDED.{col} ELSE {t}.{col} END"),
                ));
            }
        }
        // A published value changes exactly when the event its column follows moves forward
        // with another value: per group of columns that follow one order key (the row's own:
        // the required columns and `captured_at`; then each optional field's), "that key moves
        // forward and a value of the group differs" — the same as comparing every column's new
        // value with its old one, without evaluating each column's condition again. `IS TRUE`:
        // a condition that is NULL keeps the old value, as in the CASEs above.
        let main_cols: Vec<&str> = self
            .required
            .iter()
            .map(|c| c.column)
            .chain(std::iter::once("captured_at"))
            .collect();
        let mut groups = vec![format!(
            "(({main_newer}) IS TRUE AND ROW({}) IS DISTINCT FROM ROW({}))",
            main_cols
                .iter()
                .map(|c| format!("EXCLUDED.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            main_cols
                .iter()
                .map(|c| format!("{t}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )];
        groups.extend(self.optional.iter().map(|o| {
            format!(
                "({} IS TRUE AND EXCLUDED.{c} IS DISTINCT FROM {t}.{c})",
                newer(o.prefix),
                c = o.column
            )
        }));
        let changed = format!("({})", groups.join(" OR "));
        let mut set: Vec<String> = new_value.iter().map(|(c, v)| format!("{c} = {v}")).collect();
        set.push(format!(
            "version = {t}.version + CASE WHEN {changed} THEN 1 ELSE 0 END"
        ));
        set.push(format!(
            "changed_tx = CASE WHEN {changed} THEN pg_current_xact_id() ELSE {t}.changed_tx END"
        ));
        set.push(format!(
            "updated_at = CASE WHEN {changed} THEN now() ELSE {t}.updated_at END"
        ));
        let mut any_newer = vec![main_newer.clone()];
        any_newer.extend(self.optional.iter().map(|o| newer(o.prefix)));
        let aliases = names.join(", ");
        format!(
            "INSERT INTO {t} ({aliases}, version, changed_tx)
             SELECT {select}, 1, pg_current_xact_id() FROM UNNEST({params}) AS x({aliases})
             ON CONFLICT (user_id, date) DO UPDATE SET {set}
             WHERE {cond}
             RETURNING user_id, date, {published}, {sources}, version, changed_tx = pg_current_xact_id() AS changed",
            set = set.join(",\n                 "),
            cond = any_newer.join(" OR "),
            published = self.published().join(", "),
            sources = self.sources().join(", "),
        )
    }

    /// The current rows of some keys, with the same columns as the upsert's `RETURNING`
    /// (`changed` false): for re-announcing a change whose announcement may have been lost.
    pub fn select_sql(&self) -> String {
        let t = self.name;
        format!(
            "SELECT user_id, date, {published}, {sources}, version, false AS changed
             FROM {t} WHERE (user_id, date) IN (SELECT * FROM UNNEST($1::text[], $2::date[]))",
            published = self.published().join(", "),
            sources = self.sources().join(", "),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &'static str, sec: i64, seq: u64) -> OrderKey<'static> {
        OrderKey {
            at: DateTime::from_timestamp(sec, 0).unwrap(),
            stream: s,
            seq,
        }
    }

    #[test]
    fn order_is_time_then_stream_then_sequence() {
        assert!(k("A", 2, 1) > k("B", 1, 9));
        assert!(k("B", 1, 1) > k("A", 1, 9));
        assert!(k("A", 1, 2) > k("A", 1, 1));
        // Byte order, as COLLATE "C" compares in the database.
        assert!(k("AA_CORE_HOT", 1, 1) < k("ATHLETE_ALLY_EVENTS", 1, 1));
    }

    #[test]
    fn each_field_comes_from_the_newest_event_carrying_it() {
        // Key "a": newest (seq 3) lacks the optional field, which the older seq 1 carries.
        let keys = ["a", "b", "a", "a"];
        let order = [k("S", 10, 1), k("S", 5, 2), k("S", 20, 3), k("S", 15, 4)];
        let carries = vec![vec![true], vec![false], vec![false], vec![true]];
        let m = merge(&keys, &order, &carries, 1);
        assert_eq!(
            m,
            vec![
                Merged {
                    main: 2,
                    optional: vec![Some(3)],
                    members: vec![0, 2, 3]
                },
                Merged {
                    main: 1,
                    optional: vec![None],
                    members: vec![1]
                },
            ]
        );
    }

    /// The property the contract rests on: any split of the events into batches, in any order,
    /// merged batch by batch (and then against the "table", the previous merge), ends the same.
    #[test]
    fn merging_is_independent_of_order_and_batching() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..300 {
            let n = (next() % 12 + 1) as usize;
            let keys: Vec<u8> = (0..n).map(|_| (next() % 3) as u8).collect();
            let order: Vec<OrderKey<'static>> = (0..n)
                .map(|i| {
                    k(
                        if next() % 2 == 0 { "A" } else { "B" },
                        (next() % 4) as i64,
                        i as u64,
                    )
                })
                .collect();
            let carries: Vec<Vec<bool>> = (0..n).map(|_| vec![next() % 2 == 0, next() % 3 == 0]).collect();
            let whole = merge(&keys, &order, &carries, 2);
            // Fold in a random order, in random batches, each merged with the running result.
            let mut idx: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                idx.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut acc: Vec<usize> = Vec::new();
            let mut at = 0;
            while at < n {
                let take = (next() % 4 + 1) as usize;
                let batch: Vec<usize> = idx[at..(at + take).min(n)].to_vec();
                at += take;
                // What the table holds is, per row, the winners so far; merging them with the
                // batch must give the winners of the union.
                let mut pool: Vec<usize> = acc.clone();
                pool.extend(batch);
                let m = merge(
                    &pool.iter().map(|&i| keys[i]).collect::<Vec<_>>(),
                    &pool.iter().map(|&i| order[i]).collect::<Vec<_>>(),
                    &pool.iter().map(|&i| carries[i].clone()).collect::<Vec<_>>(),
                    2,
                );
                acc = m
                    .iter()
                    .flat_map(|r| {
                        std::iter::once(pool[r.main]).chain(r.optional.iter().flatten().map(|&j| pool[j]))
                    })
                    .collect();
                acc.sort_unstable();
                acc.dedup();
            }
            let winners = |m: &[Merged], map: &dyn Fn(usize) -> usize| -> Vec<(usize, Vec<Option<usize>>)> {
                m.iter()
                    .map(|r| (map(r.main), r.optional.iter().map(|o| o.map(map)).collect()))
                    .collect()
            };
            let pool = acc.clone();
            let last = merge(
                &pool.iter().map(|&i| keys[i]).collect::<Vec<_>>(),
                &pool.iter().map(|&i| order[i]).collect::<Vec<_>>(),
                &pool.iter().map(|&i| carries[i].clone()).collect::<Vec<_>>(),
                2,
            );
            assert_eq!(
                winners(&whole, &|i| i),
                winners(&last, &|i| pool[i]),
                "case {case}: keys {keys:?} order {order:?} carries {carries:?}"
            );
        }
    }
}
