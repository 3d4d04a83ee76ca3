//! The worker pool: threads that run `handle(req)` off the event loop, fed by a queue, and the outbox through which they hand replies (and live output) back to the loop.

use crate::auth::Tokens;
use crate::connection::ReplyWriter;
use crate::metrics::metrics;
use crate::placement::{self, Pinning};
use crate::protocol::{Encoded, Protocol};
use crate::request::{Reply, Request, ServerError, Verdict, log_request};
use crate::script::context::ClientSink;
use crate::script::{HandlerResult, ScriptHost};
use crate::trigger::{self, TriggerCall};
use mio::Waker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::Instant;

/// Names a connection across threads; the serial tells a reused slot from the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub key: usize,
    pub serial: u64,
}

/// What workers send back to the event loop.
pub enum Outbound {
    /// Bytes to send now (`write()`, streamed output); more will follow.
    Data { conn: ConnRef, bytes: Vec<u8> },
    /// The request is finished; this is the last of its bytes.
    Done { conn: ConnRef, reply: Encoded },
    /// Token files were read again.
    Tokens(Arc<Tokens>),
}

/// The sending half of the loop's inbox: a channel plus a wake of the loop's `poll`.
#[derive(Clone)]
pub struct Outbox {
    sender: Sender<Outbound>,
    waker: Arc<Waker>,
    /// Set while a wake is on its way, so a burst of messages costs one `wake()` syscall.
    wake_pending: Arc<AtomicBool>,
}

/// The loop's end of the outbox.
pub struct Inbox {
    receiver: Receiver<Outbound>,
    wake_pending: Arc<AtomicBool>,
}

pub fn outbox(waker: Arc<Waker>) -> (Outbox, Inbox) {
    let (sender, receiver) = mpsc::channel();
    let wake_pending = Arc::new(AtomicBool::new(false));
    (
        Outbox {
            sender,
            waker,
            wake_pending: wake_pending.clone(),
        },
        Inbox {
            receiver,
            wake_pending,
        },
    )
}

impl Outbox {
    pub fn send(&self, message: Outbound) {
        if self.sender.send(message).is_ok() {
            self.wake();
        }
    }

    /// Queues a message without waking the loop: it takes it on its next turn (see
    /// `Worker::finish`).
    fn send_quietly(&self, message: Outbound) {
        let _ = self.sender.send(message);
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst)
            && let Err(error) = self.waker.wake()
        {
            log::error!("waking the event loop: {error}");
        }
    }
}

impl Inbox {
    /// Everything sent so far; call on every wake, since wakes coalesce.
    pub fn drain(&self) -> impl Iterator<Item = Outbound> + '_ {
        self.wake_pending.store(false, Ordering::SeqCst);
        self.receiver.try_iter()
    }

    /// Everything sent so far, without consuming a wake: for messages sent quietly, taken
    /// when no wake came. A wake on its way still comes, and still counts as one (a worker
    /// sending meanwhile makes no second one).
    pub fn take(&self) -> impl Iterator<Item = Outbound> + '_ {
        self.receiver.try_iter()
    }
}

/// A request handed to the pool, with the connection its reply goes to.
pub struct Job {
    pub request: Request,
    pub conn: ConnRef,
    /// The socket, when the worker may write the reply to it itself.
    pub writer: Option<ReplyWriter>,
}

/// What a worker takes from the queue: a client's request, or a local trigger's call.
enum Task {
    Request(Job),
    Trigger(TriggerCall),
}

/// Requests waiting for a worker. The event loop bounds its length (`--queue`) and takes the
/// waiting ones back at shutdown; workers only hold the lock to pop, never while waiting.
///
/// The worker that went to sleep last is woken first. With a condition variable the one asleep
/// longest was, so with fast handlers every worker of the pool took turns: each slept after
/// about one request, woke cold, and (with the scheduler's credit for its long sleep) preempted
/// the event loop. Last-in-first-out keeps the same few workers warm and the rest asleep:
/// keep-alive W1 with the default 8 workers went from ~60 k to the ~95 k of 2 workers
/// (BENCHMARKS.md), with no change when all of them are busy.
#[derive(Default)]
struct JobQueue {
    state: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Task>,
    /// The workers parked waiting for a job, the most recent last. Under load none are, and
    /// a push then costs no wake-up system call at all.
    idle: Vec<Thread>,
    /// Workers unparked for a job and not yet running: while one is on its way, a push wakes
    /// nobody else; the woken one wakes the next if it finds more than its own job waiting.
    woken: usize,
}

