//! Issue #7, item 9: NATS authentication and TLS, secrets in logs, payload data on `/health`.
//!
//! Each scenario starts its own nats-server with `authorization { user, password }`,
//! `authorization { token }` or `tls { cert_file, key_file }` (a CA and a server certificate for
//! 127.0.0.1/localhost generated here with rcgen), then runs the daemon as a process
//! (`env_clear()` + explicit variables):
//! - right settings: the daemon becomes ready, stores a published event (exactly one row, no
//!   dead letter), and neither its logs (at `RUST_LOG=debug`, async-nats at trace) nor
//!   `/health*` nor `/metrics` contain the secret; `/health` and `/metrics` contain no payload
//!   data (a distinctive user id and event id are published and looked for);
//! - wrong settings: the daemon exits non-zero on its own, with a message naming the problem and
//!   the variables to check, and without the secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::support::*;

/// How long a daemon with wrong settings may take to give up. `nats::connect` uses a 5 s
/// connection timeout; this is a bound for a hang, not a performance assertion.
const REFUSAL_BOUND: Duration = Duration::from_secs(30);

/// A secret that cannot appear anywhere by chance.
fn secret(kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{kind}-Zq8{nanos:x}-{}", std::process::id())
}

/// The daemon as a child process on fresh ports, logging JSON at debug (async-nats at trace)
/// unless `vars` sets `RUST_LOG`, so the secret checks see everything.
fn verbose_daemon(mut vars: HashMap<String, String>) -> DaemonProcess {
    vars.entry("RUST_LOG".into())
        .or_insert_with(|| "debug,async_nats=trace".into());
    // The production format, whatever the caller's base variables say.
    vars.insert("LOG_FORMAT".into(), "json".into());
    DaemonProcess::spawn(&vars)
}

/// The right settings: ready, one event stored, secrets and payload data nowhere.
async fn accepted(vars: HashMap<String, String>, js: &jetstream::Context, db: &TestDb, secrets: &[&str]) {
    let mut daemon = verbose_daemon(vars);
    daemon.wait_ready().await;

    // A distinctive user id and event id: payload data that must never reach /health.
    let marker = secret("user");
    let event_id = secret("event");
    let body = serde_json::json!({
        "eventId": event_id,
        "payload": {"userId": marker, "date": "2025-03-01", "rMSSD": 51.7319,
                    "capturedAt": "2025-03-01T06:00:00Z", "raw": {"source": "oura"}}
    })
    .to_string();
    publish(js, HRV_SUBJECT, body).await;
    let pool = db.pool().await;
    wait_for("the event is stored", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM hrv_data").await == 1
    })
    .await;
    let stored: String = sqlx::query_scalar("SELECT user_id FROM hrv_data")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, marker);
    wait_drained(js, "AA_CORE_HOT", "normalize-hrv-durable").await;

    let mut exposed = Vec::new();
    for (port, path) in [
        (daemon.port, "/health"),
        (daemon.port, "/health/ready"),
        (daemon.port, "/health/live"),
        (daemon.port, "/metrics"),
        (daemon.metrics_port, "/metrics"),
    ] {
        let (code, body) = daemon.get_on(port, path).await;
        assert_eq!(code, 200, "{path} on {port}: {body}");
        exposed.push((path, body));
    }
    let health: serde_json::Value = serde_json::from_str(&exposed[0].1).unwrap();
    assert_eq!(health["nats"], "connected", "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    for (path, body) in &exposed {
        for s in secrets {
            assert!(!body.contains(s), "{path} exposes a secret");
        }
        assert!(!body.contains(&marker), "{path} exposes a user id: {body}");
        assert!(!body.contains(&event_id), "{path} exposes an event id: {body}");
        // A value no timestamp or counter in the body could contain by chance (`51.5` did:
        // "…:12:51.537Z").
        assert!(
            !body.contains("51.7319"),
            "{path} exposes a payload value: {body}"
        );
    }

    daemon.stop().await;
    let logs = daemon.output();
    // The scan below is meaningful only if the logs are the verbose ones asked for.
    assert!(
        logs.contains("connected to NATS"),
        "no start-up logs captured:\n{logs}"
    );
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "debug logs were not captured"
    );
    for s in secrets {
        assert!(!logs.contains(s), "a secret appears in the logs:\n{logs}");
    }
    // Exactly one row, no dead letter, nothing else.
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM sleep_data").await, 0);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
}

