//! Settling without a server: a recording [`AckTarget`] and a scripted DLQ, on paused time.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::AckKind;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use super::super::delivery::{Delivery, Ledger};
use super::*;
use crate::config::{ConsumerKind, StreamMode};
use crate::dlq::{Origin, Reason};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outcome::{Action, Failure};

const KIND: ConsumerKind = ConsumerKind::Hrv;

/// What a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::consumer) enum Sent {
    Ack,
    Nak(Option<Duration>),
    Term,
    Progress,
}

/// What a message was sent, and when (paused time since the test began).
pub(in crate::consumer) type Log = Arc<Mutex<Vec<(Duration, Sent)>>>;

/// A delivered message that records what it is sent.
pub(in crate::consumer) struct Fake {
    pub delivered: i64,
    pub seq: u64,
    pub log: Log,
    pub epoch: tokio::time::Instant,
    /// What the message's metadata says the consumer still had to deliver.
    pub pending: Option<u64>,
}

impl Fake {
    pub fn new(delivered: i64, seq: u64) -> Fake {
        Fake {
            delivered,
            seq,
            log: Log::default(),
            epoch: tokio::time::Instant::now(),
            pending: None,
        }
    }

    pub fn log(log: &Log) -> Vec<(Duration, Sent)> {
        log.lock().unwrap().clone()
    }

    pub fn sent(log: &Log) -> Vec<Sent> {
        Fake::log(log).into_iter().map(|(_, s)| s).collect()
    }
}

impl AckTarget for Fake {
    fn acknowledge(&self, kind: AckKind) -> impl Future<Output = Result<(), async_nats::Error>> + Send {
        let sent = match kind {
            AckKind::Ack => Sent::Ack,
            AckKind::Nak(d) => Sent::Nak(d),
            AckKind::Term => Sent::Term,
            AckKind::Progress => Sent::Progress,
            AckKind::Next => panic!("the consumer never sends +NXT"),
        };
        self.log.lock().unwrap().push((self.epoch.elapsed(), sent));
        std::future::ready(Ok(()))
    }

    fn delivered(&self) -> Option<i64> {
        Some(self.delivered)
    }

    fn stream_sequence(&self) -> Option<u64> {
        Some(self.seq)
    }

    fn pending(&self) -> Option<u64> {
        self.pending
    }
}

/// The ledger side of a test: `/health`, the unsettled counter.
pub(in crate::consumer) struct Books {
    pub health: Arc<Health>,
    pub unsettled: IntCounter,
}

impl Books {
    pub fn new() -> Books {
        let wait = Duration::from_secs(30);
        Books {
            health: Arc::new(Health::new(StreamMode::Single, &[(KIND, "d".into(), wait, wait)])),
            unsettled: IntCounter::new("unsettled", "test").unwrap(),
        }
    }

    pub fn ledger(&self, server_max_deliver: Option<i64>) -> Ledger {
        Ledger {
            kind: KIND,
            unsettled: self.unsettled.clone(),
            health: self.health.clone(),
            server_max_deliver,
        }
    }

    pub fn holding(&self) -> u64 {
        self.health.activity(KIND).holding()
    }
}

/// A DLQ whose answers are scripted: true stores the letter; the last answer repeats.
/// `duplicate`: every stored letter is answered as already stored (a redelivery after a lost
/// TERM).
struct Script {
    answers: Mutex<VecDeque<bool>>,
    stored: Mutex<Vec<(Reason, String)>>,
    duplicate: bool,
}

impl Script {
    fn new(answers: &[bool]) -> Script {
        Script {
            answers: Mutex::new(answers.iter().copied().collect()),
            stored: Mutex::default(),
            duplicate: false,
        }
    }
}

impl Letters<Fake> for &Script {
    fn store(
        &self,
        _msg: &Fake,
        _origin: &Origin<'_>,
        reason: Reason,
        error: &str,
    ) -> impl Future<Output = Result<StoredLetter, PublishError>> + Send {
        let mut answers = self.answers.lock().unwrap();
        let ok = if answers.len() > 1 {
            answers.pop_front()
        } else {
            answers.front().copied()
        };
        let result = if ok == Some(true) {
            let mut stored = self.stored.lock().unwrap();
            stored.push((reason, error.to_string()));
            Ok(StoredLetter {
                seq: stored.len() as u64,
                duplicate: self.duplicate,
            })
        } else {
            Err(PublishError::new(PublishErrorKind::TimedOut))
        };
        std::future::ready(result)
    }
}

