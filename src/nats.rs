//! The one way to connect to NATS, for the daemon and every operator command.
//!
//! Owns the connection options: credentials (`NATS_CREDS_FILE`, `NATS_USER`/`NATS_PASSWORD`,
//! `NATS_TOKEN`, or `user:password@` / `token@` embedded in `NATS_URL`), the TLS CA check
//! (`NATS_TLS_CA_FILE`), and how each connect failure is told apart: wrong credentials or TLS
//! settings are final, an unreachable server is not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ServerAddr};

use crate::config::NatsConfig;

/// Why a connection could not be made. Each message names the variable to fix; none shows a
/// secret (the server addresses are given without their credentials).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS_CREDS_FILE: cannot read credentials file {path}")]
    CredsFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NATS_TLS_CA_FILE: {path} is not a readable file")]
    CaFile { path: String },
    #[error("NATS_URL: cannot parse server address")]
    Address {
        #[source]
        source: std::io::Error,
    },
    #[error("TLS to NATS failed (check NATS_TLS_CA_FILE and the tls:// URL in NATS_URL)")]
    Tls {
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS refused the credentials (check NATS_USER/NATS_PASSWORD, NATS_TOKEN or NATS_CREDS_FILE)")]
    Refused {
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS_URL")]
    ServerParse {
        #[source]
        source: async_nats::ConnectError,
    },
    /// The background-retrying connect could not even be set up.
    #[error("connecting to NATS")]
    Retry {
        #[source]
        source: async_nats::ConnectError,
    },
    /// An operator command's connection did not come up in time ([`connect_now`]).
    #[error("NATS unreachable (NATS_URL): not connected within {} s", waited.as_secs())]
    Unreachable { waited: Duration },
}

/// Connects to NATS. Wrong credentials or TLS settings fail at once with a clear error; an
/// unreachable server does not: the client keeps trying in the background (the daemon's
/// readiness says disconnected meanwhile).
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, ConnectError> {
    connect_watched(cfg, None).await
}

/// [`connect`] for the daemon: every change of the connection's state is logged once, as it
/// happens (`event` = `nats_connected`, `nats_disconnected`, `nats_reconnected` with
/// `outage_ms`, `nats_lame_duck`), reconnections are counted in `reconnects`, and the last
/// error is kept for `/health` ([`ConnectionWatch::last_error`]). Operator commands use
/// [`connect`], which stays quiet.
pub async fn connect_daemon(
    cfg: &NatsConfig,
    watch: ConnectionWatch,
) -> Result<async_nats::Client, ConnectError> {
    connect_watched(cfg, Some(watch)).await
}

/// What the daemon's connection reported: its transitions, logged once each.
#[derive(Clone)]
pub struct ConnectionWatch {
    state: Arc<Mutex<WatchState>>,
    reconnects: prometheus::IntCounter,
    servers: String,
}

#[derive(Default)]
struct WatchState {
    connected_once: bool,
    down_since: Option<Instant>,
    last_error: Option<String>,
}

impl ConnectionWatch {
    /// `reconnects` counts the reconnections (`normalize_nats_reconnects_total`).
    pub fn new(cfg: &NatsConfig, reconnects: prometheus::IntCounter) -> ConnectionWatch {
        ConnectionWatch {
            state: Arc::default(),
            reconnects,
            servers: servers(cfg),
        }
    }

    /// The last error the client reported (a failed reconnection attempt, a server error).
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_event(&self, event: async_nats::Event) {
        let mut st = self.lock();
        match event {
            async_nats::Event::Connected => {
                if let Some(since) = st.down_since.take() {
                    self.reconnects.inc();
                    tracing::info!(
                        event = "nats_reconnected",
                        servers = %self.servers,
                        outage_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                        cause = st.last_error.as_deref().unwrap_or("connection closed"),
                        "NATS connection restored"
                    );
                } else if !st.connected_once {
                    tracing::info!(event = "nats_connected", servers = %self.servers, "connected to NATS");
                }
                st.connected_once = true;
            }
            async_nats::Event::Disconnected => {
                if st.down_since.is_none() {
                    st.down_since = Some(Instant::now());
                    tracing::warn!(
                        event = "nats_disconnected",
                        servers = %self.servers,
                        error = st.last_error.as_deref().unwrap_or("connection closed"),
                        "NATS connection lost; reconnecting"
                    );
                }
            }
            async_nats::Event::LameDuckMode => {
                tracing::warn!(event = "nats_lame_duck", servers = %self.servers, "NATS server entering lame duck mode; expect a reconnection");
            }
            async_nats::Event::ServerError(e) => {
                tracing::warn!(event = "nats_server_error", error = %e, "NATS server error");
                st.last_error = Some(e.to_string());
            }
            async_nats::Event::ClientError(e) => {
                tracing::debug!(error = %e, "NATS client error");
                st.last_error = Some(e.to_string());
            }
            async_nats::Event::SlowConsumer(sid) => {
                tracing::debug!(subscription = sid, "NATS slow consumer");
            }
            async_nats::Event::Draining | async_nats::Event::Closed => {}
        }
    }
}

async fn connect_watched(
    cfg: &NatsConfig,
    watch: Option<ConnectionWatch>,
) -> Result<async_nats::Client, ConnectError> {
    // The credentials are taken from the URLs by `options`; async-nats gets the URLs without
    // them because it logs server addresses verbatim at debug level.
    let urls: Vec<ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| without_credentials(u).parse::<ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|source| ConnectError::Address { source })?;
    let shown = servers(cfg);
    match options(cfg, watch.clone()).await?.connect(urls.clone()).await {
        Ok(client) => {
            if watch.is_none() {
                tracing::info!(servers = %shown, "connected to NATS");
            }
            Ok(client)
        }
        Err(source) if source.kind() == ConnectErrorKind::Tls || is_tls_failure(&source) => {
            Err(ConnectError::Tls { source })
        }
        Err(source) => match source.kind() {
            ConnectErrorKind::Io
            | ConnectErrorKind::TimedOut
            | ConnectErrorKind::Dns
            | ConnectErrorKind::MaxReconnects => {
                tracing::warn!(servers = %shown, error = %source, "NATS unreachable at start; retrying in the background");
                options(cfg, watch)
                    .await?
                    .retry_on_initial_connect()
                    .connect(urls)
                    .await
                    .map_err(|source| ConnectError::Retry { source })
            }
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                Err(ConnectError::Refused { source })
            }
            ConnectErrorKind::Tls => Err(ConnectError::Tls { source }),
            ConnectErrorKind::ServerParse => Err(ConnectError::ServerParse { source }),
        },
    }
}

