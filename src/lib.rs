//! normalize-service: consumes raw health events from NATS JetStream with durable pull
//! consumers, validates and normalizes them, upserts them into PostgreSQL, publishes a
//! normalized-stored event, and dead-letters what it cannot process.
//!
//! Map of the modules:
//!
//! - [`config`]    env → validated typed `Config` (errors name the variable)
//! - [`topology`]  stream/durable specs, provisioning, binding with fallback
//! - [`consumer`]  the pull loop: fetch, dispatch, settle, watchdog progress
//! - [`outcome`]   the one place that decides ack / nak with delay / dead-letter
//! - [`pipeline`]  one file per event type: decode + validate + normalize (pure)
//! - [`store`]     PostgreSQL: pool, migrations, one function per statement
//! - [`dlq`]       dead-letter publishing
//! - [`metrics`]   one `Metrics` struct owning the registry
//! - [`health`]    shared consumer state and the `/health` JSON
//! - [`http`]      axum router: /health, /health/live, /health/ready, /metrics
//! - [`app`]       `Application::build` then `run_until_stopped`
//! - [`nats`]      the one NATS connect (credentials, TLS CA check) for daemon and commands
//! - [`cli`]       clap commands and the operator commands `topology`, `migrate`, `dlq`
//! - [`shutdown`]  signals → cancellation token
//! - [`server_version`] the connected nats-server's version and its known bugs

// No `_ =>` arm on an enum of ours (a new consumer kind, decoded event or stored row is named by
// the compiler everywhere it matters), and no result silently dropped with `let _ =`.
#![warn(clippy::wildcard_enum_match_arm, clippy::let_underscore_must_use)]

pub mod app;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod outcome;
pub mod pipeline;
pub mod redact;
pub mod server_version;
pub mod shutdown;
pub mod store;
pub mod topology;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
