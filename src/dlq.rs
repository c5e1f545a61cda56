//! Dead letters: publishing them with JetStream and awaiting the PubAck.
//!
//! A dead letter carries the original body byte for byte and the original headers, plus the
//! `Dlq-*` headers that say why and where from. Its `Nats-Msg-Id` is derived from the original
//! stream position, so a retried dead-letter publish is deduplicated by the DLQ stream.
//!
//! It also owns an event's origin across dead-letter/replay rounds ([`event_origin`],
//! [`idempotency_msg_id`]): a dead letter carries the original's time and identity
//! (`Dlq-Original-Timestamp`, `Dlq-Original-Msg-Id`), a replay carries the first origin
//! (`Replay-Original-*`, set by [`replay_headers`] when `dlq replay` publishes it), and the
//! consumer reads them back here, so an event keeps its time, position and identity however many
//! rounds it goes through (docs/CONTRACT.md).

use async_nats::header::HeaderMap;
use async_nats::jetstream::{
    self,
    context::{PublishError, PublishErrorKind},
    message::PublishMessage,
};
use chrono::{DateTime, SecondsFormat, Utc};

/// Set on every replayed message by `dlq replay`: its value is `<dlq stream>:<dlq seq>`.
pub const REPLAYED_FROM: &str = "Dlq-Replayed-From";
pub const REPLAY_ORIGINAL_MSG_ID: &str = "Replay-Original-Msg-Id";
pub const REPLAY_ORIGINAL_STREAM: &str = "Replay-Original-Stream";
pub const REPLAY_ORIGINAL_SEQUENCE: &str = "Replay-Original-Sequence";
pub const REPLAY_ORIGINAL_TIMESTAMP: &str = "Replay-Original-Timestamp";

/// Where and when an event was first stored, and its identity: the same for the first delivery,
/// every redelivery, and every replay of its dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOrigin {
    pub stream: String,
    pub seq: u64,
    /// The JetStream timestamp of the first publish.
    pub time: DateTime<Utc>,
    /// The publisher's `Nats-Msg-Id`, if it set one.
    pub msg_id: Option<String>,
}

/// The origin of a received message: for a replay (`Dlq-Replayed-From` present) the
/// `Replay-Original-*` headers, each falling back to the message's own value when absent or
/// unparseable (a replay made before those headers existed); otherwise the message's own
/// stream, sequence, JetStream timestamp and `Nats-Msg-Id`.
pub fn event_origin(
    headers: Option<&HeaderMap>,
    stream: &str,
    seq: u64,
    published: DateTime<Utc>,
) -> EventOrigin {
    let own = EventOrigin {
        stream: stream.to_string(),
        seq,
        time: published,
        msg_id: idempotency_msg_id(headers).map(str::to_string),
    };
    let Some(h) = headers.filter(|h| h.get(REPLAYED_FROM).is_some()) else {
        return own;
    };
    let get = |name: &str| h.get(name).map(|v| v.as_str().trim()).filter(|v| !v.is_empty());
    // A position is a stream and a sequence together: half of one would mix two positions.
    let position = get(REPLAY_ORIGINAL_STREAM).zip(
        get(REPLAY_ORIGINAL_SEQUENCE)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&n| n != 0),
    );
    let (stream, seq) = position.map_or((own.stream, own.seq), |(s, n)| (s.to_string(), n));
    EventOrigin {
        stream,
        seq,
        time: get(REPLAY_ORIGINAL_TIMESTAMP)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(own.time, |t| t.with_timezone(&Utc)),
        msg_id: own.msg_id,
    }
}

/// The message id a consumer should use as the event's identity (an idempotency key): a
/// replay's own `Nats-Msg-Id` (`replay:<dlq stream>:<seq>`) is only for JetStream's duplicate
/// window, so for a replay it is the first publisher's id (absent when the original had none, so
/// body-derived keys come out the same too).
pub fn idempotency_msg_id(headers: Option<&HeaderMap>) -> Option<&str> {
    let h = headers?;
    let name = if h.get(REPLAYED_FROM).is_some() {
        REPLAY_ORIGINAL_MSG_ID
    } else {
        "Nats-Msg-Id"
    };
    h.get(name).map(|v| v.as_str())
}

