//! Command line: `run` (the default), `healthcheck`, and the operator commands.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "normalize-service",
    version,
    about = "Normalizes raw health events from NATS JetStream into PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default). All configuration comes from the environment.
    Run,
    /// Exit 0 when GET /health/ready on 127.0.0.1:$PORT answers 200, else 1 (for HEALTHCHECK).
    Healthcheck {
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Create, update or inspect the streams and durables (never deletes).
    Topology {
        #[command(subcommand)]
        command: crate::ops::TopologyCommand,
    },
    /// Walk the 1 → 3 stream migration safely, phase by phase.
    Migrate {
        #[command(subcommand)]
        command: crate::ops::MigrateCommand,
    },
    /// Inspect, replay and purge dead letters.
    Dlq {
        #[command(subcommand)]
        command: crate::dlq_cli::DlqCommand,
    },
}
