//! The batch pipeline: what the pull loop does with the messages it has in hand.
//!
//! Decode and validate every message → collapse records with the same key (newest
//! `captured_at`, then highest stream sequence) → write each table with one multi-row statement
//! (in one transaction when there are several) → send every normalized event without awaiting
//! each PubAck in turn ([`Worker::stage`]) → await the PubAcks → settle each message as
//! [`decide`] says (through [`super::settle`]) → flush the acks once ([`Worker::settle_batch`]).
//!
//! Each batch runs on its own task, and up to `*_PIPELINE_DEPTH` batches are in flight at once
//! (`super::flight`): batch N+1 is decoded and written while batch N commits and settles.
//!
//! A batch statement that fails for a non-transient reason is retried message by message (one
//! transaction each), so only the bad records are dead-lettered. A transient failure is shared
//! by the whole batch, which is NAKed. Nothing is acked before its rows are committed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::announce::{Announced, PUBACK_TIMEOUT};
use super::delivery::Delivery;
use super::settle::{self, Dlq, Report, Settler};
use super::worker::Worker;
use crate::dlq::{EventOrigin, Origin};
use crate::outcome::{decide, Action, Failure};
use crate::pipeline::{self, Decoded, Envelope, Normalized, StoredRow};
use crate::store::{self, BatchEntry, Source};
use crate::topology::Binding;

/// The normalized events an entry publishes: each row it stored (or must re-announce), rendered
/// under the entry's identity.
fn announcements(stored: &[StoredRow], entry: &BatchEntry<'_>) -> Vec<Normalized> {
    stored
        .iter()
        .map(|row| row.announcement(entry.source.identity))
        .collect()
}

/// One message of the batch being processed.
struct Item {
    d: Delivery,
    stream: String,
    /// 0 when the message carried no JetStream metadata (it is dead-lettered as such).
    seq: u64,
    delivered: i64,
    /// Where and when the event was first stored, and its publisher's id: a replay's first
    /// origin (docs/CONTRACT.md), else this delivery's own.
    origin: EventOrigin,
}

/// A batch whose rows are committed and whose normalized events are sent: what remains is
/// awaiting their PubAcks, settling every message and flushing the acks ([`Worker::settle_batch`]).
struct Staged {
    items: Vec<Item>,
    results: Vec<Result<(), Failure>>,
    /// PubAcks still to await, with the item they belong to.
    pending: Announced,
    /// Per item, invalid sections of a webhook stored without them: reported by a dead letter
    /// before the message is acked.
    reports: Vec<Option<Report>>,
    started: Instant,
}

/// A message with its result, what [`decide`] says, and what to report first.
type Decided<'a> = (&'a Item, Result<(), Failure>, Action, Option<Report>);

/// The sections of an Oura webhook that could not be used, and why.
fn report_of(d: &Decoded) -> Option<Report> {
    let Decoded::Oura(w) = d else {
        return None;
    };
    if w.invalid_sections.is_empty() {
        return None;
    }
    Some(Report {
        sections: w.invalid_sections.iter().map(|s| s.section).collect(),
        error: w
            .invalid_sections
            .iter()
            .map(|s| format!("{}: {}", s.section, s.error))
            .collect::<Vec<_>>()
            .join("; "),
    })
}

impl Worker {
    /// One batch's task: stage it, then settle it.
    pub(super) async fn run_batch(
        self: Arc<Self>,
        received: Vec<Delivery>,
        b: Arc<Binding>,
        db_down: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) {
        if let Some(staged) = self.stage(received, &b, &db_down).await {
            self.settle_batch(staged, &b, &shutdown).await;
        }
    }

    /// Processes a batch up to the point where only settling remains: decode, write and commit,
    /// send the normalized events. `db_down` short-circuits the rest of a pull once the
    /// database is found unreachable, so a pull is NAKed in milliseconds, not pool timeouts.
    async fn stage(&self, received: Vec<Delivery>, b: &Binding, db_down: &AtomicBool) -> Option<Staged> {
        let started = received.first().map_or_else(Instant::now, |r| r.at);
        let mut items = Vec::with_capacity(received.len());
        for d in received {
            let meta = d.msg.info().map(|i| {
                (
                    i.stream.to_string(),
                    i.stream_sequence,
                    i.delivered,
                    crate::dlq::published_at(&i),
                )
            });
            let (stream, seq, delivered, published) = match meta {
                Ok(m) => m,
                Err(e) => {
                    // Nothing says where it came from: it is dead-lettered (never dropped) and
                    // terminated through its reply subject.
                    tracing::warn!(error = %e, "message without JetStream metadata; dead-lettering it");
                    (b.stream.clone(), 0, 1, Utc::now())
                }
            };
            let origin = crate::dlq::event_origin(d.msg.headers.as_ref(), &stream, seq, published);
            items.push(Item {
                d,
                stream,
                seq,
                delivered,
                origin,
            });
        }
        if items.is_empty() {
            return None;
        }
        let (results, pending, reports) = self
            .keep_ours(&items, b, self.process(&items, db_down.load(Ordering::Relaxed)))
            .await;
        if results
            .iter()
            .any(|r| matches!(r, Err(f) if f.database_unreachable()))
        {
            db_down.store(true, Ordering::Relaxed);
        }
        Some(Staged {
            items,
            results,
            pending,
            reports,
            started,
        })
    }