/// Headers a replay must not carry: the dead letter's own identity and bookkeeping, and publish
/// expectations that were meant for the first publish.
fn replay_drops(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "nats-msg-id" || lower.starts_with("dlq-") || lower.starts_with("nats-expected-")
}

/// The message a replay publishes: the original headers, a deduplicating id derived from the
/// dead letter, where it came from, and the event's first origin (`Replay-Original-Msg-Id`,
/// `-Stream`, `-Sequence`, `-Timestamp`), which the consumer uses as the event's identity, position
/// and default time ([`event_origin`]). Each is the letter's inherited `Replay-Original-*` header
/// when it has one (the letter of a replay inherits the replay's headers), else its
/// `Dlq-Original-*` one, so the first origin survives any number of dead-letter/replay rounds.
pub fn replay_headers(dead: &HeaderMap, dlq_stream: &str, dlq_seq: u64) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in dead.iter() {
        if replay_drops(name.as_ref()) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    let header = |name: &str| {
        dead.get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    // The letter of a replay: its `Dlq-Original-Msg-Id` may be the replay's own id (letters
    // written before dead letters kept the event's identity), never the event's.
    let of_a_replay = dead.get(REPLAYED_FROM).is_some();
    let msg_id = header(REPLAY_ORIGINAL_MSG_ID).or_else(|| {
        if of_a_replay {
            None
        } else {
            header("Dlq-Original-Msg-Id")
        }
    });
    if let Some(id) = msg_id {
        out.insert(REPLAY_ORIGINAL_MSG_ID, id);
    }
    for (replay_name, dlq_name) in [
        (REPLAY_ORIGINAL_STREAM, "Dlq-Original-Stream"),
        (REPLAY_ORIGINAL_SEQUENCE, "Dlq-Original-Sequence"),
        (REPLAY_ORIGINAL_TIMESTAMP, "Dlq-Original-Timestamp"),
    ] {
        if let Some(v) = header(replay_name).or_else(|| header(dlq_name)) {
            out.insert(replay_name, v);
        }
    }
    out.insert("Nats-Msg-Id", format!("replay:{dlq_stream}:{dlq_seq}").as_str());
    out.insert(REPLAYED_FROM, format!("{dlq_stream}:{dlq_seq}").as_str());
    out
}

/// A JetStream message's timestamp (the time the stream stored the publish) as a chrono time.
pub fn published_at(info: &jetstream::message::Info<'_>) -> DateTime<Utc> {
    let t = info.published;
    DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond()).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// RFC 3339 in UTC with all nine fraction digits: a time header that parses back exactly.
pub fn precise_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Why a message was dead-lettered; the last token of the dead-letter subject (and the value
/// the CLI's `--reason` takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reason {
    SchemaInvalid,
    NonRetryable,
    MaxDeliver,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::SchemaInvalid, Reason::NonRetryable, Reason::MaxDeliver];

    /// The reason a dead-letter subject ends with, if it ends with one.
    pub fn of_subject(subject: &str) -> Option<Reason> {
        let last = subject.rsplit('.').next()?;
        Reason::ALL.into_iter().find(|r| r.as_str() == last)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SchemaInvalid => "schema-invalid",
            Reason::NonRetryable => "non-retryable",
            Reason::MaxDeliver => "max-deliver",
        }
    }
}

/// Dead letters per reason label (`schema-invalid`, `non-retryable`, `max-deliver`, `other`)
/// from a stream's per-subject counts; every label present, 0 when none.
pub fn depth_by_reason<'a>(
    subjects: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut depth: std::collections::BTreeMap<&'static str, u64> = Reason::ALL
        .into_iter()
        .map(|r| (r.as_str(), 0))
        .chain([("other", 0)])
        .collect();
    for (subject, count) in subjects {
        let label = Reason::of_subject(subject).map_or("other", Reason::as_str);
        *depth.entry(label).or_default() += count;
    }
    depth
}