struct Setup {
    books: Books,
    metrics: Metrics,
    shutdown: CancellationToken,
    backoff: Vec<Duration>,
}

const ORIGIN: Origin<'static> = Origin {
    subject: "athlete-ally.hrv.raw-received",
    stream: "S",
    seq: 7,
    durable: "d",
    delivered: 1,
    published: None,
};

impl Setup {
    fn new(backoff: &[u64]) -> Setup {
        Setup {
            books: Books::new(),
            metrics: Metrics::new().unwrap(),
            shutdown: CancellationToken::new(),
            backoff: backoff.iter().map(|&ms| Duration::from_millis(ms)).collect(),
        }
    }

    fn settler<'a>(&'a self, script: &'a Script, server_max_deliver: Option<i64>) -> Settler<'a, &'a Script> {
        Settler {
            kind: KIND,
            metrics: &self.metrics,
            health: &self.books.health,
            letters: script,
            backoff: &self.backoff,
            ack_wait: Duration::from_secs(30),
            server_max_deliver,
            shutdown_timeout: Duration::from_secs(2),
            metric_subject: "athlete-ally.hrv.raw-received",
            durable: "d",
            shutdown: &self.shutdown,
        }
    }

    /// A value of the rendered metrics: `name` with all of `labels`.
    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics.render();
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| labels.iter().all(|kv| l.contains(kv)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    fn results(&self, result: &str) -> f64 {
        self.metric("normalize_hrv_messages_total", &[&format!("result=\"{result}\"")])
    }

    fn dead_letter_ok(&self) -> bool {
        self.books.health.snapshot()[&KIND].dead_letter_ok
    }
}

