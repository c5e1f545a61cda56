//! The message a replay publishes: the dead letter's original headers, a deduplicating id, and
//! the event's first origin, which survives any number of dead-letter/replay rounds.

use async_nats::header::HeaderMap;

use crate::dlq::{
    REPLAYED_FROM, REPLAY_ORIGINAL_MSG_ID, REPLAY_ORIGINAL_SEQUENCE, REPLAY_ORIGINAL_STREAM,
    REPLAY_ORIGINAL_TIMESTAMP,
};

/// Headers a replay must not carry: the dead letter's own identity and bookkeeping, and publish
/// expectations that were meant for the first publish.
fn replay_drops(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == "nats-msg-id" || lower.starts_with("dlq-") || lower.starts_with("nats-expected-")
}

/// The message a replay publishes: the original headers, a deduplicating id derived from the
/// dead letter, where it came from, and the event's first origin (`Replay-Original-Msg-Id`,
/// `-Stream`, `-Sequence`, `-Timestamp`), which the consumer uses as the event's identity, position
/// and default time ([`crate::dlq::event_origin`]). Each is the letter's inherited
/// `Replay-Original-*` header when it has one (the letter of a replay inherits the replay's
/// headers), else its `Dlq-Original-*` one, so the first origin survives any number of
/// dead-letter/replay rounds.
pub fn replay_headers(dead: &HeaderMap, dlq_stream: &str, dlq_seq: u64) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in dead.iter() {
        if replay_drops(name.as_ref()) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    let header = |name: &str| {
        dead.get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    // The letter of a replay: its `Dlq-Original-Msg-Id` may be the replay's own id (letters
    // written before dead letters kept the event's identity), never the event's.
    let of_a_replay = dead.get(REPLAYED_FROM).is_some();
    let msg_id = header(REPLAY_ORIGINAL_MSG_ID).or_else(|| {
        if of_a_replay {
            None
        } else {
            header("Dlq-Original-Msg-Id")
        }
    });
    if let Some(id) = msg_id {
        out.insert(REPLAY_ORIGINAL_MSG_ID, id);
    }
    for (replay_name, dlq_name) in [
        (REPLAY_ORIGINAL_STREAM, "Dlq-Original-Stream"),
        (REPLAY_ORIGINAL_SEQUENCE, "Dlq-Original-Sequence"),
        (REPLAY_ORIGINAL_TIMESTAMP, "Dlq-Original-Timestamp"),
    ] {
        if let Some(v) = header(replay_name).or_else(|| header(dlq_name)) {
            out.insert(replay_name, v);
        }
    }
    out.insert("Nats-Msg-Id", format!("replay:{dlq_stream}:{dlq_seq}").as_str());
    out.insert(REPLAYED_FROM, format!("{dlq_stream}:{dlq_seq}").as_str());
    out
}
