//! The validated settings of `serve`: addresses parsed, token sources named, limits checked.
//! Built from the raw command line in one place, so the server never sees an invalid value.

use crate::auth::{TokenOrigin, TokenSource};
use crate::cli::{AuthMode, FramingArg, ServeArgs};
use crate::error::Fatal;
use crate::framing::Framing;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    pub script: PathBuf,
    pub listen: Vec<SocketAddr>,
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

    pub fn from_args(args: ServeArgs) -> Result<Config, Fatal> {
        let listen = args
            .listen
            .iter()
            .map(|a| parse_listen(a))
            .collect::<Result<Vec<_>, _>>()?;
        let token_sources = token_sources(&args.token_file, &args.token_env)?;
        if token_sources.is_empty() && !args.insecure_no_token {
            return Err(Fatal::Usage(
                "no token source: give --token-file or --token-env (or --insecure-no-token to accept anyone)".into(),
            ));
        }
        for (value, flag) in [
            (args.workers, "--workers"),
            (args.max_request_bytes, "--max-request-bytes"),
            (args.state_max_keys, "--state-max-keys"),
        ] {
            if value == 0 {
                return Err(Fatal::Usage(format!("{flag} must be at least 1")));
            }
        }
        Ok(Config {
            script: args.script,
            listen,
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

fn parse_listen(text: &str) -> Result<SocketAddr, Fatal> {
    text.parse().map_err(|_| {
        Fatal::Usage(format!(
            "--listen '{text}': expected IP:PORT or [IPv6]:PORT"
        ))
    })
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
            job_output_bytes: 64 * 1024,
            state_max_keys: 100_000,
        }
    }
}
