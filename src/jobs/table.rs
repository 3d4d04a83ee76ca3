//! The job table's operations: `start` with its folding rules, finishing and retrying
//! attempts, cancelling, the due times of the timer, and the views `job()`, `jobs()` and
//! `attach` read. Split from [`super`], which holds the types and the locked [`super::Jobs`].

use super::*;

impl JobTable {
    /// `start()`: returns the id the script gets and what to run now.
    pub fn start(
        &mut self,
        request: JobRequest,
        now: Duration,
    ) -> Result<(i64, Vec<Launch>), String> {
        let Some(key) = request.key.clone() else {
            if request.debounce.is_some() {
                return Err("'debounce' needs a 'key'".into());
            }
            return self
                .start_now(request, now)
                .map(|(id, launch)| (id, vec![launch]));
        };
        let running = self.find(&key, Phase::Running);
        if let (Some(running), None, IfRunning::Skip) =
            (running, request.debounce, request.if_running)
        {
            log::info!("job start with key '{key}' skipped: job {running} is running");
            return Ok((running, Vec::new()));
        }
        let due = request.debounce.map(|d| now.saturating_add(d));
        let pending = self.find(&key, Phase::Pending);
        // It would start now but for --max-jobs: refused, like an unkeyed start. Checked before
        // anything changes, so no launch decided below is ever dropped.
        let now_or_never = pending.is_none() && due.is_none() && running.is_none();
        if now_or_never && self.running >= self.max_jobs {
            return Err(self.full_message());
        }
        let id = match pending {
            Some(id) => id,
            None => self.add_pending(request.clone())?,
        };
        if let Some(job) = self.live.get_mut(&id) {
            job.request = request; // the latest trigger's command and options win
            job.due = due;
        }
        let launches = self.promote(now);
        let waiting = self
            .live
            .get(&id)
            .is_some_and(|j| j.phase == Phase::Pending);
        if waiting && self.stopping {
            self.cancel_pending(id, now, "shutting down");
        }
        Ok((id, launches))
    }

    pub(super) fn full_message(&self) -> String {
        format!(
            "too many background jobs: {} are running (--max-jobs)",
            self.max_jobs
        )
    }

    pub(super) fn start_now(
        &mut self,
        request: JobRequest,
        now: Duration,
    ) -> Result<(i64, Launch), String> {
        if self.running >= self.max_jobs {
            return Err(self.full_message());
        }
        let id = self.next_id();
        self.live.insert(id, self.new_job(id, request));
        self.run_job(id, now)
            .ok_or_else(|| "job vanished".to_owned())
            .map(|l| (id, l))
    }

    pub(super) fn add_pending(&mut self, request: JobRequest) -> Result<i64, String> {
        let pending = self
            .live
            .values()
            .filter(|j| j.phase == Phase::Pending)
            .count();
        if pending >= MAX_PENDING {
            return Err(format!("too many pending jobs: {MAX_PENDING}"));
        }
        let id = self.next_id();
        self.live.insert(id, self.new_job(id, request));
        Ok(id)
    }

    pub(super) fn next_id(&mut self) -> i64 {
        self.last_id += 1;
        self.last_id
    }

    pub(super) fn new_job(&self, id: i64, request: JobRequest) -> Job {
        Job {
            id,
            request,
            phase: Phase::Pending,
            attempt: 0,
            due: None,
            started: None,
            ended: None,
            last: None,
            stop: Arc::new(AtomicBool::new(false)),
            output: KeptOutput::default(),
        }
    }

    pub(super) fn find(&self, key: &str, phase: Phase) -> Option<i64> {
        self.live
            .values()
            .find(|j| j.phase == phase && j.holds_key(key))
            .map(|j| j.id)
    }

    /// Makes job `id` running (first attempt) and returns its launch.
    pub(super) fn run_job(&mut self, id: i64, now: Duration) -> Option<Launch> {
        let job = self.live.get_mut(&id)?;
        job.phase = Phase::Running;
        job.started = Some(now);
        job.due = None;
        self.running += 1;
        metrics().running_jobs.set(self.running as i64);
        self.next_attempt(id)
    }

    pub(super) fn next_attempt(&mut self, id: i64) -> Option<Launch> {
        let job = self.live.get_mut(&id)?;
        job.attempt += 1;
        job.due = None;
        Some(Launch {
            id,
            spec: CommandSpec {
                stop: Some(job.stop.clone()),
                ..job.request.spec.clone()
            },
            lock: job.request.lock.clone(),
            attempt: job.attempt,
        })
    }