/// How long an operator command waits for its connection.
pub const COMMAND_WAIT: Duration = Duration::from_secs(5);

/// [`connect`], then waits up to `wait` for the connection to be up: an operator command needs
/// an answer now, not a background reconnect.
pub async fn connect_now(cfg: &NatsConfig, wait: Duration) -> Result<async_nats::Client, ConnectError> {
    let client = connect(cfg).await?;
    let deadline = tokio::time::Instant::now() + wait;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            return Err(ConnectError::Unreachable { waited: wait });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(client)
}

/// The server addresses as they may be shown: without their credentials.
pub fn servers(cfg: &NatsConfig) -> String {
    cfg.urls
        .iter()
        .map(|u| crate::redact::redact_url(u))
        .collect::<Vec<_>>()
        .join(",")
}

/// How the connection authenticates, for the start-up line (never the secret itself).
pub fn auth_kind(cfg: &NatsConfig) -> &'static str {
    if cfg.creds_file.is_some() {
        "creds-file"
    } else if cfg.user.is_some() {
        "user-password"
    } else if cfg.token.is_some() {
        "token"
    } else {
        match url_credentials(&cfg.urls) {
            Some(UrlCredentials::UserPassword(..)) => "url-user-password",
            Some(UrlCredentials::Token(_)) => "url-token",
            None => "none",
        }
    }
}

async fn options(
    cfg: &NatsConfig,
    watch: Option<ConnectionWatch>,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let mut o = async_nats::ConnectOptions::new()
        .name("normalize-service")
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None::<usize>);
    if let Some(watch) = watch {
        o = o.event_callback(move |event| {
            watch.on_event(event);
            std::future::ready(())
        });
    }
    if let Some(path) = &cfg.creds_file {
        o = o
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::CredsFile {
                path: path.clone(),
                source,
            })?;
    }
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &cfg.token {
        o = o.token(token.clone());
    }
    // async-nats ignores credentials embedded in the URLs; honour them (as the previous
    // service did) unless the explicit variables are set.
    if cfg.user.is_none() && cfg.token.is_none() && cfg.creds_file.is_none() {
        match url_credentials(&cfg.urls) {
            Some(UrlCredentials::UserPassword(user, password)) => o = o.user_and_password(user, password),
            Some(UrlCredentials::Token(token)) => o = o.token(token),
            None => {}
        }
    }
    if let Some(ca) = &cfg.tls_ca_file {
        if !std::path::Path::new(ca).is_file() {
            return Err(ConnectError::CaFile { path: ca.clone() });
        }
        o = o.add_root_certificates(ca.into()).require_tls(true);
    }
    Ok(o)
}

