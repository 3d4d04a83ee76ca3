//! One client connection: its socket, what it has sent that is not a request yet, what we
//! still have to send, and where it stands between accept and close.

use crate::config::Config;
use crate::protocol::{self, Encoded, Frame, Framing, Protocol, RawRequest};
use crate::request::{Endpoints, ServerError};
use crate::transport::Stream;
use mio::{Interest, Registry, Token};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a connection stands. Each phase but `Handling` has a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for (the rest of) a request.
    Reading { deadline: Instant },
    /// A request is with the workers. Nothing more is read until its reply is out, so a
    /// client cannot pile up pipelined requests in our memory.
    Handling,
    /// Writing the last reply; then the sending side is shut down.
    Closing { deadline: Instant },
    /// Sending side shut; what the client still sends is read and dropped until it closes, so
    /// unread input does not turn our close into a reset that destroys the reply.
    Draining { deadline: Instant },
}

pub struct Connection {
    /// Plain TCP, TLS or Unix: the loop does not need to know which.
    pub stream: Stream,
    pub endpoints: Arc<Endpoints>,
    /// Tells this connection from a later one in the same slab slot.
    pub serial: u64,
    pub phase: Phase,
    /// Received bytes that are not a complete request yet.
    pub input: Vec<u8>,
    /// The client has shut down its sending side.
    pub input_closed: bool,
    output: Vec<u8>,
    /// How much of `output` is already written.
    written: usize,
    /// Whether WRITABLE is in the registered interest (only while output is pending).
    wants_writable: bool,
    /// The deadline an entry in the loop's timer heap stands for, if one does.
    pub timer: Option<Instant>,
    /// HTTP: `100 Continue` already sent for the request being read.
    pub continue_sent: bool,
}

/// Was the read stopped because the socket is empty, or because enough is buffered?
pub enum Filled {
    Drained,
    LimitReached,
}