    /// Starts what can start at `now`: due retries, and pending jobs whose debounce is over,
    /// each under its key's rule. Call after any change and when a due time passes.
    pub fn promote(&mut self, now: Duration) -> Vec<Launch> {
        let due = |j: &Job| j.due.is_none_or(|d| d <= now);
        let retries: Vec<i64> = self
            .live
            .values()
            .filter(|j| j.phase == Phase::Running && j.due.is_some() && due(j))
            .map(|j| j.id)
            .collect();
        let mut launches: Vec<Launch> = retries
            .into_iter()
            .filter_map(|id| self.next_attempt(id))
            .collect();
        let ready: Vec<i64> = self
            .live
            .values()
            .filter(|j| j.phase == Phase::Pending && due(j))
            .map(|j| j.id)
            .collect();
        for id in ready {
            launches.extend(self.promote_one(id, now));
        }
        launches
    }

    /// Decides for one due pending job. One that must wait for its key or a free slot loses
    /// its due time: the end of a running job promotes again, so the timer need not spin.
    pub(super) fn promote_one(&mut self, id: i64, now: Duration) -> Option<Launch> {
        let job = self.live.get_mut(&id)?;
        if job.phase != Phase::Pending || job.due.is_some_and(|d| d > now) {
            return None;
        }
        job.due = None;
        let (mode, key) = (job.request.if_running, job.request.key.clone());
        let running = key.as_deref().and_then(|k| self.find(k, Phase::Running));
        match (running, mode) {
            (None, _) if self.running < self.max_jobs => self.run_job(id, now),
            (None, _) | (Some(_), IfRunning::Queue) => None,
            (Some(other), IfRunning::Skip) => {
                let reason = format!("skipped: job {other} with its key is running");
                self.cancel_pending(id, now, &reason);
                None
            }
            (Some(other), IfRunning::Replace) => self.replace(other, id, now),
        }
    }

    /// Stops running job `old` for job `new`. One waiting for a retry has no command to stop:
    /// it ends here and `new` starts at once.
    pub(super) fn replace(&mut self, old: i64, new: i64, now: Duration) -> Option<Launch> {
        let job = self.live.get(&old)?;
        if job.due.is_some() {
            log::info!("job {old} cancelled while waiting to retry: replaced by job {new}");
            self.end_running(old, Phase::Cancelled, now);
            return self.run_job(new, now);
        }
        if !job.stop.swap(true, Ordering::SeqCst) {
            log::info!("job {old} cancelled: replaced by job {new}");
        }
        None
    }

    /// An attempt of job `id` ended: retry it, or finish it. Returns what to start now.
    pub fn finish(&mut self, id: i64, outcome: &Outcome, now: Duration) -> Vec<Launch> {
        let Some(job) = self.live.get_mut(&id) else {
            return Vec::new();
        };
        let stopped = job.stop.load(Ordering::SeqCst);
        job.last = Some((outcome.code, outcome.timed_out && !stopped));
        let retry = !stopped && !outcome.success() && job.attempt < job.request.attempts;
        if retry && !self.stopping {
            let wait = backoff(job.request.backoff, job.attempt);
            job.due = Some(now.saturating_add(wait));
            log::info!(
                "job {id} attempt {} failed (code {}): retrying in {:?}",
                job.attempt,
                outcome.code,
                wait
            );
            return self.promote(now);
        }
        let phase = if stopped {
            Phase::Cancelled
        } else {
            Phase::Done
        };
        self.end_running(id, phase, now);
        self.promote(now)
    }

    /// `cancel(id)`: whether a pending or running job was stopped.
    pub fn cancel(&mut self, id: i64, now: Duration) -> (bool, Vec<Launch>) {
        let Some(job) = self.live.get(&id) else {
            return (false, Vec::new());
        };
        match (job.phase, job.due) {
            (Phase::Pending, _) => {
                self.cancel_pending(id, now, "by the script");
                (true, Vec::new())
            }
            // Waiting for a retry: no command to stop, so it ends here.
            (Phase::Running, Some(_)) => {
                log::info!("job {id} cancelled while waiting to retry");
                self.end_running(id, Phase::Cancelled, now);
                (true, self.promote(now))
            }
            (Phase::Running, None) => {
                let first = !job.stop.swap(true, Ordering::SeqCst);
                if first {
                    log::info!("job {id} cancelled: stopping its command");
                }
                (first, Vec::new())
            }
            _ => (false, Vec::new()),
        }
    }

