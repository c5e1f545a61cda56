//! The parameters of a table's per-field upsert: one array per column, bound in the order of
//! [`Table::upsert_sql`], built from the merged rows of one batch by the table's description —
//! the one UNNEST helper every table uses.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::Postgres;

use super::merge::{OptionalValue, OrderKey, Table, Value};

/// One column's array.
enum Param<'a> {
    Text(Vec<&'a str>),
    Date(Vec<NaiveDate>),
    Time(Vec<DateTime<Utc>>),
    Int8(Vec<i64>),
    Float8(Vec<f64>),
    Int4(Vec<i32>),
    Bool(Vec<bool>),
    OptText(Vec<Option<&'a str>>),
    OptInt4(Vec<Option<i32>>),
    OptTime(Vec<Option<DateTime<Utc>>>),
    OptInt8(Vec<Option<i64>>),
}

impl<'a> Param<'a> {
    fn bind(self, q: Query<'a, Postgres, PgArguments>) -> Query<'a, Postgres, PgArguments> {
        match self {
            Param::Text(v) => q.bind(v),
            Param::Date(v) => q.bind(v),
            Param::Time(v) => q.bind(v),
            Param::Int8(v) => q.bind(v),
            Param::Float8(v) => q.bind(v),
            Param::Int4(v) => q.bind(v),
            Param::Bool(v) => q.bind(v),
            Param::OptText(v) => q.bind(v),
            Param::OptInt4(v) => q.bind(v),
            Param::OptTime(v) => q.bind(v),
            Param::OptInt8(v) => q.bind(v),
        }
    }
}

/// A stream sequence as PostgreSQL's `int8`.
pub fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A record with its order key.
pub type Placed<'a, R> = (&'a R, OrderKey<'a>);

/// One merged row: the record its required fields come from, and per optional field the record
/// it comes from (`None` when no event of the batch carried it).
pub struct RowValues<'a, R> {
    pub main: Placed<'a, R>,
    pub optional: Vec<Option<Placed<'a, R>>>,
}

/// The upsert of `rows` into `table`, its parameters bound.
pub fn upsert<'a, R>(table: &'a Table<R>, rows: &[RowValues<'a, R>]) -> Query<'a, Postgres, PgArguments> {
    let main = || rows.iter().map(|r| r.main);
    let mut params = vec![
        Param::Text(main().map(|(r, _)| table.key(r).0).collect()),
        Param::Date(main().map(|(r, _)| table.key(r).1).collect()),
        Param::Time(main().map(|(_, k)| k.at).collect()),
        Param::Text(main().map(|(_, k)| k.stream).collect()),
        Param::Int8(main().map(|(_, k)| seq_i64(k.seq)).collect()),
    ];
    for c in table.required {
        params.push(match c.value {
            Value::Float8(get) => Param::Float8(main().map(|(r, _)| get(r)).collect()),
            Value::Int4(get) => Param::Int4(main().map(|(r, _)| get(r)).collect()),
            Value::Bool(get) => Param::Bool(main().map(|(r, _)| get(r)).collect()),
        });
    }
    for (j, o) in table.optional.iter().enumerate() {
        let source = || {
            rows.iter().map(move |r| {
                r.optional
                    .get(j)
                    .copied()
                    .flatten()
                    .filter(|(r, _)| o.value.carried(r))
            })
        };
        params.push(match o.value {
            OptionalValue::Int4(get) => {
                Param::OptInt4(source().map(|s| s.and_then(|(r, _)| get(r))).collect())
            }
            OptionalValue::Text(get) => {
                Param::OptText(source().map(|s| s.and_then(|(r, _)| get(r))).collect())
            }
        });
        params.push(Param::OptTime(source().map(|s| s.map(|(_, k)| k.at)).collect()));
        params.push(Param::OptText(
            source().map(|s| s.map(|(_, k)| k.stream)).collect(),
        ));
        params.push(Param::OptInt8(
            source().map(|s| s.map(|(_, k)| seq_i64(k.seq))).collect(),
        ));
    }
    params
        .into_iter()
        .fold(sqlx::query(&table.sql.upsert), |q, p| p.bind(q))
}
