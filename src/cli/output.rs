//! How every operator command answers: text or `--json` on stdout through one writer that a
//! closed pipe (`dlq list | head`) cannot crash, errors with their causes on stderr, the report
//! model of `topology` and `migrate`, and the exit codes scripts rely on.

use std::error::Error;
use std::fmt;
use std::io::Write as _;
use std::process::ExitCode;

use serde::Serialize;

use crate::cli::migrate::Phase;

/// Success.
pub const EXIT_OK: u8 = 0;
/// An operational failure: NATS unreachable, a request, a check or a publish failed.
pub const EXIT_FAILED: u8 = 1;
/// A usage or configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// `topology` / `migrate`: refused (a pre-check failed, an overlap, or `--yes` missing).
pub const EXIT_REFUSED: u8 = 3;
/// `dlq`: not found (the dead-letter stream is missing, or a requested sequence).
pub const EXIT_NOT_FOUND: u8 = 3;

/// An error a command ends with: its message (with causes) goes to stderr, its code is the
/// process's exit code.
pub trait Failure: Error + 'static {
    fn exit_code(&self) -> u8;
}

/// Text being built for stdout; written at once by [`print()`].
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    pub fn line(&mut self, args: fmt::Arguments<'_>) {
        match args.as_str() {
            Some(s) => self.0.push_str(s),
            None => self.0.push_str(&fmt::format(args)),
        }
        self.0.push('\n');
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `outln!(text)` adds an empty line, `outln!(text, "{}…", …)` a formatted one.
macro_rules! outln {
    ($text:expr) => {
        $text.line(format_args!(""))
    };
    ($text:expr, $($arg:tt)*) => {
        $text.line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Writes `text` to stdout. A write error (a closed pipe such as `| head`) ends the output
/// quietly instead of panicking as `println!` does; the exit code is the command's own.
pub fn print(text: &Text) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_str().as_bytes()).and_then(|()| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprint_line(&format!("cannot write the output: {e}"));
        }
    }
}

/// One JSON document on one line (`dlq`).
pub fn print_json(value: &impl Serialize) {
    match serde_json::to_string(value) {
        Ok(s) => print_line(&s),
        Err(e) => eprint_line(&format!("cannot encode the output: {e}")),
    }
}

/// One pretty-printed JSON document (`topology`, `migrate`).
pub fn print_json_pretty(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => print_line(&s),
        Err(e) => eprint_line(&format!("cannot encode report: {e}")),
    }
}

fn print_line(s: &str) {
    let mut t = Text::default();
    outln!(t, "{s}");
    print(&t);
}

/// The `--json` answer of a command that failed: `{"schemaVersion": 1, "ok": false, "error":
/// {"message", "exitCode"}}` on stdout (the message is on stderr too).
pub fn print_json_error(failure: &dyn Failure) {
    print_json(&error_json(failure));
}

pub fn error_json(failure: &dyn Failure) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": SCHEMA_VERSION,
        "ok": false,
        "error": {"message": error_text(failure), "exitCode": failure.exit_code()},
    })
}

/// A line on stderr; like [`print()`], never panics.
pub fn eprint_line(s: &str) {
    let mut err = std::io::stderr().lock();
    // Nowhere is left to report a failing stderr.
    writeln!(err, "{s}").ok();
}

/// The error and its causes, `outer: inner: innermost`. A cause whose text already ends the
/// message is skipped: some libraries (async-nats) show their source in their own message too.
pub fn error_text(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !c.is_empty() && !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// Prints `failure` on stderr after `prefix` and returns its exit code.
pub fn fail(prefix: &str, failure: &dyn Failure) -> ExitCode {
    eprint_line(&format!("{prefix}: {}", error_text(failure)));
    ExitCode::from(failure.exit_code())
}

/// The version of every `--json` document (docs/CLI-JSON.md); raised only when a key is removed
/// or changes meaning, never for an added key.
pub const SCHEMA_VERSION: u32 = 1;

/// What an action does, for scripts (`what` is the same in English).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ActionKind {
    CreateStream,
    UpdateStream,
    DeleteStream,
    StreamExists,
    StreamUpToDate,
    StreamDeleted,
    RemoveSubjects,
    AddSubjects,
    MoveSubjects,
    SubjectsInPlace,
    CreateConsumer,
    ConsumerExists,
    KeepConsumer,
    /// A subject mapping written to the server config (or printed for the operator).
    ApplyMapping,
    /// Nothing was done (a dry run, or a refusal).
    Nothing,
}

/// One line of a report: an action taken (or planned), or a check and its result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    /// Actions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ActionKind>,
    pub what: String,
    pub status: String,
    /// Checks only: whether it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
}

/// What a `topology` or `migrate` command did and found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report<T: Serialize> {
    pub schema_version: u32,
    pub command: String,
    pub ok: bool,
    #[serde(skip)]
    pub exit: u8,
    pub phase_before: Option<Phase>,
    pub phase_after: Option<Phase>,
    pub actions: Vec<Item>,
    pub checks: Vec<Item>,
    pub data: Option<T>,
    pub next: Option<String>,
    /// Set instead of `next` when a check failed: the command that undoes or finishes the
    /// step, and where the runbook is.
    pub rollback: Option<String>,
}