impl Waiting {
    /// The next worker to wake, if jobs wait and none is on its way to them.
    fn sleeper_to_wake(&mut self) -> Option<Thread> {
        if self.jobs.is_empty() || self.woken > 0 {
            return None;
        }
        let worker = self.idle.pop()?;
        self.woken += 1;
        Some(worker)
    }
}

impl JobQueue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Task) {
        let mut state = self.lock();
        state.jobs.push_back(job);
        let sleeper = state.sleeper_to_wake();
        drop(state);
        if let Some(worker) = sleeper {
            worker.unpark();
        }
    }

    fn pop(&self) -> Task {
        let me = thread::current();
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                let next = state.sleeper_to_wake();
                drop(state);
                if let Some(worker) = next {
                    worker.unpark();
                }
                metrics().queue_depth.dec();
                return job;
            }
            state.idle.push(me.clone());
            drop(state);
            // An unpark between the unlock and here is not lost: park then returns at once.
            thread::park();
            state = self.lock();
            let listed = state.idle.len();
            state.idle.retain(|idle| idle.id() != me.id());
            if state.idle.len() == listed {
                // Unlisted by the pusher that woke us (else park returned spuriously).
                state.woken = state.woken.saturating_sub(1);
            }
        }
    }
}

pub struct WorkerPool {
    queue: Arc<JobQueue>,
}

impl WorkerPool {
    /// Starts `workers` threads, each bound to its CPU of `pinning` when there is one.
    pub fn start(
        workers: usize,
        pinning: Option<Pinning>,
        host: Arc<ScriptHost>,
        outbox: Outbox,
    ) -> std::io::Result<WorkerPool> {
        let queue = Arc::new(JobQueue::default());
        for index in 0..workers {
            let worker = Worker {
                queue: queue.clone(),
                host: host.clone(),
                outbox: outbox.clone(),
            };
            let cpu = pinning.as_ref().map(|pinning| pinning.cpu_of(index));
            thread::Builder::new()
                .name(format!("worker-{index}"))
                .stack_size(crate::script::SCRIPT_STACK_BYTES)
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        placement::bind_current_thread(cpu);
                    }
                    worker.run()
                })?;
        }
        Ok(WorkerPool { queue })
    }

    pub fn submit(&self, job: Job) {
        metrics().queue_depth.inc();
        self.queue.push(Task::Request(job));
    }

    /// Where the watcher and the scheduler queue their calls.
    pub fn trigger_queue(&self) -> TriggerQueue {
        TriggerQueue {
            queue: self.queue.clone(),
        }
    }

    /// Takes back every request no worker has started. Trigger calls still waiting are
    /// dropped (and logged): a stop starts no new script.
    pub fn take_waiting(&self) -> Vec<Job> {
        let waiting: Vec<Task> = self.queue.lock().jobs.drain(..).collect();
        metrics().queue_depth.dec_by(waiting.len() as i64);
        let mut requests = Vec::new();
        for task in waiting {
            match task {
                Task::Request(job) => requests.push(job),
                Task::Trigger(call) => log::info!(
                    trigger = call.kind.as_str();
                    "{} {} {} skipped: shutting down",
                    call.kind.as_str(), call.id, call.what
                ),
            }
        }
        requests
    }
}

/// Queues trigger calls on the worker pool, from the watcher and scheduler threads.
#[derive(Clone)]
pub struct TriggerQueue {
    queue: Arc<JobQueue>,
}

impl TriggerQueue {
    pub fn submit(&self, call: TriggerCall) {
        metrics().queue_depth.inc();
        self.queue.push(Task::Trigger(call));
    }
}

/// Counts a worker as busy for as long as it lives (panics included).
struct BusyWorker;

impl BusyWorker {
    fn enter() -> BusyWorker {
        metrics().busy_workers.inc();
        BusyWorker
    }
}

impl Drop for BusyWorker {
    fn drop(&mut self) {
        metrics().busy_workers.dec();
    }
}

struct Worker {
    queue: Arc<JobQueue>,
    host: Arc<ScriptHost>,
    outbox: Outbox,
}

