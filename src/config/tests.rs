//! Unit tests of [`super::Config`] parsing.

use super::*;

fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

#[test]
fn defaults_match_the_spec() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.mode, StreamMode::Multi);
    assert_eq!(c.provision, Provision::Missing);
    assert_eq!(c.port, 4102);
    assert_eq!(c.metrics_port, 9464);
    assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
    let hrv = c.consumer(ConsumerKind::Hrv).unwrap();
    assert_eq!(hrv.durable, "normalize-hrv-durable");
    assert_eq!(hrv.filter_subject, "athlete-ally.hrv.raw-received");
    assert_eq!(hrv.dlq_prefix, "dlq.normalize.hrv.raw-received");
    assert_eq!(hrv.ack_wait, Duration::from_millis(60_000));
    assert_eq!(hrv.batch_size, 10);
    assert_eq!(hrv.expires, Duration::from_millis(5000));
    assert_eq!(hrv.idle_backoff, Duration::from_millis(50));
    assert_eq!(hrv.max_deliver, 5);
    assert_eq!(hrv.max_ack_pending, 1000);
    assert_eq!(hrv.pipeline_depth, 5);
    // A connection for every batch in flight, and the pool's default leaves room for them.
    assert!(
        c.consumers.iter().map(|cc| cc.pipeline_depth).sum::<usize>() < c.database_max_connections as usize
    );
    assert_eq!(hrv.pull_mode, PullMode::Fetch);
    let oura = c.consumer(ConsumerKind::Oura).unwrap();
    assert_eq!(oura.durable, "normalize-oura");
    assert_eq!(oura.ack_wait, Duration::from_millis(15_000));
    assert_eq!(oura.dlq_prefix, "dlq.vendor.oura.webhook");
    assert_eq!(oura.primary, StreamRole::Vendor);
    let sleep = c.consumer(ConsumerKind::Sleep).unwrap();
    assert_eq!(sleep.durable, "normalize-sleep-durable");
    assert_eq!(sleep.dlq_prefix, "dlq.normalize.sleep.raw-received");
    assert_eq!(
        c.retry_backoff,
        [1000, 5000, 15000, 30000].map(Duration::from_millis).to_vec()
    );
    assert_eq!(c.max_payload_bytes, 1024 * 1024);
    assert_eq!(c.max_future_skew, chrono::Duration::hours(24));
    assert_eq!(c.database_statement_timeout, Duration::from_millis(5000));
    // Well under the smallest default ack_wait (Oura's 15 s).
    assert!(c
        .consumers
        .iter()
        .all(|cc| c.database_statement_timeout < cc.ack_wait));
}

#[test]
fn durable_aliases_follow_precedence() {
    let c = cfg(&[("HRV_DURABLE", "a"), ("NORMALIZE_HRV_DURABLE", "b")]).unwrap();
    assert_eq!(c.consumer(ConsumerKind::Hrv).unwrap().durable, "a");
    let c = cfg(&[("NORMALIZE_HRV_DURABLE", "b")]).unwrap();
    assert_eq!(c.consumer(ConsumerKind::Hrv).unwrap().durable, "b");
    let c = cfg(&[("NORMALIZE_OURA_DURABLE", "x"), ("NORMALIZE_DURABLE_NAME", "y")]).unwrap();
    assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().durable, "x");
    let c = cfg(&[
        ("NORMALIZE_DURABLE_NAME", "y"),
        ("NORMALIZE_DLQ_SUBJECT", "dlq.o"),
    ])
    .unwrap();
    assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().durable, "y");
    assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().dlq_prefix, "dlq.o");
    let c = cfg(&[
        ("NORMALIZE_OURA_DLQ_SUBJECT", "dlq.a"),
        ("NORMALIZE_DLQ_SUBJECT", "dlq.b"),
    ])
    .unwrap();
    assert_eq!(c.consumer(ConsumerKind::Oura).unwrap().dlq_prefix, "dlq.a");
}

#[test]
fn bad_values_name_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("EVENT_STREAM_MODE", "dual"),
        ("TOPOLOGY_PROVISION", "always"),
        ("HRV_BATCH_SIZE", "ten"),
        ("HRV_BATCH_SIZE", "0"),
        ("HRV_PIPELINE_DEPTH", "0"),
        ("OURA_PIPELINE_DEPTH", "17"),
        ("SLEEP_EXPIRES_MS", "-1"),
        ("OURA_PULL_MODE", "push"),
        ("NORMALIZE_HRV_MAX_DELIVER", "0"),
        ("NORMALIZE_OURA_ACK_WAIT_MS", "abc"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("METRICS_PORT", "x"),
        ("NORMALIZE_RETRY_BACKOFF_MS", "1000,,2"),
        ("RUN_MIGRATIONS", "maybe"),
        ("LOG_FORMAT", "xml"),
        ("HRV_DURABLE", "has.dot"),
        ("NORMALIZE_HRV_SUBJECT", "a..b"),
        ("NORMALIZE_HRV_DLQ_SUBJECT", "other.prefix"),
        ("NATS_URL", "http://x"),
        ("DATABASE_URL", "mysql://x"),
        ("STREAM_REPLICAS", "7"),
        ("MAX_PAYLOAD_BYTES", "0"),
        ("MAX_FUTURE_SKEW_MS", "0"),
        ("MAX_FUTURE_SKEW_MS", "-1"),
        ("MAX_FUTURE_SKEW_MS", "1h"),
        ("MAX_FUTURE_SKEW_MS", "31536000001"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "0"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "-5"),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "5s"),
    ];
    for (var, value) in cases {
        let err = cfg(&[(var, value)]).expect_err(var);
        assert_eq!(err.var, *var, "{var}={value}");
        assert!(err.to_string().contains(var), "{err}");
    }
}

