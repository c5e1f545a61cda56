//! The deployment kit against the code it describes: `.env.example` and docs/CONFIGURATION.md list
//! exactly the variables the config reads; every metric and label that `monitoring/alerts.yml`
//! and the Grafana dashboard use exists in a live `/metrics` scrape; logs are JSON lines by
//! default and never carry the passwords of `DATABASE_URL` / `NATS_URL`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use crate::support::*;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

// --- environment reference ------------------------------------------------------------------

/// `A_{X,Y}_B` → `A_X_B`, `A_Y_B` (any number of groups, no nesting).
fn expand_braces(s: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (s.find('{'), s.find('}')) else {
        return vec![s.to_string()];
    };
    if close < open {
        return vec![s.to_string()];
    }
    s[open + 1..close]
        .split(',')
        .flat_map(|alt| expand_braces(&format!("{}{}{}", &s[..open], alt.trim(), &s[close + 1..])))
        .collect()
}

/// Variable names assigned in an env file (`NAME=value` lines; comments and blanks skipped).
/// Duplicates are returned too, so the caller can refuse them.
fn env_file_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect()
}

/// Variable names in the first column of the table in docs/CONFIGURATION.md's `## Variables`
/// section (backticked, brace groups expanded).
fn readme_config_names(readme: &str) -> BTreeSet<String> {
    let start = readme
        .find("\n## Variables")
        .expect("docs/CONFIGURATION.md has a '## Variables' section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter_map(|l| l.trim_start().trim_start_matches('|').split('|').next())
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .flat_map(expand_braces)
                .collect::<Vec<_>>()
        })
        .filter(|n| is_env_name(n))
        .collect()
}

/// Disagreements between the variables the config reads and a document's list.
fn reference_diff(doc: &str, read: &BTreeSet<String>, listed: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for v in read.difference(listed) {
        problems.push(format!("{doc} does not list {v}, which the config reads"));
    }
    for v in listed.difference(read) {
        problems.push(format!("{doc} lists {v}, which the config does not read"));
    }
    problems
}

