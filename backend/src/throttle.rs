//! Limits that slow attackers without locking owners out: growing delays after failed password checks
//! (`login`, `delete_account`), per client address, per address and account, and per account; and a token
//! bucket on each account's sends.
//!
//! The per-address counters live in the primary's memory. The per-account counter is part of the replicated
//! state (a `login_failed` entry per failure, see `storage`), so a failover does not reset it; this module
//! only computes the delay it implies. A delay is never served by holding the socket: the request is answered
//! `rate_limited` at once with the time to wait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed password checks that cost nothing, per key, before delays start.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failures allowed before the first delay.
    pub free: u32,
    /// The first delay; each further failure doubles it.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

/// Failures from one address, whatever the account: stops spraying one password over many names.
pub const PER_ADDRESS: Policy = Policy { free: 10, first: Duration::from_secs(1), max: Duration::from_secs(300) };
/// Failures from one address on one account: stops guessing one account from one place.
pub const PER_ADDRESS_ACCOUNT: Policy =
    Policy { free: 5, first: Duration::from_secs(1), max: Duration::from_secs(900) };
/// Failures on one account from anywhere (replicated): stops guessing one account from many places. Capped
/// low, and not applied to addresses the account recently logged in from, so an attacker can at worst make
/// the owner on a new device wait a minute between tries.
pub const PER_ACCOUNT: Policy = Policy { free: 5, first: Duration::from_secs(1), max: Duration::from_secs(60) };
/// Failures older than this are forgotten (the counter starts again).
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// How long an address stays trusted for an account after a successful login or registration from it.
pub const TRUST_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

impl Policy {
    /// The delay after `failures` consecutive failures: zero until `free` is used up, then doubling.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures < self.free {
            return Duration::ZERO;
        }
        let doublings = (failures - self.free).min(30);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

#[derive(Debug, Clone, Copy)]
struct Count {
    failures: u32,
    last: Instant,
}

/// The in-memory part: counters per address and per (address, account), and the addresses each account
/// recently logged in from. A std mutex: never held across an `.await`.
#[derive(Debug, Default)]
pub struct Throttle {
    addresses: Mutex<HashMap<IpAddr, Count>>,
    pairs: Mutex<HashMap<(IpAddr, String), Count>>,
    trusted: Mutex<HashMap<(IpAddr, String), Instant>>,
}

impl Throttle {
    /// How long `address` must wait before trying a password for `account` (its name key), or `None`.
    pub fn wait(&self, address: IpAddr, account: &str) -> Option<Duration> {
        let now = Instant::now();
        let by_address = remaining(self.addresses.lock().expect("throttle lock").get(&address), PER_ADDRESS, now);
        let key = (address, account.to_owned());
        let by_pair = remaining(self.pairs.lock().expect("throttle lock").get(&key), PER_ADDRESS_ACCOUNT, now);
        by_address.max(by_pair).filter(|d| !d.is_zero())
    }

    /// Whether `address` logged in to `account` recently (it is exempt from the per-account delay).
    pub fn trusted(&self, address: IpAddr, account: &str) -> bool {
        let trusted = self.trusted.lock().expect("throttle lock");
        trusted.get(&(address, account.to_owned())).is_some_and(|t| t.elapsed() < TRUST_FOR)
    }

    /// A wrong password from `address` for `account`.
    pub fn failed(&self, address: IpAddr, account: &str) {
        let now = Instant::now();
        bump(&mut self.addresses.lock().expect("throttle lock"), address, now);
        bump(&mut self.pairs.lock().expect("throttle lock"), (address, account.to_owned()), now);
    }

    /// A right password from `address` for `account`: the pair's counter is cleared and the address trusted.
    /// The address's own counter is not: one account of the attacker's must not wash its spraying clean.
    pub fn succeeded(&self, address: IpAddr, account: &str) {
        let key = (address, account.to_owned());
        self.pairs.lock().expect("throttle lock").remove(&key);
        let mut trusted = self.trusted.lock().expect("throttle lock");
        trusted.retain(|_, t| t.elapsed() < TRUST_FOR);
        trusted.insert(key, Instant::now());
    }
}

