//! Every operator command connects as the daemon does (`normalize_service::nats`): credentials
//! embedded in `NATS_URL` (`user:password@`, `token@`) are honoured, their absence is refused
//! with a clear message that shows no secret, and the TLS CA check applies.

use std::collections::HashMap;

use async_nats::jetstream;
use normalize_service::config::{StreamMode, StreamNames};
use normalize_service::topology;
use serde_json::Value;

use crate::support::*;

/// One command of each operator family; each succeeds on a migrated (three-stream) server.
const COMMANDS: &[&[&str]] = &[
    &["dlq", "list", "--json"],
    &["topology", "status", "--json"],
    &["migrate", "plan", "--json"],
];

fn vars(nats: &NatsServer, extra: &[(&str, &str)]) -> HashMap<String, String> {
    // None of these commands touches the database.
    with(
        base_vars(nats, "postgres://postgres@127.0.0.1:5432/unused"),
        extra,
    )
}

/// The three streams of a migrated installation, so every command has something to show.
async fn three_streams(js: &jetstream::Context) {
    for spec in topology::stream_specs(StreamMode::Multi, &StreamNames::default(), 1) {
        js.create_stream(spec.to_config()).await.unwrap();
    }
}

async fn all_succeed(vars: &HashMap<String, String>, secrets: &[&str]) {
    for args in COMMANDS {
        let r = cli(vars, args).await;
        assert_eq!(r.code, 0, "{args:?}\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        let doc: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", r.stdout));
        assert!(doc.is_object(), "{args:?}: {doc}");
        for s in secrets {
            assert!(
                !r.stdout.contains(s) && !r.stderr.contains(s),
                "{args:?} shows a secret"
            );
        }
    }
}

/// Every command fails (exit 1, an operational failure) with a message containing every
/// `needles` and no secret.
async fn all_refused(vars: &HashMap<String, String>, needles: &[&str], secrets: &[&str]) {
    for args in COMMANDS {
        let r = cli(vars, args).await;
        assert_eq!(r.code, 1, "{args:?}\nstdout: {}\nstderr: {}", r.stdout, r.stderr);
        for n in needles {
            assert!(
                r.stderr.contains(n),
                "{args:?}: message lacks {n:?}: {}",
                r.stderr
            );
        }
        for s in secrets {
            assert!(
                !r.stdout.contains(s) && !r.stderr.contains(s),
                "{args:?} shows a secret:\n{}\n{}",
                r.stdout,
                r.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_in_the_url() {
    // Characters a URL must percent-encode, to show they are decoded.
    let password = "cli-pw@7f3a/x";
    let encoded = "cli-pw%407f3a%2Fx";
    let nats = NatsServer::start_with(&format!(
        "authorization {{\n  user: svc\n  password: \"{password}\"\n}}\n"
    ))
    .await;
    let client = async_nats::ConnectOptions::with_user_and_password("svc".into(), password.into())
        .connect(nats.url())
        .await
        .unwrap();
    three_streams(&jetstream::new(client)).await;
    let url = |pw: &str| format!("nats://svc:{pw}@127.0.0.1:{}", nats.port);

    all_succeed(&vars(&nats, &[("NATS_URL", &url(encoded))]), &[password, encoded]).await;

    let refused = ["NATS refused the credentials", "NATS_PASSWORD"];
    all_refused(&vars(&nats, &[]), &refused, &[password]).await;
    all_refused(
        &vars(&nats, &[("NATS_URL", &url("not-the-password"))]),
        &refused,
        &[password, "not-the-password"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_url() {
    let token = "cli-token-9c1e";
    let nats = NatsServer::start_with(&format!("authorization {{\n  token: \"{token}\"\n}}\n")).await;
    let client = async_nats::ConnectOptions::with_token(token.into())
        .connect(nats.url())
        .await
        .unwrap();
    three_streams(&jetstream::new(client)).await;
    let url = |t: &str| format!("nats://{t}@127.0.0.1:{}", nats.port);

    all_succeed(&vars(&nats, &[("NATS_URL", &url(token))]), &[token]).await;

    let refused = ["NATS refused the credentials", "NATS_TOKEN"];
    all_refused(&vars(&nats, &[]), &refused, &[token]).await;
    all_refused(
        &vars(&nats, &[("NATS_URL", &url("wrong-token"))]),
        &refused,
        &[token, "wrong-token"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_ca_is_checked_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::security::generate_tls(dir.path(), "good");
    let (other_ca, _, _) = crate::security::generate_tls(dir.path(), "other");
    let nats = NatsServer::start_with(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n",
        cert.display(),
        key.display()
    ))
    .await;
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(&url)
        .await
        .unwrap();
    three_streams(&jetstream::new(client)).await;

    let ca = ca.display().to_string();
    all_succeed(
        &vars(&nats, &[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &ca)]),
        &[],
    )
    .await;
    let other_ca = other_ca.display().to_string();
    all_refused(
        &vars(&nats, &[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &other_ca)]),
        &["TLS", "NATS_TLS_CA_FILE"],
        &[],
    )
    .await;
}

/// `migrate … --server URL` without credentials reaches that server with the credentials of
/// NATS_URL, taken as every connection takes them: from the first URL that carries any (here
/// the second). It used to take them from the first URL only, so the step was refused with
/// "cannot connect to … to probe through it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_credentials_uses_those_of_nats_url() {
    let password = "pw-9d2c";
    let nats = NatsServer::start_bin_with(
        &crate::versions::nats_2x_bin(),
        &format!("authorization {{\n  user: svc\n  password: \"{password}\"\n}}\n"),
    )
    .await;
    let client = async_nats::ConnectOptions::with_user_and_password("svc".into(), password.into())
        .connect(nats.url())
        .await
        .unwrap();
    jetstream::new(client)
        .create_stream(topology::legacy_spec(&StreamNames::default(), 1).to_config())
        .await
        .unwrap();
    let bare = nats.url();
    let with_pw = format!("nats://svc:{password}@127.0.0.1:{}", nats.port);
    let v = vars(&nats, &[("NATS_URL", &format!("{bare},{with_pw}"))]);
    let r = cli(&v, &["migrate", "phase0", "--json"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // The mapping is only printed, never applied: the probes through --server run and time out.
    let r = cli(
        &v,
        &[
            "migrate",
            "phase1",
            "--yes",
            "--cutover",
            "mapping",
            "--server",
            &bare,
            "--mapping-timeout",
            "1",
            "--json",
        ],
    )
    .await;
    assert!(!r.stdout.contains("cannot connect"), "{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let doc = r.json();
    let probed = doc["checks"].as_array().unwrap().iter().any(|c| {
        c["what"].as_str().unwrap_or("").starts_with("mapping of")
            && c["status"].as_str().unwrap_or("").contains("not within 1 s")
    });
    assert!(probed, "{doc}");
    assert!(!r.stdout.contains(password) && !r.stderr.contains(password));
}