/// The wrong settings: a non-zero exit on its own, a message containing every `needles`
/// (case-insensitive), and no secret.
async fn refused(vars: HashMap<String, String>, needles: &[&str], secrets: &[&str]) -> String {
    let mut daemon = verbose_daemon(vars);
    let status = daemon.wait_exit(REFUSAL_BOUND).await;
    let out = daemon.output();
    let status = status.unwrap_or_else(|| {
        panic!("daemon with wrong settings still running after {REFUSAL_BOUND:?}:\n{out}")
    });
    assert!(!status.success(), "wrong settings must fail start-up:\n{out}");
    let lower = out.to_lowercase();
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "message lacks {n:?}:\n{out}");
    }
    for s in secrets {
        assert!(!out.contains(s), "a secret appears in the output:\n{out}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password() {
    let password = secret("pw");
    let wrong = secret("wrongpw");
    let stack = stack_with_password(&password).await;

    accepted(
        stack.vars_with(&[("NATS_USER", "svc"), ("NATS_PASSWORD", &password)]),
        &stack.js,
        &stack.db,
        &[&password],
    )
    .await;

    let needles = ["NATS refused the credentials", "NATS_PASSWORD"];
    refused(
        stack.vars_with(&[("NATS_USER", "svc"), ("NATS_PASSWORD", &wrong)]),
        &needles,
        &[&password, &wrong],
    )
    .await;
    refused(
        stack.vars_with(&[("NATS_USER", "intruder"), ("NATS_PASSWORD", &password)]),
        &needles,
        &[&password],
    )
    .await;
    // No credentials at all against a server that requires them.
    refused(stack.vars_with(&[]), &needles, &[&password]).await;
}

/// Own servers, the nats-server requiring user `svc` with `password`.
async fn stack_with_password(password: &str) -> Stack {
    Stack::builder()
        .nats_conf(&format!(
            "authorization {{\n  user: svc\n  password: \"{password}\"\n}}\n"
        ))
        .nats_client(async_nats::ConnectOptions::with_user_and_password(
            "svc".into(),
            password.into(),
        ))
        .start()
        .await
}

/// Credentials embedded in NATS_URL (`nats://user:pass@host`, which docs/CONFIGURATION.md documents as
/// redacted and the previous service accepted) authenticate, and never reach the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_nats_url() {
    let password = secret("pw");
    let stack = stack_with_password(&password).await;
    let url = format!("nats://svc:{password}@127.0.0.1:{}", stack.nats.port);
    accepted(
        stack.vars_with(&[("NATS_URL", &url)]),
        &stack.js,
        &stack.db,
        &[&password],
    )
    .await;
}

