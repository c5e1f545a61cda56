//! The service binary as a child process: the daemon (`DaemonProcess`) and the operator CLI
//! (`cli`).

use std::collections::HashMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The service binary, for tests that run it as a process.
pub const BIN: &str = env!("CARGO_BIN_EXE_normalize-service");

/// `normalize-service run` as a child process with exactly the given variables (plus PATH),
/// killed on drop. Its stdout and stderr go to files (`stdout`, `stderr`, `output`) unless it
/// was started with `spawn_showing_stderr`.
pub struct DaemonProcess {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    logs: Option<tempfile::TempDir>,
}

/// How long a daemon process may take to become ready: a bound for a hang, not a performance
/// assertion.
const PROCESS_READY_WITHIN: Duration = Duration::from_secs(60);

impl DaemonProcess {
    /// Starts the daemon with `vars`; `PORT` and `METRICS_PORT` get free ports unless `vars`
    /// names non-zero ones.
    pub fn spawn(vars: &HashMap<String, String>) -> DaemonProcess {
        let logs = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(logs.path().join("stdout")).unwrap();
        let err = std::fs::File::create(logs.path().join("stderr")).unwrap();
        Self::start(vars, Stdio::from(out), Stdio::from(err), Some(logs))
    }

    /// Starts the daemon with `vars`, its stderr on this process's stderr, its stdout discarded
    /// (the benchmark).
    #[allow(dead_code)]
    pub fn spawn_showing_stderr(vars: &HashMap<String, String>) -> DaemonProcess {
        Self::start(vars, Stdio::null(), Stdio::inherit(), None)
    }

    fn start(
        vars: &HashMap<String, String>,
        out: Stdio,
        err: Stdio,
        logs: Option<tempfile::TempDir>,
    ) -> DaemonProcess {
        let port_of = |name: &str| match vars.get(name).and_then(|p| p.parse::<u16>().ok()) {
            Some(p) if p != 0 => p,
            _ => free_port(),
        };
        let (port, metrics_port) = (port_of("PORT"), port_of("METRICS_PORT"));
        let child = Command::new(BIN)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(vars)
            .env("PORT", port.to_string())
            .env("METRICS_PORT", metrics_port.to_string())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        DaemonProcess {
            child,
            port,
            metrics_port,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self, name: &str) -> String {
        self.logs
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join(name)).ok())
            .unwrap_or_default()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.log("stdout")
    }

    /// Everything the process wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        self.log("stderr")
    }

    /// Everything the process wrote so far, stdout then stderr.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout(), self.stderr())
    }

    /// GET on one of its ports; `(0, "")` when the request fails.
    pub async fn get_on(&self, port: u16, path: &str) -> (u16, String) {
        normalize_service::http::http_get("127.0.0.1", port, path, Duration::from_secs(5))
            .await
            .unwrap_or((0, String::new()))
    }

    /// GET on its main port; `(0, "")` when the request fails.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.get_on(self.port, path).await
    }

    /// A scrape of its metrics port (empty when it fails; used by the benchmark).
    #[allow(dead_code)]
    pub async fn metrics(&self) -> String {
        self.get_on(self.metrics_port, "/metrics").await.1
    }

    /// Waits until `/health/ready` answers 200; an error (with what the process wrote) if it
    /// exits first or is not ready within `within`.
    pub async fn try_wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let ready = normalize_service::http::http_get(
                "127.0.0.1",
                self.port,
                "/health/ready",
                Duration::from_secs(2),
            )
            .await;
            if matches!(ready, Ok((200, _))) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "the daemon exited with {status} before it was ready:\n{}",
                    self.output()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the daemon did not become ready within {within:?}:\n{}",
                    self.output()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/health/ready` answers 200; panics (with what the process wrote) if it exits
    /// first or hangs.
    pub async fn wait_ready(&mut self) {
        if let Err(e) = self.try_wait_ready(PROCESS_READY_WITHIN).await {
            panic!("{e}");
        }
    }

    /// Sends `sig` (`TERM`, `INT`, …) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} {}", self.child.id());
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit by itself; `None` (and the process is killed) if it does
    /// not within `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like `wait_exit`, but a process still running after `within` is a test failure.
    pub async fn expect_exit(&mut self, within: Duration) -> ExitStatus {
        match self.wait_exit(within).await {
            Some(status) => status,
            None => panic!("the daemon did not exit within {within:?}:\n{}", self.output()),
        }
    }

    /// SIGTERM, then the exit status and the time from the signal to the exit; `None` (and the
    /// process is killed) if it is still running after `within`.
    pub async fn terminate(&mut self, within: Duration) -> (Option<ExitStatus>, Duration) {
        self.signal("TERM");
        let sent = Instant::now();
        let status = self.wait_exit(within).await;
        (status, sent.elapsed())
    }

    /// SIGTERM, which must end the process with exit code 0 within 30 s.
    pub async fn stop(&mut self) {
        let (status, _) = self.terminate(Duration::from_secs(30)).await;
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "SIGTERM must stop the daemon with 0:\n{}",
            self.output()
        );
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// What one CLI run returned.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout parsed as JSON (a test failure if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `normalize-service <args>` with exactly `vars` as its environment.
pub async fn cli(vars: &HashMap<String, String>, args: &[&str]) -> CliRun {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(vars)
        .output()
        .await
        .unwrap();
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `normalize-service <args> --json`, expects exit code `code`, and returns the output.
pub async fn cli_json(vars: &HashMap<String, String>, args: &[&str], code: i32) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let r = cli(vars, &all).await;
    assert_eq!(
        r.code, code,
        "{args:?}\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r.json()
}
