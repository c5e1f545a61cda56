//! Operator commands: `topology apply|status` and `migrate …`.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Not implemented yet.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Not implemented yet.
    Plan,
}

pub async fn topology(_cmd: TopologyCommand) -> ExitCode {
    eprintln!("normalize-service topology: not implemented yet");
    ExitCode::FAILURE
}

pub async fn migrate(_cmd: MigrateCommand) -> ExitCode {
    eprintln!("normalize-service migrate: not implemented yet");
    ExitCode::FAILURE
}
