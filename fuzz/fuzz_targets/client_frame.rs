//! A client text frame on `/ws`: `replichat::ws::decode`, a round trip, and the server's input checks
//! (see `fuzz/src/checks.rs`). Run: `cargo +nightly fuzz run client_frame` (docs/FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replichat_fuzz::client_frame(data);
});
