//! Replays the kept fuzz inputs (`fuzz/seeds/<target>/`, the hand-written frames; `fuzz/corpus/<target>/`, the
//! minimized corpus; `fuzz/regressions/<target>/`, fixed crashes, when present) through the same checks the `cargo fuzz` targets run, on stable: a regression in frame decoding that the
//! fuzzer once covered fails here, in CI, without nightly. See docs/FUZZING.md.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/checks.rs"]
mod checks;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every input of `target`, sorted by path.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["seeds", "corpus", "regressions"] {
        let dir = fuzz_dir().join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("read a corpus directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` on every input of `target`; fails naming each input that panicked.
fn replay(target: &str, check: fn(&[u8]) -> bool) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target} under {}", fuzz_dir().display());
    let mut decoded = 0;
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("read a corpus file");
        match catch_unwind(AssertUnwindSafe(|| check(&data))) {
            Ok(true) => decoded += 1,
            Ok(false) => {}
            Err(_) => failed.push(path.display().to_string()),
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs failed: {failed:#?}", failed.len(), files.len());
    // The corpus must reach past the JSON parser, or it tests little.
    assert!(decoded > 0, "{target}: none of the {} inputs decodes as a frame", files.len());
    println!("{target}: {} inputs, {decoded} decode as frames", files.len());
}

#[test]
fn client_frame_corpus() {
    replay("client_frame", checks::client_frame);
}

#[test]
fn peer_frame_corpus() {
    replay("peer_frame", checks::peer_frame);
}