    /// Awaits a staged batch's PubAcks, settles each message as [`decide`] says, and flushes
    /// the acks once.
    async fn settle_batch(&self, staged: Staged, b: &Binding, shutdown: &CancellationToken) {
        let Staged {
            items,
            mut results,
            pending,
            mut reports,
            started,
        } = staged;
        let acks = pending.collect(PUBACK_TIMEOUT);
        for (idx, r) in self.keep_ours(&items, b, acks).await {
            if let Err(err) = r {
                if results[idx].is_ok() {
                    results[idx] = Err(Failure::Publish(err));
                }
            }
        }
        // Settling can take long (dead letters await their PubAcks one by one, a held last
        // delivery waits for the DLQ): what is not settled yet keeps getting progress acks.
        let decided: Vec<Decided<'_>> = items
            .iter()
            .zip(results)
            .zip(reports.iter_mut().map(Option::take))
            .map(|((item, result), report)| {
                let action = self.action_of(item, &result, b);
                (item, result, action, report)
            })
            .collect();
        // Acks and NAKs first: a dead letter that has to be held (its DLQ unavailable on a
        // last delivery) must not keep the rest of the batch unsettled.
        let (letters, others): (Vec<_>, Vec<_>) = decided
            .into_iter()
            .partition(|(_, _, action, report)| matches!(action, Action::DeadLetter(_)) || report.is_some());
        let settler = self.settler(b, shutdown);
        let settle_all = async {
            for (item, result, action, report) in others.into_iter().chain(letters) {
                let subject = item.d.msg.subject.to_string();
                let origin = Origin {
                    subject: &subject,
                    stream: &item.stream,
                    seq: item.seq,
                    durable: &b.durable,
                    delivered: item.delivered,
                    published: item.d.msg.info().ok().map(|i| crate::dlq::published_at(&i)),
                };
                settler
                    .settle(&item.d, &origin, result.as_ref().err(), action, report)
                    .await;
            }
        };
        self.keep_ours(&items, b, settle_all).await;
        settle::flush(&self.shared.js).await;
        self.shared
            .metrics
            .batch_duration
            .with_label_values(&[self.cc.kind.as_str()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Awaits `work` while sending progress acks every ack_wait / 3 for the batch's messages:
    /// a slow batch (a database lock, a slow disk) must not be redelivered under us.
    async fn keep_ours<T>(&self, items: &[Item], b: &Binding, work: impl Future<Output = T>) -> T {
        let ack_wait = b.consumer.cached_info().config.ack_wait;
        settle::progress_while(items.iter().map(|it| &it.d), ack_wait, work).await
    }

    /// Settles this binding's messages, dead letters going to the consumer's DLQ subjects.
    fn settler<'a>(&'a self, b: &'a Binding, shutdown: &'a CancellationToken) -> Settler<'a, Dlq<'a>> {
        let config = &self.shared.config;
        Settler {
            kind: self.cc.kind,
            metrics: &self.shared.metrics,
            health: &self.shared.health,
            letters: Dlq {
                js: &self.shared.js,
                prefix: &self.cc.dlq_prefix,
            },
            backoff: &config.retry_backoff,
            ack_wait: b.consumer.cached_info().config.ack_wait,
            server_max_deliver: b.server_max_deliver,
            shutdown_timeout: config.shutdown_timeout,
            metric_subject: &self.cc.filter_subject,
            durable: &b.durable,
            shutdown,
        }
    }

    /// Decode, write, send: one result per item, in order, and the PubAcks to await.
    async fn process(
        &self,
        items: &[Item],
        db_down: bool,
    ) -> (Vec<Result<(), Failure>>, Announced, Vec<Option<Report>>) {
        let now = Utc::now();
        let mut results: Vec<Result<(), Failure>> = Vec::with_capacity(items.len());
        let mut decoded: Vec<Option<Decoded>> = Vec::with_capacity(items.len());
        for it in items {
            // A DLQ replay carries the first publisher's id separately (see `dlq::event_origin`).
            if it.seq == 0 {
                decoded.push(None);
                results.push(Err(Failure::NoMetadata));
                continue;
            }
            let envelope = Envelope {
                msg_id: it.origin.msg_id.as_deref(),
                stable_time: it.origin.time,
                now,
                max_future_skew: self.shared.config.max_future_skew,
                max_payload_bytes: self.shared.config.max_payload_bytes,
            };
            match pipeline::decode(self.cc.kind, &it.d.msg.payload, envelope) {
                Ok(d) => {
                    decoded.push(Some(d));
                    results.push(Ok(()));
                }
                Err(e) => {
                    decoded.push(None);
                    results.push(Err(Failure::Schema(e)));
                }
            }
        }
        let reports: Vec<Option<Report>> = decoded.iter().map(|d| d.as_ref().and_then(report_of)).collect();
        let valid: Vec<usize> = (0..items.len()).filter(|&i| decoded[i].is_some()).collect();
        if valid.is_empty() {
            return (results, Announced::none(), reports);
        }
        if db_down {
            for &i in &valid {
                results[i] = Err(Failure::DatabaseSkipped);
            }
            return (results, Announced::none(), reports);
        }

        // Without an identity of its own, an event is named by where it was stored.
        let positions: Vec<String> = items
            .iter()
            .map(|it| format!("{}:{}:{}", self.cc.durable, it.origin.stream, it.origin.seq))
            .collect();
        let entries: Vec<BatchEntry<'_>> = valid
            .iter()
            .filter_map(|&i| {
                decoded[i].as_ref().map(|d| BatchEntry {
                    decoded: d,
                    source: Source {
                        stream: &items[i].origin.stream,
                        seq: items[i].origin.seq,
                        identity: d.identity(items[i].origin.msg_id.as_deref(), &positions[i]),
                        // A replay is a redelivery too: its first deliveries may have committed
                        // a change whose announcement was lost.
                        redelivered: items[i].delivered > 1
                            || items[i]
                                .d
                                .msg
                                .headers
                                .as_ref()
                                .is_some_and(|h| h.get(crate::dlq::REPLAYED_FROM).is_some()),
                    },
                })
            })
            .collect();
        let m = &self.shared.metrics;
        let kind = self.cc.kind.as_str();
        // Per valid item: the events to publish, or why it failed.
        let written: Vec<Result<Vec<Normalized>, Failure>> = match store::upsert_batch(
            &self.shared.pool,
            m,
            &entries,
        )
        .await
        {
            Ok(outcomes) => {
                let superseded = outcomes.iter().filter(|o| o.superseded).count();
                if superseded > 0 {
                    m.batch_superseded
                        .with_label_values(&[kind])
                        .inc_by(superseded as u64);
                }
                outcomes
                    .iter()
                    .zip(&entries)
                    .map(|(o, e)| Ok(announcements(&o.stored, e)))
                    .collect()
            }
            Err(e) if store::is_transient(&e) || entries.len() == 1 => {
                let shared = Arc::new(e);
                entries
                    .iter()
                    .map(|_| Err(Failure::Batch(shared.clone())))
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, size = entries.len(), "batch write failed; retrying its messages one by one");
                m.batch_unrolled.with_label_values(&[kind]).inc();
                self.write_one_by_one(&entries).await
            }
        };

        let (sent, pending) = self.send_all(written, &valid).await;
        for (&i, r) in valid.iter().zip(sent) {
            results[i] = r;
        }
        (results, pending, reports)
    }

    /// The unroll-and-retry path: each message in its own transaction, in stream order (so
    /// same-key records end as the batch write would have left them).
    async fn write_one_by_one(&self, entries: &[BatchEntry<'_>]) -> Vec<Result<Vec<Normalized>, Failure>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut unreachable = false;
        for e in entries {
            if unreachable {
                out.push(Err(Failure::DatabaseSkipped));
                continue;
            }
            let r = store::upsert(&self.shared.pool, &self.shared.metrics, e).await;
            out.push(r.map(|stored| announcements(&stored, e)).map_err(|err| {
                if crate::outcome::unreachable_error(&err) {
                    unreachable = true;
                }
                Failure::Store(err)
            }));
        }
        out
    }

    /// Sends every normalized event of the batch without awaiting the PubAcks, which are
    /// collected per batch ([`Announced`]) under the index (in `items`) of their message. An
    /// entry succeeds when all its events are acknowledged by JetStream
    /// ([`Worker::settle_batch`] awaits them).
    async fn send_all(
        &self,
        written: Vec<Result<Vec<Normalized>, Failure>>,
        valid: &[usize],
    ) -> (Vec<Result<(), Failure>>, Announced) {
        let mut results: Vec<Result<(), Failure>> = Vec::with_capacity(written.len());
        let mut events = Vec::new();
        for (idx, w) in written.into_iter().enumerate() {
            match w {
                Ok(normalized) => {
                    results.push(Ok(()));
                    let item = valid.get(idx).copied().unwrap_or(idx);
                    events.extend(normalized.into_iter().map(|n| (item, n)));
                }
                Err(f) => results.push(Err(f)),
            }
        }
        let (announced, refused) = Announced::send(&self.shared.js.client(), events).await;
        for (item, err) in refused {
            if let Some(idx) = valid.iter().position(|&v| v == item) {
                results[idx] = Err(Failure::Publish(err));
            }
        }
        (results, announced)
    }

    /// What [`decide`] says for one message. The durable's own `max_deliver`, when lower than
    /// the daemon's, is the one that counts: past it the server would never redeliver, so that
    /// delivery must be dead-lettered (and held until it is).
    fn action_of(&self, item: &Item, result: &Result<(), Failure>, b: &Binding) -> Action {
        let max_deliver = b
            .server_max_deliver
            .map_or(self.cc.max_deliver, |m| m.min(self.cc.max_deliver));
        decide(
            result.as_ref().map(|_| ()).map_err(Failure::class),
            item.delivered,
            max_deliver,
            &self.shared.config.retry_backoff,
        )
    }
}
