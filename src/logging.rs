//! Logs through tracing: one JSON object per line by default, or human-readable.
//!
//! A JSON line holds `timestamp`, `level`, `target`, `message`, the event's fields and the
//! fields of every span it happened in (the consumer loop's `consumer`, the binding's `stream`
//! and `durable`, the batch's `messages`), all at top level, so a log query can filter on
//! `.stream` whatever code logged the line. An event's own field wins over a span's.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    let (filter, invalid) = filter_from(std::env::var("RUST_LOG").ok());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .try_init(),
        // Colours only on a terminal: a pipe or a file gets plain text.
        LogFormat::Pretty => builder
            .with_target(true)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    // A subscriber may already exist (tests); that one is kept.
    if result.is_ok() {
        if let Some((value, error)) = invalid {
            tracing::warn!(
                event = "invalid_rust_log",
                rust_log = %value,
                error = %error,
                "RUST_LOG is not a valid filter; using the default ({DEFAULT_FILTER})"
            );
        }
    }
}

/// The filter when `RUST_LOG` is unset, empty or invalid.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,async_nats=warn";

/// The filter for a `RUST_LOG` value, and the value with its error when it is invalid (then
/// the default applies).
fn filter_from(rust_log: Option<String>) -> (EnvFilter, Option<(String, String)>) {
    match rust_log.filter(|v| !v.trim().is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(value) => match EnvFilter::builder().parse(&value) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((value, e.to_string()))),
        },
    }
}

/// One JSON object per event, span fields flattened beside the event's (see the module doc).
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::String(meta.level().as_str().into()));
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            // Innermost first, so the nearest span's value of a name wins.
            for span in scope {
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields.as_str()) {
                    for (name, value) in fields {
                        line.entry(name).or_insert(value);
                    }
                }
            }
        }
        line.insert("target".into(), Value::String(meta.target().into()));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Records an event's fields into the line, typed where JSON has the type.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(run: impl FnOnce()) -> Vec<Value> {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("warn"))
            .with_writer(move || writer.clone())
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn an_invalid_rust_log_is_reported_and_the_default_used() {
        assert!(filter_from(None).1.is_none());
        assert!(filter_from(Some(" ".into())).1.is_none());
        assert!(filter_from(Some("debug,sqlx=warn".into())).1.is_none());
        let (filter, invalid) = filter_from(Some("info,foo=notalevel".into()));
        assert_eq!(invalid.map(|(v, _)| v).as_deref(), Some("info,foo=notalevel"));
        assert_eq!(filter.to_string(), EnvFilter::new(DEFAULT_FILTER).to_string());
    }

    #[test]
    fn span_fields_are_top_level_even_when_the_filter_is_above_their_level() {
        let lines = lines_of(|| {
            let consumer = tracing::error_span!("consumer", consumer = "hrv");
            let _c = consumer.enter();
            let binding = tracing::error_span!("binding", stream = "AA_CORE_HOT", durable = "d");
            let _b = binding.enter();
            tracing::info!("filtered out");
            tracing::warn!(seq = 7u64, stream = "OTHER", ok = true, "held");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["level"], "WARN");
        assert_eq!(l["message"], "held");
        assert_eq!(l["consumer"], "hrv");
        assert_eq!(l["durable"], "d");
        assert_eq!(l["seq"], 7);
        assert_eq!(l["ok"], true);
        assert_eq!(l["stream"], "OTHER", "the event's own field wins");
        assert!(l["timestamp"].is_string() && l["target"].is_string());
    }
}
