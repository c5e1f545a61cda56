//! Publishing a batch's normalized events: every event a core publish with its own reply
//! subject under one inbox, and all their PubAcks collected on one subscription to that inbox,
//! parsed as a plain struct. async-nats's JetStream publish gives each message its own
//! oneshot, permit, inbox and timer (17–22 % of the daemon's CPU at batch 500, issue 18); what
//! it enforced is enforced here:
//! - a deadline per batch ([`PUBACK_TIMEOUT`] after the last publish): an event without its
//!   PubAck by then is a publish failure (`TimedOut`), so its message is NAKed, never acked;
//! - a bound on publishes in flight: one batch's events, and at most `*_PIPELINE_DEPTH` batches;
//! - the error kinds `outcome` classifies: no responders (no stream captures the subject) is
//!   `StreamNotFound`, a JetStream API error keeps its meaning (`WrongLastSequence`, …), a
//!   payload over the server's limit is `MaxPayloadExceeded`;
//! - reconnects: the subscription is renewed by the client; PubAcks lost with the connection
//!   time out and their messages are retried, which the `Nats-Msg-Id` makes harmless.
//!
//! A PubAck with `duplicate: true` (the event is already in the stream, inside its duplicate
//! window) counts as stored.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::Deserialize;

use crate::pipeline::Normalized;

/// How long a batch waits for its PubAcks after its last publish (async-nats's default).
pub const PUBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The events of one batch in flight: which entry each belongs to, and the subscription their
/// PubAcks arrive on.
pub(super) struct Announced {
    subscription: Option<async_nats::Subscriber>,
    prefix: String,
    /// Per event (its token in the reply subject): the entry it belongs to.
    entries: Vec<usize>,
}

/// A PubAck as JetStream sends it.
#[derive(Debug, Deserialize)]
struct PubAck {
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// What one reply says about its event.
fn verdict(status: Option<StatusCode>, payload: &[u8]) -> Result<(), PublishError> {
    if status == Some(StatusCode::NO_RESPONDERS) {
        return Err(PublishError::new(PublishErrorKind::StreamNotFound));
    }
    match serde_json::from_slice::<PubAck>(payload) {
        Ok(PubAck { error: Some(e), .. }) => Err(api_error(&e)),
        Ok(PubAck { stream: Some(_), .. }) => Ok(()),
        Ok(PubAck { stream: None, .. }) | Err(_) => Err(PublishError::with_source(
            PublishErrorKind::Other,
            format!("unexpected PubAck: {}", String::from_utf8_lossy(payload)),
        )),
    }
}

/// A JetStream API error in a PubAck, with the kind `outcome` classifies (codes as async-nats
/// maps them).
fn api_error(e: &ApiError) -> PublishError {
    let kind = match e.err_code {
        10071 => PublishErrorKind::WrongLastSequence,
        10070 => PublishErrorKind::WrongLastMessageId,
        10054 | 10122 => PublishErrorKind::MaxPayloadExceeded,
        _ => PublishErrorKind::Other,
    };
    PublishError::with_source(kind, format!("{} (err_code {})", e.description, e.err_code))
}

impl Announced {
    /// Nothing published (a batch with no event to announce).
    pub fn none() -> Announced {
        Announced {
            subscription: None,
            prefix: String::new(),
            entries: Vec::new(),
        }
    }

