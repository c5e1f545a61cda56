//! The database stuck or mismatched under a running daemon (issue "Nothing silently lost,
//! stranded or pinned", items 4 and 8): a statement blocked by a lock is cancelled by
//! `DATABASE_STATEMENT_TIMEOUT_MS` and its message NAKed and retried instead of held with
//! progress acks; a schema that does not match the service (class 42) is an outage that is
//! retried, not a reason to dead-letter. Each scenario ends with exactly one row and no dead
//! letter once the cause is gone, or, by design, a `max-deliver` dead letter when it outlasts
//! the delivery limit.

use std::time::Duration;

use crate::support::*;

const STREAM: &str = "AA_CORE_HOT";
const DURABLE: &str = "normalize-hrv-durable";

async fn retries(app: &TestApp) -> f64 {
    metric_value(
        &app.metrics().await,
        "normalize_hrv_messages_total",
        &[("result", "retry")],
    )
    .unwrap_or(0.0)
}

async fn redelivered(js: &async_nats::jetstream::Context) -> u64 {
    match js.get_stream(STREAM).await {
        Ok(s) => s
            .consumer_info(DURABLE)
            .await
            .map(|i| i.num_redelivered as u64)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// A daemon whose HRV consumer retries fast and (almost) never gives up.
const RETRY_FAST: &[(&str, &str)] = &[
    ("NORMALIZE_RETRY_BACKOFF_MS", "200"),
    ("NORMALIZE_HRV_MAX_DELIVER", "1000"),
];

/// The servers and a daemon that retries fast, with `extra` over that.
async fn retrying_app(extra: &[(&str, &str)]) -> (Stack, TestApp) {
    Stack::builder().env(RETRY_FAST).env(extra).app().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_blocked_by_a_lock_is_retried_not_pinned() {
    let (stack, app) = retrying_app(&[("DATABASE_STATEMENT_TIMEOUT_MS", "1000")]).await;
    let (js, db) = (&stack.js, &stack.db);

    // Another session holds the table: every write of the daemon waits on this lock.
    let mut locker = lock_hrv_data(&db.url).await;

    publish(
        js,
        HRV_SUBJECT,
        hrv_event("locked", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    // Without a statement timeout the write waits for the lock indefinitely while progress
    // acks keep the message from redelivery: no retry would ever be counted.
    wait_for(
        "the blocked write cancelled and its message retried twice",
        Duration::from_secs(20),
        || async { retries(&app).await >= 2.0 && redelivered(js).await >= 1 },
    )
    .await;
    assert_eq!(
        stream_messages(js, "AA_DLQ").await,
        0,
        "retried, not dead-lettered"
    );

    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    let pool = db.pool().await;
    wait_for(
        "the row once the lock is released",
        Duration::from_secs(20),
        || async { count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'locked'").await == 1 },
    )
    .await;
    wait_drained(js, STREAM, DURABLE).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 1);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

/// A timeout on the last allowed delivery is a retryable failure there: by design (SPEC §5)
/// the message becomes a `max-deliver` dead letter, which `dlq replay` brings back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_on_the_last_delivery_is_a_max_deliver_dead_letter() {
    let (stack, app) = retrying_app(&[
        ("DATABASE_STATEMENT_TIMEOUT_MS", "500"),
        ("NORMALIZE_HRV_MAX_DELIVER", "2"),
    ])
    .await;
    let (js, db) = (&stack.js, &stack.db);
    let mut locker = lock_hrv_data(&db.url).await;

    let seq = publish(
        js,
        HRV_SUBJECT,
        hrv_event("last", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for("a dead letter", Duration::from_secs(20), || async {
        stream_messages(js, "AA_DLQ").await >= 1
    })
    .await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    wait_drained(js, STREAM, DURABLE).await;

    let letters = stream_contents(js, "AA_DLQ").await;
    assert_eq!(letters.len(), 1);
    let h = |n: &str| {
        letters[0]
            .headers
            .get(n)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(h("Dlq-Reason"), "max-deliver");
    assert_eq!(h("Dlq-Delivery-Count"), "2");
    assert_eq!(h("Dlq-Original-Sequence"), seq.to_string());
    let pool = db.pool().await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 0);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_column_is_retried_until_the_schema_is_fixed() {
    let (stack, app) = retrying_app(&[]).await;
    let (js, db) = (&stack.js, &stack.db);

    // The table no longer matches the service (SQLSTATE 42703 on every write).
    let pool = db.pool().await;
    sqlx::query("ALTER TABLE hrv_data RENAME COLUMN ln_rmssd TO ln_rmssd_x")
        .execute(&pool)
        .await
        .unwrap();

    publish(
        js,
        HRV_SUBJECT,
        hrv_event("schema", "2025-03-01", 40.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    wait_for(
        "the message retried while the schema is broken",
        Duration::from_secs(20),
        || async { retries(&app).await >= 3.0 },
    )
    .await;
    assert_eq!(
        stream_messages(js, "AA_DLQ").await,
        0,
        "a schema outage of the database dead-letters nothing"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 0);

    sqlx::query("ALTER TABLE hrv_data RENAME COLUMN ln_rmssd_x TO ln_rmssd")
        .execute(&pool)
        .await
        .unwrap();
    wait_for(
        "the row once the schema is fixed",
        Duration::from_secs(20),
        || async { count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'schema'").await == 1 },
    )
    .await;
    wait_drained(js, STREAM, DURABLE).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM hrv_data").await, 1);
    assert_eq!(stream_messages(js, "AA_DLQ").await, 0);
    app.stop().await.unwrap();
}

/// Only the daemon's pooled connections carry the bound; the migration connection does not,
/// so a migration slower than `DATABASE_STATEMENT_TIMEOUT_MS` cannot fail every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_timeout_bounds_the_pool_but_not_migrations() {
    let nats = NatsServer::placeholder();
    let db = TestDb::new().await;
    let config = normalize_service::config::Config::from_vars(with(
        with(base_vars(&nats, &db.url), RETRY_FAST),
        &[("DATABASE_STATEMENT_TIMEOUT_MS", "1234")],
    ))
    .unwrap();
    let pool = normalize_service::store::lazy_pool(&config).unwrap();
    let pooled: (String, String) =
        sqlx::query_as("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pooled, ("1234ms".to_string(), "1234ms".to_string()));
    pool.close().await;

    use sqlx::ConnectOptions;
    let mut conn = normalize_service::store::migration_options(&config)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let migration: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(migration, "0", "the server's default, not the daemon's bound");
    // A statement slower than the bound fails on a pooled connection with 57014, transient.
    let pool = normalize_service::store::lazy_pool(&config).unwrap();
    let err = sqlx::query("SELECT pg_sleep(2)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(normalize_service::store::is_transient(&err), "{err}");
    assert!(
        matches!(&err, sqlx::Error::Database(d) if d.code().as_deref() == Some("57014")),
        "{err}"
    );
    // …and completes on the migration connection.
    sqlx::query("SELECT pg_sleep(2)")
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Every pooled connection busy in a statement waiting on a lock: PostgreSQL still answers, so
/// the watchdog's probe (over a connection of its own then) keeps the database `connected` and
/// the instance ready, instead of calling a busy pool an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_busy_behind_a_lock_is_not_a_database_outage() {
    let (stack, app) = Stack::builder()
        .env(&[
            ("DATABASE_MAX_CONNECTIONS", "1"),
            ("DATABASE_STATEMENT_TIMEOUT_MS", "60000"),
        ])
        .app()
        .await;
    let (js, db) = (&stack.js, &stack.db);
    let mut locker = lock_hrv_data(&db.url).await;
    publish(
        js,
        HRV_SUBJECT,
        hrv_event("busy", "2025-03-01", 42.0, "2025-03-01T06:00:00Z"),
    )
    .await;
    let pool = db.pool().await;
    wait_blocked_on_a_lock(&pool, &db.name).await;
    // The only pooled connection stays inside the blocked statement meanwhile.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (code, health) = app.health().await;
        assert_eq!(health["database"], "connected", "{health}");
        assert_eq!(code, 200, "{health}");
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    wait_for(
        "the row once the lock is gone",
        Duration::from_secs(20),
        || async { count(&pool, "SELECT count(*) FROM hrv_data WHERE user_id = 'busy'").await == 1 },
    )
    .await;
    app.stop().await.unwrap();
}
