//! `normalize-service dlq …` (issue #8) as an operator runs it: the binary as a child process
//! against a private nats-server, with the daemon in-process producing real dead letters. This
//! file: listing, purging, errors and connecting; `dlq_replay`: replaying.

use std::time::Duration;

use async_nats::jetstream;
use serde_json::Value;

use crate::support::*;

/// The sequences of the dead letters a `dlq list --json` shows.
pub(crate) fn seqs_of(list: &Value) -> Vec<u64> {
    list["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sequence"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_exactly_what_the_selection_selects() {
    let (stack, app) = Stack::builder().app().await;
    let (js, vars) = (&stack.js, stack.vars.clone());
    for i in 0..3 {
        publish(js, HRV_SUBJECT, format!("{{hrv broken {i}")).await;
    }
    for i in 0..2 {
        publish(js, SLEEP_SUBJECT, format!("{{sleep broken {i}")).await;
    }
    wait_for("five dead letters", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await == 5
    })
    .await;
    let all = cli_json(&vars, &["dlq", "list", "--oldest"], 0).await;
    let consumer_of = |seq: u64| {
        all["deadLetters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["sequence"] == seq)
            .unwrap()["consumer"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (hrv, sleep): (Vec<u64>, Vec<u64>) =
        seqs_of(&all).into_iter().partition(|&s| consumer_of(s) == "hrv");
    assert_eq!((hrv.len(), sleep.len()), (3, 2), "{all}");

    // Without --yes nothing is removed.
    let plan = cli_json(&vars, &["dlq", "purge", "--consumer", "sleep"], 0).await;
    assert_eq!(plan["counts"]["would-purge"], 2);
    let planned: Vec<u64> = plan["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dlqSequence"].as_u64().unwrap())
        .collect();
    assert_eq!(planned, sleep);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 5);
    let text = cli(&vars, &["dlq", "purge", "--consumer", "sleep"]).await;
    assert!(text.stderr.contains("--yes"), "{}", text.stderr);

    let done = cli_json(&vars, &["dlq", "purge", "--consumer", "sleep", "--yes"], 0).await;
    assert_eq!(done["counts"]["purged"], 2);
    assert_eq!(
        seqs_of(&cli_json(&vars, &["dlq", "list", "--oldest"], 0).await),
        hrv
    );

    // By sequence, leaving a gap in the middle that list must step over.
    let middle = hrv[1].to_string();
    let one = cli_json(&vars, &["dlq", "purge", &middle, "--yes"], 0).await;
    assert_eq!(one["counts"]["purged"], 1);
    assert_eq!(
        seqs_of(&cli_json(&vars, &["dlq", "list", "--oldest"], 0).await),
        vec![hrv[0], hrv[2]]
    );

    // The same sequence again is not found (exit 3) and removes nothing else.
    let again = cli_json(&vars, &["dlq", "purge", &middle, "--yes"], 3).await;
    assert_eq!(again["results"][0]["result"], "not-found");
    // A filter that matches nothing removes nothing.
    let none = cli_json(
        &vars,
        &["dlq", "purge", "--since", "2999-01-01T00:00:00Z", "--yes"],
        0,
    )
    .await;
    assert_eq!(none["results"].as_array().unwrap().len(), 0);
    // No selection at all is a usage error, not "everything".
    let bare = cli(&vars, &["dlq", "purge", "--yes"]).await;
    assert_eq!(bare.code, 2, "{}", bare.stderr);
    let mixed = cli(&vars, &["dlq", "purge", &hrv[0].to_string(), "--consumer", "hrv"]).await;
    assert_eq!(mixed.code, 2, "{}", mixed.stderr);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 2);

    let stats = cli_json(&vars, &["dlq", "stats"], 0).await;
    assert_eq!(stats["total"], 2);
    assert_eq!(stats["byConsumer"]["hrv"]["schema-invalid"], 2);
    assert!(stats["byConsumer"].get("sleep").is_none());

    let gone = cli(&vars, &["dlq", "show", &middle]).await;
    assert_eq!(gone.code, 3, "{}", gone.stderr);
    assert!(
        gone.stderr
            .contains(&format!("no dead letter with sequence {middle}")),
        "{}",
        gone.stderr
    );

    let everything = cli_json(&vars, &["dlq", "purge", "--all", "--yes"], 0).await;
    assert_eq!(everything["counts"]["purged"], 2);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    assert_eq!(cli_json(&vars, &["dlq", "list", "--oldest"], 0).await["count"], 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_exit_codes_scripts_can_rely_on() {
    let nats = NatsServer::start().await;
    let vars = base_vars(&nats, "postgres://postgres@127.0.0.1:5432/unused");

    // No dead-letter stream (nothing provisioned it): not found.
    let r = cli(&vars, &["dlq", "list"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("AA_DLQ") && r.stderr.contains("STREAM_DLQ_NAME"),
        "{}",
        r.stderr
    );
    let r = cli(&vars, &["dlq", "replay", "1"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);

    // The stream exists but the sequence does not.
    let js = nats.js().await;
    js.create_stream(jetstream::stream::Config {
        name: "MY_DLQ".into(),
        subjects: vec!["dlq.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let renamed = with(vars.clone(), &[("STREAM_DLQ_NAME", "MY_DLQ")]);
    let r = cli(&renamed, &["dlq", "show", "7"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(cli_json(&renamed, &["dlq", "stats"], 0).await["total"], 0);

    // Configuration and usage errors.
    let r = cli(
        &with(vars.clone(), &[("STREAM_DLQ_NAME", "has space")]),
        &["dlq", "list"],
    )
    .await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("STREAM_DLQ_NAME"), "{}", r.stderr);
    let r = cli(&vars, &["dlq", "list", "--since", "yesterday"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--since"), "{}", r.stderr);
    let r = cli(&vars, &["dlq", "list", "--reason", "bored"]).await;
    assert_eq!(r.code, 2);

    // NATS unreachable: an operational failure, quickly.
    let closed = with(
        vars.clone(),
        &[("NATS_URL", &format!("nats://127.0.0.1:{}", free_port()))],
    );
    let r = cli(&closed, &["dlq", "list"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot connect to NATS"), "{}", r.stderr);

    // The help text documents the exit codes.
    let r = cli(&vars, &["dlq", "purge", "--help"]).await;
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Exit codes"), "{}", r.stdout);
}

/// Two purges (or `replay --purge-replayed` runs) at once: the second delete of a letter finds it
/// gone. The real server's answer to that counts as deleted, not as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_letter_already_deleted_counts_as_deleted() {
    use normalize_service::cli::dlq::{delete_letter, Deleted};
    let nats = NatsServer::start().await;
    let js = nats.js().await;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "AA_DLQ".into(),
            subjects: vec!["dlq.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let seq = publish(&js, "dlq.normalize.hrv.raw-received.schema-invalid", "{broken").await;
    let first = delete_letter(&stream, seq).await;
    assert_eq!(first.ok(), Some(Deleted::Now));
    let second = delete_letter(&stream, seq).await;
    assert!(matches!(second, Ok(Deleted::Already)), "{second:?}");
    // Any other failure stays one (here: the stream itself is gone).
    let seq = publish(&js, "dlq.normalize.hrv.raw-received.schema-invalid", "{broken").await;
    js.delete_stream("AA_DLQ").await.unwrap();
    let gone = delete_letter(&stream, seq).await;
    assert!(gone.is_err(), "{gone:?}");
}

/// NATS going away in the middle of a long purge (or replay): the command stops at once, says
/// what was done and what was not (`not-attempted`), and exits 1, instead of waiting out each
/// remaining request's 5 s timeout (hours for thousands of letters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_ends_a_long_purge_at_once() {
    const LETTERS: u64 = 5000;
    let mut nats = NatsServer::start().await;
    let vars = base_vars(&nats, "postgres://postgres@127.0.0.1:5432/unused");
    let js = nats.js().await;
    js.create_stream(jetstream::stream::Config {
        name: "AA_DLQ".into(),
        subjects: vec!["dlq.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = Vec::new();
    for i in 0..LETTERS {
        acks.push(
            js.publish(
                "dlq.normalize.hrv.raw-received.schema-invalid",
                format!("{{broken {i}").into(),
            )
            .await
            .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
    let child = tokio::process::Command::new(BIN)
        .args(["dlq", "purge", "--all", "--yes", "--json"])
        .env_clear()
        .envs(&vars)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Kill the server once the purge is under way.
    wait_for("the purge under way", Duration::from_secs(60), || async {
        stream_messages(&js, "AA_DLQ").await < LETTERS
    })
    .await;
    nats.kill();
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the purge ends soon after NATS went away")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    let counts = &doc["counts"];
    let purged = counts["purged"].as_u64().unwrap_or(0);
    let lost = counts["not-attempted"].as_u64().unwrap_or(0);
    let failed = counts["failed"].as_u64().unwrap_or(0);
    assert!(purged > 0 && lost > 0, "{counts}");
    assert_eq!(purged + lost + failed, LETTERS, "{counts}");
    println!(
        "NATS killed: the purge ended {:?} later ({counts})",
        started.elapsed()
    );
}
