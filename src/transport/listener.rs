//! The listening sockets: TCP, TLS over TCP and Unix, and what accepting on each gives the
//! loop ([`Accepted`]: a [`Stream`] with its endpoints). A Unix socket owns its path: a stale
//! one left by a crash is replaced, a file that is not a socket never is, and a clean exit
//! removes it.

use super::*;

/// A listening socket of any kind.
pub enum Listener {
    Tcp(TcpPort),
    /// New handshakes take the `TlsServer`'s current configuration (it rotates).
    Tls(TcpPort, Arc<TlsServer>),
    Unix(UnixSocket),
}

/// A TCP listening socket, and its address when that is one address (not 0.0.0.0 or ::): then
/// it is every connection's own end too, known without a `getsockname` per connection.
pub struct TcpPort {
    listener: TcpListener,
    fixed_local: Option<SocketAddr>,
}

impl TcpPort {
    /// Nagle's algorithm is switched off on the listening socket: Linux copies the option to
    /// every socket accepted from it, one system call less per connection.
    pub fn new(listener: TcpListener) -> TcpPort {
        let _ = rustix::net::sockopt::set_tcp_nodelay(&listener, true);
        let fixed_local = listener
            .local_addr()
            .ok()
            .filter(|addr| !addr.ip().is_unspecified());
        TcpPort {
            listener,
            fixed_local,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn accept(&self, kind: ListenerKind) -> io::Result<(TcpStream, Arc<Endpoints>)> {
        let (stream, peer) = self.listener.accept()?;
        let local = match self.fixed_local {
            Some(local) => local,
            None => stream.local_addr().map_err(per_connection)?,
        };
        Ok((stream, Endpoints::tcp(peer, local, kind)))
    }
}

/// A failure after `accept(2)` itself succeeded concerns that one connection.
fn per_connection(e: io::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, e)
}

/// A Unix listening socket that removes its file when it is dropped (a clean exit), unless
/// the file is no longer the one it made.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    identity: Option<(u64, u64)>,
}

/// One accepted connection and the facts the script sees about it.
pub struct Accepted {
    pub stream: Stream,
    pub endpoints: Arc<Endpoints>,
}

impl Listener {
    pub fn kind(&self) -> ListenerKind {
        match self {
            Listener::Tcp(_) => ListenerKind::Tcp,
            Listener::Tls(..) => ListenerKind::Tls,
            Listener::Unix(_) => ListenerKind::Unix,
        }
    }

    /// The address as `--listen` spells it: `IP:PORT`, `tls://IP:PORT`, `unix:/PATH`.
    pub fn describe(&self) -> io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Tls(l, _) => format!("tls://{}", l.local_addr()?),
            Listener::Unix(u) => format!("unix:{}", u.path.display()),
        })
    }

    /// Accepts one connection. A TLS stream starts its handshake with the configuration of
    /// this moment; a Unix stream carries its client's credentials.
    ///
    /// A failure after `accept(2)` itself succeeded (the client reset already, say) concerns
    /// that one connection: it comes back as `ConnectionAborted`, never as an error that would
    /// make the loop pause accepting.
    pub fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (stream, endpoints) = l.accept(ListenerKind::Tcp)?;
                Ok(Accepted {
                    stream: Stream::Tcp(Arc::new(stream)),
                    endpoints,
                })
            }
            Listener::Tls(l, server) => {
                let (stream, endpoints) = l.accept(ListenerKind::Tls)?;
                Ok(Accepted {
                    stream: Stream::tls(stream, server.config()).map_err(per_connection)?,
                    endpoints,
                })
            }
            Listener::Unix(u) => {
                let (stream, _) = u.listener.accept()?;
                let cred = rustix::net::sockopt::socket_peercred(&stream)
                    .map_err(|e| per_connection(e.into()))?;
                let cred = PeerCred {
                    pid: cred.pid.as_raw_nonzero().get(),
                    uid: cred.uid.as_raw(),
                    gid: cred.gid.as_raw(),
                };
                let local = format!("unix:{}", u.path.display());
                Ok(Accepted {
                    stream: Stream::Unix(Arc::new(stream)),
                    endpoints: Endpoints::unix(local, cred),
                })
            }
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => &mut l.listener,
            Listener::Unix(u) => &mut u.listener,
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.source().register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.source().reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.source().deregister(r)
    }
}

/// Why a Unix socket could not be made: the operator's mistake (exit 2) or the system's (1).
pub enum UnixBindError {
    Usage(String),
    Runtime(String),
}

impl UnixSocket {
    /// Binds `path` with `mode`, replacing a stale socket but never any other kind of file.
    pub fn bind(path: &Path, mode: u32) -> Result<UnixSocket, UnixBindError> {
        remove_stale(path)?;
        let runtime = |what: &str, e: io::Error| {
            UnixBindError::Runtime(format!("{what} unix:{}: {e}", path.display()))
        };
        let listener = UnixListener::bind(path).map_err(|e| runtime("binding", e))?;
        let _ = rustix::net::listen(&listener, crate::transport::LISTEN_BACKLOG);
        rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode))
            .map_err(|e| runtime("setting the mode of", e.into()))?;
        Ok(UnixSocket {
            listener,
            identity: identity(path),
            path: path.to_owned(),
        })
    }
}

/// Asked of `listen(2)`; Linux caps it at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 4096;

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A socket left by a crash is removed; a live server's socket, or a file that is not a
/// socket, is left alone and reported.
fn remove_stale(path: &Path) -> Result<(), UnixBindError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(UnixBindError::Runtime(format!(
                "looking at unix:{}: {e}",
                path.display()
            )));
        }
    };
    if !meta.file_type().is_socket() {
        return Err(UnixBindError::Usage(format!(
            "--listen unix:{}: a file that is not a socket is there; not replacing it",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(UnixBindError::Runtime(format!(
            "--listen unix:{}: another server is listening there",
            path.display()
        )));
    }
    log::info!("replacing stale socket {}", path.display());
    std::fs::remove_file(path).map_err(|e| {
        UnixBindError::Runtime(format!("removing stale socket {}: {e}", path.display()))
    })
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if self.identity.is_some() && identity(&self.path) == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies are small and written once; a connection that inherited Nagle would hold the
    /// second of two writes for the peer's delayed ACK (40 ms).
    #[test]
    fn an_accepted_connection_has_nagle_off() -> io::Result<()> {
        let port = TcpPort::new(TcpListener::bind(
            "127.0.0.1:0".parse().map_err(io::Error::other)?,
        )?);
        let _client = std::net::TcpStream::connect(port.local_addr()?)?;
        // A blocking connect to loopback returns once the connection is queued to accept.
        let (accepted, _) = port.accept(ListenerKind::Tcp)?;
        assert!(accepted.nodelay()?);
        Ok(())
    }
}
