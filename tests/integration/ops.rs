//! Operations (issue 4): hot reload, token rotation, call, send, access control, JSON logs.

use crate::util::*;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn version_script(version: &str) -> String {
    format!(r#"fn handle(req) {{ "{version}" }}"#)
}

/// Asks until the reply is `expected` (reload is asynchronous); fails after `WAIT`.
#[track_caller]
fn ask_until(server: &Server, payload: &str, expected: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        last = server.ask(payload);
        if last == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "reply stayed {last:?}, expected {expected:?}; log:\n{}",
        server.log.text()
    );
}

/// A directory laid out like a Kubernetes ConfigMap/Secret volume: `NAME -> ..data/NAME`,
/// `..data -> ..VERSION/`. `publish` swaps `..data` atomically, as the kubelet does.
struct ProjectedVolume {
    dir: PathBuf,
    generation: u32,
}

impl ProjectedVolume {
    fn new(dir: &Path, name: &str, text: &str) -> ProjectedVolume {
        std::fs::create_dir_all(dir).unwrap();
        let mut volume = ProjectedVolume {
            dir: dir.to_owned(),
            generation: 0,
        };
        volume.publish(name, text);
        symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        volume
    }

    fn publish(&mut self, name: &str, text: &str) {
        self.generation += 1;
        let version = format!("..2026_11_25_{}", self.generation);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join(name), text).unwrap();
        let staging = self.dir.join("..data_tmp");
        symlink(&version, &staging).unwrap();
        std::fs::rename(&staging, self.dir.join("..data")).unwrap();
    }
}

#[test]
fn script_reloads_when_written_in_place_renamed_over_or_swapped() {
    let server = Server::start(&version_script("v1"), &[]);
    let path = server.scratch.path("handler.rhai");
    std::fs::write(&path, version_script("v2-in-place")).unwrap();
    ask_until(&server, "x", "v2-in-place");
    let staged = server
        .scratch
        .write("staged.rhai", &version_script("v3-renamed"));
    std::fs::rename(&staged, &path).unwrap();
    ask_until(&server, "x", "v3-renamed");
}

#[test]
fn script_reloads_on_a_configmap_symlink_swap() {
    let scratch = Scratch::new();
    let mut volume = ProjectedVolume::new(
        &scratch.path("config"),
        "handler.rhai",
        &version_script("v1"),
    );
    let mut command = command();
    command
        .arg("serve")
        .arg("--script")
        .arg(scratch.path("config/handler.rhai"))
        .args(["--token-env", "TOKEN"]);
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(server.ask("x"), "v1");
    volume.publish("handler.rhai", &version_script("v2"));
    ask_until(&server, "x", "v2");
    server.log.wait_for("script reloaded (file changed)");
}

#[test]
fn a_broken_script_is_reported_and_the_old_one_keeps_serving() {
    let server = Server::start(&version_script("good"), &[]);
    std::fs::write(
        server.scratch.path("handler.rhai"),
        "fn handle(req) { let x = ; }",
    )
    .unwrap();
    let line = server.log.wait_for("script reload failed");
    assert!(
        line.contains("handler.rhai:1:"),
        "no file:line:col in {line}"
    );
    assert_eq!(server.ask("x"), "good");
}

#[test]
fn sighup_reloads_and_running_requests_finish_on_the_old_script() {
    let scratch = Scratch::new();
    let (started, go) = (scratch.path("started"), scratch.path("go"));
    let old = format!(
        r#"fn handle(req) {{
            if req.payload == "slow" {{
                exec(["sh", "-c", "touch '{}'; while [ ! -e '{}' ]; do sleep 0.01; done"]);
            }}
            "old"
        }}"#,
        started.display(),
        go.display()
    );
    let server = Server::start(&old, &["--workers", "2"]);
    let mut slow = open_with(server.addr(), format!("{TOKEN} slow\n").as_bytes());
    assert!(
        file_exists_within(&started, WAIT),
        "the slow request never started"
    );
    std::fs::write(server.scratch.path("handler.rhai"), version_script("new")).unwrap();
    server.signal(1);
    server.log.wait_for("script reloaded (SIGHUP)");
    assert_eq!(server.ask("x"), "new");
    std::fs::write(&go, "").unwrap();
    assert_eq!(read_to_close(&mut slow), b"old");
}

