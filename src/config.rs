//! The validated settings of `serve`: addresses parsed, token sources named, limits checked.
//! Built from the raw command line in one place, so the server never sees an invalid value.

use crate::auth::{TokenOrigin, TokenSource};
use crate::cli::{AuthMode, FramingArg, ServeArgs};
use crate::error::Fatal;
use crate::framing::Framing;
use crate::schedule::Schedule;
use crate::tls::TlsFiles;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub script: PathBuf,
    pub listen: Vec<ListenSpec>,
    /// Certificate, key and client CA of the `tls://` listeners; set exactly when one exists.
    pub tls: Option<TlsFiles>,
    /// Mode the `unix:` sockets are created with.
    pub unix_mode: u32,
    /// User ids served on `unix:` listeners; empty means any.
    pub allow_uid: Vec<u32>,
    pub token_sources: Vec<TokenSource>,
    pub auth: AuthMode,
    pub framing: Framing,
    pub keep_alive: bool,
    pub workers: usize,
    pub queue: usize,
    pub max_connections: usize,
    pub max_request_bytes: usize,
    pub read_timeout: Duration,
    pub limits: Limits,
    pub shutdown_timeout: Duration,
    pub print_addr: bool,
    /// Networks whose clients are served; empty means any.
    pub allow: Vec<ipnet::IpNet>,
    pub auth_failures: u32,
    pub metrics_listen: Option<SocketAddr>,
    /// `--watch`, made absolute; `on_change` runs when one changes.
    pub watch: Vec<PathBuf>,
    pub watch_debounce: Duration,
    pub watch_poll: Duration,
    /// `--every` and `--cron`; `on_tick` runs on each.
    pub schedules: Vec<Schedule>,
}

/// What one handler may use; shared by `serve` and `call`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub handler_timeout: Duration,
    pub command_timeout: Duration,
    pub max_output_bytes: usize,
    pub max_jobs: usize,
}

impl Config {
    /// Whether `--allow` admits a client from `ip` (IPv4-mapped IPv6 counts as IPv4).
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Whether `--allow-uid` admits a Unix client with user id `uid`.
    pub fn allows_uid(&self, uid: u32) -> bool {
        self.allow_uid.is_empty() || self.allow_uid.contains(&uid)
    }

