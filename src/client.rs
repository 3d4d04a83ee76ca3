//! `command-trigger send`: a client for scripts and CronJobs, with the exit statuses a shell
//! can test (0 reply, 1 `ERR` reply or failure, 2 usage). Speaks plain TCP, TLS (`tls://`)
//! and Unix sockets (`unix:`), like the server's listeners.

use crate::auth::TokenOrigin;
use crate::config::{SendConfig, Target, TlsClientFiles};
use crate::error::{Fatal, Outcome};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One address to send to.
#[derive(Clone)]
enum Peer {
    Ip(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(addr) => write!(f, "{addr}"),
            Peer::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The TLS side of a connection: the configuration and the name the certificate must carry.
struct TlsClient {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// Why one exchange with one peer failed; each message names the peer and the step.
#[derive(Debug)]
pub enum SendError {
    Resolve {
        host_port: String,
        error: std::io::Error,
    },
    Connect {
        peer: String,
        error: std::io::Error,
    },
    StartTls {
        peer: String,
        error: rustls::Error,
    },
    Send {
        peer: String,
        error: std::io::Error,
    },
    Read {
        peer: String,
        error: std::io::Error,
    },
    /// Setting a socket's timeout.
    Socket(std::io::Error),
    TimedOut {
        peer: String,
    },
    NoAddress {
        addr: String,
    },
    /// The thread of one `--all` exchange panicked.
    Panicked,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Resolve { host_port, error } => write!(f, "resolving {host_port}: {error}"),
            SendError::Connect { peer, error } => write!(f, "connecting to {peer}: {error}"),
            SendError::StartTls { peer, error } => write!(f, "starting TLS with {peer}: {error}"),
            SendError::Send { peer, error } => write!(f, "sending to {peer}: {error}"),
            SendError::Read { peer, error } => write!(f, "reading from {peer}: {error}"),
            SendError::Socket(error) => error.fmt(f),
            SendError::TimedOut { peer } => write!(f, "{peer}: timed out"),
            SendError::NoAddress { addr } => write!(f, "{addr}: no address"),
            SendError::Panicked => f.write_str("client thread panicked"),
        }
    }
}

impl std::error::Error for SendError {}

/// Sends one request. A reply that is not `ERR` (and not empty) is a success; a failure to
/// reach any server is reported and is a failure, not a fatal error.
pub fn send(config: SendConfig) -> Result<Outcome, Fatal> {
    let token = read_token(config.token.as_ref())?;
    let request = build_request(token.as_deref(), &config)?;
    let tls = match &config.target {
        Target::Tls { host, .. } => Some(tls_client(&config.tls, host)?),
        _ => None,
    };
    let peers = match &config.target {
        Target::Unix(path) => vec![Peer::Unix(path.clone())],
        Target::Tcp(host_port) | Target::Tls { host_port, .. } => match resolve(host_port) {
            Ok(peers) => peers,
            Err(e) => {
                eprintln!("{e}");
                return Ok(Outcome::Failure);
            }
        },
    };
    let deadline = Instant::now() + config.timeout;
    if config.all {
        return Ok(send_to_all(&peers, &request, tls.as_ref(), deadline));
    }
    let mut last_error = SendError::NoAddress {
        addr: config.addr.clone(),
    };
    for peer in &peers {
        match exchange(peer, &request, tls.as_ref(), deadline) {
            Ok(reply) => {
                print_bytes(&reply);
                return Ok(Outcome::failed_if(is_failure(&reply)));
            }
            Err(e) => last_error = e,
        }
    }
    eprintln!("{last_error}");
    Ok(Outcome::Failure)
}

fn resolve(host_port: &str) -> Result<Vec<Peer>, SendError> {
    host_port
        .to_socket_addrs()
        .map(|addrs| addrs.map(Peer::Ip).collect())
        .map_err(|error| SendError::Resolve {
            host_port: host_port.to_owned(),
            error,
        })
}

fn tls_client(files: &TlsClientFiles, host: &str) -> Result<TlsClient, Fatal> {
    let roots = match &files.cacert {
        Some(path) => crate::tls::root_store(path, "--cacert").map_err(Fatal::Usage)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(crate::tls::VERSIONS)
        .map_err(|e| Fatal::Runtime(format!("setting up TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match &files.cert {
        Some((cert, key)) => {
            let certs = crate::tls::read_certs(cert, "--cert").map_err(Fatal::Usage)?;
            let key = crate::tls::read_key(key, "--key").map_err(Fatal::Usage)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| Fatal::Usage(format!("--cert/--key: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    let name = files.servername.as_deref().unwrap_or(host);
    let name = ServerName::try_from(name.to_owned())
        .map_err(|e| Fatal::Usage(format!("server name '{name}': {e}")))?;
    Ok(TlsClient {
        config: Arc::new(config),
        name,
    })
}

/// The operating system's CA certificates, as `curl` would use them.
fn system_roots() -> Result<rustls::RootCertStore, Fatal> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(Fatal::Usage(
            "no system CA certificates found: give --cacert FILE".into(),
        ));
    }
    Ok(roots)
}

/// The token to send, read from where the configuration says; `None` when the server may
/// authenticate by transport instead (a Unix socket, a client certificate).
fn read_token(origin: Option<&TokenOrigin>) -> Result<Option<String>, Fatal> {
    match origin {
        Some(TokenOrigin::File(path)) => token_from_file(path).map(Some),
        Some(TokenOrigin::Env(var)) => token_from_env(var).map(Some),
        None => Ok(None),
    }
}

fn token_from_file(path: &std::path::Path) -> Result<String, Fatal> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Fatal::Usage(format!("reading token file {}: {e}", path.display())))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
        .ok_or_else(|| Fatal::Usage(format!("token file {}: no token in it", path.display())))
}

fn token_from_env(var: &str) -> Result<String, Fatal> {
    let value =
        std::env::var(var).map_err(|_| Fatal::Usage(format!("token variable {var}: not set")))?;
    let value = value.trim();
    if value.is_empty() {
        return Err(Fatal::Usage(format!("token variable {var}: empty")));
    }
    Ok(value.to_owned())
}

/// `TOKEN payload\n`, or just `payload\n` for a server that authenticates by transport.
fn build_request(token: Option<&str>, config: &SendConfig) -> Result<Vec<u8>, Fatal> {
    let mut request = token.unwrap_or_default().as_bytes().to_vec();
    if !config.payload.is_empty() {
        if token.is_some() {
            request.push(b' ');
        }
        request.extend_from_slice(config.payload.join(" ").as_bytes());
    }
    request.push(b'\n');
    if config.body {
        std::io::stdin()
            .read_to_end(&mut request)
            .map_err(|e| Fatal::io("reading the body from stdin", e))?;
    }
    Ok(request)
}

/// Sends to every address at once; prints each reply line prefixed by its address.
fn send_to_all(
    peers: &[Peer],
    request: &[u8],
    tls: Option<&TlsClient>,
    deadline: Instant,
) -> Outcome {
    let results: Vec<(Peer, Result<Vec<u8>, SendError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = peers
            .iter()
            .map(|peer| {
                let handle = scope.spawn(move || exchange(peer, request, tls, deadline));
                (peer.clone(), handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(peer, h)| {
                let result = h.join().unwrap_or(Err(SendError::Panicked));
                (peer, result)
            })
            .collect()
    });
    let mut failed = peers.is_empty();
    for (peer, result) in results {
        match result {
            Ok(reply) => {
                failed |= is_failure(&reply);
                for line in String::from_utf8_lossy(&reply).lines() {
                    println!("{peer} {line}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("{peer} {e}");
            }
        }
    }
    Outcome::failed_if(failed)
}

/// Time left before `deadline`, or an error naming `peer` once it has passed.
fn time_left(peer: &Peer, deadline: Instant) -> Result<Duration, SendError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(SendError::TimedOut {
            peer: peer.to_string(),
        })
    } else {
        Ok(left)
    }
}

/// Connects, sends the request, closes the sending side, and reads the reply to the end.
fn exchange(
    peer: &Peer,
    request: &[u8],
    tls: Option<&TlsClient>,
    deadline: Instant,
) -> Result<Vec<u8>, SendError> {
    let connect_error = |error| SendError::Connect {
        peer: peer.to_string(),
        error,
    };
    match (peer, tls) {
        (Peer::Unix(path), _) => {
            let mut stream = UnixStream::connect(path).map_err(connect_error)?;
            stream
                .set_write_timeout(Some(time_left(peer, deadline)?))
                .map_err(SendError::Socket)?;
            send_request(&mut stream, peer, request)?;
            let _ = stream.shutdown(Shutdown::Write);
            read_reply(peer, deadline, &mut stream, |s, t| s.set_read_timeout(t))
        }
        (Peer::Ip(addr), None) => {
            let mut stream = tcp_connect(*addr, peer, deadline)?;
            send_request(&mut stream, peer, request)?;
            let _ = stream.shutdown(Shutdown::Write);
            read_reply(peer, deadline, &mut stream, |s, t| s.set_read_timeout(t))
        }
        (Peer::Ip(addr), Some(tls)) => {
            let sock = tcp_connect(*addr, peer, deadline)?;
            let session =
                ClientConnection::new(tls.config.clone(), tls.name.clone()).map_err(|error| {
                    SendError::StartTls {
                        peer: peer.to_string(),
                        error,
                    }
                })?;
            let mut stream = StreamOwned::new(session, sock);
            send_request(&mut stream, peer, request)?;
            // `close_notify` is TLS's half-close: the server answers, then closes.
            stream.conn.send_close_notify();
            stream.flush().map_err(|error| SendError::Send {
                peer: peer.to_string(),
                error,
            })?;
            read_reply(peer, deadline, &mut stream, |s, t| {
                s.sock.set_read_timeout(t)
            })
        }
    }
}

fn tcp_connect(addr: SocketAddr, peer: &Peer, deadline: Instant) -> Result<TcpStream, SendError> {
    let stream =
        TcpStream::connect_timeout(&addr, time_left(peer, deadline)?).map_err(|error| {
            SendError::Connect {
                peer: peer.to_string(),
                error,
            }
        })?;
    stream
        .set_write_timeout(Some(time_left(peer, deadline)?))
        .map_err(SendError::Socket)?;
    Ok(stream)
}

fn send_request(stream: &mut impl Write, peer: &Peer, request: &[u8]) -> Result<(), SendError> {
    stream
        .write_all(request)
        .and_then(|_| stream.flush())
        .map_err(|error| SendError::Send {
            peer: peer.to_string(),
            error,
        })
}

/// Reads until the server closes. A TLS server that closes without `close_notify` after a
/// complete reply reads as the end too: the reply is what came.
fn read_reply<S: Read>(
    peer: &Peer,
    deadline: Instant,
    stream: &mut S,
    set_timeout: impl Fn(&S, Option<Duration>) -> std::io::Result<()>,
) -> Result<Vec<u8>, SendError> {
    let mut reply = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = time_left(peer, deadline)?.max(Duration::from_millis(1));
        set_timeout(stream, Some(left)).map_err(SendError::Socket)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(reply),
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !reply.is_empty() => {
                return Ok(reply);
            }
            // A refusal (`ERR busy` at accept) is followed by a reset when our request arrives
            // after the server closed: the server's answer is whole, show it.
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionReset
                    && reply.starts_with(b"ERR ")
                    && reply.ends_with(b"\n") =>
            {
                return Ok(reply);
            }
            Err(error) => {
                return Err(SendError::Read {
                    peer: peer.to_string(),
                    error,
                });
            }
        }
    }
}

/// An `ERR` reply is a failure, and so is an empty one: a server that closes without a word
/// cannot be told from one that refused the connection, and `send --all` must not count a
/// refused pod as a success. A handler that means success says so in its reply.
fn is_failure(reply: &[u8]) -> bool {
    reply.is_empty() || reply.starts_with(b"ERR ")
}

fn print_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes).and_then(|_| out.flush());
}
