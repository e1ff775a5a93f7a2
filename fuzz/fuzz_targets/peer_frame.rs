//! A replication frame on `/internal/replicate`: `PeerFrame` from JSON, a round trip, and every appended op
//! (see `fuzz/src/checks.rs`). Run: `cargo +nightly fuzz run peer_frame` (docs/FUZZING.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replichat_fuzz::peer_frame(data);
});
