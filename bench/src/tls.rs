//! The workloads over TLS: a rustls client on each of the event loop's non-blocking sockets
//! ([`TlsConn`]), so TLS cells are driven the same way as plain ones. (A first version ran one
//! blocking thread per client: its context switches took ~0.8 of the 2 cores against ~0.65 for
//! the plain loop, which made TLS look slower than the servers made it.)

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::args::Args;

/// What every TLS connection of a run is made from.
pub struct TlsSetup {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsSetup {
    #[allow(deprecated)] // ring: the same provider command-trigger uses
    pub fn new(args: &Args) -> io::Result<TlsSetup> {
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
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every request a full handshake, for every peer alike: no session resumption.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(args.servername.clone())
            .map_err(|e| io::Error::other(format!("--servername: {e}")))?;
        Ok(TlsSetup {
            config: Arc::new(config),
            name,
        })
    }

    pub fn connect(&self, sock: TcpStream) -> io::Result<TlsConn> {
        let tls = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(io::Error::other)?;
        Ok(TlsConn {
            sock,
            tls,
            close_asked: false,
        })
    }
}

/// A client TLS session on a non-blocking socket, read and written like the socket itself:
/// the handshake runs inside the first reads and writes (rustls holds the request until it
/// is done), and what rustls has to send goes out whenever the socket takes it.
pub struct TlsConn {
    pub sock: TcpStream,
    tls: ClientConnection,
    /// A half-close was asked for; close_notify goes out once the handshake is done (before
    /// it, it would end the handshake, not the request).
    close_asked: bool,
}

impl TlsConn {
    /// Plaintext in: rustls takes it (buffering it during the handshake) and the records go
    /// out as far as the socket allows.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        self.send_records()?;
        Ok(n)
    }

    /// Plaintext out; `Ok(0)` at the server's close_notify or its TCP close.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.send_records()?;
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                Err(_) => {}
            }
            if self.tls.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            self.tls.process_new_packets().map_err(io::Error::other)?;
            self.send_records()?;
        }
    }

    /// The TLS half-close: close_notify after the request, the socket left open for the reply.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.close_asked = true;
        self.send_records()
    }

    fn send_records(&mut self) -> io::Result<()> {
        if self.close_asked && !self.tls.is_handshaking() {
            self.close_asked = false;
            self.tls.send_close_notify();
        }
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
