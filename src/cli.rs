//! The command line as the user types it (clap), before any validation. `config` turns it into
//! what the server runs with.

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "command-trigger",
    version,
    about = "Trigger commands in a pod over TCP, decided by a Rhai script"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// `serve`'s flags make its variant large; the value is built once per run, so boxing it
// would save nothing worth the indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (the container's entrypoint).
    Serve(ServeArgs),
    /// Compile a script and report errors; exit 0 if it is usable, 1 if not, 2 if no file is given.
    Check(CheckArgs),
    /// Run one request through the script locally and print the reply.
    Call(CallArgs),
    /// Send one request to a server and print the reply.
    Send(SendArgs),
    /// Run a handler's tests (`fn test_*()` in Rhai) with every command mocked, none run.
    Test(TestArgs),
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration like 500ms, 10s or 2m: {e}"))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// A wrong token is answered `ERR unauthorized` and never reaches the script.
    Required,
    /// Every request reaches the script, which checks `req.token_name`.
    Script,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramingArg {
    /// One request per line.
    Line,
    /// First line, then the body up to the client's half-close.
    Stream,
    /// HTTP/1.0 and 1.1: curl, webhooks, Kubernetes httpGet probes.
    Http,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `TIME LEVEL message`.
    #[default]
    Text,
    /// One JSON object per line: time, level, message and the request fields.
    Json,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The Rhai script that defines `fn handle(req)`.
    #[arg(long, env = "CT_SCRIPT", value_name = "FILE")]
    pub script: PathBuf,

    /// Address to listen on (repeatable, mixable): IP:PORT or [IPv6]:PORT (plain TCP),
    /// tls://IP:PORT (TLS, needs --tls-cert and --tls-key), unix:/PATH (a Unix socket).
    /// Port 0 picks a free port.
    #[arg(
        long,
        env = "CT_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:9000",
        value_delimiter = ','
    )]
    pub listen: Vec<String>,

    /// File whose every non-empty line is a valid token for NAME (default name `default`; repeatable).
    #[arg(
        long,
        env = "CT_TOKEN_FILE",
        value_name = "[NAME=]PATH",
        value_delimiter = ','
    )]
    pub token_file: Vec<String>,

    /// Environment variable that holds a token for NAME (default name `default`; repeatable).
    #[arg(
        long,
        env = "CT_TOKEN_ENV",
        value_name = "[NAME=]VAR",
        value_delimiter = ','
    )]
    pub token_env: Vec<String>,

    /// Allow starting with no token source; then the whole line is the payload.
    #[arg(long, env = "CT_INSECURE_NO_TOKEN", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub insecure_no_token: bool,

    /// Who rejects a wrong token: the server, or the script.
    #[arg(long, env = "CT_AUTH", value_enum, default_value = "required")]
    pub auth: AuthMode,

    /// How requests are cut from the connection's bytes.
    #[arg(long, env = "CT_FRAMING", value_enum, default_value = "line")]
    pub framing: FramingArg,

    /// Keep the connection open after a reply and read the next request.
    #[arg(long, env = "CT_KEEP_ALIVE", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub keep_alive: bool,

    /// Handlers running at once.
    #[arg(long, env = "CT_WORKERS", value_name = "N", default_value = "8")]
    pub workers: usize,

    /// Bind each worker, and the commands it starts, to one CPU (in turn): fewer moves
    /// between CPUs for many short commands; a command then has one CPU.
    #[arg(long, env = "CT_PIN_WORKERS", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub pin_workers: bool,

    /// Complete requests waiting for a worker; beyond it the reply is `ERR busy`.
    #[arg(long, env = "CT_QUEUE", value_name = "N", default_value = "256")]
    pub queue: usize,

    /// Open client connections; beyond it a new connection is answered `ERR busy` (HTTP: 503) and closed.
    #[arg(
        long,
        env = "CT_MAX_CONNECTIONS",
        value_name = "N",
        default_value = "1024"
    )]
    pub max_connections: usize,

    /// Open connections from one client IP; beyond it the same refusal as --max-connections; 0 turns this off.
    #[arg(
        long,
        env = "CT_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value = "0"
    )]
    pub max_connections_per_ip: usize,

    /// Largest request: one line (line framing) or the whole request (stream framing).
    #[arg(
        long,
        env = "CT_MAX_REQUEST_BYTES",
        value_name = "N",
        default_value = "65536"
    )]
    pub max_request_bytes: usize,

    /// Time allowed to send a complete request; with --keep-alive also the idle time between requests.
    #[arg(long, env = "CT_READ_TIMEOUT", value_name = "DUR", default_value = "10s", value_parser = duration)]
    pub read_timeout: Duration,

    /// Wall-clock limit of one `handle(req)` call, commands included.
    #[arg(long, env = "CT_HANDLER_TIMEOUT", value_name = "DUR", default_value = "60s", value_parser = duration)]
    pub handler_timeout: Duration,

    /// Default limit of one command the script runs.
    #[arg(long, env = "CT_COMMAND_TIMEOUT", value_name = "DUR", default_value = "30s", value_parser = duration)]
    pub command_timeout: Duration,

    /// Captured stdout and stderr of one command, each; the rest is dropped and `truncated` set.
    #[arg(
        long,
        env = "CT_MAX_OUTPUT_BYTES",
        value_name = "N",
        default_value = "1048576"
    )]
    pub max_output_bytes: usize,

    /// Background jobs (`start`) alive at once.
    #[arg(long, env = "CT_MAX_JOBS", value_name = "N", default_value = "16")]
    pub max_jobs: usize,

    /// Combined stdout and stderr kept per background job (the last bytes), for `job_output` and `attach`.
    #[arg(
        long,
        env = "CT_JOB_OUTPUT_BYTES",
        value_name = "N",
        default_value = "65536"
    )]
    pub job_output_bytes: usize,

    /// Keep the script's state (`state_set`, `once`, ...) in this database file, durably; default: in memory.
    #[arg(long, env = "CT_STATE_FILE", value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// Keys the state holds at most; beyond it `state_set` throws (updating a key is allowed).
    #[arg(
        long,
        env = "CT_STATE_MAX_KEYS",
        value_name = "N",
        default_value = "100000"
    )]
    pub state_max_keys: usize,

    /// On SIGTERM, time given to running handlers and jobs before their commands are killed.
    #[arg(long, env = "CT_SHUTDOWN_TIMEOUT", value_name = "DUR", default_value = "20s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Only clients from these networks are served (repeatable; default: any).
    #[arg(long, env = "CT_ALLOW", value_name = "CIDR", value_delimiter = ',')]
    pub allow: Vec<ipnet::IpNet>,

    /// After N wrong tokens from one IP within 60 s, refuse that IP for 60 s; 0 turns this off.
    #[arg(long, env = "CT_AUTH_FAILURES", value_name = "N", default_value = "10")]
    pub auth_failures: u32,

    /// Log line format: `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, env = "CT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` here (plain HTTP, no token).
    #[arg(long, env = "CT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// Run `fn on_change(event)` when this file or directory changes (repeatable).
    #[arg(long, env = "CT_WATCH", value_name = "PATH", value_delimiter = ',')]
    pub watch: Vec<PathBuf>,

    /// Quiet time after a change before `on_change` runs: a burst of writes is one event.
    #[arg(long, env = "CT_WATCH_DEBOUNCE", value_name = "DUR", default_value = "1s", value_parser = duration)]
    pub watch_debounce: Duration,

    /// How often watched paths are also compared by content, for volumes that send no inotify events.
    #[arg(long, env = "CT_WATCH_POLL", value_name = "DUR", default_value = "10s", value_parser = duration)]
    pub watch_poll: Duration,

    /// Run `fn on_tick(tick)` every DUR, counted from the start (repeatable).
    #[arg(long, env = "CT_EVERY", value_name = "DUR", value_parser = duration, value_delimiter = ',')]
    pub every: Vec<Duration>,

    /// Run `fn on_tick(tick)` on this standard 5-field cron schedule, in UTC (repeatable).
    #[arg(long, env = "CT_CRON", value_name = "EXPR")]
    pub cron: Vec<String>,

    /// Print the bound address(es) to stdout, one per line, once listening.
    #[arg(long, env = "CT_PRINT_ADDR", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub print_addr: bool,

    /// Certificate chain (PEM) of the tls:// listeners; re-read when it changes.
    #[arg(long, env = "CT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM: PKCS#8, SEC1 or PKCS#1) of --tls-cert; re-read when it changes.
    #[arg(long, env = "CT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM): every TLS client must present a certificate that chains to it (mTLS).
    #[arg(long, env = "CT_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// File mode of unix: sockets, in octal.
    #[arg(long, env = "CT_UNIX_MODE", value_name = "MODE", default_value = "0660", value_parser = octal_mode)]
    pub unix_mode: u32,

    /// Only these user ids are served on unix: listeners (repeatable; default: any).
    #[arg(long, env = "CT_ALLOW_UID", value_name = "UID", value_delimiter = ',')]
    pub allow_uid: Vec<u32>,
}

