//! The TLS server path between a client's socket and the framer (issue 12): the server's own
//! `Listener::Tls` and `Stream::tls` on a real loopback TCP connection, read as the loop reads
//! (`Connection::fill_input`: until `WouldBlock`, the end or an error, the handshake's facts
//! taken after each read). The first input byte picks the mode; the rest is a list of writes,
//! each a length byte and that many bytes (fewer at the end of the input).
//!
//! - Even: garbage. The writes are what a client sends on the TCP connection (a bad or
//!   truncated ClientHello, random records), each followed by one pass of the server, then a
//!   FIN. Checked: never panics; no handshake and no plaintext ever come out of it; every
//!   `read` gives plaintext or ends its pass or the connection, so the loop cannot spin; the
//!   connection ends (`Ok(0)` or an error) once the client closed, nothing waits forever; an
//!   error counts the handshake as failed, a clean end as abandoned, never both.
//! - Odd: a real client. Five header bytes choose the TLS version (1.3, 1.2), the framing (HTTP
//!   with ALPN `http/1.1`), the limit (1–256), the server's read size (1–255 bytes, or 64 KiB as
//!   the loop's) and how the client ends (`close_notify`, a bare FIN, or both). A rustls client
//!   trusting `fuzz/certs/ca.crt` shakes hands, then sends each write as its own records.
//!   Checked: the server never fails it; the requests are exactly what the plain model of SPEC
//!   §3 gives for the plaintext (`common/framer.rs`, as the `framing` target checks them); the
//!   end is `Ok(0)` however the client closes; and the same no-spin bound as above.
//!
//! Each execution is one connection (about a millisecond with a handshake); every loop is
//! bounded, and a wait for the sockets that lasts `STALL` is a failure (a server that waits for
//! bytes it already has), not a sleep.

#![no_main]

#[path = "../common/framer.rs"]
mod framer;

use command_trigger::framing::Framing;
use command_trigger::tls::{self, TlsFiles, TlsInfo, TlsServer};
use command_trigger::transport::{Listener, Stream, TcpPort};
use framer::Framer;
use libfuzzer_sys::fuzz_target;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long a wait for the sockets may last: only a stalled connection reaches it.
const STALL: Duration = Duration::from_secs(10);
/// Waits in one execution; a handful is normal (one per handshake flight, one for the end).
const MAX_WAITS: usize = 64;
/// Turns of both ends in one phase; each moves at least a byte or waits.
const MAX_TURNS: usize = 100_000;
/// The loop's read buffer (`server::READ_CHUNK`).
const READ_CHUNK: usize = 64 * 1024;

const LISTENER: Token = Token(0);
const SERVER: Token = Token(1);
const CLIENT: Token = Token(2);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        garbage(rest);
    } else {
        session(rest);
    }
});

/// A length byte, then that many bytes (fewer at the end of the input), again and again.
fn writes(mut data: &[u8]) -> Vec<&[u8]> {
    let mut writes = Vec::new();
    while let Some((&len, rest)) = data.split_first() {
        let (write, next) = rest.split_at(usize::from(len).min(rest.len()));
        writes.push(write);
        data = next;
    }
    writes
}

/// Garbage on the TCP connection, write by write, then a FIN (see the top of the file).
fn garbage(data: &[u8]) {
    let mut conn = Conn::open(&fixture().http, None, READ_CHUNK);
    for write in writes(data) {
        if conn.end.is_some() {
            break;
        }
        conn.raw.extend_from_slice(write);
        conn.run_until(|c| c.raw.is_empty() || c.end.is_some(), "sending garbage");
    }
    if conn.end.is_none() {
        let _ = conn.client.shutdown(Shutdown::Write);
        conn.run_until(|c| c.end.is_some(), "the end of the garbage");
    }
    assert!(conn.handshake.is_none(), "garbage finished a handshake");
    match &conn.end {
        Some(Ok(())) => assert!(
            conn.server.handshake_abandoned(),
            "a clean end not counted as an abandoned handshake"
        ),
        Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => assert!(
            !conn.server.handshake_abandoned(),
            "a failed handshake also counted as abandoned: {e}"
        ),
        _ => {}
    }
}

