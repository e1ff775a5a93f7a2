//! Warnings that anyone on the network can cause over and over, logged once per interval.
//!
//! A refused internal connection is logged as a warning, because an operator needs to see an impostor or a
//! misconfigured replica. But the dialler chooses how often to be refused: a replica of another format or
//! secret redials every 100 ms, and anyone who reaches `/internal/replicate` can open connections as fast as
//! the network allows, each of which was a line in the log (an impostor's flood of hellos filled the disk at
//! the rate it sent them). [`RepeatLog`] lets the first warning of each kind through, then at most one per
//! [`INTERVAL`], which says how many it stood for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per kind of warning in this interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Kinds remembered at most; past that the memory starts again (each kind then logs once more).
const KINDS: usize = 64;

/// See the module documentation. Keyed by the kind of warning, a small fixed set of texts: never by
/// anything the dialler sends, so that the map stays small.
#[derive(Debug, Default)]
pub struct RepeatLog {
    kinds: Mutex<HashMap<String, Kind>>,
}

#[derive(Debug)]
struct Kind {
    /// When a line of this kind was last let through.
    logged: Instant,
    /// Occurrences since then that were not.
    held: u64,
}

impl RepeatLog {
    /// Whether to log an occurrence of `kind` at `now`: `Some(n)` with the number of occurrences of the same
    /// kind not logged since the last line (0 for the first), or `None` to stay quiet.
    pub fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().expect("repeat log lock");
        if let Some(seen) = kinds.get_mut(kind) {
            if now.saturating_duration_since(seen.logged) < INTERVAL {
                seen.held += 1;
                return None;
            }
            let held = seen.held;
            *seen = Kind { logged: now, held: 0 };
            return Some(held);
        }
        if kinds.len() >= KINDS {
            kinds.clear();
        }
        kinds.insert(kind.to_owned(), Kind { logged: now, held: 0 });
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_a_kind_is_logged_then_one_per_interval_with_the_count() {
        let log = RepeatLog::default();
        let start = Instant::now();
        assert_eq!(log.admit("wrong proof", start), Some(0));
        for i in 1..=99 {
            assert_eq!(log.admit("wrong proof", start + Duration::from_millis(i * 100 % 9_000)), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(log.admit("bad nonce", start), Some(0));
        // After the interval: one line, for the 99 held back.
        assert_eq!(log.admit("wrong proof", start + INTERVAL), Some(99));
        assert_eq!(log.admit("wrong proof", start + INTERVAL + Duration::from_millis(1)), None);
        assert_eq!(log.admit("wrong proof", start + INTERVAL * 3), Some(1));
    }

    #[test]
    fn the_memory_of_kinds_stays_bounded() {
        let log = RepeatLog::default();
        let now = Instant::now();
        for i in 0..(KINDS * 3) {
            assert_eq!(log.admit(&format!("kind {i}"), now), Some(0));
        }
        assert!(log.kinds.lock().unwrap().len() <= KINDS);
    }
}