/// The configuration that reaches the one server at `url` (an operator command probing through
/// each server of a cluster) with the credentials every other connection uses: the URL's own
/// when it carries any (the variables' would replace them), else those [`options`] takes from
/// `cfg` (the variables, else the first URL of `NATS_URL` that carries any).
pub fn for_server(cfg: &NatsConfig, url: &str) -> NatsConfig {
    let mut one = cfg.clone();
    one.urls = vec![url.to_string()];
    let explicit = cfg.user.is_some() || cfg.token.is_some() || cfg.creds_file.is_some();
    if url_credentials(&one.urls).is_some() {
        one.user = None;
        one.password = None;
        one.token = None;
        one.creds_file = None;
    } else if !explicit {
        match url_credentials(&cfg.urls) {
            Some(UrlCredentials::UserPassword(user, password)) => {
                one.user = Some(user);
                one.password = Some(password);
            }
            Some(UrlCredentials::Token(token)) => one.token = Some(token),
            None => {}
        }
    }
    one
}

#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// `user:password` (or a lone token) from the first URL of `NATS_URL` that carries any,
/// percent-decoded.
fn url_credentials(urls: &[String]) -> Option<UrlCredentials> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    urls.iter().find_map(|u| {
        let u = url::Url::parse(u).ok()?;
        if u.username().is_empty() {
            return None;
        }
        let user = decode(u.username());
        Some(match u.password() {
            Some(password) => UrlCredentials::UserPassword(user, decode(password)),
            None => UrlCredentials::Token(user),
        })
    })
}

fn without_credentials(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if !u.username().is_empty() => {
            // Both fail only for URLs without a host, which carry no credentials to remove.
            u.set_password(None).ok();
            u.set_username("").ok();
            u.to_string()
        }
        _ => raw.to_string(),
    }
}

/// async-nats reports a failed TLS handshake (e.g. an untrusted certificate) as an I/O error;
/// the rustls error inside says what it is. Retrying would never help, so it is final.
fn is_tls_failure(e: &async_nats::ConnectError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if err.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn credentials_come_from_the_first_url_that_has_them() {
        assert_eq!(url_credentials(&urls(&["nats://127.0.0.1:4222"])), None);
        assert_eq!(
            url_credentials(&urls(&["nats://a:4222", "nats://svc:p%40ss@b:4222"])),
            Some(UrlCredentials::UserPassword("svc".into(), "p@ss".into()))
        );
        assert_eq!(
            url_credentials(&urls(&["nats://s3cr%2Ft@host:4222"])),
            Some(UrlCredentials::Token("s3cr/t".into()))
        );
    }

    #[test]
    fn one_server_is_reached_with_the_credentials_of_nats_url() {
        let cfg = NatsConfig {
            urls: urls(&["nats://a:4222", "nats://svc:p%40ss@b:4222"]),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: None,
        };
        // A URL without credentials (a `--server`, a peer from INFO): NATS_URL's, from the
        // first URL that has any, as the main connection uses.
        let one = for_server(&cfg, "nats://c:4222");
        assert_eq!(one.urls, ["nats://c:4222"]);
        assert_eq!(
            (one.user.as_deref(), one.password.as_deref()),
            (Some("svc"), Some("p@ss"))
        );
        // Its own credentials win.
        let own = for_server(&cfg, "nats://ops:x@c:4222");
        assert_eq!((own.user, own.token), (None, None));
        assert_eq!(
            url_credentials(&own.urls),
            Some(UrlCredentials::UserPassword("ops".into(), "x".into()))
        );
        // A token in NATS_URL.
        let token = NatsConfig {
            urls: urls(&["nats://t0k@a:4222"]),
            ..cfg.clone()
        };
        assert_eq!(for_server(&token, "nats://c:4222").token.as_deref(), Some("t0k"));
        // The variables are kept as they are (they outrank any URL).
        let vars = NatsConfig {
            user: Some("env".into()),
            password: Some("pw".into()),
            ..cfg.clone()
        };
        let one = for_server(&vars, "nats://c:4222");
        assert_eq!(
            (one.user.as_deref(), one.password.as_deref()),
            (Some("env"), Some("pw"))
        );
        // … but not a --server URL's own credentials (docs/CONFIGURATION.md).
        let own = for_server(&vars, "nats://ops:x@c:4222");
        assert_eq!((own.user, own.password, own.token), (None, None, None));
        assert_eq!(
            url_credentials(&own.urls),
            Some(UrlCredentials::UserPassword("ops".into(), "x".into()))
        );
    }

    #[test]
    fn addresses_are_given_to_the_client_without_credentials() {
        let bare = without_credentials("nats://svc:secret@127.0.0.1:4222");
        assert!(!bare.contains("secret") && !bare.contains("svc"), "{bare}");
        assert!(bare.contains("127.0.0.1:4222"), "{bare}");
        assert_eq!(without_credentials("127.0.0.1:4222"), "127.0.0.1:4222");
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_refused_before_connecting() {
        let cfg = NatsConfig {
            urls: urls(&["tls://127.0.0.1:1"]),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let e = connect(&cfg).await.err();
        assert!(matches!(e, Some(ConnectError::CaFile { .. })), "{e:?}");
    }
}
