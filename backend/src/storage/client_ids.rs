//! Which stored message each (sender, client id) may name: the applier's in-memory stand-in for a unique
//! index on `messages (sender_id, client_id)`.
//!
//! `send` is idempotent per (sender, client id) (docs/PROTOCOL.md, `send`), decided when an entry is applied.
//! A unique index in the database decided it until migration 0006, at the price of one more per-user b-tree
//! page written per stored message: under load every message lands in a different user's page of each
//! per-user index, and the primary's writer spent most of its time writing those pages (BENCHMARKS.md,
//! stop 22 and 23). Here the applier keeps, for every stored message, a 64-bit hash of its (sender, client id)
//! and the message's id; a send whose hash is not in the map is new without a look at the database, and one
//! whose hash is there is decided by reading the few messages it names (a retry, or a hash collision).
//!
//! Exact, not probabilistic: the map holds an entry for every stored message (it may also hold entries of
//! messages that no longer exist, or were rolled back, which the check reads and discards), so a send with no
//! candidate has no original; a candidate only counts if its row has the same sender and client id. The hash
//! is keyed per process, so collisions cannot be aimed at, and the decision does not depend on it: every
//! replica, whatever its key, decides every send the same way as the unique index did.
//!
//! Kept complete by the applier alone: loaded from `messages` inside the first apply transaction that needs
//! it (so from the same state the apply sees), added to for every message an apply inserts before that apply
//! commits, and emptied (unloaded) when a snapshot install replaces the state. Readers
//! ([`Db::message_by_client_id`](super::Db::message_by_client_id)) use it only while it is loaded and fall
//! back to SQL otherwise. Entries of messages that an account deletion removed are dropped after the deletion
//! commits. Cost: 20-36 bytes of memory per stored message (a hash table's slots, doubling as it grows), and
//! one scan of `messages` at the first apply after start-up or after a snapshot install (1,000,000 messages:
//! 2.5 s and about 36 MB here; BENCHMARKS.md, stop 23).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The map's own hasher: its keys are hashes already.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// See the module documentation. `S` hashes (sender, client id); tests give one that collides.
pub(crate) struct ClientIds<S = std::hash::RandomState> {
    hasher: S,
    /// ANDed into every hash: all ones, or zero for tests that make every key collide ([`ClientIds::collide`]).
    mask: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Counts the unloads: a load that began before one is stale when it ends.
    generation: u64,
    loaded: bool,
    /// Hash -> the id of one message with that hash.
    first: HashMap<u64, i64, BuildHasherDefault<Identity>>,
    /// Further messages with a hash already in `first` (collisions; a handful at most in practice).
    more: Vec<(u64, i64)>,
}

impl Default for ClientIds {
    fn default() -> Self {
        ClientIds::with_hasher(std::hash::RandomState::new())
    }
}

impl std::fmt::Debug for ClientIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("ClientIds").field("loaded", &inner.loaded).field("entries", &inner.first.len()).finish()
    }
}

impl<S: BuildHasher> ClientIds<S> {
    pub(crate) fn with_hasher(hasher: S) -> Self {
        ClientIds { hasher, mask: AtomicU64::new(u64::MAX), inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("client id map lock")
    }

    fn key(&self, sender: i64, client_id: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_i64(sender);
        h.write(client_id.as_bytes());
        h.finish() & self.mask.load(Ordering::Relaxed)
    }

    /// For tests: from now on every (sender, client id) has the same hash, so that every stored message is
    /// a candidate of every send and the row check alone decides. Unloads the map (its keys change).
    pub(crate) fn collide(&self) {
        self.mask.store(0, Ordering::Relaxed);
        self.unload();
    }

    /// Whether the map holds every stored message (else it must be loaded, or SQL asked).
    pub(crate) fn is_loaded(&self) -> bool {
        self.lock().loaded
    }

    /// The ids of the messages that may have been stored under (`sender`, `client_id`): a superset of the
    /// one that was, if any. `None` while the map is not loaded.
    pub(crate) fn candidates(&self, sender: i64, client_id: &str) -> Option<Vec<i64>> {
        let key = self.key(sender, client_id);
        let inner = self.lock();
        if !inner.loaded {
            return None;
        }
        let Some(&first) = inner.first.get(&key) else { return Some(Vec::new()) };
        let mut ids = vec![first];
        ids.extend(inner.more.iter().filter(|(k, _)| *k == key).map(|(_, id)| *id));
        Some(ids)
    }

    /// Fill the map with every stored message, replacing what it held: give each to the [`Loader`] (`id`,
    /// sender, client id), then [`Loader::finish`] it.
    pub(crate) fn loader(&self) -> Loader<'_, S> {
        let generation = self.lock().generation;
        Loader { ids: self, inner: Inner { generation, loaded: true, ..Inner::default() } }
    }

    /// Message `id` is stored (or about to be committed) under (`sender`, `client_id`). Ignored while the map
    /// is not loaded: the load will read it.
    pub(crate) fn insert(&self, id: i64, sender: i64, client_id: &str) {
        let key = self.key(sender, client_id);
        let mut inner = self.lock();
        if inner.loaded {
            add(&mut inner, key, id);
        }
    }

