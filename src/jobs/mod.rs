//! The job table behind `start()` (SPEC §5, §12): which jobs are pending, running or finished,
//! the folding rules of keyed jobs (queue, skip, replace), debounce, retry with backoff, and each
//! job's kept output. A plain table: it starts no thread and reads no clock. Its operations take
//! the time and return the [`Launch`]es the caller must run (see `job_runner`).

mod table;

use crate::commands::{CommandSpec, Outcome};
use crate::metrics::metrics;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Finished (done or cancelled) jobs remembered for `job(id)`.
pub const KEPT_FINISHED: usize = 100;
/// Pending jobs (debounced or queued behind their key) at once; one per key at most.
pub const MAX_PENDING: usize = 1024;
/// Longest wait between two attempts of a retried job.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What a keyed `start` does while a job with its key runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfRunning {
    Queue,
    Skip,
    Replace,
}

/// A job as `start()` asked for it.
#[derive(Clone, Debug)]
pub struct JobRequest {
    pub spec: CommandSpec,
    /// `opts.lock`: a named lock each attempt takes.
    pub lock: Option<String>,
    pub key: Option<String>,
    pub if_running: IfRunning,
    /// Start only once the key has been quiet this long.
    pub debounce: Option<Duration>,
    /// Runs in all (1: no retry).
    pub attempts: u32,
    /// Wait before the second run; doubled before each further one.
    pub backoff: Duration,
    /// The request that started it, for the log.
    pub request_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Done,
    Cancelled,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// One attempt of a job to run now, on a thread of the caller's.
pub struct Launch {
    pub id: i64,
    pub spec: CommandSpec,
    pub lock: Option<String>,
    pub attempt: u32,
}

/// What `job(id)` and `jobs()` report.
#[derive(Clone, Debug)]
pub struct JobView {
    pub id: i64,
    pub key: Option<String>,
    pub phase: Phase,
    pub attempt: u32,
    pub code: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
}

/// The last `cap` bytes of a job's combined stdout and stderr.
#[derive(Default)]
struct KeptOutput {
    bytes: VecDeque<u8>,
    /// Bytes ever written: a follower's position survives what the cap drops.
    total: u64,
}

struct Job {
    id: i64,
    request: JobRequest,
    phase: Phase,
    attempt: u32,
    /// Pending: when the debounce ends. Running: when the next attempt is due (backoff);
    /// `None` while an attempt runs.
    due: Option<Duration>,
    started: Option<Duration>,
    ended: Option<Duration>,
    last: Option<(i32, bool)>,
    /// Set to stop the running attempt (cancel, replace); its command watches it.
    stop: Arc<AtomicBool>,
    output: KeptOutput,
}

impl Job {
    fn view(&self, now: Duration) -> JobView {
        let until = self.ended.unwrap_or(now);
        JobView {
            id: self.id,
            key: self.request.key.clone(),
            phase: self.phase,
            attempt: self.attempt,
            code: self.last.map(|(code, _)| code),
            timed_out: self.last.is_some_and(|(_, t)| t),
            duration: self
                .started
                .map(|s| until.saturating_sub(s))
                .unwrap_or_default(),
        }
    }

    fn holds_key(&self, key: &str) -> bool {
        self.request.key.as_deref() == Some(key)
    }
}

/// New output of a followed job, and whether it has ended.
pub struct Follow {
    pub bytes: Vec<u8>,
    pub position: u64,
    pub ended: bool,
}

/// The table, behind one mutex, with a condition variable that every change notifies: the
/// timer waits on it for new due times, `attach` for new output.
pub struct Jobs {
    table: Mutex<JobTable>,
    changed: Condvar,
    /// Whether the timer thread has been started (it starts on first use).
    pub timer_started: AtomicBool,
}

pub struct JobTable {
    last_id: i64,
    /// Pending and running jobs, by id (so in arrival order).
    live: BTreeMap<i64, Job>,
    finished: VecDeque<Job>,
    /// Running jobs, those waiting for a retry included: what `--max-jobs` counts.
    running: usize,
    max_jobs: usize,
    output_cap: usize,
    /// Shutdown has begun: nothing new waits, no retry is scheduled.
    stopping: bool,
}

impl Jobs {
    pub fn new(max_jobs: usize, output_cap: usize) -> Jobs {
        Jobs {
            table: Mutex::new(JobTable {
                last_id: 0,
                live: BTreeMap::new(),
                finished: VecDeque::new(),
                running: 0,
                max_jobs,
                output_cap,
                stopping: false,
            }),
            changed: Condvar::new(),
            timer_started: AtomicBool::new(false),
        }
    }

    /// The table, for one operation; call [`Jobs::notify`] after a change.
    pub fn table(&self) -> MutexGuard<'_, JobTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Running jobs (what keeps shutdown waiting).
    pub fn alive(&self) -> usize {
        self.table().running
    }

    /// Jobs pending or running: what `call` waits for before it exits.
    pub fn unfinished(&self) -> usize {
        self.table().live.len()
    }

