//! Background jobs started by `start()`: each runs on its own thread, outlives the request that
//! started it, and leaves a record that `job(id)` reads. At most `--max-jobs` run at once; the
//! last [`KEPT_FINISHED`] finished ones are remembered.

use crate::commands::{CommandSpec, Outcome, OutputSink};
use crate::metrics::metrics;
use crate::runtime::Runtime;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const KEPT_FINISHED: usize = 100;

/// What `job(id)` reports.
#[derive(Clone, Debug)]
pub struct JobState {
    pub running: bool,
    pub code: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
}

#[derive(Default)]
pub struct Jobs {
    table: Mutex<JobTable>,
    /// Signalled whenever a job's end has been logged, for [`Jobs::wait_all`].
    ended: Condvar,
}

#[derive(Default)]
struct JobTable {
    last_id: i64,
    /// Start time of each running job.
    running: HashMap<i64, Instant>,
    finished: VecDeque<(i64, JobState)>,
    /// Jobs started whose end is not logged yet: running, or finished a moment ago.
    unreported: usize,
}

impl Jobs {
    fn table(&self) -> MutexGuard<'_, JobTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn alive(&self) -> usize {
        self.table().running.len()
    }

    /// Blocks until every job has ended and its end is logged: `call` waits for the jobs its
    /// script started, so they are not cut off when the process exits.
    pub fn wait_all(&self) {
        let mut table = self.table();
        while table.unreported > 0 {
            table = self.ended.wait(table).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn state(&self, id: i64) -> Option<JobState> {
        let table = self.table();
        if let Some(started) = table.running.get(&id) {
            return Some(JobState {
                running: true,
                code: None,
                timed_out: false,
                duration: started.elapsed(),
            });
        }
        table
            .finished
            .iter()
            .find(|(done, _)| *done == id)
            .map(|(_, state)| state.clone())
    }

    /// Starts `spec` in the background; fails when `--max-jobs` are alive.
    pub fn start(
        runtime: &Arc<Runtime>,
        spec: CommandSpec,
        lock: Option<String>,
        request_id: u64,
    ) -> Result<i64, String> {
        let id = runtime.jobs.reserve(runtime.limits.max_jobs)?;
        let thread_runtime = runtime.clone();
        let spawned = runtime.runner.spawn_job(
            format!("job-{id}"),
            Box::new(move || run_job(&thread_runtime, id, spec, lock, request_id)),
        );
        if let Err(e) = spawned {
            runtime.jobs.table().running.remove(&id);
            runtime.jobs.reported();
            metrics().running_jobs.dec();
            return Err(format!("starting job thread: {e}"));
        }
        Ok(id)
    }

    fn reserve(&self, max_jobs: usize) -> Result<i64, String> {
        let mut table = self.table();
        if table.running.len() >= max_jobs {
            return Err(format!(
                "too many background jobs: {max_jobs} are running (--max-jobs)"
            ));
        }
        table.last_id += 1;
        let id = table.last_id;
        table.running.insert(id, Instant::now());
        table.unreported += 1;
        metrics().running_jobs.inc();
        Ok(id)
    }

    fn finish(&self, id: i64, outcome: &Outcome) {
        let mut table = self.table();
        table.running.remove(&id);
        metrics().running_jobs.dec();
        let state = JobState {
            running: false,
            code: Some(outcome.code),
            timed_out: outcome.timed_out,
            duration: outcome.duration,
        };
        table.finished.push_back((id, state));
        while table.finished.len() > KEPT_FINISHED {
            table.finished.pop_front();
        }
    }

    /// A job's end is logged (or it never started): wakes [`Jobs::wait_all`].
    fn reported(&self) {
        let mut table = self.table();
        table.unreported = table.unreported.saturating_sub(1);
        self.ended.notify_all();
    }
}

fn run_job(runtime: &Runtime, id: i64, spec: CommandSpec, lock: Option<String>, request_id: u64) {
    let sink = OutputSink::Capture(runtime.limits.max_output_bytes);
    let outcome = runtime.run_command(&spec, lock.as_deref(), sink);
    runtime.jobs.finish(id, &outcome);
    log::info!(
        "job {id} (request {request_id}) ended: code={} timed_out={} duration={:.1}ms",
        outcome.code,
        outcome.timed_out,
        outcome.duration.as_secs_f64() * 1000.0
    );
    if !outcome.stderr.is_empty() {
        log::debug!(
            "job {id} stderr: {}",
            String::from_utf8_lossy(&outcome.stderr).trim_end()
        );
    }
    // Last, so whoever waits for the job (`call`) sees its end logged.
    runtime.jobs.reported();
}
