//! Dead letters: publishing them with JetStream and awaiting the PubAck.
//!
//! A dead letter carries the original body byte for byte and the original headers, plus the
//! `Dlq-*` headers that say why and where from. Its `Nats-Msg-Id` is derived from the original
//! stream position, so a retried dead-letter publish is deduplicated by the DLQ stream.

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, context::PublishError, message::PublishMessage};
use chrono::{SecondsFormat, Utc};

/// Why a message was dead-lettered; the last token of the dead-letter subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    SchemaInvalid,
    NonRetryable,
    MaxDeliver,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SchemaInvalid => "schema-invalid",
            Reason::NonRetryable => "non-retryable",
            Reason::MaxDeliver => "max-deliver",
        }
    }
}

/// Where the original came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub subject: &'a str,
    pub stream: &'a str,
    pub seq: u64,
    pub durable: &'a str,
    pub delivered: i64,
}

/// Headers a dead letter must not inherit: publish expectations meant for the original stream
/// would make the DLQ stream refuse it.
fn inheritable(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.starts_with("nats-expected-")
        || lower == "nats-rollup"
        || lower == "nats-ttl"
        || lower == "nats-msg-id")
}

/// Header values are single-line; the error text is capped at 1 KiB on a char boundary.
pub fn header_safe(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.len() <= max {
        return flat;
    }
    let mut end = max;
    while !flat.is_char_boundary(end) {
        end -= 1;
    }
    flat[..end].to_string()
}

pub fn dead_letter_headers(
    original: Option<&HeaderMap>,
    origin: &Origin<'_>,
    reason: Reason,
    error: &str,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(orig) = original {
        for (name, values) in orig.iter() {
            if !inheritable(name.as_ref()) {
                continue;
            }
            for v in values {
                headers.append(name.clone(), v.clone());
            }
        }
        if let Some(id) = orig.get("Nats-Msg-Id") {
            headers.insert("Dlq-Original-Msg-Id", id.as_str());
        }
    }
    // Sequence 0: the original had no stream position (no JetStream metadata); no id could
    // tell two such letters apart, so none is set rather than one that would drop the second.
    if origin.seq != 0 {
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq:{}:{}", origin.stream, origin.seq).as_str(),
        );
    }
    headers.insert("Dlq-Reason", reason.as_str());
    headers.insert("Dlq-Error", header_safe(error, 1024).as_str());
    headers.insert("Dlq-Original-Subject", origin.subject);
    headers.insert("Dlq-Original-Stream", origin.stream);
    headers.insert("Dlq-Original-Sequence", origin.seq.to_string().as_str());
    headers.insert("Dlq-Durable", origin.durable);
    headers.insert("Dlq-Delivery-Count", origin.delivered.to_string().as_str());
    headers.insert(
        "Dlq-Failed-At",
        Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true).as_str(),
    );
    headers
}

/// Publishes the dead letter and waits for JetStream to confirm it is stored.
pub async fn publish(
    js: &jetstream::Context,
    prefix: &str,
    original: &async_nats::Message,
    origin: &Origin<'_>,
    reason: Reason,
    error: &str,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let headers = dead_letter_headers(original.headers.as_ref(), origin, reason, error);
    let subject = format!("{prefix}.{}", reason.as_str());
    let ack = js
        .send_publish(
            subject,
            PublishMessage::build()
                .payload(original.payload.clone())
                .headers(headers),
        )
        .await?;
    ack.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_origin_and_drop_expectations() {
        let mut orig = HeaderMap::new();
        orig.insert("Nats-Msg-Id", "abc");
        orig.insert("Nats-Expected-Stream", "X");
        orig.insert("Trace-Id", "t1");
        let origin = Origin {
            subject: "athlete-ally.hrv.raw-received",
            stream: "AA_CORE_HOT",
            seq: 42,
            durable: "d",
            delivered: 3,
        };
        let h = dead_letter_headers(Some(&orig), &origin, Reason::MaxDeliver, "line1\nline2");
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "dlq:AA_CORE_HOT:42");
        assert_eq!(h.get("Dlq-Original-Msg-Id").unwrap().as_str(), "abc");
        assert!(h.get("Nats-Expected-Stream").is_none());
        assert_eq!(h.get("Trace-Id").unwrap().as_str(), "t1");
        assert_eq!(h.get("Dlq-Reason").unwrap().as_str(), "max-deliver");
        assert_eq!(h.get("Dlq-Error").unwrap().as_str(), "line1 line2");
        assert_eq!(h.get("Dlq-Original-Sequence").unwrap().as_str(), "42");
        assert_eq!(h.get("Dlq-Delivery-Count").unwrap().as_str(), "3");
        assert!(h.get("Dlq-Failed-At").is_some());
    }

    #[test]
    fn error_is_capped_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let capped = header_safe(&long, 1024);
        assert!(capped.len() <= 1024);
        assert!(capped.chars().all(|c| c == 'é'));
    }
}
