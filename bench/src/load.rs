//! One event loop driving its share of the clients: non-blocking sockets on one mio `Poll`,
//! so a handful of threads can keep hundreds of connections busy without being the bottleneck.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Socket, Type};

use crate::args::{Args, Mode};
use crate::stats::{Failure, Stats};
use crate::tls::{TlsConn, TlsSetup};

/// A reply larger than this is wrong for every workload here; stop reading it.
const MAX_REPLY: usize = 64 * 1024;
/// How often timeouts and paused clients are looked at.
const SWEEP: Duration = Duration::from_millis(5);

/// Where one client is in its request.
#[derive(PartialEq, Eq)]
enum Phase {
    /// No connection: waiting for `resume_at` after a failure.
    Paused,
    Connecting,
    Sending,
    Receiving,
}

/// A client's connection: the socket, or a TLS session on it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(sock) => sock.write(buf),
            Conn::Tls(tls) => tls.write(buf),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(sock) => sock.read(buf),
            Conn::Tls(tls) => tls.read(buf),
        }
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(sock) => sock.shutdown(Shutdown::Write),
            Conn::Tls(tls) => tls.shutdown_write(),
        }
    }
}

/// One simulated client and its current connection.
struct Client {
    stream: Option<Conn>,
    phase: Phase,
    /// Bytes of the request already written.
    written: usize,
    /// A write has succeeded on the current connection, so it did connect.
    connected: bool,
    reply: Vec<u8>,
    /// When the current request began (connect in close mode, first write in keep-alive).
    started: Instant,
    /// When a paused client tries again.
    resume_at: Instant,
}

/// Drives `clients` clients until `deadline` or until `quota` requests finished.
pub struct Driver<'a> {
    args: &'a Args,
    poll: Poll,
    clients: Vec<Client>,
    stats: Stats,
    start: Instant,
    /// Source addresses connections are opened from, in turn; empty: the kernel's choice.
    sources: Vec<Ipv4Addr>,
    next_source: usize,
    /// `--tls`: every connection speaks TLS.
    tls: Option<TlsSetup>,
}

/// What a read told us about the reply.
enum ReadOutcome {
    Pending,
    Eof,
    Failed,
}

