//! Named locks for `opts.lock`: commands naming the same lock run one at a time, in the order
//! they asked, across all workers and jobs. A waiter gives up at its deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

#[derive(Default)]
pub struct NamedLocks {
    /// Per lock name, the tickets in arrival order; the front one holds the lock.
    queues: Mutex<Lines>,
    changed: Condvar,
}

#[derive(Default)]
struct Lines {
    next_ticket: u64,
    by_name: HashMap<String, VecDeque<u64>>,
}

/// Holds a lock until dropped.
pub struct LockGuard<'a> {
    locks: &'a NamedLocks,
    name: String,
    ticket: u64,
}

impl NamedLocks {
    fn lines(&self) -> MutexGuard<'_, Lines> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `name` until `deadline`; `None` if the deadline came first.
    pub fn acquire(&self, name: &str, deadline: Instant) -> Option<LockGuard<'_>> {
        let mut lines = self.lines();
        lines.next_ticket += 1;
        let ticket = lines.next_ticket;
        lines
            .by_name
            .entry(name.to_owned())
            .or_default()
            .push_back(ticket);
        loop {
            if lines.by_name.get(name).and_then(|q| q.front()) == Some(&ticket) {
                return Some(LockGuard {
                    locks: self,
                    name: name.to_owned(),
                    ticket,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                leave(&mut lines, name, ticket);
                self.changed.notify_all();
                return None;
            }
            lines = self
                .changed
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn leave(lines: &mut Lines, name: &str, ticket: u64) {
    if let Some(queue) = lines.by_name.get_mut(name) {
        queue.retain(|t| *t != ticket);
        if queue.is_empty() {
            lines.by_name.remove(name);
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        leave(&mut self.locks.lines(), &self.name, self.ticket);
        self.locks.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn second_waiter_times_out_while_first_holds() {
        let locks = NamedLocks::default();
        let far = Instant::now() + Duration::from_secs(5);
        let held = locks.acquire("deploy", far).unwrap();
        assert!(
            locks
                .acquire("deploy", Instant::now() + Duration::from_millis(20))
                .is_none()
        );
        assert!(locks.acquire("other", far).is_some());
        drop(held);
        assert!(locks.acquire("deploy", far).is_some());
    }
}
