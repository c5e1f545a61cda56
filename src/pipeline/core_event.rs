//! The typed reading of a raw core event (HRV reading, sleep record): the fields the decoders use
//! are read straight from the bytes into small structs, strings borrowed from the body where they
//! have no escapes, instead of building a `serde_json::Value` tree of the whole event (issue 18:
//! the tree's allocations were most of the decode's cost).
//!
//! It accepts and refuses what the tree did, so the decoders' results do not change:
//! - the whole body is parsed by the same parser with the same checks (UTF-8, escapes,
//!   surrogates, numbers out of range, nesting depth, trailing characters): every value the
//!   decoders do not read is still visited ([`Skip`]), not skipped unchecked as `IgnoredAny`
//!   would;
//! - every value keeps its JSON kind ([`Field`]), so a wrong type gives the same error, in the
//!   same order (the decoders check the fields in the order they always did);
//! - a key given twice takes its last value (as `serde_json::Map` does), keys are compared after
//!   unescaping, and `null` reads as absent;
//! - serde_json's private `$serde_json::private::RawValue` key is an ordinary key, as it is in
//!   the tree since `tree.rs` (`tests::the_raw_value_key_is_an_ordinary_key`).
//!
//! `tests::the_typed_reading_agrees_with_the_value_tree` checks this against the tree on
//! generated bodies (duplicate keys, escapes and wrong types included).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::fields::{Member, Scalar};
use super::SchemaError;

/// A raw core event: `{"eventId", "payload": {…}}`.
#[derive(Debug, Default)]
pub(crate) struct CoreEvent<'a> {
    event_id: Option<Field<'a>>,
    payload: Option<Obj<Payload<'a>>>,
}

/// The payload of an HRV reading or a sleep record (one struct for both: the fields of the other
/// kind are read and not used).
#[derive(Debug, Default)]
pub(crate) struct Payload<'a> {
    user_id: Option<Field<'a>>,
    date: Option<Field<'a>>,
    /// `rMSSD`, and its other spelling `rmssd`.
    rmssd: Option<Field<'a>>,
    rmssd_lower: Option<Field<'a>>,
    /// `lnRMSSD`, and its other spelling `lnRmssd`.
    ln_rmssd: Option<Field<'a>>,
    ln_rmssd_camel: Option<Field<'a>>,
    captured_at: Option<Field<'a>>,
    duration_minutes: Option<Field<'a>>,
    raw: Option<Obj<Raw<'a>>>,
}

/// `payload.raw`.
#[derive(Debug, Default)]
pub(crate) struct Raw<'a> {
    source: Option<Field<'a>>,
    readiness_score: Option<Field<'a>>,
    quality_score: Option<Field<'a>>,
}

impl<'a> CoreEvent<'a> {
    /// Parses a body: a JSON error, or `NotObject("body")` when it is valid JSON but not an
    /// object.
    pub(crate) fn parse(body: &'a [u8]) -> Result<CoreEvent<'a>, SchemaError> {
        match serde_json::from_slice::<Obj<CoreEvent<'a>>>(body).map_err(SchemaError::Json)? {
            Obj::Object(event) => Ok(event),
            Obj::Null | Obj::Other => Err(SchemaError::NotObject("body")),
        }
    }

    pub(crate) fn event_id(&self) -> Scalar<'_> {
        scalar(&self.event_id)
    }

    pub(crate) fn payload(&self) -> Member<'_, Payload<'a>> {
        member(&self.payload)
    }
}

impl<'a> Payload<'a> {
    pub(crate) fn user_id(&self) -> Scalar<'_> {
        scalar(&self.user_id)
    }

    pub(crate) fn date(&self) -> Scalar<'_> {
        scalar(&self.date)
    }

    /// `rMSSD` when the key is present (even as `null`), else `rmssd`.
    pub(crate) fn rmssd(&self) -> Scalar<'_> {
        scalar(either(&self.rmssd, &self.rmssd_lower))
    }

    /// `lnRMSSD` when the key is present (even as `null`), else `lnRmssd`.
    pub(crate) fn ln_rmssd(&self) -> Scalar<'_> {
        scalar(either(&self.ln_rmssd, &self.ln_rmssd_camel))
    }

    pub(crate) fn captured_at(&self) -> Scalar<'_> {
        scalar(&self.captured_at)
    }

    pub(crate) fn duration_minutes(&self) -> Scalar<'_> {
        scalar(&self.duration_minutes)
    }

    pub(crate) fn raw(&self) -> Member<'_, Raw<'a>> {
        member(&self.raw)
    }
}

