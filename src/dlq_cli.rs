//! `normalize-service dlq …`: inspect, replay and purge dead letters.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Not implemented yet.
    Stats,
}

pub async fn run(_cmd: DlqCommand) -> ExitCode {
    eprintln!("normalize-service dlq: not implemented yet");
    ExitCode::FAILURE
}