    /// Publishes every event of `events` (`(entry, event)`) with a reply subject under one new
    /// inbox, after subscribing to it. A publish the client refuses fails its entry at once
    /// (the entry's later events are not sent); the others are collected by [`Announced::collect`].
    pub async fn send(
        client: &async_nats::Client,
        events: impl IntoIterator<Item = (usize, Normalized)>,
    ) -> (Announced, Vec<(usize, PublishError)>) {
        let prefix = client.new_inbox();
        let mut failed: Vec<(usize, PublishError)> = Vec::new();
        let mut announced = Announced {
            prefix,
            ..Announced::none()
        };
        let mut events = events.into_iter().peekable();
        if events.peek().is_none() {
            return (announced, failed);
        }
        match client.subscribe(format!("{}.*", announced.prefix)).await {
            Ok(s) => announced.subscription = Some(s),
            Err(e) => {
                let entries: Vec<usize> = events.map(|(entry, _)| entry).collect();
                let mut seen = Vec::new();
                for entry in entries {
                    if !seen.contains(&entry) {
                        seen.push(entry);
                        failed.push((
                            entry,
                            PublishError::with_source(PublishErrorKind::Other, e.to_string()),
                        ));
                    }
                }
                return (announced, failed);
            }
        }
        for (entry, n) in events {
            if failed.iter().any(|(e, _)| *e == entry) {
                continue;
            }
            let token = announced.entries.len();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", n.id.as_str());
            let reply = format!("{}.{token}", announced.prefix);
            match client
                .publish_with_reply_and_headers(n.subject, reply, headers, n.body.into())
                .await
            {
                Ok(()) => announced.entries.push(entry),
                Err(e) => {
                    let kind = match e.kind() {
                        async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                            PublishErrorKind::MaxPayloadExceeded
                        }
                        async_nats::client::PublishErrorKind::InvalidSubject
                        | async_nats::client::PublishErrorKind::Send => PublishErrorKind::Other,
                    };
                    failed.push((entry, PublishError::with_source(kind, e)));
                }
            }
        }
        if let Err(e) = client.flush().await {
            tracing::debug!(error = %e, "flushing the normalized publishes");
        }
        (announced, failed)
    }

    /// Every event sent, with its entry and the verdict of its PubAck (or `TimedOut` when none
    /// arrived within `timeout`).
    pub async fn collect(mut self, timeout: Duration) -> Vec<(usize, Result<(), PublishError>)> {
        let mut verdicts: Vec<Option<Result<(), PublishError>>> = self.entries.iter().map(|_| None).collect();
        let mut outstanding = verdicts.len();
        if let Some(sub) = self.subscription.as_mut() {
            let deadline = tokio::time::Instant::now() + timeout;
            while outstanding > 0 {
                let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) | Err(_) => break,
                };
                let token = msg
                    .subject
                    .strip_prefix(self.prefix.as_str())
                    .and_then(|t| t.strip_prefix('.'))
                    .and_then(|t| t.parse::<usize>().ok());
                let Some(slot) = token.and_then(|t| verdicts.get_mut(t)) else {
                    continue;
                };
                if slot.is_none() {
                    *slot = Some(verdict(msg.status, &msg.payload));
                    outstanding -= 1;
                }
            }
        }
        if let Some(sub) = self.subscription.take() {
            let mut sub = sub;
            if let Err(e) = sub.unsubscribe().await {
                tracing::debug!(error = %e, "unsubscribing a batch's PubAck inbox");
            }
        }
        self.entries
            .into_iter()
            .zip(verdicts)
            .map(|(entry, v)| {
                (
                    entry,
                    v.unwrap_or_else(|| Err(PublishError::new(PublishErrorKind::TimedOut))),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_judged_as_jetstream_means_them() {
        assert!(verdict(None, br#"{"stream":"AA_CORE_HOT","seq":7}"#).is_ok());
        assert!(
            verdict(None, br#"{"stream":"AA_CORE_HOT","seq":7,"duplicate":true}"#).is_ok(),
            "a duplicate is stored"
        );
        let kind = |r: Result<(), PublishError>| r.err().map(|e| e.kind());
        assert_eq!(
            kind(verdict(Some(StatusCode::NO_RESPONDERS), b"")),
            Some(PublishErrorKind::StreamNotFound)
        );
        assert_eq!(
            kind(verdict(
                None,
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#
            )),
            Some(PublishErrorKind::WrongLastSequence)
        );
        assert_eq!(
            kind(verdict(
                None,
                br#"{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded"}}"#
            )),
            Some(PublishErrorKind::Other)
        );
        assert_eq!(kind(verdict(None, b"not json")), Some(PublishErrorKind::Other));
        assert_eq!(kind(verdict(None, b"{}")), Some(PublishErrorKind::Other));
    }
}