/// A real client: header bytes `[version, framing, max, read_size, end]`, then the writes.
fn session(data: &[u8]) {
    let Some((&[version, framing, max, read_size, end], rest)) = data.split_first_chunk() else {
        return;
    };
    let tls13 = version % 2 == 0;
    let framing = match framing % 3 {
        0 => Framing::Line,
        1 => Framing::Stream,
        _ => Framing::Http,
    };
    let max = 1 + usize::from(max);
    let read_size = match read_size {
        0 => READ_CHUNK,
        n => usize::from(n),
    };
    let alpn_http = framing == Framing::Http;
    let port = if alpn_http {
        &fixture().http
    } else {
        &fixture().plain
    };
    let server_name = "localhost".try_into().expect("a valid server name");
    let client = ClientConnection::new(client_config(tls13, alpn_http), server_name)
        .expect("a client connection");
    let mut conn = Conn::open(port, Some(client), read_size);
    conn.framer = Some(Framer::new(framing, max));

    conn.run_until(
        |c| c.handshake.is_some() && !c.tls().is_handshaking() && !c.tls().wants_write(),
        "the handshake",
    );
    let info = conn.handshake.as_ref().expect("the handshake's facts");
    assert_eq!(info.version, if tls13 { "TLSv1.3" } else { "TLSv1.2" });
    if alpn_http {
        assert_eq!(conn.tls().alpn_protocol(), Some(&b"http/1.1"[..]));
    }

    let writes = writes(rest);
    for write in &writes {
        conn.tls_mut()
            .writer()
            .write_all(write)
            .expect("plaintext into rustls");
        conn.run_until(|c| !c.tls().wants_write(), "sending plaintext");
    }
    if end % 3 != 1 {
        conn.tls_mut().send_close_notify();
    }
    if end % 3 != 0 {
        conn.run_until(|c| !c.tls().wants_write(), "sending close_notify");
        conn.client
            .shutdown(Shutdown::Write)
            .expect("shutting down the client");
    }
    conn.run_until(|c| c.end.is_some(), "the end");

    let seen = conn.framer.take().expect("the framer").eof();
    framer::check(framing, &writes.concat(), max, &seen);
}

/// A TLS listener as the server makes it, with its descriptor to wait for accepts on.
struct Port {
    listener: Listener,
    fd: RawFd,
    addr: SocketAddr,
}

/// Made once per process: two listeners (without and with ALPN `http/1.1`) and the CA.
struct Fixture {
    plain: Port,
    http: Port,
    roots: Arc<RootCertStore>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ca = cert_path("ca.crt");
        let roots = tls::root_store(&ca, "ca").expect("reading fuzz/certs/ca.crt");
        Fixture {
            plain: port(false),
            http: port(true),
            roots: Arc::new(roots),
        }
    })
}

/// The test CA, server certificate and key, checked in (see `fuzz/certs/README.md`).
fn cert_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

/// Loaded by `TlsServer::load`, so the handshakes use the server's own configuration.
fn port(alpn_http: bool) -> Port {
    let files = TlsFiles {
        cert: cert_path("server.crt"),
        key: cert_path("server.key"),
        client_ca: None,
    };
    let server = TlsServer::load(files, alpn_http).expect("loading fuzz/certs");
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = mio::net::TcpListener::bind(loopback).expect("binding 127.0.0.1:0");
    let addr = listener.local_addr().expect("the listener's address");
    // Valid as long as the listener, which lives in a static.
    let fd = listener.as_raw_fd();
    Port {
        listener: Listener::Tls(TcpPort::new(listener), Arc::new(server)),
        fd,
        addr,
    }
}

