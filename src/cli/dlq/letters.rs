//! Dead letters read back from the stream, and what a replay or a purge did to each.

use async_nats::header::HeaderMap;
use async_nats::jetstream::stream::{DeleteMessageError, DeleteMessageErrorKind, Stream};
use async_nats::jetstream::{self, message::PublishMessage, message::StreamMessage};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{DlqError, FilterArgs, Selection};
use crate::cli::output::{EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK};
use crate::config::{Config, ConsumerKind};
use crate::dlq::{replay_headers, BODY_OMITTED};

/// One dead letter as read back from the stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub subject: String,
    pub consumer: Option<ConsumerKind>,
    pub headers: HeaderMap,
    pub payload: bytes::Bytes,
}

impl DeadLetter {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// `Dlq-Reason`, else the last token of the dead-letter subject.
    pub fn reason(&self) -> &str {
        self.header("Dlq-Reason")
            .unwrap_or_else(|| self.subject.rsplit('.').next().unwrap_or(""))
    }

    pub(super) fn consumer_str(&self) -> &'static str {
        self.consumer.map(|c| c.as_str()).unwrap_or("unknown")
    }

    pub(super) fn summary(&self) -> Summary<'_> {
        Summary {
            sequence: self.seq,
            time: rfc3339(self.time),
            subject: &self.subject,
            consumer: self.consumer_str(),
            reason: self.reason(),
            original_subject: self.header("Dlq-Original-Subject"),
            original_stream: self.header("Dlq-Original-Stream"),
            original_sequence: self.header("Dlq-Original-Sequence").and_then(|s| s.parse().ok()),
            durable: self.header("Dlq-Durable"),
            delivery_count: self.header("Dlq-Delivery-Count").and_then(|s| s.parse().ok()),
            failed_at: self.header("Dlq-Failed-At"),
            error: self.header("Dlq-Error"),
            size: self.payload.len(),
            body_omitted: self.body_omitted(),
        }
    }

    /// The body's length when the letter was stored without it ([`BODY_OMITTED`]).
    pub(super) fn body_omitted(&self) -> Option<u64> {
        self.header(BODY_OMITTED).and_then(|n| n.trim().parse().ok())
    }

    fn matches(&self, f: &FilterArgs, since: Option<DateTime<Utc>>) -> bool {
        f.consumer.is_none_or(|c| self.consumer == Some(c))
            && f.reason.is_none_or(|r| self.reason() == r.as_str())
            && since.is_none_or(|t| self.time >= t)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Summary<'a> {
    pub(super) sequence: u64,
    pub(super) time: String,
    pub(super) subject: &'a str,
    pub(super) consumer: &'a str,
    pub(super) reason: &'a str,
    pub(super) original_subject: Option<&'a str>,
    pub(super) original_stream: Option<&'a str>,
    pub(super) original_sequence: Option<u64>,
    pub(super) durable: Option<&'a str>,
    pub(super) delivery_count: Option<u64>,
    pub(super) failed_at: Option<&'a str>,
    pub(super) error: Option<&'a str>,
    pub(super) size: usize,
    /// The body's length when the letter was stored without it (`Dlq-Body-Omitted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) body_omitted: Option<u64>,
}

