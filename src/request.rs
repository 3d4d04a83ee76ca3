//! A request on its way to the script, the reply on its way back, and the one log line that
//! tells an operator what happened to it.

use crate::framing::Framing;
use crate::http::HttpHead;
use crate::tls::TlsInfo;
use crate::transport::{ListenerKind, PeerCred};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A complete, authenticated (or `--auth script`) request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Increasing from 1; the same number is in the log and in `ERR ... (request N)`.
    pub id: u64,
    /// The name of the token that matched; `None` when none did (or none is configured).
    pub token_name: Option<Arc<str>>,
    pub payload: Vec<u8>,
    pub body: Vec<u8>,
    pub endpoints: Arc<Endpoints>,
    pub framing: Framing,
    /// `--keep-alive`: whether line framing reads another request after this one's reply.
    pub keep_alive: bool,
    /// HTTP framing: the request line and headers.
    pub http: Option<HttpHead>,
}

/// A connection's two addresses, with their text formatted when first asked for and kept for
/// the connection's next requests: most requests never ask (formatting both was a fifth of a
/// trivial request's instructions), and what its transport knows of the client.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// The client's address; `0.0.0.0:0` on a Unix socket, which has none (see [`Self::ip`]).
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `req.peer`: `IP:PORT`, or `unix`.
    peer_text: OnceLock<String>,
    /// `req.local`: `IP:PORT`, or `unix:/PATH`.
    local_text: OnceLock<String>,
    /// `req.listener`.
    pub listener: ListenerKind,
    /// `req.tls`: set once the handshake has finished.
    pub tls: Option<Arc<TlsInfo>>,
    /// `req.peer_cred`: the Unix client's pid, uid and gid.
    pub peer_cred: Option<PeerCred>,
}

impl Endpoints {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Arc<Endpoints> {
        Endpoints::tcp(peer, local, ListenerKind::Tcp)
    }

    /// A TCP connection, plain or TLS.
    pub fn tcp(peer: SocketAddr, local: SocketAddr, listener: ListenerKind) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            peer,
            local,
            peer_text: OnceLock::new(),
            local_text: OnceLock::new(),
            listener,
            tls: None,
            peer_cred: None,
        })
    }

    /// A Unix socket connection: no addresses, the client's credentials instead.
    pub fn unix(local_text: String, cred: PeerCred) -> Arc<Endpoints> {
        let none = SocketAddr::from(([0, 0, 0, 0], 0));
        Arc::new(Endpoints {
            peer: none,
            local: none,
            peer_text: OnceLock::from("unix".to_owned()),
            local_text: OnceLock::from(local_text),
            listener: ListenerKind::Unix,
            tls: None,
            peer_cred: Some(cred),
        })
    }

    /// The client's IP, for per-IP policies (`--allow`, `--auth-failures`); `None` on a Unix
    /// socket, whose clients are told apart by user id instead.
    pub fn ip(&self) -> Option<IpAddr> {
        (self.listener != ListenerKind::Unix).then(|| self.peer.ip())
    }

    /// `req.peer`, and the client in log lines: `IP:PORT`, or `unix`.
    pub fn peer_text(&self) -> &str {
        self.peer_text.get_or_init(|| self.peer.to_string())
    }

    /// `req.local`: `IP:PORT`, or `unix:/PATH`.
    pub fn local_text(&self) -> &str {
        self.local_text.get_or_init(|| self.local.to_string())
    }

    /// The same connection after its TLS handshake.
    pub fn with_tls(&self, info: TlsInfo) -> Arc<Endpoints> {
        Arc::new(Endpoints {
            tls: Some(Arc::new(info)),
            ..self.clone()
        })
    }
}

/// What the server sends back for one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// The script's `close` when it chose; otherwise the framing's default applies.
    pub close: Option<bool>,
    /// HTTP: the status the script or the server chose (default 200, or 204 for `()`).
    pub status: Option<u16>,
    /// HTTP: extra response headers.
    pub headers: Vec<(String, String)>,
    /// HTTP: the reply map's `trailers`, sent after a streamed (chunked) body.
    pub trailers: Vec<(String, String)>,
    pub content: Content,
}

/// What kind of value the body came from, for HTTP's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Content {
    #[default]
    Text,
    Binary,
    /// `()`: no body at all (HTTP 204).
    Nothing,
}

/// The replies the server makes itself (SPEC §3), with their HTTP status (SPEC §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerError {
    Unauthorized,
    /// `--auth-failures` tripped: the token was not even checked.
    BackedOff,
    Busy,
    TooLarge,
    /// HTTP: the request line and headers alone are past `--max-request-bytes`.
    HeadTooLarge,
    Malformed,
    HandlerFailed(u64),
    HandlerTimedOut(u64),
    ShuttingDown,
}

impl ServerError {
    fn message(self) -> String {
        match self {
            ServerError::Unauthorized | ServerError::BackedOff => "unauthorized".into(),
            ServerError::Busy => "busy".into(),
            ServerError::TooLarge => "request too large".into(),
            ServerError::HeadTooLarge => "request head too large".into(),
            ServerError::Malformed => "bad request".into(),
            ServerError::HandlerFailed(id) => format!("handler failed (request {id})"),
            ServerError::HandlerTimedOut(id) => format!("handler timed out (request {id})"),
            ServerError::ShuttingDown => "shutting down".into(),
        }
    }

