//! Integration tests: real nats-server processes and a real PostgreSQL, one isolated stack per
//! test (see `support`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod announce;
mod batch;
mod cli_ux;
mod consumers;
mod credentials;
mod cutover;
mod daemon;
mod dbfaults;
mod deploy;
mod differential;
mod dlq_cli;
mod dlq_replay;
mod edges;
mod faults;
mod hrv;
mod migration;
mod operability;
mod ordering;
mod properties;
mod security;
mod shift;
mod shutdown;
mod support;
mod versions;
