//! One client connection: its socket, what it has sent that is not a request yet, what we
//! still have to send, and where it stands between accept and close.

mod advance;
mod handoff;

pub use advance::{Rules, Step};
pub use handoff::ReplyWriter;

use crate::request::Endpoints;
use crate::transport::Stream;
use handoff::{DONE, WAITING};
use mio::{Interest, Registry, Token};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

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
    /// An event said the client closed its side (or the socket failed): read until the end
    /// is seen, even after a short read.
    pub peer_closing: bool,
    output: Vec<u8>,
    /// How much of `output` is already written.
    written: usize,
    /// Whether WRITABLE is in the registered interest (only while output is pending).
    wants_writable: bool,
    /// The deadline an entry in the loop's timer heap stands for, if one does.
    pub timer: Option<Instant>,
    /// HTTP: `100 Continue` already sent for the request being read.
    pub continue_sent: bool,
    /// The hand-off state of the request being handled, shared with the worker that writes
    /// its reply itself (see [`ReplyWriter`]); made with the first such request.
    handoff: Option<Arc<AtomicU8>>,
    /// A worker holds this request's [`ReplyWriter`]: until its reply comes back, the loop
    /// leaves the stream alone (a TLS session is locked while the worker encrypts and sends,
    /// and the loop must not wait for that lock).
    worker_writes: bool,
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
            peer_closing: false,
            output: Vec::new(),
            written: 0,
            wants_writable: false,
            timer: None,
            continue_sent: false,
            handoff: None,
            worker_writes: false,
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.stream, token, Interest::READABLE)
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// The stream, for the worker to write this request's reply to itself, when it may:
    /// nothing of ours waiting to be sent before the reply, or the worker's bytes would
    /// overtake it. The loop writes nothing to the connection while the request is handled
    /// unless the handler streams output, and then the worker does not write (see
    /// `workers::Worker::run`). The worker writes only a reply after which the connection
    /// stays open (see `workers::Worker::finish`).
    pub fn reply_writer(&mut self) -> Option<ReplyWriter> {
        if self.pending_output() > 0 {
            return None;
        }
        let socket = self.stream.reply_socket();
        let handoff = self.handoff.get_or_insert_with(Arc::default);
        handoff.store(0, Ordering::SeqCst);
        self.worker_writes = true;
        Some(ReplyWriter {
            socket,
            handoff: handoff.clone(),
            // Input already buffered (pipelined requests) or already closed brings the loop
            // no new event.
            client_to_move: self.input.is_empty() && !self.input_closed,
        })
    }

    /// Called by the loop when the socket has news while a request is handled (the client's
    /// next request, or its close). True when the reply went out quietly: its `Done` is in the
    /// loop's inbox with no wake, and the loop must take it now to serve that news. Otherwise
    /// the worker is told (by the same atomic step) to wake the loop when it is done.
    pub fn reply_went_quietly(&self) -> bool {
        self.handoff
            .as_ref()
            .is_some_and(|h| h.fetch_or(WAITING, Ordering::SeqCst) & DONE != 0)
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
                // A short read took all the socket held: the read that would only say
                // `WouldBlock` is saved (one system call of the few a keep-alive request
                // costs). More data, or the client's close, raises a new edge.
                Ok(n) if n < scratch.len() && !self.peer_closing && self.stream.is_plain() => {
                    self.input.extend_from_slice(&scratch[..n]);
                    break;
                }
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

    /// Whether there is anything for the loop to send now. While a worker writes the reply,
    /// only streamed output, which the worker then leaves to the loop (see `reply_writer`).
    pub fn has_output_to_send(&self) -> bool {
        self.pending_output() > 0 || (!self.worker_writes && self.stream.wants_write())
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
        self.flush_with(Stream::write)
    }

    /// `flush` of the last bytes before our shutdown (see `Stream::write_before_fin`).
    pub fn flush_before_fin(&mut self) -> io::Result<bool> {
        self.flush_with(Stream::write_before_fin)
    }

    fn flush_with(
        &mut self,
        write: fn(&mut Stream, &[u8]) -> io::Result<usize>,
    ) -> io::Result<bool> {
        while self.written < self.output.len() {
            match write(&mut self.stream, &self.output[self.written..]) {
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
        let wants = self.has_output_to_send();
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
