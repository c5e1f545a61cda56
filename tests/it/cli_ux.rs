//! The operator commands as a human and a script meet them (issue 15): closed pipes, table
//! layouts, the JSON schema.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use async_nats::jetstream;
use serde_json::Value;

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

    // Newest first, 50 by default, with a footer; --oldest and --limit 0 for the rest.
    let page = cli(&vars, &["dlq", "list"]).await;
    assert_eq!(page.code, 0, "{}", page.stderr);
    let lines: Vec<&str> = page.stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 50 + 1, "{}", page.stdout);
    assert!(
        lines[1].trim_start().starts_with("1500 "),
        "newest first: {}",
        lines[1]
    );
    assert!(
        lines[51].starts_with("showing 50 of 1500 dead letters"),
        "{}",
        lines[51]
    );
    let oldest = cli_json(&vars, &["dlq", "list", "--oldest", "--limit", "3"], 0).await;
    assert_eq!(
        (oldest["count"].as_u64(), oldest["total"].as_u64()),
        (Some(3), Some(1500))
    );
    assert_eq!(oldest["deadLetters"][0]["sequence"], 1);

    // Replaying more than 100 needs --yes; a script (no terminal) is refused with exit 2.
    let r = cli(&vars, &["dlq", "replay", "--all"]).await;
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("1500 dead letters") && r.stderr.contains("--yes"),
        "{}",
        r.stderr
    );
    let dry = cli(&vars, &["dlq", "replay", "--all", "--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry
        .stdout
        .ends_with("would replay 1500 (dry run: nothing replayed), skipped 0\n"));

    let (first, code, stderr) = piped_into_head(&vars, &["dlq", "list", "--limit", "0"]).await;
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

/// Every `--json` document: `schemaVersion`, camelCase keys, action kinds; errors too
/// (docs/CLI-JSON.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_share_one_schema() {
    let stack = Stack::start().await;
    let vars = stack.vars.clone();
    let dry = cli_json(&vars, &["topology", "apply", "--mode", "multi", "--dry-run"], 0).await;
    assert_eq!(dry["schemaVersion"], 1, "{dry}");
    assert_eq!(dry["phaseBefore"], "empty", "{dry}");
    let kinds: Vec<&str> = dry["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"createStream") && kinds.contains(&"createConsumer"),
        "{dry}"
    );
    cli_json(&vars, &["topology", "apply", "--mode", "multi"], 0).await;
    let status = cli_json(&vars, &["topology", "status"], 0).await;
    assert_eq!(status["schemaVersion"], 1);
    assert_eq!(status["phaseAfter"], "migrated");
    let core = &status["data"][0];
    assert_eq!(core["name"], "AA_CORE_HOT", "sorted by name: {status}");
    assert!(
        core["firstSeq"].is_u64() && core["consumers"][0]["filterSubject"].is_string(),
        "{status}"
    );
    let plan = cli_json(&vars, &["migrate", "plan"], 0).await;
    assert_eq!(plan["schemaVersion"], 1);
    for args in [&["dlq", "list"][..], &["dlq", "stats"]] {
        assert_eq!(cli_json(&vars, args, 0).await["schemaVersion"], 1, "{args:?}");
    }
    // Errors are JSON too, with the exit code.
    let missing = cli_json(&vars, &["dlq", "show", "999"], 3).await;
    assert_eq!(missing["schemaVersion"], 1, "{missing}");
    assert_eq!(missing["error"]["exitCode"], 3, "{missing}");
    assert!(
        missing["error"]["message"].as_str().unwrap().contains("999"),
        "{missing}"
    );
    let refused = cli_json(
        &vars,
        &[
            "migrate",
            "rollback",
            "phase1",
            "--cutover",
            "move",
            "--yes",
            "--no-probe",
        ],
        3,
    )
    .await;
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["checks"][0]["ok"], false, "{refused}");
}

/// With NATS down every operator command fails at once (exit 1), naming the redacted URL and
/// the cause, and `--json` says so in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_fails_fast_with_the_url_and_the_cause() {
    let port = free_port();
    let mut vars = HashMap::new();
    vars.insert(
        "NATS_URL".to_string(),
        format!("nats://ops:s3cret@127.0.0.1:{port}"),
    );
    vars.insert(
        "DATABASE_URL".to_string(),
        "postgres://postgres@127.0.0.1:5432/postgres".to_string(),
    );
    for args in [
        &["topology", "status"][..],
        &["migrate", "plan"],
        &["migrate", "phase1", "--cutover", "move", "--yes"],
        &["dlq", "list"],
    ] {
        let started = std::time::Instant::now();
        let r = cli(&vars, args).await;
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        for needle in [
            "cannot connect to NATS at",
            &format!("127.0.0.1:{port}"),
            "refused",
        ] {
            assert!(
                r.stderr.contains(needle),
                "{args:?} lacks {needle:?}: {}",
                r.stderr
            );
        }
        assert!(
            !r.stderr.contains("s3cret") && !r.stdout.contains("s3cret"),
            "{args:?}"
        );
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let r = cli(&vars, &json_args).await;
        let doc = r.json();
        assert_eq!(doc["error"]["exitCode"], 1, "{args:?}: {doc}");
        assert!(
            doc["error"]["message"].as_str().unwrap().contains("refused"),
            "{doc}"
        );
    }
}

