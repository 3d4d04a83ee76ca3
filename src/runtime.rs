//! What every handler and background job shares: the limits, the running process groups (so
//! shutdown can kill them), the named locks, the job table, and the hard-stop flag; and the
//! two seams tests replace: how commands run ([`Runner`]) and what time it is ([`Clock`]).

use crate::clock::{Clock, RealClock};
use crate::commands::{self, CommandSpec, Outcome, OutputSink, ProcessGroups};
use crate::config::Limits;
use crate::jobs::Jobs;
use crate::locks::NamedLocks;
use crate::runner::{Processes, Runner};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

pub struct Runtime {
    pub limits: Limits,
    pub groups: ProcessGroups,
    pub locks: NamedLocks,
    pub jobs: Jobs,
    /// Set on a hard stop: every running script ends at its next operation.
    pub abort: AtomicBool,
    /// Carries out commands: real processes, or a recorder in tests and dry runs.
    pub runner: Arc<dyn Runner>,
    /// What time-based features read as now: real, or virtual in tests.
    pub clock: Arc<dyn Clock>,
    /// Set when a stop begins: the watcher and scheduler queue no new calls.
    pub stopping: AtomicBool,
    /// `on_change`/`on_tick` calls queued or running, so a stop waits for them as for requests.
    pub triggers_running: AtomicUsize,
}

impl Runtime {
    /// The server's runtime: real processes, real time.
    pub fn new(limits: Limits) -> Arc<Runtime> {
        Runtime::with_seams(limits, Arc::new(Processes), Arc::new(RealClock))
    }

    /// A runtime whose commands and time come from `runner` and `clock`.
    pub fn with_seams(
        limits: Limits,
        runner: Arc<dyn Runner>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Runtime> {
        Arc::new(Runtime {
            limits,
            groups: ProcessGroups::default(),
            locks: NamedLocks::default(),
            jobs: Jobs::default(),
            abort: AtomicBool::new(false),
            runner,
            clock,
            stopping: AtomicBool::new(false),
            triggers_running: AtomicUsize::new(0),
        })
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
