//! Time and stopping: connection deadlines from the timer heap, reload and stop orders, the
//! soft stop that drains, and the hard stop after `--shutdown-timeout`.

use super::*;

impl Server {
    pub(super) fn run_timers(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.resume_accepting();
        }
        while let Some(Reverse((at, key, serial))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(connection) = find(&mut self.connections, ConnRef { key, serial }) else {
                continue;
            };
            if connection.timer != Some(at) {
                continue; // superseded by an earlier entry
            }
            connection.timer = None;
            match connection.deadline() {
                Some(deadline) if deadline <= now => self.close(key, "timed out"),
                _ => self.after_step(key),
            }
        }
    }

    /// Acts on reload and stop orders; returns how the run ended when it must end at once
    /// (a second stop order).
    pub(super) fn on_stop_orders(&mut self) -> Option<Outcome> {
        for signal in self.stop.pending() {
            match signal {
                Signal::Reload => self.parts.reload.reload_now(),
                Signal::Stop(number) if self.stopping.is_some() => {
                    log::warn!("second stop signal: exiting now");
                    self.parts
                        .runtime
                        .groups
                        .signal_all(rustix::process::Signal::KILL);
                    return Some(Outcome::Signalled(number));
                }
                Signal::Stop(_) => self.begin_stop(),
            }
        }
        None
    }

    pub(super) fn begin_stop(&mut self) {
        metrics().set_stopping();
        self.parts.runtime.stopping.store(true, Ordering::SeqCst);
        log::info!("shutting down: {} request(s) in progress", self.in_flight);
        let registry = self.parts.poll.registry();
        for listener in &mut self.listeners {
            let _ = registry.deregister(listener);
        }
        self.listeners.clear();
        self.stopping = Some(Stopping::Draining {
            kill_at: Instant::now() + self.config.shutdown_timeout,
        });
        self.parts.runtime.stop_jobs();
        for job in self.parts.pool.take_waiting() {
            self.in_flight -= 1;
            let reply = Protocol::of(&job.request).encode_error(ServerError::ShuttingDown);
            log_request(
                &job.request,
                Verdict::ShuttingDown,
                Instant::now(),
                reply.bytes.len(),
                &[],
            );
            self.on_reply(job.conn, reply);
        }
        let idle: Vec<usize> = self
            .connections
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Reading { .. }) && c.pending_output() == 0)
            .map(|(key, _)| key)
            .collect();
        idle.into_iter()
            .for_each(|key| self.close(key, "shutting down"));
    }

    pub(super) fn check_stop(&mut self, now: Instant) -> Next {
        let Some(stopping) = self.stopping else {
            return Next::Continue;
        };
        let finished =
            self.in_flight == 0 && self.connections.is_empty() && !self.parts.runtime.busy();
        match stopping {
            _ if finished => {
                log::info!("shut down cleanly");
                Next::Exit
            }
            Stopping::Draining { kill_at } if now >= kill_at => {
                log::warn!(
                    "shutdown timeout passed: killing {} command(s)",
                    self.parts.runtime.groups.len()
                );
                self.parts.runtime.abort.store(true, Ordering::SeqCst);
                self.parts
                    .runtime
                    .groups
                    .signal_all(rustix::process::Signal::KILL);
                self.stopping = Some(Stopping::Flushing {
                    give_up_at: now + FINAL_FLUSH,
                });
                Next::Continue
            }
            Stopping::Flushing { give_up_at } if now >= give_up_at => {
                log::warn!(
                    "exiting with {} connection(s) still open",
                    self.connections.len()
                );
                Next::Exit
            }
            _ => Next::Continue,
        }
    }
}

/// Whether the loop goes on after a turn.
pub(super) enum Next {
    Continue,
    Exit,
}
