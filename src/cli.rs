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
}