impl<'a> Driver<'a> {
    pub fn new(args: &'a Args, clients: usize, start: Instant) -> io::Result<Self> {
        let new_client = || Client {
            stream: None,
            phase: Phase::Paused,
            written: 0,
            connected: false,
            reply: Vec::with_capacity(256),
            started: start,
            resume_at: start,
        };
        let clients = (0..clients).map(|_| new_client()).collect();
        let stats = Stats {
            latencies: Vec::with_capacity(1 << 20),
            ..Stats::default()
        };
        let sources = match args.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => (0..args.sources)
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i.min(250)))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Driver {
            args,
            poll: Poll::new()?,
            clients,
            stats,
            start,
            sources,
            next_source: 0,
            tls: args
                .tls
                .is_some()
                .then(|| TlsSetup::new(args))
                .transpose()?,
        })
    }

    pub fn run(mut self, deadline: Instant, quota: Option<u64>) -> io::Result<Stats> {
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline || quota.is_some_and(|q| self.stats.finished() >= q) {
                break;
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP;
            }
            let wait = next_sweep.min(deadline).saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(wait)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => other?,
            }
            for event in events.iter() {
                self.on_event(event.token().0);
            }
        }
        self.stats.elapsed = Instant::now().saturating_duration_since(self.start);
        Ok(self.stats)
    }

    /// Starts paused clients whose pause is over and fails requests that took too long.
    fn sweep(&mut self, now: Instant) {
        for id in 0..self.clients.len() {
            let client = &self.clients[id];
            if client.phase == Phase::Paused {
                if now >= client.resume_at {
                    self.connect(id, now);
                }
            } else if now.saturating_duration_since(client.started) > self.args.timeout {
                self.fail(id, Failure::Timeout, now);
            }
        }
    }

    fn connect(&mut self, id: usize, now: Instant) {
        let client = &mut self.clients[id];
        client.started = now;
        client.written = 0;
        client.connected = false;
        client.reply.clear();
        let source = self.sources.get(self.next_source).copied();
        self.next_source = (self.next_source + 1) % self.sources.len().max(1);
        let opened = open(self.args.addr, source).and_then(|mut stream| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            self.poll
                .registry()
                .register(&mut stream, Token(id), interest)?;
            // Close mode sends one write and then half-closes: Nagle has nothing in flight to
            // wait for, so the option would be one system call per request for nothing.
            // Keep-alive and TLS (whose handshake and request are separate writes) need it.
            if self.args.mode != Mode::Close || self.tls.is_some() {
                let _ = stream.set_nodelay(true);
            }
            match &self.tls {
                Some(tls) => Ok(Conn::Tls(Box::new(tls.connect(stream)?))),
                None => Ok(Conn::Plain(stream)),
            }
        });
        match opened {
            Ok(stream) => {
                client.stream = Some(stream);
                client.phase = Phase::Connecting;
            }
            Err(_) => self.fail(id, Failure::Connect, now),
        }
    }

    fn on_event(&mut self, id: usize) {
        match self.clients[id].phase {
            Phase::Paused => {}
            Phase::Connecting => self.on_connecting(id),
            Phase::Sending => self.send(id),
            Phase::Receiving => self.receive(id),
        }
    }

    /// mio's recipe: an error from `take_error`, or a `peer_addr` that is not yet known. A
    /// plain connection skips both (two system calls per request): its first `write` says the
    /// same, `WouldBlock` while connecting and the connect's error once it failed.
    fn on_connecting(&mut self, id: usize) {
        let Some(conn) = self.clients[id].stream.as_ref() else {
            return;
        };
        let stream = match conn {
            Conn::Plain(_) => return self.start_sending(id),
            Conn::Tls(tls) => &tls.sock,
        };
        match (stream.take_error(), stream.peer_addr()) {
            (Ok(None), Ok(_)) => {
                // Connected by this check: a failed write from here on is `short`, as before.
                self.clients[id].connected = true;
                self.start_sending(id)
            }
            (Ok(None), Err(e)) if e.kind() == io::ErrorKind::NotConnected => {}
            _ => self.fail(id, Failure::Connect, Instant::now()),
        }
    }

    fn start_sending(&mut self, id: usize) {
        if self.args.mode == Mode::KeepAlive {
            self.clients[id].started = Instant::now();
        }
        self.clients[id].phase = Phase::Sending;
        self.send(id);
    }

    fn send(&mut self, id: usize) {
        let args = self.args;
        let request = &args.send;
        let client = &mut self.clients[id];
        let Some(stream) = client.stream.as_mut() else {
            return;
        };
        while client.written < request.len() {
            match stream.write(&request[client.written..]) {
                Ok(n) => {
                    client.written += n;
                    client.connected = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The first write on a connection is what tells a plain one failed to connect.
                Err(_) if !client.connected => {
                    return self.fail(id, Failure::Connect, Instant::now());
                }
                Err(_) => return self.fail(id, Failure::Short, Instant::now()),
            }
        }
        if args.mode == Mode::Close && args.half_close {
            let _ = stream.shutdown_write();
        }
        client.phase = Phase::Receiving;
    }

    fn receive(&mut self, id: usize) {
        let outcome = self.read_some(id);
        let now = Instant::now();
        match (self.args.mode, outcome) {
            (_, ReadOutcome::Failed) => self.fail(id, Failure::Short, now),
            (Mode::KeepAlive, ReadOutcome::Eof) => self.fail(id, Failure::Short, now),
            (Mode::KeepAlive, ReadOutcome::Pending) => self.check_line(id, now),
            (_, ReadOutcome::Eof) => self.check_whole(id, now),
            (_, ReadOutcome::Pending) => {}
        }
    }

    /// Reads until the socket would block or closes. In keep-alive mode it stops at the end of
    /// the reply line: the server sends nothing more before the next request, whose reply then
    /// raises a new edge, so the extra `read` that would only return `WouldBlock` is saved.
    fn read_some(&mut self, id: usize) -> ReadOutcome {
        let keep_alive = self.args.mode == Mode::KeepAlive;
        let client = &mut self.clients[id];
        let Some(stream) = client.stream.as_mut() else {
            return ReadOutcome::Failed;
        };
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return ReadOutcome::Eof,
                Ok(n) => {
                    client.reply.extend_from_slice(&buf[..n]);
                    if client.reply.len() > MAX_REPLY {
                        return ReadOutcome::Failed;
                    }
                    if keep_alive && buf[..n].contains(&b'\n') {
                        return ReadOutcome::Pending;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Failed,
            }
        }
    }

    /// Keep-alive: one reply line answers the request; the next request goes out at once.
    fn check_line(&mut self, id: usize, now: Instant) {
        let client = &mut self.clients[id];
        let Some(end) = client.reply.iter().position(|&b| b == b'\n') else {
            return;
        };
        if end + 1 != client.reply.len() || client.reply != self.args.expect {
            return self.fail(id, Failure::Wrong, now);
        }
        self.stats.ok(now.saturating_duration_since(client.started));
        client.reply.clear();
        client.written = 0;
        client.started = now;
        client.phase = Phase::Sending;
        self.send(id);
    }

    /// Close mode: the whole reply, up to EOF, is checked; then a new connection is opened.
    fn check_whole(&mut self, id: usize, now: Instant) {
        let client = &mut self.clients[id];
        let verdict = if self.args.http {
            check_http(&client.reply, &self.args.expect)
        } else if client.reply == self.args.expect {
            Ok(())
        } else if self.args.expect.starts_with(&client.reply) {
            Err(Failure::Short)
        } else {
            Err(Failure::Wrong)
        };
        match verdict {
            Ok(()) => {
                self.stats.ok(now.saturating_duration_since(client.started));
                client.stream = None;
                self.connect(id, now);
            }
            Err(failure) => self.fail(id, failure, now),
        }
    }

    /// Counts the failure, drops the connection and pauses the client.
    fn fail(&mut self, id: usize, failure: Failure, now: Instant) {
        self.stats.fail(failure);
        let client = &mut self.clients[id];
        client.stream = None;
        client.phase = Phase::Paused;
        client.resume_at = now + self.args.error_pause;
    }
}

/// An HTTP reply answers the request when its status is 200 and its body is `expect`.
fn check_http(reply: &[u8], expect: &[u8]) -> Result<(), Failure> {
    let Some(split) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(Failure::Short);
    };
    let head = &reply[..split];
    let status_ok = head.starts_with(b"HTTP/1.") && head.get(8..13) == Some(b" 200 ");
    if status_ok && &reply[split + 4..] == expect {
        Ok(())
    } else {
        Err(Failure::Wrong)
    }
}

/// Opens a non-blocking connection, from `source` when given (see `Args::sources`).
fn open(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr);
    };
    // Non-blocking from the start: two `fcntl` calls less per request than `set_nonblocking`.
    let socket = Socket::new(
        Domain::IPV4,
        Type::from(libc::SOCK_STREAM | libc::SOCK_NONBLOCK),
        None,
    )?;
    bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
}

/// IP_BIND_ADDRESS_NO_PORT: the port is chosen at `connect`, per destination, not at `bind`,
/// where it would have to be unique for the source address alone.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to an int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
