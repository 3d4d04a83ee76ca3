//! `--every DUR` and `--cron EXPR`: one thread per schedule that hands `on_tick(tick)` calls to
//! the worker pool at the scheduled times (SPEC §13).
//!
//! Times are computed from a fixed origin (tick `n` of `--every D` is due at start + n·D), never
//! as "sleep D after the last one", so lateness does not add up over many ticks. A tick that
//! finds the previous one of its schedule still queued or running is skipped and logged: a slow
//! housekeeping job never piles up copies of itself.

use crate::error::ConfigError;
use crate::trigger::{Kind, Triggers};
use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use rhai::{Dynamic, Map};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// The longest single sleep, so a stop is noticed and a wall-clock jump is corrected soon.
const MAX_SLEEP: Duration = Duration::from_millis(250);

/// One validated schedule.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// `--every DUR`: ticks at start + n·DUR.
    Every(Duration),
    /// `--cron EXPR`: the expression as given (for logs and `tick.schedule`) and its parse.
    Cron(String, Box<Cron>),
}

impl Schedule {
    /// `--every`: a zero period would tick without end.
    pub fn every(period: Duration) -> Result<Schedule, ConfigError> {
        if period.is_zero() {
            return Err(ConfigError::Zero { flag: "--every" });
        }
        Ok(Schedule::Every(period))
    }

    /// `--cron`: exactly five fields (minute hour day-of-month month day-of-week), evaluated in
    /// UTC. An expression that never fires (`0 0 31 2 *`) is refused too.
    pub fn cron(expr: &str) -> Result<Schedule, ConfigError> {
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expr).map_err(|e| ConfigError::Cron {
            expr: expr.to_owned(),
            reason: e.to_string(),
            fires: true,
        })?;
        let now: DateTime<Utc> = SystemTime::now().into();
        cron.find_next_occurrence(&now, false)
            .map_err(|e| ConfigError::Cron {
                expr: expr.to_owned(),
                reason: e.to_string(),
                fires: false,
            })?;
        Ok(Schedule::Cron(expr.to_owned(), Box::new(cron)))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(period) => write!(f, "every {}", humantime::format_duration(*period)),
            Schedule::Cron(expr, _) => write!(f, "cron {expr}"),
        }
    }
}

/// Starts one thread per schedule. They end when the server stops.
pub fn spawn(schedules: &[Schedule], triggers: &Triggers) -> std::io::Result<()> {
    for (index, schedule) in schedules.iter().enumerate() {
        let ticker = Ticker {
            schedule: schedule.clone(),
            triggers: triggers.clone(),
            running: Arc::new(AtomicBool::new(false)),
            n: 0,
        };
        thread::Builder::new()
            .name(format!("schedule-{index}"))
            .spawn(move || ticker.run())?;
    }
    Ok(())
}

struct Ticker {
    schedule: Schedule,
    triggers: Triggers,
    /// Set from submission until the `on_tick` call ends (or is dropped at shutdown).
    running: Arc<AtomicBool>,
    /// Ticks due so far, skipped ones included, so `n` tells how far along the schedule is.
    n: u64,
}

impl Ticker {
    fn run(mut self) {
        log::info!("schedule: on_tick {}", self.schedule);
        match self.schedule.clone() {
            Schedule::Every(period) => self.run_every(period),
            Schedule::Cron(_, cron) => self.run_cron(&cron),
        }
    }

    fn run_every(&mut self, period: Duration) {
        let origin = Instant::now();
        let wall_origin = SystemTime::now();
        let mut due_index: u32 = 1;
        loop {
            let Some(offset) = period.checked_mul(due_index) else {
                return;
            };
            if !sleep_until(
                || (origin + offset).checked_duration_since(Instant::now()),
                &self.triggers,
            ) {
                return;
            }
            // Woken long after (the process was stopped): the ticks in between are missed, not
            // run in a rush.
            let behind = (origin.elapsed().as_nanos() / period.as_nanos()) as u32;
            if behind > due_index {
                let missed = behind - due_index;
                self.n += u64::from(missed);
                log::warn!(
                    "schedule {}: skipped {missed} missed tick(s)",
                    self.schedule
                );
                crate::metrics::metrics().record_trigger(Kind::Tick, "skipped");
                due_index = behind;
            }
            let Some(offset) = period.checked_mul(due_index) else {
                return;
            };
            self.tick(wall_origin + offset);
            due_index += 1;
        }
    }

    fn run_cron(&mut self, cron: &Cron) {
        let mut after: DateTime<Utc> = SystemTime::now().into();
        loop {
            let next = match cron.find_next_occurrence(&after, false) {
                Ok(next) => next,
                Err(e) => {
                    log::error!("schedule {}: no next time: {e}", self.schedule);
                    return;
                }
            };
            let due = SystemTime::from(next);
            let left = || due.duration_since(SystemTime::now()).ok();
            if !sleep_until(left, &self.triggers) {
                return;
            }
            self.tick(due);
            // Counting on from the due time keeps the schedule exact; but after a stall (the
            // process was stopped, the clock jumped) the times already past are missed, not
            // run one after another now.
            let now: DateTime<Utc> = SystemTime::now().into();
            after = if cron
                .find_next_occurrence(&next, false)
                .is_ok_and(|t| t < now)
            {
                log::warn!("schedule {}: skipped missed tick(s)", self.schedule);
                crate::metrics::metrics().record_trigger(Kind::Tick, "skipped");
                now
            } else {
                next
            };
        }
    }

    /// Hands one `on_tick` call to the pool, unless the previous one is still at it.
    fn tick(&mut self, at: SystemTime) {
        self.n += 1;
        if self.running.load(Ordering::SeqCst) {
            log::warn!(
                trigger = "tick", n = self.n;
                "tick {} of {} skipped: the previous tick is still running",
                self.n, self.schedule
            );
            crate::metrics::metrics().record_trigger(Kind::Tick, "skipped");
            return;
        }
        let mut tick = Map::new();
        tick.insert(
            "at".into(),
            humantime::format_rfc3339_millis(at).to_string().into(),
        );
        tick.insert("n".into(), Dynamic::from(self.n as i64));
        tick.insert("schedule".into(), self.schedule.to_string().into());
        let what = format!("n={} schedule=\"{}\"", self.n, self.schedule);
        self.triggers
            .submit(Kind::Tick, tick, what, self.running.clone(), None);
    }
}

/// Sleeps until `left()` says no time is left. False when the server began to stop.
fn sleep_until(left: impl Fn() -> Option<Duration>, triggers: &Triggers) -> bool {
    loop {
        if triggers.stopping() {
            return false;
        }
        match left() {
            Some(wait) if !wait.is_zero() => thread::sleep(wait.min(MAX_SLEEP)),
            _ => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_takes_five_fields_only() {
        assert!(Schedule::cron("*/5 * * * *").is_ok());
        assert!(Schedule::cron("0 3 * * MON-FRI").is_ok());
        assert!(Schedule::cron("* * * *").is_err());
        assert!(Schedule::cron("0 * * * * *").is_err());
        assert!(Schedule::cron("61 * * * *").is_err());
        assert!(Schedule::cron("not a cron").is_err());
    }

    #[test]
    fn every_refuses_zero() {
        assert!(Schedule::every(Duration::ZERO).is_err());
        assert_eq!(
            Schedule::every(Duration::from_secs(90))
                .map(|s| s.to_string())
                .ok(),
            Some("every 1m 30s".to_owned())
        );
    }
}