/// Where the original came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub subject: &'a str,
    pub stream: &'a str,
    pub seq: u64,
    pub durable: &'a str,
    pub delivered: i64,
    /// The original's JetStream timestamp (`Dlq-Original-Timestamp`); `None` when it had no
    /// JetStream metadata.
    pub published: Option<DateTime<Utc>>,
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
        // The event's identity, not the replay's own id: a second-generation replay must keep
        // the first publisher's id (a webhook's idempotency key).
        if let Some(id) = idempotency_msg_id(Some(orig)) {
            headers.insert("Dlq-Original-Msg-Id", id);
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
    if let Some(t) = origin.published {
        headers.insert("Dlq-Original-Timestamp", precise_time(t).as_str());
    }
    headers.insert("Dlq-Durable", origin.durable);
    headers.insert("Dlq-Delivery-Count", origin.delivered.to_string().as_str());
    headers.insert(
        "Dlq-Failed-At",
        Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true).as_str(),
    );
    headers
}

/// Set on a dead letter stored without its body because the letter would not fit the
/// server's `max_payload` (or the DLQ stream's `max_msg_size`): the body's length in bytes.
/// The body stays in `Dlq-Original-Stream` at `Dlq-Original-Sequence` while that stream keeps
/// it (its `max_age`), and `dlq replay` takes it from there.
pub const BODY_OMITTED: &str = "Dlq-Body-Omitted";

/// `Dlq-Error`'s length when the whole error would not let the letter fit.
const SHORT_ERROR: usize = 128;

/// The size of a message with these headers and a body of `body` bytes, as the client and the
/// server count it against `max_payload` (header block as serialized, plus the body).
fn wire_size(headers: &HeaderMap, body: usize) -> usize {
    let block: usize = headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + block + 2 + body
}

/// How a dead letter was made to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// As built: the whole error and the body.
    Whole,
    /// `Dlq-Error` cut to 128 bytes; the body kept.
    ErrorCut,
    /// Without the body ([`BODY_OMITTED`]).
    BodyOmitted,
}

/// Makes the letter fit `max_payload` (0: unknown, nothing changed): first the error text is
/// cut, and only if that is not enough the body is left out, so a letter that cannot be stored
/// never holds its message back for ever. The body is returned (empty when left out).
pub fn fit_letter(headers: &mut HeaderMap, body: &bytes::Bytes, max_payload: usize) -> (bytes::Bytes, Fit) {
    if max_payload == 0 || wire_size(headers, body.len()) <= max_payload {
        return (body.clone(), Fit::Whole);
    }
    if let Some(e) = headers.get("Dlq-Error").map(|v| v.as_str().to_string()) {
        headers.insert("Dlq-Error", header_safe(&e, SHORT_ERROR).as_str());
        if wire_size(headers, body.len()) <= max_payload {
            return (body.clone(), Fit::ErrorCut);
        }
    }
    omit_body(headers, body.len());
    (bytes::Bytes::new(), Fit::BodyOmitted)
}

fn omit_body(headers: &mut HeaderMap, len: usize) {
    headers.insert(BODY_OMITTED, len.to_string().as_str());
}

