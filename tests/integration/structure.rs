//! Issue 11: `main` alone picks exit statuses and prints fatal errors itself, so they show
//! whatever the log level; `call` checks its flags before it runs anything; the loop runs
//! in-process with a stop of the test's own.

use crate::util::*;
use clap::Parser;
use command_trigger::auth::Tokens;
use command_trigger::cli::{Cli, Command};
use command_trigger::config::{Config, ListenSpec};
use command_trigger::error::Outcome;
use command_trigger::script::{Runtime, ScriptHost};
use command_trigger::server::{self, Parts};
use command_trigger::signals::Signal;
use command_trigger::transport::{Listener, TcpPort};
use command_trigger::{app, stop};
use mio::net::TcpListener;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

/// Runs the binary with logging off, bounded in time.
#[track_caller]
fn run_quiet(args: &[&str]) -> Output {
    let mut command = command();
    command
        .env("RUST_LOG", "off")
        .env_remove("CT_TOKEN_FILE")
        .env_remove("CT_TOKEN_ENV")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("spawning the binary");
    let status = wait_child(&mut child, Duration::from_secs(20)).expect("exited in time");
    let mut output = child.wait_with_output().expect("reading its output");
    output.status = status;
    output
}

#[test]
fn send_without_a_token_says_so_with_logging_off() {
    let out = run_quiet(&["send", "127.0.0.1:1", "hello"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no token source"), "stderr: {stderr:?}");
}

#[test]
fn serve_usage_errors_show_with_logging_off() {
    let scratch = Scratch::new();
    let script = scratch.write("h.rhai", "fn handle(req) { \"ok\" }");
    let script = script.to_str().expect("utf-8 path");
    let out = run_quiet(&["serve", "--script", script, "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no token source"), "stderr: {stderr:?}");
    let out = run_quiet(&[
        "serve",
        "--script",
        script,
        "--insecure-no-token",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--workers must be more than 0"),
        "{stderr:?}"
    );
}

#[test]
fn call_checks_its_flags_before_running_the_script() {
    let scratch = Scratch::new();
    let mark = scratch.path("ran");
    // The script would leave a mark if it ran.
    let source = format!(
        r#"fn handle(req) {{ exec(["touch", "{}"]); "ok" }}"#,
        mark.display()
    );
    let script = scratch.write("h.rhai", &source);
    let script = script.to_str().expect("utf-8 path");
    for bad in [
        ["--peer", "nowhere"],
        ["--handler-timeout", "0s"],
        ["--command-timeout", "2years"],
    ] {
        let mut args = vec!["call", "--script", script];
        args.extend(bad);
        args.push("x");
        let out = run_quiet(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains(bad[0]), "{bad:?}: {stderr:?}");
    }
    assert!(!mark.exists(), "the script ran despite a bad flag");
}

/// Builds what `serve` builds, by hand, for a server run in this process.
fn in_process(script: &str) -> (Config, Vec<Listener>, Parts) {
    let cli = Cli::try_parse_from([
        "command-trigger",
        "serve",
        "--script",
        script,
        "--listen",
        "127.0.0.1:0",
        "--insecure-no-token",
        "--workers",
        "1",
    ])
    .expect("parsing the flags");
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    let config = Config::from_args(args).expect("valid flags");
    let runtime = Runtime::new(config.limits);
    let host = ScriptHost::load(&config.script, runtime.clone()).expect("the script compiles");
    let tokens = Arc::new(Tokens::default());
    let parts = app::start(&config, Arc::new(host), runtime, tokens, None).expect("starting");
    let ListenSpec::Tcp(addr) = config.listen[0] else {
        panic!("not a TCP listener")
    };
    let listener = TcpListener::bind(addr).expect("binding");
    (config, vec![Listener::Tcp(TcpPort::new(listener))], parts)
}

/// `server::run` with a `stop::Switch` instead of signals: the loop serves in this process and
/// a stop order ends it the way SIGTERM does.
#[test]
fn the_loop_runs_in_process_and_stops_on_a_switch() {
    let scratch = Scratch::new();
    let script = scratch.write("h.rhai", r#"fn handle(req) { "ok " + req.payload + "\n" }"#);
    let (config, listeners, parts) = in_process(script.to_str().expect("utf-8 path"));
    let Some(Listener::Tcp(listener)) = listeners.first() else {
        panic!("no TCP listener")
    };
    let addr = listener.local_addr().expect("the bound address");
    let (switch, stop) = stop::switch().expect("a switch");
    let (ended, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = ended.send(server::run(config, listeners, parts, Box::new(stop)));
    });
    assert_eq!(exchange(addr, b"hello\n"), b"ok hello\n");
    switch.send(Signal::Stop(15));
    let outcome = outcome
        .recv_timeout(WAIT)
        .expect("the loop stopped in time");
    assert_eq!(outcome.expect("no I/O error"), Outcome::Success);
}
