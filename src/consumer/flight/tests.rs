//! Pipeline room on paused time: batches that take a second, messages that record their acks.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::super::settle::tests::{Books, Fake, Log, Sent};
use super::super::settle::{self, AckTarget};
use super::*;

const BATCH_TIME: Duration = Duration::from_secs(1);

/// Batches started: when, and the sequences of their messages.
type Started = Arc<Mutex<Vec<(Duration, Vec<u64>)>>>;

/// A flight whose batches each take [`BATCH_TIME`], then ack their messages.
fn flight(
    books: &Books,
    server_max_deliver: Option<i64>,
    depth: usize,
    batch_size: usize,
) -> (Flight<Fake>, Started) {
    let started = Started::default();
    let record = started.clone();
    let epoch = tokio::time::Instant::now();
    let start: Start<Fake> = Box::new(move |msgs, _db_down| {
        let seqs = msgs.iter().filter_map(|d| d.msg.stream_sequence()).collect();
        record.lock().unwrap().push((epoch.elapsed(), seqs));
        async move {
            tokio::time::sleep(BATCH_TIME).await;
            settle::ack_all(&msgs).await;
        }
        .boxed()
    });
    let ack_wait = Duration::from_millis(900);
    let f = Flight::new(
        depth,
        batch_size,
        ack_wait,
        books.ledger(server_max_deliver),
        start,
    );
    (f, started)
}

fn receive(f: &Flight<Fake>, delivered: i64, seq: u64) -> (Vec<Delivery<Fake>>, Log) {
    let d = f.ledger.receive(Fake::new(delivered, seq));
    let log = d.msg.log.clone();
    (vec![d], log)
}

fn started(s: &Started) -> Vec<(Duration, Vec<u64>)> {
    s.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn a_full_pipeline_keeps_sub_batches_waiting_and_starts_them_as_batches_finish() {
    let books = Books::new();
    let (mut f, s) = flight(&books, None, 2, 3);
    let pull = Arc::new(AtomicBool::new(false));
    let other_pull = Arc::new(AtomicBool::new(false));
    for seq in 1..=4 {
        f.hold(receive(&f, 1, seq).0, &pull);
    }
    // A sub-batch of another pull is never joined to this pull's.
    f.hold(receive(&f, 1, 5).0, &other_pull);
    assert!(f.full());
    assert_eq!(f.waiting_len(), 3);
    let token = CancellationToken::new();
    let done = f
        .serve(tokio::time::sleep(Duration::from_millis(2500)), &token)
        .await;
    assert_eq!(done, Some(()));
    let s0 = Duration::ZERO;
    assert_eq!(
        started(&s),
        [
            (s0, vec![1]),
            (s0, vec![2]),
            (BATCH_TIME, vec![3, 4]),
            (BATCH_TIME, vec![5])
        ]
    );
    assert!(!f.has_waiting());
    f.batches.drain().await;
    assert_eq!(books.holding(), 0);
    assert_eq!(books.unsettled.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_messages_get_progress_acks_until_their_batch_starts() {
    let books = Books::new();
    let (mut f, s) = flight(&books, None, 1, 10);
    let pull = Arc::new(AtomicBool::new(false));
    let (first, first_log) = receive(&f, 1, 1);
    let (second, second_log) = receive(&f, 1, 2);
    f.hold(first, &pull);
    f.hold(second, &pull);
    assert_eq!(f.waiting_len(), 1);
    let token = CancellationToken::new();
    f.serve(tokio::time::sleep(Duration::from_millis(2500)), &token)
        .await;
    let ms = Duration::from_millis;
    let p = Sent::Progress;
    // Every ack_wait / 3 while it waits; its own batch acks it a second after it starts.
    assert_eq!(
        Fake::log(&second_log),
        [(ms(300), p), (ms(600), p), (ms(900), p), (ms(2000), Sent::Ack)]
    );
    assert_eq!(Fake::log(&first_log), [(ms(1000), Sent::Ack)]);
    assert_eq!(started(&s), [(ms(0), vec![1]), (ms(1000), vec![2])]);
}

#[tokio::test(start_paused = true)]
async fn serving_ends_at_once_when_the_token_is_cancelled() {
    let books = Books::new();
    let (mut f, _) = flight(&books, None, 1, 10);
    let token = CancellationToken::new();
    token.cancel();
    assert_eq!(f.serve(std::future::pending::<()>(), &token).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_stopping_loop_releases_what_waits_but_processes_last_deliveries() {
    let books = Books::new();
    let (mut f, s) = flight(&books, Some(3), 1, 10);
    let pull = Arc::new(AtomicBool::new(false));
    let (running, _) = receive(&f, 1, 1);
    f.hold(running, &pull);
    let (waiting, waiting_log) = receive(&f, 1, 2);
    f.hold(waiting, &pull);
    let (last, last_log) = receive(&f, 3, 3);
    f.hold(last, &pull);
    f.release_waiting().await;
    // The last delivery starts whatever the pipeline depth; the other is NAKed at once.
    assert_eq!(Fake::sent(&waiting_log), [Sent::Nak(None)]);
    assert_eq!(
        started(&s),
        [(Duration::ZERO, vec![1]), (Duration::ZERO, vec![3])]
    );
    f.batches.drain().await;
    assert_eq!(Fake::sent(&last_log), [Sent::Ack]);
    assert_eq!(books.holding(), 0);
    assert_eq!(books.unsettled.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn what_a_pull_still_buffers_is_processed_or_released() {
    let books = Books::new();
    let (mut f, s) = flight(&books, Some(3), 1, 10);
    let pull = Arc::new(AtomicBool::new(false));
    let buffered = |seqs: &[u64]| {
        let items: Vec<Result<Fake, ()>> = seqs
            .iter()
            .flat_map(|&n| [Ok(Fake::new(if n == 9 { 3 } else { 1 }, n)), Err(())])
            .collect();
        futures::stream::iter(items)
    };
    // A pull that ended: what it buffers is held like the rest (errors skipped).
    f.take_buffered(&mut buffered(&[1, 2]), &pull);
    assert_eq!(started(&s), [(Duration::ZERO, vec![1, 2])]);
    // A pull at shutdown: released, except the last delivery (seq 9), processed now.
    let mut at_shutdown = buffered(&[4, 9]);
    f.release_source(&mut at_shutdown).await;
    assert_eq!(started(&s).len(), 2);
    assert_eq!(started(&s)[1].1, vec![9]);
    f.batches.drain().await;
    assert_eq!(books.holding(), 0);
    assert_eq!(books.unsettled.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_depth_of_0_is_1() {
    let mut batches = InFlight::new(0);
    assert_eq!(batches.free(), 1);
    batches.spawn(std::future::pending());
    assert_eq!(batches.free(), 0);
}
