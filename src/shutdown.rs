//! Signals → one root cancellation token, and the last-resort exit after the shutdown deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long after `SHUTDOWN_TIMEOUT_MS` the process ends by force if the orderly stop (itself
/// bounded) has still not finished: a safety net for whatever the bounds did not foresee
/// (a blocking call, a runtime that cannot shut down).
pub const HARD_EXIT_AFTER_DEADLINE: Duration = Duration::from_millis(1500);

/// Cancels `token` on SIGTERM or SIGINT; returns whether a signal arrived (false when the
/// token was cancelled some other way).
pub async fn on_signal(token: CancellationToken) -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
                    _ = token.cancelled() => return false,
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; falling back to ctrl-c");
                if wait_for_ctrl_c(&token).await.is_none() {
                    return false;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        if wait_for_ctrl_c(&token).await.is_none() {
            return false;
        }
    }
    token.cancel();
    true
}

/// Waits for ctrl-c; `None` when the token was cancelled first, or when no handler can be
/// installed at all (then only the token stops the process: a failed handler is not a signal).
async fn wait_for_ctrl_c(token: &CancellationToken) -> Option<()> {
    tokio::select! {
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => {
                tracing::info!(signal = "SIGINT", "shutting down");
                Some(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for ctrl-c either; stop the process by other means");
                token.cancelled().await;
                None
            }
        },
        _ = token.cancelled() => None,
    }
}

/// Starts a plain thread (independent of the async runtime, which may be what is stuck) that
/// ends the process `timeout` + [`HARD_EXIT_AFTER_DEADLINE`] from now. Exit code 0, as for
/// any stop asked for by a signal: what was left unsettled is redelivered by JetStream.
pub fn exit_after_deadline(timeout: Duration) {
    let limit = timeout + HARD_EXIT_AFTER_DEADLINE;
    let spawned = std::thread::Builder::new()
        .name("shutdown-deadline".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "orderly shutdown did not finish in time; exiting now (unsettled messages will be redelivered)"
            );
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the shutdown deadline thread");
    }
}
