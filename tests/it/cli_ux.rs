//! The operator commands as a human and a script meet them (issue 15): closed pipes, table
//! layouts, the JSON schema.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use async_nats::jetstream;

use crate::support::*;

/// Fills `AA_DLQ` (created by `topology apply`) with `n` dead letters without a daemon.
async fn dead_letters(js: &jetstream::Context, vars: &HashMap<String, String>, n: usize) {
    let r = cli(vars, &["topology", "apply", "--mode", "multi"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // Each action once, its status the outcome.
    assert_eq!(
        r.stdout.matches("create stream AA_CORE_HOT").count(),
        1,
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stdout.matches("create durable normalize-hrv-durable").count(),
        1,
        "{}",
        r.stdout
    );
    let status = cli(vars, &["topology", "status"]).await;
    assert_eq!(status.code, 0, "{}{}", status.stdout, status.stderr);
    assert!(
        status.stdout.contains("\nphase: phase3 done"),
        "{}",
        status.stdout
    );
    assert!(
        !status.stdout.contains('{'),
        "a table, not JSON: {}",
        status.stdout
    );
    let rows: Vec<&str> = status.stdout.lines().filter(|l| l.starts_with("AA_")).collect();
    assert_eq!(
        rows.len(),
        3 + 3,
        "three streams, three durables: {}",
        status.stdout
    );
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("{{broken hrv event number {i} with some padding to make the line longer");
        acks.push(
            js.publish("dlq.normalize.hrv.raw-received", body.into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// `normalize-service <args> | head -1`: the first line, the exit code and stderr.
async fn piped_into_head(vars: &HashMap<String, String>, args: &[&str]) -> (String, Option<i32>, String) {
    let vars = vars.clone();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(BIN)
            .args(&args)
            .env_clear()
            .envs(&vars)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        drop(out);
        let rest = child.wait_with_output().unwrap();
        (
            first,
            rest.status.code(),
            String::from_utf8_lossy(&rest.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_quietly_with_exit_0() {
    let stack = Stack::start().await;
    let vars = stack.vars.clone();
    // Far more than a pipe buffer (64 KiB) of text, so the writer meets the closed pipe.
    dead_letters(&stack.js, &vars, 1500).await;

    let (first, code, stderr) = piped_into_head(&vars, &["dlq", "list"]).await;
    assert!(first.contains("SEQ"), "{first}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );

    // A destructive success stays a success when the reader goes away.
    let (_, code, stderr) = piped_into_head(&vars, &["dlq", "purge", "--all", "--yes"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stream_messages(&stack.js, "AA_DLQ").await, 0);
}