    /// Blocks until no job is pending or running (each end logged by then): `call` waits for
    /// the jobs its script started, so they are not cut off when the process exits.
    pub fn wait_all(&self) {
        let mut table = self.table();
        while !table.live.is_empty() {
            table = match self.changed.wait_timeout(table, Duration::from_millis(100)) {
                Ok((table, _)) => table,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Waits up to `wait` for any change to the table.
    pub fn wait_change(&self, wait: Duration) {
        let table = self.table();
        let _ = self.changed.wait_timeout(table, wait);
    }

    /// Appends to a job's kept output.
    pub fn record_output(&self, id: i64, bytes: &[u8]) {
        self.table().append_output(id, bytes);
        self.notify();
    }

    /// Output of job `id` after `position`, waiting up to `wait` for some if there is none yet
    /// and the job has not ended. `None` for an unknown job.
    pub fn follow(&self, id: i64, position: u64, wait: Duration) -> Option<Follow> {
        let table = self.table();
        let follow = table.output_since(id, position)?;
        if !follow.bytes.is_empty() || follow.ended {
            return Some(follow);
        }
        let (table, _) = self
            .changed
            .wait_timeout(table, wait)
            .unwrap_or_else(|p| p.into_inner());
        table.output_since(id, position)
    }
}

/// The wait before attempt `done + 1`: `base`, doubled for each attempt after the first.
fn backoff(base: Duration, done: u32) -> Duration {
    let factor = 1u32 << done.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Program;

    const T0: Duration = Duration::from_secs(1000);
    const S: Duration = Duration::from_secs(1);

    fn request(cmd: &str, key: Option<&str>, mode: IfRunning) -> JobRequest {
        JobRequest {
            spec: CommandSpec {
                program: Program::Shell(cmd.into()),
                ..CommandSpec::default()
            },
            lock: None,
            key: key.map(str::to_owned),
            if_running: mode,
            debounce: None,
            attempts: 1,
            backoff: S,
            request_id: 1,
        }
    }

    fn command(launch: &Launch) -> String {
        match &launch.spec.program {
            Program::Shell(line) => line.clone(),
            Program::Argv(argv) => argv.join(" "),
        }
    }

    fn exit(code: i32) -> Outcome {
        Outcome {
            code,
            ..Outcome::default()
        }
    }

    #[test]
    fn ten_triggers_during_a_run_give_one_follow_up_with_the_latest_command() {
        let mut table = Jobs::new(4, 1024).table.into_inner().unwrap();
        let (first, launches) = table
            .start(request("v0", Some("k"), IfRunning::Queue), T0)
            .unwrap();
        assert_eq!(launches.len(), 1);
        let ids: Vec<i64> = (1..=10)
            .map(|i| {
                let (id, launches) = table
                    .start(request(&format!("v{i}"), Some("k"), IfRunning::Queue), T0)
                    .unwrap();
                assert!(launches.is_empty());
                id
            })
            .collect();
        assert!(ids.iter().all(|&id| id == ids[0] && id != first));
        assert_eq!(table.view(ids[0], T0).unwrap().phase, Phase::Pending);
        let next = table.finish(first, &exit(0), T0);
        assert_eq!(next.iter().map(command).collect::<Vec<_>>(), ["v10"]);
        assert!(table.finish(ids[0], &exit(0), T0).is_empty());
        assert_eq!(table.list(T0).len(), 2);
    }

    #[test]
    fn skip_returns_the_running_id_and_replace_stops_it() {
        let mut table = Jobs::new(4, 1024).table.into_inner().unwrap();
        let (first, _) = table
            .start(request("a", Some("k"), IfRunning::Queue), T0)
            .unwrap();
        let (skipped, none) = table
            .start(request("b", Some("k"), IfRunning::Skip), T0)
            .unwrap();
        assert_eq!((skipped, none.len()), (first, 0));
        let (new, none) = table
            .start(request("c", Some("k"), IfRunning::Replace), T0)
            .unwrap();
        assert!(new != first && none.is_empty());
        assert!(table.live[&first].stop.load(Ordering::SeqCst));
        let next = table.finish(first, &exit(143), T0);
        assert_eq!(table.view(first, T0).unwrap().phase, Phase::Cancelled);
        assert_eq!(next.iter().map(command).collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn debounce_waits_for_quiet_and_retry_doubles_its_backoff() {
        let mut table = Jobs::new(4, 1024).table.into_inner().unwrap();
        let mut debounced = request("d1", Some("k"), IfRunning::Queue);
        debounced.debounce = Some(5 * S);
        let (id, none) = table.start(debounced.clone(), T0).unwrap();
        assert!(none.is_empty());
        debounced.spec.program = Program::Shell("d2".into());
        table.start(debounced, T0 + 3 * S).unwrap();
        assert!(table.promote(T0 + 7 * S).is_empty(), "the wait restarted");
        let launched = table.promote(T0 + 8 * S);
        assert_eq!(launched.iter().map(command).collect::<Vec<_>>(), ["d2"]);
        let mut retried = request("r", None, IfRunning::Queue);
        retried.attempts = 3;
        let (r, _) = table.start(retried, T0).unwrap();
        assert!(table.finish(r, &exit(1), T0).is_empty());
        assert_eq!(table.next_due(), Some(T0 + S));
        assert_eq!(table.promote(T0 + S)[0].attempt, 2);
        table.finish(r, &exit(1), T0 + S);
        assert_eq!(table.next_due(), Some(T0 + 3 * S), "doubled");
        assert_eq!(table.promote(T0 + 3 * S)[0].attempt, 3);
        table.finish(r, &exit(1), T0 + 3 * S);
        assert_eq!(table.view(r, T0).unwrap().phase, Phase::Done);
        assert_eq!(table.view(id, T0).unwrap().phase, Phase::Running);
    }

    #[test]
    fn a_due_job_waiting_for_its_key_leaves_no_due_time_and_replace_ends_a_retry_wait() {
        let mut table = Jobs::new(4, 1024).table.into_inner().unwrap();
        let mut failing = request("f", Some("k"), IfRunning::Queue);
        failing.attempts = 2;
        let (first, _) = table.start(failing, T0).unwrap();
        let mut debounced = request("d", Some("k"), IfRunning::Queue);
        debounced.debounce = Some(S);
        let (second, _) = table.start(debounced, T0).unwrap();
        assert!(table.promote(T0 + 2 * S).is_empty(), "k is running");
        assert_eq!(table.next_due(), None, "the timer has nothing to wake for");
        assert!(
            table.finish(first, &exit(1), T0 + 2 * S).is_empty(),
            "retry wait holds k"
        );
        let (third, launched) = table
            .start(request("r", Some("k"), IfRunning::Replace), T0 + 2 * S)
            .unwrap();
        assert_eq!(third, second, "folded into the pending job");
        assert_eq!(launched.iter().map(command).collect::<Vec<_>>(), ["r"]);
        assert_eq!(table.view(first, T0).unwrap().phase, Phase::Cancelled);
    }

    #[test]
    fn max_jobs_refuses_a_start_that_would_run_now_but_not_one_that_waits() {
        let mut table = Jobs::new(1, 1024).table.into_inner().unwrap();
        let (busy, _) = table
            .start(request("a", None, IfRunning::Queue), T0)
            .unwrap();
        assert!(
            table
                .start(request("b", None, IfRunning::Queue), T0)
                .is_err()
        );
        assert!(
            table
                .start(request("c", Some("k"), IfRunning::Queue), T0)
                .is_err()
        );
        let mut later = request("d", Some("k"), IfRunning::Queue);
        later.debounce = Some(S);
        let (waiting, none) = table.start(later, T0).unwrap();
        assert!(none.is_empty());
        assert!(table.promote(T0 + S).is_empty(), "no free slot yet");
        let next = table.finish(busy, &exit(0), T0 + S);
        assert_eq!(next.iter().map(|l| l.id).collect::<Vec<_>>(), [waiting]);
    }

    #[test]
    fn a_debounced_skip_that_finds_its_key_busy_is_cancelled_and_shutdown_cancels_pending() {
        let mut table = Jobs::new(4, 1024).table.into_inner().unwrap();
        let (running, _) = table
            .start(request("a", Some("k"), IfRunning::Queue), T0)
            .unwrap();
        let mut skip = request("b", Some("k"), IfRunning::Skip);
        skip.debounce = Some(S);
        let (skipped, _) = table.start(skip, T0).unwrap();
        assert_ne!(skipped, running);
        assert!(table.promote(T0 + S).is_empty());
        assert_eq!(table.view(skipped, T0).unwrap().phase, Phase::Cancelled);
        let (queued, _) = table
            .start(request("c", Some("k"), IfRunning::Queue), T0)
            .unwrap();
        table.stop_all(T0);
        assert_eq!(table.view(queued, T0).unwrap().phase, Phase::Cancelled);
        assert!(
            table.finish(running, &exit(0), T0).is_empty(),
            "nothing left to start"
        );
        let (late, _) = table
            .start(request("d", Some("k"), IfRunning::Queue), T0)
            .unwrap();
        assert_eq!(
            table.view(late, T0).unwrap().phase,
            Phase::Running,
            "a start that runs at once still runs"
        );
    }

    #[test]
    fn kept_output_keeps_the_tail_and_followers_resume() {
        let mut table = Jobs::new(4, 8).table.into_inner().unwrap();
        let (id, _) = table
            .start(request("x", None, IfRunning::Queue), T0)
            .unwrap();
        table.append_output(id, b"0123456789");
        table.append_output(id, b"ab");
        assert_eq!(table.output(id).unwrap(), b"456789ab");
        let follow = table.output_since(id, 10).unwrap();
        assert_eq!(
            (follow.bytes, follow.position, follow.ended),
            (b"ab".to_vec(), 12, false)
        );
    }
}
