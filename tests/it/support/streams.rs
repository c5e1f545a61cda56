//! Publishing, waiting, and reading what the daemon left in streams, tables and metrics.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use sqlx::{Connection, PgConnection, PgPool};

/// Polls `check` until it is true; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes with JetStream and waits for the PubAck.
pub async fn publish(js: &jetstream::Context, subject: &str, body: impl Into<bytes::Bytes>) -> u64 {
    js.publish(subject.to_string(), body.into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

pub async fn publish_with_id(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    body: impl Into<bytes::Bytes>,
) -> u64 {
    let msg = jetstream::message::PublishMessage::build()
        .payload(body.into())
        .message_id(id);
    js.send_publish(subject.to_string(), msg)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Publishes with `Nats-Msg-Id` = `id` until JetStream acknowledges it, through outages,
/// elections and subject moves (the id makes a retry a no-op); returns how many attempts
/// failed. Panics when nothing was acknowledged within `within`.
pub async fn publish_until_acked(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    body: &str,
    within: Duration,
    pause: Duration,
) -> usize {
    let started = std::time::Instant::now();
    let mut failed = 0;
    loop {
        let msg = jetstream::message::PublishMessage::build()
            .payload(body.to_string().into())
            .message_id(id);
        let acked = match js.send_publish(subject.to_string(), msg).await {
            Ok(f) => f.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            return failed;
        }
        failed += 1;
        assert!(started.elapsed() < within, "publish of {id} never acked");
        tokio::time::sleep(pause).await;
    }
}

pub fn hrv_event(user: &str, date: &str, rmssd: f64, captured_at: &str) -> String {
    serde_json::json!({
        "eventId": format!("evt-{user}-{date}"),
        "payload": {"userId": user, "date": date, "rMSSD": rmssd, "capturedAt": captured_at, "raw": {"source": "Oura"}}
    })
    .to_string()
}

pub const HRV_SUBJECT: &str = "athlete-ally.hrv.raw-received";
pub const SLEEP_SUBJECT: &str = "athlete-ally.sleep.raw-received";
pub const OURA_SUBJECT: &str = "vendor.oura.webhook.received";

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

/// Messages stored in a stream (0 when it does not exist).
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// (num_pending, num_ack_pending) of a durable.
pub async fn consumer_backlog(js: &jetstream::Context, stream: &str, durable: &str) -> Option<(u64, usize)> {
    let s = js.get_stream(stream).await.ok()?;
    let info = s.consumer_info(durable).await.ok()?;
    Some((info.num_pending, info.num_ack_pending))
}

pub async fn wait_drained(js: &jetstream::Context, stream: &str, durable: &str) {
    wait_for(
        &format!("{stream}/{durable} drained"),
        Duration::from_secs(30),
        || async { consumer_backlog(js, stream, durable).await == Some((0, 0)) },
    )
    .await;
}

/// The value of one series in a metrics scrape, matched by name and every given label.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .reduce(|a, b| a + b)
}

/// All messages of a stream, as raw stored messages.
pub async fn stream_contents(js: &jetstream::Context, name: &str) -> Vec<jetstream::message::StreamMessage> {
    let mut out = Vec::new();
    let Ok(mut stream) = js.get_stream(name).await else {
        return out;
    };
    let info = stream.info().await.unwrap().clone();
    if info.state.messages == 0 {
        return out;
    }
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

/// Waits until a session of database `db_name` waits on a lock (a batch behind
/// [`lock_hrv_data`]); `pool` is any connection to that database.
pub async fn wait_blocked_on_a_lock(pool: &PgPool, db_name: &str) {
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db_name}' AND wait_event_type = 'Lock'"
    );
    wait_for("a batch waiting on the lock", Duration::from_secs(20), || async {
        count(pool, &blocked).await >= 1
    })
    .await;
}

/// Another session holding `hrv_data` in an open transaction: every write of the daemon waits
/// on this lock until the test sends `COMMIT` on the returned connection.
pub async fn lock_hrv_data(db_url: &str) -> PgConnection {
    let mut locker = PgConnection::connect(db_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE hrv_data IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}
