//! Issue 11: `main` alone picks exit statuses and prints fatal errors itself, so they show
//! whatever the log level; `call` checks its flags before it runs anything.

use crate::util::*;
use std::process::Output;
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
