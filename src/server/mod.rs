//! The event loop: one `mio::Poll` over the listeners, the connections, the workers' waker and
//! the stop source. Nothing here blocks: scripts, commands and file reads run on other
//! threads. The loop itself is here; `accept` takes connections, `drive` moves one
//! connection and its requests along, `stopping` handles deadlines, reloads and stops.
//! Admission is [`crate::gate`]'s, framing [`crate::protocol`]'s.

mod accept;
mod drive;
mod stopping;

use crate::auth::Tokens;
use crate::config::Config;
use crate::connection::{Connection, Phase, Rules, Step};
use crate::error::Outcome;
use crate::framing::RawRequest;
use crate::gate::{self, Facts, Gate, Knock};
use crate::metrics::metrics;
use crate::protocol::{Encoded, Protocol};
use crate::reload::ReloadTrigger;
use crate::request::{Endpoints, Request, ServerError, Verdict, log_request};
use crate::script::Runtime;
use crate::signals::Signal;
use crate::stop::Stop;
use crate::transport::{Accepted, Listener, Stream, is_per_connection_error};
use crate::workers::{ConnRef, Inbox, Job, Outbound, WorkerPool};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use stopping::Next;

/// The token of the `Waker` through which workers wake the loop.
pub const WAKER: Token = Token(usize::MAX);
/// The token of the [`Stop`] source (signals in the binary).
const STOP: Token = Token(usize::MAX - 1);
/// Listener `i` has token `LISTENER_BASE - i`; connections use their slab key.
const LISTENER_BASE: usize = usize::MAX - 2;

/// After an accept error such as EMFILE, how long before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// After the shutdown timeout has killed what was left, how long replies get to flush.
const FINAL_FLUSH: Duration = Duration::from_secs(3);
/// Streamed output queued for one slow client beyond which the client is dropped.
const MAX_PENDING_OUTPUT: usize = 4 << 20;
const READ_CHUNK: usize = 64 * 1024;
/// While requests are in flight, the longest the loop sleeps: a worker that sent its reply
/// itself on a connection that stays open does not wake the loop (`Worker::finish`), and the
/// loop settles such a request (counts it done, arms the read timeout) at its next turn.
const QUIET_SETTLE: Duration = Duration::from_millis(10);
/// Connections accepted per turn of the loop. Accepting until the queue is empty never ends
/// while a flood keeps it full, and starves the replies of requests already taken.
const ACCEPTS_PER_TURN: usize = 64;

/// Serves `listeners` until `stop` says so and the stop completes (see [`Server::run`]).
pub fn run(
    config: Config,
    listeners: Vec<Listener>,
    parts: Parts,
    stop: Box<dyn Stop>,
) -> io::Result<Outcome> {
    Server::new(config, listeners, parts, stop)?.run()
}

/// Everything else the loop needs that is built before it starts.
pub struct Parts {
    /// The loop's poll; its registry already holds the workers' waker (token [`WAKER`]).
    pub poll: Poll,
    /// The handler threads; requests are submitted here, and taken back at a stop.
    pub pool: WorkerPool,
    /// Where replies, live output and reloaded tokens come back from other threads.
    pub inbox: Inbox,
    /// The tokens read at start; reloads arrive through the inbox.
    pub tokens: Arc<Tokens>,
    /// What handlers and jobs share: the process groups a stop kills, the jobs it stops.
    pub runtime: Arc<Runtime>,
    /// SIGHUP: asks the reload thread to read the script and token files again.
    pub reload: ReloadTrigger,
}

/// Where a stop stands.
#[derive(Clone, Copy)]
enum Stopping {
    /// Handlers and jobs get until `kill_at`.
    Draining { kill_at: Instant },
    /// Their commands were killed; replies get until `give_up_at`.
    Flushing { give_up_at: Instant },
}