impl Raw<'_> {
    pub(crate) fn source(&self) -> Scalar<'_> {
        scalar(&self.source)
    }

    pub(crate) fn readiness_score(&self) -> Scalar<'_> {
        scalar(&self.readiness_score)
    }

    pub(crate) fn quality_score(&self) -> Scalar<'_> {
        scalar(&self.quality_score)
    }
}

/// The first when its key was present, as `Map::get(a).or_else(|| Map::get(b))` reads.
fn either<'f, 'a>(first: &'f Option<Field<'a>>, second: &'f Option<Field<'a>>) -> &'f Option<Field<'a>> {
    if first.is_some() {
        first
    } else {
        second
    }
}

fn scalar<'f>(field: &'f Option<Field<'_>>) -> Scalar<'f> {
    match field {
        None | Some(Field::Null) => Scalar::Missing,
        Some(Field::Str(s)) => Scalar::Str(s),
        Some(Field::Num(n)) => Scalar::Num(*n),
        Some(Field::Other) => Scalar::Other,
    }
}

fn member<T>(field: &Option<Obj<T>>) -> Member<'_, T> {
    match field {
        None | Some(Obj::Null) => Member::Missing,
        Some(Obj::Object(o)) => Member::Object(o),
        Some(Obj::Other) => Member::NotObject,
    }
}

// --- deserialization ----------------------------------------------------------------------

/// A record's fields by key: reads the value of a key it knows, or says it does not know it.
trait Fields<'de>: Default {
    /// Reads the next value when `key` is one of the record's fields (replacing an earlier value
    /// of the same key); returns false, reading nothing, otherwise.
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

impl<'de> Fields<'de> for CoreEvent<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "eventId" => self.event_id = Some(map.next_value()?),
            "payload" => self.payload = Some(map.next_value()?),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl<'de> Fields<'de> for Payload<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        let slot = match key {
            "userId" => &mut self.user_id,
            "date" => &mut self.date,
            "rMSSD" => &mut self.rmssd,
            "rmssd" => &mut self.rmssd_lower,
            "lnRMSSD" => &mut self.ln_rmssd,
            "lnRmssd" => &mut self.ln_rmssd_camel,
            "capturedAt" => &mut self.captured_at,
            "durationMinutes" => &mut self.duration_minutes,
            "raw" => {
                self.raw = Some(map.next_value()?);
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = Some(map.next_value()?);
        Ok(true)
    }
}

impl<'de> Fields<'de> for Raw<'de> {
    fn read<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        let slot = match key {
            "source" => &mut self.source,
            "readinessScore" => &mut self.readiness_score,
            "qualityScore" => &mut self.quality_score,
            _ => return Ok(false),
        };
        *slot = Some(map.next_value()?);
        Ok(true)
    }
}

/// A value read for its kind and, when it is a string or a number, its content.
#[derive(Debug)]
enum Field<'a> {
    Null,
    Str(Cow<'a, str>),
    /// Every JSON number as `f64`, as `Value::as_f64` gives it.
    Num(f64),
    /// A boolean, an array or an object (visited to its end, not kept).
    Other,
}

/// A value that is read as the record `T` when it is an object.
#[derive(Debug)]
enum Obj<T> {
    Null,
    Object(T),
    /// Any other value (visited to its end, not kept).
    Other,
}

/// A value visited to its end and dropped: every string, number and nesting level gets the same
/// checks as when it is read into a `Value`.
struct Skip;

