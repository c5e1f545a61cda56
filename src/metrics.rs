//! Metrics: one struct owning one registry; every series is registered here, once.
//!
//! Naming follows `normalize_<noun>_<unit>[_total]`, except the per-consumer message counters
//! and `dlq_messages_total`, whose names are kept from the previous service so dashboards
//! survive. Label values come from bounded sets only (consumer kinds, configured subjects,
//! stream and durable names, result and reason enums): never a user or event id.

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::{ConsumerKind, PerKind};

/// The git revision the binary was built from (build.rs; "unknown" without one).
pub const GIT_REVISION: &str = match option_env!("NORMALIZE_GIT_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// The compiler that built the binary (build.rs; "unknown" without one).
pub const RUSTC_VERSION: &str = match option_env!("NORMALIZE_RUSTC_VERSION") {
    Some(r) => r,
    None => "unknown",
};

/// What happened to one message, as counted in `normalize_<consumer>_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageResult {
    Success,
    SchemaInvalid,
    Retry,
    Dlq,
}

impl MessageResult {
    pub const ALL: [MessageResult; 4] = [
        MessageResult::Success,
        MessageResult::SchemaInvalid,
        MessageResult::Retry,
        MessageResult::Dlq,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageResult::Success => "success",
            MessageResult::SchemaInvalid => "schema_invalid",
            MessageResult::Retry => "retry",
            MessageResult::Dlq => "dlq",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Messages handled by each consumer, by outcome: `normalize_<kind>_messages_total`.
    messages: PerKind<IntCounterVec>,
    /// Dead letters whose PubAck was received (stored by JetStream).
    pub dlq_messages: IntCounterVec,
    /// Dead-letter publishes that failed; the original stays unacked and is retried.
    pub dlq_publish_failures: IntCounterVec,
    /// Time from receiving a message to its ack/nak/term.
    pub processing_duration: HistogramVec,
    /// Messages per completed pull.
    pub batch_size: HistogramVec,
    /// Time of one statement, by table.
    pub db_write_duration: HistogramVec,
    /// Time from receiving the first message of a processed batch to settling its last one.
    pub batch_duration: HistogramVec,
    /// Batches whose multi-row statement failed for a non-transient reason and were retried
    /// message by message, so that only the bad records are dead-lettered.
    pub batch_unrolled: IntCounterVec,
    /// Messages acked without a write because a newer record of the same key was in the batch.
    pub batch_superseded: IntCounterVec,
    /// 1 for each active (consumer, stream, durable) binding.
    pub consumer_bound: IntGaugeVec,
    /// Bindings made on the legacy stream because the primary was not there.
    pub stream_fallback: IntCounterVec,
    /// Pull requests that ended with an error (status 408/409, disconnect, missed heartbeat).
    pub pull_errors: IntCounterVec,
    pub consumer_pending: IntGaugeVec,
    pub consumer_ack_pending: IntGaugeVec,
    pub consumer_redelivered: IntGaugeVec,
    pub consumer_max_ack_pending: IntGaugeVec,
    /// Age of the oldest message the durable has not acknowledged (its ack floor + 1), from
    /// the info refresh: the lag in seconds.
    pub consumer_oldest_pending_age: GaugeVec,
    /// Unix time of the last message a consumer stored (acked as a success).
    pub last_store_timestamp: GaugeVec,
    /// 1 when a consumer loop has not completed a pull for 3 × its expiry.
    pub consumer_stalled: IntGaugeVec,
    /// 1 when a consumer holds messages and has settled none for 3 × ack_wait.
    pub consumer_stuck: IntGaugeVec,
    /// Messages delivered to this process and not settled yet.
    pub consumer_held: IntGaugeVec,
    /// Delivered messages dropped without ack, NAK or TERM (JetStream redelivers them only at
    /// ack_wait). Stays 0 unless the shutdown deadline abandoned work in progress.
    pub released_unsettled: IntCounterVec,
    /// Last deliveries (finite server-side max_deliver) held while their dead letter could not
    /// be stored, given up at the shutdown deadline: logged at ERROR with stream and sequence.
    pub held_abandoned: IntCounterVec,
    /// Oura webhooks stored whose `data.hrv` / `data.sleep` section (or `data` itself) could not
    /// be derived into a record; that section is dead-lettered on its own.
    oura_invalid_sections: IntCounterVec,
    /// Dead letters stored in a stream, by reason (the last token of their subject), read from
    /// the stream itself: the DLQ's depth, across restarts and instances.
    pub dlq_depth: IntGaugeVec,
    pub nats_connected: IntGauge,
    /// Reconnections of the NATS connection after it was lost.
    pub nats_reconnects: IntCounter,
    pub database_up: IntGauge,
    /// Connections the database pool holds, and how many of them are idle.
    pub database_pool_connections: IntGauge,
    pub database_pool_idle: IntGauge,
    pub build_info: IntGaugeVec,
}

const MESSAGE_LABELS: &[&str] = &["result", "subject", "stream", "durable"];
const BINDING_LABELS: &[&str] = &["consumer", "stream", "durable"];

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let seconds = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            messages: PerKind::try_new(|kind| {
                counter(
                    &registry,
                    &format!("normalize_{kind}_messages_total"),
                    &format!("{} messages handled, by result", kind.spec().messages),
                    MESSAGE_LABELS,
                )
            })?,
            dlq_messages: counter(
                &registry,
                "dlq_messages_total",
                "Dead letters stored by JetStream (counted after the PubAck)",
                &["consumer", "reason", "subject", "stream", "durable"],
            )?,
            dlq_publish_failures: counter(
                &registry,
                "normalize_dlq_publish_failures_total",
                "Dead-letter publishes that failed; the original message was NAKed, not acked",
                BINDING_LABELS,
            )?,
            processing_duration: histogram(
                &registry,
                "normalize_processing_duration_seconds",
                "Time from receiving a message to settling it (ack, nak or term)",
                BINDING_LABELS,
                seconds.clone(),
            )?,
            batch_size: histogram(
                &registry,
                "normalize_batch_size",
                "Messages received per completed pull",
                &["consumer"],
                vec![0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
            )?,
            db_write_duration: histogram(
                &registry,
                "normalize_db_write_duration_seconds",
                "Time of one write statement, by table",
                &["table"],
                seconds,
            )?,
            batch_duration: histogram(
                &registry,
                "normalize_batch_duration_seconds",
                "Time from receiving the first message of a processed batch to settling the whole batch",
                &["consumer"],
                vec![
                    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                    0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )?,
            batch_unrolled: counter(
                &registry,
                "normalize_batch_unrolled_total",
                "Batches whose multi-row write failed non-transiently and were retried one message at a time",
                &["consumer"],
            )?,
            batch_superseded: counter(
                &registry,
                "normalize_batch_superseded_messages_total",
                "Messages acked without a write because a newer record with the same key was in the same batch",
                &["consumer"],
            )?,
            consumer_bound: gauge(
                &registry,
                "normalize_consumer_bound",
                "1 for each active consumer binding",
                BINDING_LABELS,
            )?,
            stream_fallback: counter(
                &registry,
                "normalize_stream_fallback_total",
                "Consumer bindings made on the fallback (legacy) stream",
                &["consumer", "from", "to"],
            )?,
            pull_errors: counter(
                &registry,
                "normalize_pull_errors_total",
                "Pull requests that ended with an error and were re-issued",
                BINDING_LABELS,
            )?,
            consumer_pending: gauge(
                &registry,
                "normalize_consumer_pending_messages",
                "Messages in the stream not yet delivered to the durable (consumer info num_pending)",
                BINDING_LABELS,
            )?,
            consumer_ack_pending: gauge(
                &registry,
                "normalize_consumer_ack_pending_messages",
                "Messages delivered and not yet acknowledged (consumer info num_ack_pending)",
                BINDING_LABELS,
            )?,
            consumer_redelivered: gauge(
                &registry,
                "normalize_consumer_redelivered_messages",
                "Messages redelivered and not yet acknowledged (consumer info num_redelivered)",
                BINDING_LABELS,
            )?,
            consumer_max_ack_pending: gauge(
                &registry,
                "normalize_consumer_max_ack_pending",
                "The durable's max_ack_pending (consumer info config; -1 unlimited): at it JetStream stops delivering",
                BINDING_LABELS,
            )?,
            consumer_oldest_pending_age: {
                let g = GaugeVec::new(
                    Opts::new(
                        "normalize_consumer_oldest_pending_age_seconds",
                        "Age of the oldest message the durable has not acknowledged (0 when none): the lag in seconds",
                    ),
                    BINDING_LABELS,
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            last_store_timestamp: {
                let g = GaugeVec::new(
                    Opts::new(
                        "normalize_last_store_timestamp_seconds",
                        "Unix time of the last message the consumer stored and acked (0 before the first)",
                    ),
                    &["consumer"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            consumer_stalled: gauge(
                &registry,
                "normalize_consumer_stalled",
                "1 when the consumer loop has made no progress for 3 x its pull expiry",
                &["consumer"],
            )?,
            consumer_stuck: gauge(
                &registry,
                "normalize_consumer_stuck",
                "1 when the consumer holds messages and has settled none for 3 x ack_wait while NATS and the database are up",
                &["consumer"],
            )?,
            consumer_held: gauge(
                &registry,
                "normalize_consumer_held_messages",
                "Messages delivered to this process and not yet acked, NAKed or terminated",
                &["consumer"],
            )?,
            dlq_depth: gauge(
                &registry,
                "normalize_dlq_depth_messages",
                "Dead letters stored in the stream that captures dlq.>, by reason (other: a subject whose last token is no known reason)",
                &["stream", "reason"],
            )?,
            released_unsettled: counter(
                &registry,
                "normalize_messages_released_unsettled_total",
                "Delivered messages released without ack, NAK or TERM (redelivered only after ack_wait)",
                BINDING_LABELS,
            )?,
            held_abandoned: counter(
                &registry,
                "normalize_held_messages_abandoned_total",
                "Last deliveries held for a dead letter that could not be stored, given up at shutdown (see the ERROR log for stream and sequence)",
                BINDING_LABELS,
            )?,
            oura_invalid_sections: counter(
                &registry,
                "normalize_oura_invalid_sections_total",
                "Sections of stored Oura webhooks that could not be derived into records, by section",
                &["section"],
            )?,
            nats_connected: {
                let g = IntGauge::new("normalize_nats_connected", "1 while connected to NATS")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            nats_reconnects: {
                let c = IntCounter::new(
                    "normalize_nats_reconnects_total",
                    "Reconnections to NATS after the connection was lost",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            database_up: {
                let g = IntGauge::new("normalize_database_up", "1 while PostgreSQL answers")?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            database_pool_connections: {
                let g = IntGauge::new(
                    "normalize_database_pool_connections",
                    "Connections open in the database pool (at most DATABASE_MAX_CONNECTIONS)",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            database_pool_idle: {
                let g = IntGauge::new(
                    "normalize_database_pool_idle_connections",
                    "Open connections of the database pool not in use",
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            build_info: gauge(
                &registry,
                    "normalize_build_info",
                "Build information; the value is always 1",
                &["version", "git_revision", "rustc"],
            )?,
            registry,
        };
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        m.build_info
            .with_label_values(&[crate::VERSION, GIT_REVISION, RUSTC_VERSION])
            .set(1);
        for kind in ConsumerKind::ALL {
            m.consumer_stalled.with_label_values(&[kind.as_str()]).set(0);
            m.consumer_stuck.with_label_values(&[kind.as_str()]).set(0);
            m.consumer_held.with_label_values(&[kind.as_str()]).set(0);
            m.last_store_timestamp
                .with_label_values(&[kind.as_str()])
                .set(0.0);
            m.batch_unrolled.with_label_values(&[kind.as_str()]);
            m.batch_superseded.with_label_values(&[kind.as_str()]);
        }
        for section in crate::pipeline::oura::SECTIONS {
            m.oura_invalid_sections.with_label_values(&[section]);
        }
        Ok(m)
    }

    pub fn count_message(
        &self,
        kind: ConsumerKind,
        result: MessageResult,
        subject: &str,
        stream: &str,
        durable: &str,
    ) {
        self.messages[kind]
            .with_label_values(&[result.as_str(), subject, stream, durable])
            .inc();
    }

    /// Creates the zero-valued series of a new binding so dashboards and alerts see them at once.
    pub fn touch_binding(&self, kind: ConsumerKind, subject: &str, stream: &str, durable: &str) {
        for r in MessageResult::ALL {
            self.messages[kind].with_label_values(&[r.as_str(), subject, stream, durable]);
        }
        for r in crate::dlq::Reason::ALL {
            self.dlq_messages
                .with_label_values(&[kind.as_str(), r.as_str(), subject, stream, durable]);
        }
        let labels = [kind.as_str(), stream, durable];
        self.pull_errors.with_label_values(&labels);
        self.dlq_publish_failures.with_label_values(&labels);
        self.released_unsettled.with_label_values(&labels);
        self.held_abandoned.with_label_values(&labels);
    }

    /// Drops the consumer-info gauges of a binding that ended (the durable is no longer
    /// consumed here): left behind, they would show the old stream's last pending counts for
    /// ever and keep lag alerts firing. A later binding to it creates them again.
    pub fn forget_binding(&self, kind: ConsumerKind, stream: &str, durable: &str) {
        let labels = [kind.as_str(), stream, durable];
        for gauge in [
            &self.consumer_pending,
            &self.consumer_ack_pending,
            &self.consumer_redelivered,
            &self.consumer_max_ack_pending,
        ] {
            // An error only says the series was never set.
            gauge.remove_label_values(&labels).ok();
        }
        self.consumer_oldest_pending_age.remove_label_values(&labels).ok();
    }

    /// Counts one invalid section of an Oura webhook. `section` is one of
    /// [`crate::pipeline::oura::SECTIONS`] ([`crate::pipeline::InvalidSection::section`]).
    pub fn count_oura_invalid_section(&self, section: &'static str) {
        self.oura_invalid_sections.with_label_values(&[section]).inc();
    }

    pub fn observe_db_write(&self, table: &str, elapsed: Duration) {
        self.db_write_duration
            .with_label_values(&[table])
            .observe(elapsed.as_secs_f64());
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_renders_spec_names() {
        let m = Metrics::new().unwrap();
        m.touch_binding(
            ConsumerKind::Hrv,
            "athlete-ally.hrv.raw-received",
            "AA_CORE_HOT",
            "d",
        );
        m.count_message(
            ConsumerKind::Hrv,
            MessageResult::Success,
            "athlete-ally.hrv.raw-received",
            "AA_CORE_HOT",
            "d",
        );
        m.consumer_bound
            .with_label_values(&["hrv", "AA_CORE_HOT", "d"])
            .set(1);
        m.count_oura_invalid_section(crate::pipeline::oura::SECTION_SLEEP);
        for kind in [ConsumerKind::Sleep, ConsumerKind::Oura] {
            m.touch_binding(kind, "s", "AA_CORE_HOT", "d");
        }
        let text = m.render();
        for name in [
            "# HELP normalize_hrv_messages_total HRV messages handled, by result",
            "# HELP normalize_sleep_messages_total Sleep messages handled, by result",
            "# HELP normalize_oura_messages_total Oura webhook messages handled, by result",
            "normalize_hrv_messages_total{durable=\"d\",result=\"success\",stream=\"AA_CORE_HOT\",subject=\"athlete-ally.hrv.raw-received\"} 1",
            "normalize_consumer_bound",
            "normalize_consumer_stalled",
            "normalize_build_info",
            "normalize_last_store_timestamp_seconds{consumer=\"oura\"} 0",
            "normalize_nats_reconnects_total 0",
            "normalize_database_pool_connections",
            "normalize_oura_invalid_sections_total{section=\"data.hrv\"} 0",
            "normalize_oura_invalid_sections_total{section=\"data.sleep\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
