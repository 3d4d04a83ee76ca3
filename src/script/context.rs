//! What the script's functions know about the request they run for. Set by
//! [`ScriptHost::handle`](super::ScriptHost::handle) on the worker thread for the length of one
//! call, so registered functions need no extra argument and the frozen engine stays shared.

use super::budget;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Where `write()` and streamed command output go.
pub trait ClientSink: Send {
    /// Sends bytes to the client now. A client that is gone is not an error for the script.
    fn send(&mut self, bytes: Vec<u8>);

    /// HTTP: the trailer names the streamed response head announces (`Trailer:`). Only a
    /// response that has not started yet can take them; elsewhere they mean nothing.
    fn announce_trailers(&mut self, _names: Vec<String>) {}
}

pub struct HandlerContext {
    /// What the id numbers in log lines: `request`, or a local trigger (`watch`, `tick`).
    label: &'static str,
    request_id: u64,
    deadline: Instant,
    client: Box<dyn ClientSink>,
    exit_codes: Vec<i32>,
    /// What the thread held (by [`budget::net`]) when the handler started.
    memory_start: isize,
    /// How much more it may hold before the handler is stopped.
    memory_budget: usize,
}

impl HandlerContext {
    pub fn new(request_id: u64, deadline: Instant, client: Box<dyn ClientSink>) -> Self {
        HandlerContext {
            label: "request",
            request_id,
            deadline,
            client,
            exit_codes: Vec::new(),
            memory_start: budget::net(),
            memory_budget: usize::MAX,
        }
    }

    /// Sets the handler's memory budget, counted from now.
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.memory_start = budget::net();
        self.memory_budget = bytes;
        self
    }
}

impl HandlerContext {
    /// The context of an `on_change`/`on_tick` call: its log lines say `watch N` / `tick N`.
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }
}

thread_local! {
    static CURRENT: RefCell<Option<HandlerContext>> = const { RefCell::new(None) };
}

/// Clears the context when the call ends, even by panic.
pub struct ContextGuard(());

impl Drop for ContextGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

pub fn enter(context: HandlerContext) -> ContextGuard {
    CURRENT.with(|c| *c.borrow_mut() = Some(context));
    ContextGuard(())
}

fn with<T>(default: T, f: impl FnOnce(&mut HandlerContext) -> T) -> T {
    CURRENT.with(|c| match c.borrow_mut().as_mut() {
        Some(context) => f(context),
        None => default,
    })
}

pub fn request_id() -> u64 {
    with(0, |c| c.request_id)
}

pub fn deadline_passed() -> bool {
    with(false, |c| Instant::now() >= c.deadline)
}

/// Time left before the handler deadline; unlimited outside a handler.
pub fn time_left() -> Duration {
    with(Duration::MAX, |c| {
        c.deadline.saturating_duration_since(Instant::now())
    })
}

pub fn record_exit_code(code: i32) {
    with((), |c| c.exit_codes.push(code));
}

pub fn take_exit_codes() -> Vec<i32> {
    with(Vec::new(), |c| std::mem::take(&mut c.exit_codes))
}

/// The bytes leave for the event loop and are freed there, so they stop counting against the
/// budget: what the thread gained while sending, plus what was moved out.
pub fn send_to_client(bytes: Vec<u8>) {
    with((), |c| {
        let (before, moved) = (budget::net(), bytes.capacity() as isize);
        c.client.send(bytes);
        budget::handed_off(budget::net() - before + moved);
    });
}

/// Whether the handler holds more than its memory budget.
pub fn over_budget() -> bool {
    with(false, |c| {
        let budget = isize::try_from(c.memory_budget).unwrap_or(isize::MAX);
        budget::net().saturating_sub(c.memory_start) > budget
    })
}

pub fn announce_trailers(names: Vec<String>) {
    with((), |c| c.client.announce_trailers(names));
}

/// Logs a script message tagged with its request id.
pub fn log(level: log::Level, message: &str) {
    let (label, id) = with(("request", 0), |c| (c.label, c.request_id));
    log::log!(target: "script", level, "{label} {id}: {message}");
}