#[test]
fn deploy_env_reference_lists_exactly_the_variables_the_config_reads() {
    let read: BTreeSet<String> = normalize_service::config::VARIABLES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        read.len(),
        normalize_service::config::VARIABLES.len(),
        "config::VARIABLES has duplicates"
    );

    let env_example = repo_file(".env.example");
    let env_names = env_file_names(&env_example);
    let mut problems = Vec::new();
    // Each variable has its one-line comment right above it.
    let lines: Vec<&str> = env_example.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.is_empty() && !line.starts_with('#') && (i == 0 || !lines[i - 1].starts_with('#')) {
            problems.push(format!(".env.example: {line} has no comment line above it"));
        }
    }
    let mut seen = BTreeSet::new();
    for n in &env_names {
        if !is_env_name(n) {
            problems.push(format!(".env.example assigns {n:?}, not a variable name"));
        }
        if !seen.insert(n.clone()) {
            problems.push(format!(".env.example assigns {n} twice"));
        }
    }
    problems.extend(reference_diff(".env.example", &read, &seen));
    problems.extend(reference_diff(
        "docs/CONFIGURATION.md (Variables table)",
        &read,
        &readme_config_names(&repo_file("docs/CONFIGURATION.md")),
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The comparison above must be able to fail, in both directions.
#[test]
fn deploy_env_reference_check_detects_missing_and_unknown_variables() {
    let read: BTreeSet<String> = ["NATS_URL", "HRV_BATCH_SIZE", "SLEEP_BATCH_SIZE"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let readme = "# x\n\n## Variables\n\n| variable | default |\n|---|---|\n| `NATS_URL` | `nats://h:4222` |\n| `{HRV,OURA}_BATCH_SIZE` | 10 |\n\n## HTTP\n| `PORT` | x |\n";
    let listed = readme_config_names(readme);
    assert_eq!(
        listed.iter().cloned().collect::<Vec<_>>(),
        ["HRV_BATCH_SIZE", "NATS_URL", "OURA_BATCH_SIZE"],
        "brace groups expanded, defaults and other sections ignored"
    );
    let problems = reference_diff("README", &read, &listed);
    assert_eq!(
        problems,
        [
            "README does not list SLEEP_BATCH_SIZE, which the config reads",
            "README lists OURA_BATCH_SIZE, which the config does not read"
        ]
    );
    let env: BTreeSet<String> = env_file_names("# c\nNATS_URL=x\n\nHRV_BATCH_SIZE=\n")
        .into_iter()
        .collect();
    assert_eq!(
        reference_diff(".env.example", &read, &env),
        [".env.example does not list SLEEP_BATCH_SIZE, which the config reads"]
    );
}

// --- metrics used by alerts and the dashboard --------------------------------------------------

/// One vector selector in a PromQL expression.
#[derive(Debug)]
struct Selector {
    metric: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
}

#[derive(Debug, Default)]
struct Usage {
    selectors: Vec<Selector>,
    /// Labels named in by / without / on / ignoring / group_left / group_right.
    grouping: Vec<String>,
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];
const GROUPING_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"];

/// A small PromQL scanner: enough to find metric names, their label matchers and grouping
/// labels in the expressions this repository writes (strings, ranges and numbers skipped).
fn scan_promql(expr: &str) -> Usage {
    let b = expr.as_bytes();
    let mut usage = Usage::default();
    let mut i = 0;
    let skip_ws = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        j
    };
    let string_end = |j: usize| {
        // b[j] is the opening quote; returns the index after the closing one.
        let q = b[j];
        let mut k = j + 1;
        while k < b.len() && b[k] != q {
            if b[k] == b'\\' && q != b'`' {
                k += 1;
            }
            k += 1;
        }
        k + 1
    };
    let ident_end = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
            j += 1;
        }
        j
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = string_end(i);
        } else if c == b'[' {
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let end = ident_end(i);
            let word = &expr[i..end];
            let next = skip_ws(end);
            i = end;
            if GROUPING_KEYWORDS.contains(&word) {
                if next < b.len() && b[next] == b'(' {
                    let close = expr[next..].find(')').map_or(b.len(), |k| next + k);
                    usage.grouping.extend(
                        expr[next + 1..close]
                            .split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                    i = close + 1;
                }
            } else if AGGREGATIONS.contains(&word) || KEYWORDS.contains(&word) {
                // operator; its arguments are scanned as they come
            } else if next < b.len() && b[next] == b'(' {
                // a function call
            } else {
                let mut sel = Selector {
                    metric: word.to_string(),
                    matchers: Vec::new(),
                };
                if next < b.len() && b[next] == b'{' {
                    let mut j = next + 1;
                    loop {
                        j = skip_ws(j);
                        if j >= b.len() || b[j] == b'}' {
                            break;
                        }
                        if b[j] == b',' {
                            j += 1;
                            continue;
                        }
                        let name_end = ident_end(j);
                        let label = expr[j..name_end].to_string();
                        let op_start = skip_ws(name_end);
                        let mut op_end = op_start;
                        while op_end < b.len() && matches!(b[op_end], b'=' | b'!' | b'~') {
                            op_end += 1;
                        }
                        let v_start = skip_ws(op_end);
                        assert!(
                            name_end > j && v_start < b.len() && matches!(b[v_start], b'"' | b'\'' | b'`'),
                            "cannot read the label matchers of {word} in: {expr}"
                        );
                        let v_end = string_end(v_start);
                        sel.matchers.push((
                            label,
                            expr[op_start..op_end].to_string(),
                            expr[v_start + 1..v_end - 1].to_string(),
                        ));
                        j = v_end;
                    }
                    i = j + 1;
                }
                usage.selectors.push(sel);
            }
        } else {
            i += 1;
        }
    }
    usage
}

