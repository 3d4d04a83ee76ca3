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
    /// Open connections from one client IP; 0 means no limit.
    pub max_connections_per_ip: usize,
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
    /// `--state-file`: keep the script's state in this database instead of in memory.
    pub state_file: Option<PathBuf>,
}

/// What one handler may use; shared by `serve` and `call`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub handler_timeout: Duration,
    pub command_timeout: Duration,
    pub max_output_bytes: usize,
    pub max_jobs: usize,
    /// The largest request the script may be handed: its blob and string limits derive from it.
    pub max_request_bytes: usize,
    /// Combined output kept per background job, for `job_output` and `attach`.
    pub job_output_bytes: usize,
    /// Keys the state (and, separately, the rate limiter) holds at most.
    pub state_max_keys: usize,
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
        validate(&args)?;
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
fn validate(args: &ServeArgs) -> Result<(), Fatal> {
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
pub fn check_duration(value: Duration, flag: &str, zero_ok: bool) -> Result<(), Fatal> {
    check_range(value, flag, zero_ok, MAX_DURATION, |d| {
        humantime::format_duration(d).to_string()
    })
}

fn check_range<T: PartialOrd + Default + Copy>(
    value: T,
    flag: &str,
    zero_ok: bool,
    max: T,
    show: impl Fn(T) -> String,
) -> Result<(), Fatal> {
    if !zero_ok && value == T::default() {
        return Err(Fatal::Usage(format!("{flag} must be more than 0")));
    }
    if value > max {
        return Err(Fatal::Usage(format!(
            "{flag} {} is too large (at most {})",
            show(value),
            show(max)
        )));
    }
    Ok(())
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
            max_request_bytes: 65536,
            job_output_bytes: 64 * 1024,
            state_max_keys: 100_000,
        }
    }
}