fn octal_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("'{text}' is not an octal file mode like 0660"))
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The Rhai script to compile (default: `CT_SCRIPT`, as `serve` would load it).
    #[arg(value_name = "FILE", env = "CT_SCRIPT")]
    pub file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CallArgs {
    /// The Rhai script that defines `fn handle(req)`.
    #[arg(long, env = "CT_SCRIPT", value_name = "FILE")]
    pub script: PathBuf,

    /// The `req.token_name` the script sees.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub token_name: String,

    /// The `req.peer` the script sees.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub peer: String,

    /// Limit of one command the script runs.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration)]
    pub command_timeout: Duration,

    /// Wall-clock limit of the `handle(req)` call.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = duration)]
    pub handler_timeout: Duration,

    /// Record the commands instead of running them: each goes to stderr as one JSON line,
    /// answered with code 0 and no output.
    #[arg(long)]
    pub dry_run: bool,

    /// Exit when `handle` returns, leaving running background jobs (`start`) unwatched,
    /// instead of waiting for them.
    #[arg(long)]
    pub no_wait: bool,

    /// The payload words (`--` before them is optional, and needed only for words that start
    /// with `-`); `-` alone reads the body from stdin (stream framing).
    #[arg(
        value_name = "PAYLOAD",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub payload: Vec<String>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// The Rhai script under test, which defines `fn handle(req)`.
    #[arg(long, env = "CT_SCRIPT", value_name = "FILE")]
    pub script: PathBuf,

    /// Test files: every `fn test_*()` in them runs, in file order.
    #[arg(value_name = "TESTS", required = true)]
    pub tests: Vec<PathBuf>,

    /// Run only the tests whose names contain TEXT.
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,

    /// Default limit of one command (a recorded command's `timeout` shows when it differs).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration)]
    pub command_timeout: Duration,

    /// Wall-clock limit of one test.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = duration)]
    pub handler_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Server address: HOST:PORT (plain TCP), tls://HOST:PORT, or unix:/PATH.
    #[arg(value_name = "ADDR")]
    pub addr: String,

    /// The payload words, joined by spaces.
    #[arg(value_name = "PAYLOAD")]
    pub payload: Vec<String>,

    /// File whose first non-empty line is the token. Same syntax as `serve` (so one
    /// `CT_TOKEN_FILE` serves both): the NAME is ignored, and of several the first is used.
    #[arg(
        long,
        env = "CT_TOKEN_FILE",
        value_name = "[NAME=]PATH",
        value_delimiter = ','
    )]
    pub token_file: Vec<String>,

    /// Environment variable that holds the token; `[NAME=]VAR` as for `--token-file`.
    #[arg(
        long,
        env = "CT_TOKEN_ENV",
        value_name = "[NAME=]VAR",
        value_delimiter = ','
    )]
    pub token_env: Vec<String>,

    /// Send stdin after the first line as the request body (stream framing).
    #[arg(long)]
    pub body: bool,

    /// Send to every address the host name resolves to, at once.
    #[arg(long)]
    pub all: bool,

    /// Time allowed for connecting, sending and the whole reply.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration)]
    pub timeout: Duration,

    /// tls://: CA bundle (PEM) the server's certificate must chain to (default: the system roots).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// tls://: client certificate chain (PEM) for servers that require one (mTLS).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// tls://: private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// tls://: the server name to verify and send as SNI (default: HOST).
    #[arg(long, value_name = "NAME")]
    pub servername: Option<String>,
}

/// The rule of every boolean `CT_*` variable (`1/0`, `true/false`, `yes/no`, `on/off`, any case),
/// for `CT_INIT`, which is read before clap runs. `None` for a word outside the rule.
pub fn boolish(text: &str) -> Option<bool> {
    use clap::builder::TypedValueParser;
    let command = clap::Command::new("command-trigger");
    BoolishValueParser::new()
        .parse_ref(&command, None, std::ffi::OsStr::new(text))
        .ok()
}