/// Labels and their values per sample name (`x_bucket`, `x_sum`, `x_count` stay distinct, so a
/// histogram is found by the names queries use) in a Prometheus text scrape.
fn scrape_series(text: &str) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, rest) = match line.find(['{', ' ']) {
            Some(k) => (&line[..k], &line[k..]),
            None => continue,
        };
        let labels = out.entry(name.to_string()).or_default();
        if let Some(body) = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map(|(b, _)| b)
        {
            // Label values of this service never contain `",` (bounded sets), so splitting is safe.
            for pair in body.split("\",").filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once("=\"") {
                    labels
                        .entry(k.trim().to_string())
                        .or_default()
                        .insert(v.trim_end_matches('"').to_string());
                }
            }
        }
    }
    out
}

/// Labels Prometheus attaches to every scraped series (monitoring/prometheus.yml relabels
/// `service` from the DNS name).
const TARGET_LABELS: &[&str] = &["job", "instance", "service"];

/// Problems with one expression against the scrape: unknown metrics, labels the metric does not
/// have, exact-match values it never takes, grouping labels no metric of the expression has.
fn check_expression(
    origin: &str,
    expr: &str,
    series: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    jobs: &BTreeSet<String>,
) -> Vec<String> {
    let usage = scan_promql(expr);
    let mut problems = Vec::new();
    let mut expr_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    if usage.selectors.is_empty() {
        problems.push(format!("{origin}: no metric found in {expr:?}"));
    }
    for sel in &usage.selectors {
        if sel.metric == "up" {
            // Prometheus' own per-target series: only target labels, and the job must exist.
            for (label, op, value) in &sel.matchers {
                if label != "job" && label != "instance" {
                    problems.push(format!("{origin}: up has no label {label}"));
                }
                if label == "job" && op == "=" && !jobs.contains(value) {
                    problems.push(format!(
                        "{origin}: up{{job=\"{value}\"}} but monitoring/prometheus.yml has jobs {jobs:?}"
                    ));
                }
            }
            continue;
        }
        let Some(labels) = series.get(&sel.metric) else {
            problems.push(format!(
                "{origin}: metric {} is not in the /metrics scrape",
                sel.metric
            ));
            continue;
        };
        expr_labels.extend(labels.keys().cloned());
        for (label, op, value) in &sel.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            match labels.get(label) {
                None => problems.push(format!(
                    "{origin}: {} has no label {label} (it has {:?})",
                    sel.metric,
                    labels.keys().collect::<Vec<_>>()
                )),
                Some(values) if op == "=" && !value.contains('$') && !values.contains(value) => problems
                    .push(format!(
                        "{origin}: {}{{{label}=\"{value}\"}} matches nothing (values seen: {values:?})",
                        sel.metric
                    )),
                Some(_) => {}
            }
        }
    }
    for label in &usage.grouping {
        if !expr_labels.contains(label) {
            problems.push(format!(
                "{origin}: groups by {label}, which no metric of the expression has"
            ));
        }
    }
    problems
}

/// (where it comes from, PromQL expression)
type Expressions = Vec<(String, String)>;
/// (variable name, selector, label) of `label_values(selector, label)` variable queries.
type LabelValuesQueries = Vec<(String, String, String)>;

/// Expressions of the alert rules, as (alert name, expr).
fn alert_expressions() -> Expressions {
    let doc: serde_yaml::Value = serde_yaml::from_str(&repo_file("monitoring/alerts.yml")).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("alert or record name");
            let expr = rule["expr"].as_str().expect("expr is a string");
            out.push((format!("alerts.yml {name}"), expr.to_string()));
        }
    }
    out
}