    /// Message `id`, stored under (`sender`, `client_id`), was deleted (and the deletion committed).
    pub(crate) fn remove(&self, id: i64, sender: i64, client_id: &str) {
        let key = self.key(sender, client_id);
        let mut inner = self.lock();
        if inner.first.get(&key) == Some(&id) {
            match inner.more.iter().position(|(k, _)| *k == key) {
                Some(at) => {
                    let (_, next) = inner.more.swap_remove(at);
                    inner.first.insert(key, next);
                }
                None => {
                    inner.first.remove(&key);
                }
            }
        } else {
            inner.more.retain(|&(k, i)| (k, i) != (key, id));
        }
    }

    /// Forget everything: the state was replaced (a snapshot install). The next apply loads the map again.
    pub(crate) fn unload(&self) {
        let mut inner = self.lock();
        *inner = Inner { generation: inner.generation + 1, ..Inner::default() };
    }

    /// Entries held (for tests and memory accounting).
    pub(crate) fn len(&self) -> usize {
        let inner = self.lock();
        inner.first.len() + inner.more.len()
    }
}

/// A load of [`ClientIds`] under way.
pub(crate) struct Loader<'a, S> {
    ids: &'a ClientIds<S>,
    inner: Inner,
}

impl<S: BuildHasher> Loader<'_, S> {
    pub(crate) fn add(&mut self, id: i64, sender: i64, client_id: &str) {
        add(&mut self.inner, self.ids.key(sender, client_id), id);
    }

    /// Make the map what was loaded, unless it was unloaded meanwhile (the state was replaced under the load).
    pub(crate) fn finish(self) {
        let mut inner = self.ids.lock();
        if inner.generation == self.inner.generation {
            *inner = self.inner;
        }
    }
}

fn add(inner: &mut Inner, key: u64, id: i64) {
    match inner.first.get(&key) {
        None => {
            inner.first.insert(key, id);
        }
        Some(&held) if held == id => {}
        Some(_) => {
            if !inner.more.contains(&(key, id)) {
                inner.more.push((key, id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hasher under which every (sender, client id) collides.
    #[derive(Default, Clone)]
    struct Constant;
    impl BuildHasher for Constant {
        type Hasher = Fixed;
        fn build_hasher(&self) -> Fixed {
            Fixed
        }
    }
    struct Fixed;
    impl Hasher for Fixed {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    fn load<S: BuildHasher>(ids: &ClientIds<S>, messages: &[(i64, i64, &str)]) {
        let mut loader = ids.loader();
        for &(id, sender, client_id) in messages {
            loader.add(id, sender, client_id);
        }
        loader.finish();
    }

    #[test]
    fn nothing_is_known_before_the_load_and_everything_after_it() {
        let ids = ClientIds::default();
        assert_eq!(ids.candidates(1, "a"), None);
        ids.insert(5, 1, "a"); // before the load: the load reads it from the database instead
        assert_eq!(ids.len(), 0);
        load(&ids, &[(3, 1, "a"), (4, 2, "a"), (6, 1, "b")]);
        assert_eq!(ids.candidates(1, "a"), Some(vec![3]));
        assert_eq!(ids.candidates(2, "a"), Some(vec![4]));
        assert_eq!(ids.candidates(2, "b"), Some(vec![]));
        ids.insert(9, 2, "b");
        assert_eq!(ids.candidates(2, "b"), Some(vec![9]));
        ids.remove(9, 2, "b");
        assert_eq!(ids.candidates(2, "b"), Some(vec![]));
        ids.unload();
        assert_eq!(ids.candidates(1, "a"), None);
        // A load that began before an unload (a snapshot install) does not count.
        let mut loader = ids.loader();
        loader.add(3, 1, "a");
        ids.unload();
        loader.finish();
        assert_eq!(ids.candidates(1, "a"), None);
    }

    #[test]
    fn colliding_hashes_keep_every_candidate() {
        // Under a constant hash every message is a candidate of every send: the caller's row check decides.
        let ids = ClientIds::with_hasher(Constant);
        load(&ids, &[(3, 1, "a"), (4, 2, "b")]);
        ids.insert(8, 1, "c");
        ids.insert(8, 1, "c"); // an apply repeated after a rollback adds nothing twice
        let mut all = ids.candidates(5, "z").unwrap();
        all.sort();
        assert_eq!(all, vec![3, 4, 8]);
        ids.remove(3, 1, "a"); // the first one goes: another takes its place
        let mut all = ids.candidates(1, "a").unwrap();
        all.sort();
        assert_eq!(all, vec![4, 8]);
        ids.remove(8, 1, "c");
        assert_eq!(ids.candidates(1, "a"), Some(vec![4]));
        ids.remove(4, 2, "b");
        assert_eq!(ids.candidates(1, "a"), Some(vec![]));
        assert_eq!(ids.len(), 0);
    }
}
