//! Where the worker threads run: anywhere (the default), or each bound to one CPU
//! (`--pin-workers`).
//!
//! Why binding helps: on a small machine busy with short commands, the scheduler moves about
//! one command in two to another CPU at its `execve` (exec balancing, done by that CPU's
//! stopper thread: two more context switches and a cold cache) and often wakes the worker on
//! yet another CPU when the command exits. A worker bound to one CPU starts its commands there
//! and they stay there: W2 gained 3–5% (BENCHMARKS.md, tenth session). Why it is not the
//! default: a command inherits the binding, with everything it starts, so a command that
//! needs several CPUs (a build, a parallel compressor) gets one.

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use std::sync::OnceLock;

/// The CPUs the server was allowed when the workers were bound: what a thread started by a
/// bound worker (a background job's) gets back.
static ALLOWED: OnceLock<CpuSet> = OnceLock::new();

/// The CPUs the workers are bound to, one each, in turn.
pub struct Pinning {
    cpus: Vec<usize>,
}

impl Pinning {
    /// The CPUs this process may use now; `None` when there is only one, where binding would
    /// change nothing.
    pub fn of_this_process() -> std::io::Result<Option<Pinning>> {
        let allowed = sched_getaffinity(None)?;
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&cpu| allowed.is_set(cpu))
            .collect();
        if cpus.len() < 2 {
            log::info!("--pin-workers: one CPU allowed, nothing to bind");
            return Ok(None);
        }
        let _ = ALLOWED.set(allowed);
        let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
        log::info!("workers bound to CPUs {} in turn", list.join(","));
        Ok(Some(Pinning { cpus }))
    }

    /// The CPU of worker `index`: the allowed CPUs in turn, so workers spread evenly.
    pub fn cpu_of(&self, index: usize) -> usize {
        self.cpus[index % self.cpus.len()]
    }
}

/// Binds the calling thread to `cpu`. A failure (the CPU left our cpuset since start) leaves
/// the thread free: binding only saves time.
pub fn bind_current_thread(cpu: usize) {
    let mut one = CpuSet::new();
    one.set(cpu);
    if let Err(e) = sched_setaffinity(None, &one) {
        log::warn!("could not bind a worker to CPU {cpu}: {e}");
    }
}

/// Gives a thread started by a bound worker every CPU the server had, so that only the
/// commands of requests and triggers are bound, not a background job's.
pub fn free_current_thread() {
    if let Some(allowed) = ALLOWED.get() {
        let _ = sched_setaffinity(None, allowed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_allowed_cpus_in_turn() {
        let pinning = Pinning {
            cpus: vec![2, 5, 7],
        };
        let cpus: Vec<usize> = (0..7).map(|i| pinning.cpu_of(i)).collect();
        assert_eq!(cpus, [2, 5, 7, 2, 5, 7, 2]);
    }
}
