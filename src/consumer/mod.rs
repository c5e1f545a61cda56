//! The pull loop: bind, fetch, hand what arrived to the batch pipeline, which settles each
//! message as [`crate::outcome::decide`] says; never die on a pull error.
//!
//! Only intake listens to the shutdown token: a batch being processed is finished and settled;
//! messages already delivered but not yet started are NAKed so another instance takes them now.
//!
//! - `binding`   the consumer's supervisor: bind, rebind, follow the subjects, drain
//! - `intake`    one binding's loop: pulls (or a `messages()` stream) → sub-batches
//! - `flight`    pipeline room: batches in flight, sub-batches waiting (with progress acks)
//! - `batch`     one batch: decode, write, publish, decide each message's fate
//! - `settle`    the only code that acks, NAKs, TERMs or sends progress acks (dead letters too)
//! - `delivery`  the ledger: each delivered message, settled exactly once or counted
//!
//! Each consumer loop runs in a `consumer` span, each binding's loop in a `binding` span
//! (stream, durable) and each batch in a `batch` span, so log lines need not repeat them.

mod announce;
mod batch;
mod binding;
mod delivery;
mod flight;
mod intake;
mod settle;
mod worker;

pub use worker::{sleep_or_cancel, Shared, Worker};
