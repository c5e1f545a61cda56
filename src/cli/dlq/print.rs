//! The answers of the `dlq` commands, as text or one JSON document, printed through
//! [`crate::cli::output`] (so `dlq list | head` ends quietly).

use std::collections::BTreeMap;

use async_nats::header::HeaderMap;
use serde_json::{json, Value};

use super::letters::{rfc3339, DeadLetter, ItemResult, Summary};
use crate::cli::output::{self, outln, Text};

fn one_line(s: &str, max: usize) -> String {
    let flat = crate::dlq::header_safe(s, usize::MAX);
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

pub(super) fn list(stream: &str, letters: &[DeadLetter], total: usize, json: bool) {
    if json {
        let items: Vec<Summary<'_>> = letters.iter().map(DeadLetter::summary).collect();
        output::print_json(
            &json!({"schemaVersion": output::SCHEMA_VERSION, "stream": stream, "count": items.len(), "total": total, "deadLetters": items}),
        );
        return;
    }
    output::print(&list_text(stream, letters, total));
}

/// One aligned row per dead letter, long fields cut with `…`, and a footer when not all shown.
pub(super) fn list_text(stream: &str, letters: &[DeadLetter], total: usize) -> Text {
    let mut t = Text::default();
    if letters.is_empty() {
        outln!(t, "no dead letters in {stream} match");
        return t;
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            let s = l.summary();
            let origin = format!(
                "{} {}:{}",
                s.original_subject.unwrap_or("?"),
                s.original_stream.unwrap_or("?"),
                s.original_sequence
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into())
            );
            vec![
                s.sequence.to_string(),
                s.time,
                s.consumer.to_string(),
                one_line(s.reason, 16),
                one_line(&origin, 48),
                s.delivery_count
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into()),
                one_line(s.error.unwrap_or(""), 60),
            ]
        })
        .collect();
    let headers = [
        "SEQ",
        "TIME",
        "CONSUMER",
        "REASON",
        "ORIGINAL (subject stream:seq)",
        "DELIV",
        "ERROR",
    ];
    let right = [true, false, false, false, false, true, false];
    for l in output::table(&headers, &right, &rows) {
        outln!(t, "{l}");
    }
    if letters.len() < total {
        outln!(
            t,
            "showing {} of {total} dead letters (--limit 0 shows all; `dlq show SEQ` the whole error)",
            letters.len()
        );
    }
    t
}

/// The body for display: parsed JSON when it is JSON, else text, else hex.
pub(super) fn body_view(payload: &[u8]) -> (&'static str, Value) {
    // Not `serde_json::from_slice`: a dead letter is message content (`pipeline::parse_json`).
    if let Ok(v) = crate::pipeline::parse_json(payload) {
        return ("json", v);
    }
    match std::str::from_utf8(payload) {
        Ok(s) => ("text", Value::String(s.to_string())),
        Err(_) => {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut hex = String::with_capacity(payload.len() * 2);
            for b in payload.iter() {
                hex.push(char::from(DIGITS[usize::from(b >> 4)]));
                hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
            }
            ("hex", Value::String(hex))
        }
    }
}

fn headers_json(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    h.iter()
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.as_str().to_string()).collect()))
        .collect()
}

