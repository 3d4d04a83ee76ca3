//! The validated settings of `serve`: addresses parsed, token sources named, limits checked.
//! Built from the raw command line in one place, so the server never sees an invalid value.

mod clients;

pub use clients::{CallConfig, CallInput, SendConfig, Target, TlsClientFiles};

use crate::auth::{TokenOrigin, TokenSource};
use crate::cli::{AuthMode, FramingArg, ServeArgs};
use crate::error::{ConfigError, Fatal};
use crate::framing::Framing;
use crate::schedule::Schedule;
use crate::tls::TlsFiles;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What `serve` runs with. Every value is checked (see `validate`), so the loop can add any
/// of these durations to an `Instant` and size any buffer by them without a second thought.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--script`: the file that defines `handle(req)`, loaded at start and on change.
    pub script: PathBuf,
    /// `--listen`: plain TCP, `tls://` and `unix:` listeners, in the order given (which
    /// `--print-addr` keeps).
    pub listen: Vec<ListenSpec>,
    /// Certificate, key and client CA of the `tls://` listeners; set exactly when one exists.
    pub tls: Option<TlsFiles>,
    /// Mode the `unix:` sockets are created with.
    pub unix_mode: u32,
    /// User ids served on `unix:` listeners; empty means any.
    pub allow_uid: Vec<u32>,
    /// `--token-file` and `--token-env`; empty only with `--insecure-no-token` or when every
    /// listener authenticates its clients itself.
    pub token_sources: Vec<TokenSource>,
    /// `--auth`: whether the server or the script turns away a wrong token.
    pub auth: AuthMode,
    /// `--framing`: how a connection's bytes are cut into requests, and replies framed.
    pub framing: Framing,
    /// `--keep-alive`: read another request after a reply (line framing; HTTP decides per
    /// request, stream framing never can).
    pub keep_alive: bool,
    /// `--workers`: handler threads, so requests running at once.
    pub workers: usize,
    /// `--pin-workers`: each worker bound to one CPU (see `placement`).
    pub pin_workers: bool,
    /// `--queue`: complete requests that may wait for a worker before `ERR busy`.
    pub queue: usize,
    /// `--max-connections`: open client connections before new ones get `ERR busy`.
    pub max_connections: usize,
    /// Open connections from one client IP; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// `--max-request-bytes`: the largest request read; past it `ERR request too large`.
    pub max_request_bytes: usize,
    /// `--read-timeout`: time to send a whole request, and the keep-alive idle time.
    pub read_timeout: Duration,
    /// What each handler may use; `call` builds the same from its own flags.
    pub limits: Limits,
    /// `--shutdown-timeout`: how long a stop waits for handlers and jobs before killing.
    pub shutdown_timeout: Duration,
    /// `--print-addr`: print the bound addresses on stdout (how tests find port 0).
    pub print_addr: bool,
    /// Networks whose clients are served; empty means any.
    pub allow: Vec<ipnet::IpNet>,
    /// `--auth-failures`: wrong tokens from one IP within 60 s before it is refused; 0 off.
    pub auth_failures: u32,
    /// `--metrics-listen`: where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `--watch`, made absolute; `on_change` runs when one changes.
    pub watch: Vec<PathBuf>,
    /// `--watch-debounce`: quiet time after a change before `on_change` runs.
    pub watch_debounce: Duration,
    /// `--watch-poll`: how often watched paths are compared by content as well.
    pub watch_poll: Duration,
    /// `--every` and `--cron`; `on_tick` runs on each.
    pub schedules: Vec<Schedule>,
    /// `--state-file`: keep the script's state in this database instead of in memory.
    pub state_file: Option<PathBuf>,
}

/// What one handler may use; shared by `serve` and `call`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock limit of one `handle(req)` (or trigger) call, commands included.
    pub handler_timeout: Duration,
    /// Default limit of one command; a script may ask for less or more per command.
    pub command_timeout: Duration,
    /// Captured stdout and stderr of one command, each; the rest is dropped and flagged.
    pub max_output_bytes: usize,
    /// Background jobs alive at once; `start` beyond it throws.
    pub max_jobs: usize,
    /// The largest request the script may be handed: its blob and string limits derive from it.
    pub max_request_bytes: usize,
    /// Combined output kept per background job, for `job_output` and `attach`.
    pub job_output_bytes: usize,
    /// Keys the state (and, separately, the rate limiter) holds at most.
    pub state_max_keys: usize,
}

impl Config {
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
            return Err(ConfigError::NoTokenSource.into());
        }
        validate(&args)?;
        let watch = args
            .watch
            .iter()
            .map(|path| {
                std::path::absolute(path).map_err(|e| ConfigError::WatchPath {
                    path: path.clone(),
                    error: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schedules = args
            .every
            .iter()
            .map(|period| Schedule::every(*period))
            .chain(args.cron.iter().map(|expr| Schedule::cron(expr)))
            .collect::<Result<Vec<_>, _>>()?;
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
            pin_workers: args.pin_workers,
            queue: args.queue,
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            max_request_bytes: args.max_request_bytes,
            read_timeout: args.read_timeout,
            limits: Limits {
                handler_timeout: args.handler_timeout,
                command_timeout: args.command_timeout,
                max_output_bytes: args.max_output_bytes,
                max_jobs: args.max_jobs,
                max_request_bytes: args.max_request_bytes,
                job_output_bytes: args.job_output_bytes,
                state_max_keys: args.state_max_keys,
            },
            shutdown_timeout: args.shutdown_timeout,
            print_addr: args.print_addr,
            allow: args.allow,
            auth_failures: args.auth_failures,
            metrics_listen: args.metrics_listen,
            state_file: args.state_file,
        })
    }
}

