//! Password hashing: argon2id with the crate's default parameters (19 MiB, 2 passes), at most one hash per
//! core at a time per server ([`Hashing`]), each in a memory buffer that is reused rather than allocated per hash.
//!
//! Why both: every hash fills 19 MiB. Run without a bound on the blocking pool, a burst of registrations
//! or logins costs 19 MiB each at once; and allocated per hash, the freed buffers fragment the allocator's
//! arenas (small allocations land in them), so the memory is never returned. `bench load` measured a
//! replica at 3 GB RSS after 200 registrations 16 at a time before this module; see BENCHMARKS.md.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, Output, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::Semaphore;

use crate::{Error, Result};

/// The queue of password checks of one server: at most one hash per core running, [`QUEUE_PER_CORE`] per core
/// waiting, the rest refused at once with `rate_limited`. A `replichat serve` process is one server, so this is
/// the machine's bound; a process that runs several servers (the test suites) gives each its own queue, so one
/// server's flood of wrong passwords never refuses another's sign-ups.
#[derive(Debug)]
pub struct Hashing {
    cores: Semaphore,
    /// Hashes waiting or running, at most `bound`.
    queued: AtomicUsize,
    bound: usize,
}

impl Default for Hashing {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hashing { cores: Semaphore::new(cores), queued: AtomicUsize::new(0), bound: cores * (QUEUE_PER_CORE + 1) }
    }
}

impl Hashing {
    /// Hash `password` with a fresh random salt; the PHC string that is stored.
    pub async fn hash(&self, password: &str) -> Result<String> {
        let password = password.to_owned();
        self.run(move || hash_now(password.as_bytes())).await
    }

    /// Whether `password` matches the stored PHC string `phc` (compared in constant time).
    pub async fn verify(&self, password: &str, phc: &str) -> Result<bool> {
        let (password, phc) = (password.to_owned(), phc.to_owned());
        self.run(move || verify_now(password.as_bytes(), &phc)).await
    }

    /// Run `f` on the blocking pool once one of the per-core permits is free; `rate_limited` when the queue of
    /// waiting hashes is full.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        // Counts the hashes waiting or running; released when this call ends, however it ends.
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.bound {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::RateLimited { what: "password checks at once", retry_after: Duration::from_secs(1) });
        }
        let _queued = Queued(&self.queued);
        let _permit = self.cores.acquire().await.map_err(|e| Error::Hash(e.to_string()))?;
        tokio::task::spawn_blocking(f).await.map_err(|e| Error::Hash(e.to_string()))?
    }
}

/// Hash on the calling thread (for the one-off dummy hash; everything else goes through [`Hashing`]).
pub fn hash_now(password: &[u8]) -> Result<String> {
    let argon = Argon2::default();
    let salt = SaltString::generate(&mut OsRng);
    let params = argon.params().clone();
    let output = derive(&argon, password, salt.as_salt(), params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params).try_into().map_err(hash_error)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

fn verify_now(password: &[u8], phc: &str) -> Result<bool> {
    let parsed = PasswordHash::new(phc).map_err(hash_error)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(hash_error)?;
    let version = parsed.version.map(Version::try_from).transpose().map_err(hash_error)?.unwrap_or_default();
    let params = Params::try_from(&parsed).map_err(hash_error)?;
    let expected = parsed.hash.ok_or_else(|| Error::Hash("stored hash has no output".into()))?;
    let salt = parsed.salt.ok_or_else(|| Error::Hash("stored hash has no salt".into()))?;
    let computed = derive(&Argon2::new(algorithm, version, params), password, salt, expected.len())?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected)
}

/// The `len`-byte argon2 output for `password` and `salt` (base64, as stored), in a pooled buffer.
fn derive(argon: &Argon2, password: &[u8], salt: Salt, len: usize) -> Result<Output> {
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(hash_error)?;
    Output::init_with(len, |out| {
        with_memory(argon.params().block_count(), |memory| {
            argon.hash_password_into_with_memory(password, salt_bytes, out, memory)
        })
        .map_err(Into::into)
    })
    .map_err(hash_error)
}

/// Hashes allowed to wait for a core, per core, beyond those running. At about 50 ms a hash in a release
/// build, a full queue is under a second of work: a flood of wrong passwords is answered `rate_limited` at
/// once instead of making a real login wait behind it.
pub const QUEUE_PER_CORE: usize = 8;

/// Lend `f` a zeroed-on-first-use buffer of `blocks` argon2 blocks from the pool (argon2 overwrites every
/// block it uses before reading it, so a reused buffer needs no clearing).
fn with_memory<T>(blocks: usize, f: impl FnOnce(&mut [Block]) -> T) -> T {
    // A std mutex: held only to pop and push, never across the hash.
    static POOL: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());
    let mut memory = POOL.lock().expect("argon2 pool lock").pop().unwrap_or_default();
    memory.resize(blocks, Block::default());
    let result = f(&mut memory);
    POOL.lock().expect("argon2 pool lock").push(memory);
    result
}

fn hash_error(e: impl std::fmt::Display) -> Error {
    Error::Hash(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;

    #[test]
    fn hashes_verify_here_and_with_the_argon2_crate() {
        let phc = hash_now(b"correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_now(b"correct horse", &phc).unwrap());
        assert!(!verify_now(b"wrong horse", &phc).unwrap());
        // The stored format is the crate's own: hashes made before this module still verify, and back.
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = argon2::PasswordHasher::hash_password(&Argon2::default(), b"pw 12345", &salt).unwrap().to_string();
        assert!(verify_now(b"pw 12345", &theirs).unwrap());
        assert!(!verify_now(b"pw 12346", &theirs).unwrap());
    }
}
