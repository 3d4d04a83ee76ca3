//! The validated settings of the client subcommands, `call` and `send`: their flags checked
//! in a second stage as `serve`'s are, before anything runs or connects.

use super::{Limits, check_duration, token_source};
use crate::auth::TokenOrigin;
use crate::cli::{CallArgs, SendArgs};
use crate::error::ConfigError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What `call` runs with: its flags checked, as `serve`'s are by [`super::Config::from_args`].
#[derive(Clone, Debug)]
pub struct CallConfig {
    /// `--script`: the handler to run.
    pub script: PathBuf,
    /// `--token-name`: the `req.token_name` the script sees.
    pub token_name: String,
    /// `--peer`: the `req.peer` the script sees.
    pub peer: SocketAddr,
    /// `--handler-timeout` and `--command-timeout`; the request size limit is set once the
    /// request is read, so the script can use whatever it is handed.
    pub limits: Limits,
    /// `--dry-run`: record commands instead of running them.
    pub dry_run: bool,
    /// `--no-wait`: exit without waiting for background jobs.
    pub no_wait: bool,
    /// Where the request comes from.
    pub input: CallInput,
}

/// The request `call` runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallInput {
    /// The payload words joined by spaces: a line-framing request.
    Words(String),
    /// `-` alone: stdin is the body of a stream-framing request.
    Stdin,
}

impl CallConfig {
    pub fn from_args(args: CallArgs) -> Result<CallConfig, ConfigError> {
        check_duration(args.handler_timeout, "--handler-timeout", false)?;
        check_duration(args.command_timeout, "--command-timeout", false)?;
        let peer = args.peer.parse().map_err(|_| ConfigError::Malformed {
            flag: "--peer",
            value: args.peer.clone(),
            expected: "IP:PORT",
        })?;
        let input = match args.payload.as_slice() {
            [dash] if dash == "-" => CallInput::Stdin,
            words => CallInput::Words(words.join(" ")),
        };
        Ok(CallConfig {
            script: args.script,
            token_name: args.token_name,
            peer,
            limits: Limits {
                handler_timeout: args.handler_timeout,
                command_timeout: args.command_timeout,
                ..Limits::default()
            },
            dry_run: args.dry_run,
            no_wait: args.no_wait,
            input,
        })
    }
}

/// What `send` runs with.
#[derive(Clone, Debug)]
pub struct SendConfig {
    /// ADDR as given, for messages.
    pub addr: String,
    /// ADDR: where to connect, and how.
    pub target: Target,
    /// The payload words, joined by spaces on the wire.
    pub payload: Vec<String>,
    /// Where the token comes from (the first `--token-file`, else the first `--token-env`);
    /// `None` only where the server may authenticate by transport (Unix, client certificate).
    pub token: Option<TokenOrigin>,
    /// `--body`: send stdin after the first line.
    pub body: bool,
    /// `--all`: send to every address the name resolves to, at once.
    pub all: bool,
    /// `--timeout`: for connecting, sending and the whole reply.
    pub timeout: Duration,
    /// `tls://`: the files and name the handshake uses.
    pub tls: TlsClientFiles,
}

/// Where `send` connects, as its ADDR names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    /// `tls://HOST:PORT`; `HOST` is the name checked and sent as SNI unless `--servername`.
    Tls {
        host_port: String,
        host: String,
    },
    Unix(PathBuf),
}

/// `send`'s TLS flags.
#[derive(Clone, Debug, Default)]
pub struct TlsClientFiles {
    /// `--cacert`: the CA bundle the server's certificate must chain to; default the system's.
    pub cacert: Option<PathBuf>,
    /// `--cert` and `--key`: the client certificate (clap makes each require the other).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `--servername`: the name to verify and send as SNI instead of HOST.
    pub servername: Option<String>,
}

impl Target {
    pub fn parse(addr: &str) -> Result<Target, ConfigError> {
        if let Some(path) = addr.strip_prefix("unix:") {
            return Ok(Target::Unix(path.into()));
        }
        let Some(host_port) = addr.strip_prefix("tls://") else {
            return Ok(Target::Tcp(addr.to_owned()));
        };
        let host = match host_port.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => return Err(ConfigError::Address(addr.to_owned())),
        };
        Ok(Target::Tls {
            host_port: host_port.to_owned(),
            host: host.to_owned(),
        })
    }
}

impl SendConfig {
    pub fn from_args(args: SendArgs) -> Result<SendConfig, ConfigError> {
        check_duration(args.timeout, "--timeout", false)?;
        let target = Target::parse(&args.addr)?;
        let first = |specs: &[String], flag, origin| {
            specs
                .first()
                .map(|spec| token_source(spec, flag, origin))
                .transpose()
        };
        let file = first(&args.token_file, "--token-file", |v| {
            TokenOrigin::File(v.into())
        })?;
        let var = first(&args.token_env, "--token-env", |v| {
            TokenOrigin::Env(v.into())
        })?;
        let token = file.or(var).map(|source| source.origin);
        // A Unix socket or a client certificate may be all the server asks for (SPEC §11).
        let token_optional = match &target {
            Target::Unix(_) => true,
            Target::Tls { .. } => args.cert.is_some(),
            Target::Tcp(_) => false,
        };
        if token.is_none() && !token_optional {
            return Err(ConfigError::NoClientToken);
        }
        Ok(SendConfig {
            addr: args.addr,
            target,
            payload: args.payload,
            token,
            body: args.body,
            all: args.all,
            timeout: args.timeout,
            tls: TlsClientFiles {
                cacert: args.cacert,
                cert: args.cert.zip(args.key),
                servername: args.servername,
            },
        })
    }
}