pub struct Server {
    /// Plain TCP, TLS and Unix listeners, in `--listen` order; emptied when a stop begins.
    listeners: Vec<Listener>,
    /// What tells the loop to reload or stop: the process's signals, or a `stop::Switch`.
    stop: Box<dyn Stop>,
    config: Config,
    parts: Parts,
    connections: Slab<Connection>,
    next_serial: u64,
    next_request_id: u64,
    /// Requests queued or running.
    in_flight: usize,
    /// (deadline, slab key, serial); one live entry per connection, see `Connection::timer`.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    accept_paused_until: Option<Instant>,
    /// Listeners that may hold more connections than one turn accepts (see `ACCEPTS_PER_TURN`).
    accept_more: Vec<usize>,
    /// Accepting fails (out of descriptors): warned about once until it works again.
    accept_failing: bool,
    stopping: Option<Stopping>,
    /// What `Connection::advance` needs of the configuration, copied once.
    rules: Rules,
    /// Admission: allow-list, caps, backoff, tokens, busy.
    gate: Gate,
    scratch: Vec<u8>,
}

impl Server {
    /// Registers the listeners and the stop source with the loop's poll.
    pub fn new(
        config: Config,
        mut listeners: Vec<Listener>,
        parts: Parts,
        mut stop: Box<dyn Stop>,
    ) -> io::Result<Server> {
        let registry = parts.poll.registry();
        for (index, listener) in listeners.iter_mut().enumerate() {
            registry.register(listener, Token(LISTENER_BASE - index), Interest::READABLE)?;
        }
        stop.register(registry, STOP)?;
        Ok(Server {
            listeners,
            stop,
            gate: Gate::new(gate::Policy::of(&config), parts.tokens.clone()),
            rules: Rules::of(&config),
            config,
            parts,
            connections: Slab::new(),
            next_serial: 0,
            next_request_id: 0,
            in_flight: 0,
            timers: BinaryHeap::new(),
            accept_paused_until: None,
            accept_more: Vec::new(),
            accept_failing: false,
            stopping: None,
            scratch: vec![0; READ_CHUNK],
        })
    }

    /// Serves until a stop completes: `Success` after a soft stop, `Signalled` after a
    /// second stop order ended it at once.
    pub fn run(mut self) -> io::Result<Outcome> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.accept_more.is_empty() {
                let timeout = self
                    .next_wake()
                    .map(|at| at.saturating_duration_since(Instant::now()));
                match self.in_flight {
                    0 => timeout,
                    _ => Some(timeout.map_or(QUIET_SETTLE, |t| t.min(QUIET_SETTLE))),
                }
            } else {
                Some(Duration::ZERO)
            };
            match self.parts.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // Replies sent quietly by workers, before the events they may have caused.
            self.take_worker_messages(false);
            for event in events.iter() {
                match event.token() {
                    WAKER => self.take_worker_messages(true),
                    STOP => {
                        if let Some(outcome) = self.on_stop_orders() {
                            return Ok(outcome);
                        }
                    }
                    Token(t) if t > LISTENER_BASE - self.listeners.len() => {
                        self.accept(LISTENER_BASE - t)
                    }
                    Token(key) => {
                        self.on_socket_event(key, event.is_read_closed() || event.is_error())
                    }
                }
            }
            let now = Instant::now();
            self.run_timers(now);
            for index in std::mem::take(&mut self.accept_more) {
                self.accept(index);
            }
            if let Next::Exit = self.check_stop(now) {
                return Ok(Outcome::Success);
            }
        }
    }

    /// The protocol of a reply to no particular request (a refusal, `100 Continue`).
    fn protocol(&self) -> Protocol {
        Protocol::new(self.config.framing, self.config.keep_alive, None)
    }

    fn next_wake(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, ..))| *at);
        let stop = self.stopping.map(|s| match s {
            Stopping::Draining { kill_at } => {
                kill_at.min(Instant::now() + Duration::from_millis(100))
            }
            Stopping::Flushing { give_up_at } => {
                give_up_at.min(Instant::now() + Duration::from_millis(100))
            }
        });
        [timer, self.accept_paused_until, stop]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The connection a worker message is for, unless it has closed since.
fn find(connections: &mut Slab<Connection>, conn: ConnRef) -> Option<&mut Connection> {
    connections
        .get_mut(conn.key)
        .filter(|c| c.serial == conn.serial)
}
