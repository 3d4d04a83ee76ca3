//! The byte streams the loop serves — plain TCP, TLS over TCP, Unix sockets — behind one
//! [`Stream`] and one [`Listener`], so the loop and the framings never know which they hold.
//!
//! TLS follows rustls' `tlsserver-mio` example: records are read with `read_tls` and decrypted
//! by `process_new_packets`, plaintext comes out of `reader()`, and what rustls has to send
//! (handshake messages, encrypted replies, alerts) goes out with `write_tls` whenever the
//! socket takes it; the loop asks for WRITABLE while [`Stream::wants_write`] says so.

use crate::request::Endpoints;
use crate::tls::{TlsInfo, TlsServer};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

mod listener;
pub use listener::{Accepted, LISTEN_BACKLOG, Listener, TcpPort, UnixBindError, UnixSocket};

/// Which kind of listener a connection came through: `req.listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
    Tls,
    Unix,
}

impl ListenerKind {
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Unix => "unix",
        }
    }
}

/// The credentials of a Unix socket's client, from `SO_PEERCRED`: `req.peer_cred`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// One accepted connection's byte stream. It is shared with the worker handling a request,
/// which may write the reply itself ([`ReplySocket`]); it closes with its last holder.
pub enum Stream {
    Tcp(Arc<TcpStream>),
    /// Behind a lock, as the session is used by the loop (reading, the handshake) and by the
    /// worker that encrypts and sends a reply, one at a time; uncontended, as the loop reads
    /// nothing from a connection while its request is handled.
    Tls(Arc<Mutex<TlsStream>>),
    Unix(Arc<UnixStream>),
}

/// A connection's stream as a worker holds it, to write a reply to it without the loop.
pub enum ReplySocket {
    Tcp(Arc<TcpStream>),
    Tls(Arc<Mutex<TlsStream>>),
    Unix(Arc<UnixStream>),
}

impl ReplySocket {
    /// Bytes to the client (plaintext, for TLS); `WouldBlock` when no more is taken now.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ReplySocket::Tcp(s) => (&**s).write(buf),
            ReplySocket::Tls(s) => lock(s).write(buf),
            ReplySocket::Unix(s) => (&**s).write(buf),
        }
    }

    /// TLS records made from what was written that the socket did not take yet: only the
    /// loop, woken for it, sends them when the socket is writable again.
    pub fn records_pending(&self) -> bool {
        match self {
            ReplySocket::Tls(s) => lock(s).wants_write(),
            _ => false,
        }
    }
}

/// The TLS stream, even if a thread panicked while holding it: its state is rustls', whose
/// calls do not panic halfway, and a broken session fails the next read or write anyway.
fn lock(stream: &Mutex<TlsStream>) -> MutexGuard<'_, TlsStream> {
    stream.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP socket with a rustls server session on it.
pub struct TlsStream {
    sock: TcpStream,
    /// The rustls session, made when the client's first byte arrives (see `start_session`).
    tls: Option<ServerConnection>,
    /// The configuration of the moment of accept, for the session made later.
    config: Arc<rustls::ServerConfig>,
    /// The socket gave end of file: no more records will come.
    eof: bool,
    /// `close_notify` queued: the TLS form of shutting down our sending side.
    close_queued: bool,
    /// The handshake has finished and `take_tls_info` has handed out its facts.
    reported: bool,
    /// The handshake failed and was counted as such.
    failed: bool,
    /// The handshake failed because of the client's certificate (an authentication failure).
    client_cert_rejected: bool,
}