    fn status(self) -> u16 {
        match self {
            ServerError::Unauthorized => 401,
            ServerError::BackedOff => 429,
            ServerError::Busy | ServerError::ShuttingDown => 503,
            ServerError::TooLarge => 413,
            ServerError::HeadTooLarge => 431,
            ServerError::Malformed => 400,
            ServerError::HandlerFailed(_) => 500,
            ServerError::HandlerTimedOut(_) => 504,
        }
    }
}

impl Reply {
    /// One of the server's own `ERR ...` replies, always followed by a close.
    pub fn error(error: ServerError) -> Reply {
        let headers = match error {
            ServerError::Unauthorized => vec![("www-authenticate".to_owned(), "Bearer".to_owned())],
            _ => Vec::new(),
        };
        Reply {
            bytes: format!("ERR {}\n", error.message()).into_bytes(),
            close: Some(true),
            status: Some(error.status()),
            headers,
            trailers: Vec::new(),
            content: Content::Text,
        }
    }
}

/// The outcome word of the request log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Unauthorized,
    Busy,
    Failed,
    TimedOut,
    ShuttingDown,
}

impl Verdict {
    pub const ALL: [Verdict; 6] = [
        Verdict::Ok,
        Verdict::Unauthorized,
        Verdict::Busy,
        Verdict::Failed,
        Verdict::TimedOut,
        Verdict::ShuttingDown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Unauthorized => "unauthorized",
            Verdict::Busy => "busy",
            Verdict::Failed => "failed",
            Verdict::TimedOut => "timed-out",
            Verdict::ShuttingDown => "shutting-down",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The single info line per request (SPEC §7). Holds no token and no payload bytes.
pub struct RequestLog<'a> {
    pub id: u64,
    pub peer: &'a str,
    pub token_name: Option<&'a str>,
    pub payload_bytes: usize,
    pub verdict: Verdict,
    pub duration: Duration,
    pub reply_bytes: usize,
    pub exit_codes: &'a [i32],
}

impl fmt::Display for RequestLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request {} peer={} token={} payload={}B outcome={} duration={:.1}ms reply={}B commands={:?}",
            self.id,
            self.peer,
            self.token_name.unwrap_or("-"),
            self.payload_bytes,
            self.verdict,
            self.duration.as_secs_f64() * 1000.0,
            self.reply_bytes,
            self.exit_codes,
        )
    }
}

/// Writes the one info line of a request (its fields also go to JSON logs as fields) and
/// counts it in the metrics. Called once per request, wherever it ended: by the worker that
/// ran it, or by the loop when the server answered it itself.
pub fn log_request(
    request: &Request,
    verdict: Verdict,
    started: Instant,
    reply_bytes: usize,
    exit_codes: &[i32],
) {
    let metrics = crate::metrics::metrics();
    metrics.record_request(verdict, started.elapsed());
    if verdict == Verdict::Unauthorized {
        metrics.auth_failures.inc();
    }
    // Before the line is built: its peer text would be formatted for nothing.
    if !log::log_enabled!(log::Level::Info) {
        return;
    }
    let line = RequestLog {
        id: request.id,
        peer: request.endpoints.peer_text(),
        token_name: request.token_name.as_deref(),
        payload_bytes: request.payload.len() + request.body.len(),
        verdict,
        duration: started.elapsed(),
        reply_bytes,
        exit_codes,
    };
    log::info!(
        request_id = line.id,
        peer:% = line.peer,
        token_name:serde = line.token_name,
        payload_bytes = line.payload_bytes,
        outcome:% = line.verdict,
        duration_ms = line.duration.as_secs_f64() * 1000.0,
        reply_bytes = line.reply_bytes,
        exit_codes:serde = line.exit_codes;
        "{line}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_index_their_own_place() {
        // `metrics` indexes per-outcome counters by `verdict as usize`.
        for (index, verdict) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*verdict as usize, index);
        }
    }

    #[test]
    fn addresses_read_the_same_however_often_and_wherever_they_are_read() {
        let peer = SocketAddr::from(([10, 1, 2, 3], 40000));
        let local = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 9000));
        let tcp = Endpoints::tcp(peer, local, ListenerKind::Tcp);
        let after_handshake = tcp.with_tls(TlsInfo::default());
        for endpoints in [&tcp, &after_handshake, &tcp] {
            assert_eq!(endpoints.peer_text(), "10.1.2.3:40000");
            assert_eq!(endpoints.local_text(), "[::]:9000");
        }
        let cred = PeerCred {
            pid: 1,
            uid: 2,
            gid: 3,
        };
        let unix = Endpoints::unix("unix:/run/ct.sock".into(), cred);
        assert_eq!(
            (unix.peer_text(), unix.local_text()),
            ("unix", "unix:/run/ct.sock")
        );
    }
}
