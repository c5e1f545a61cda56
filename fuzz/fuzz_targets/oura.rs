//! Arbitrary bytes as an Oura webhook (`vendor.oura.webhook.received`), with and without a
//! `Nats-Msg-Id`: no panic, and every accepted webhook keeps the invariants (stored body equals
//! the input, idempotency key, derived HRV and sleep records; see `src/invariants.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use normalize_service::config::ConsumerKind;
use normalize_service_fuzz::invariants::check;

fuzz_target!(|data: &[u8]| {
    let _ = check(ConsumerKind::Oura, data, None);
    let _ = check(ConsumerKind::Oura, data, Some(" fuzz-msg-id "));
});
