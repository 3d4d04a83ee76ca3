//! The event loop: one `mio::Poll` that accepts connections, reads and frames requests,
//! checks tokens, hands requests to the workers, writes replies, enforces timeouts, and stops
//! cleanly. Nothing here blocks: scripts, commands and file reads run on other threads.

use crate::auth::Tokens;
use crate::backoff::AuthBackoff;
use crate::cli::AuthMode;
use crate::config::Config;
use crate::connection::{Connection, Filled, Phase};
use crate::framing::{self, Frame, Framing, RawRequest};
use crate::http::{self, HttpHead};
use crate::metrics::{Refusal, metrics};
use crate::reload::ReloadTrigger;
use crate::request::{Endpoints, Reply, Request, ServerError, Verdict};
use crate::script::Runtime;
use crate::signals::{Signal, SignalSource};
use crate::transport::{Accepted, Listener, ListenerKind, Stream};
use crate::wire;
use crate::workers::{ConnRef, Inbox, Job, Outbound, WorkerPool, log_request};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The token of the `Waker` through which workers wake the loop.
pub const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
/// Listener `i` has token `LISTENER_BASE - i`; connections use their slab key.
const LISTENER_BASE: usize = usize::MAX - 2;

/// How long a closed connection may keep sending before we stop draining it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
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
/// Unsent reply bytes beyond which a keep-alive connection's next request is not read yet.
const MAX_UNREAD_REPLY: usize = 64 * 1024;
/// While requests are in flight, the longest the loop sleeps: a worker that sent its reply
/// itself on a connection that stays open does not wake the loop (`Worker::finish`), and the
/// loop settles such a request (counts it done, arms the read timeout) at its next turn.
const QUIET_SETTLE: Duration = Duration::from_millis(10);

