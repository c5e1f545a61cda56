//! Arbitrary bytes as a raw HRV event (`athlete-ally.hrv.raw-received`): no panic, and every
//! accepted event keeps the normalization invariants (see `src/invariants.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use normalize_service::config::ConsumerKind;
use normalize_service_fuzz::invariants::check;

fuzz_target!(|data: &[u8]| {
    let _ = check(ConsumerKind::Hrv, data, None);
});
