//! What each subcommand does, start to finish. Each ends in an [`Outcome`] or a [`Fatal`]
//! error, which `main` alone turns into an exit status.

use crate::auth::Tokens;
use crate::cli::{Cli, Command, TestArgs};
use crate::clock::SystemClock;
use crate::config::{CallConfig, CallInput, Config, Limits, ListenSpec, SendConfig};
use crate::error::{ConfigError, Fatal, Outcome};
use crate::framing::Framing;
use crate::placement::Pinning;
use crate::request::{Endpoints, Request};
use crate::script::context::ClientSink;
use crate::script::{self, HandlerResult, Runtime, ScriptHost};
use crate::server::{self, Parts, Server};
use crate::signals::SignalSource;
use crate::state::State;
use crate::tls::TlsServer;
use crate::transport::{Listener, TcpPort, UnixBindError, UnixSocket};
use crate::trigger::{Kind, Triggers};
use crate::watch::WatchSettings;
use crate::{
    client, footprint, metrics, metrics_server, reload, schedule, script_test, watch, workers,
};
use mio::net::TcpListener;
use mio::{Poll, Waker};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

/// Runs the subcommand to its end.
pub fn run(cli: Cli) -> Result<Outcome, Fatal> {
    match cli.command {
        Command::Serve(args) => serve(Config::from_args(args)?),
        Command::Check(args) => match args.file {
            Some(file) => Ok(check(&file)),
            None => Err(ConfigError::NoScript.into()),
        },
        Command::Call(args) => call(CallConfig::from_args(args)?),
        Command::Send(args) => client::send(SendConfig::from_args(args)?),
        Command::Test(args) => test(args),
    }
}

fn test(args: TestArgs) -> Result<Outcome, Fatal> {
    let plan = script_test::TestPlan {
        handler: args.script,
        files: args.tests,
        filter: args.filter,
        limits: Limits {
            handler_timeout: args.handler_timeout,
            command_timeout: args.command_timeout,
            ..Limits::default()
        },
    };
    // Tests run handlers as workers do, so they need the stack the script limits fit in.
    script::on_script_stack(|| script_test::run(&plan))
        .map_err(|e| Fatal::io("running the tests", e))?
}

/// A script that does not compile is what `check` is for: its report goes to stderr, and
/// the outcome is a failure (exit 1), not a usage error.
fn check(path: &std::path::Path) -> Outcome {
    let limits = Limits::default();
    match ScriptHost::load(path, Runtime::new(limits)) {
        Ok(_) => {
            println!("ok");
            Outcome::Success
        }
        Err(error) => {
            eprintln!("{error}");
            Outcome::Failure
        }
    }
}

/// Runs the server. Must be called before the process starts any thread (see
/// [`forget_token_variables`]); `main` does.
fn serve(config: Config) -> Result<Outcome, Fatal> {
    let (tokens, warnings) = Tokens::load(&config.token_sources).map_err(Fatal::Tokens)?;
    forget_token_variables(&config);
    // Before any thread starts, so every thread inherits the handlers' view.
    let signals =
        SignalSource::install().map_err(|e| Fatal::io("installing signal handlers", e))?;
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(
            TlsServer::load(files.clone(), config.framing == Framing::Http)
                .map_err(Fatal::Usage)?,
        )),
        None => None,
    };
    let listeners = bind_all(&config, tls.as_ref())?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| Fatal::io(format!("binding --metrics-listen {addr}"), e))?,
        ),
        None => None,
    };
    let runtime = match &config.state_file {
        Some(path) => Runtime::with_state(
            config.limits,
            State::open(path, config.limits.state_max_keys).map_err(Fatal::State)?,
        ),
        None => Runtime::new(config.limits),
    };
    let host = ScriptHost::load_requiring(&config.script, runtime.clone(), required(&config));
    let host = Arc::new(host.map_err(Fatal::Script)?);
    warnings.iter().for_each(|w| log::warn!("{w}"));
    if config.token_sources.is_empty() {
        log::warn!(
            "--insecure-no-token: no token source, so anyone who reaches the port runs the script"
        );
    }
    let tokens = Arc::new(tokens);
    let parts = start(&config, host, runtime, tokens, tls)?;
    announce(&listeners, config.print_addr)?;
    if let Some(listener) = metrics_listener {
        announce_metrics(&listener, config.print_addr)?;
        metrics_server::spawn(listener).map_err(|e| Fatal::io("starting the metrics thread", e))?;
    }
    metrics::metrics().set_ready();
    let server = Server::new(config, listeners, parts, Box::new(signals))
        .map_err(|e| Fatal::io("registering listeners", e))?;
    // Last before the loop: whatever start-up code runs after it is mapped back in clusters.
    footprint::release_startup_code();
    server.run().map_err(|e| Fatal::io("event loop", e))
}

