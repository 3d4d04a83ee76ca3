//! `rate_limit(key, n, per)` (SPEC §12): a GCRA ("generic cell rate algorithm") per key, in
//! memory, one number per key and no thread.
//!
//! How it works, in ten lines:
//! - Each key keeps one time, its TAT ("theoretical arrival time"): when the key would be idle
//!   again if every allowed call had used up `per / n` of time.
//! - A call at `now` computes `next = max(tat, now) + per / n`.
//! - If `next <= now + per`, fewer than `n` calls' worth of time is in use: allow, `tat = next`.
//! - Otherwise refuse, and leave `tat` as it was (refused calls cost nothing).
//! - So a quiet key allows a burst of `n` calls at once, then one more each `per / n`; after a
//!   quiet `per` it allows `n` again. It never allows more than `n` in any window `per` long
//!   *on average*; unlike a log of timestamps, it may allow the `n+1`-th call `per / n` after a
//!   burst instead of `per` after it, in exchange for O(1) memory per key.
//! - A key whose TAT is in the past is exactly like a key never seen, so it can be dropped:
//!   that is the sweep, and it keeps the table bounded by the keys active within their `per`.
//!
//! `n` and `per` come with each call (not one quota per limiter, as in `governor`'s keyed
//! limiter): a key's TAT is interpreted with the `n`/`per` of the call that reads it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub struct RateLimiter {
    /// Per key, its TAT as time since the epoch.
    tats: Mutex<HashMap<String, Duration>>,
    /// Most keys tracked at once; beyond it (after a sweep) a call with a new key is refused.
    max_keys: usize,
}

impl RateLimiter {
    pub fn new(max_keys: usize) -> RateLimiter {
        RateLimiter {
            tats: Mutex::new(HashMap::new()),
            max_keys,
        }
    }

    fn tats(&self) -> MutexGuard<'_, HashMap<String, Duration>> {
        self.tats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call with `key` is allowed now, at most `n` per `per`; records it if so.
    /// A full table refuses new keys: a limiter fails closed.
    pub fn check(&self, key: &str, n: u32, per: Duration, now: Duration) -> bool {
        if n == 0 {
            return false;
        }
        let interval = per / n;
        let mut tats = self.tats();
        let tat = tats.get(key).copied().unwrap_or(now).max(now);
        let next = tat.saturating_add(interval);
        if next > now.saturating_add(per) {
            return false;
        }
        if !tats.contains_key(key) && tats.len() >= self.max_keys {
            tats.retain(|_, tat| *tat > now);
            if tats.len() >= self.max_keys {
                return false;
            }
        }
        tats.insert(key.to_owned(), next);
        true
    }

    /// Forgets the keys that are idle again; how many.
    pub fn sweep(&self, now: Duration) -> usize {
        let mut tats = self.tats();
        let before = tats.len();
        tats.retain(|_, tat| *tat > now);
        before - tats.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_of_n_then_refusals_until_time_passes() {
        let limiter = RateLimiter::new(10);
        let t0 = Duration::from_secs(100);
        let allowed = (0..5).filter(|_| limiter.check("k", 3, S, t0)).count();
        assert_eq!(allowed, 3);
        assert!(limiter.check("other", 3, S, t0), "keys are independent");
        assert!(!limiter.check("k", 3, S, t0 + S / 10));
        assert!(limiter.check("k", 3, S, t0 + S / 3), "one more each per/n");
        let quiet = t0 + 3 * S;
        assert_eq!(
            (0..5).filter(|_| limiter.check("k", 3, S, quiet)).count(),
            3
        );
    }

    #[test]
    fn the_table_is_bounded_and_idle_keys_are_swept() {
        let limiter = RateLimiter::new(2);
        let t0 = Duration::from_secs(100);
        assert!(limiter.check("a", 1, S, t0));
        assert!(limiter.check("b", 1, S, t0));
        assert!(!limiter.check("c", 1, S, t0), "full: fail closed");
        assert!(limiter.check("c", 1, S, t0 + 2 * S), "idle keys make room");
        assert_eq!(limiter.sweep(t0 + 5 * S), 1);
    }
}