/// One `--listen` value (SPEC §11): where to listen, and how clients are spoken to there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenSpec {
    Tcp(SocketAddr),
    Tls(SocketAddr),
    Unix(PathBuf),
}

impl ListenSpec {
    pub fn parse(text: &str) -> Result<ListenSpec, ConfigError> {
        let usage = || ConfigError::Malformed {
            flag: "--listen",
            value: text.to_owned(),
            expected: "IP:PORT, [IPv6]:PORT, tls://IP:PORT or unix:/PATH",
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
fn tls_files(args: &ServeArgs, listen: &[ListenSpec]) -> Result<Option<TlsFiles>, ConfigError> {
    let has_tls = listen.iter().any(|l| matches!(l, ListenSpec::Tls(_)));
    let usage = |m: &'static str| Err(ConfigError::Together(m));
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

/// The longest duration any flag takes. Far beyond any sensible timeout, and far below what
/// makes `Instant + duration` overflow (which panicked the loop on the first connection).
/// One year as humantime counts it (365.25 days), so the message reads `at most 1year`.
const MAX_DURATION: Duration = Duration::from_secs(31_557_600);
/// The largest count (connections, queue, jobs): beyond it the value is a typo, not a plan.
const MAX_COUNT: usize = 1_000_000;
/// The largest byte size: a request or a captured output is held in memory whole.
const MAX_BYTES: usize = 1 << 30;
/// Handler threads: each one is a thread with its own stack.
const MAX_WORKERS: usize = 4096;

/// Checks every duration and size flag of `serve` against what the server can honour, so an
/// absurd value is an error at start (exit 2, naming the flag), never a panic or a hang later.
fn validate(args: &ServeArgs) -> Result<(), ConfigError> {
    // (value, flag, whether zero means something)
    let durations = [
        (args.read_timeout, "--read-timeout", false),
        (args.handler_timeout, "--handler-timeout", false),
        (args.command_timeout, "--command-timeout", false),
        // Zero: kill what is still running at once.
        (args.shutdown_timeout, "--shutdown-timeout", true),
        // Zero: no debounce, each change is its own event.
        (args.watch_debounce, "--watch-debounce", true),
        (args.watch_poll, "--watch-poll", false),
    ];
    for (value, flag, zero_ok) in durations {
        check_duration(value, flag, zero_ok)?;
    }
    for period in &args.every {
        check_duration(*period, "--every", false)?;
    }
    // Zero means: workers/max-connections/max-request-bytes none (nothing could be served);
    // queue none waiting; per-IP off; output captured none; no background jobs.
    let sizes = [
        (args.workers, "--workers", false, MAX_WORKERS),
        (args.queue, "--queue", true, MAX_COUNT),
        (args.max_connections, "--max-connections", false, MAX_COUNT),
        (
            args.max_connections_per_ip,
            "--max-connections-per-ip",
            true,
            MAX_COUNT,
        ),
        (
            args.max_request_bytes,
            "--max-request-bytes",
            false,
            MAX_BYTES,
        ),
        (args.max_output_bytes, "--max-output-bytes", true, MAX_BYTES),
        (args.max_jobs, "--max-jobs", true, MAX_COUNT),
        // Zero: no output kept, `job_output` and `attach` give nothing.
        (args.job_output_bytes, "--job-output-bytes", true, MAX_BYTES),
        (args.state_max_keys, "--state-max-keys", false, MAX_COUNT),
        (
            args.auth_failures as usize,
            "--auth-failures",
            true,
            MAX_COUNT,
        ),
    ];
    for (value, flag, zero_ok, max) in sizes {
        check_range(value, flag, zero_ok, max, |n| n.to_string())?;
    }
    Ok(())
}

/// A duration flag (of any subcommand) within what the server can honour.
pub fn check_duration(
    value: Duration,
    flag: &'static str,
    zero_ok: bool,
) -> Result<(), ConfigError> {
    check_range(value, flag, zero_ok, MAX_DURATION, |d| {
        humantime::format_duration(d).to_string()
    })
}

fn check_range<T: PartialOrd + Default + Copy>(
    value: T,
    flag: &'static str,
    zero_ok: bool,
    max: T,
    show: impl Fn(T) -> String,
) -> Result<(), ConfigError> {
    if !zero_ok && value == T::default() {
        return Err(ConfigError::Zero { flag });
    }
    if value > max {
        return Err(ConfigError::TooLarge {
            flag,
            value: show(value),
            max: show(max),
        });
    }
    Ok(())
}

fn token_sources(files: &[String], vars: &[String]) -> Result<Vec<TokenSource>, ConfigError> {
    let file = |spec: &String| token_source(spec, "--token-file", |v| TokenOrigin::File(v.into()));
    let var = |spec: &String| token_source(spec, "--token-env", |v| TokenOrigin::Env(v.into()));
    files.iter().map(file).chain(vars.iter().map(var)).collect()
}

/// One `[NAME=]VALUE` token flag; `send` reads its flags with the same rule.
pub fn token_source(
    spec: &str,
    flag: &'static str,
    origin: fn(&str) -> TokenOrigin,
) -> Result<TokenSource, ConfigError> {
    TokenSource::parse(spec, origin).map_err(|message| ConfigError::TokenSpec { flag, message })
}

impl Default for Limits {
    /// The defaults of SPEC §2, for `check` and `call`.
    fn default() -> Self {
        Limits {
            handler_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
            max_output_bytes: 1 << 20,
            max_jobs: 16,
            max_request_bytes: 65536,
            job_output_bytes: 64 * 1024,
            state_max_keys: 100_000,
        }
    }
}
