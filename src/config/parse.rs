//! Validators of single values: names, subjects, URLs, lists. Each error names the variable and
//! what would have been accepted.

use std::time::Duration;

use super::vars::Var;
use super::{ConfigError, DEFAULT_DATABASE_URL, DEFAULT_NATS_URL};

pub(super) fn durable_name(var: &'static str, v: &str) -> Result<String, ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 200
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(v.to_string())
    } else {
        Err(ConfigError::new(
            var,
            format!("{v:?}"),
            "a durable name of letters, digits, '-' and '_' (no dots, spaces or wildcards)",
        ))
    }
}

pub(super) fn stream_name(var: &'static str, v: Option<&str>, default: &str) -> Result<String, ConfigError> {
    match v {
        None => Ok(default.to_string()),
        Some(v) => durable_name(var, v).map_err(|mut e| {
            e.expected = "a stream name of letters, digits, '-' and '_'".into();
            e
        }),
    }
}

/// A NATS subject: dot-separated non-empty tokens without wildcards.
pub(super) fn subject(var: &'static str, v: &str) -> Result<String, ConfigError> {
    let valid = !v.is_empty()
        && v.split('.')
            .all(|t| !t.is_empty() && !t.chars().any(char::is_whitespace) && t != "*" && t != ">");
    if valid {
        Ok(v.to_string())
    } else {
        Err(ConfigError::new(
            var,
            format!("{v:?}"),
            "a NATS subject of non-empty dot-separated tokens without spaces or wildcards",
        ))
    }
}

/// A dead-letter subject prefix: a subject under `dlq.`, which the DLQ stream captures.
pub(super) fn dlq_prefix(var: &'static str, v: &str) -> Result<String, ConfigError> {
    let v = subject(var, v)?;
    if !v.starts_with("dlq.") {
        return Err(ConfigError::new(
            var,
            format!("{v:?}"),
            "a subject starting with \"dlq.\" (the AA_DLQ stream captures dlq.>)",
        ));
    }
    Ok(v)
}

pub(super) fn database_url(v: Option<&str>) -> Result<String, ConfigError> {
    let url = v.unwrap_or(DEFAULT_DATABASE_URL).to_string();
    match url::Url::parse(&url) {
        Ok(u) if u.scheme() == "postgres" || u.scheme() == "postgresql" => Ok(url),
        _ => Err(ConfigError::new(
            Var::DatabaseUrl.name(),
            crate::redact::redact_url(&url),
            "a postgres:// URL",
        )),
    }
}

pub(super) fn backoff(v: Option<&str>) -> Result<Vec<Duration>, ConfigError> {
    let list = match v {
        None => vec![1000, 5000, 15000, 30000],
        Some(raw) => {
            let parsed: Result<Vec<u64>, _> = raw.split(',').map(|p| p.trim().parse::<u64>()).collect();
            match parsed {
                Ok(list) if !list.is_empty() && list.iter().all(|&n| n <= 3_600_000) => list,
                _ => {
                    return Err(ConfigError::new(
                        Var::NormalizeRetryBackoffMs.name(),
                        format!("{raw:?}"),
                        "a comma-separated list of milliseconds, e.g. 1000,5000,15000,30000",
                    ))
                }
            }
        }
    };
    Ok(list.into_iter().map(Duration::from_millis).collect())
}

pub(super) fn nats_urls(v: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let raw = v.unwrap_or(DEFAULT_NATS_URL);
    // A piece without '@' of a list that has one may be the head of a password holding ','
    // (`nats://svc:ab,cd@h`): shown without anything after its scheme.
    let shown = |part: &str| {
        if !part.contains('@') && raw.contains('@') {
            match part.find("://") {
                Some(i) => format!("{}***", &part[..i + 3]),
                None => "***".to_string(),
            }
        } else {
            crate::redact::redact_url(part)
        }
    };
    let mut urls = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let with_scheme = if part.contains("://") {
            part.to_string()
        } else {
            format!("nats://{part}")
        };
        match url::Url::parse(&with_scheme) {
            Ok(u) if matches!(u.scheme(), "nats" | "tls") && u.host_str().is_some() => urls.push(with_scheme),
            // The client is built without WebSocket support: such a URL could never connect.
            Ok(u) if matches!(u.scheme(), "ws" | "wss") => {
                return Err(ConfigError::new(
                    Var::NatsUrl.name(),
                    shown(part),
                    "nats://host:port (or tls://) URLs: WebSocket URLs (ws://, wss://) are not supported; use the server's client port (4222), not its websocket port",
                ))
            }
            _ => {
                return Err(ConfigError::new(
                    Var::NatsUrl.name(),
                    shown(part),
                    "a comma-separated list of nats://host:port (or tls://) URLs",
                ))
            }
        }
    }
    if urls.is_empty() {
        return Err(ConfigError::new(
            Var::NatsUrl.name(),
            "\"\"",
            "at least one nats://host:port URL",
        ));
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::nats_urls;

    #[test]
    fn websocket_urls_are_refused_naming_nats_url() {
        for raw in ["ws://nats:8080", "nats://a:4222,wss://svc:s3cret@b:443"] {
            let e = nats_urls(Some(raw)).unwrap_err();
            assert_eq!(e.var, "NATS_URL");
            assert!(e.expected.contains("WebSocket"), "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        assert_eq!(
            nats_urls(Some("nats://a:4222,tls://b:4222")).unwrap(),
            ["nats://a:4222", "tls://b:4222"]
        );
    }

    #[test]
    fn an_unparseable_url_never_shows_its_password() {
        for raw in [
            "nats://svc:Ab/9xQ==@nats:42x2",
            "svc:s3cret@nats:42x2",
            "nats://svc:s3/cret@:4222",
            // A ',' in the password splits the list inside it.
            "nats://svc:s3cret,x@nats:4222",
            "nats://svc:s3cret,x/@nats:4222,nats://b:4222",
        ] {
            let e = nats_urls(Some(raw)).unwrap_err();
            let text = e.to_string();
            assert_eq!(e.var, "NATS_URL");
            assert!(
                !text.contains("s3cret") && !text.contains("s3/cret") && !text.contains("Ab/9xQ"),
                "{text}"
            );
        }
    }
}