/// Which consumer a dead letter belongs to: the longest configured `<prefix>.` its subject starts
/// with, else the consumer whose durable is in `Dlq-Durable`.
pub fn consumer_of(config: &Config, subject: &str, durable: Option<&str>) -> Option<ConsumerKind> {
    config
        .consumers
        .iter()
        .filter(|c| {
            subject
                .strip_prefix(c.dlq_prefix.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .max_by_key(|c| c.dlq_prefix.len())
        .or_else(|| {
            let d = durable?;
            config.consumers.iter().find(|c| c.durable == d)
        })
        .map(|c| c.kind)
}

pub(super) struct Dlq {
    pub(super) name: String,
    stream: Stream,
    config: Config,
}

impl Dlq {
    pub(super) async fn open(js: &jetstream::Context, config: &Config) -> Result<Dlq, DlqError> {
        let name = config.streams.dlq.clone();
        match js.get_stream(&name).await {
            Ok(stream) => Ok(Dlq {
                name,
                stream,
                config: config.clone(),
            }),
            Err(e) => {
                let missing = matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
                if missing {
                    Err(DlqError::StreamMissing { stream: name })
                } else {
                    Err(DlqError::nats("looking up the dead-letter stream", e))
                }
            }
        }
    }

    fn letter(&self, m: StreamMessage) -> DeadLetter {
        let time = DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond())
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let subject = m.subject.to_string();
        let consumer = consumer_of(
            &self.config,
            &subject,
            m.headers.get("Dlq-Durable").map(|v| v.as_str()),
        );
        DeadLetter {
            seq: m.sequence,
            time,
            subject,
            consumer,
            headers: m.headers,
            payload: m.payload,
        }
    }

    pub(super) async fn get(&self, seq: u64) -> Result<Option<DeadLetter>, DlqError> {
        match self.stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(self.letter(m))),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(DlqError::nats("reading a dead letter", e)),
        }
    }

    /// Every dead letter that matches, in sequence order. One request per stored message:
    /// `next_by_subject` skips deleted sequences server-side.
    pub(super) async fn scan(&self, filter: &FilterArgs) -> Result<Vec<DeadLetter>, DlqError> {
        let since = filter.since.map(|s| s.resolve(Utc::now()));
        let mut stream = self.stream.clone();
        let state = stream
            .info()
            .await
            .map_err(|e| DlqError::nats("reading the dead-letter stream's state", e))?
            .state
            .clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        let mut seq = state.first_sequence;
        while seq <= state.last_sequence {
            let got = self
                .stream
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(">")
                .send()
                .await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(DlqError::nats("reading dead letters", e)),
            };
            if m.sequence > state.last_sequence {
                break;
            }
            seq = m.sequence + 1;
            let l = self.letter(m);
            if l.matches(filter, since) {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// The dead letters a replay or purge applies to, and the requested sequences that are absent.
    pub(super) async fn select(&self, s: &Selection) -> Result<(Vec<DeadLetter>, Vec<u64>), DlqError> {
        if s.seqs.is_empty() {
            // clap guarantees filters or --all here.
            debug_assert!(s.all || !s.filter.is_empty());
            return Ok((self.scan(&s.filter).await?, Vec::new()));
        }
        let mut seqs = s.seqs.clone();
        seqs.sort_unstable();
        seqs.dedup();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for seq in seqs {
            match self.get(seq).await? {
                Some(l) => found.push(l),
                None => missing.push(seq),
            }
        }
        Ok((found, missing))
    }

    pub(super) async fn replay(&self, js: &jetstream::Context, l: &DeadLetter, purge: bool) -> ItemResult {
        let mut r = ItemResult::planned(l, "replayed");
        let Some(subject) = l.header("Dlq-Original-Subject").map(str::to_string) else {
            r.result = "failed";
            r.error = Some("no Dlq-Original-Subject header: the original subject is unknown".into());
            return r;
        };
        let body = match body_of(js, l).await {
            Ok(b) => b,
            Err(e) => {
                r.result = "failed";
                r.error = Some(e);
                return r;
            }
        };
        let headers = replay_headers(&l.headers, &self.name, l.seq);
        let msg = PublishMessage::build().payload(body).headers(headers);
        let acked = match js.send_publish(subject, msg).await {
            Ok(ack) => ack.await.map_err(async_nats::Error::from),
            Err(e) => Err(e.into()),
        };
        match acked {
            Ok(ack) => {
                if ack.duplicate {
                    r.result = "duplicate";
                }
                r.replayed_to = Some(Replayed {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                });
                if purge {
                    match delete_letter(&self.stream, l.seq).await {
                        Ok(_) => r.purged = true,
                        Err(e) => {
                            r.result = "failed";
                            r.error = Some(format!("replayed, but deleting the dead letter failed: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                r.result = "failed";
                r.error = Some(format!(
                    "publish to {} failed: {e}",
                    r.original_subject.as_deref().unwrap_or("?")
                ));
            }
        }
        r
    }

    pub(super) async fn purge(&self, l: &DeadLetter) -> ItemResult {
        let mut r = ItemResult::planned(l, "purged");
        match delete_letter(&self.stream, l.seq).await {
            Ok(_) => r.purged = true,
            Err(e) => {
                r.result = "failed";
                r.error = Some(format!("delete failed: {e}"));
            }
        }
        r
    }
}

/// What deleting a dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// This request removed it.
    Now,
    /// It was gone already: another `dlq purge` or `dlq replay --purge-replayed` removed it
    /// between this command's read and its delete. The letter is removed, which is what was
    /// asked, so it counts as purged, not failed.
    Already,
}

/// Deletes the dead letter at `seq` from `stream` (a letter this command has read). When the
/// delete fails, a read of the same sequence tells whether the letter is gone all the same: the
/// server's typed "no message found" (10037) there means [`Deleted::Already`]. nats-server 2.9
/// answers a second delete with the generic 10057 ("message delete failed"), so the delete's own
/// error code cannot tell. A delete without an answer stays a failure.
pub async fn delete_letter(stream: &Stream, seq: u64) -> Result<Deleted, DeleteMessageError> {
    let e = match stream.delete_message(seq).await {
        Ok(_) => return Ok(Deleted::Now),
        Err(e) => e,
    };
    match e.kind() {
        DeleteMessageErrorKind::JetStream(j) if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND => {
            return Ok(Deleted::Already)
        }
        DeleteMessageErrorKind::JetStream(_) => {}
        // No answer (a timeout, a lost connection): a read would not get one either.
        DeleteMessageErrorKind::TimedOut | DeleteMessageErrorKind::Request => return Err(e),
    }
    match stream.get_raw_message(seq).await {
        Err(read) if read.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Ok(Deleted::Already)
        }
        _ => Err(e),
    }
}

/// The body a replay publishes: the letter's own, or for a letter stored without it
/// ([`BODY_OMITTED`]) the original message's, read from its stream position while that stream
/// still holds it.
async fn body_of(js: &jetstream::Context, l: &DeadLetter) -> Result<bytes::Bytes, String> {
    let Some(len) = l.header(BODY_OMITTED) else {
        return Ok(l.payload.clone());
    };
    let stream = l.header("Dlq-Original-Stream").unwrap_or_default();
    let seq = l
        .header("Dlq-Original-Sequence")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&n| n != 0);
    let gone = |why: String| {
        format!(
            "the dead letter was stored without its body ({len} bytes: too large for the server's max_payload with the dead-letter headers), and {why}; nothing was replayed"
        )
    };
    let Some(seq) = seq.filter(|_| !stream.is_empty()) else {
        return Err(gone(
            "it names no original stream position to take the body from".into(),
        ));
    };
    let original = match js.get_stream(stream).await {
        Ok(s) => s.get_raw_message(seq).await,
        Err(e) => return Err(gone(format!("its original stream {stream} cannot be read: {e}"))),
    };
    match original {
        Ok(m) if Some(m.subject.as_str()) == l.header("Dlq-Original-Subject") => Ok(m.payload),
        Ok(m) => Err(gone(format!(
            "{stream} holds another subject ({}) at sequence {seq}",
            m.subject
        ))),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Err(gone(format!(
            "{stream} no longer holds sequence {seq} (past its max_age, or deleted)"
        ))),
        Err(e) => Err(gone(format!("reading {stream} at sequence {seq} failed: {e}"))),
    }
}

/// What happened to one selected dead letter.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ItemResult {
    pub(super) dlq_sequence: u64,
    /// `replayed`, `duplicate` (JetStream had this replay id already), `purged`, `would-replay`,
    /// `would-purge`, `not-found`, `failed` or `not-attempted` (the NATS connection was lost).
    pub(super) result: &'static str,
    pub(super) consumer: Option<&'static str>,
    pub(super) reason: Option<String>,
    pub(super) original_subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) replayed_to: Option<Replayed>,
    pub(super) purged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct Replayed {
    pub(super) stream: String,
    pub(super) sequence: u64,
    pub(super) duplicate: bool,
}

impl ItemResult {
    pub(super) fn planned(l: &DeadLetter, result: &'static str) -> ItemResult {
        ItemResult {
            dlq_sequence: l.seq,
            result,
            consumer: Some(l.consumer_str()),
            reason: Some(l.reason().to_string()),
            original_subject: l.header("Dlq-Original-Subject").map(str::to_string),
            replayed_to: None,
            purged: false,
            error: None,
        }
    }

    /// A letter the command did not get to: the NATS connection was lost before it.
    pub(super) fn not_attempted(l: &DeadLetter) -> ItemResult {
        let mut r = ItemResult::planned(l, "not-attempted");
        r.error = Some(
            "the NATS connection was lost before this dead letter: nothing was done to it (re-run the same command; a replay is deduplicated)"
                .into(),
        );
        r
    }

    pub(super) fn not_found(seq: u64) -> ItemResult {
        ItemResult {
            dlq_sequence: seq,
            result: "not-found",
            consumer: None,
            reason: None,
            original_subject: None,
            replayed_to: None,
            purged: false,
            error: Some("no dead letter with this sequence".into()),
        }
    }
}

/// 1 if anything failed or was not attempted, else 3 if a requested sequence was absent, else 0.
pub(super) fn exit_code_for(results: &[ItemResult]) -> u8 {
    if results
        .iter()
        .any(|r| r.result == "failed" || r.result == "not-attempted")
    {
        EXIT_FAILED
    } else if results.iter().any(|r| r.result == "not-found") {
        EXIT_NOT_FOUND
    } else {
        EXIT_OK
    }
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