/// A checked-in schema under docs/schemas/.
fn schema(name: &str) -> Value {
    let path = format!("{}/docs/schemas/{name}.schema.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The errors of `v` against the subset of JSON Schema the docs/schemas files use: `type`,
/// `const`, `enum`, `required`, `properties`, `additionalProperties: false`, `items`, `anyOf`
/// and `$ref` to `#/$defs/…`.
fn violations(root: &Value, s: &Value, v: &Value, at: &str) -> Vec<String> {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.trim_start_matches("#/$defs/");
        return violations(root, &root["$defs"][name], v, at);
    }
    let mut errs = Vec::new();
    if let Some(any) = s["anyOf"].as_array() {
        if any.iter().all(|a| !violations(root, a, v, at).is_empty()) {
            errs.push(format!("{at}: matches no anyOf branch: {v}"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            errs.push(format!("{at}: {v} is not {c}"));
        }
    }
    if let Some(e) = s["enum"].as_array() {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "null" => v.is_null(),
        _ => true,
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t)) {
        errs.push(format!("{at}: {v} is not {types:?}"));
    }
    if let Some(obj) = v.as_object() {
        for r in s["required"].as_array().into_iter().flatten() {
            let key = r.as_str().unwrap_or_default();
            if !obj.contains_key(key) {
                errs.push(format!("{at}: missing {key}"));
            }
        }
        for (k, child) in obj {
            match s["properties"].get(k) {
                Some(ps) => errs.extend(violations(root, ps, child, &format!("{at}.{k}"))),
                None if s["additionalProperties"] == false => errs.push(format!("{at}: unexpected key {k}")),
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            errs.extend(violations(root, items, item, &format!("{at}[{i}]")));
        }
    }
    errs
}

fn assert_valid(name: &str, doc: &Value) {
    let s = schema(name);
    let errs = violations(&s, &s, doc, "$");
    assert!(errs.is_empty(), "{name}: {errs:#?}\n{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_match_the_checked_in_schemas() {
    let stack = Stack::start().await;
    let vars = stack.vars.clone();
    for args in [
        &["topology", "apply", "--mode", "multi", "--dry-run"][..],
        &["topology", "apply", "--mode", "multi"],
        &["topology", "status"],
        &["migrate", "plan"],
    ] {
        assert_valid("report", &cli_json(&vars, args, 0).await);
    }
    let refused = cli_json(
        &vars,
        &[
            "migrate",
            "rollback",
            "phase1",
            "--cutover",
            "move",
            "--yes",
            "--no-probe",
        ],
        3,
    )
    .await;
    assert_valid("report", &refused);
    assert_valid("error", &cli_json(&vars, &["dlq", "show", "999"], 3).await);
    let mut down = vars.clone();
    down.insert("NATS_URL".into(), format!("nats://127.0.0.1:{}", free_port()));
    assert_valid("error", &cli_json(&down, &["topology", "status"], 1).await);
    // The validator does reject what does not match.
    let s = schema("error");
    let bad = serde_json::json!({"schemaVersion": 2, "ok": false, "error": {"message": "x"}});
    assert_eq!(violations(&s, &s, &bad, "$").len(), 2);
}

/// A flag's value out of range or malformed is a usage error, exit 2, as every `--help` says,
/// found before anything is done: a wait too long for a deadline (it used to panic, exit 101,
/// once the probe ran), a bad `--quiet-period` (it used to exit 3, "refused"), sequence 0 (the
/// server's bad-request answer used to end `dlq show 0` / `dlq replay 0 5` with exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_and_malformed_flags_are_usage_errors() {
    let stack = Stack::start().await;
    let vars = stack.vars.clone();
    three_streams_and_a_letter(&stack.js, &vars).await;
    let huge = u64::MAX.to_string();
    for (args, flag) in [
        (
            vec!["migrate", "verify", "phase1", "--probe-timeout", &huge],
            "--probe-timeout",
        ),
        (
            vec!["migrate", "phase1", "--yes", "--mapping-timeout", &huge],
            "--mapping-timeout",
        ),
        (
            vec!["migrate", "phase3", "--yes", "--quiet-period", "2x"],
            "--quiet-period",
        ),
        (vec!["dlq", "show", "0"], "SEQ"),
        (vec!["dlq", "replay", "0", "5"], "SEQ"),
        (vec!["dlq", "purge", "0", "--yes"], "SEQ"),
    ] {
        let r = cli(&vars, &args).await;
        assert_eq!(r.code, 2, "{args:?}\n{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(flag), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    }
    // The largest wait taken still works (the probe fails for want of a daemon: exit 1).
    let r = cli(
        &vars,
        &[
            "migrate",
            "verify",
            "phase1",
            "--no-probe",
            "--probe-timeout",
            "86400",
        ],
    )
    .await;
    assert_ne!(r.code, 2, "{}{}", r.stdout, r.stderr);
}

/// The three streams (so a probe's publish is stored and its wait begins), and one dead letter
/// (sequence 1).
async fn three_streams_and_a_letter(js: &jetstream::Context, vars: &HashMap<String, String>) {
    let r = cli(vars, &["topology", "apply", "--mode", "multi"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    publish(js, "dlq.normalize.hrv.raw-received.schema-invalid", "{broken").await;
}
