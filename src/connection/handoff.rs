//! A worker's hand-off of a reply straight to the client's socket ([`ReplyWriter`]), and the
//! flags that tell the loop whether it went out quietly.

use crate::transport::ReplySocket;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// `DONE`: the worker sent its reply quietly. `WAITING`: the loop had news for the connection
/// while the request was handled. Both reset at each dispatch.
pub(super) const DONE: u8 = 1;
pub(super) const WAITING: u8 = 2;

/// A worker's handle on a connection's socket, to send a reply without a trip through the
/// loop: the client gets it as soon as the handler returns, and the loop thread, which serves
/// every connection, does not pay for the `send` (on loopback the sender's system call also
/// runs the receiver's TCP input: the largest single cost of a keep-alive request). Writes
/// only what the socket takes now, so a slow client never holds a worker: the loop sends the
/// rest. On TLS the worker encrypts the reply with the connection's session, which the loop
/// does not use meanwhile, and records the socket did not take are left to the loop.
pub struct ReplyWriter {
    pub(super) socket: ReplySocket,
    pub(super) handoff: Arc<AtomicU8>,
    /// The client's next move (a request, or its close) is still to come, and will bring the
    /// loop to this connection.
    pub(super) client_to_move: bool,
}

impl ReplyWriter {
    /// Sends from the front of `bytes` what the socket takes without blocking and removes it;
    /// what is left (the socket was full, or failed) is for the loop, whose own send then
    /// meets the same error and closes the connection as it always does.
    pub fn write_now(&self, bytes: &mut Vec<u8>) {
        let mut written = 0;
        while written < bytes.len() {
            match self.socket.write(&bytes[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        bytes.drain(..written);
    }

    /// Whether the loop may learn of a reply that stays open late, without a wake: it is all
    /// out, so the client's next request (or close) will bring the loop here anyway, and then
    /// it takes the reply first (`Connection::reply_went_quietly`).
    pub fn may_go_quietly(&self, unsent: usize) -> bool {
        unsent == 0 && self.client_to_move && !self.socket.records_pending()
    }

    /// Marks the quiet reply as sent (its `Done` already queued); true when the loop had news
    /// for the connection meanwhile and must be woken after all.
    pub fn mark_done(&self) -> bool {
        self.handoff.fetch_or(DONE, Ordering::SeqCst) & WAITING != 0
    }
}