/// Everything the loop needs that is built before it starts.
pub struct Parts {
    pub poll: Poll,
    /// Plain TCP, TLS and Unix listeners, in `--listen` order.
    pub listeners: Vec<Listener>,
    pub signals: SignalSource,
    pub pool: WorkerPool,
    pub inbox: Inbox,
    pub tokens: Arc<Tokens>,
    pub runtime: Arc<Runtime>,
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
    backoff: AuthBackoff,
    /// Open connections per client IP, for `--max-connections-per-ip`.
    per_ip: PerIp,
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
        parts.signals.register(registry, SIGNALS)?;
        Ok(Server {
            backoff: AuthBackoff::new(config.auth_failures),
            per_ip: PerIp::new(config.max_connections_per_ip > 0),
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
    pub fn run(mut self) -> io::Result<i32> {
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
                    SIGNALS => {
                        if let Some(code) = self.on_signals() {
                            return Ok(code);
                        }
                    }
                    Token(t) if t > LISTENER_BASE - self.parts.listeners.len() => {
                        self.accept(LISTENER_BASE - t)
                    }
                    Token(key) => self.on_socket_event(key),
                }
            }
            let now = Instant::now();
            self.run_timers(now);
            for index in std::mem::take(&mut self.accept_more) {
                self.accept(index);
            }
            if let Next::Exit = self.check_stop(now) {
                return Ok(0);
            }
        }
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
            let kind = listener.kind();
            match listener.accept() {
                Ok(accepted) => {
                    if std::mem::take(&mut self.accept_failing) {
                        log::info!("accepting connections again");
                    }
                    self.admit(accepted, kind)
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

    fn admit(&mut self, accepted: Accepted, kind: ListenerKind) {
        let Accepted { stream, endpoints } = accepted;
        let peer = &endpoints.peer_text;
        if let Some(why) = self.refused_at_accept(&endpoints, kind) {
            log::debug!("refusing {peer}: {why}");
            return; // dropping the stream closes it, without a reply
        }
        if let Some(why) = self.over_capacity(endpoints.ip()) {
            return self.refuse_connection(stream, &endpoints, why);
        }
        if let Some(ip) = endpoints.ip() {
            self.per_ip.opened(ip);
        }
        self.next_serial += 1;
        let phase = Phase::Reading {
            deadline: Instant::now() + self.config.read_timeout,
        };
        let connection = Connection::new(stream, endpoints.clone(), self.next_serial, phase);
        let key = self.connections.insert(connection);
        metrics().open_connections.inc();
        if let Err(e) = self.connections[key].register(self.parts.poll.registry(), Token(key)) {
            log::warn!("registering connection from {peer}: {e}");
            self.connections.remove(key);
            metrics().open_connections.dec();
            if let Some(ip) = endpoints.ip() {
                self.per_ip.closed(ip);
            }
            return;
        }
        log::debug!("connection from {peer}");
        // Data may already be there; with edge triggers we will not hear of it again.
        self.drive(key);
    }

    /// Why a new connection is closed at once, without a reply, if it is.
    fn refused_at_accept(&self, endpoints: &Endpoints, kind: ListenerKind) -> Option<&'static str> {
        if let Some(cred) = endpoints.peer_cred
            && !self.config.allows_uid(cred.uid)
        {
            return Some("uid not in --allow-uid");
        }
        let ip = endpoints.ip()?;
        if !self.config.allows(ip) {
            metrics().record_refusal(Refusal::NotAllowed);
            return Some("not in --allow");
        }
        // A backed-off client does not even get a handshake: that is the expensive part.
        if kind == ListenerKind::Tls && self.backoff.is_blocked(ip, Instant::now()) {
            return Some("backed off after failed authentications");
        }
        None
    }

    /// Which connection limit a new connection from `ip` would pass, if any.
    fn over_capacity(&self, ip: Option<IpAddr>) -> Option<Refusal> {
        if self.connections.len() >= self.config.max_connections {
            return Some(Refusal::MaxConnections);
        }
        let per_ip = self.config.max_connections_per_ip;
        let count = ip.map_or(0, |ip| self.per_ip.count(ip));
        (per_ip > 0 && count >= per_ip).then_some(Refusal::MaxConnectionsPerIp)
    }

    /// Answers a connection there is no room for with `ERR busy` (HTTP: 503), then closes it.
    /// A silent close would read as a handler that replied nothing, and `send --all` would count
    /// a full server as a success. The connection never enters the slab, so a flood of them
    /// costs no memory: what the client sent already is read and dropped (unread input would
    /// turn the close into a reset); input arriving later does get a reset, after the reply.
    /// A TLS client is closed without the reply: saying it would take a handshake, the very
    /// cost a connection cap is there to avoid.
    fn refuse_connection(&mut self, mut stream: Stream, endpoints: &Endpoints, why: Refusal) {
        metrics().record_refusal(why);
        log::debug!(
            "refusing {}: --{} reached",
            endpoints.peer_text,
            why.as_str()
        );
        if stream.needs_handshake() {
            return;
        }
        let head = (self.config.framing == Framing::Http).then(|| HttpHead {
            minor_version: 1,
            ..HttpHead::default()
        });
        let reply = wire::finish(Reply::error(ServerError::Busy), head.as_ref(), false);
        // A fresh socket's send buffer takes these few bytes whole.
        let _ = stream.write(&reply.bytes);
        let _ = stream.shutdown_output();
        for _ in 0..4 {
            match stream.read(&mut self.scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    // ---- driving one connection ----

    /// Moves a connection as far as it can go without blocking, then closes it if it is done.
    /// The socket of connection `key` has news.
    fn on_socket_event(&mut self, key: usize) {
        if let Some(connection) = self.connections.get(key)
            && connection.phase == Phase::Handling
            && connection.reply_went_quietly()
        {
            // Settling the reply (`on_reply`) drives the connection on.
            return self.take_worker_messages(false);
        }
        self.drive(key);
    }

    fn drive(&mut self, key: usize) {
        let Some(connection) = self.connections.get_mut(key) else {
            return;
        };
        let result = step(connection, &self.config, &mut self.scratch);
        match result {
            Ok(Step::Wait) => self.after_step(key),
            Ok(Step::Dispatch(raw)) => {
                self.dispatch(key, raw);
                self.drive(key);
            }
            Ok(Step::WantsContinue) => self.on_expect_continue(key),
            Ok(Step::Close(why)) => self.close(key, why),
            Err(e) => {
                self.count_rejected_certificate(key);
                self.close(key, &format!("I/O error: {e}"))
            }
        }
    }

    /// The client waits for `100 Continue` before sending its body. It is said only once the
    /// token passed (SPEC §10): a wrong token is answered 401 (429 when backed off) at once,
    /// from the head alone, and the body is never asked for.
    fn on_expect_continue(&mut self, key: usize) {
        let connection = &self.connections[key];
        let head = http::parse_head(&connection.input);
        let ip = connection.endpoints.ip();
        let token_ok = |head: &HttpHead| {
            let token = head.token().map(str::as_bytes);
            token.and_then(|t| self.parts.tokens.check(t)).is_some()
        };
        let refused = self.token_required()
            && (ip.is_some_and(|ip| self.backoff.is_blocked(ip, Instant::now()))
                || !head.as_ref().is_some_and(token_ok));
        let connection = &mut self.connections[key];
        if refused {
            connection.input.clear();
            let raw = RawRequest {
                http: head,
                ..RawRequest::default()
            };
            // Answered by `refusal` and closed: the unsent body is drained, never read as
            // another request.
            self.dispatch(key, raw);
        } else {
            connection.continue_sent = true;
            connection.push_output(b"HTTP/1.1 100 Continue\r\n\r\n");
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

    /// An mTLS handshake refused for the client's certificate counts for `--auth-failures`.
    fn count_rejected_certificate(&mut self, key: usize) {
        let connection = &self.connections[key];
        if !connection.stream.client_cert_rejected() {
            return;
        }
        metrics().auth_failures.inc();
        if let Some(ip) = connection.endpoints.ip()
            && self.backoff.record_failure(ip, Instant::now())
        {
            log::warn!(
                "{ip}: {} failed authentications within 60 s; refusing this IP for 60 s",
                self.config.auth_failures
            );
        }
    }

    fn close(&mut self, key: usize, why: &str) {
        let mut connection = self.connections.remove(key);
        if connection.stream.handshake_abandoned() {
            metrics().record_tls_handshake("abandoned");
        }
        if connection.pending_output() > 0 || connection.stream.wants_write() {
            connection.reset_on_drop(); // a timed-out or too slow reader gets no partial reply
        }
        metrics().open_connections.dec();
        if let Some(ip) = connection.endpoints.ip() {
            self.per_ip.closed(ip);
        }
        connection.deregister(self.parts.poll.registry());
        log::debug!(
            "closed connection from {}: {why}",
            connection.endpoints.peer_text
        );
    }

    // ---- requests ----

    fn dispatch(&mut self, key: usize, raw: RawRequest) {
        self.next_request_id += 1;
        let now = Instant::now();
        let connection = &mut self.connections[key];
        connection.continue_sent = false;
        // A backed-off client's token is not even checked.
        let blocked = connection
            .endpoints
            .ip()
            .is_some_and(|ip| self.backoff.is_blocked(ip, now));
        let insecure = self.config.token_sources.is_empty();
        let (token_name, payload) = authenticate(&self.parts.tokens, &raw, !blocked, insecure);
        let request = Request {
            id: self.next_request_id,
            token_name,
            payload,
            body: raw.body,
            endpoints: connection.endpoints.clone(),
            framing: self.config.framing,
            http: raw.http,
        };
        if let Some((error, verdict)) = self.refusal(&request, blocked, now) {
            let reply = wire::finish(Reply::error(error), request.http.as_ref(), false);
            log_request(&request, verdict, now, reply.bytes.len(), &[]);
            return answer(&mut self.connections[key], reply, &self.config, true);
        }
        let connection = &mut self.connections[key];
        connection.phase = Phase::Handling;
        self.in_flight += 1;
        let conn = ConnRef {
            key,
            serial: connection.serial,
        };
        // Only where a connection may stay open: a reply that closes goes through the loop.
        let keep_open = self.config.keep_alive && self.config.framing != Framing::Stream;
        let writer = (keep_open || self.config.framing == Framing::Http)
            .then(|| connection.reply_writer(keep_open))
            .flatten();
        self.parts.pool.submit(Job {
            request,
            conn,
            writer,
        });
    }

    /// Whether the server rejects a wrong token itself. Decided by the configuration, never by
    /// how many tokens are valid now: an emptied token file must lock everyone out, not in.
    fn token_required(&self) -> bool {
        self.config.auth == AuthMode::Required && !self.config.token_sources.is_empty()
    }

    /// Why the server answers a request itself instead of running the script, if it does.
    fn refusal(
        &mut self,
        request: &Request,
        blocked: bool,
        now: Instant,
    ) -> Option<(ServerError, Verdict)> {
        if self.stopping.is_some() {
            return Some((ServerError::ShuttingDown, Verdict::ShuttingDown));
        }
        let token_required = self.token_required();
        if token_required && blocked {
            metrics().record_refusal(Refusal::AuthBackoff);
            return Some((ServerError::BackedOff, Verdict::Unauthorized));
        }
        if token_required && request.token_name.is_none() {
            if let Some(ip) = request.endpoints.ip()
                && self.backoff.record_failure(ip, now)
            {
                log::warn!(
                    "{ip}: {} wrong tokens within 60 s; refusing this IP for 60 s",
                    self.config.auth_failures
                );
            }
            return Some((ServerError::Unauthorized, Verdict::Unauthorized));
        }
        if self.in_flight >= self.config.workers + self.config.queue {
            metrics().record_refusal(Refusal::QueueFull);
            return Some((ServerError::Busy, Verdict::Busy));
        }
        None
    }

    /// `woken`: called for the waker's event, which this consumes.
    fn take_worker_messages(&mut self, woken: bool) {
        let messages: Vec<Outbound> = match woken {
            true => self.parts.inbox.drain().collect(),
            false => self.parts.inbox.take().collect(),
        };
        for message in messages {
            match message {
                Outbound::Data { conn, bytes } => self.on_live_output(conn, &bytes),
                Outbound::Done { conn, reply } => {
                    self.in_flight -= 1;
                    self.on_reply(conn, reply);
                }
                Outbound::Tokens(tokens) => self.parts.tokens = tokens,
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

    fn on_reply(&mut self, conn: ConnRef, reply: Reply) {
        let stopping = self.stopping.is_some();
        let Some(connection) = find(&mut self.connections, conn) else {
            return;
        };
        answer(connection, reply, &self.config, stopping);
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

    /// Returns an exit status when the process must end at once.
    fn on_signals(&mut self) -> Option<i32> {
        for signal in self.parts.signals.pending() {
            match signal {
                Signal::Reload => self.parts.reload.reload_now(),
                Signal::Stop(number) if self.stopping.is_some() => {
                    log::warn!("second stop signal: exiting now");
                    self.parts
                        .runtime
                        .groups
                        .signal_all(rustix::process::Signal::KILL);
                    return Some(128 + number);
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
            let reply = wire::finish(
                Reply::error(ServerError::ShuttingDown),
                job.request.http.as_ref(),
                false,
            );
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

/// Open connections per client IP (IPv4-mapped IPv6 counted as IPv4). Tracked only while
/// `--max-connections-per-ip` is on; an IP leaves the map with its last connection.
struct PerIp {
    enabled: bool,
    open: HashMap<IpAddr, usize>,
}

impl PerIp {
    fn new(enabled: bool) -> PerIp {
        PerIp {
            enabled,
            open: HashMap::new(),
        }
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.open.get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    fn opened(&mut self, ip: IpAddr) {
        if self.enabled {
            *self.open.entry(ip.to_canonical()).or_default() += 1;
        }
    }

    fn closed(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if let Some(count) = self.open.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.open.remove(&ip);
            }
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

/// The token's name and the payload of a request (SPEC §3, §10). With `check` false the token
/// is split off but not compared (a backed-off client). `insecure`: no token source is
/// configured (`--insecure-no-token`). Not "no valid token": token files emptied to revoke
/// every token leave none, and then nothing may pass.
fn authenticate(
    tokens: &Tokens,
    raw: &RawRequest,
    check: bool,
    insecure: bool,
) -> (Option<Arc<str>>, Vec<u8>) {
    let matched = |token: &[u8]| if check { tokens.check(token) } else { None };
    if let Some(head) = &raw.http {
        return (head.token().and_then(|t| matched(t.as_bytes())), Vec::new());
    }
    if insecure {
        return (None, raw.line.clone()); // --insecure-no-token: the whole line is the payload
    }
    let (token, payload) = framing::split_token(&raw.line);
    (matched(token), payload.to_vec())
}

/// Queues a reply and decides whether the connection stays open for another request.
/// `force_close` overrides both the framing's default and the reply's own choice (a stop, or
/// an answer the server gives itself).
fn answer(connection: &mut Connection, reply: Reply, config: &Config, force_close: bool) {
    connection.push_output(&reply.bytes);
    let default_close = !config.keep_alive || config.framing == Framing::Stream;
    let now = Instant::now();
    connection.phase = if force_close || reply.close.unwrap_or(default_close) {
        Phase::Closing {
            deadline: now + config.read_timeout,
        }
    } else {
        Phase::Reading {
            deadline: now + config.read_timeout,
        }
    };
}

/// What `step` found for the loop to do.
enum Step {
    /// Nothing more until the next event or timer.
    Wait,
    /// A complete request to hand on.
    Dispatch(RawRequest),
    /// HTTP: a complete head whose client waits for `100 Continue` before sending the body.
    WantsContinue,
    Close(&'static str),
}

/// Advances one connection by what its socket allows now.
fn step(connection: &mut Connection, config: &Config, scratch: &mut [u8]) -> io::Result<Step> {
    loop {
        match connection.phase {
            Phase::Handling => {
                connection.flush()?;
                return Ok(Step::Wait);
            }
            Phase::Reading { .. } => {
                // Backpressure: a client that pipelines requests without reading the replies
                // gets no new request read while a reply is still stuck in our buffer.
                if !connection.flush()? && connection.pending_output() > MAX_UNREAD_REPLY {
                    return Ok(Step::Wait);
                }
                return read_request(connection, config, scratch);
            }
            Phase::Closing { .. } => {
                if !connection.flush()? || !connection.shutdown_output()? {
                    return Ok(Step::Wait);
                }
                connection.phase = Phase::Draining {
                    deadline: Instant::now() + DRAIN_TIME,
                };
            }
            Phase::Draining { .. } => {
                let closed = connection.input_closed || connection.discard_input(scratch)?;
                return Ok(if closed {
                    Step::Close("done")
                } else {
                    Step::Wait
                });
            }
        }
    }
}

fn read_request(
    connection: &mut Connection,
    config: &Config,
    scratch: &mut [u8],
) -> io::Result<Step> {
    let limit = config.max_request_bytes;
    loop {
        // One byte of slack: a line of exactly `limit` bytes may still wait for its `\n`.
        let filled = connection.fill_input(scratch, limit + 1)?;
        let frame = framing::next_frame(
            config.framing,
            &mut connection.input,
            connection.input_closed,
            limit,
        );
        match frame {
            Frame::Request(raw) => return Ok(Step::Dispatch(raw)),
            Frame::TooLarge => {
                return refuse_unreadable(connection, ServerError::TooLarge, config, scratch);
            }
            Frame::HeadTooLarge => {
                return refuse_unreadable(connection, ServerError::HeadTooLarge, config, scratch);
            }
            Frame::Malformed(reason) => {
                log::debug!(
                    "bad request from {}: {reason}",
                    connection.endpoints.peer_text
                );
                return refuse_unreadable(connection, ServerError::Malformed, config, scratch);
            }
            Frame::Incomplete | Frame::WantsContinue if connection.input_closed => {
                if connection.pending_output() == 0 {
                    return Ok(Step::Close("client closed without a complete request"));
                }
                connection.phase = Phase::Closing {
                    deadline: Instant::now() + config.read_timeout,
                };
                return step(connection, config, scratch);
            }
            // The loop checks the token first (`Server::on_expect_continue`).
            Frame::WantsContinue if !connection.continue_sent => return Ok(Step::WantsContinue),
            Frame::Incomplete | Frame::WantsContinue => match filled {
                Filled::Drained => return Ok(Step::Wait),
                // Nothing more is read past the limit, so a framer still waiting would wait
                // forever and this loop would spin (HTTP chunk extensions did that).
                Filled::LimitReached if connection.input.len() > limit + 1 => {
                    return refuse_unreadable(connection, ServerError::TooLarge, config, scratch);
                }
                // Empty lines were dropped: there is room to read again.
                Filled::LimitReached => {}
            },
        }
    }
}

/// Answers input that will never be a request (too large, not HTTP), then closes.
fn refuse_unreadable(
    connection: &mut Connection,
    error: ServerError,
    config: &Config,
    scratch: &mut [u8],
) -> io::Result<Step> {
    connection.input.clear();
    // No request head to answer in kind: HTTP framing answers as HTTP/1.1.
    let head = (config.framing == Framing::Http).then(|| HttpHead {
        minor_version: 1,
        ..HttpHead::default()
    });
    answer(
        connection,
        wire::finish(Reply::error(error), head.as_ref(), false),
        config,
        true,
    );
    step(connection, config, scratch)
}
