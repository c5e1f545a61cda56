//! A `serde_json::Value` read from a message's bytes, for the bodies that are kept whole (Oura
//! webhooks) and for showing dead letters.
//!
//! `serde_json::from_slice::<Value>` cannot be used on message content. sqlx switches on
//! serde_json's `raw_value` feature for the whole build, and with it `Value`'s own
//! `Deserialize` reads an object whose first key is `$serde_json::private::RawValue` as the JSON
//! text held in that key's string value. That text is parsed by a new parser with its own depth
//! limit, so a body of less than 1 MiB can nest tens of thousands of levels, by escaping each
//! level into a string of the level above. Parsing, serializing or dropping such a tree overflows
//! the stack and aborts the daemon on every redelivery. It also means the stored body is not the
//! one received.
//!
//! Here the tree is built by a visitor of our own: every key is an ordinary key, serde_json's
//! depth limit (128) holds for the whole body, and a key given twice takes its last value, as
//! `Value` does.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `body` as one JSON value (trailing whitespace only), as `serde_json::from_slice` does,
/// without its private keys.
pub fn parse_json(body: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Tree>(body).map(|t| t.0)
}

struct Tree(Value);

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any valid JSON value")
            }
            fn visit_unit<E>(self) -> Result<Tree, E> {
                Ok(Tree(Value::Null))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Tree, E> {
                Ok(Tree(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
                Ok(Tree(Value::Number(v.into())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Tree, E> {
                Ok(Tree(Value::Number(v.into())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Tree, E> {
                // As `Value` does: a non-finite float (which the parser never yields) is null.
                Ok(Tree(Number::from_f64(v).map_or(Value::Null, Value::Number)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
                Ok(Tree(Value::String(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Tree, E> {
                Ok(Tree(Value::String(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(Tree(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Tree(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
                let mut entries = Map::new();
                while let Some((key, Tree(v))) = map.next_entry::<String, Tree>()? {
                    entries.insert(key, v);
                }
                Ok(Tree(Value::Object(entries)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of value, escapes, repeated keys and errors: the same as `Value`'s own reading
    /// wherever no private key is involved.
    #[test]
    fn it_reads_what_value_reads() {
        for body in [
            r#"{"a":1,"b":[true,false,null,-3,1.5e3,18446744073709551615,-9223372036854775808],"a":"x\u00e9\n"}"#,
            r#"[1,{"k":{"l":[]}}]"#,
            r#""s""#,
            "12",
            "-0",
            "1e400",
            r#"{"a":1} x"#,
            r#"{"a":"\ud800"}"#,
            "",
            "[",
        ] {
            let ours = parse_json(body.as_bytes());
            let theirs = serde_json::from_slice::<Value>(body.as_bytes());
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{body}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{body}"),
                _ => panic!("{body}: ours {ours:?}, Value's {theirs:?}"),
            }
        }
    }

    /// The private key is an ordinary key, and the depth limit holds for the whole body: the
    /// nesting that overflowed the stack through `Value` is refused as too deep.
    #[test]
    fn the_private_raw_value_key_is_an_ordinary_key() {
        let key = "$serde_json::private::RawValue";
        let body = format!(r#"{{"{key}":"[1]","b":2}}"#);
        let v = parse_json(body.as_bytes()).unwrap();
        assert_eq!(v[key], Value::String("[1]".into()));
        assert_eq!(v["b"], 2);
        // Through `Value` an object of that key alone is the array `[1]`: the quirk this module
        // avoids.
        let alone = format!(r#"{{"{key}":"[1]"}}"#);
        assert_eq!(
            serde_json::from_slice::<Value>(alone.as_bytes()).unwrap(),
            serde_json::json!([1])
        );
        assert_eq!(parse_json(alone.as_bytes()).unwrap()[key], "[1]");

        // 300 levels of 120 arrays each, every level escaped into a string of the one above.
        let enc = |s: &str| format!("\"{}\"", s.replace('\\', "\\u005c").replace('"', "\\u0022"));
        let mut inner = "1".to_string();
        for _ in 0..300 {
            inner = format!(
                "{}{{\"{key}\":{}}}{}",
                "[".repeat(120),
                enc(&inner),
                "]".repeat(120)
            );
        }
        let body = format!(r#"{{"user_id":"u","x":{inner}}}"#);
        assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
        // A stack as small as a tokio worker's: the tree is 122 levels deep at most.
        let parsed = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || parse_json(body.as_bytes()).map(|v| v.to_string().len()))
            .unwrap()
            .join()
            .unwrap();
        assert!(parsed.is_ok(), "{parsed:?}");
        let too_deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let e = parse_json(too_deep.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("recursion limit"), "{e}");
    }
}
