use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use normalize_service::cli::output::error_text;
use normalize_service::cli::{self, Cli, Command};
use normalize_service::config::Config;
use normalize_service::{app::Application, logging, shutdown};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run().await,
        Command::Healthcheck { timeout } => healthcheck(timeout).await,
        Command::Topology { command } => cli::topology::run(command).await,
        Command::Migrate { command } => cli::migrate::run(command).await,
        Command::Dlq { command } => cli::dlq::run(command).await,
    }
}

fn load_config() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|e| {
        eprintln!("normalize-service: configuration error: {e}");
        ExitCode::from(2)
    })
}

async fn run() -> ExitCode {
    let config = match load_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    logging::init(config.log_format);
    normalize_service::app::log_effective_config(&config);
    let shutdown_timeout = config.shutdown_timeout;
    // Listening for signals before start-up: a SIGTERM while NATS or the listener is still being
    // reached stops the process cleanly (nothing can be in flight yet) instead of killing it.
    let token = CancellationToken::new();
    let signalled = token.clone();
    tokio::spawn(async move {
        if shutdown::on_signal(signalled).await {
            shutdown::exit_after_deadline(shutdown_timeout);
        }
    });
    let built = tokio::select! {
        biased;
        _ = token.cancelled() => {
            tracing::info!(event = "stopped_during_startup", "signalled before start-up finished; exiting");
            return ExitCode::SUCCESS;
        }
        built = Application::build(config) => built,
    };
    let app = match built {
        Ok(app) => app,
        Err(e) => {
            // The causes once each (a NATS error repeats its source in its own message).
            let e = error_text(e.as_ref());
            tracing::error!(error = e, "start-up failed");
            eprintln!("normalize-service: start-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped on failure");
            ExitCode::FAILURE
        }
    }
}

/// Where `healthcheck` finds the listener: loopback when it listens on every address, else the
/// address it is bound to (a specific address does not answer on loopback).
fn probe_host(host: &str) -> &str {
    match host.trim_matches(|c| c == '[' || c == ']') {
        "" | "0.0.0.0" | "::" => "127.0.0.1",
        specific => specific,
    }
}

async fn healthcheck(timeout: u64) -> ExitCode {
    // 0 or 1 only (container runtimes reserve other codes): a configuration it cannot read is
    // not healthy.
    let config = match load_config() {
        Ok(c) => c,
        Err(_) => return ExitCode::FAILURE,
    };
    match normalize_service::http::http_get(
        probe_host(&config.host),
        config.port,
        "/health/ready",
        Duration::from_secs(timeout),
    )
    .await
    {
        Ok((200, _)) => ExitCode::SUCCESS,
        Ok((status, body)) => {
            eprintln!("not ready: HTTP {status} {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("health endpoint unreachable on port {}: {e}", config.port);
            ExitCode::FAILURE
        }
    }
}
