//! The event loop: one `mio::Poll` that accepts connections, reads and frames requests,
//! checks tokens, hands requests to the workers, writes replies, enforces timeouts, and stops
//! cleanly. Nothing here blocks: scripts, commands and file reads run on other threads.

use crate::auth::Tokens;
use crate::config::Config;
use crate::connection::{Connection, Phase, Rules, Step};
use crate::error::Outcome;
use crate::framing::RawRequest;
use crate::gate::{self, Facts, Gate, Knock};
use crate::http::{self, HttpHead};
use crate::metrics::metrics;
use crate::protocol::{Encoded, Protocol};
use crate::reload::ReloadTrigger;
use crate::request::{Endpoints, Request, ServerError, Verdict, log_request};
use crate::script::Runtime;
use crate::signals::Signal;
use crate::stop::Stop;
use crate::workers::{ConnRef, Inbox, Job, Outbound, WorkerPool};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
/// Connections accepted per turn of the loop. Accepting until the queue is empty never ends
/// while a flood keeps it full, and starves the replies of requests already taken.
const ACCEPTS_PER_TURN: usize = 64;

/// Everything the loop needs that is built before it starts.
pub struct Parts {
    /// The loop's poll; its registry already holds the workers' waker (token [`WAKER`]).
    pub poll: Poll,
    /// The bound listeners, in `--listen` order; registered by [`Server::new`].
    pub listeners: Vec<TcpListener>,
    /// What tells the loop to reload or stop: the process's signals, or a `stop::Switch`.
    pub stop: Box<dyn Stop + Send>,
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

enum Next {
    Continue,
    Exit,
}

impl Server {
    pub fn new(config: Config, mut parts: Parts) -> io::Result<Server> {
        let registry = parts.poll.registry();
        for (index, listener) in parts.listeners.iter_mut().enumerate() {
            registry.register(listener, Token(LISTENER_BASE - index), Interest::READABLE)?;
        }
        parts.stop.register(registry, STOP)?;
        Ok(Server {
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

    /// Serves until a stop completes. Returns the exit status.
    pub fn run(mut self) -> io::Result<Outcome> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.accept_more.is_empty() {
                self.next_wake()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            match self.parts.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.take_worker_messages(),
                    STOP => {
                        if let Some(outcome) = self.on_stop_orders() {
                            return Ok(outcome);
                        }
                    }
                    Token(t) if t > LISTENER_BASE - self.parts.listeners.len() => {
                        self.accept(LISTENER_BASE - t)
                    }
                    Token(key) => self.drive(key),
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
    fn protocol(&self, head: Option<&HttpHead>) -> Protocol {
        Protocol::new(self.config.framing, self.config.keep_alive, head)
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

    // ---- accepting ----

    fn accept(&mut self, index: usize) {
        if self.accept_paused_until.is_some() || self.stopping.is_some() {
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.parts.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut self.accept_failing) {
                        log::info!("accepting connections again");
                    }
                    self.admit(stream, peer)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning on a ready listener, and
                    // warn once per episode rather than ten times a second.
                    if std::mem::replace(&mut self.accept_failing, true) {
                        log::debug!("accepting a connection: {e}; still pausing");
                    } else {
                        log::warn!(
                            "accepting a connection: {e}; pausing accepts for {ACCEPT_PAUSE:?} at a time"
                        );
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
        // More may be queued, and with edge triggers no new event will say so: take them next
        // turn, after the replies and reads this turn's events brought.
        if !self.accept_more.contains(&index) {
            self.accept_more.push(index);
        }
    }

    fn resume_accepting(&mut self) {
        self.accept_paused_until = None;
        for index in 0..self.parts.listeners.len() {
            self.accept(index);
        }
    }

    fn admit(&mut self, stream: mio::net::TcpStream, peer: SocketAddr) {
        let facts = self.facts(peer.ip(), Instant::now());
        if let Err(refusal) = self.gate.admit(Knock::Connection, &facts) {
            return self.refuse_connection(stream, peer, refusal);
        }
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(e) => return log::debug!("dropping {peer}: {e}"),
        };
        self.gate.opened(peer.ip());
        let _ = stream.set_nodelay(true);
        self.next_serial += 1;
        let phase = Phase::Reading {
            deadline: Instant::now() + self.config.read_timeout,
        };
        let connection =
            Connection::new(stream, Endpoints::new(peer, local), self.next_serial, phase);
        let key = self.connections.insert(connection);
        metrics().open_connections.inc();
        if let Err(e) = self.connections[key].register(self.parts.poll.registry(), Token(key)) {
            log::warn!("registering connection from {peer}: {e}");
            self.connections.remove(key);
            metrics().open_connections.dec();
            self.gate.closed(peer.ip());
            return;
        }
        log::debug!("connection from {peer}");
        // Data may already be there; with edge triggers we will not hear of it again.
        self.drive(key);
    }

    /// What the gate weighs besides the request itself.
    fn facts(&self, peer: IpAddr, now: Instant) -> Facts {
        Facts {
            peer,
            now,
            open_connections: self.connections.len(),
            in_flight: self.in_flight,
            stopping: self.stopping.is_some(),
        }
    }

    /// Answers a connection there is no room for with `ERR busy` (HTTP: 503), then closes it.
    /// A silent close would read as a handler that replied nothing, and `send --all` would count
    /// a full server as a success. The connection never enters the slab, so a flood of them
    /// costs no memory: what the client sent already is read and dropped (unread input would
    /// turn the close into a reset); input arriving later does get a reset, after the reply.
    fn refuse_connection(
        &mut self,
        mut stream: mio::net::TcpStream,
        peer: SocketAddr,
        refusal: gate::Refusal,
    ) {
        if let Some(counted) = refusal.counted {
            metrics().record_refusal(counted);
        }
        let Some(answer) = refusal.answer else {
            log::debug!("refusing {peer}: not in --allow");
            return; // dropping the stream closes it, without a reply
        };
        if let Some(counted) = refusal.counted {
            log::debug!("refusing {peer}: --{} reached", counted.as_str());
        }
        let reply = self.protocol(None).encode_error(answer);
        // A fresh socket's send buffer takes these few bytes whole.
        let _ = stream.write(&reply.bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        for _ in 0..4 {
            match stream.read(&mut self.scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    // ---- driving one connection ----

    /// Moves a connection as far as it can go without blocking, then closes it if it is done.
    fn drive(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let result = connection.advance(&self.rules, &mut self.scratch);
        match result {
            Ok(Step::Wait) => self.after_step(key),
            Ok(Step::Dispatch(raw)) => {
                self.dispatch(key, raw);
                self.drive(key);
            }
            Ok(Step::WantsContinue) => self.on_expect_continue(key),
            Ok(Step::Close(why)) => self.close(key, why),
            Err(e) => self.close(key, &format!("I/O error: {e}")),
        }
    }

    /// The client waits for `100 Continue` before sending its body. It is said only once the
    /// token passed (SPEC §10): a wrong token is answered 401 (429 when backed off) at once,
    /// from the head alone, and the body is never asked for.
    fn on_expect_continue(&mut self, key: usize) {
        let connection = &self.connections[key];
        let head = http::parse_head(&connection.input);
        let facts = self.facts(connection.endpoints.peer.ip(), Instant::now());
        if self
            .gate
            .admit(Knock::Continue(head.as_ref()), &facts)
            .is_err()
        {
            self.connections[key].input.clear();
            let raw = RawRequest {
                http: head,
                ..RawRequest::default()
            };
            // Answered as a request, refused, and closed: the unsent body is drained, never
            // read as another request.
            self.dispatch(key, raw);
        } else {
            let protocol = self.protocol(None);
            let connection = &mut self.connections[key];
            connection.continue_sent = true;
            connection.push_output(protocol.continue_bytes());
        }
        self.drive(key);
    }

    fn after_step(&mut self, key: usize) {
        let registry = self.parts.poll.registry();
        let connection = &mut self.connections[key];
        if let Err(e) = connection.update_interest(registry, Token(key)) {
            return self.close(key, &format!("re-registering: {e}"));
        }
        connection.shrink_buffers();
        if let Some(deadline) = connection.deadline()
            && connection.timer.is_none_or(|armed| deadline < armed)
        {
            connection.timer = Some(deadline);
            self.timers
                .push(Reverse((deadline, key, connection.serial)));
        }
    }

    fn close(&mut self, key: usize, why: &str) {
        let mut connection = self.connections.remove(key);
        if connection.pending_output() > 0 {
            connection.reset_on_drop(); // a timed-out or too slow reader gets no partial reply
        }
        metrics().open_connections.dec();
        self.gate.closed(connection.endpoints.peer.ip());
        connection.deregister(self.parts.poll.registry());
        log::debug!(
            "closed connection from {}: {why}",
            connection.endpoints.peer
        );
    }

    // ---- requests ----

    fn dispatch(&mut self, key: usize, raw: RawRequest) {
        self.next_request_id += 1;
        self.connections[key].continue_sent = false;
        let peer = self.connections[key].endpoints.peer.ip();
        let facts = self.facts(peer, Instant::now());
        let who = self.gate.identify(&raw, facts.peer, facts.now);
        let request = Request {
            id: self.next_request_id,
            token_name: who.token_name,
            payload: who.payload,
            body: raw.body,
            endpoints: self.connections[key].endpoints.clone(),
            framing: self.config.framing,
            keep_alive: self.config.keep_alive,
            http: raw.http,
        };
        let knock = Knock::Request {
            token_name: request.token_name.as_deref(),
        };
        if let Err(refusal) = self.gate.admit(knock, &facts) {
            return self.refuse_request(key, &request, refusal, facts.now);
        }
        let connection = &mut self.connections[key];
        connection.phase = Phase::Handling;
        self.in_flight += 1;
        let conn = ConnRef {
            key,
            serial: connection.serial,
        };
        self.parts.pool.submit(Job { request, conn });
    }

    /// Answers a request the gate turned away, logs it, and closes after the answer.
    fn refuse_request(
        &mut self,
        key: usize,
        request: &Request,
        refusal: gate::Refusal,
        now: Instant,
    ) {
        if let Some(counted) = refusal.counted {
            metrics().record_refusal(counted);
        }
        let error = refusal.answer.unwrap_or(ServerError::Unauthorized);
        let reply = Protocol::of(request).encode_error(error);
        log_request(request, refusal.verdict, now, reply.bytes.len(), &[]);
        let read_timeout = self.config.read_timeout;
        self.connections[key].answer(reply, true, read_timeout);
    }

    fn take_worker_messages(&mut self) {
        let messages: Vec<Outbound> = self.parts.inbox.drain().collect();
        for message in messages {
            match message {
                Outbound::Data { conn, bytes } => self.on_live_output(conn, &bytes),
                Outbound::Done { conn, reply } => {
                    self.in_flight -= 1;
                    self.on_reply(conn, reply);
                }
                Outbound::Tokens(tokens) => self.gate.set_tokens(tokens),
            }
        }
    }

    fn on_live_output(&mut self, conn: ConnRef, bytes: &[u8]) {
        let Some(connection) = find(&mut self.connections, conn) else {
            return;
        };
        connection.push_output(bytes);
        if connection.pending_output() > MAX_PENDING_OUTPUT {
            // The handler keeps running; only this slow reader is let go.
            return self.close(conn.key, "client reads too slowly for streamed output");
        }
        self.drive(conn.key);
    }

    fn on_reply(&mut self, conn: ConnRef, reply: Encoded) {
        let stopping = self.stopping.is_some();
        let Some(connection) = find(&mut self.connections, conn) else {
            return;
        };
        connection.answer(reply, stopping, self.config.read_timeout);
        self.drive(conn.key);
    }

    // ---- timers ----

    fn run_timers(&mut self, now: Instant) {
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

    // ---- signals and stopping ----

    /// Acts on reload and stop orders; returns how the run ended when it must end at once
    /// (a second stop order).
    fn on_stop_orders(&mut self) -> Option<Outcome> {
        for signal in self.parts.stop.pending() {
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

    fn begin_stop(&mut self) {
        metrics().set_stopping();
        self.parts.runtime.stopping.store(true, Ordering::SeqCst);
        log::info!("shutting down: {} request(s) in progress", self.in_flight);
        let registry = self.parts.poll.registry();
        for listener in &mut self.parts.listeners {
            let _ = registry.deregister(listener);
        }
        self.parts.listeners.clear();
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

    fn check_stop(&mut self, now: Instant) -> Next {
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

/// The connection a worker message is for, unless it has closed since.
fn find(connections: &mut Slab<Connection>, conn: ConnRef) -> Option<&mut Connection> {
    connections
        .get_mut(conn.key)
        .filter(|c| c.serial == conn.serial)
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
