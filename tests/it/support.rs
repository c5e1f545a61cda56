//! The one test harness: the isolated stack each test gets (its own nats-server on a free port
//! with its own store, killed on drop; its own PostgreSQL database, dropped on drop), the daemon
//! in-process (`TestApp`) or as a child process (`DaemonProcess`), the operator CLI (`cli`), and
//! the NATS and database helpers the tests share. `Stack::builder()` puts them together.
//!
//! `benches/throughput.rs` includes this file too (`#[path]`), so the benchmark runs its
//! servers and daemons exactly as the tests do.
//!
//! A test that runs in both stream modes is written once, `async fn name(mode: &str)`, with
//! `per_mode!(name)` above it (`test_cases!` for other cases), so a failure names its mode.
//!
//! Parts: `servers` (nats-server, database, database proxy), `stack` (the builder, the daemon
//! in-process), `process` (the daemon as a child process, the CLI), `streams` (publishing,
//! waiting, reading streams, metrics and tables).

use std::collections::HashMap;
use std::net::TcpListener as StdListener;

#[path = "support/process.rs"]
mod process;
#[path = "support/servers.rs"]
mod servers;
#[path = "support/stack.rs"]
mod stack;
#[path = "support/streams.rs"]
mod streams;

pub use process::*;
pub use servers::*;
pub use stack::*;
pub use streams::*;

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// --- variables and modes -----------------------------------------------------------------------

/// Variables every test daemon gets; tests override what they exercise.
pub fn base_vars(nats: &NatsServer, db_url: &str) -> HashMap<String, String> {
    with(
        HashMap::new(),
        &[
            ("NATS_URL", &nats.url()),
            ("DATABASE_URL", db_url),
            ("PORT", "0"),
            ("METRICS_PORT", "0"),
            ("HOST", "127.0.0.1"),
            ("LOG_FORMAT", "pretty"),
            ("HRV_EXPIRES_MS", "1000"),
            ("SLEEP_EXPIRES_MS", "1000"),
            ("OURA_EXPIRES_MS", "1000"),
            ("NORMALIZE_RETRY_BACKOFF_MS", "100,200"),
            ("CONSUMER_INFO_INTERVAL_MS", "200"),
            ("REBIND_INTERVAL_MS", "500"),
            ("SHUTDOWN_TIMEOUT_MS", "10000"),
        ],
    )
}

/// `vars` with `extra` set (replacing what `vars` had under the same names).
pub fn with(mut vars: HashMap<String, String>, extra: &[(&str, &str)]) -> HashMap<String, String> {
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

/// Exactly these variables.
pub fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    with(HashMap::new(), pairs)
}

/// The stream the core subjects (HRV, sleep, normalized events) live on in `mode`.
pub fn core_stream(mode: &str) -> &'static str {
    if mode == "single" {
        "ATHLETE_ALLY_EVENTS"
    } else {
        "AA_CORE_HOT"
    }
}

/// The stream the vendor subjects (Oura webhooks) live on in `mode`.
pub fn vendor_stream(mode: &str) -> &'static str {
    if mode == "single" {
        "ATHLETE_ALLY_EVENTS"
    } else {
        "AA_VENDOR_HOT"
    }
}

/// One `#[tokio::test]` per case, in a module named after the test function, so a failure
/// names its case: `test_cases!(name { a: (args…), b: (args…) })` generates `name::a` and
/// `name::b`, which call `name(args…)`.
macro_rules! test_cases {
    ($name:ident { $($case:ident: ($($arg:expr),* $(,)?)),+ $(,)? }) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$name($($arg),*).await
                }
            )+
        }
    };
}
pub(crate) use test_cases;

/// One test per stream mode: `name::single` and `name::multi` call `name("single")` and
/// `name("multi")`.
macro_rules! per_mode {
    ($name:ident) => {
        $crate::support::test_cases!($name {
            single: ("single"),
            multi: ("multi")
        });
    };
}
pub(crate) use per_mode;