impl Connection {
    pub fn new(stream: Stream, endpoints: Arc<Endpoints>, serial: u64, phase: Phase) -> Self {
        Connection {
            stream,
            endpoints,
            serial,
            phase,
            input: Vec::new(),
            input_closed: false,
            output: Vec::new(),
            written: 0,
            wants_writable: false,
            timer: None,
            continue_sent: false,
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.stream, token, Interest::READABLE)
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Reading { deadline }
            | Phase::Closing { deadline }
            | Phase::Draining { deadline } => Some(deadline),
            Phase::Handling => None,
        }
    }

    /// Reads until the socket is empty, the client closes, or more than `limit` bytes are
    /// buffered (the framer then reports the request as too large).
    pub fn fill_input(&mut self, scratch: &mut [u8], limit: usize) -> io::Result<Filled> {
        while !self.input_closed {
            if self.input.len() > limit {
                return Ok(Filled::LimitReached);
            }
            let read = self.stream.read(scratch);
            if let Some(info) = self.stream.take_tls_info() {
                // The handshake finished during this read: requests from now on carry it.
                self.endpoints = self.endpoints.with_tls(info);
            }
            match read {
                Ok(0) => self.input_closed = true,
                Ok(n) => self.input.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Filled::Drained)
    }

    /// Reads and drops whatever the client sends; true once it has closed, or once it has
    /// sent more than a drain is for: a client that keeps sending must not hold the loop.
    pub fn discard_input(&mut self, scratch: &mut [u8]) -> io::Result<bool> {
        const DRAIN_BUDGET: usize = 1 << 20;
        self.input = Vec::new();
        let mut drained = 0;
        loop {
            match self.stream.read(scratch) {
                Ok(0) => return Ok(true),
                Ok(n) if drained + n > DRAIN_BUDGET => return Ok(true),
                Ok(n) => drained += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn push_output(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
    }

    pub fn pending_output(&self) -> usize {
        self.output.len() - self.written
    }

    /// Writes what the socket takes now; true when nothing is left, in our buffer or in the
    /// transport's (TLS records).
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        self.stream.flush_transport()
    }

    /// Makes dropping the socket send a reset instead of a FIN. For a reply given up half
    /// written: after a FIN, the part the client got would look like the whole reply.
    pub fn reset_on_drop(&self) {
        self.stream.reset_on_drop();
    }

    /// Shuts down our sending side (after `close_notify` on TLS); true once done.
    pub fn shutdown_output(&mut self) -> io::Result<bool> {
        self.stream.shutdown_output()
    }

    /// Asks for WRITABLE events exactly while output is pending, ours or the transport's.
    pub fn update_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let wants = self.pending_output() > 0 || self.stream.wants_write();
        if wants != self.wants_writable {
            let interest = if wants {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.stream, token, interest)?;
            self.wants_writable = wants;
        }
        Ok(())
    }

    /// Gives memory back after a large request, so idle connections stay small.
    pub fn shrink_buffers(&mut self) {
        if self.input.is_empty() && self.input.capacity() > 4096 {
            self.input = Vec::new();
        }
        if self.output.is_empty() && self.output.capacity() > 4096 {
            self.output = Vec::new();
        }
    }
}

/// How long a closed connection may keep sending before we stop draining it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Unsent reply bytes beyond which a keep-alive connection's next request is not read yet.
const MAX_UNREAD_REPLY: usize = 64 * 1024;

/// What [`Connection::advance`] leaves for the loop to do.
#[derive(Debug)]
pub enum Step {
    /// Nothing more until the next event or timer.
    Wait,
    /// A complete request to hand on.
    Dispatch(RawRequest),
    /// A complete head whose client waits to be told to send the body (HTTP `100 Continue`);
    /// the loop asks the gate first.
    WantsContinue,
    /// Done with: remove it. The reason is for the debug log.
    Close(&'static str),
}

/// What reading found, when it is not a step for the loop.
enum ReadOutcome {
    Step(Step),
    /// Input that will never be a request: answer this, then close.
    Unreadable(ServerError),
    /// The client closed with a partial request while a reply is still going out.
    Finish,
}

/// What advancing a connection needs to know of the server's settings.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub framing: Framing,
    /// `--keep-alive`.
    pub keep_alive: bool,
    /// `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// `--read-timeout`: the deadline of every phase that waits for the client.
    pub read_timeout: Duration,
}

impl Rules {
    pub fn of(config: &Config) -> Rules {
        Rules {
            framing: config.framing,
            keep_alive: config.keep_alive,
            max_request_bytes: config.max_request_bytes,
            read_timeout: config.read_timeout,
        }
    }
}

impl Connection {
    /// Moves the connection through its phases as far as the socket allows now: writes what
    /// is pending, reads and frames the next request, answers input that is no request,
    /// closes and drains. Returns what the loop must do next. One loop, so every way from
    /// one phase to the next is in this function.
    pub fn advance(&mut self, rules: &Rules, scratch: &mut [u8]) -> io::Result<Step> {
        loop {
            match self.phase {
                Phase::Handling => {
                    self.flush()?;
                    return Ok(Step::Wait);
                }
                Phase::Reading { .. } => {
                    // Backpressure: a client that pipelines requests without reading the
                    // replies gets no new request read while a reply is stuck in our buffer.
                    if !self.flush()? && self.pending_output() > MAX_UNREAD_REPLY {
                        return Ok(Step::Wait);
                    }
                    match self.read_request(rules, scratch)? {
                        ReadOutcome::Step(step) => return Ok(step),
                        ReadOutcome::Unreadable(error) => {
                            self.input.clear();
                            // No request to answer in kind: the framing's default shape.
                            let protocol = Protocol::new(rules.framing, rules.keep_alive, None);
                            self.answer(protocol.encode_error(error), true, rules.read_timeout);
                        }
                        ReadOutcome::Finish => {
                            self.phase = Phase::Closing {
                                deadline: Instant::now() + rules.read_timeout,
                            }
                        }
                    }
                }
                Phase::Closing { .. } => {
                    if !self.flush()? || !self.shutdown_output()? {
                        return Ok(Step::Wait);
                    }
                    self.phase = Phase::Draining {
                        deadline: Instant::now() + DRAIN_TIME,
                    };
                }
                Phase::Draining { .. } => {
                    let closed = self.input_closed || self.discard_input(scratch)?;
                    return Ok(if closed {
                        Step::Close("done")
                    } else {
                        Step::Wait
                    });
                }
            }
        }
    }

    /// Reads until a request is framed, the socket is empty, or the input proves unreadable.
    fn read_request(&mut self, rules: &Rules, scratch: &mut [u8]) -> io::Result<ReadOutcome> {
        let limit = rules.max_request_bytes;
        loop {
            // One byte of slack: a line of exactly `limit` bytes may still wait for its `\n`.
            let filled = self.fill_input(scratch, limit + 1)?;
            let frame = protocol::decode(rules.framing, &mut self.input, self.input_closed, limit);
            let step = match frame {
                Frame::Request(raw) => Step::Dispatch(raw),
                Frame::TooLarge => return Ok(ReadOutcome::Unreadable(ServerError::TooLarge)),
                Frame::HeadTooLarge => {
                    return Ok(ReadOutcome::Unreadable(ServerError::HeadTooLarge));
                }
                Frame::Malformed(reason) => {
                    log::debug!("bad request from {}: {reason}", self.endpoints.peer_text);
                    return Ok(ReadOutcome::Unreadable(ServerError::Malformed));
                }
                Frame::Incomplete | Frame::WantsContinue if self.input_closed => {
                    if self.pending_output() > 0 {
                        return Ok(ReadOutcome::Finish);
                    }
                    Step::Close("client closed without a complete request")
                }
                Frame::WantsContinue if !self.continue_sent => Step::WantsContinue,
                Frame::Incomplete | Frame::WantsContinue => match filled {
                    Filled::Drained => Step::Wait,
                    // Nothing more is read past the limit, so a framer still waiting would
                    // wait forever and this loop would spin (HTTP chunk extensions did that).
                    Filled::LimitReached if self.input.len() > limit + 1 => {
                        return Ok(ReadOutcome::Unreadable(ServerError::TooLarge));
                    }
                    // Empty lines were dropped: there is room to read again.
                    Filled::LimitReached => continue,
                },
            };
            return Ok(ReadOutcome::Step(step));
        }
    }

    /// Queues a reply and moves on: to read the next request, or to close as the protocol
    /// decided. `force_close` overrides that (a stop, or an answer the server gives itself).
    pub fn answer(&mut self, reply: Encoded, force_close: bool, read_timeout: Duration) {
        self.push_output(&reply.bytes);
        let deadline = Instant::now() + read_timeout;
        self.phase = if force_close || reply.close {
            Phase::Closing { deadline }
        } else {
            Phase::Reading { deadline }
        };
    }
}
