//! Command line: `run` (the default), `healthcheck`, and the operator commands `topology`,
//! `migrate` and `dlq`.
//!
//! - [`output`]   one EPIPE-safe writer for text and `--json`, the report model, exit codes
//! - [`server`]   the operator commands' NATS context, typed error and read-only queries
//! - [`topology`] `topology apply|status`
//! - [`migrate`]  `migrate plan|phase0..3|rollback|verify`: pure phase classification, one
//!   function per step, the checks and the end-to-end probe
//! - [`dlq`]      `dlq list|show|replay|purge|stats`
//!
//! The daemon never imports this module; it shares [`crate::nats`] and [`crate::topology`].

use std::time::Duration;

use clap::{Parser, Subcommand};

/// The exit codes of `topology` and `migrate`, for their `--help` (docs/MIGRATION.md).
macro_rules! ops_exit_codes {
    () => {
        "Exit codes: 0 done (and verified); 1 an action, check or probe failed, or NATS or \
         PostgreSQL unreachable; 2 configuration or usage error; 3 refused (a pre-check failed, an \
         overlap, or --yes missing): nothing was changed."
    };
}
pub(crate) use ops_exit_codes;

pub mod dlq;
pub mod migrate;
pub mod output;
pub mod server;
pub mod topology;

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

const RUN_HELP: &str = "Configuration (environment variables, all of them in docs/CONFIGURATION.md):
  NATS_URL           nats://[user:password@]host:4222 (comma-separated for a cluster)
  DATABASE_URL       postgres://user:password@host:5432/db
  EVENT_STREAM_MODE  single | multi (the legacy stream, or the three streams)
  PORT               HTTP port of /health, /health/ready and /metrics
  LOG_FORMAT, RUST_LOG  log format and level
A bad value stops the start with exit 2, naming the variable.

Example:
  NATS_URL=nats://nats:4222 DATABASE_URL=postgres://app@db/app normalize-service run

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 start-up or run failure; 2 configuration error.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default). All configuration comes from the environment.
    #[command(after_help = RUN_HELP)]
    Run,
    /// Exit 0 when GET /health/ready on 127.0.0.1:$PORT answers 200, else 1 (for HEALTHCHECK).
    #[command(
        after_help = "Example:\n  normalize-service healthcheck --timeout 3\n\nExit codes: 0 ready; 1 not ready or the health endpoint unreachable; 2 configuration error."
    )]
    Healthcheck {
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Create, update or inspect the streams and durables (never deletes).
    Topology {
        #[command(subcommand)]
        command: topology::TopologyCommand,
    },
    /// Walk the 1 → 3 stream migration safely, phase by phase.
    Migrate {
        #[command(subcommand)]
        command: migrate::MigrateCommand,
    },
    /// Inspect, replay and purge dead letters.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
}

/// The one duration syntax of the operator commands: `<n><unit>` with unit `ms`, `s`, `m`,
/// `h`, `d` or `w` (`14d`, `2h`, `30m`, `45s`), or a bare `0`. `None` when malformed or too large.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs_per_unit = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(secs_per_unit).map(Duration::from_secs)
}

/// A duration flag's value that [`parse_duration`] does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration like 14d, 2h, 30m, 45s or 0")]
pub struct InvalidDuration {
    input: String,
}

/// [`parse_duration`] as a clap value parser: a bad value is a usage error (exit 2).
pub fn duration_arg(s: &str) -> Result<Duration, InvalidDuration> {
    parse_duration(s).ok_or_else(|| InvalidDuration { input: s.into() })
}

/// The longest wait a `--…-timeout SECS` flag takes (a day): a larger one is a usage error, not
/// a deadline past what `Instant` can hold.
pub const MAX_WAIT_SECS: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("14d"), Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1w"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "x", "5", "5y", "m", "-5m", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration("999999999999999999d"), None, "overflow");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_shows_an_example_and_its_exit_codes() {
        use clap::CommandFactory;
        fn leaves(c: &clap::Command, path: String, out: &mut Vec<(String, String)>) {
            let subs: Vec<&clap::Command> = c.get_subcommands().collect();
            if subs.is_empty() {
                let help = c.get_after_help().map(|h| h.to_string()).unwrap_or_default();
                out.push((path.clone(), help));
            }
            for s in subs {
                leaves(s, format!("{path} {}", s.get_name()), out);
            }
        }
        let mut all = Vec::new();
        leaves(&Cli::command(), "normalize-service".into(), &mut all);
        assert!(all.len() >= 16, "{all:?}");
        for (path, help) in all {
            assert!(
                help.contains("Example:") && help.contains("Exit codes"),
                "{path}: {help:?}"
            );
        }
        let run = Cli::command()
            .find_subcommand("run")
            .and_then(|c| c.get_after_help().map(|h| h.to_string()))
            .unwrap_or_default();
        assert!(
            run.contains("docs/CONFIGURATION.md") && run.contains("NATS_URL"),
            "{run}"
        );
    }

    #[test]
    fn out_of_range_numbers_and_bad_durations_are_usage_errors() {
        let huge = u64::MAX.to_string();
        for args in [
            vec!["migrate", "verify", "phase1", "--probe-timeout", huge.as_str()],
            vec!["migrate", "phase1", "--probe-timeout", "86401"],
            vec!["migrate", "phase1", "--mapping-timeout", huge.as_str()],
            vec!["migrate", "shift", "vendor", "10", "--mapping-timeout", "86401"],
            vec!["migrate", "phase3", "--quiet-period", "2x"],
            vec!["migrate", "phase3", "--quiet-period", "99999999999999999999d"],
            vec!["dlq", "show", "0"],
            vec!["dlq", "replay", "0", "5"],
            vec!["dlq", "purge", "0"],
        ] {
            let e = Cli::try_parse_from(std::iter::once("normalize-service").chain(args.iter().copied()))
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        for args in [
            vec!["migrate", "verify", "phase1", "--probe-timeout", "86400"],
            vec!["migrate", "phase3", "--quiet-period", "0"],
            vec!["dlq", "replay", "1", "5"],
        ] {
            let parsed =
                Cli::try_parse_from(std::iter::once("normalize-service").chain(args.iter().copied()));
            assert!(parsed.is_ok(), "{args:?}: {parsed:?}");
        }
    }

    #[test]
    fn verify_takes_no_step_flags() {
        for flag in ["--dry-run", "--yes"] {
            let args = ["normalize-service", "migrate", "verify", "phase1", flag];
            assert!(Cli::try_parse_from(args).is_err(), "{flag}");
        }
        assert!(Cli::try_parse_from([
            "normalize-service",
            "migrate",
            "verify",
            "phase1",
            "--no-probe",
            "--json"
        ])
        .is_ok());
    }
}