    pub fn from_args(args: ServeArgs) -> Result<Config, Fatal> {
        let listen = args
            .listen
            .iter()
            .map(|a| ListenSpec::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = tls_files(&args, &listen)?;
        let token_sources = token_sources(&args.token_file, &args.token_env)?;
        // A listener that authenticates its clients itself: mTLS, or a Unix socket's
        // permissions and --allow-uid.
        let authenticates = |spec: &ListenSpec| match spec {
            ListenSpec::Tcp(_) => false,
            ListenSpec::Tls(_) => args.tls_client_ca.is_some(),
            ListenSpec::Unix(_) => true,
        };
        if token_sources.is_empty() && !args.insecure_no_token && !listen.iter().all(authenticates)
        {
            return Err(Fatal::Usage(
                "no token source: give --token-file or --token-env (or --insecure-no-token to accept anyone; \
                 no token is needed when every listener authenticates its clients: tls:// with --tls-client-ca, or unix:)".into(),
            ));
        }
        for (value, flag) in [
            (args.workers, "--workers"),
            (args.max_request_bytes, "--max-request-bytes"),
        ] {
            if value == 0 {
                return Err(Fatal::Usage(format!("{flag} must be at least 1")));
            }
        }
        if args.watch_poll.is_zero() {
            return Err(Fatal::Usage("--watch-poll must be longer than 0s".into()));
        }
        let watch = args
            .watch
            .iter()
            .map(|path| {
                std::path::absolute(path)
                    .map_err(|e| Fatal::Usage(format!("--watch {}: {e}", path.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schedules = args
            .every
            .iter()
            .map(|period| Schedule::every(*period))
            .chain(args.cron.iter().map(|expr| Schedule::cron(expr)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Fatal::Usage)?;
        Ok(Config {
            watch,
            watch_debounce: args.watch_debounce,
            watch_poll: args.watch_poll,
            schedules,
            script: args.script,
            listen,
            tls,
            unix_mode: args.unix_mode,
            allow_uid: args.allow_uid,
            token_sources,
            auth: args.auth,
            framing: match args.framing {
                FramingArg::Line => Framing::Line,
                FramingArg::Stream => Framing::Stream,
                FramingArg::Http => Framing::Http,
            },
            keep_alive: args.keep_alive,
            workers: args.workers,
            queue: args.queue,
            max_connections: args.max_connections,
            max_request_bytes: args.max_request_bytes,
            read_timeout: args.read_timeout,
            limits: Limits {
                handler_timeout: args.handler_timeout,
                command_timeout: args.command_timeout,
                max_output_bytes: args.max_output_bytes,
                max_jobs: args.max_jobs,
            },
            shutdown_timeout: args.shutdown_timeout,
            print_addr: args.print_addr,
            allow: args.allow,
            auth_failures: args.auth_failures,
            metrics_listen: args.metrics_listen,
        })
    }
}

/// One `--listen` value (SPEC §11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenSpec {
    Tcp(SocketAddr),
    Tls(SocketAddr),
    Unix(PathBuf),
}

impl ListenSpec {
    pub fn parse(text: &str) -> Result<ListenSpec, Fatal> {
        let usage = || {
            Fatal::Usage(format!(
                "--listen '{text}': expected IP:PORT, [IPv6]:PORT, tls://IP:PORT or unix:/PATH"
            ))
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(usage());
            }
            return Ok(ListenSpec::Unix(path.into()));
        }
        if let Some(addr) = text.strip_prefix("tls://") {
            return addr.parse().map(ListenSpec::Tls).map_err(|_| usage());
        }
        text.parse().map(ListenSpec::Tcp).map_err(|_| usage())
    }
}

/// The TLS files, checked against the listeners: a certificate with no `tls://` listener is as
/// wrong as a `tls://` listener with none (an operator who set one believes TLS is on).
fn tls_files(args: &ServeArgs, listen: &[ListenSpec]) -> Result<Option<TlsFiles>, Fatal> {
    let has_tls = listen.iter().any(|l| matches!(l, ListenSpec::Tls(_)));
    let usage = |m: &str| Err(Fatal::Usage(m.into()));
    match (&args.tls_cert, &args.tls_key, has_tls) {
        (Some(cert), Some(key), true) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        })),
        (None, None, false) if args.tls_client_ca.is_none() => Ok(None),
        (_, _, false) => usage(
            "--tls-cert, --tls-key or --tls-client-ca given but no tls:// listener: add --listen tls://IP:PORT",
        ),
        (None, _, true) => usage("a tls:// listener needs --tls-cert FILE (and --tls-key FILE)"),
        (_, None, true) => usage("a tls:// listener needs --tls-key FILE"),
    }
}

fn token_sources(files: &[String], vars: &[String]) -> Result<Vec<TokenSource>, Fatal> {
    let file = |spec: &String| {
        TokenSource::parse(spec, |v| TokenOrigin::File(v.into()))
            .map_err(|e| Fatal::Usage(format!("--token-file {e}")))
    };
    let var = |spec: &String| {
        TokenSource::parse(spec, |v| TokenOrigin::Env(v.into()))
            .map_err(|e| Fatal::Usage(format!("--token-env {e}")))
    };
    files.iter().map(file).chain(vars.iter().map(var)).collect()
}

impl Default for Limits {
    /// The defaults of SPEC §2, for `check` and `call`.
    fn default() -> Self {
        Limits {
            handler_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
            max_output_bytes: 1 << 20,
            max_jobs: 16,
        }
    }
}
