//! Running the job table's decisions: [`Runtime::start_job`] and friends put a request into the
//! table ([`crate::jobs`]) and start a thread for each attempt it says to run; one timer thread
//! starts what becomes due (debounce, retry backoff) and sweeps expired state and idle rate
//! limit keys. Kept apart from `runtime.rs`, so the table never needs the runtime.

use crate::commands::{Outcome, OutputSink};
use crate::jobs::{JobRequest, JobView, Launch};
use crate::runtime::Runtime;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Longest the timer sleeps: how late a sweep may come, and a backstop for missed wake-ups.
const TIMER_TICK: Duration = Duration::from_secs(1);
/// Time between two sweeps of expired state keys and idle rate limit keys.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl Runtime {
    /// `start()`: queues, folds, skips or starts `request` by the rules of SPEC §12; the id is
    /// the one the script gets.
    pub fn start_job(self: &Arc<Self>, request: JobRequest) -> Result<i64, String> {
        self.ensure_timer();
        let (id, launches) = self.jobs.table().start(request, self.now())?;
        self.launch_all(launches);
        self.jobs.notify();
        Ok(id)
    }

    /// `cancel(id)`: whether a pending or running job was stopped.
    pub fn cancel_job(self: &Arc<Self>, id: i64) -> bool {
        let (cancelled, launches) = self.jobs.table().cancel(id, self.now());
        self.launch_all(launches);
        self.jobs.notify();
        cancelled
    }

    pub fn job(&self, id: i64) -> Option<JobView> {
        self.jobs.table().view(id, self.now())
    }

    pub fn job_list(&self) -> Vec<JobView> {
        self.jobs.table().list(self.now())
    }

    /// Shutdown: cancels pending jobs (each logged) and schedules no more retries; running
    /// attempts finish within the shutdown timeout like every other command.
    pub fn stop_jobs(&self) {
        self.jobs.table().stop_all(self.now());
        self.jobs.notify();
    }

    /// Starts the timer thread once, on first use of anything that needs time to pass.
    pub fn ensure_timer(self: &Arc<Self>) {
        if self.jobs.timer_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let runtime = Arc::downgrade(self);
        let spawned = self.runner.spawn_timer(
            "jobs-timer".into(),
            Box::new(move || {
                let mut next_sweep = Duration::ZERO;
                while let Some(runtime) = runtime.upgrade() {
                    next_sweep = runtime.timer_turn(next_sweep);
                }
            }),
        );
        if let Err(e) = spawned {
            log::error!("starting the jobs timer thread: {e}");
            self.jobs.timer_started.store(false, Ordering::SeqCst);
        }
    }

    /// One turn of the timer: start what is due, sweep if it is time, wait for the next due
    /// time or a change. Returns when the next sweep is due.
    fn timer_turn(self: &Arc<Self>, mut next_sweep: Duration) -> Duration {
        let now = self.now();
        let next_due = self.run_due_jobs();
        if now >= next_sweep {
            self.sweep(now);
            next_sweep = now + SWEEP_EVERY;
        }
        let wait = next_due.map_or(TIMER_TICK, |due| due.saturating_sub(now).min(TIMER_TICK));
        self.jobs.wait_change(wait.max(Duration::from_millis(1)));
        next_sweep
    }

    /// Starts what is due at the clock's time (debounce ends, retries); returns the next due
    /// time. The timer calls it; so can a test that moved a virtual clock.
    pub fn run_due_jobs(self: &Arc<Self>) -> Option<Duration> {
        let (launches, next_due) = {
            let mut table = self.jobs.table();
            (table.promote(self.now()), table.next_due())
        };
        self.launch_all(launches);
        next_due
    }

    fn sweep(&self, now: Duration) {
        match self.state.sweep(now) {
            Ok(0) => {}
            Ok(n) => log::debug!("state: {n} expired key(s) removed"),
            Err(e) => log::warn!("sweeping expired state keys: {e}"),
        }
        self.limiter.sweep(now);
    }

    fn launch_all(self: &Arc<Self>, launches: Vec<Launch>) {
        for launch in launches {
            let id = launch.id;
            let runtime = self.clone();
            let spawned = self.runner.spawn_job(
                format!("job-{id}"),
                Box::new(move || runtime.run_attempt(launch)),
            );
            if let Err(e) = spawned {
                log::error!("job {id}: starting its thread: {e}");
                let outcome = Outcome {
                    code: 126,
                    ..Outcome::default()
                };
                let more = self.jobs.table().finish(id, &outcome, self.now());
                self.launch_all(more);
            }
        }
    }

    /// Runs one attempt on this (the job's) thread, its output kept in the table as it comes.
    fn run_attempt(self: &Arc<Self>, launch: Launch) {
        let id = launch.id;
        log::debug!("job {id} attempt {} starting", launch.attempt);
        let mut keep = |chunk: &[u8]| self.jobs.record_output(id, chunk);
        let outcome = self.run_command(
            &launch.spec,
            launch.lock.as_deref(),
            OutputSink::Keep(&mut keep),
        );
        let more = self.jobs.table().finish(id, &outcome, self.now());
        self.jobs.notify();
        self.launch_all(more);
    }
}