impl Stream {
    pub fn tls(sock: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Stream> {
        Ok(Stream::Tls(Arc::new(Mutex::new(TlsStream {
            sock,
            tls: None,
            config,
            eof: false,
            close_queued: false,
            reported: false,
            failed: false,
            client_cert_rejected: false,
        }))))
    }

    /// Plaintext from the client. `WouldBlock` when none is there yet; `Ok(0)` once the
    /// client has closed its sending side (FIN, or `close_notify` for TLS).
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&**s).read(buf),
            Stream::Tls(s) => lock(s).read(buf),
            Stream::Unix(s) => (&**s).read(buf),
        }
    }

    /// Plaintext to the client; `WouldBlock` when nothing more can be taken now.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&**s).write(buf),
            Stream::Tls(s) => lock(s).write(buf),
            Stream::Unix(s) => (&**s).write(buf),
        }
    }

    /// Like `write`, for bytes our FIN follows at once: on TCP the kernel holds a last short
    /// segment back (`MSG_MORE`) and the shutdown's FIN rides on it, so the client gets reply
    /// and end in one segment and acknowledges both at once (8 packets a connection, not 10).
    /// TLS and Unix sockets write as usual.
    pub fn write_before_fin(&mut self, buf: &[u8]) -> io::Result<usize> {
        use rustix::net::SendFlags;
        match self {
            Stream::Tcp(s) => Ok(rustix::net::send(
                &**s,
                buf,
                SendFlags::MORE | SendFlags::NOSIGNAL,
            )?),
            _ => self.write(buf),
        }
    }

    /// Sends what the transport holds itself (TLS records); true once nothing is left.
    pub fn flush_transport(&mut self) -> io::Result<bool> {
        match self {
            Stream::Tls(s) => lock(s).push_records(),
            _ => Ok(true),
        }
    }

    /// Whether the transport has bytes of its own waiting for the socket to be writable.
    pub fn wants_write(&self) -> bool {
        match self {
            Stream::Tls(s) => lock(s).wants_write(),
            _ => false,
        }
    }

    /// Shuts down our sending side once everything before it is out; true when done.
    /// For TLS, `close_notify` goes first, so the client knows the reply is complete.
    pub fn shutdown_output(&mut self) -> io::Result<bool> {
        // ENOTCONN: the client is gone already; draining will find out.
        match self {
            Stream::Tcp(s) => drop(s.shutdown(Shutdown::Write)),
            Stream::Unix(s) => drop(s.shutdown(Shutdown::Write)),
            Stream::Tls(s) => {
                let s = &mut *lock(s);
                if let Some(tls) = s.tls.as_mut()
                    && !std::mem::replace(&mut s.close_queued, true)
                {
                    tls.send_close_notify();
                }
                if !s.push_records()? {
                    return Ok(false);
                }
                let _ = s.sock.shutdown(Shutdown::Write);
            }
        }
        Ok(true)
    }

    /// Makes dropping the socket send a reset instead of a FIN. For a reply given up half
    /// written: after a FIN, the part the client got would look like the whole reply.
    pub fn reset_on_drop(&self) {
        let linger = Some(Duration::ZERO);
        let _ = match self {
            Stream::Tcp(s) => rustix::net::sockopt::set_socket_linger(s.as_fd(), linger),
            Stream::Tls(s) => rustix::net::sockopt::set_socket_linger(lock(s).sock.as_fd(), linger),
            Stream::Unix(_) => return, // no resets on Unix sockets
        };
    }

    /// A plain socket: a read returns what arrived, so one shorter than asked emptied it. (A
    /// TLS read returns plaintext a record at a time, with more records possibly waiting.)
    pub fn is_plain(&self) -> bool {
        !matches!(self, Stream::Tls(_))
    }

    /// Whether anything said to the client must wait for a handshake (TLS): a refusal at
    /// accept is then a bare close, since the handshake is the cost the refusal avoids.
    pub fn needs_handshake(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The facts of the TLS handshake, once, right after it finished.
    pub fn take_tls_info(&mut self) -> Option<TlsInfo> {
        match self {
            Stream::Tls(s) => {
                let s = &mut *lock(s);
                if s.reported {
                    return None;
                }
                let tls = s.tls.as_ref().filter(|t| !t.is_handshaking())?;
                s.reported = true;
                crate::metrics::metrics().record_tls_handshake("ok");
                Some(TlsInfo::of(tls))
            }
            _ => None,
        }
    }

    /// A TLS connection that closes before its handshake finished or failed (a timeout, a
    /// client that went away, a TCP probe).
    pub fn handshake_abandoned(&self) -> bool {
        let Stream::Tls(s) = self else { return false };
        let s = lock(s);
        s.tls.as_ref().is_none_or(|t| t.is_handshaking()) && !s.failed
    }

    /// The handshake failed on the client's certificate (mTLS): an authentication failure.
    pub fn client_cert_rejected(&self) -> bool {
        matches!(self, Stream::Tls(s) if lock(s).client_cert_rejected)
    }

    /// The stream, for a worker to write a reply to.
    pub fn reply_socket(&self) -> ReplySocket {
        match self {
            Stream::Tcp(s) => ReplySocket::Tcp(s.clone()),
            Stream::Tls(s) => ReplySocket::Tls(s.clone()),
            Stream::Unix(s) => ReplySocket::Unix(s.clone()),
        }
    }

    /// The descriptor the loop registers: shared streams go by their descriptor, as mio's
    /// own sources do.
    fn with_source<T>(&mut self, f: impl FnOnce(&mut dyn Source) -> T) -> T {
        match self {
            Stream::Tcp(s) => f(&mut SourceFd(&s.as_raw_fd())),
            Stream::Tls(s) => f(&mut SourceFd(&lock(s).sock.as_raw_fd())),
            Stream::Unix(s) => f(&mut SourceFd(&s.as_raw_fd())),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.with_source(|s| s.register(r, t, i))
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.with_source(|s| s.reregister(r, t, i))
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.with_source(|s| s.deregister(r))
    }
}

impl TlsStream {
    fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Makes the rustls session once the client has sent something: a connection that never
    /// does (a TCP probe, an idle attacker) costs a socket, not a session. False: the client
    /// closed without a word.
    fn start_session(&mut self) -> io::Result<bool> {
        if self.tls.is_some() {
            return Ok(true);
        }
        if self.sock.peek(&mut [0u8; 1])? == 0 {
            return Ok(false);
        }
        let session = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        self.tls = Some(session);
        Ok(true)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.start_session()? {
            return Ok(0);
        }
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return Ok(0);
            };
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                // The client closed TCP without `close_notify`: as a plain FIN would be.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                Err(_) if self.eof => return Ok(0),
                Err(_) => {}
            }
            match tls.read_tls(&mut self.sock) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            if let Err(error) = tls.process_new_packets() {
                return Err(self.failed(error));
            }
            // Handshake messages go out now; what the socket does not take waits for WRITABLE.
            self.push_records()?;
        }
    }

    /// Sends the alert rustls queued, notes why, and turns the error into an I/O error.
    fn failed(&mut self, error: rustls::Error) -> io::Error {
        let _ = self.push_records();
        let handshaking = self.tls.as_ref().is_some_and(|t| t.is_handshaking());
        if handshaking && !std::mem::replace(&mut self.failed, true) {
            let client_cert = crate::tls::is_client_cert_error(&error);
            self.client_cert_rejected = client_cert;
            let result = if client_cert {
                "client_cert_rejected"
            } else {
                "failed"
            };
            crate::metrics::metrics().record_tls_handshake(result);
        }
        io::Error::new(io::ErrorKind::InvalidData, error)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // Nothing is written before a request, so before a session either.
            let Some(tls) = self.tls.as_mut() else {
                return Err(io::ErrorKind::NotConnected.into());
            };
            let n = tls.writer().write(buf)?;
            if n > 0 {
                self.push_records()?;
                return Ok(n);
            }
            // rustls' plaintext buffer is full: only sending records makes room.
            if !self.push_records()? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }

    /// Writes rustls' pending records; true once none is left, false when the socket is full.
    fn push_records(&mut self) -> io::Result<bool> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(true);
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// An accept error that concerns one connection only (it gave up before we took it): take
/// the next one. Anything else (EMFILE, ENOBUFS) concerns the listener, and pausing is right.
pub fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