/// Time left before the next try is allowed under `policy`.
fn remaining(count: Option<&Count>, policy: Policy, now: Instant) -> Option<Duration> {
    let count = count?;
    if now.duration_since(count.last) > FORGET_AFTER {
        return None;
    }
    (count.last + policy.delay(count.failures)).checked_duration_since(now)
}

fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Count>, key: K, now: Instant) {
    // Forget stale counters so the map stays as small as the recent attack.
    if map.len() > 10_000 {
        map.retain(|_, c| now.duration_since(c.last) <= FORGET_AFTER);
    }
    let count = map.entry(key).or_insert(Count { failures: 0, last: now });
    if now.duration_since(count.last) > FORGET_AFTER {
        count.failures = 0;
    }
    count.failures += 1;
    count.last = now;
}

/// The per-account delay from the replicated counter: `failures` consecutive failures, the last at
/// `last_ms` (milliseconds since the epoch), as of `now_ms`. `None` when a try is allowed now.
pub fn account_wait(failures: u32, last_ms: i64, now_ms: i64) -> Option<Duration> {
    let since = Duration::from_millis(now_ms.saturating_sub(last_ms).max(0) as u64);
    if since > FORGET_AFTER {
        return None;
    }
    PER_ACCOUNT.delay(failures).checked_sub(since).filter(|d| !d.is_zero())
}

/// A token bucket per account for sends: `rate` per second on average, bursts of up to `burst`.
#[derive(Debug)]
pub struct SendRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

impl SendRate {
    /// `rate` sends per second, bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> SendRate {
        SendRate { rate: rate.max(0.001), burst: f64::from(burst.max(1)), buckets: Mutex::default() }
    }

    /// Take one token for `user_id`, or say how long until one is there.
    pub fn take(&self, user_id: i64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("send rate lock");
        if buckets.len() > 100_000 {
            let full = self.burst / self.rate;
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() < full);
        }
        let (tokens, at) = buckets.entry(user_id).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_nothing_to_a_cap() {
        assert_eq!(PER_ACCOUNT.delay(4), Duration::ZERO);
        assert_eq!(PER_ACCOUNT.delay(5), Duration::from_secs(1));
        assert_eq!(PER_ACCOUNT.delay(6), Duration::from_secs(2));
        assert_eq!(PER_ACCOUNT.delay(100), Duration::from_secs(60));
        assert_eq!(account_wait(6, 1_000, 1_500), Some(Duration::from_millis(1_500)));
        assert_eq!(account_wait(6, 1_000, 4_000), None);
        assert_eq!(account_wait(100, 0, 16 * 60 * 1000), None, "forgotten after 15 minutes");
    }

    #[test]
    fn the_address_counter_outlives_a_success_but_the_pair_does_not() {
        let throttle = Throttle::default();
        let address: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..PER_ADDRESS_ACCOUNT.free {
            assert_eq!(throttle.wait(address, "alice"), None);
            throttle.failed(address, "alice");
        }
        assert!(throttle.wait(address, "alice").is_some());
        assert_eq!(throttle.wait(address, "bob"), None, "other accounts are not blocked yet");
        throttle.succeeded(address, "alice");
        assert_eq!(throttle.wait(address, "alice"), None);
        assert!(throttle.trusted(address, "alice"));
        for _ in 0..PER_ADDRESS.free - PER_ADDRESS_ACCOUNT.free {
            throttle.failed(address, "carol");
        }
        assert!(throttle.wait(address, "dave").is_some(), "spraying blocks the address");
    }

    #[test]
    fn sends_refill_at_the_rate() {
        let rate = SendRate::new(1000.0, 3);
        assert!((0..3).all(|_| rate.take(1).is_ok()));
        let wait = rate.take(1).expect_err("the burst is spent");
        assert!(wait <= Duration::from_millis(1));
        assert!(rate.take(2).is_ok(), "per account");
    }
}
