//! The one place the job engine, the state store and rate limits read the time, so that
//! debounce, retry backoff, TTLs and rate limits run on a virtual clock in `command-trigger
//! test`, which only `advance("5s")` moves. Handler and command deadlines stay on the real
//! clock: they protect the machine, not the logic.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time as the job engine and the state store see it.
pub trait Clock: Send + Sync {
    /// Time since the Unix epoch. Never goes backwards within one process, so a debounce or a
    /// backoff is not stretched or cut by a wall-clock step; anchored to the wall clock, so a
    /// TTL kept in `--state-file` still means the same moment after a restart.
    fn now(&self) -> Duration;
}

fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The real clock: the wall clock read once at start, advanced by the monotonic clock.
pub struct SystemClock {
    wall_at_start: Duration,
    start: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            wall_at_start: wall_now(),
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.wall_at_start + self.start.elapsed()
    }
}

/// A clock that stands still until [`VirtualClock::advance`] moves it, so a test of a 5 s
/// debounce or a 24 h TTL takes no time and always gives the same answer.
pub struct VirtualClock {
    /// The wall clock at creation; virtual time is this plus what `advance` added.
    origin: Duration,
    offset: Mutex<Duration>,
}

impl VirtualClock {
    pub fn new() -> VirtualClock {
        VirtualClock {
            origin: wall_now(),
            offset: Mutex::new(Duration::ZERO),
        }
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
    fn now(&self) -> Duration {
        let offset = *self.offset.lock().unwrap_or_else(|p| p.into_inner());
        self.origin.saturating_add(offset)
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
