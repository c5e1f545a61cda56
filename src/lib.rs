//! normalize-service: consumes raw health events from NATS JetStream with durable pull
//! consumers, validates and normalizes them, upserts them into PostgreSQL, publishes a
//! normalized-stored event, and dead-letters what it cannot process.
//!
//! Map of the modules (the one map; the README links here):
//!
//! The daemon, in the order a message meets it:
//! - [`config`]    env → validated typed `Config`; `config::kinds` is the per-event-type table
//!   (`ConsumerKind`, its variables, durables, subjects) from which the variable list, the
//!   consumers, the metrics and the CLI values derive; errors name the variable
//! - [`nats`]      the one NATS connect (URL credentials, token, TLS CA check) for daemon and commands
//! - [`topology`]  stream/durable specs, provisioning, binding with fallback
//! - [`consumer`]  the pull loops: `binding` (bind, rebind, drain), `intake` (fetch/stream, gather),
//!   `flight` (pipeline room), `batch` (decode → write → publish → decide), `settle` (the only
//!   code that acks, NAKs, TERMs, sends progress acks or dead letters), `delivery` (the ledger)
//! - [`outcome`]   pure decisions: ack / NAK with delay / dead-letter, and what to do when a dead
//!   letter cannot be stored
//! - [`pipeline`]  one file per event type: decode + validate + normalize, its stored row, its
//!   normalized subject and body, its migration-probe sample (pure)
//! - [`store`]     PostgreSQL: pool, migrations, one generic batch upsert (collapse, key order,
//!   UNNEST) over each table's description in `store::tables`
//! - [`dlq`]       dead letters: envelope, publishing, replay headers and the event's first origin
//! - [`metrics`]   one `Metrics` struct owning the registry
//! - [`health`]    shared consumer state, stall detection and the `/health` JSON
//! - [`http`]      axum router: /health, /health/live, /health/ready, /metrics
//! - [`app`]       `Application::build` then `run_until_stopped`
//! - [`shutdown`]  signals → cancellation token, and the hard deadline
//! - [`server_version`] the connected nats-server's version and its known bugs
//!
//! The operator commands, which the daemon never imports:
//! - [`cli`]       clap commands; `cli::output` (one EPIPE-safe printer, `--json`, exit codes),
//!   `cli::topology`, `cli::migrate` (pure phase classification, one function per step,
//!   verification and probes), `cli::dlq` (list, show, replay, purge, stats)

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
