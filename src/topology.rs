//! Stream and durable specifications, provisioning, and binding with primary-first fallback.
//!
//! JetStream refuses two streams with overlapping subjects (10065) and, on 2.9, a consumer filter
//! not covered by its stream's subjects (10093). Provisioning therefore never creates a stream
//! whose subjects another stream already holds, and binding only creates a durable on a stream
//! that receives the filter subject ([`stream_receives`]: its subjects cover the filter, or, on
//! 2.10+, cover it in a private namespace that the stream's subject transform strips).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::TryStreamExt;

use crate::config::{Config, ConsumerConfig, StreamMode, StreamNames};

pub const HOUR: Duration = Duration::from_secs(3600);

/// One stream of the topology tables in SPEC §1.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub max_age: Duration,
    pub replicas: usize,
}

impl StreamSpec {
    pub fn to_config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age: self.max_age,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        }
    }
}

/// The legacy single stream.
pub fn legacy_spec(names: &StreamNames, replicas: usize) -> StreamSpec {
    StreamSpec {
        name: names.legacy.clone(),
        subjects: vec!["athlete-ally.>".into(), "vendor.>".into(), "sleep.*".into()],
        max_age: 24 * HOUR,
        replicas,
    }
}

pub fn core_spec(names: &StreamNames, replicas: usize) -> StreamSpec {
    StreamSpec {
        name: names.core.clone(),
        subjects: vec!["athlete-ally.>".into(), "sleep.*".into()],
        max_age: 48 * HOUR,
        replicas,
    }
}

pub fn vendor_spec(names: &StreamNames, replicas: usize) -> StreamSpec {
    StreamSpec {
        name: names.vendor.clone(),
        subjects: vec!["vendor.>".into()],
        max_age: 48 * HOUR,
        replicas,
    }
}

/// The dead-letter stream; it overlaps nothing, so it exists in both modes.
pub fn dlq_spec(names: &StreamNames, replicas: usize) -> StreamSpec {
    StreamSpec {
        name: names.dlq.clone(),
        subjects: vec!["dlq.>".into()],
        max_age: 14 * 24 * HOUR,
        replicas,
    }
}

/// The streams a mode wants.
pub fn stream_specs(mode: StreamMode, names: &StreamNames, replicas: usize) -> Vec<StreamSpec> {
    match mode {
        StreamMode::Single => vec![legacy_spec(names, replicas), dlq_spec(names, replicas)],
        StreamMode::Multi => vec![
            core_spec(names, replicas),
            vendor_spec(names, replicas),
            dlq_spec(names, replicas),
        ],
    }
}

/// The durable pull consumer for a consumer config: explicit ack, deliver all, one
/// `filter_subject` (never the plural field, which 2.9 ignores), and no server-side delivery
/// limit: the daemon applies its own, so a message whose dead letter cannot be stored yet is
/// retried until it can be.
pub fn durable_config(cc: &ConsumerConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(cc.durable.clone()),
        description: Some(format!("normalize-service {} consumer", cc.kind)),
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: cc.ack_wait,
        max_deliver: -1,
        filter_subject: cc.filter_subject.clone(),
        max_ack_pending: cc.max_ack_pending,
        ..Default::default()
    }
}

