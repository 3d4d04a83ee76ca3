//! The one place the job engine and the state store read the time, so that debounce, retry
//! backoff, TTLs and rate limits can run on a virtual clock in tests.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time as the job engine and the state store see it.
pub trait Clock: Send + Sync {
    /// Time since the Unix epoch. Never goes backwards within one process, so a debounce or a
    /// backoff is not stretched or cut by a wall-clock step; anchored to the wall clock, so a
    /// TTL kept in `--state-file` still means the same moment after a restart.
    fn now(&self) -> Duration;
}

/// The real clock: the wall clock read once at start, advanced by the monotonic clock.
pub struct SystemClock {
    wall_at_start: Duration,
    start: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            wall_at_start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
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