impl Worker {
    fn run(self) {
        loop {
            let job = match self.queue.pop() {
                Task::Request(job) => job,
                Task::Trigger(call) => {
                    self.run_trigger(call);
                    continue;
                }
            };
            let _busy = BusyWorker::enter();
            let streamed = Arc::new(AtomicBool::new(false));
            let serve =
                std::panic::AssertUnwindSafe(|| self.serve(&job.request, job.conn, &streamed));
            let reply = std::panic::catch_unwind(serve).unwrap_or_else(|_| {
                log::error!("request {} failed: internal error (panic)", job.request.id);
                Reply::error(ServerError::HandlerFailed(job.request.id))
            });
            let streamed = streamed.load(Ordering::SeqCst);
            let protocol = Protocol::of(&job.request);
            let reply = match streamed {
                true => protocol.encode_end(reply),
                false => protocol.encode_reply(reply),
            };
            // Live output went through the loop, which may still hold some of it: then the
            // reply must follow it there.
            let writer = job.writer.filter(|_| !streamed);
            self.finish(job.conn, reply, writer);
        }
    }

    /// Sends the reply, itself when it may (the connection stays open after it), and tells the
    /// loop, which settles the connection (reads on, or closes) and sends what the socket did
    /// not take. A reply that went out whole on a connection that stays open needs no wake:
    /// the loop learns of it on its next turn, or at once when the client's next request (or
    /// close) arrives. That saves the second thread hand-off of a keep-alive request: its wake
    /// system call, and the loop's extra turn.
    fn finish(&self, conn: ConnRef, mut reply: Encoded, writer: Option<ReplyWriter>) {
        // A reply that ends the connection goes through the loop, which sends it and shuts
        // the socket down back to back, so the client sees the end with the data.
        let Some(writer) = writer.filter(|_| !reply.close) else {
            return self.outbox.send(Outbound::Done { conn, reply });
        };
        writer.write_now(&mut reply.bytes);
        if !writer.may_go_quietly(reply.bytes.len()) {
            return self.outbox.send(Outbound::Done { conn, reply });
        }
        self.outbox.send_quietly(Outbound::Done { conn, reply });
        if writer.mark_done() {
            self.outbox.wake();
        }
    }

    fn run_trigger(&self, call: TriggerCall) {
        let _busy = BusyWorker::enter();
        let (kind, id) = (call.kind, call.id);
        let run = std::panic::AssertUnwindSafe(|| trigger::run(&self.host, call));
        if std::panic::catch_unwind(run).is_err() {
            log::error!("{} {id} failed: internal error (panic)", kind.as_str());
        }
    }

    fn serve(&self, request: &Request, conn: ConnRef, streamed: &Arc<AtomicBool>) -> Reply {
        let started = Instant::now();
        let client = Box::new(ConnectionSink {
            conn,
            outbox: self.outbox.clone(),
            protocol: Protocol::of(request),
            streamed: streamed.clone(),
            trailer_names: Vec::new(),
        });
        let (result, exit_codes) = self.host.handle(request, client);
        let id = request.id;
        let (reply, verdict) = match result {
            HandlerResult::Replied(reply) => (reply, Verdict::Ok),
            HandlerResult::Failed(message) => {
                log::error!("request {id} failed: {message}");
                (
                    Reply::error(ServerError::HandlerFailed(id)),
                    Verdict::Failed,
                )
            }
            HandlerResult::TimedOut => {
                log::error!("request {id} timed out");
                (
                    Reply::error(ServerError::HandlerTimedOut(id)),
                    Verdict::TimedOut,
                )
            }
        };
        log_request(request, verdict, started, reply.bytes.len(), &exit_codes);
        reply
    }
}

/// Sends a handler's live output to its connection through the loop.
struct ConnectionSink {
    conn: ConnRef,
    outbox: Outbox,
    /// How live output is framed (HTTP: as the chunked body of a `200` response).
    protocol: Protocol,
    /// Set once live output has gone to the loop: HTTP, the response has started, so the final
    /// reply only ends it; any framing, the reply must follow that output through the loop.
    streamed: Arc<AtomicBool>,
    /// What `announce_trailers` named, for the head of the streamed response.
    trailer_names: Vec<String>,
}

impl ClientSink for ConnectionSink {
    fn send(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let first = !self.streamed.swap(true, Ordering::SeqCst);
        let bytes = self
            .protocol
            .encode_live(&bytes, first, &self.trailer_names);
        self.outbox.send(Outbound::Data {
            conn: self.conn,
            bytes,
        });
    }

    fn announce_trailers(&mut self, names: Vec<String>) {
        self.trailer_names = names;
    }
}