/// Starts what runs beside the loop (the workers, the reload thread, the watch and schedule
/// threads) and gathers what the loop needs of them. Public so that a test can run the loop
/// in-process, with a stop of its own.
pub fn start(
    config: &Config,
    host: Arc<ScriptHost>,
    runtime: Arc<Runtime>,
    tokens: Arc<Tokens>,
    tls: Option<Arc<TlsServer>>,
) -> Result<Parts, Fatal> {
    let poll = Poll::new().map_err(|e| Fatal::io("creating the event loop", e))?;
    let waker = Waker::new(poll.registry(), server::WAKER)
        .map_err(|e| Fatal::io("creating the waker", e))?;
    let (outbox, inbox) = workers::outbox(Arc::new(waker));
    let pinning = match config.pin_workers {
        true => Pinning::of_this_process().unwrap_or_else(|e| {
            log::warn!(
                "--pin-workers: could not read the allowed CPUs ({e}); workers left unbound"
            );
            None
        }),
        false => None,
    };
    let pool = workers::WorkerPool::start(config.workers, pinning, host.clone(), outbox.clone())
        .map_err(|e| Fatal::io("starting workers", e))?;
    let sources = config.token_sources.clone();
    let reload = reload::spawn(host, sources, tokens.clone(), tls, outbox)
        .map_err(|e| Fatal::io("starting the reload thread", e))?;
    let triggers = Triggers::new(pool.trigger_queue(), runtime.clone());
    start_triggers(config, triggers)
        .map_err(|e| Fatal::io("starting the watch and schedule threads", e))?;
    Ok(Parts {
        poll,
        pool,
        inbox,
        tokens,
        runtime,
        reload,
    })
}

fn bind_tcp(addr: &std::net::SocketAddr) -> Result<TcpListener, Fatal> {
    let listener = TcpListener::bind(*addr).map_err(|e| Fatal::io(format!("binding {addr}"), e))?;
    // mio listens with a backlog of 128: a burst of connections (thousands of clients
    // reconnecting at once) overflows it, and every dropped SYN costs its client a 1 s
    // retransmission, legitimate clients included. The kernel caps this at somaxconn.
    let _ = rustix::net::listen(&listener, crate::transport::LISTEN_BACKLOG);
    Ok(listener)
}

/// The script functions besides `handle` that the trigger flags call.
fn required(config: &Config) -> Vec<&'static str> {
    let mut required = Vec::new();
    if !config.watch.is_empty() {
        required.push(Kind::Watch.function());
    }
    if !config.schedules.is_empty() {
        required.push(Kind::Tick.function());
    }
    required
}

fn start_triggers(config: &Config, triggers: Triggers) -> std::io::Result<()> {
    if !config.watch.is_empty() {
        let settings = WatchSettings {
            paths: config.watch.clone(),
            debounce: config.watch_debounce,
            poll: config.watch_poll,
        };
        watch::spawn(settings, triggers.clone())?;
    }
    schedule::spawn(&config.schedules, &triggers)
}

/// Removes the `--token-env` variables from the process environment once their tokens are
/// read, so that neither `env()` in a script nor any command it runs (which inherit the
/// environment) can see a token (SPEC §4). Reloads keep the tokens read here.
fn forget_token_variables(config: &Config) {
    for var in crate::auth::token_variables(&config.token_sources) {
        // SAFETY: `remove_var` races with any other thread reading or writing the environment.
        // There is none: `serve` runs on the main thread straight after parsing the command
        // line and setting up the logger (which starts no thread), and the signal handlers,
        // workers, reload and metrics threads are all started after this returns. (The PID 1
        // init, when there is one, is another process: it runs the server as its child.)
        unsafe { std::env::remove_var(var) };
    }
}