/// Whether a subject pattern (possibly with `*`/`>`) matches a literal subject.
pub fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a publish stored under `subject` (a consumer's filter subject) can arrive in the
/// stream configured by `config`:
///
/// - one of its `subjects` captures `subject` as published, and the stream's subject transform
///   (if any) leaves it as it is; or
/// - it listens on a private namespace: its `subject_transform` is `<prefix>.>` → `>` (the
///   prefix without wildcards) and one of its `subjects` captures `<prefix>.<subject>`, which
///   the transform stores as `subject`. This is the zero-gap cut-over of nats-server 2.10+: an
///   account subject mapping sends publishes of `subject` to `<prefix>.<subject>`, all or a
///   weighted share of them, so the subject can reach this stream and the legacy one at once.
///
/// Any other transform shape is not evaluated: only the first rule can then hold. A 2.9 server
/// drops the transform from the stream config, so the second rule never holds there.
pub fn stream_receives(config: &stream::Config, subject: &str) -> bool {
    let transform = config.subject_transform.as_ref();
    let rewritten =
        transform.is_some_and(|t| t.source != t.destination && pattern_matches(&t.source, subject));
    if !rewritten && config.subjects.iter().any(|p| pattern_matches(p, subject)) {
        return true;
    }
    let Some(prefix) = transform
        .filter(|t| t.destination == ">")
        .and_then(|t| t.source.strip_suffix(".>"))
        .filter(|p| !p.is_empty() && p.split('.').all(|t| !t.is_empty() && t != "*" && t != ">"))
    else {
        return false;
    };
    let published = format!("{prefix}.{subject}");
    config.subjects.iter().any(|p| pattern_matches(p, &published))
}

/// Whether two subject patterns can match a common subject (JetStream's overlap rule).
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let ta: Vec<&str> = a.split('.').collect();
    let tb: Vec<&str> = b.split('.').collect();
    let mut i = 0;
    loop {
        match (ta.get(i), tb.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

/// An existing stream's name and subjects.
#[derive(Debug, Clone)]
pub struct ExistingStream {
    pub name: String,
    pub subjects: Vec<String>,
}

/// Lists the streams on the server.
pub async fn existing_streams(js: &jetstream::Context) -> Result<Vec<ExistingStream>, async_nats::Error> {
    let infos: Vec<stream::Info> = js.streams().try_collect().await?;
    Ok(infos
        .into_iter()
        .map(|i| ExistingStream {
            name: i.config.name,
            subjects: i.config.subjects,
        })
        .collect())
}

/// The first existing stream (other than `except`) holding a subject that overlaps `subject`.
pub fn holder_of<'a>(
    existing: &'a [ExistingStream],
    subject: &str,
    except: &str,
) -> Option<&'a ExistingStream> {
    existing
        .iter()
        .filter(|e| e.name != except)
        .find(|e| e.subjects.iter().any(|s| patterns_overlap(s, subject)))
}

/// `TOPOLOGY_PROVISION=missing`: creates the mode's absent streams whose subjects collide with
/// no existing stream. Never changes or deletes anything. Returns the names created.
pub async fn provision_streams(
    js: &jetstream::Context,
    config: &Config,
) -> Result<Vec<String>, async_nats::Error> {
    // The three consumer loops bind concurrently; one provisioning pass at a time.
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _guard = LOCK.lock().await;
    let existing = existing_streams(js).await?;
    let mut created = Vec::new();
    for spec in stream_specs(config.mode, &config.streams, config.replicas) {
        if existing.iter().any(|e| e.name == spec.name) {
            continue;
        }
        if let Some((subject, holder)) = spec
            .subjects
            .iter()
            .find_map(|s| holder_of(&existing, s, &spec.name).map(|h| (s, h)))
        {
            // Every consumer provisions, at start and at each rebind pass: say it once per
            // (stream, holder) in the process, then at DEBUG.
            static REPORTED: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
                std::sync::Mutex::new(std::collections::BTreeSet::new());
            let first = REPORTED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((spec.name.clone(), holder.name.clone()));
            if first {
                tracing::info!(
                    stream = %spec.name,
                    subject = %subject,
                    held_by = %holder.name,
                    "not creating stream: its subjects are held by another stream (see `normalize-service migrate plan`)"
                );
            } else {
                tracing::debug!(stream = %spec.name, held_by = %holder.name, "not creating stream (subjects held)");
            }
            continue;
        }
        match js.create_stream(spec.to_config()).await {
            Ok(_) => {
                tracing::info!(stream = %spec.name, subjects = ?spec.subjects, "created stream");
                created.push(spec.name.clone());
            }
            Err(e) => tracing::warn!(stream = %spec.name, error = %e, "could not create stream"),
        }
    }
    Ok(created)
}

/// A durable this daemon consumes from.
#[derive(Clone)]
pub struct Binding {
    pub stream: String,
    pub durable: String,
    pub consumer: jetstream::consumer::Consumer<pull::Config>,
    /// True when bound to the legacy stream in multi mode.
    pub fallback: bool,
    /// The durable's own `max_deliver` when finite (set by someone else): the last delivery is
    /// then held with progress acks while its dead letter is retried.
    pub server_max_deliver: Option<i64>,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binding")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("fallback", &self.fallback)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("no stream to bind to: {0}")]
    NothingBound(String),
    #[error("NATS request failed: {0}")]
    Nats(#[source] async_nats::Error),
}

/// The streams a consumer may bind to, in order.
pub fn candidates(config: &Config, cc: &ConsumerConfig) -> Vec<String> {
    match config.mode {
        StreamMode::Single => vec![config.streams.legacy.clone()],
        StreamMode::Multi => vec![
            config.streams.primary(cc.primary).to_string(),
            config.streams.legacy.clone(),
        ],
    }
}

fn is_not_found(code: Option<jetstream::ErrorCode>) -> bool {
    matches!(
        code,
        Some(jetstream::ErrorCode::STREAM_NOT_FOUND) | Some(jetstream::ErrorCode::CONSUMER_NOT_FOUND)
    )
}

/// Binds the durable on one stream, creating the durable when provisioning allows and the
/// stream's subjects cover the filter. `Ok(None)` when the stream or durable is not there.
pub async fn bind_on(
    js: &jetstream::Context,
    config: &Config,
    cc: &ConsumerConfig,
    stream_name: &str,
) -> Result<Option<Binding>, BindError> {
    let stream = match js.get_stream(stream_name).await {
        Ok(s) => s,
        Err(e) => {
            let code = if let jetstream::context::GetStreamErrorKind::JetStream(je) = e.kind() {
                Some(je.error_code())
            } else {
                None
            };
            if is_not_found(code) {
                return Ok(None);
            }
            return Err(BindError::Nats(Box::new(e)));
        }
    };
    let consumer = match js
        .get_consumer_from_stream::<pull::Config, _, _>(&cc.durable, stream_name)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            let code = if let jetstream::stream::ConsumerErrorKind::JetStream(je) = e.kind() {
                Some(je.error_code())
            } else {
                None
            };
            if !is_not_found(code) {
                return Err(BindError::Nats(Box::new(e)));
            }
            if config.provision == crate::config::Provision::Off {
                return Ok(None);
            }
            if !stream_receives(&stream.cached_info().config, &cc.filter_subject) {
                tracing::warn!(
                    consumer = %cc.kind, stream = %stream_name, filter = %cc.filter_subject,
                    "not creating durable: the stream receives no message under its filter subject"
                );
                return Ok(None);
            }
            let created = stream
                .create_consumer(durable_config(cc))
                .await
                .map_err(|e| BindError::Nats(Box::new(e)))?;
            tracing::info!(consumer = %cc.kind, stream = %stream_name, durable = %cc.durable, "created durable");
            created
        }
    };
    let binding = binding_of(consumer, cc, stream_name);
    warn_about_durable(&binding, cc);
    Ok(Some(binding))
}