/// A key, unescaped; borrowed from the body when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Field::Num(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Field::Num(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Field::Num(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de, T: Fields<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Fields<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Obj::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Obj::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Obj::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Obj::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Obj::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Obj::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Obj::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut record = T::default();
                while let Some(Key(key)) = map.next_key()? {
                    if !record.read(&key, &mut map)? {
                        map.next_value::<Skip>()?;
                    }
                }
                Ok(Obj::Object(record))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read as a `Field` (`deserialize_any`), not as `IgnoredAny`: serde_json's ignore path
        // does not check numbers' range, strings' surrogates or their UTF-8, which the `Value`
        // tree did. Arrays and objects inside are visited by `Skip` again, so nothing is kept.
        Field::deserialize(d).map(|_| Skip)
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Skip>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<Skip, Skip>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::super::{
        date, event_id, hrv, minutes, number, object, optional_object, parse_object, sleep, test_envelope,
        timestamp, user_id, vendor, Clock, HrvRecord, Member, Scalar, SchemaError, Shape, SleepRecord,
    };

    // The decoders as they read the `Value` tree before the typed reading (the reference).

    fn tree_hrv(body: &[u8], clock: Clock) -> Result<HrvRecord, SchemaError> {
        let root = parse_object(body)?;
        let event_id = event_id(Scalar::of(root.get("eventId")))?;
        let p: &Map<String, Value> = object(Member::of(root.get("payload")), "payload")?;
        let user_id = user_id(Scalar::of(p.get("userId")), "payload.userId")?;
        let date = date(Scalar::of(p.get("date")), "payload.date")?;
        let rmssd = hrv::rmssd(
            Scalar::of(p.get("rMSSD").or_else(|| p.get("rmssd"))),
            "payload.rMSSD",
        )?;
        let ln_given = number(
            Scalar::of(p.get("lnRMSSD").or_else(|| p.get("lnRmssd"))),
            "payload.lnRMSSD",
        )?;
        let captured_at = timestamp(Scalar::of(p.get("capturedAt")), "payload.capturedAt", clock)?
            .ok_or(SchemaError::Missing("payload.capturedAt"))?;
        let raw = optional_object(Member::of(p.get("raw")), "payload.raw")?;
        let readiness_score = raw
            .and_then(|r| r.get("readinessScore"))
            .and_then(Value::as_f64)
            .filter(|s| s.is_finite() && (0.0..=100.0).contains(s))
            .unwrap_or(0.0);
        Ok(HrvRecord {
            user_id,
            date,
            rmssd,
            ln_rmssd: ln_given.unwrap_or_else(|| rmssd.ln()),
            vendor: vendor(Scalar::of(raw.and_then(|r| r.get("source")))),
            captured_at,
            readiness_score,
            event_id,
        })
    }

    fn tree_sleep(body: &[u8], stable: DateTime<Utc>, clock: Clock) -> Result<SleepRecord, SchemaError> {
        let root = parse_object(body)?;
        let event_id = event_id(Scalar::of(root.get("eventId")))?;
        let p: &Map<String, Value> = object(Member::of(root.get("payload")), "payload")?;
        let user_id = user_id(Scalar::of(p.get("userId")), "payload.userId")?;
        let date = date(Scalar::of(p.get("date")), "payload.date")?;
        let duration = number(Scalar::of(p.get("durationMinutes")), "payload.durationMinutes")?
            .ok_or(SchemaError::Missing("payload.durationMinutes"))?;
        let duration_minutes = minutes(duration, "payload.durationMinutes")?;
        let captured = timestamp(Scalar::of(p.get("capturedAt")), "payload.capturedAt", clock)?;
        let raw = optional_object(Member::of(p.get("raw")), "payload.raw")?;
        let quality_score = number(
            Scalar::of(raw.and_then(|r| r.get("qualityScore"))),
            "payload.raw.qualityScore",
        )?
        .map(super::super::clamp_score);
        Ok(SleepRecord {
            user_id,
            date,
            duration_minutes,
            quality_score,
            vendor: vendor(Scalar::of(raw.and_then(|r| r.get("source")))),
            captured_at: captured.unwrap_or(stable),
            captured_at_defaulted: captured.is_none(),
            event_id,
        })
    }

    /// Equal results: the same record, or the same error (JSON errors by their message, which
    /// names the position).
    fn same<T: PartialEq + std::fmt::Debug>(
        typed: &Result<T, SchemaError>,
        tree: &Result<T, SchemaError>,
    ) -> bool {
        match (typed, tree) {
            // `Debug` tells -0.0 from 0.0, which `==` on the floats does not.
            (Ok(a), Ok(b)) => a == b && format!("{a:?}") == format!("{b:?}"),
            (Err(a), Err(b)) => Shape::of(a) == Shape::of(b) && a.to_string() == b.to_string(),
            _ => false,
        }
    }

    /// Object keys as written in the body: the decoders' keys (some escaped), and others.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => prop::sample::select(vec![
                "eventId", "payload", "userId", "date", "rMSSD", "rmssd", "lnRMSSD", "lnRmssd",
                "capturedAt", "durationMinutes", "raw", "source", "readinessScore", "qualityScore",
            ])
            .prop_map(str::to_string),
            1 => prop::sample::select(vec![
                r"user\u0049d", r"\u0072MSSD", r"pay\u006coad", r"r\u0061w", "x", "", r"\u00e9", "userid",
                "$serde_json::private::RawValue",
            ])
            .prop_map(str::to_string),
        ]
    }

    /// Scalar values as written in the body, valid JSON or not quite.
    fn scalar() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1",
            "40.5",
            "-3",
            "1e2",
            "1E400",
            "-1e400",
            "2.5e-320",
            "18446744073709551616",
            "-9223372036854775809",
            "100",
            "101",
            "1440",
            "1441",
            "0.0001",
            r#""2025-03-01""#,
            r#""2025-02-30""#,
            r#""2025-3-01""#,
            r#""u""#,
            r#""  ""#,
            r#""""#,
            r#""a\u0000b""#,
            r#""\ud800""#,
            r#""\ud83d\ude00""#,
            r#""caf\u00e9""#,
            r#""oura""#,
            r#"" WHOOP ""#,
            r#""garmin""#,
            r#""2025-03-01T06:00:00Z""#,
            r#""2025-03-01T06:00:00.123456789+02:00""#,
            r#""2030-01-01T00:00:00Z""#,
            r#""2025-03-01 06:00""#,
            r#""id\n1""#,
            r#""\x""#,
            "01",
            "1.",
            "nul",
            r#""é""#,
        ])
        .prop_map(str::to_string)
    }

    /// A JSON-ish text: scalars, arrays and objects with repeated keys, sometimes broken.
    fn text() -> impl Strategy<Value = String> {
        scalar().prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|xs| format!("[{}]", xs.join(","))),
                prop::collection::vec((key(), inner), 0..7).prop_map(|kvs| {
                    let entries: Vec<String> = kvs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", entries.join(","))
                }),
            ]
        })
    }

    /// A core event: a valid one with entries added (repeated keys included), or any text.
    fn body() -> impl Strategy<Value = String> {
        let payload_extra = prop::collection::vec((key(), text()), 0..4);
        let root_extra = prop::collection::vec((key(), text()), 0..3);
        let valid = (payload_extra, root_extra, any::<bool>()).prop_map(|(p, r, before)| {
            let mut payload = vec![
                r#""userId":"u1""#.to_string(),
                r#""date":"2025-03-01""#.to_string(),
                r#""rMSSD":42.5"#.to_string(),
                r#""durationMinutes":420"#.to_string(),
                r#""capturedAt":"2025-03-01T06:00:00Z""#.to_string(),
                r#""raw":{"source":"oura","readinessScore":77,"qualityScore":82.5}"#.to_string(),
            ];
            let extra = p.iter().map(|(k, v)| format!("\"{k}\":{v}"));
            if before {
                payload = extra.chain(payload).collect();
            } else {
                payload.extend(extra);
            }
            let mut root = vec![
                r#""eventId":"e1""#.to_string(),
                format!("\"payload\":{{{}}}", payload.join(",")),
            ];
            root.extend(r.iter().map(|(k, v)| format!("\"{k}\":{v}")));
            format!("{{{}}}", root.join(","))
        });
        prop_oneof![3 => valid, 1 => text()]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// The typed reading accepts and refuses exactly what the `Value` tree did, with the same
        /// record or the same error, on valid, broken, nested and repeated-key bodies, whole or
        /// cut anywhere.
        #[test]
        fn the_typed_reading_agrees_with_the_value_tree(body in body(), cut in 0.0f64..1.0, whole in any::<bool>()) {
            let clock = test_envelope().clock();
            let stable = super::super::to_micros(test_envelope().stable_time);
            let bytes = body.as_bytes();
            let bytes = if whole { bytes } else { &bytes[..((bytes.len() as f64) * cut) as usize] };
            let typed = hrv::decode(bytes, clock);
            let tree = tree_hrv(bytes, clock);
            prop_assert!(same(&typed, &tree), "hrv {}: typed {:?}, tree {:?}", String::from_utf8_lossy(bytes), typed, tree);
            let typed = sleep::decode(bytes, stable, clock);
            let tree = tree_sleep(bytes, stable, clock);
            prop_assert!(same(&typed, &tree), "sleep {}: typed {:?}, tree {:?}", String::from_utf8_lossy(bytes), typed, tree);
        }
    }

    /// The comparison can fail: a different record or a different error is told apart.
    #[test]
    fn differences_are_seen() {
        let clock = test_envelope().clock();
        let a = tree_hrv(br#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":1,"capturedAt":"2025-03-01T00:00:00Z"}}"#, clock);
        let b = tree_hrv(br#"{"payload":{"userId":"u","date":"2025-03-01","rMSSD":2,"capturedAt":"2025-03-01T00:00:00Z"}}"#, clock);
        let c = tree_hrv(br#"{"payload":{"userId":"u"}}"#, clock);
        let d = tree_hrv(br#"{"payload":1}"#, clock);
        assert!(a.is_ok() && same(&a, &a) && !same(&a, &b) && !same(&a, &c) && !same(&c, &d));
    }

    /// Cases the generator may reach rarely, spelled out: a repeated key takes its last value,
    /// `rMSSD: null` hides `rmssd`, escaped keys match, and the parser's checks apply to values
    /// no decoder reads.
    #[test]
    fn edge_cases_agree() {
        let clock = test_envelope().clock();
        let base = r#""userId":"u","date":"2025-03-01","capturedAt":"2025-03-01T00:00:00Z""#;
        for body in [
            format!(r#"{{"payload":{{{base},"rMSSD":1,"rMSSD":2}}}}"#),
            format!(r#"{{"payload":{{{base},"rMSSD":null,"rmssd":2}}}}"#),
            format!(r#"{{"payload":{{{base},"rmssd":2,"\u0072MSSD":3}}}}"#),
            format!(r#"{{"payload":{{{base},"rMSSD":1}},"payload":{{"userId":"v"}}}}"#),
            format!(r#"{{"payload":{{{base},"rMSSD":1,"x":1e400}}}}"#),
            format!(r#"{{"payload":{{{base},"rMSSD":1,"x":["\ud800"]}}}}"#),
            format!(r#"{{"payload":{{{base},"rMSSD":1}}}} x"#),
            format!(r#"{{"payload":{{{base},"rMSSD":1,"raw":{{"source":7,"readinessScore":"9"}}}}}}"#),
            format!(
                r#"{{"payload":{{{base},"rMSSD":1}},"deep":{}1{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
            "[1,2]".to_string(),
            "null".to_string(),
        ] {
            let typed = hrv::decode(body.as_bytes(), clock);
            let tree = tree_hrv(body.as_bytes(), clock);
            assert!(same(&typed, &tree), "{body}: typed {typed:?}, tree {tree:?}");
        }
        // serde_json's depth limit (128) reached in every place the typed reading reads.
        for depth in 122..=128 {
            let (open, close) = ("[".repeat(depth), "]".repeat(depth));
            for body in [
                format!(r#"{{"payload":{{{base},"rMSSD":1,"raw":{{"source":{open}{close}}}}}}}"#),
                format!(r#"{{"payload":{{"userId":{open}{close},"date":"2025-03-01"}}}}"#),
                format!(r#"{{"payload":{open}{close}}}"#),
                format!(r#"{{"payload":{{{base},"rMSSD":1,"raw":{open}{close}}}}}"#),
                format!(r#"{{"eventId":{open}{close}}}"#),
            ] {
                let typed = hrv::decode(body.as_bytes(), clock);
                let tree = tree_hrv(body.as_bytes(), clock);
                assert!(
                    same(&typed, &tree),
                    "depth {depth}: typed {typed:?}, tree {tree:?}"
                );
            }
        }
        let invalid_utf8 = [br#"{"payload":{"x":""#.as_slice(), &[0xff, 0xfe], br#""}}"#].concat();
        let typed = hrv::decode(&invalid_utf8, clock);
        assert!(same(&typed, &tree_hrv(&invalid_utf8, clock)), "{typed:?}");
        assert!(typed.is_err());
    }

    /// serde_json's private `$serde_json::private::RawValue` key (special to `Value`'s own
    /// reading with the `raw_value` feature, which sqlx switches on) is an unknown key like any
    /// other, in the typed reading and in the tree (`tree.rs`): the same result as any other
    /// name in its place.
    #[test]
    fn the_raw_value_key_is_an_ordinary_key() {
        let clock = test_envelope().clock();
        let key = "$serde_json::private::RawValue";
        let base = r#""userId":"u","date":"2025-03-01","capturedAt":"2025-03-01T00:00:00Z","rMSSD":1"#;
        for body in [
            format!(r#"{{"{key}":"[1]","payload":{{{base}}}}}"#),
            format!(r#"{{"payload":{{"{key}":"{{}}",{base}}}}}"#),
            format!(r#"{{"payload":{{{base},"x":{{"{key}":"?"}}}}}}"#),
        ] {
            let typed = hrv::decode(body.as_bytes(), clock);
            let renamed = hrv::decode(body.replace(key, "x").as_bytes(), clock);
            let tree = tree_hrv(body.as_bytes(), clock);
            assert!(
                typed.is_ok() && same(&typed, &tree) && same(&typed, &renamed),
                "{body}: typed {typed:?}, tree {tree:?}"
            );
        }
    }
}
