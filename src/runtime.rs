//! What every handler and background job shares: the limits, the running process groups (so
//! shutdown can kill them), the named locks, the job table, the shared state and rate limits,
//! the clock they read, and the hard-stop flag.

use crate::clock::{Clock, SystemClock};
use crate::commands::{self, CommandSpec, Outcome, OutputSink, ProcessGroups};
use crate::config::Limits;
use crate::jobs::Jobs;
use crate::locks::NamedLocks;
use crate::ratelimit::RateLimiter;
use crate::state::State;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

pub struct Runtime {
    pub limits: Limits,
    pub groups: ProcessGroups,
    pub locks: NamedLocks,
    pub jobs: Jobs,
    /// `state_*` and `once`: in memory, or the `--state-file` database.
    pub state: State,
    /// `rate_limit`, bounded like the state.
    pub limiter: RateLimiter,
    /// What debounce, retry backoff, TTLs and rate limits read; a test may put a virtual one.
    pub clock: Arc<dyn Clock>,
    /// Set on a hard stop: every running script ends at its next operation.
    pub abort: AtomicBool,
}

impl Runtime {
    /// A runtime whose state lives in memory.
    pub fn new(limits: Limits) -> Arc<Runtime> {
        Runtime::with_state(limits, State::in_memory(limits.state_max_keys))
    }

    pub fn with_state(limits: Limits, state: State) -> Arc<Runtime> {
        Runtime::with_clock(limits, state, Arc::new(SystemClock::new()))
    }

    /// With a clock of the caller's, e.g. a virtual one that tests move by hand (then call
    /// `run_due_jobs` after moving it).
    pub fn with_clock(limits: Limits, state: State, clock: Arc<dyn Clock>) -> Arc<Runtime> {
        Arc::new(Runtime {
            limits,
            groups: ProcessGroups::default(),
            locks: NamedLocks::default(),
            jobs: Jobs::new(limits.max_jobs, limits.job_output_bytes),
            state,
            limiter: RateLimiter::new(limits.state_max_keys),
            clock,
            abort: AtomicBool::new(false),
        })
    }

    /// The time for jobs, state and rate limits (see [`Clock`]).
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Whether commands (of handlers or jobs) are still running.
    pub fn busy(&self) -> bool {
        !self.groups.is_empty() || self.jobs.alive() > 0
    }

    /// Runs `spec`, first waiting for `lock` if it names one. Waiting counts against the
    /// command's timeout, so a queue behind a stuck holder still ends in time.
    pub fn run_command(
        &self,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome {
        let outcome = self.run_locked(spec, lock, sink);
        crate::metrics::metrics().record_command(outcome.success());
        outcome
    }

    fn run_locked(&self, spec: &CommandSpec, lock: Option<&str>, sink: OutputSink<'_>) -> Outcome {
        let Some(name) = lock else {
            return commands::run(spec, sink, &self.groups);
        };
        let asked = Instant::now();
        let Some(_held) = self.locks.acquire(name, asked + spec.timeout) else {
            return Outcome::lock_timed_out(name, asked.elapsed());
        };
        let spec = CommandSpec {
            timeout: spec.timeout.saturating_sub(asked.elapsed()),
            ..spec.clone()
        };
        commands::run(&spec, sink, &self.groups)
    }
}