/// Every `expr` in the dashboard, and the metric selector of each `label_values(...)` variable
/// query with the label it lists.
fn dashboard_expressions() -> (Expressions, LabelValuesQueries) {
    let doc: serde_json::Value =
        serde_json::from_str(&repo_file("monitoring/grafana/normalize-service.json")).unwrap();
    let mut exprs = Vec::new();
    for panel in doc["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("target expr");
            exprs.push((format!("dashboard panel {title:?}"), expr.to_string()));
        }
    }
    let mut label_values = Vec::new();
    for var in doc["templating"]["list"].as_array().expect("templating") {
        let name = var["name"].as_str().unwrap_or("?").to_string();
        let query = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .expect("variable query");
        let args = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .expect("variables use label_values(selector, label)");
        let (selector, label) = args.rsplit_once(',').expect("label_values has two arguments");
        label_values.push((name, selector.trim().to_string(), label.trim().to_string()));
    }
    (exprs, label_values)
}

fn scrape_jobs() -> BTreeSet<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(&repo_file("monitoring/prometheus.yml")).unwrap();
    doc["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter_map(|c| c["job_name"].as_str().map(str::to_string))
        .collect()
}

/// The checker must be able to fail.
#[test]
fn deploy_metric_check_detects_unknown_metrics_and_labels() {
    let scrape = "# TYPE normalize_consumer_bound gauge\nnormalize_consumer_bound{consumer=\"hrv\",durable=\"d\",stream=\"S\"} 1\n\
                  normalize_hrv_messages_total{durable=\"d\",result=\"success\",stream=\"S\",subject=\"x\"} 0\n\
                  normalize_processing_duration_seconds_bucket{consumer=\"hrv\",durable=\"d\",stream=\"S\",le=\"0.5\"} 0\n";
    let series = scrape_series(scrape);
    let jobs: BTreeSet<String> = ["normalize-service".to_string()].into();
    let ok = r#"max by (consumer, stream) (normalize_consumer_bound{stream=~"$stream"}) == 1
        and on (consumer) sum by (le, consumer) (rate(normalize_processing_duration_seconds_bucket[5m])) > 0
        unless absent(up{job="normalize-service"} == 1) or increase(normalize_hrv_messages_total{result="success"}[10m] offset 1h) > 0"#;
    assert_eq!(check_expression("ok", ok, &series, &jobs), Vec::<String>::new());
    let cases = [
        (r#"rate(normalize_nope_total[5m])"#, "not in the /metrics scrape"),
        (r#"normalize_consumer_bound{reason="x"}"#, "has no label reason"),
        (
            r#"normalize_hrv_messages_total{result="schema-invalid"}"#,
            "matches nothing",
        ),
        (
            r#"sum by (reason) (normalize_consumer_bound)"#,
            "groups by reason",
        ),
        (r#"up{job="normalize"} == 0"#, "has jobs"),
        (
            r#"normalize_processing_duration_seconds{consumer="hrv"}"#,
            "not in the /metrics scrape",
        ),
    ];
    for (expr, expected) in cases {
        let problems = check_expression("bad", expr, &series, &jobs);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{expr}: expected a problem containing {expected:?}, got {problems:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_alerts_and_dashboard_use_metrics_and_labels_the_service_exports() {
    let stack = Stack::builder().mode("multi").start().await;
    let js = &stack.js;
    // A legacy stream next to a multi-mode daemon: every consumer falls back to it, so the
    // fallback counter exists too (provisioning adds only AA_DLQ, which overlaps nothing).
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ATHLETE_ALLY_EVENTS".into(),
        subjects: vec!["athlete-ally.>".into(), "vendor.>".into(), "sleep.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let app = stack.app().await;

    // One valid and one invalid message per consumer, so the per-message series (durations,
    // database writes, dead letters by reason) exist.
    let valid = [
        (HRV_SUBJECT, hrv_event("deploy-user", "2025-03-01", 42.0, "2025-03-01T07:00:00Z")),
        (
            SLEEP_SUBJECT,
            serde_json::json!({"payload": {"userId": "deploy-user", "date": "2025-03-01", "durationMinutes": 420, "capturedAt": "2025-03-01T07:00:00Z"}}).to_string(),
        ),
        (
            OURA_SUBJECT,
            serde_json::json!({"user_id": "deploy-user", "timestamp": "2025-03-01T07:00:00Z", "data": {"hrv": {"rmssd": 45.2}, "sleep": {"duration": 7.5, "score": 83}}}).to_string(),
        ),
    ];
    for (subject, body) in &valid {
        publish(js, subject, body.clone()).await;
        publish(js, subject, "not json").await;
    }
    wait_for("both messages of every consumer settled", Duration::from_secs(30), || async {
        let text = app.metrics().await;
        ["hrv", "sleep", "oura"].iter().all(|c| {
            metric_value(&text, &format!("normalize_{c}_messages_total"), &[("result", "success")]) == Some(1.0)
                && metric_value(&text, "dlq_messages_total", &[("consumer", c)]) == Some(1.0)
                // observed when a pull completes (after the messages of its batch are settled)
                && metric_value(&text, "normalize_batch_size_count", &[("consumer", c)]).is_some()
        })
    })
    .await;
    // The lag gauges come from consumer info, refreshed every CONSUMER_INFO_INTERVAL_MS.
    wait_for("consumer info gauges", Duration::from_secs(10), || async {
        let text = app.metrics().await;
        ["hrv", "sleep", "oura"]
            .iter()
            .all(|c| metric_value(&text, "normalize_consumer_pending_messages", &[("consumer", c)]).is_some())
    })
    .await;

    let text = app.metrics().await;
    let series = scrape_series(&text);
    let jobs = scrape_jobs();
    let mut problems = Vec::new();
    let alerts = alert_expressions();
    let (panels, variables) = dashboard_expressions();
    assert!(alerts.len() >= 6, "alert rules found: {alerts:?}");
    assert!(panels.len() >= 6, "dashboard queries found: {panels:?}");
    for (origin, expr) in alerts.iter().chain(panels.iter()) {
        problems.extend(check_expression(origin, expr, &series, &jobs));
    }
    for (name, selector, label) in &variables {
        let origin = format!("dashboard variable {name}");
        problems.extend(check_expression(&origin, selector, &series, &jobs));
        let usage = scan_promql(selector);
        for sel in &usage.selectors {
            if !series.get(&sel.metric).is_some_and(|l| l.contains_key(label)) {
                problems.push(format!("{origin}: {} has no label {label}", sel.metric));
            }
        }
    }
    let names: BTreeSet<&str> = variables.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["durable", "stream"].into(), "dashboard variables");
    assert!(problems.is_empty(), "{}\n\nscrape:\n{text}", problems.join("\n"));
}

// --- logs ------------------------------------------------------------------------------------------

const SECRET: &str = "s3cretpw";

/// Runs the daemon with `vars` until it exits by itself (a test failure after `within`);
/// returns its exit code and all of its stderr.
async fn exit_code_and_stderr(vars: &HashMap<String, String>, within: Duration) -> (Option<i32>, String) {
    let mut daemon = DaemonProcess::spawn(vars);
    let code = daemon.expect_exit(within).await.code();
    (code, daemon.stderr())
}

/// Every line is one JSON object with a timestamp, a level, a target and a message and/or
/// fields; returns them.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    assert!(!stderr.trim().is_empty(), "the daemon logged nothing");
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            assert!(v.is_object(), "log line is not an object: {line}");
            assert!(
                matches!(
                    v["level"].as_str(),
                    Some("TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR")
                ),
                "no level: {line}"
            );
            assert!(
                v["target"].as_str().is_some_and(|t| !t.is_empty()),
                "no target: {line}"
            );
            // Fields are flattened next to the message; a few library events (sqlx's statement
            // log) carry fields only.
            let fields = v
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| !["timestamp", "level", "target"].contains(&k.as_str()))
                .count();
            assert!(
                v["message"].is_string() || (v.get("message").is_none() && fields > 0),
                "no message or fields: {line}"
            );
            assert!(v["timestamp"].is_string(), "no timestamp: {line}");
            v
        })
        .collect()
}

fn secret_vars(nats: &NatsServer, db: &TestDb) -> HashMap<String, String> {
    let mut vars = base_vars(nats, &db.url);
    // JSON must be the default: the test daemon's base vars ask for pretty logs.
    vars.remove("LOG_FORMAT");
    vars.insert(
        "NATS_URL".into(),
        format!("nats://user:{SECRET}@127.0.0.1:{}", nats.port),
    );
    vars.insert(
        "DATABASE_URL".into(),
        format!("postgres://postgres:{SECRET}@127.0.0.1:5432/{}", db.name),
    );
    // Every level of every crate: a library logging a URL at debug would leak it too.
    vars.insert("RUST_LOG".into(), "debug".into());
    vars
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_logs_are_json_lines_and_never_show_passwords() {
    let nats = NatsServer::start_with(&format!("authorization {{ user: user, password: {SECRET} }}")).await;
    let db = TestDb::new().await;
    let mut daemon = DaemonProcess::spawn(&secret_vars(&nats, &db));
    if let Err(e) = daemon.try_wait_ready(Duration::from_secs(30)).await {
        panic!("NATS auth from the URL: {e}");
    }
    for path in ["/health", "/metrics"] {
        let (code, body) =
            normalize_service::http::http_get("127.0.0.1", daemon.port, path, Duration::from_secs(5))
                .await
                .unwrap();
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains(SECRET), "{path} shows the password:\n{body}");
    }
    daemon.signal("TERM");
    let code = daemon.expect_exit(Duration::from_secs(30)).await.code();
    let stderr = daemon.stderr();
    assert_eq!(code, Some(0), "SIGTERM exits 0; stderr:\n{stderr}");
    assert!(!stderr.contains(SECRET), "a password reached the logs:\n{stderr}");
    let lines = json_lines(&stderr);
    // The URLs were logged, redacted (so the absence above is not an accident of silence).
    assert!(
        lines.iter().any(|l| l["servers"]
            .as_str()
            .is_some_and(|s| s.contains("nats://user:***@127.0.0.1"))),
        "no redacted NATS URL in the logs:\n{stderr}"
    );
    assert!(
        lines.iter().any(|l| l["database"]
            .as_str()
            .is_some_and(|s| s.contains("postgres://postgres:***@127.0.0.1"))),
        "no redacted database URL in the logs:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_start_up_errors_never_show_passwords() {
    let nats = NatsServer::start_with(&format!("authorization {{ user: user, password: {SECRET} }}")).await;
    let db = TestDb::new().await;

    // NATS refuses a wrong password: start-up fails, naming the cause, without printing it.
    let mut vars = secret_vars(&nats, &db);
    vars.insert(
        "NATS_URL".into(),
        format!("nats://user:wr0ngpw@127.0.0.1:{}", nats.port),
    );
    let (code, stderr) = exit_code_and_stderr(&vars, Duration::from_secs(30)).await;
    assert_ne!(code, Some(0), "start-up must fail; stderr:\n{stderr}");
    assert!(
        stderr.contains("NATS_USER"),
        "the error names the variables:\n{stderr}"
    );
    for secret in ["wr0ngpw", SECRET] {
        assert!(!stderr.contains(secret), "{secret} reached stderr:\n{stderr}");
    }

    // An invalid DATABASE_URL is a configuration error naming the variable, redacted.
    let mut vars = secret_vars(&nats, &db);
    vars.insert("DATABASE_URL".into(), format!("mysql://app:{SECRET}@db:3306/x"));
    let (code, stderr) = exit_code_and_stderr(&vars, Duration::from_secs(30)).await;
    assert_eq!(code, Some(2), "configuration error exit code; stderr:\n{stderr}");
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains(SECRET), "the password reached stderr:\n{stderr}");
}