    /// Shutdown: pending jobs are cancelled and no retry is scheduled any more.
    pub fn stop_all(&mut self, now: Duration) {
        self.stopping = true;
        let pending: Vec<i64> = self
            .live
            .values()
            .filter(|j| j.phase == Phase::Pending)
            .map(|j| j.id)
            .collect();
        for id in pending {
            self.cancel_pending(id, now, "shutting down");
        }
        let waiting: Vec<i64> = self
            .live
            .values()
            .filter(|j| j.phase == Phase::Running && j.due.is_some())
            .map(|j| j.id)
            .collect();
        for id in waiting {
            log::info!("job {id}: no retry, shutting down");
            self.end_running(id, Phase::Done, now);
        }
    }

    pub(super) fn cancel_pending(&mut self, id: i64, now: Duration, why: &str) {
        if let Some(mut job) = self.remove_live(id) {
            log::info!("pending job {id} cancelled: {why}");
            job.phase = Phase::Cancelled;
            job.ended = Some(now);
            metrics().record_job_end("cancelled");
            self.keep_finished(job);
        }
    }

    pub(super) fn end_running(&mut self, id: i64, phase: Phase, now: Duration) {
        let Some(mut job) = self.remove_live(id) else {
            return;
        };
        self.running = self.running.saturating_sub(1);
        metrics().running_jobs.set(self.running as i64);
        job.phase = phase;
        job.ended = Some(now);
        job.due = None;
        let view = job.view(now);
        let result = match (phase, view.code) {
            (Phase::Cancelled, _) => "cancelled",
            (_, Some(0)) if !view.timed_out => "success",
            _ => "failure",
        };
        metrics().record_job_end(result);
        log::info!(
            "job {id} (request {}) ended: code={} timed_out={} result={result} attempts={} duration={:.1}ms",
            job.request.request_id,
            view.code.unwrap_or(-1),
            view.timed_out,
            view.attempt,
            view.duration.as_secs_f64() * 1000.0
        );
        self.keep_finished(job);
    }

    pub(super) fn remove_live(&mut self, id: i64) -> Option<Job> {
        self.live.remove(&id)
    }

    pub(super) fn keep_finished(&mut self, job: Job) {
        self.finished.push_back(job);
        while self.finished.len() > KEPT_FINISHED {
            self.finished.pop_front();
        }
    }

    pub(super) fn get(&self, id: i64) -> Option<&Job> {
        self.live
            .get(&id)
            .or_else(|| self.finished.iter().find(|j| j.id == id))
    }

    pub fn view(&self, id: i64, now: Duration) -> Option<JobView> {
        self.get(id).map(|j| j.view(now))
    }

    /// Every kept job, oldest first.
    pub fn list(&self, now: Duration) -> Vec<JobView> {
        let mut all: Vec<JobView> = self.finished.iter().map(|j| j.view(now)).collect();
        all.extend(self.live.values().map(|j| j.view(now)));
        all.sort_by_key(|v| v.id);
        all
    }

    /// The earliest debounce end or retry time, for the timer.
    pub fn next_due(&self) -> Option<Duration> {
        self.live.values().filter_map(|j| j.due).min()
    }

    pub fn output(&self, id: i64) -> Option<Vec<u8>> {
        self.get(id)
            .map(|j| j.output.bytes.iter().copied().collect())
    }

    pub(super) fn append_output(&mut self, id: i64, bytes: &[u8]) {
        let cap = self.output_cap;
        let Some(job) = self.live.get_mut(&id) else {
            return;
        };
        let kept = &mut job.output;
        kept.total += bytes.len() as u64;
        let tail = &bytes[bytes.len().saturating_sub(cap)..];
        let overflow = (kept.bytes.len() + tail.len()).saturating_sub(cap);
        kept.bytes.drain(..overflow.min(kept.bytes.len()));
        kept.bytes.extend(tail);
    }

    pub(super) fn output_since(&self, id: i64, position: u64) -> Option<Follow> {
        let job = self.get(id)?;
        let kept = &job.output;
        let first_kept = kept.total - kept.bytes.len() as u64;
        let skip = position.saturating_sub(first_kept) as usize;
        Some(Follow {
            bytes: kept.bytes.iter().skip(skip).copied().collect(),
            position: kept.total,
            ended: matches!(job.phase, Phase::Done | Phase::Cancelled),
        })
    }
}
