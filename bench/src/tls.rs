//! The workloads over TLS: one blocking thread per client, each with a rustls client. Simpler
//! than a TLS state machine in the mio loops, and at c=32 on this machine the threads are not
//! the bottleneck: the handshakes are, on both sides alike for every peer measured.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::args::{Args, Mode};
use crate::stats::{Failure, Stats};

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Runs `args.clients` threads until the deadline and merges what they measured.
pub fn drive(args: &Args) -> io::Result<Stats> {
    let config = client_config(args)?;
    let name = ServerName::try_from(args.servername.clone())
        .map_err(|e| io::Error::other(format!("--servername: {e}")))?;
    let start = Instant::now();
    let deadline = start + args.duration;
    let total = thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|_| {
                let (config, name) = (config.clone(), name.clone());
                scope.spawn(move || client(args, &config, &name, deadline))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .fold(Stats::default(), Stats::merge)
    });
    Ok(Stats {
        elapsed: start.elapsed(),
        ..total
    })
}

#[allow(deprecated)] // ring: the same provider command-trigger uses
fn client_config(args: &Args) -> io::Result<Arc<ClientConfig>> {
    let path = args.tls.as_deref().unwrap_or(std::path::Path::new(""));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(io::Error::other)? {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    // X25519 first, as OpenSSL and curl clients offer it (ring's default puts P-384 first,
    // which every TLS peer here would then pay for in portable C, on both sides).
    use rustls::crypto::ring::{default_provider, kx_group};
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..default_provider()
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every request a full handshake, for every peer alike: no session resumption.
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// One client: requests back to back until the deadline.
fn client(
    args: &Args,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    deadline: Instant,
) -> Stats {
    let mut stats = Stats::default();
    let mut kept: Option<BufReader<Tls>> = None;
    while Instant::now() < deadline {
        let started = Instant::now();
        let result = match args.mode {
            Mode::KeepAlive => keep_alive(args, config, name, &mut kept),
            _ => once(args, config, name),
        };
        match result {
            Ok(()) => stats.ok(started.elapsed()),
            Err(failure) => {
                stats.fail(failure);
                kept = None;
                thread::sleep(args.error_pause);
            }
        }
    }
    stats
}

fn connect(
    args: &Args,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> Result<Tls, Failure> {
    let sock =
        TcpStream::connect_timeout(&args.addr, args.timeout).map_err(|_| Failure::Connect)?;
    let _ = sock.set_nodelay(true);
    let timeout = Some(args.timeout);
    let _ = sock
        .set_read_timeout(timeout)
        .and(sock.set_write_timeout(timeout));
    let conn = ClientConnection::new(config.clone(), name.clone()).map_err(|_| Failure::Connect)?;
    Ok(StreamOwned::new(conn, sock))
}

fn io_failure(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Short,
    }
}

/// One connection per request: handshake, send, half-close (close_notify), read to the end.
fn once(
    args: &Args,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> Result<(), Failure> {
    let mut tls = connect(args, config, name)?;
    tls.write_all(&args.send).map_err(io_failure)?;
    if args.half_close {
        tls.conn.send_close_notify();
    }
    tls.flush().map_err(io_failure)?;
    let mut reply = Vec::new();
    match tls.read_to_end(&mut reply) {
        Ok(_) => {}
        // A peer that closes TCP without close_notify after a complete reply.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !reply.is_empty() => {}
        Err(e) => return Err(io_failure(e)),
    }
    let _ = tls.sock.shutdown(Shutdown::Both);
    let body = if args.http {
        http_body(&reply)?
    } else {
        &reply[..]
    };
    if body == args.expect {
        Ok(())
    } else {
        Err(Failure::Wrong)
    }
}

/// `200` and the body of an HTTP response read to its end.
fn http_body(reply: &[u8]) -> Result<&[u8], Failure> {
    let head_end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Failure::Short)?;
    let status_ok = reply.starts_with(b"HTTP/1.1 200") || reply.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        return Err(Failure::Wrong);
    }
    Ok(&reply[head_end + 4..])
}

/// One line out, one line back, on a connection kept across requests.
fn keep_alive(
    args: &Args,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    kept: &mut Option<BufReader<Tls>>,
) -> Result<(), Failure> {
    if kept.is_none() {
        *kept = Some(BufReader::new(connect(args, config, name)?));
    }
    let Some(reader) = kept.as_mut() else {
        return Err(Failure::Connect);
    };
    reader.get_mut().write_all(&args.send).map_err(io_failure)?;
    reader.get_mut().flush().map_err(io_failure)?;
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(io_failure)?;
    if line == args.expect {
        Ok(())
    } else {
        Err(Failure::Wrong)
    }
}