/// At the default log level, a password in NATS_URL appears nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_nats_url_is_not_logged_at_the_default_level() {
    let password = secret("pw");
    let stack = stack_with_password(&password).await;
    let url = format!("nats://svc:{password}@127.0.0.1:{}", stack.nats.port);
    let mut v = stack.vars_with(&[("NATS_URL", &url)]);
    v.insert("RUST_LOG".into(), "info".into());
    let mut daemon = verbose_daemon(v);
    // Either outcome is acceptable here; only the secret matters.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && daemon.get("/health/ready").await.0 != 200 {
        if daemon.exited().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, health) = daemon.get("/health").await;
    let _ = daemon.wait_exit(Duration::from_millis(1)).await;
    let out = daemon.output();
    assert!(!out.contains(&password), "password logged:\n{out}");
    assert!(!health.contains(&password), "password in /health");
    assert!(
        out.contains("\"message\":\"starting\""),
        "no logs captured:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let token = secret("tok");
    let wrong = secret("wrongtok");
    let stack = Stack::builder()
        .nats_conf(&format!("authorization {{\n  token: \"{token}\"\n}}\n"))
        .nats_client(async_nats::ConnectOptions::with_token(token.clone()))
        .start()
        .await;

    accepted(
        stack.vars_with(&[("NATS_TOKEN", &token)]),
        &stack.js,
        &stack.db,
        &[&token],
    )
    .await;

    let needles = ["NATS refused the credentials", "NATS_TOKEN"];
    refused(
        stack.vars_with(&[("NATS_TOKEN", &wrong)]),
        &needles,
        &[&token, &wrong],
    )
    .await;
    refused(stack.vars_with(&[]), &needles, &[&token]).await;
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`; returns
/// (ca.pem, server-cert.pem, server-key.pem).
pub(crate) fn generate_tls(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("normalize-service test CA {name}"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let ca_path = dir.join(format!("{name}-ca.pem"));
    let cert_path = dir.join(format!("{name}-server.pem"));
    let key_path = dir.join(format!("{name}-server-key.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, server_cert.pem()).unwrap();
    std::fs::write(&key_path, server_key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

/// Own servers, the nats-server requiring TLS with a certificate of a freshly generated CA
/// (returned), the stack's client trusting that CA.
async fn tls_stack(dir: &Path) -> (Stack, PathBuf) {
    let (ca, cert, key) = generate_tls(dir, "good");
    let stack = Stack::builder()
        .nats_conf(&format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n",
            cert.display(),
            key.display()
        ))
        .nats_client(
            async_nats::ConnectOptions::new()
                .add_root_certificates(ca.clone())
                .require_tls(true),
        )
        .start()
        .await;
    (stack, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, ca) = tls_stack(dir.path()).await;
    let url = format!("tls://127.0.0.1:{}", stack.nats.port);
    let ca = ca.display().to_string();
    accepted(
        stack.vars_with(&[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &ca)]),
        &stack.js,
        &stack.db,
        &[],
    )
    .await;

    // localhost is in the certificate too.
    let db2 = TestDb::new().await;
    let url = format!("tls://localhost:{}", stack.nats.port);
    accepted(
        with(
            base_vars(&stack.nats, &db2.url),
            &[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &ca)],
        ),
        &stack.js,
        &db2,
        &[],
    )
    .await;

    // A CA file that does not exist is a configuration error named as such.
    let missing = dir.path().join("missing-ca.pem").display().to_string();
    let url = format!("tls://127.0.0.1:{}", stack.nats.port);
    refused(
        stack.vars_with(&[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &missing)]),
        &["NATS_TLS_CA_FILE"],
        &[],
    )
    .await;
}

/// A server certificate signed by a CA the daemon does not trust must stop start-up with a TLS
/// error, not be retried forever as if the server were unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_untrusted_certificate_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _ca) = tls_stack(dir.path()).await;
    let (other_ca, _, _) = generate_tls(dir.path(), "other");
    let url = format!("tls://127.0.0.1:{}", stack.nats.port);
    let other_ca = other_ca.display().to_string();
    refused(
        stack.vars_with(&[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &other_ca)]),
        &["TLS", "NATS_TLS_CA_FILE"],
        &[],
    )
    .await;
    // No CA at all: the server demands TLS, the system roots do not know the test CA.
    refused(stack.vars_with(&[]), &["TLS"], &[]).await;
}

/// With an untrusted certificate the daemon never connects and never becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_untrusted_certificate_never_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, _ca) = tls_stack(dir.path()).await;
    let (other_ca, _, _) = generate_tls(dir.path(), "other");
    let url = format!("tls://127.0.0.1:{}", stack.nats.port);
    let other_ca = other_ca.display().to_string();
    let mut daemon = verbose_daemon(stack.vars_with(&[("NATS_URL", &url), ("NATS_TLS_CA_FILE", &other_ca)]));
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut status = None;
    while Instant::now() < deadline {
        if let Some(s) = daemon.exited() {
            status = Some(s);
            break;
        }
        let (code, _) = daemon.get("/health/ready").await;
        assert_ne!(
            code,
            200,
            "ready with an untrusted certificate:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = daemon.output();
    assert!(
        !out.contains("connected to NATS"),
        "connected with an untrusted CA:\n{out}"
    );
    if let Some(status) = status {
        assert!(!status.success(), "{out}");
        assert!(out.contains("TLS"), "exit without naming TLS:\n{out}");
    }
}