pub(super) fn show(l: &DeadLetter, json: bool) {
    let (encoding, body) = body_view(&l.payload);
    if json {
        output::print_json(&json!({"schemaVersion": output::SCHEMA_VERSION,
            "summary": l.summary(),
            "headers": headers_json(&l.headers),
            "bodyEncoding": encoding,
            "body": body,
        }));
        return;
    }
    let mut t = Text::default();
    outln!(t, "Sequence: {}", l.seq);
    outln!(t, "Stored:   {}", rfc3339(l.time));
    outln!(t, "Subject:  {}", l.subject);
    outln!(t, "Consumer: {}", l.consumer_str());
    match l.body_omitted() {
        Some(n) => outln!(
            t,
            "Size:     {} bytes (stored without its body of {n} bytes, too large with the dead-letter headers; replay takes it from {} at {} while that stream keeps it)",
            l.payload.len(),
            l.header("Dlq-Original-Stream").unwrap_or("?"),
            l.header("Dlq-Original-Sequence").unwrap_or("?")
        ),
        None => outln!(t, "Size:     {} bytes", l.payload.len()),
    }
    outln!(t);
    for (name, values) in headers_json(&l.headers) {
        for v in values {
            outln!(t, "{name}: {v}");
        }
    }
    outln!(t);
    match (encoding, body) {
        ("json", v) => outln!(t, "{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        ("text", Value::String(s)) => outln!(t, "{s}"),
        (_, Value::String(hex)) => outln!(t, "(not UTF-8; hex) {hex}"),
        (_, v) => outln!(t, "{v}"),
    }
    output::print(&t);
}

pub(super) fn stats(stream: &str, letters: &[DeadLetter], json: bool) {
    let mut by: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for l in letters {
        *by.entry(l.consumer_str())
            .or_default()
            .entry(l.reason())
            .or_default() += 1;
    }
    let first = letters.first().map(|l| rfc3339(l.time));
    let last = letters.last().map(|l| rfc3339(l.time));
    if json {
        output::print_json(
            &json!({"schemaVersion": output::SCHEMA_VERSION, "stream": stream, "total": letters.len(), "byConsumer": by, "oldest": first, "newest": last}),
        );
        return;
    }
    let mut t = Text::default();
    outln!(t, "{} dead letters in {stream}", letters.len());
    if let (Some(f), Some(l)) = (first, last) {
        outln!(t, "oldest {f}, newest {l}");
    }
    for (consumer, reasons) in &by {
        for (reason, n) in reasons {
            outln!(t, "{consumer:<8} {reason:<16} {n:>8}");
        }
    }
    output::print(&t);
}

pub(super) fn results(action: &str, stream: &str, results: &[ItemResult], json: bool) {
    if json {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for r in results {
            *counts.entry(r.result).or_default() += 1;
        }
        output::print_json(
            &json!({"schemaVersion": output::SCHEMA_VERSION, "stream": stream, "action": action, "counts": counts, "results": results}),
        );
        return;
    }
    output::print(&results_text(action, stream, results));
}

/// The count line that ends `replay` and `purge`: "replayed 3, failed 0, skipped 0".
pub(super) fn summary_line(action: &str, results: &[ItemResult]) -> String {
    let n = |names: &[&str]| results.iter().filter(|r| names.contains(&r.result)).count();
    let failed = n(&["failed"]);
    let skipped = n(&["not-found"]);
    let lost = match n(&["not-attempted"]) {
        0 => String::new(),
        k => format!(", not attempted {k} (the NATS connection was lost)"),
    };
    let line = match action {
        "replay" if n(&["would-replay"]) > 0 => format!(
            "would replay {} (dry run: nothing replayed), skipped {skipped}",
            n(&["would-replay"])
        ),
        "replay" => format!(
            "replayed {} ({} already replayed before: duplicate), failed {failed}, skipped {skipped}",
            n(&["replayed", "duplicate"]),
            n(&["duplicate"])
        ),
        _ if n(&["would-purge"]) > 0 => format!(
            "would purge {} (nothing removed without --yes), skipped {skipped}",
            n(&["would-purge"])
        ),
        _ => format!("purged {}, failed {failed}, skipped {skipped}", n(&["purged"])),
    };
    line + &lost
}

fn results_text(action: &str, stream: &str, results: &[ItemResult]) -> Text {
    let mut t = Text::default();
    if results.is_empty() {
        outln!(t, "no dead letters in {stream} match: nothing to {action}");
        return t;
    }
    for r in results {
        let mut line = format!("{:>8}  {:<12}", r.dlq_sequence, r.result);
        if let Some(s) = &r.original_subject {
            line.push_str("  ");
            line.push_str(s);
        }
        if let Some(to) = &r.replayed_to {
            line.push_str(&format!("  -> {}:{}", to.stream, to.sequence));
        }
        if r.purged && action == "replay" {
            line.push_str("  (dead letter purged)");
        }
        if let Some(e) = &r.error {
            line.push_str("  error: ");
            line.push_str(&one_line(e, 200));
        }
        outln!(t, "{line}");
    }
    outln!(t, "{}", summary_line(action, results));
    t
}