/// A fresh client configuration per connection: no session is resumed, every run is the same.
fn client_config(tls13: bool, alpn_http: bool) -> Arc<ClientConfig> {
    let version = if tls13 {
        &rustls::version::TLS13
    } else {
        &rustls::version::TLS12
    };
    let mut config = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[version])
        .expect("the provider supports both versions")
        .with_root_certificates(fixture().roots.clone())
        .with_no_client_auth();
    if alpn_http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Arc::new(config)
}

/// One connection: the client end (raw bytes or a rustls client), the server's stream, and
/// what the server side has given so far.
struct Conn {
    // The server first: dropped first, it resets the connection (no TIME_WAIT to pile up).
    server: Stream,
    client: TcpStream,
    /// The rustls client; none in garbage mode, where `raw` is what is left to send.
    tls: Option<ClientConnection>,
    raw: Vec<u8>,
    poll: Poll,
    events: Events,
    waits: usize,
    /// The server's read buffer.
    scratch: Vec<u8>,
    /// Server passes (reads until `WouldBlock` or the end), `read` calls, plaintext bytes.
    passes: usize,
    reads: usize,
    interrupted: usize,
    plaintext: usize,
    /// The handshake's facts, taken as the loop takes them.
    handshake: Option<TlsInfo>,
    framer: Option<Framer>,
    /// How the server's side ended: `Ok(0)` or an error.
    end: Option<io::Result<()>>,
}

impl Conn {
    fn open(port: &Port, tls: Option<ClientConnection>, read_size: usize) -> Conn {
        let mut poll = Poll::new().expect("a poll");
        poll.registry()
            .register(&mut SourceFd(&port.fd), LISTENER, Interest::READABLE)
            .expect("registering the listener");
        let client = std::net::TcpStream::connect(port.addr).expect("connecting");
        client.set_nonblocking(true).expect("a non-blocking client");
        // Each write goes out as it is made, as separate segments when the server is quick.
        client.set_nodelay(true).expect("TCP_NODELAY");
        let me = client.local_addr().expect("the client's address");
        let mut client = TcpStream::from_std(client);
        let mut events = Events::with_capacity(8);
        let mut server = accept(port, me, &mut poll, &mut events);
        let both = Interest::READABLE | Interest::WRITABLE;
        let registry = poll.registry();
        registry
            .register(&mut server, SERVER, both)
            .expect("registering");
        registry
            .register(&mut client, CLIENT, both)
            .expect("registering");
        Conn {
            server,
            client,
            tls,
            raw: Vec::new(),
            poll,
            events,
            waits: 0,
            scratch: vec![0; read_size],
            passes: 0,
            reads: 0,
            interrupted: 0,
            plaintext: 0,
            handshake: None,
            framer: None,
            end: None,
        }
    }

    fn tls(&self) -> &ClientConnection {
        self.tls.as_ref().expect("a rustls client")
    }

    fn tls_mut(&mut self) -> &mut ClientConnection {
        self.tls.as_mut().expect("a rustls client")
    }

    /// Turns both ends until `done`, waiting for the sockets whenever a turn moved nothing.
    fn run_until(&mut self, done: impl Fn(&Conn) -> bool, what: &str) {
        for _ in 0..MAX_TURNS {
            if self.tls.is_some()
                && let Some(Err(e)) = &self.end
            {
                panic!("{what}: the server failed a valid client: {e}");
            }
            if done(self) {
                return;
            }
            if !self.turn() && !done(self) {
                self.wait(what);
            }
        }
        panic!("{what}: no end after {MAX_TURNS} turns");
    }

    /// The client sends, the server reads, the client receives; false when nothing moved.
    fn turn(&mut self) -> bool {
        let sent = match self.tls.as_mut() {
            Some(tls) => send_records(tls, &mut self.client),
            None => send_raw(&mut self.raw, &mut self.client),
        };
        // Forget the readiness of bytes already there: the pass must take them all, or the
        // loop, edge-triggered, would not be woken for them again; a wait then stalls.
        let _ = self.poll.poll(&mut self.events, Some(Duration::ZERO));
        let read = self.server_pass();
        let received = self
            .tls
            .as_mut()
            .is_some_and(|tls| receive_records(tls, &mut self.client));
        sent || read || received
    }

