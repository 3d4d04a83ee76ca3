//! The time that time-based features (debounce, TTLs, rate limits) read: the real clock in the
//! server, a virtual one in `command-trigger test` that only `advance("5s")` moves. Handler
//! and command deadlines stay on the real clock: they protect the machine, not the logic.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    /// Monotonic now, for waits and expiries.
    fn now(&self) -> Instant;
    /// Wall-clock now, for what is shown or stored (`at`, expiry stamps in a state file).
    fn system_now(&self) -> SystemTime;
}

/// The machine's clocks.
pub struct RealClock;

impl Clock for RealClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until [`VirtualClock::advance`] moves it, so a test of a 5 s
/// debounce or a 24 h TTL takes no time and always gives the same answer.
pub struct VirtualClock {
    /// The real instants at creation; virtual time is these plus `offset`.
    origin: (Instant, SystemTime),
    offset: Mutex<Duration>,
}

impl VirtualClock {
    pub fn new() -> VirtualClock {
        VirtualClock {
            origin: (Instant::now(), SystemTime::now()),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves virtual time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(|p| p.into_inner());
        *offset = offset.saturating_add(by);
    }
}

impl Default for VirtualClock {
    fn default() -> Self {
        VirtualClock::new()
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        let (instant, _) = self.origin;
        instant.checked_add(self.offset()).unwrap_or(instant)
    }

    fn system_now(&self) -> SystemTime {
        let (_, system) = self.origin;
        system.checked_add(self.offset()).unwrap_or(system)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_time_moves_only_when_advanced() {
        let clock = VirtualClock::new();
        let before = clock.now();
        assert_eq!(clock.now(), before);
        clock.advance(Duration::from_secs(5));
        assert_eq!(clock.now() - before, Duration::from_secs(5));
    }
}