fn bind_all(config: &Config, tls: Option<&Arc<TlsServer>>) -> Result<Vec<Listener>, Fatal> {
    let bind = |spec: &ListenSpec| match spec {
        ListenSpec::Tcp(addr) => bind_tcp(addr).map(|l| Listener::Tcp(TcpPort::new(l))),
        ListenSpec::Tls(addr) => match tls {
            Some(tls) => Ok(Listener::Tls(TcpPort::new(bind_tcp(addr)?), tls.clone())),
            None => Err(Fatal::Usage("a tls:// listener needs --tls-cert".into())),
        },
        ListenSpec::Unix(path) => match UnixSocket::bind(path, config.unix_mode) {
            Ok(socket) => Ok(Listener::Unix(socket)),
            Err(UnixBindError::Usage(message)) => Err(Fatal::Usage(message)),
            Err(UnixBindError::Runtime(message)) => Err(Fatal::Runtime(message)),
        },
    };
    config.listen.iter().map(bind).collect()
}

fn announce(listeners: &[Listener], print_addr: bool) -> Result<(), Fatal> {
    let mut stdout = std::io::stdout().lock();
    for listener in listeners {
        let addr = listener
            .describe()
            .map_err(|e| Fatal::io("reading a bound address", e))?;
        log::info!("listening on {addr}");
        if print_addr {
            let _ = writeln!(stdout, "{addr}");
        }
    }
    let _ = stdout.flush();
    Ok(())
}

/// The metrics address comes last in `--print-addr` output.
fn announce_metrics(listener: &std::net::TcpListener, print_addr: bool) -> Result<(), Fatal> {
    let addr = listener
        .local_addr()
        .map_err(|e| Fatal::io("reading a bound address", e))?;
    log::info!("metrics on http://{addr}/metrics");
    if print_addr {
        let _ = writeln!(std::io::stdout(), "{addr}");
    }
    Ok(())
}

/// `write()` output of a local call goes straight to stdout.
struct Stdout;

impl ClientSink for Stdout {
    fn send(&mut self, bytes: Vec<u8>) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&bytes).and_then(|_| out.flush());
    }
}

fn call(config: CallConfig) -> Result<Outcome, Fatal> {
    let request = local_request(&config)?;
    // Whatever was read is what the script must be able to use whole.
    let limits = Limits {
        max_request_bytes: (request.payload.len() + request.body.len())
            .max(config.limits.max_request_bytes),
        ..config.limits
    };
    let runtime = match config.dry_run {
        true => Runtime::with_seams(
            limits,
            State::in_memory(limits.state_max_keys),
            script_test::dry_run_recorder(limits),
            Arc::new(SystemClock::new()),
        ),
        false => Runtime::new(limits),
    };
    let host = ScriptHost::load(&config.script, runtime).map_err(Fatal::Script)?;
    let handled = script::on_script_stack(|| host.handle(&request, Box::new(Stdout)).0)
        .map_err(|e| Fatal::io("running the script", e))?;
    let outcome = match handled {
        HandlerResult::Replied(reply) => {
            Stdout.send(reply.bytes);
            Outcome::Success
        }
        HandlerResult::Failed(message) => {
            eprintln!("handler failed: {message}");
            Outcome::Failure
        }
        HandlerResult::TimedOut => {
            eprintln!("handler timed out");
            Outcome::Failure
        }
    };
    settle_jobs(&host.runtime, config.no_wait);
    Ok(outcome)
}

/// The request `call` runs: the payload words, or (`-` alone) stdin as a stream-framing body.
fn local_request(config: &CallConfig) -> Result<Request, Fatal> {
    let (framing, payload, body) = match &config.input {
        CallInput::Stdin => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|e| Fatal::io("reading stdin", e))?;
            (Framing::Stream, String::new(), body)
        }
        CallInput::Words(words) => (Framing::Line, words.clone(), Vec::new()),
    };
    Ok(Request {
        id: 1,
        token_name: Some(config.token_name.as_str().into()),
        payload: payload.into_bytes(),
        body,
        endpoints: Endpoints::new(config.peer, SocketAddr::from(([127, 0, 0, 1], 0))),
        framing,
        keep_alive: false,
        http: None,
    })
}

/// Background jobs are threads of this process: exiting would cut them off unseen. So `call`
/// waits for them (each end is logged, as `serve` logs it) unless `--no-wait` says not to.
fn settle_jobs(runtime: &crate::runtime::Runtime, no_wait: bool) {
    let running = runtime.jobs.unfinished();
    if running == 0 {
        return;
    }
    if no_wait {
        eprintln!("--no-wait: left {running} background job(s) running, unwatched");
        return;
    }
    log::info!("waiting for {running} background job(s) to end (--no-wait to not wait)");
    runtime.jobs.wait_all();
}