/// Whether a refused publish says the message is too large: the client's `max_payload` check,
/// or the stream's `max_msg_size` (JetStream error 10054).
fn too_large(e: &PublishError) -> bool {
    use std::error::Error as _;
    e.kind() == PublishErrorKind::MaxPayloadExceeded
        || e.source()
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// Publishes the dead letter and waits for JetStream to confirm it is stored. A letter that
/// would not fit the server's `max_payload` is made to fit ([`fit_letter`]); one the client or
/// the DLQ stream still refuses as too large is sent once more without its body.
pub async fn publish(
    js: &jetstream::Context,
    prefix: &str,
    original: &async_nats::Message,
    origin: &Origin<'_>,
    reason: Reason,
    error: &str,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let mut headers = dead_letter_headers(original.headers.as_ref(), origin, reason, error);
    let subject = format!("{prefix}.{}", reason.as_str());
    let max_payload = js.client().server_info().max_payload;
    let (body, fit) = fit_letter(&mut headers, &original.payload, max_payload);
    let send = |headers: HeaderMap, body: bytes::Bytes| {
        let subject = subject.clone();
        async move {
            js.send_publish(subject, PublishMessage::build().payload(body).headers(headers))
                .await?
                .await
        }
    };
    let result = match send(headers.clone(), body).await {
        Err(e) if fit != Fit::BodyOmitted && too_large(&e) => {
            omit_body(&mut headers, original.payload.len());
            send(headers, bytes::Bytes::new())
                .await
                .map(|ack| (ack, Fit::BodyOmitted))
        }
        r => r.map(|ack| (ack, fit)),
    };
    let (ack, fit) = result?;
    if fit == Fit::BodyOmitted {
        tracing::warn!(
            stream = %origin.stream, seq = origin.seq, bytes = original.payload.len(),
            max_payload, dlq_seq = ack.sequence,
            "dead letter stored without its body: with its headers it exceeds the server's max_payload (or the DLQ stream's max_msg_size); the body stays in the original stream at this sequence until its max_age, and `dlq replay` takes it from there"
        );
    }
    Ok(ack)
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
            published: DateTime::from_timestamp(1_740_800_000, 123_456_789),
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
        assert_eq!(
            h.get("Dlq-Original-Timestamp").unwrap().as_str(),
            "2025-03-01T03:33:20.123456789Z"
        );
    }

    #[test]
    fn a_letter_too_large_for_max_payload_loses_its_long_error_first_then_its_body() {
        let mut one = HeaderMap::new();
        one.insert("A", "b");
        assert_eq!(wire_size(&one, 5), "NATS/1.0\r\nA: b\r\n\r\n".len() + 5);

        let origin = Origin {
            subject: "athlete-ally.hrv.raw-received",
            stream: "AA_CORE_HOT",
            seq: 42,
            durable: "d",
            delivered: 1,
            published: None,
        };
        let letter = || dead_letter_headers(None, &origin, Reason::SchemaInvalid, &"e".repeat(2000));
        let body = bytes::Bytes::from(vec![b'x'; 500]);
        let whole = wire_size(&letter(), body.len());

        for max in [0, whole, whole + 1] {
            let mut h = letter();
            let (b, fit) = fit_letter(&mut h, &body, max);
            assert_eq!((fit, b.len()), (Fit::Whole, 500), "max_payload {max}");
            assert_eq!(h.get("Dlq-Error").unwrap().as_str().len(), 1024);
            assert!(h.get(BODY_OMITTED).is_none());
        }

        let mut h = letter();
        let (b, fit) = fit_letter(&mut h, &body, whole - 1);
        assert_eq!((fit, b.len()), (Fit::ErrorCut, 500));
        assert_eq!(h.get("Dlq-Error").unwrap().as_str().len(), SHORT_ERROR);
        assert!(wire_size(&h, b.len()) < whole - 1);

        let mut h = letter();
        let cut = whole - 1024 + SHORT_ERROR;
        let (b, fit) = fit_letter(&mut h, &body, cut - 1);
        assert_eq!((fit, b.len()), (Fit::BodyOmitted, 0));
        assert_eq!(h.get(BODY_OMITTED).unwrap().as_str(), "500");
        assert!(wire_size(&h, 0) < cut);
        // What tells the letter's origin stays.
        assert_eq!(h.get("Dlq-Original-Sequence").unwrap().as_str(), "42");
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "dlq:AA_CORE_HOT:42");
    }

    #[test]
    fn a_replays_dead_letter_keeps_the_events_identity() {
        let replay = {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", "replay:AA_DLQ:5");
            h.insert(REPLAYED_FROM, "AA_DLQ:5");
            h.insert(REPLAY_ORIGINAL_MSG_ID, "hook-1");
            h
        };
        let origin = Origin {
            subject: "vendor.oura.webhook.received",
            stream: "AA_VENDOR_HOT",
            seq: 9,
            durable: "d",
            delivered: 1,
            published: None,
        };
        let h = dead_letter_headers(Some(&replay), &origin, Reason::NonRetryable, "e");
        assert_eq!(h.get("Dlq-Original-Msg-Id").unwrap().as_str(), "hook-1");
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "dlq:AA_VENDOR_HOT:9");
        assert!(h.get("Dlq-Original-Timestamp").is_none());
        // Inherited, so the next replay can take the first origin from them.
        assert_eq!(h.get(REPLAY_ORIGINAL_MSG_ID).unwrap().as_str(), "hook-1");
        // A replay of an event without an id has no identity: never the replay's own id.
        let mut anonymous = HeaderMap::new();
        anonymous.insert("Nats-Msg-Id", "replay:AA_DLQ:5");
        anonymous.insert(REPLAYED_FROM, "AA_DLQ:5");
        let h = dead_letter_headers(Some(&anonymous), &origin, Reason::NonRetryable, "e");
        assert!(h.get("Dlq-Original-Msg-Id").is_none());
    }

    #[test]
    fn event_origin_of_first_deliveries_and_replays() {
        let own_time = DateTime::from_timestamp(1_750_000_000, 0).unwrap();
        let first_time = DateTime::from_timestamp(1_740_000_000, 987_654_321).unwrap();
        assert_eq!(
            event_origin(None, "AA_CORE_HOT", 3, own_time),
            EventOrigin {
                stream: "AA_CORE_HOT".into(),
                seq: 3,
                time: own_time,
                msg_id: None
            }
        );
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "ingest-1");
        assert_eq!(
            event_origin(Some(&h), "AA_CORE_HOT", 3, own_time)
                .msg_id
                .as_deref(),
            Some("ingest-1")
        );
        // Replay-Original-* headers without Dlq-Replayed-From are not trusted.
        h.insert(REPLAY_ORIGINAL_STREAM, "AA_LEGACY");
        assert_eq!(
            event_origin(Some(&h), "AA_CORE_HOT", 3, own_time).stream,
            "AA_CORE_HOT"
        );

        let mut r = HeaderMap::new();
        r.insert("Nats-Msg-Id", "replay:AA_DLQ:7");
        r.insert(REPLAYED_FROM, "AA_DLQ:7");
        r.insert(REPLAY_ORIGINAL_MSG_ID, "ingest-1");
        r.insert(REPLAY_ORIGINAL_STREAM, "AA_LEGACY");
        r.insert(REPLAY_ORIGINAL_SEQUENCE, "41");
        r.insert(REPLAY_ORIGINAL_TIMESTAMP, precise_time(first_time).as_str());
        assert_eq!(
            event_origin(Some(&r), "AA_CORE_HOT", 90, own_time),
            EventOrigin {
                stream: "AA_LEGACY".into(),
                seq: 41,
                time: first_time,
                msg_id: Some("ingest-1".into())
            }
        );
        // Unparseable or absent values are the message's own; a position is a stream and a
        // sequence together, never half of the first origin and half of the replay.
        let mut r = HeaderMap::new();
        r.insert(REPLAYED_FROM, "AA_DLQ:7");
        r.insert(REPLAY_ORIGINAL_STREAM, "AA_LEGACY");
        r.insert(REPLAY_ORIGINAL_SEQUENCE, "x");
        r.insert(REPLAY_ORIGINAL_TIMESTAMP, "yesterday");
        assert_eq!(
            event_origin(Some(&r), "AA_CORE_HOT", 90, own_time),
            EventOrigin {
                stream: "AA_CORE_HOT".into(),
                seq: 90,
                time: own_time,
                msg_id: None
            }
        );
        r.insert(REPLAY_ORIGINAL_SEQUENCE, "41");
        assert_eq!(
            event_origin(Some(&r), "AA_CORE_HOT", 90, own_time).stream,
            "AA_LEGACY"
        );
        assert_eq!(event_origin(Some(&r), "AA_CORE_HOT", 90, own_time).seq, 41);
    }

    #[test]
    fn error_is_capped_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let capped = header_safe(&long, 1024);
        assert!(capped.len() <= 1024);
        assert!(capped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn depth_counts_each_subject_under_its_reason() {
        let depth = depth_by_reason([
            ("dlq.normalize.hrv.raw-received.schema-invalid", 4),
            ("dlq.normalize.sleep.raw-received.schema-invalid", 3),
            ("dlq.normalize.vendor.oura.webhook.max-deliver", 2),
            ("dlq.elsewhere.something", 5),
        ]);
        let expected = [
            ("max-deliver", 2),
            ("non-retryable", 0),
            ("other", 5),
            ("schema-invalid", 7),
        ];
        assert_eq!(depth.into_iter().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn reasons_are_cli_values() {
        use clap::ValueEnum;
        for r in [Reason::SchemaInvalid, Reason::NonRetryable, Reason::MaxDeliver] {
            assert_eq!(Reason::from_str(r.as_str(), false), Ok(r));
        }
    }

    #[test]
    fn replay_headers_keep_the_original_and_drop_bookkeeping() {
        let mut dead = HeaderMap::new();
        dead.insert("Nats-Msg-Id", "dlq:AA_CORE_HOT:7");
        dead.insert("Dlq-Reason", "max-deliver");
        dead.insert("Dlq-Original-Msg-Id", "ingest-42");
        dead.insert("dlq-error", "lower-case too");
        dead.insert("Nats-Expected-Last-Sequence", "3");
        dead.insert("Trace-Id", "t1");
        dead.append("Multi", "a");
        dead.append("Multi", "b");
        let h = replay_headers(&dead, "AA_DLQ", 12);
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "replay:AA_DLQ:12");
        assert_eq!(h.get(REPLAYED_FROM).unwrap().as_str(), "AA_DLQ:12");
        assert_eq!(h.get(REPLAY_ORIGINAL_MSG_ID).unwrap().as_str(), "ingest-42");
        assert_eq!(h.get("Trace-Id").unwrap().as_str(), "t1");
        assert_eq!(h.get_all("Multi").count(), 2);
        for gone in [
            "Dlq-Reason",
            "Dlq-Original-Msg-Id",
            "dlq-error",
            "Nats-Expected-Last-Sequence",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn replays_are_keyed_by_the_first_publishers_id() {
        let mut first = HeaderMap::new();
        first.insert("Nats-Msg-Id", "ingest-42");
        assert_eq!(idempotency_msg_id(Some(&first)), Some("ingest-42"));
        assert_eq!(idempotency_msg_id(None), None);
        let mut dead = HeaderMap::new();
        dead.insert("Dlq-Original-Msg-Id", "ingest-42");
        let replay = replay_headers(&dead, "AA_DLQ", 3);
        assert_eq!(idempotency_msg_id(Some(&replay)), Some("ingest-42"));
        let anonymous = replay_headers(&HeaderMap::new(), "AA_DLQ", 4);
        assert_eq!(idempotency_msg_id(Some(&anonymous)), None);
    }

    /// The dead letter the daemon writes for `msg`.
    fn letter_of(msg: &HeaderMap, stream: &str, seq: u64, published: &str) -> HeaderMap {
        let origin = Origin {
            subject: "athlete-ally.sleep.raw-received",
            stream,
            seq,
            durable: "d",
            delivered: 1,
            published: DateTime::parse_from_rfc3339(published)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        };
        dead_letter_headers(Some(msg), &origin, Reason::NonRetryable, "e")
    }

    #[test]
    fn the_first_origin_survives_two_rounds() {
        let mut first = HeaderMap::new();
        first.insert("Nats-Msg-Id", "ingest-42");
        let first_at = "2025-03-01T06:00:00.123456789Z";
        let letter1 = letter_of(&first, "AA_CORE_HOT", 17, first_at);
        let replay1 = replay_headers(&letter1, "AA_DLQ", 3);
        // The replay is stored at AA_CORE_HOT:90 an hour later and dead-lettered again.
        let letter2 = letter_of(&replay1, "AA_CORE_HOT", 90, "2025-03-01T07:00:00Z");
        let replay2 = replay_headers(&letter2, "AA_DLQ", 8);
        for (name, value) in [
            (REPLAY_ORIGINAL_MSG_ID, "ingest-42"),
            (REPLAY_ORIGINAL_STREAM, "AA_CORE_HOT"),
            (REPLAY_ORIGINAL_SEQUENCE, "17"),
            (REPLAY_ORIGINAL_TIMESTAMP, first_at),
        ] {
            assert_eq!(replay2.get(name).map(|v| v.as_str()), Some(value), "{name}");
            assert_eq!(replay2.get_all(name).count(), 1, "{name} repeated");
        }
        let published = DateTime::from_timestamp(1_740_816_000, 0).unwrap();
        let origin = event_origin(Some(&replay2), "AA_CORE_HOT", 120, published);
        assert_eq!((origin.stream.as_str(), origin.seq), ("AA_CORE_HOT", 17));
        assert_eq!(precise_time(origin.time), first_at);
        assert_eq!(origin.msg_id.as_deref(), Some("ingest-42"));
        // A letter written before dead letters kept the event's identity: its
        // Dlq-Original-Msg-Id is the replay's own id, and it is not taken for the event's.
        let mut old = HeaderMap::new();
        old.insert(REPLAYED_FROM, "AA_DLQ:4");
        old.insert("Dlq-Original-Msg-Id", "replay:AA_DLQ:4");
        assert!(replay_headers(&old, "AA_DLQ", 10)
            .get(REPLAY_ORIGINAL_MSG_ID)
            .is_none());
    }
}