/// The durable of `cc` on `stream_name` when it exists there, never created: for draining a
/// durable the subjects have moved away from. `Ok(None)` when the stream or durable is absent.
pub async fn existing_durable(
    js: &jetstream::Context,
    cc: &ConsumerConfig,
    stream_name: &str,
) -> Result<Option<Binding>, BindError> {
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&cc.durable, stream_name)
        .await
    {
        Ok(c) => Ok(Some(binding_of(c, cc, stream_name))),
        Err(e) => {
            let code = if let jetstream::stream::ConsumerErrorKind::JetStream(je) = e.kind() {
                Some(je.error_code())
            } else {
                None
            };
            if is_not_found(code) {
                Ok(None)
            } else {
                Err(BindError::Nats(Box::new(e)))
            }
        }
    }
}

fn binding_of(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    cc: &ConsumerConfig,
    stream_name: &str,
) -> Binding {
    let info = consumer.cached_info();
    let server_max_deliver = (info.config.max_deliver > 0).then_some(info.config.max_deliver);
    Binding {
        stream: stream_name.to_string(),
        durable: cc.durable.clone(),
        consumer,
        fallback: false,
        server_max_deliver,
    }
}

/// Logs what in an existing durable's configuration differs from what the daemon would have
/// created and matters to it: once per binding taken into use (a bind, or a stranded durable
/// adopted), never on the lookups of every rebind tick.
pub fn warn_about_durable(b: &Binding, cc: &ConsumerConfig) {
    let config = &b.consumer.cached_info().config;
    let (stream, durable) = (&b.stream, &b.durable);
    if config.filter_subject != cc.filter_subject {
        tracing::warn!(
            consumer = %cc.kind, %stream, %durable,
            existing = %config.filter_subject, configured = %cc.filter_subject,
            "existing durable has a different filter subject; consuming it as it is"
        );
    }
    if let Some(m) = b.server_max_deliver {
        tracing::warn!(
            consumer = %cc.kind, %stream, %durable,
            server_max_deliver = m, daemon_max_deliver = cc.max_deliver,
            "durable has a finite server-side max_deliver; its last delivery will be held with progress acks while a dead letter is retried"
        );
    }
    if let Some(room) = pipeline_room(cc, config.max_ack_pending) {
        tracing::warn!(
            consumer = %cc.kind, %stream, %durable,
            max_ack_pending = config.max_ack_pending, batch_size = cc.batch_size,
            pipeline_depth = cc.pipeline_depth, full_batches_unacked = room,
            "the durable's max_ack_pending holds fewer messages than the pipeline and its prefetched pull (batch size × (pipeline depth + 1)): JetStream delivers no more until acks arrive, and throughput drops; raise max_ack_pending on the durable (the daemon never edits an existing durable) or lower the batch size or pipeline depth"
        );
    }
}

