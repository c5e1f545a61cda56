//! Support for the fuzz targets: the invariants every decoded event must keep.
//!
//! `invariants.rs` is also compiled into the property tests (`tests/it/properties.rs`), so the
//! fuzzer and proptest check one definition of "a valid normalized event".

pub mod invariants;
