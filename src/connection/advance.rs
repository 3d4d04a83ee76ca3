//! A connection's phases in one loop: [`Connection::advance`] writes what is pending, reads
//! and frames the next request, answers input that is no request, closes and drains, and
//! tells the loop what is left to do as a [`Step`].

use super::{Connection, Filled, Phase};
use crate::config::Config;
use crate::protocol::{self, Encoded, Frame, Framing, Protocol, RawRequest};
use crate::request::ServerError;
use std::io;
use std::time::{Duration, Instant};

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
    /// A complete head whose client waits to be told to send the body (HTTP `100 Continue`),
    /// as a request without its body; the loop asks the gate first.
    WantsContinue(RawRequest),
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
                    if self.has_output_to_send() {
                        self.flush()?;
                    }
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
                    if !self.flush_before_fin()? || !self.shutdown_output()? {
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
                    log::debug!("bad request from {}: {reason}", self.endpoints.peer_text());
                    return Ok(ReadOutcome::Unreadable(ServerError::Malformed));
                }
                Frame::Incomplete | Frame::WantsContinue if self.input_closed => {
                    if self.pending_output() > 0 {
                        return Ok(ReadOutcome::Finish);
                    }
                    Step::Close("client closed without a complete request")
                }
                Frame::WantsContinue if !self.continue_sent => {
                    Step::WantsContinue(protocol::waiting_request(&self.input))
                }
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
        // The reply is back: the stream is the loop's again.
        self.worker_writes = false;
        self.push_output(&reply.bytes);
        let deadline = Instant::now() + read_timeout;
        self.phase = if force_close || reply.close {
            Phase::Closing { deadline }
        } else {
            Phase::Reading { deadline }
        };
    }
}
