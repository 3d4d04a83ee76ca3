//! The `--metrics-listen` port: `/metrics`, `/healthz` and `/readyz`, served by a small mio
//! loop on a thread of its own, many clients at once, so that idle or slow clients never delay
//! a probe (a kubelet whose liveness probe times out restarts the pod).
//!
//! Every client gets [`CLIENT_TIME`] in all to send its request and read the response, and at
//! most [`MAX_CLIENTS`] are open at once: a new connection beyond that closes the oldest one,
//! so whoever holds connections open can never keep a fresh probe out.

use crate::http::{self, ResponseHead};
use crate::metrics;
use crate::transport::is_per_connection_error;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Clients open at once; beyond it the oldest is closed for the newcomer.
const MAX_CLIENTS: usize = 64;
/// Time from accept to the last byte of the response.
const CLIENT_TIME: Duration = Duration::from_secs(2);
/// Largest request head: probes and scrapes send a few hundred bytes.
const REQUEST_LIMIT: usize = 8192;
/// Connections taken per turn, so a flood of connects cannot hold the loop in `accept`.
const ACCEPTS_PER_TURN: usize = 64;
/// After an accept error such as EMFILE, how long before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const LISTENER: Token = Token(usize::MAX);

/// Starts the metrics thread on `listener` (already bound, so its address could be printed).
pub fn spawn(listener: std::net::TcpListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let probes = Probes {
        poll,
        listener,
        clients: Slab::new(),
        accept_more: false,
        accept_paused_until: None,
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || probes.run())?;
    Ok(())
}

/// One metrics client: what it sent so far, then the response being written.
struct Client {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    deadline: Instant,
}

/// What a client needs next.
enum State {
    Open,
    Done,
}

struct Probes {
    poll: Poll,
    listener: TcpListener,
    clients: Slab<Client>,
    /// The last turn stopped accepting at `ACCEPTS_PER_TURN`: more may be queued.
    accept_more: bool,
    accept_paused_until: Option<Instant>,
}

impl Probes {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = match self.accept_more {
                true => Some(Duration::ZERO),
                false => self
                    .next_wake()
                    .map(|at| at.saturating_duration_since(Instant::now())),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("metrics loop: polling: {e}; metrics are no longer served");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(key) => self.advance(key),
                }
            }
            self.expire(Instant::now());
            if std::mem::take(&mut self.accept_more) {
                self.accept();
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let oldest = self.clients.iter().map(|(_, c)| c.deadline).min();
        oldest.into_iter().chain(self.accept_paused_until).min()
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    log::warn!("accepting a metrics connection: {e}; pausing {ACCEPT_PAUSE:?}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
        self.accept_more = true;
    }

    fn admit(&mut self, mut stream: TcpStream) {
        if self.clients.len() >= MAX_CLIENTS {
            self.close_oldest();
        }
        let entry = self.clients.vacant_entry();
        let token = Token(entry.key());
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
            return log::warn!("registering a metrics connection: {e}");
        }
        entry.insert(Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            deadline: Instant::now() + CLIENT_TIME,
        });
        // The request may be there already; with edge triggers nothing will say so again.
        self.advance(token.0);
    }

    fn close_oldest(&mut self) {
        let oldest = self.clients.iter().min_by_key(|(_, c)| c.deadline);
        if let Some(key) = oldest.map(|(key, _)| key) {
            log::debug!("metrics: {MAX_CLIENTS} clients open, closing the oldest");
            self.close(key);
        }
    }

    fn advance(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        match client.advance() {
            Ok(State::Open) => {}
            Ok(State::Done) => self.close(key),
            Err(e) => {
                log::debug!("metrics connection: {e}");
                self.close(key);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        late.into_iter().for_each(|key| self.close(key));
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.accept_paused_until = None;
            self.accept();
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut client) = self.clients.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut client.stream);
        }
    }
}

impl Client {
    /// Reads the request, once complete queues its response, and writes what the socket takes.
    fn advance(&mut self) -> io::Result<State> {
        if self.output.is_empty() {
            match self.read_request()? {
                Some(response) => self.output = response,
                None => return Ok(State::Open),
            }
        }
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(State::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(State::Done)
    }

    /// The response, once the request is complete (or cannot be one).
    fn read_request(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut chunk = [0u8; 2048];
        loop {
            match http::parse(&self.input, REQUEST_LIMIT) {
                http::Parsed::Request { head, .. } => {
                    let (status, content_type, body) = route(&head.method, head.path());
                    let head_only = head.method == "HEAD";
                    return Ok(Some(respond(status, content_type, &body, head_only)));
                }
                http::Parsed::Incomplete { .. } => {}
                _ => {
                    let text = "bad request\n";
                    return Ok(Some(respond(400, TEXT, text, false)));
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn respond(status: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let response = ResponseHead {
        status,
        headers: &[],
        default_content_type: content_type,
        keep_alive: false,
        minor_version: 1,
    };
    response.complete(body.as_bytes(), head_only)
}

fn route(method: &str, path: &str) -> (u16, &'static str, String) {
    if method != "GET" && method != "HEAD" {
        return (405, TEXT, "GET only\n".into());
    }
    let m = metrics::metrics();
    match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" if m.is_stopping() => (503, TEXT, "shutting down\n".into()),
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" if m.is_ready() && !m.is_stopping() => (200, TEXT, "ready\n".into()),
        "/readyz" => (503, TEXT, "not ready\n".into()),
        _ => (
            404,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
