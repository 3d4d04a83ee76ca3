//! Backing off a client IP that keeps presenting wrong tokens (`--auth-failures`): after N
//! failures within a minute, the IP's requests are refused for the next minute without their
//! token even being checked. Lives on the event loop, so it needs no lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The window in which failures are counted, and the length of a block.
const WINDOW: Duration = Duration::from_secs(60);
/// IPs tracked at once; beyond it expired entries are dropped, and new IPs go untracked
/// rather than letting an attacker with many addresses grow our memory.
const MAX_TRACKED: usize = 65_536;

pub struct AuthBackoff {
    /// Failures that trigger a block; 0 turns backoff off.
    limit: u32,
    clients: HashMap<IpAddr, Failures>,
}

struct Failures {
    count: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
}

impl AuthBackoff {
    pub fn new(limit: u32) -> AuthBackoff {
        AuthBackoff {
            limit,
            clients: HashMap::new(),
        }
    }

    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.clients
            .get(&ip)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a wrong token; returns true when this failure starts a block.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        if self.clients.len() >= MAX_TRACKED && !self.clients.contains_key(&ip) {
            self.forget_expired(now);
            if self.clients.len() >= MAX_TRACKED {
                return false;
            }
        }
        let failures = self.clients.entry(ip).or_insert(Failures {
            count: 0,
            window_start: now,
            blocked_until: None,
        });
        if now.duration_since(failures.window_start) > WINDOW {
            *failures = Failures {
                count: 0,
                window_start: now,
                blocked_until: None,
            };
        }
        failures.count += 1;
        if failures.count >= self.limit && failures.blocked_until.is_none_or(|until| until <= now) {
            failures.blocked_until = Some(now + WINDOW);
            return true;
        }
        false
    }

    fn forget_expired(&mut self, now: Instant) {
        self.clients.retain(|_, f| {
            now.duration_since(f.window_start) <= WINDOW
                || f.blocked_until.is_some_and(|until| now < until)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_limit_within_window_and_releases_after() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let start = Instant::now();
        let mut backoff = AuthBackoff::new(3);
        assert!(!backoff.record_failure(ip, start));
        assert!(!backoff.record_failure(ip, start));
        assert!(backoff.record_failure(ip, start));
        assert!(backoff.is_blocked(ip, start + Duration::from_secs(59)));
        assert!(!backoff.is_blocked(other, start));
        assert!(!backoff.is_blocked(ip, start + Duration::from_secs(61)));
    }

    #[test]
    fn zero_turns_it_off() {
        let ip: IpAddr = "::1".parse().unwrap();
        let mut backoff = AuthBackoff::new(0);
        (0..100).for_each(|_| {
            backoff.record_failure(ip, Instant::now());
        });
        assert!(!backoff.is_blocked(ip, Instant::now()));
    }
}
