//! What every handler and background job shares: the limits, the running process groups (so
//! shutdown can kill them), the named locks, the job table, the shared state and rate limits,
//! and the hard-stop flag; and the two seams tests replace: how commands run ([`Runner`]) and
//! what time it is ([`Clock`]).

use crate::clock::{Clock, SystemClock};
use crate::commands::{self, CommandSpec, Outcome, OutputSink, ProcessGroups};
use crate::config::Limits;
use crate::jobs::Jobs;
use crate::locks::NamedLocks;
use crate::ratelimit::RateLimiter;
use crate::runner::{Processes, Runner};
use crate::state::State;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Carries out commands: real processes, or a recorder in tests and dry runs.
    pub runner: Arc<dyn Runner>,
    /// Set when a stop begins: the watcher and scheduler queue no new calls.
    pub stopping: AtomicBool,
    /// `on_change`/`on_tick` calls queued or running, so a stop waits for them as for requests.
    pub triggers_running: AtomicUsize,
}

impl Runtime {
    /// The server's runtime: state in memory, real processes, real time.
    pub fn new(limits: Limits) -> Arc<Runtime> {
        Runtime::with_state(limits, State::in_memory(limits.state_max_keys))
    }

    /// The server's runtime with the state of `--state-file`.
    pub fn with_state(limits: Limits, state: State) -> Arc<Runtime> {
        Runtime::with_seams(
            limits,
            state,
            Arc::new(Processes),
            Arc::new(SystemClock::new()),
        )
    }

    /// A runtime whose commands and time come from `runner` and `clock` (a test's recorder
    /// and virtual clock; after moving the clock, call `run_due_jobs`).
    pub fn with_seams(
        limits: Limits,
        state: State,
        runner: Arc<dyn Runner>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Runtime> {
        Arc::new(Runtime {
            limits,
            groups: ProcessGroups::default(),
            locks: NamedLocks::default(),
            jobs: Jobs::new(limits.max_jobs, limits.job_output_bytes),
            state,
            limiter: RateLimiter::new(limits.state_max_keys),
            clock,
            abort: AtomicBool::new(false),
            runner,
            stopping: AtomicBool::new(false),
            triggers_running: AtomicUsize::new(0),
        })
    }

    /// The time for jobs, state and rate limits (see [`Clock`]).
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// Whether commands (of handlers or jobs) or trigger calls are still running.
    pub fn busy(&self) -> bool {
        !self.groups.is_empty()
            || self.jobs.alive() > 0
            || self.triggers_running.load(Ordering::SeqCst) > 0
    }

    /// Runs `spec`, first waiting for `lock` if it names one. Waiting counts against the
    /// command's timeout, so a queue behind a stuck holder still ends in time.
    pub fn run_command(
        &self,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome {
        let outcome = self.runner.run(self, spec, lock, sink);
        crate::metrics::metrics().record_command(outcome.success());
        outcome
    }

    /// Real processes' way of running a command (see [`Processes`]).
    pub(crate) fn run_locked(
        &self,
        spec: &CommandSpec,
        lock: Option<&str>,
        sink: OutputSink<'_>,
    ) -> Outcome {
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