fn delivered(origin: Origin<'static>, delivered: i64) -> Origin<'static> {
    Origin { delivered, ..origin }
}

fn schema_failure() -> Failure {
    Failure::Schema(crate::pipeline::SchemaError::Missing("time"))
}

#[tokio::test(start_paused = true)]
async fn a_message_is_settled_once_and_progress_stops_after() {
    let books = Books::new();
    let ledger = books.ledger(None);
    let d = ledger.receive(Fake::new(1, 1));
    let log = d.msg.log.clone();
    assert_eq!(books.holding(), 1);
    progress_all([&d].into_iter()).await;
    ack_all(std::slice::from_ref(&d)).await;
    d.nak(None).await;
    d.term().await;
    progress_all([&d].into_iter()).await;
    assert_eq!(Fake::sent(&log), [Sent::Progress, Sent::Ack]);
    assert_eq!(books.holding(), 0);
    drop(d);
    assert_eq!(books.unsettled.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_message_dropped_unsettled_is_counted() {
    let books = Books::new();
    let d = books.ledger(None).receive(Fake::new(1, 1));
    drop(d);
    assert_eq!(books.unsettled.get(), 1);
    assert_eq!(books.holding(), 0);
}

#[tokio::test(start_paused = true)]
async fn each_action_sends_its_settlement_and_counts_it() {
    let s = Setup::new(&[100, 200]);
    let script = Script::new(&[true]);
    let settler = s.settler(&script, None);
    let ledger = s.books.ledger(None);
    let report = || Report {
        sections: vec!["sleep"],
        error: "sleep: bad".into(),
    };
    let invalid = schema_failure();
    // (action, failure, report, what the message is sent, the `result` counted)
    type Case<'a> = (Action, Option<&'a Failure>, Option<Report>, Sent, &'static str);
    let cases: [Case<'_>; 4] = [
        (Action::Ack, None, None, Sent::Ack, "success"),
        (
            Action::Nak(Duration::from_millis(200)),
            None,
            None,
            Sent::Nak(Some(Duration::from_millis(200))),
            "retry",
        ),
        (
            Action::DeadLetter(Reason::SchemaInvalid),
            Some(&invalid),
            None,
            Sent::Term,
            "schema_invalid",
        ),
        (Action::Ack, None, Some(report()), Sent::Ack, "success"),
    ];
    for (i, (action, failure, report, sent, result)) in cases.into_iter().enumerate() {
        let before = s.results(result);
        let d = ledger.receive(Fake::new(1, i as u64 + 1));
        settler.settle(&d, &ORIGIN, failure, action, report).await;
        assert_eq!(Fake::sent(&d.msg.log), [sent], "case {i}");
        assert_eq!(s.results(result), before + 1.0, "case {i}");
    }
    let stored = script.stored.lock().unwrap().clone();
    assert_eq!(
        stored,
        [
            (Reason::SchemaInvalid, invalid.to_string()),
            (Reason::SchemaInvalid, "sleep: bad".to_string())
        ]
    );
    assert_eq!(s.metric("normalize_oura_invalid_sections_total", &["sleep"]), 1.0);
    assert_eq!(s.books.holding(), 0);
}

/// A redelivery whose dead letter JetStream already holds (the TERM was lost): terminated as
/// usual, but `dlq_messages_total` counts stored letters, not deliveries, so it is not counted
/// again.
#[tokio::test(start_paused = true)]
async fn a_dead_letter_already_stored_is_settled_but_not_counted_again() {
    let s = Setup::new(&[100]);
    let script = Script {
        duplicate: true,
        ..Script::new(&[true])
    };
    let settler = s.settler(&script, None);
    let ledger = s.books.ledger(None);
    let failure = schema_failure();
    let d = ledger.receive(Fake::new(2, 1));
    settler
        .settle(
            &d,
            &delivered(ORIGIN, 2),
            Some(&failure),
            Action::DeadLetter(Reason::SchemaInvalid),
            None,
        )
        .await;
    assert_eq!(Fake::sent(&d.msg.log), [Sent::Term]);
    assert_eq!(s.metric("dlq_messages_total", &[]), 0.0);
    assert!(s.dead_letter_ok());
    assert_eq!(s.books.holding(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unstored_dead_letter_naks_with_the_backoff_of_its_delivery() {
    let s = Setup::new(&[100, 200, 400]);
    let script = Script::new(&[false]);
    let settler = s.settler(&script, Some(5));
    let ledger = s.books.ledger(Some(5));
    let failure = schema_failure();
    let d = ledger.receive(Fake::new(2, 1));
    let action = Action::DeadLetter(Reason::SchemaInvalid);
    settler
        .settle(&d, &delivered(ORIGIN, 2), Some(&failure), action, None)
        .await;
    // Not its last delivery: NAKed for a redelivery, never acked or terminated.
    assert_eq!(
        Fake::sent(&d.msg.log),
        [Sent::Nak(Some(Duration::from_millis(200)))]
    );
    assert_eq!(s.results("retry"), 1.0);
    assert_eq!(s.metric("normalize_dlq_publish_failures_total", &[]), 1.0);
    assert!(!s.dead_letter_ok());
    // A report that cannot be stored: the stored message is NAKed too, not acked.
    let d = ledger.receive(Fake::new(1, 2));
    let report = Report {
        sections: vec!["sleep"],
        error: "sleep: bad".into(),
    };
    settler.settle(&d, &ORIGIN, None, Action::Ack, Some(report)).await;
    assert_eq!(
        Fake::sent(&d.msg.log),
        [Sent::Nak(Some(Duration::from_millis(100)))]
    );
    assert_eq!(s.results("retry"), 2.0);
    assert_eq!(s.results("success"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_held_last_delivery_gets_progress_acks_until_its_dead_letter_is_stored() {
    let s = Setup::new(&[100, 200]);
    let script = Script::new(&[false, false, false, true]);
    let settler = s.settler(&script, Some(3));
    let d = s.books.ledger(Some(3)).receive(Fake::new(3, 1));
    let action = Action::DeadLetter(Reason::MaxDeliver);
    let failure = schema_failure();
    settler
        .settle(&d, &delivered(ORIGIN, 3), Some(&failure), action, None)
        .await;
    let ms = Duration::from_millis;
    assert_eq!(
        Fake::log(&d.msg.log),
        [
            (ms(0), Sent::Progress),
            (ms(200), Sent::Progress),
            (ms(400), Sent::Progress),
            (ms(600), Sent::Term)
        ]
    );
    assert_eq!(s.metric("normalize_dlq_publish_failures_total", &[]), 3.0);
    assert_eq!(s.results("dlq"), 1.0);
    assert!(s.dead_letter_ok());
    assert_eq!(s.metric("normalize_held_messages_abandoned_total", &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_gives_a_held_message_up_before_the_deadline() {
    let s = Setup::new(&[1000]);
    let script = Script::new(&[false]);
    let settler = s.settler(&script, Some(3));
    let d = s.books.ledger(Some(3)).receive(Fake::new(3, 1));
    // No deadline recorded yet: a whole SHUTDOWN_TIMEOUT_MS (2 s) from the moment the
    // shutdown is seen, which wakes the held message at once.
    let stop = s.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stop.cancel();
    });
    let start = tokio::time::Instant::now();
    let action = Action::DeadLetter(Reason::MaxDeliver);
    settler
        .settle(&d, &delivered(ORIGIN, 3), None, action, None)
        .await;
    let ms = Duration::from_millis;
    assert_eq!(
        Fake::log(&d.msg.log),
        [(ms(0), Sent::Progress), (ms(250), Sent::Progress)]
    );
    // Given up GIVE_UP_MARGIN (1.5 s) before the deadline (250 ms + 2 s).
    assert_eq!(start.elapsed(), ms(750));
    assert_eq!(
        s.metric("normalize_held_messages_abandoned_total", &["stream=\"S\""]),
        1.0
    );
    assert_eq!(s.results("retry"), 1.0);
    assert!(d.is_settled());
    drop(d);
    assert_eq!(s.books.unsettled.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_held_message_counts_down_to_the_recorded_shutdown_deadline() {
    let s = Setup::new(&[1000]);
    let script = Script::new(&[false]);
    let settler = s.settler(&script, Some(3));
    let d = s.books.ledger(Some(3)).receive(Fake::new(3, 1));
    s.shutdown.cancel();
    s.books
        .health
        .set_shutdown_deadline(std::time::Instant::now() + Duration::from_secs(3));
    let start = tokio::time::Instant::now();
    let action = Action::DeadLetter(Reason::MaxDeliver);
    settler
        .settle(&d, &delivered(ORIGIN, 3), None, action, None)
        .await;
    let sent = Fake::log(&d.msg.log);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[1], (Duration::from_secs(1), Sent::Progress));
    // 3 s less the margin, less the real time the test took to get here.
    let took = start.elapsed();
    assert!(
        took <= Duration::from_millis(1500) && took > Duration::from_millis(1400),
        "{took:?}"
    );
    assert_eq!(s.metric("normalize_held_messages_abandoned_total", &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn slow_work_sends_progress_acks_to_unsettled_messages_only() {
    let books = Books::new();
    let ledger = books.ledger(None);
    let msgs = [ledger.receive(Fake::new(1, 1)), ledger.receive(Fake::new(1, 2))];
    let ms = Duration::from_millis;
    let work = async {
        tokio::time::sleep(ms(450)).await;
        ack_all(&msgs[1..]).await;
        tokio::time::sleep(ms(550)).await;
    };
    progress_while(msgs.iter(), ms(900), work).await;
    let p = Sent::Progress;
    assert_eq!(
        Fake::log(&msgs[0].msg.log),
        [(ms(300), p), (ms(600), p), (ms(900), p)]
    );
    assert_eq!(Fake::log(&msgs[1].msg.log), [(ms(300), p), (ms(450), Sent::Ack)]);
    ack_all(&msgs[..1]).await;
    assert_eq!(progress_every(ms(90)), ms(100));
}

#[tokio::test(start_paused = true)]
async fn release_naks_at_once_all_but_last_deliveries() {
    let books = Books::new();
    let ledger = books.ledger(Some(3));
    let msgs: Vec<Delivery<Fake>> = [1, 3, 2]
        .into_iter()
        .map(|n| ledger.receive(Fake::new(n, n as u64)))
        .collect();
    let logs: Vec<Log> = msgs.iter().map(|d| d.msg.log.clone()).collect();
    let last = release(msgs).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].msg.delivered, 3);
    assert_eq!(Fake::sent(&logs[0]), [Sent::Nak(None)]);
    assert!(Fake::sent(&logs[1]).is_empty());
    assert_eq!(Fake::sent(&logs[2]), [Sent::Nak(None)]);
    ack_all(&last).await;
    // Without a server-side limit nothing is a last delivery.
    let d = books.ledger(None).receive(Fake::new(9, 9));
    assert!(!d.is_last_delivery());
    assert!(release(vec![d]).await.is_empty());
    assert_eq!(books.holding(), 0);
}