impl<T: Serialize> Report<T> {
    pub fn new(command: &str) -> Report<T> {
        Report {
            schema_version: SCHEMA_VERSION,
            command: command.into(),
            ok: true,
            exit: EXIT_OK,
            phase_before: None,
            phase_after: None,
            actions: Vec::new(),
            checks: Vec::new(),
            data: None,
            next: None,
            rollback: None,
        }
    }

    pub fn action(&mut self, kind: ActionKind, what: impl Into<String>, status: impl Into<String>) {
        self.actions.push(Item {
            kind: Some(kind),
            what: what.into(),
            status: status.into(),
            ok: None,
        });
    }

    pub fn check(&mut self, what: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        self.checks.push(Item {
            kind: None,
            ok: Some(ok),
            what: what.into(),
            status: if ok {
                format!("ok {detail}")
            } else {
                format!("FAILED {detail}")
            },
        });
        if !ok {
            self.ok = false;
            if self.exit == EXIT_OK {
                self.exit = EXIT_FAILED;
            }
        }
    }

    /// A failed check whose detail is an error and its causes.
    pub fn check_failed(&mut self, what: impl Into<String>, e: &(dyn Error + 'static)) {
        self.check(what, false, error_text(e));
    }

    pub fn refuse(&mut self, why: impl Into<String>) {
        self.ok = false;
        self.exit = EXIT_REFUSED;
        self.checks.push(Item {
            kind: None,
            ok: Some(false),
            what: "refused".into(),
            status: why.into(),
        });
    }

    /// The human-readable form.
    pub fn render(&self) -> Text {
        let mut t = Text::default();
        outln!(t, "{}: {}", self.command, if self.ok { "ok" } else { "NOT OK" });
        if let Some(p) = &self.phase_before {
            outln!(t, "  phase before: {}", p.describe());
        }
        for a in &self.actions {
            outln!(t, "  action  {} — {}", a.what, a.status);
        }
        for c in &self.checks {
            outln!(t, "  check   {} — {}", c.what, c.status);
        }
        if let Some(p) = &self.phase_after {
            outln!(t, "  phase after:  {}", p.describe());
        }
        if let Some(d) = &self.data {
            if let Ok(s) = serde_json::to_string_pretty(d) {
                outln!(t, "{s}");
            }
        }
        if let Some(n) = &self.next {
            outln!(t, "  next: {n}");
        }
        if let Some(r) = &self.rollback {
            outln!(t, "  rollback: {r}");
        }
        t
    }
}

/// Columns aligned to their widest cell (headers included), two spaces apart; the columns
/// flagged in `right` are right-aligned (numbers). Trailing spaces are trimmed.
pub fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            if i > 0 {
                l.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                l.push_str(&pad);
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.push_str(&pad);
            }
        }
        l.trim_end().to_string()
    };
    let mut out = vec![line(&mut headers.iter().copied())];
    for row in rows {
        out.push(line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// Prints a `topology` / `migrate` result and returns the exit code: the report (text, or
/// pretty JSON with `--json`), or the error on stderr (and `{"ok": false, "error": …}` on stdout
/// with `--json`).
pub fn finish<T: Serialize, E: Failure>(result: Result<Report<T>, E>, json: bool) -> ExitCode {
    finish_with(result, json, Report::render)
}

/// [`finish`] with the text form drawn by `render`.
pub fn finish_with<T: Serialize, E: Failure>(
    result: Result<Report<T>, E>,
    json: bool,
    render: impl Fn(&Report<T>) -> Text,
) -> ExitCode {
    match result {
        Ok(report) => {
            if json {
                print_json_pretty(&report);
            } else {
                print(&render(&report));
            }
            ExitCode::from(report.exit)
        }
        Err(e) => {
            if json {
                print_json_error(&e);
            }
            fail("normalize-service", &e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    /// Shows its source in its own message, as async-nats errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn causes_are_shown_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_text(&e), "outer: middle: inner");
    }

    #[test]
    fn a_failed_check_fails_the_report_and_a_refusal_outranks_it() {
        let mut r: Report<()> = Report::new("x");
        r.check("a", true, "");
        assert_eq!((r.ok, r.exit), (true, EXIT_OK));
        r.check("b", false, "why");
        assert_eq!((r.ok, r.exit), (false, EXIT_FAILED));
        r.refuse("no");
        assert_eq!(r.exit, EXIT_REFUSED);
        r.check("c", false, "");
        assert_eq!(r.exit, EXIT_REFUSED);
        let text = r.render();
        assert!(text.as_str().starts_with("x: NOT OK\n"), "{}", text.as_str());
        assert!(text.as_str().contains("  check   b — FAILED why\n"));
    }
}