/// `req` is built with only the fields `handle` reads (worked out at each compile): a reload
/// that reads other fields gets them, and one that uses `req` whole gets all eleven.
#[test]
fn a_reload_that_reads_other_fields_of_req_gets_them() {
    let server = Server::start(r#"fn handle(req) { req.payload }"#, &[]);
    assert_eq!(server.ask("a b"), "a b");
    let script = server.scratch.path("handler.rhai");
    std::fs::write(
        &script,
        r#"fn handle(req) { req.framing + " " + req.args.len() }"#,
    )
    .unwrap();
    server.signal(1);
    ask_until(&server, "a b", "line 2");
    std::fs::write(&script, r#"fn handle(req) { let r = req; r.keys().len() }"#).unwrap();
    server.signal(1);
    ask_until(&server, "a b", "11");
}

const WHO: &str = r#"fn handle(req) { "hello " + req.token_name }"#;

/// Serves `WHO` with the token in a Secret-like projected volume.
fn serve_with_secret(first_token: &str) -> (Server, ProjectedVolume) {
    let scratch = Scratch::new();
    let volume = ProjectedVolume::new(&scratch.path("secret"), "token", first_token);
    let script = scratch.write("handler.rhai", WHO);
    let mut command = command();
    command.arg("serve").arg("--script").arg(script);
    command
        .arg("--token-file")
        .arg(format!("ops={}", scratch.path("secret/token").display()));
    // Polling with a token that is not valid yet must not trip the wrong-token backoff.
    (
        Server::spawn(
            command,
            scratch,
            &["--listen", "127.0.0.1:0"],
            &["--auth-failures", "0"],
        ),
        volume,
    )
}

#[track_caller]
fn reply_with_token(server: &Server, token: &str) -> String {
    String::from_utf8_lossy(&server.exchange(format!("{token} x\n").as_bytes())).into_owned()
}

#[test]
fn rotated_tokens_work_and_removed_ones_stop_within_seconds() {
    let (old, new) = ("old-token-0123456789abcdef", "new-token-0123456789abcdef");
    let (server, mut volume) = serve_with_secret(&format!("{old}\n"));
    assert_eq!(reply_with_token(&server, old), "hello ops");
    // Rotation in two steps, as an operator would: both valid, then only the new one.
    volume.publish("token", &format!("{old}\n{new}\n"));
    let deadline = Instant::now() + WAIT;
    while reply_with_token(&server, new) != "hello ops" {
        assert!(
            Instant::now() < deadline,
            "the new token never started working: {}",
            server.log.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reply_with_token(&server, old), "hello ops");
    volume.publish("token", &format!("  {new}  \n\n"));
    let deadline = Instant::now() + WAIT;
    while reply_with_token(&server, old) != "ERR unauthorized\n" {
        assert!(Instant::now() < deadline, "the removed token kept working");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(reply_with_token(&server, new), "hello ops");
    assert!(
        !server.log.text().contains(old) && !server.log.text().contains(new),
        "a token reached the log"
    );
}

/// Runs the binary with `args` and `stdin`, bounded by `WAIT`.
fn run_binary(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = command()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "command-trigger {args:?} did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn call_runs_one_request_through_the_script() {
    let scratch = Scratch::new();
    let script = scratch.write(
        "h.rhai",
        r#"fn handle(req) {
            if req.payload == "fail" { throw "boom"; }
            write("live;");
            `${req.token_name} ${req.args.len} ${req.payload} ${req.framing} ${req.body.len()}`
        }"#,
    );
    let script = script.to_str().unwrap();
    let out = run_binary(
        &[
            "call",
            "--script",
            script,
            "--token-name",
            "ops",
            "--",
            "a",
            "b c",
        ],
        b"",
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, b"live;ops 3 a b c line 0");
    let out = run_binary(&["call", "--script", script, "--", "-"], b"body bytes");
    assert_eq!(out.stdout, b"live;default 0  stream 10");
    let out = run_binary(&["call", "--script", script, "--", "fail"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("h.rhai:2:"),
        "no position in the error"
    );
}

#[test]
fn send_prints_the_reply_with_exit_codes_for_scripts() {
    let server = Server::start(
        r#"fn handle(req) { if req.payload == "bad" { throw "x" } req.payload + "|" + req.body.len() }"#,
        &[],
    );
    let addr = server.addr().to_string();
    let out = run_binary(
        &["send", &addr, "--token-env", "TOKEN", "hello", "world"],
        b"",
    );
    assert_eq!(
        (out.status.code(), out.stdout.as_slice()),
        (Some(0), &b"hello world|0"[..])
    );
    let out = run_binary(&["send", &addr, "--token-env", "TOKEN", "bad"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.starts_with(b"ERR handler failed"));
    let out = run_binary(&["send", &addr, "bad"], b"");
    assert_eq!(
        out.status.code(),
        Some(2),
        "no token source is a usage error"
    );
    let token_file = server.scratch.write("token", &format!("\n{TOKEN}\n"));
    let out = run_binary(
        &[
            "send",
            &addr,
            "--token-file",
            token_file.to_str().unwrap(),
            "x",
        ],
        b"",
    );
    assert_eq!(out.stdout, b"x|0");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = run_binary(&["send", &dead, "--token-env", "TOKEN", "x"], b"");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused connection is a failure"
    );
}

#[test]
fn send_body_streams_stdin_to_stream_framing() {
    let server = Server::start(
        r#"fn handle(req) { req.payload + ":" + req.body.len() }"#,
        &["--framing", "stream", "--max-request-bytes", "200000"],
    );
    let addr = server.addr().to_string();
    let out = run_binary(
        &["send", &addr, "--token-env", "TOKEN", "--body", "upload"],
        &[7u8; 100_000],
    );
    assert_eq!(out.stdout, b"upload:100000");
}

#[test]
fn send_all_reaches_every_address_of_a_name() {
    let probe = shell("unshare --mount true");
    if !probe.status.success() || !have("mount") {
        eprintln!("skipping: cannot make a private mount namespace for a test hosts file");
        return;
    }
    let scratch = Scratch::new();
    let script = scratch.write("handler.rhai", r#"fn handle(req) { "from " + req.local }"#);
    let command = serve_command(&script);
    let listen = ["--listen", "127.0.0.1:0", "--listen", "[::1]:0"];
    let server = Server::spawn(command, scratch, &listen, &[]);
    // Both listeners share a port only by chance, so each address carries its own port:
    // resolve the name to both, and send to the v4 port (the v6 one must fail => exit 1) ...
    let hosts = server
        .scratch
        .write("hosts", "127.0.0.1 both.test\n::1 both.test\n");
    let (v4, v6) = (server.addrs[0].port(), server.addrs[1].port());
    let send_all = |port: u16| {
        shell(&format!(
            "unshare --mount sh -c 'mount --bind {} /etc/hosts && TOKEN={TOKEN} {} send --all --token-env TOKEN --timeout 5s both.test:{port} x'",
            hosts.display(),
            binary().display()
        ))
    };
    let out = send_all(v4);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("127.0.0.1:{v4} from 127.0.0.1:{v4}")),
        "{text}"
    );
    if v4 != v6 {
        assert_eq!(
            out.status.code(),
            Some(1),
            "::1:{v4} is closed, so one send failed: {text}"
        );
    }
    let out = send_all(v6);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("[::1]:{v6} from [::1]:{v6}")),
        "{text}"
    );
}

const OK: &str = r#"fn handle(req) { "ok" }"#;

#[test]
fn allow_closes_other_networks_at_accept_without_a_reply() {
    let refused = Server::start(OK, &["--allow", "10.0.0.0/8", "--allow", "fd00::/8"]);
    let mut stream = connect(refused.addr());
    let _ = std::io::Write::write_all(&mut stream, format!("{TOKEN} x\n").as_bytes());
    let mut reply = Vec::new();
    // Closed at accept: EOF, or a reset when our request arrived after the close.
    let _ = std::io::Read::read_to_end(&mut stream, &mut reply);
    assert!(reply.is_empty(), "a client outside --allow got a reply");
    refused.log.wait_for("not in --allow");
    assert!(
        !refused.log.text().contains("request 1"),
        "a refused client reached request handling"
    );
    let admitted = Server::start(OK, &["--allow", "10.0.0.0/8,127.0.0.0/8"]);
    assert_eq!(admitted.ask("x"), "ok");
}

#[test]
fn wrong_tokens_back_off_the_ip_even_in_parallel() {
    let server = Server::start(OK, &["--auth-failures", "5"]);
    let addr = server.addr();
    // 20 wrong tokens at once: however they interleave, the IP ends up blocked.
    let attackers: Vec<_> = (0..20)
        .map(|i| std::thread::spawn(move || exchange(addr, format!("wrong-{i} x\n").as_bytes())))
        .collect();
    for attacker in attackers {
        assert_eq!(attacker.join().unwrap(), b"ERR unauthorized\n");
    }
    server
        .log
        .wait_for("5 wrong tokens within 60 s; refusing this IP for 60 s");
    // Now even the right token is refused, unchecked.
    assert_eq!(server.ask("x"), "ERR unauthorized\n");
    let warnings = server.log.text().matches("refusing this IP").count();
    assert_eq!(warnings, 1, "the block was started more than once");
}

#[test]
fn json_logs_are_one_object_per_line_with_request_fields() {
    let server = Server::start(
        r#"fn handle(req) { exec(["sh", "-c", "exit 3"]); "ok" }"#,
        &["--log-format", "json"],
    );
    assert_eq!(server.ask("say \"quoted\"\tthings"), "ok");
    server.log.wait_for("\"request_id\":1");
    for line in server.log.text().lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["time"].is_string() && value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
    }
    let request = server.log.wait_for("\"request_id\":1");
    let value: serde_json::Value = serde_json::from_str(&request).unwrap();
    assert_eq!(value["outcome"], "ok");
    assert_eq!(value["token_name"], "default");
    assert_eq!(value["exit_codes"], serde_json::json!([3]));
    assert!(!request.contains(TOKEN));
}