    fn wait(&mut self, what: &str) {
        self.waits += 1;
        assert!(self.waits <= MAX_WAITS, "{what}: {MAX_WAITS} waits");
        match self.poll.poll(&mut self.events, Some(STALL)) {
            Ok(()) => assert!(!self.events.is_empty(), "{what}: stalled for {STALL:?}"),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("poll: {e}"),
        }
    }

    /// The server reads as the loop does on READABLE: until the socket is empty, the client
    /// closes, or an error. True when it got anything (plaintext, the handshake, the end).
    fn server_pass(&mut self) -> bool {
        if self.end.is_some() {
            return false;
        }
        self.passes += 1;
        let mut got = false;
        loop {
            // Each call gives at least a byte of plaintext or ends the pass: anything more
            // is a call that did nothing, which the loop would repeat forever.
            self.reads += 1;
            assert!(
                self.reads <= self.plaintext + self.passes,
                "Stream::read spins: {} calls, {} passes, {} bytes of plaintext",
                self.reads,
                self.passes,
                self.plaintext
            );
            let read = self.server.read(&mut self.scratch);
            if let Some(info) = self.server.take_tls_info() {
                self.handshake = Some(info);
                got = true;
            }
            match read {
                Ok(0) => {
                    self.end = Some(Ok(()));
                    return true;
                }
                Ok(n) => {
                    assert!(
                        self.handshake.is_some(),
                        "plaintext from a connection whose handshake did not finish"
                    );
                    self.plaintext += n;
                    if let Some(framer) = self.framer.as_mut() {
                        framer.read(&self.scratch[..n]);
                    }
                    got = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Records the socket did not take, as the loop sends them on WRITABLE.
                    if let Err(e) = self.server.flush_transport() {
                        self.end = Some(Err(e));
                        return true;
                    }
                    return got;
                }
                // Retried, as the loop does; counted as a pass of its own, a few times at most.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.passes += 1;
                    self.interrupted += 1;
                    assert!(
                        self.interrupted <= MAX_WAITS,
                        "Stream::read interrupted forever"
                    );
                }
                Err(e) => {
                    self.end = Some(Err(e));
                    return true;
                }
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.server.reset_on_drop();
    }
}

/// Accepts the connection from `me` through the server's own `Listener::accept`, waiting
/// on `poll` (where the listener is registered) while it is not there yet.
fn accept(port: &Port, me: SocketAddr, poll: &mut Poll, events: &mut Events) -> Stream {
    for _ in 0..MAX_WAITS {
        match port.listener.accept() {
            Ok(accepted) if accepted.endpoints.peer == me => return accepted.stream,
            Ok(_) => {} // not ours (another process on this port): dropped
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll.poll(events, Some(STALL)).expect("poll");
                assert!(!events.is_empty(), "accept stalled for {STALL:?}");
            }
            Err(e) => panic!("accepting: {e}"),
        }
    }
    panic!("our connection never came");
}

/// Writes what rustls has queued; true when anything went out.
fn send_records(tls: &mut ClientConnection, sock: &mut TcpStream) -> bool {
    let mut sent = false;
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(_) => sent = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("the client could not send: {e}"),
        }
    }
    sent
}

/// Writes the garbage left to send; true when any went out.
fn send_raw(raw: &mut Vec<u8>, sock: &mut TcpStream) -> bool {
    let mut sent = 0;
    while sent < raw.len() {
        match sock.write(&raw[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("the client could not send: {e}"),
        }
    }
    raw.drain(..sent);
    sent > 0
}

/// Reads and processes what the server sent; true when anything came.
fn receive_records(tls: &mut ClientConnection, sock: &mut TcpStream) -> bool {
    let mut got = false;
    loop {
        match tls.read_tls(sock) {
            Ok(0) => return got,
            Ok(_) => {
                got = true;
                if let Err(e) = tls.process_new_packets() {
                    panic!("the client refused the server: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
            Err(e) => panic!("the client could not receive: {e}"),
        }
    }
}