#[test]
fn a_nats_user_and_password_need_each_other() {
    let err = cfg(&[("NATS_USER", "svc")]).unwrap_err();
    assert_eq!(err.var, "NATS_PASSWORD", "{err}");
    let err = cfg(&[("NATS_PASSWORD", "pw")]).unwrap_err();
    assert_eq!(err.var, "NATS_USER", "{err}");
    assert!(cfg(&[("NATS_USER", "svc"), ("NATS_PASSWORD", "pw")]).is_ok());
}

#[test]
fn secrets_are_not_echoed() {
    let err = cfg(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let err = cfg(&[("NATS_URL", "http://u:hunter2@h:4222")]).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn nats_url_list() {
    let c = cfg(&[("NATS_URL", "nats://a:4222, b:4223")]).unwrap();
    assert_eq!(c.nats.urls, vec!["nats://a:4222", "nats://b:4223"]);
}

#[test]
fn retry_delay_is_indexed_by_delivery_count() {
    let b = [1, 5, 15].map(Duration::from_millis);
    assert_eq!(retry_delay(&b, 1), Duration::from_millis(1));
    assert_eq!(retry_delay(&b, 3), Duration::from_millis(15));
    assert_eq!(retry_delay(&b, 9), Duration::from_millis(15));
    assert_eq!(retry_delay(&b, 0), Duration::from_millis(1));
}

#[test]
fn the_listed_variables_are_exactly_the_ones_read() {
    let env = Env::default();
    Config::from_env_values(&env).unwrap();
    let read = env.read.lock().unwrap().clone();
    let listed: std::collections::BTreeSet<&str> = VARIABLES.iter().copied().collect();
    assert_eq!(listed.len(), VARIABLES.len(), "duplicates in VARIABLES");
    let mut expected = listed.clone();
    // Read by the log filter, not by Config.
    expected.remove(Var::RustLog.name());
    assert_eq!(read, expected);
}

#[test]
fn per_kind_variables_are_named_from_the_kind_table() {
    let hrv = kind_vars(ConsumerKind::Hrv);
    assert_eq!(hrv.durable, ["HRV_DURABLE", "NORMALIZE_HRV_DURABLE"]);
    assert_eq!(hrv.subject, "NORMALIZE_HRV_SUBJECT");
    assert_eq!(hrv.batch_size, "HRV_BATCH_SIZE");
    assert_eq!(hrv.ack_wait_ms, "NORMALIZE_HRV_ACK_WAIT_MS");
    let oura = kind_vars(ConsumerKind::Oura);
    assert_eq!(oura.dlq, ["NORMALIZE_OURA_DLQ_SUBJECT", "NORMALIZE_DLQ_SUBJECT"]);
    assert_eq!(VARIABLES.len(), 65);
    assert!(VARIABLES.contains(&"SLEEP_PIPELINE_DEPTH"));
}

#[test]
fn the_consumer_set_is_every_kind_in_order() {
    let c = cfg(&[]).unwrap();
    let kinds: Vec<ConsumerKind> = c.consumers.iter().map(|cc| cc.kind).collect();
    assert_eq!(kinds, ConsumerKind::ALL);
}

#[test]
fn duplicate_durables_name_the_later_consumers_variable() {
    let err = cfg(&[("NORMALIZE_SLEEP_DURABLE", "normalize-hrv-durable")]).unwrap_err();
    assert_eq!(err.var, "NORMALIZE_SLEEP_DURABLE");
    assert_eq!(
        err.to_string(),
        "invalid value for NORMALIZE_SLEEP_DURABLE: \"normalize-hrv-durable\" (expected a durable name different from the hrv consumer's)"
    );
    // Different streams may share a name.
    assert!(cfg(&[("NORMALIZE_OURA_DURABLE", "normalize-hrv-durable")]).is_ok());
}

#[test]
fn unrelated_and_blank_variables_are_ignored() {
    let c = cfg(&[("PATH", "/bin"), ("PORT", "  "), ("HOST", " h ")]).unwrap();
    assert_eq!(c.port, 4102);
    assert_eq!(c.host, "h");
}

#[test]
fn stream_modes_are_cli_values() {
    use clap::ValueEnum;
    for mode in [StreamMode::Single, StreamMode::Multi] {
        assert_eq!(StreamMode::from_str(mode.as_str(), false), Ok(mode));
    }
}

#[test]
fn every_invalid_variable_is_reported_at_once() {
    let err = cfg(&[
        ("PORT", "http"),
        ("EVENT_STREAM_MODE", "triple"),
        ("NATS_URL", "http://x"),
        ("SLEEP_BATCH_SIZE", "0"),
        ("NORMALIZE_HRV_DLQ_SUBJECT", "errors.hrv"),
        ("METRICS_PORT", "9464"),
    ])
    .expect_err("five invalid variables");
    let mut vars = err.vars();
    vars.sort_unstable();
    assert_eq!(
        vars,
        [
            "EVENT_STREAM_MODE",
            "NATS_URL",
            "NORMALIZE_HRV_DLQ_SUBJECT",
            "PORT",
            "SLEEP_BATCH_SIZE"
        ]
    );
    let text = err.to_string();
    assert!(text.starts_with("5 invalid variables:"), "{text}");
    for var in vars {
        assert_eq!(
            text.matches(&format!("invalid value for {var}:")).count(),
            1,
            "{text}"
        );
    }
    // One invalid variable reads as before: one line, no count.
    let one = cfg(&[("PORT", "http")]).expect_err("PORT");
    assert!(one.more.is_empty());
    assert_eq!(one.to_string().lines().count(), 1);
}