/// `Some(full batches the durable lets be unacked)` when the durable's `max_ack_pending` cannot
/// hold a full pipeline and the pull prefetched behind it (`batch_size × (pipeline_depth + 1)`
/// messages, see `consumer::intake`); `None` when it can, or when it is unlimited (-1).
pub fn pipeline_room(cc: &ConsumerConfig, max_ack_pending: i64) -> Option<i64> {
    let room = cc.batch_size.saturating_mul(cc.pipeline_depth.saturating_add(1));
    let room = i64::try_from(room).unwrap_or(i64::MAX);
    (max_ack_pending > 0 && room > max_ack_pending)
        .then(|| max_ack_pending / i64::try_from(cc.batch_size.max(1)).unwrap_or(i64::MAX))
}

/// Binds a consumer: primary first, then the legacy stream (multi); legacy only (single).
/// A candidate that receives the filter subject ([`stream_receives`]) goes before one that does
/// not, so after a rollback the daemon binds where messages actually arrive.
pub async fn bind(
    js: &jetstream::Context,
    config: &Config,
    cc: &ConsumerConfig,
) -> Result<Binding, BindError> {
    if config.provision == crate::config::Provision::Missing {
        if let Err(e) = provision_streams(js, config).await {
            tracing::warn!(error = %e, "listing streams for provisioning failed");
        }
    }
    let mut streams = candidates(config, cc);
    let capturing = capturing_stream(js, config, cc).await;
    if let Some(c) = capturing {
        streams.retain(|s| *s != c);
        streams.insert(0, c);
    }
    let primary = config.streams.primary(cc.primary).to_string();
    let mut tried = Vec::new();
    for name in &streams {
        match bind_on(js, config, cc, name).await {
            Ok(Some(mut b)) => {
                b.fallback = config.mode == StreamMode::Multi && *name != primary;
                return Ok(b);
            }
            Ok(None) => tried.push(format!("{name}: stream or durable {} absent", cc.durable)),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(BindError::NothingBound(tried.join("; ")))
}

/// The first candidate stream that receives the consumer's filter subject
/// ([`stream_receives`]): the primary stream while it does, even when a weighted subject
/// mapping still sends part of the subject to the legacy stream. `None` also when the server
/// cannot tell for a stream before it (a timeout, a leader election): a later stream is no
/// answer then, and taking it would report a fallback that did not happen.
pub async fn capturing_stream(
    js: &jetstream::Context,
    config: &Config,
    cc: &ConsumerConfig,
) -> Option<String> {
    for name in candidates(config, cc) {
        match stream_receives_now(js, &name, &cc.filter_subject).await {
            Some(true) => return Some(name),
            Some(false) => {}
            None => return None,
        }
    }
    None
}

/// Whether the stream `name` receives `subject` now ([`stream_receives`]): one stream info
/// request. `Some(false)` when the stream does not exist, `None` when the server cannot tell.
pub async fn stream_receives_now(js: &jetstream::Context, name: &str, subject: &str) -> Option<bool> {
    match js.get_stream(name).await {
        Ok(stream) => Some(stream_receives(&stream.cached_info().config, subject)),
        Err(e) => {
            let code = if let jetstream::context::GetStreamErrorKind::JetStream(je) = e.kind() {
                Some(je.error_code())
            } else {
                None
            };
            is_not_found(code).then_some(false)
        }
    }
}

/// True when the error code says the durable or its stream no longer exists.
pub async fn binding_gone(binding: &Binding) -> bool {
    match binding.consumer.get_info().await {
        Ok(_) => false,
        Err(e) => {
            use jetstream::context::ConsumerInfoErrorKind as K;
            match e.kind() {
                K::NotFound | K::StreamNotFound => true,
                K::JetStream(je) => is_not_found(Some(je.error_code())),
                K::InvalidName | K::Offline | K::Request | K::TimedOut | K::NoResponders => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_follows_jetstream_rules() {
        assert!(patterns_overlap(
            "athlete-ally.>",
            "athlete-ally.hrv.raw-received"
        ));
        assert!(patterns_overlap("athlete-ally.>", "athlete-ally.>"));
        assert!(patterns_overlap("sleep.*", "sleep.x"));
        assert!(patterns_overlap("*.hrv", "athlete-ally.*"));
        assert!(!patterns_overlap("sleep.*", "sleep.a.b"));
        assert!(!patterns_overlap("dlq.>", "athlete-ally.>"));
        assert!(!patterns_overlap("vendor.>", "vendor"));
        assert!(!patterns_overlap("a.b", "a.c"));
    }

    #[test]
    fn a_pipeline_that_max_ack_pending_cannot_hold_is_told() {
        let config = Config::from_vars([
            ("HRV_BATCH_SIZE".to_string(), "500".to_string()),
            ("HRV_PIPELINE_DEPTH".to_string(), "3".to_string()),
        ])
        .unwrap();
        let cc = config.consumer(crate::config::ConsumerKind::Hrv).unwrap();
        // The default 1,000 holds two of the three batches of 500 (and no prefetched pull).
        assert_eq!(pipeline_room(cc, 1000), Some(2));
        assert_eq!(pipeline_room(cc, 1500), Some(3));
        assert_eq!(pipeline_room(cc, 1999), Some(3));
        assert_eq!(pipeline_room(cc, 2000), None);
        assert_eq!(pipeline_room(cc, -1), None);
        assert_eq!(pipeline_room(cc, 100), Some(0));
        // The defaults (batch 10, depth 3) fit in the default 1,000.
        let defaults = Config::from_vars(std::iter::empty::<(String, String)>()).unwrap();
        let cc = defaults.consumer(crate::config::ConsumerKind::Hrv).unwrap();
        assert_eq!(pipeline_room(cc, 1000), None);
    }

    #[test]
    fn filter_coverage() {
        assert!(pattern_matches("athlete-ally.>", "athlete-ally.hrv.raw-received"));
        assert!(pattern_matches("vendor.>", "vendor.oura.webhook.received"));
        assert!(!pattern_matches("sleep.*", "athlete-ally.sleep.raw-received"));
        assert!(!pattern_matches("athlete-ally.>", "athlete-ally"));
    }

    fn stream(subjects: &[&str], transform: Option<(&str, &str)>) -> stream::Config {
        stream::Config {
            name: "S".into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            subject_transform: transform.map(|(source, destination)| stream::SubjectTransform {
                source: source.into(),
                destination: destination.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn what_a_stream_receives() {
        const HRV: &str = "athlete-ally.hrv.raw-received";
        const OURA: &str = "vendor.oura.webhook.received";
        const SLEEP: &str = "sleep.raw-received";
        let ns = Some(("mig.>", ">"));
        // (stream subjects, transform, filter subject, received)
        type Case<'a> = (&'a [&'a str], Option<(&'a str, &'a str)>, &'a str, bool);
        let cases: &[Case] = &[
            // Subjects as published.
            (&["athlete-ally.>", "vendor.>", "sleep.*"], None, HRV, true),
            (&["athlete-ally.>", "vendor.>", "sleep.*"], None, OURA, true),
            (&["athlete-ally.>", "sleep.*"], None, OURA, false),
            (&["AA_VENDOR_HOT"], None, OURA, false),
            (&["mig.vendor.>"], None, OURA, false),
            // The private namespace with the stripping transform.
            (&["mig.vendor.>"], ns, OURA, true),
            (&["mig.vendor.>"], ns, HRV, false),
            (&["mig.athlete-ally.>", "mig.sleep.*"], ns, HRV, true),
            (&["mig.athlete-ally.>", "mig.sleep.*"], ns, SLEEP, true),
            (&["mig.athlete-ally.>", "mig.sleep.*"], ns, "sleep.a.b", false),
            (&["mig.athlete-ally.>", "mig.sleep.*"], ns, OURA, false),
            // Phase 3: the real subjects beside the namespace, then alone.
            (&["mig.vendor.>", "vendor.>"], ns, OURA, true),
            (&["vendor.>"], ns, OURA, true),
            (&["vendor.>"], None, OURA, true),
            // A longer prefix.
            (&["x.y.vendor.>"], Some(("x.y.>", ">")), OURA, true),
            (&["x.vendor.>"], Some(("x.y.>", ">")), OURA, false),
            // Other transform shapes are not evaluated.
            (&["mig.vendor.>"], Some(("mig.>", "moved.>")), OURA, false),
            (&["mig.vendor.>"], Some(("mig.*.>", ">")), OURA, false),
            (&["mig.vendor.>"], Some((">", ">")), OURA, false),
            (
                &["mig.vendor.>"],
                Some(("mig.vendor.*", "{{wildcard(1)}}")),
                OURA,
                false,
            ),
            // ... but a subject they leave alone is still received as published.
            (&["vendor.>", "mig.>"], Some(("mig.>", "moved.>")), OURA, true),
            (&["vendor.>"], Some(("vendor.>", "vendor.>")), OURA, true),
            // A subject the transform rewrites is not stored under itself.
            (&["vendor.>"], Some(("vendor.>", "other.>")), OURA, false),
            (&["mig.vendor.>"], ns, "mig.vendor.x", false),
        ];
        for (subjects, transform, subject, expected) in cases {
            assert_eq!(
                stream_receives(&stream(subjects, *transform), subject),
                *expected,
                "{subjects:?} {transform:?} {subject}"
            );
        }
    }

    #[test]
    fn specs_match_the_spec_table() {
        let n = StreamNames::default();
        let multi = stream_specs(StreamMode::Multi, &n, 1);
        assert_eq!(
            multi.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["AA_CORE_HOT", "AA_VENDOR_HOT", "AA_DLQ"]
        );
        assert_eq!(multi[0].max_age, 48 * HOUR);
        assert_eq!(multi[2].max_age, 14 * 24 * HOUR);
        let single = stream_specs(StreamMode::Single, &n, 3);
        assert_eq!(single[0].subjects, ["athlete-ally.>", "vendor.>", "sleep.*"]);
        assert_eq!(single[0].max_age, 24 * HOUR);
        assert_eq!(single[1].name, "AA_DLQ");
        let c = single[0].to_config();
        assert_eq!(c.num_replicas, 3);
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        // No two streams of one mode overlap.
        for specs in [&multi, &single] {
            for (i, a) in specs.iter().enumerate() {
                for b in &specs[i + 1..] {
                    for sa in &a.subjects {
                        assert!(b.subjects.iter().all(|sb| !patterns_overlap(sa, sb)));
                    }
                }
            }
        }
    }
}
