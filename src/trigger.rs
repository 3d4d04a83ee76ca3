//! Local triggers (SPEC §13): what the watcher and the scheduler hand to the worker pool, and
//! how a worker runs it: `on_change(event)` or `on_tick(tick)` under `--handler-timeout`, logged
//! and counted like a request, with `trigger="watch"|"tick"`.
//!
//! The watcher and scheduler threads never run a script themselves: they only queue a call, so
//! the same `--workers` bound, the same limits and the same shutdown apply to every kind of work.

use crate::runtime::Runtime;
use crate::script::context::ClientSink;
use crate::script::{HandlerResult, ScriptHost};
use crate::workers::TriggerQueue;
use rhai::Map;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What started a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Watch,
    Tick,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Watch, Kind::Tick];

    /// The `trigger` label of logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Watch => "watch",
            Kind::Tick => "tick",
        }
    }

    /// The script function this kind calls.
    pub fn function(self) -> &'static str {
        match self {
            Kind::Watch => "on_change",
            Kind::Tick => "on_tick",
        }
    }
}

/// One queued `on_change` / `on_tick` call.
pub struct TriggerCall {
    pub kind: Kind,
    /// Numbers the calls of one kind from 1; log lines say `watch N` / `tick N`.
    pub id: u64,
    /// The `event` or `tick` map.
    pub argument: Map,
    /// What the log line says about the call (`path=... kind=...`, `n=...`).
    pub what: String,
    /// Released when the call ends, whether it ran, failed or was dropped at shutdown.
    pub in_flight: InFlight,
}

/// Marks a trigger source busy, and the runtime busy for shutdown, while its call is queued or
/// running. Dropping it (the call ended, or a stop took it out of the queue) clears both.
pub struct InFlight {
    running: Arc<AtomicBool>,
    runtime: Arc<Runtime>,
    /// Tells the source it may hand on what it held back meanwhile.
    on_done: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        self.runtime.triggers_running.fetch_sub(1, Ordering::SeqCst);
        if let Some(on_done) = self.on_done.take() {
            on_done();
        }
    }
}

/// The handle watcher and scheduler threads queue calls through.
#[derive(Clone)]
pub struct Triggers {
    queue: TriggerQueue,
    runtime: Arc<Runtime>,
    /// The last id given, per kind (in `Kind::ALL` order).
    next_id: Arc<[AtomicU64; 2]>,
}

impl Triggers {
    pub fn new(queue: TriggerQueue, runtime: Arc<Runtime>) -> Triggers {
        Triggers {
            queue,
            runtime,
            next_id: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// Whether the server is stopping: then no new call is queued.
    pub fn stopping(&self) -> bool {
        self.runtime.stopping.load(Ordering::SeqCst)
    }

    /// Queues a call of `kind`'s function with `argument`. `running` must be false (the caller
    /// checked); it is set now and cleared when the call ends, then `on_done` runs.
    pub fn submit(
        &self,
        kind: Kind,
        argument: Map,
        what: String,
        running: Arc<AtomicBool>,
        on_done: Option<Box<dyn FnOnce() + Send>>,
    ) {
        if self.stopping() {
            log::info!(trigger = kind.as_str(); "{} {what} skipped: shutting down", kind.as_str());
            return;
        }
        running.store(true, Ordering::SeqCst);
        self.runtime.triggers_running.fetch_add(1, Ordering::SeqCst);
        let in_flight = InFlight {
            running,
            runtime: self.runtime.clone(),
            on_done,
        };
        let id = self.next_id[kind as usize].fetch_add(1, Ordering::SeqCst) + 1;
        self.queue.submit(TriggerCall {
            kind,
            id,
            argument,
            what,
            in_flight,
        });
    }
}

/// Where `write()` and streamed output of a trigger call go: there is no client, so the log.
struct LogSink {
    kind: Kind,
    id: u64,
}

/// Bytes of a call's output shown per log line.
const OUTPUT_SHOWN: usize = 512;

impl ClientSink for LogSink {
    fn send(&mut self, bytes: Vec<u8>) {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_SHOWN)]).into_owned();
        log::debug!(
            "{} {} output: {}",
            self.kind.as_str(),
            self.id,
            text.trim_end()
        );
    }
}

/// Runs one call on this (worker) thread and logs its one line.
pub fn run(host: &ScriptHost, call: TriggerCall) {
    let started = Instant::now();
    let sink = Box::new(LogSink {
        kind: call.kind,
        id: call.id,
    });
    let label = call.kind.as_str();
    let (result, exit_codes) =
        host.call_trigger(call.kind.function(), call.argument, label, call.id, sink);
    let outcome = match result {
        HandlerResult::Replied(_) => "ok",
        HandlerResult::Failed(message) => {
            log::error!("{label} {} failed: {message}", call.id);
            "failed"
        }
        HandlerResult::TimedOut => {
            log::error!("{label} {} timed out", call.id);
            "timed-out"
        }
    };
    crate::metrics::metrics().record_trigger(call.kind, outcome);
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    log::info!(
        trigger = label,
        trigger_id = call.id,
        outcome = outcome,
        duration_ms = duration_ms,
        exit_codes:? = exit_codes;
        "{label} {} {} outcome={outcome} duration={duration_ms:.1}ms commands={exit_codes:?}",
        call.id, call.what
    );
    drop(call.in_flight);
}
