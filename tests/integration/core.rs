//! The core sidecar (issue 2): CLI, framing, auth, replies, commands, limits, concurrency,
//! descriptor exhaustion and lifecycle, all through the real binary.

use crate::util::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ECHO: &str = r#"fn handle(req) { "payload=" + req.payload + "\n" }"#;

// ---- helpers ----

/// Runs the binary with `args` (and `envs`) to its end, bounded by `WAIT`.
#[track_caller]
fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = command();
    command
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starting command-trigger");
    let status = wait_child(&mut child, WAIT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("command-trigger {args:?} did not exit within {WAIT:?}")
    });
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `token payload\n` and the reply as text.
#[track_caller]
fn ask_as(server: &Server, token: &str, payload: &str) -> String {
    text(&server.exchange(format!("{token} {payload}\n").as_bytes()))
}

/// A `serve` command for `script` in `scratch`, with no token source and no listener yet.
fn serve_command(scratch: &Scratch, script: &str) -> Command {
    let path = scratch.write("handler.rhai", script);
    let mut command = command();
    command.arg("serve").arg("--script").arg(path);
    command
}

/// Connects and closes at once (a TCP probe); returns once the loop has seen the close, which
/// also proves that every connection accepted before it has been read.
#[track_caller]
fn probe(server: &Server) {
    let stream = connect(server.addr());
    let port = stream.local_addr().unwrap().port();
    drop(stream);
    server.log.wait_for(&format!(
        "closed connection from 127.0.0.1:{port}: client closed without a complete request"
    ));
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

/// A script whose `hold DIR` request touches `DIR/started`, waits (at most 10 s) for
/// `DIR/release`, then answers; other requests answer at once.
const GATED: &str = r#"
fn handle(req) {
    if req.args.len() == 2 && req.args[0] == "hold" {
        run("touch started; i=0; while [ ! -e release ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done",
            #{ cwd: req.args[1] });
    }
    "done " + req.args[0] + "\n"
}
"#;

fn hold(server: &Server) -> TcpStream {
    let dir = server.scratch.dir.path().display().to_string();
    let stream = open_with(server.addr(), format!("{TOKEN} hold {dir}\n").as_bytes());
    assert!(
        file_exists_within(&server.scratch.path("started"), WAIT),
        "the held handler did not start; log:\n{}",
        server.log.text()
    );
    stream
}

/// Whether `pid` is gone (or a zombie) within `limit`.
fn process_gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|s| s.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

#[track_caller]
fn read_pid(path: &Path) -> u32 {
    assert!(file_exists_within(path, WAIT), "no pid file {path:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap();
        if let Ok(pid) = text.trim().parse() {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "pid file {path:?} holds {text:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Log lines at info level or above, except the start-up lines.
fn loud_lines(log: &Log) -> Vec<String> {
    log.text()
        .lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or("");
            matches!(level, "INFO" | "WARN" | "ERROR") && !l.contains("listening on")
        })
        .map(String::from)
        .collect()
}

// ---- command line ----

#[test]
fn check_reports_ok_syntax_errors_with_position_and_a_missing_handle() {
    let scratch = Scratch::new();
    let good = scratch.write("good.rhai", ECHO);
    let out = run_cli(&["check", good.to_str().unwrap()], &[]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "ok\n");

    let bad = scratch.write("bad.rhai", "fn handle(req) {\n    let x = ;\n}\n");
    let out = run_cli(&["check", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let expected = format!("{}:2:13:", bad.display());
    assert!(text(&out.stderr).contains(&expected), "{out:?}");

    let none = scratch.write(
        "none.rhai",
        "fn handler(req) { 1 }\nfn handle(a, b) { 2 }\n",
    );
    let out = run_cli(&["check", none.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no function handle(req)"),
        "{out:?}"
    );
}

/// Extra `serve` arguments, environment, and what stderr must say.
type UsageCase<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);

#[test]
fn serve_usage_errors_exit_2_and_say_what_is_wrong() {
    let scratch = Scratch::new();
    let good = scratch.write("good.rhai", ECHO);
    let good = good.to_str().unwrap();
    let bad = scratch.write("bad.rhai", "fn handle(req) {\n  req.\n}\n");
    let bad = bad.to_str().unwrap();
    let empty = scratch.write("empty-token", "\n  \n\t\n");
    let empty = empty.to_str().unwrap();
    let listen = ["--listen", "127.0.0.1:0"];
    let cases: Vec<UsageCase> = vec![
        (vec!["--bogus"], vec![], "--bogus".into()),
        (
            vec!["--script", bad, "--token-env", "TOKEN"],
            vec![],
            format!("{bad}:3:1"),
        ),
        (vec!["--script", good], vec![], "no token source".into()),
        (
            vec!["--script", good, "--token-file", empty],
            vec![],
            format!("{empty}: no token"),
        ),
        (
            vec!["--script", good, "--token-env", "EMPTY"],
            vec![("EMPTY", " ")],
            "EMPTY: the token is empty".into(),
        ),
        (
            vec![
                "--script",
                good,
                "--token-env",
                "TOKEN",
                "--read-timeout",
                "5x",
            ],
            vec![],
            "500ms".into(),
        ),
        (
            vec!["--script", "/no/such/script.rhai", "--token-env", "TOKEN"],
            vec![],
            "/no/such/script.rhai".into(),
        ),
        (
            vec!["--script", good, "--token-file", "/no/such/token"],
            vec![],
            "/no/such/token".into(),
        ),
        (
            vec!["--script", good, "--token-env", "CT_TEST_UNSET_VARIABLE"],
            vec![],
            "CT_TEST_UNSET_VARIABLE: not set".into(),
        ),
        (
            vec!["--script", good, "--token-env", "TOKEN", "--workers", "0"],
            vec![],
            "--workers".into(),
        ),
    ];
    for (args, envs, needle) in cases {
        let mut all = vec!["serve"];
        all.extend(listen);
        all.extend(&args);
        let out = run_cli(&all, &envs);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            text(&out.stderr).contains(&needle),
            "{args:?}: want {needle:?} in {out:?}"
        );
    }
}

#[test]
fn serve_exits_1_when_the_address_is_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let scratch = Scratch::new();
    let script = scratch.write("handler.rhai", ECHO);
    let args = [
        "serve",
        "--script",
        script.to_str().unwrap(),
        "--token-env",
        "TOKEN",
    ];
    let out = run_cli(&[&args[..], &["--listen", &addr]].concat(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains(&format!("binding {addr}")),
        "{out:?}"
    );
}

#[test]
fn every_flag_can_come_from_ct_variables_and_flags_win() {
    let scratch = Scratch::new();
    let script = scratch.write("handler.rhai", ECHO);
    let mut command = command();
    command
        .arg("serve")
        .env("CT_SCRIPT", &script)
        .env("CT_LISTEN", "127.0.0.1:0")
        .env("CT_TOKEN_ENV", "TOKEN")
        .env("CT_READ_TIMEOUT", "500ms");
    let server = Server::spawn(command, scratch, &[], &[]);
    assert_eq!(server.ask("env"), "payload=env\n");
    // CT_READ_TIMEOUT=500ms: a silent connection is closed well before the 10 s default.
    let started = Instant::now();
    let mut silent = open_with(server.addr(), b"");
    assert_eq!(read_to_close(&mut silent), b"");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let scratch = Scratch::new();
    let broken = scratch.write("broken.rhai", "fn handle(req) {");
    let mut command = serve_command(&scratch, ECHO);
    command
        .env("CT_SCRIPT", &broken)
        .env("CT_LISTEN", "not-an-address")
        .env("CT_TOKEN_ENV", "OTHER")
        .env("OTHER", "other-token-value-0123456789")
        .args(["--token-env", "TOKEN"]);
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(server.ask("flag"), "payload=flag\n");
    assert_eq!(
        ask_as(&server, "other-token-value-0123456789", "x"),
        "ERR unauthorized\n"
    );
}

#[test]
fn serve_help_lists_every_flag_with_its_default() {
    let out = run_cli(&["serve", "--help"], &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    let flags = [
        ("--script", None),
        ("--listen", Some("0.0.0.0:9000")),
        ("--token-file", None),
        ("--token-env", None),
        ("--insecure-no-token", None),
        ("--auth", Some("required")),
        ("--framing", Some("line")),
        ("--keep-alive", None),
        ("--workers", Some("8")),
        ("--queue", Some("256")),
        ("--max-connections", Some("1024")),
        ("--max-request-bytes", Some("65536")),
        ("--read-timeout", Some("10s")),
        ("--handler-timeout", Some("60s")),
        ("--command-timeout", Some("30s")),
        ("--max-output-bytes", Some("1048576")),
        ("--shutdown-timeout", Some("20s")),
        ("--print-addr", None),
    ];
    for (flag, default) in flags {
        let start = help
            .find(&format!("  {flag} "))
            .or_else(|| help.find(&format!("  {flag}\n")))
            .unwrap_or_else(|| panic!("{flag} missing from help:\n{help}"));
        let section = &help[start..];
        let end = section[2..]
            .find("\n      --")
            .map_or(section.len(), |e| e + 2);
        let section = &section[..end];
        let env = format!("[env: CT_{}=", flag[2..].to_uppercase().replace('-', "_"));
        assert!(section.contains(&env), "{flag}: no {env} in {section}");
        if let Some(default) = default {
            let want = format!("[default: {default}]");
            assert!(section.contains(&want), "{flag}: no {want} in {section}");
        }
    }
}

// ---- framing ----

#[test]
fn answers_a_line_and_closes() {
    let server = Server::start(ECHO, &[]);
    assert_eq!(server.ask("hello  world "), "payload=hello  world \n");
}

#[test]
fn wrong_token_never_reaches_the_script() {
    let server = Server::start(ECHO, &[]);
    assert_eq!(server.exchange(b"nope hello\n"), b"ERR unauthorized\n");
    let line = server.log.wait_for("outcome=unauthorized");
    assert!(!line.contains(TOKEN));
}

#[test]
fn crlf_empty_lines_and_a_last_line_without_newline() {
    let server = Server::start(ECHO, &[]);
    let reply = server.exchange(format!("\n\r\n\n{TOKEN} crlf\r\n").as_bytes());
    assert_eq!(text(&reply), "payload=crlf\n");
    // Half-close completes the last line (`printf 'TOKEN cmd' | nc -N`).
    let reply = server.exchange(format!("{TOKEN} no newline").as_bytes());
    assert_eq!(text(&reply), "payload=no newline\n");
    // Only the trailing \r goes; an inner one stays.
    let reply = server.exchange(format!("{TOKEN} a\rb\r\r\n").as_bytes());
    assert_eq!(text(&reply), "payload=a\rb\r\n");
}

#[test]
fn token_and_payload_split_at_the_first_blank_run() {
    let server = Server::start(r#"fn handle(req) { "[" + req.payload + "]" }"#, &[]);
    let reply = server.exchange(format!("{TOKEN} \t  a  b\t c \n").as_bytes());
    assert_eq!(text(&reply), "[a  b\t c ]");
    let reply = server.exchange(format!("{TOKEN}\t\tx\n").as_bytes());
    assert_eq!(text(&reply), "[x]");
    // No blank: all token, empty payload.
    assert_eq!(
        text(&server.exchange(format!("{TOKEN}\n").as_bytes())),
        "[]"
    );
    // The token must match as a whole word.
    let reply = server.exchange(format!("{TOKEN}x y\n").as_bytes());
    assert_eq!(text(&reply), "ERR unauthorized\n");
}

#[test]
fn insecure_no_token_makes_the_whole_line_the_payload() {
    let scratch = Scratch::new();
    let command = serve_command(&scratch, r#"fn handle(req) { "[" + req.payload + "]" }"#);
    let server = Server::spawn(
        command,
        scratch,
        &["--listen", "127.0.0.1:0"],
        &["--insecure-no-token"],
    );
    let reply = server.exchange(format!("{TOKEN} two words\n").as_bytes());
    assert_eq!(text(&reply), format!("[{TOKEN} two words]"));
}

#[test]
fn stream_framing_passes_the_body_as_bytes() {
    let script = r#"
fn handle(req) {
    if req.payload == "echo" { return req.body; }
    req.framing + ":" + req.payload + ":" + req.body.len()
}"#;
    let server = Server::start(script, &["--framing", "stream"]);
    let mut body: Vec<u8> = (0..=255).collect();
    body.extend_from_slice(b"\nline two\r\n\n");
    let mut request = format!("{TOKEN} echo\r\n").into_bytes();
    request.extend_from_slice(&body);
    assert_eq!(server.exchange(&request), body);
    let reply = server.exchange(format!("{TOKEN} upload now\nxyz").as_bytes());
    assert_eq!(text(&reply), "stream:upload now:3");
    // No body at all.
    assert_eq!(
        text(&server.exchange(format!("{TOKEN} bare").as_bytes())),
        "stream:bare:0"
    );
}

#[test]
fn too_large_is_answered_as_soon_as_the_limit_is_crossed() {
    let server = Server::start(
        r#"fn handle(req) { "len=" + req.payload.len() }"#,
        &["--max-request-bytes", "100"],
    );
    // Exactly the limit (newline not counted) passes.
    let payload = "p".repeat(100 - TOKEN.len() - 1);
    assert_eq!(server.ask(&payload), format!("len={}", payload.len()));
    // One byte more, no newline, no half-close: the reply comes anyway.
    let mut stream = open_with(server.addr(), format!("{TOKEN} {payload}q").as_bytes());
    assert_eq!(text(&read_to_close(&mut stream)), "ERR request too large\n");

    let server = Server::start(
        r#"fn handle(req) { "len=" + req.body.len() }"#,
        &["--max-request-bytes", "100", "--framing", "stream"],
    );
    let mut stream = open_with(
        server.addr(),
        format!("{TOKEN} up\n{}", "b".repeat(80)).as_bytes(),
    );
    assert_eq!(text(&read_to_close(&mut stream)), "ERR request too large\n");
}

#[test]
fn keep_alive_answers_pipelined_requests_in_order() {
    let script = r#"
fn handle(req) {
    if req.payload == "slow" { run("sleep 0.3"); }
    req.payload + "\n"
}"#;
    let server = Server::start(script, &["--keep-alive"]);
    let mut stream = open_with(
        server.addr(),
        format!("{TOKEN} slow\n{TOKEN} b\n\n{TOKEN} c\r\n").as_bytes(),
    );
    assert_eq!(text(&read_exact(&mut stream, 9)), "slow\nb\nc\n");
    stream.write_all(format!("{TOKEN} d\n").as_bytes()).unwrap();
    assert_eq!(text(&read_exact(&mut stream, 2)), "d\n");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_close(&mut stream), b"");
}

#[test]
fn unread_input_does_not_turn_the_close_into_a_reset() {
    // A reply larger than the socket buffers is still in flight when the server closes, and
    // the client has sent more than the server read: a plain close would reset and lose it.
    let script = r#"fn handle(req) { let s = ""; s.pad(1000000, 'r'); write(s); write(s); write(s); "end\n" }"#;
    let server = Server::start(script, &[]);
    let mut request = format!("{TOKEN} first\n").into_bytes();
    request.extend(std::iter::repeat_n(b'j', 300_000));
    let mut stream = connect(server.addr());
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = stream.write_all(&request);
        })
    };
    // Small reads keep the client behind the server, so the reply's tail is still in the
    // server's send queue when it closes.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("{e} after {} of 3000004 bytes", reply.len()),
        }
    }
    assert_eq!(reply.len(), 3_000_004);
    assert!(reply.ends_with(b"rend\n"));
    writer.join().unwrap();
}

#[test]
fn keep_alive_closes_an_idle_connection_after_the_read_timeout() {
    let server = Server::start(ECHO, &["--keep-alive", "--read-timeout", "300ms"]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} one\n").as_bytes());
    assert_eq!(text(&read_exact(&mut stream, 12)), "payload=one\n");
    let started = Instant::now();
    assert_eq!(read_to_close(&mut stream), b"");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

#[test]
fn a_pipelining_client_that_does_not_read_cannot_pile_up_replies() {
    // Each 30-byte request makes a 1 MiB reply: without backpressure a client that never reads
    // would make the server hold every reply in memory.
    let script = r#"fn handle(req) { let s = "rrrrrrrr"; while s.len() < 1048576 { s += s; } s }"#;
    let server = Server::start(script, &["--keep-alive"]);
    let requests = format!("{TOKEN} x\n").repeat(40);
    let mut stream = open_with(server.addr(), requests.as_bytes());
    server.log.wait_for("request 3 peer");
    // No event says "the server stopped"; give it time to go on if it would.
    std::thread::sleep(Duration::from_millis(700));
    let handled = server.log.text().matches("outcome=ok").count();
    assert!(
        handled < 30,
        "{handled} replies were queued for a client that reads nothing"
    );
    let mut total = 0;
    let mut chunk = vec![0u8; 1 << 16];
    while total < 40 << 20 {
        match stream.read(&mut chunk) {
            Ok(0) => panic!("closed after {total} bytes"),
            Ok(n) => total += n,
            Err(e) => panic!("{e} after {total} bytes"),
        }
    }
    assert_eq!(total, 40 << 20);
    server.log.wait_for("request 40 peer");
}

const CLOSER: &str = r#"
fn handle(req) {
    switch req.payload {
        "open" => #{ body: "kept\n", close: false },
        "shut" => #{ body: "bye\n", close: true },
        _ => req.payload + "\n",
    }
}"#;

#[test]
fn reply_map_close_overrides_the_default() {
    let server = Server::start(CLOSER, &[]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} open\n").as_bytes());
    assert_eq!(text(&read_exact(&mut stream, 5)), "kept\n");
    stream.write_all(format!("{TOKEN} x\n").as_bytes()).unwrap();
    // Back to the default: closed after the reply, without our half-close.
    assert_eq!(text(&read_to_close(&mut stream)), "x\n");

    let server = Server::start(CLOSER, &["--keep-alive"]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} y\n").as_bytes());
    assert_eq!(text(&read_exact(&mut stream, 2)), "y\n");
    stream
        .write_all(format!("{TOKEN} shut\n").as_bytes())
        .unwrap();
    assert_eq!(text(&read_to_close(&mut stream)), "bye\n");
}

// ---- the script: req, replies, failures ----

#[test]
fn req_has_every_field() {
    let script = r#"
fn handle(req) {
    `${req.id}|${req.token_name}|${req.payload}|${req.args}|${type_of(req.body)}:${req.body.len()}|${req.peer}|${req.local}|${req.framing}`
}"#;
    let server = Server::start(script, &[]);
    for id in 1..=2 {
        let mut stream = open_with(
            server.addr(),
            format!("{TOKEN}  a\u{1}  b\tc \n").as_bytes(),
        );
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let peer = stream.local_addr().unwrap();
        let want = format!(
            "{id}|default|a\u{1}  b\tc |[\"a\\u{{1}}\", \"b\", \"c\"]|blob:0|{peer}|{}|line",
            server.addr()
        );
        assert_eq!(text(&read_to_close(&mut stream)), want);
    }
    // Invalid UTF-8 becomes U+FFFD.
    let script = r#"fn handle(req) { req.payload }"#;
    let server = Server::start(script, &[]);
    let mut request = format!("{TOKEN} a").into_bytes();
    request.extend_from_slice(b"\xffb\n");
    assert_eq!(text(&server.exchange(&request)), "a\u{FFFD}b");
}

#[test]
fn every_reply_form() {
    let script = r#"
fn handle(req) {
    switch req.payload {
        "string" => "no newline",
        "blob" => { let b = blob(3, 0xff); b[1] = 0; b },
        "unit" => (),
        "map" => #{ body: "mapped" },
        "mapblob" => #{ body: blob(2, 65) },
        "nobody" => #{ close: true },
        "int" => 42,
        "array" => [1, "x"],
        _ => throw "unknown",
    }
}"#;
    let server = Server::start(script, &[]);
    let cases: [(&str, &[u8]); 8] = [
        ("string", b"no newline"),
        ("blob", b"\xff\x00\xff"),
        ("unit", b""),
        ("map", b"mapped"),
        ("mapblob", b"AA"),
        ("nobody", b""),
        ("int", b"42"),
        ("array", b"[1, \"x\"]"),
    ];
    for (payload, want) in cases {
        let reply = server.exchange(format!("{TOKEN} {payload}\n").as_bytes());
        assert_eq!(text(&reply), text(want), "{payload}");
    }
}

#[test]
fn a_failing_handler_gets_an_error_line_and_the_log_gets_the_details() {
    let script = "fn handle(req) {\n    let detail = \"secret-detail-\" + req.payload;\n    throw detail;\n}\n";
    let server = Server::start(script, &[]);
    assert_eq!(server.ask("one"), "ERR handler failed (request 1)\n");
    assert_eq!(server.ask("two"), "ERR handler failed (request 2)\n");
    let path = server.scratch.path("handler.rhai");
    let line = server.log.wait_for("request 2 failed");
    assert!(
        line.contains(&format!("{}:3:5", path.display())) && line.contains("secret-detail-two"),
        "{line}"
    );
    assert!(
        server
            .log
            .wait_for("request 2 peer")
            .contains("outcome=failed")
    );
}

#[test]
fn handler_timeout_stops_a_runaway_script() {
    let script = r#"fn handle(req) { if req.payload == "spin" { loop {} } "fine" }"#;
    let server = Server::start(script, &["--handler-timeout", "300ms"]);
    let started = Instant::now();
    assert_eq!(server.ask("spin"), "ERR handler timed out (request 1)\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.ask("x"), "fine");
    server.log.wait_for("outcome=timed-out");
}

#[test]
fn rhai_limits_stop_runaway_memory_and_the_server_keeps_serving() {
    let script = r#"
fn handle(req) {
    if req.payload == "grow" { let s = "x"; loop { s += s; } }
    if req.payload == "deep" { return deep(0); }
    "alive"
}
fn deep(n) { deep(n + 1) }
"#;
    let server = Server::start(script, &[]);
    assert_eq!(server.ask("grow"), "ERR handler failed (request 1)\n");
    assert!(
        server
            .log
            .wait_for("request 1 failed")
            .contains("too large")
    );
    assert_eq!(server.ask("deep"), "ERR handler failed (request 2)\n");
    assert_eq!(server.ask("x"), "alive");
}

#[test]
fn import_cannot_read_files_from_disk() {
    // The engine is built without a module system: `import` does not even compile, so a
    // script can never load code from disk, and `serve` refuses it at start.
    let modules = Scratch::new();
    modules.write("other.rhai", r#"fn leak() { "leaked" }"#);
    let module = modules.path("other");
    let script = modules.write(
        "handler.rhai",
        &format!(
            r#"fn handle(req) {{ import "{}" as o; o::leak() }}"#,
            module.display()
        ),
    );
    let args = ["serve", "--script", script.to_str().unwrap()];
    let out = run_cli(
        &[
            &args[..],
            &["--token-env", "TOKEN", "--listen", "127.0.0.1:0"],
        ]
        .concat(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("handler.rhai:1:") && stderr.contains("import"),
        "{stderr}"
    );
}

#[test]
fn log_functions_and_print_reach_the_log_tagged_with_the_request() {
    let script = r#"
fn handle(req) {
    log_error("e-" + req.id); log_warn("w-" + req.id); log_info("i-" + req.id);
    log_debug("d-" + req.id); print("p-" + req.id); debug("g-" + req.id);
    env("CT_TEST_VISIBLE") + "|" + type_of(env("NO_SUCH_VARIABLE_X"))
}"#;
    let scratch = Scratch::new();
    let mut command = serve_command(&scratch, script);
    command
        .env("CT_TEST_VISIBLE", "seen")
        .args(["--token-env", "TOKEN"]);
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(server.ask("x"), "seen|()");
    for (level, needle) in [
        ("ERROR", "e-1"),
        ("WARN", "w-1"),
        ("INFO", "i-1"),
        ("DEBUG", "d-1"),
        ("INFO", "p-1"),
        ("DEBUG", "g-1"),
    ] {
        let line = server.log.wait_for(needle);
        assert!(line.contains(level) && line.contains("request 1"), "{line}");
    }
}

// ---- commands ----

#[test]
fn exec_and_run_take_env_clear_env_cwd_stdin_and_return_the_result_map() {
    let script = r#"
fn handle(req) {
    let dir = req.args[1];
    switch req.args[0] {
        "env" => exec(["sh", "-c", "printf %s \"$GREETING\""], #{ env: #{ GREETING: req.payload } }).stdout,
        "clear" => exec(["/usr/bin/env"], #{ clear_env: true, env: #{ ONLY: "1" } }).stdout,
        "cwd" => run("pwd", #{ cwd: dir }).stdout,
        "stdin" => exec(["cat"], #{ stdin: "fed " + req.payload }).stdout,
        "nostdin" => exec(["cat"]).stdout.len(),
        "quote" => run("printf %s " + shell_quote(req.payload)).stdout,
        "map" => {
            let r = run("echo out; echo err >&2; exit 3");
            `${r.code}|${r.success}|${r.stdout}|${r.stderr}|${r.truncated}|${r.timed_out}|${type_of(r.duration_ms)}`
        },
        "ok" => { let r = exec(["true"]); `${r.code}|${r.success}` },
    }
}"#;
    let server = Server::start(script, &[]);
    let dir = server.scratch.dir.path().canonicalize().unwrap();
    let dir = dir.display();
    assert_eq!(server.ask(&format!("env {dir}")), format!("env {dir}"));
    assert_eq!(server.ask(&format!("clear {dir}")), "ONLY=1\n");
    assert_eq!(server.ask(&format!("cwd {dir}")), format!("{dir}\n"));
    assert_eq!(
        server.ask(&format!("stdin {dir}")),
        format!("fed stdin {dir}")
    );
    assert_eq!(server.ask(&format!("nostdin {dir}")), "0");
    let nasty = format!("quote {dir} ';touch pwned' $(id) \"x\" `y`");
    assert_eq!(server.ask(&nasty), nasty);
    assert!(!server.scratch.path("pwned").exists());
    assert_eq!(
        server.ask(&format!("map {dir}")),
        "3|false|out\n|err\n|false|false|i64"
    );
    assert_eq!(server.ask(&format!("ok {dir}")), "0|true");
}

#[test]
fn programs_that_cannot_start_give_127_and_126_without_throwing() {
    let script = r#"
fn handle(req) {
    let r = exec([req.payload]);
    `${r.code}|${r.success}|${r.stderr}`
}"#;
    let server = Server::start(script, &[]);
    let missing = server.scratch.path("no-such-program");
    let reply = server.ask(missing.to_str().unwrap());
    assert!(
        reply.starts_with("127|false|") && reply.contains("no-such-program"),
        "{reply}"
    );
    let plain = server.scratch.write("not-executable", "echo hi\n");
    let reply = server.ask(plain.to_str().unwrap());
    assert!(
        reply.starts_with("126|false|") && reply.contains("not-executable"),
        "{reply}"
    );
}

#[test]
fn output_is_capped_by_max_output_bytes() {
    let script = r#"
fn handle(req) {
    let r = run("head -c 5000 /dev/zero | tr '\\0' o; head -c 3000 /dev/zero | tr '\\0' e >&2");
    `${r.stdout.len()}|${r.stderr.len()}|${r.truncated}|${r.code}`
}"#;
    let server = Server::start(script, &["--max-output-bytes", "1000"]);
    assert_eq!(server.ask("x"), "1000|1000|true|0");
}

#[test]
fn command_timeout_kills_the_whole_process_group() {
    let script = r#"
fn handle(req) {
    let r = run("sleep 30 & echo $! > grandchild; wait", #{ cwd: req.payload, timeout: 300 });
    `${r.timed_out}|${r.code}|${r.success}|${r.duration_ms < 2500}`
}"#;
    let server = Server::start(script, &[]);
    let dir = server.scratch.dir.path().display().to_string();
    assert_eq!(server.ask(&dir), "true|143|false|true");
    let pid = read_pid(&server.scratch.path("grandchild"));
    assert!(
        process_gone_within(pid, Duration::from_secs(5)),
        "the backgrounded sleep {pid} outlived its command's timeout"
    );

    // --command-timeout is the default.
    let script = r#"fn handle(req) { let r = run("sleep 30"); `${r.timed_out}|${r.code}` }"#;
    let server = Server::start(script, &["--command-timeout", "200ms"]);
    assert_eq!(server.ask("x"), "true|143");
}

// ---- auth ----

#[test]
fn token_files_rotate_with_several_lines_under_a_name() {
    let tokens = Scratch::new();
    let file = tokens.write(
        "ops-tokens",
        "  ops-token-one-aaaaaaaaaaaa  \n\n\tops-token-two-bbbbbbbbbbbb\r\n",
    );
    let spec = format!("ops={}", file.display());
    let server = Server::start(
        r#"fn handle(req) { req.token_name + ":" + req.payload }"#,
        &["--token-file", &spec],
    );
    assert_eq!(ask_as(&server, "ops-token-one-aaaaaaaaaaaa", "a"), "ops:a");
    assert_eq!(ask_as(&server, "ops-token-two-bbbbbbbbbbbb", "b"), "ops:b");
    assert_eq!(server.ask("c"), "default:c");
    assert_eq!(ask_as(&server, "ops-token-one", "d"), "ERR unauthorized\n");
    assert_eq!(ask_as(&server, "", "e"), "ERR unauthorized\n");
}

#[test]
fn auth_script_passes_every_request_with_the_token_name_but_never_the_token() {
    let script =
        r#"fn handle(req) { type_of(req.token_name) + "|" + req.token_name + "|" + req.payload }"#;
    let server = Server::start(script, &["--auth", "script"]);
    assert_eq!(ask_as(&server, "wrong-token", "hello"), "()||hello");
    assert_eq!(server.ask("hello"), "string|default|hello");
    assert_eq!(text(&server.exchange(b"lonely-token\n")), "()||");
}

#[test]
fn a_short_token_is_warned_about_without_its_value() {
    let scratch = Scratch::new();
    let mut command = serve_command(&scratch, ECHO);
    command
        .env("SHORT", "shrt-tok-77")
        .args(["--token-env", "short=SHORT"]);
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);
    let warning = server.log.wait_for("shorter than 16 bytes");
    assert!(warning.contains("SHORT"), "{warning}");
    assert_eq!(ask_as(&server, "shrt-tok-77", "s"), "payload=s\n");
    server.log.wait_for("request 1 peer");
    assert!(
        !server.log.text().contains("shrt-tok-77"),
        "{}",
        server.log.text()
    );
}

#[test]
fn tokens_never_reach_the_log() {
    let script = r#"
fn handle(req) {
    print("payload " + req.payload);
    if req.payload == "fail" { throw "failing " + req.payload; }
    exec(["sh", "-c", "exit 4"]);
    "ok"
}"#;
    let wrong = "wrong-token-value-9876543210";
    let server = Server::start(script, &["--handler-timeout", "5s"]);
    assert_eq!(server.ask("good"), "ok");
    assert_eq!(server.ask("fail"), "ERR handler failed (request 2)\n");
    assert_eq!(ask_as(&server, wrong, "bad"), "ERR unauthorized\n");
    assert_eq!(
        text(&server.exchange(wrong.as_bytes())),
        "ERR unauthorized\n"
    );
    drop(open_with(
        server.addr(),
        format!("{TOKEN} partial").as_bytes(),
    ));
    server.log.wait_for("request 4 peer");
    probe(&server);
    let log = server.log.text();
    assert!(!log.contains(TOKEN) && !log.contains(wrong), "{log}");
}

// ---- concurrency ----

#[test]
fn one_worker_serialises_without_refusing() {
    let script = r#"
fn handle(req) {
    run("if mkdir running; then sleep 0.3; rmdir running; echo ok; else echo overlap; fi",
        #{ cwd: req.payload }).stdout
}"#;
    let server = Server::start(script, &["--workers", "1", "--queue", "4"]);
    let dir = server.scratch.dir.path().display().to_string();
    let streams: Vec<TcpStream> = (0..3)
        .map(|_| open_with(server.addr(), format!("{TOKEN} {dir}\n").as_bytes()))
        .collect();
    for mut stream in streams {
        assert_eq!(text(&read_to_close(&mut stream)), "ok\n");
    }
}

#[test]
fn a_full_queue_answers_busy_at_once() {
    let server = Server::start(GATED, &["--workers", "1", "--queue", "0"]);
    let mut held = hold(&server);
    let started = Instant::now();
    assert_eq!(server.ask("second"), "ERR busy\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    touch(&server.scratch.path("release"));
    assert_eq!(text(&read_to_close(&mut held)), "done hold\n");
    assert_eq!(server.ask("third"), "done third\n");
    server.log.wait_for("outcome=busy");
}

#[test]
fn a_client_that_leaves_does_not_cancel_its_handler() {
    let script = r#"
fn handle(req) {
    run("touch started; i=0; while [ ! -e go ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; touch finished",
        #{ cwd: req.payload });
    "late reply"
}"#;
    let server = Server::start(script, &[]);
    let dir = server.scratch.dir.path().display().to_string();
    let stream = open_with(server.addr(), format!("{TOKEN} {dir}\n").as_bytes());
    assert!(file_exists_within(&server.scratch.path("started"), WAIT));
    drop(stream);
    probe(&server);
    touch(&server.scratch.path("go"));
    assert!(
        file_exists_within(&server.scratch.path("finished"), WAIT),
        "the handler was cancelled; log:\n{}",
        server.log.text()
    );
    assert!(server.log.wait_for("request 1 peer").contains("outcome=ok"));
}

#[test]
fn connections_over_max_connections_are_closed_at_once() {
    let server = Server::start(ECHO, &["--max-connections", "2"]);
    let first = open_with(server.addr(), b"");
    let second = open_with(server.addr(), b"");
    for stream in [&first, &second] {
        let port = stream.local_addr().unwrap().port();
        server
            .log
            .wait_for(&format!("connection from 127.0.0.1:{port}"));
    }
    let mut third = connect(server.addr());
    let port = third.local_addr().unwrap().port();
    let started = Instant::now();
    // Issue 10: answered `ERR busy`, never closed in silence.
    assert_eq!(read_to_close(&mut third), b"ERR busy\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    server.log.wait_for(&format!(
        "refusing 127.0.0.1:{port}: --max-connections reached"
    ));
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = open_with(server.addr(), format!("{TOKEN} again\n").as_bytes());
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        if reply == b"payload=again\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot freed; log:\n{}",
            server.log.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_slowloris_is_closed_after_the_read_timeout_without_a_reply() {
    let server = Server::start(ECHO, &["--read-timeout", "300ms"]);
    let mut slow = open_with(server.addr(), format!("{TOKEN} never finished").as_bytes());
    let started = Instant::now();
    assert_eq!(read_to_close(&mut slow), b"");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let port = slow.local_addr().unwrap().port();
    server.log.wait_for(&format!(
        "closed connection from 127.0.0.1:{port}: timed out"
    ));
    assert_eq!(loud_lines(&server.log), Vec::<String>::new());
}

#[test]
fn a_client_dribbling_bytes_does_not_extend_the_read_timeout() {
    let server = Server::start(ECHO, &["--read-timeout", "300ms"]);
    let mut stream = open_with(server.addr(), TOKEN.as_bytes());
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("unexpected reply {:?}", text(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a client sending a byte every 50 ms is still connected"
        );
        let _ = stream.write_all(b"x");
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn a_tcp_probe_gets_no_reply_and_no_info_line() {
    let server = Server::start(ECHO, &[]);
    let mut stream = connect(server.addr());
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_to_close(&mut stream), b"");
    probe(&server);
    assert_eq!(loud_lines(&server.log), Vec::<String>::new());
}

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line["Threads:".len()..].trim().parse().unwrap()
}

#[test]
fn idle_connections_cost_no_thread_and_delay_no_one() {
    let server = Server::start(ECHO, &[]);
    assert_eq!(server.ask("warm"), "payload=warm\n");
    let threads = threads_of(server.child.id());
    let idle: Vec<TcpStream> = (0..400)
        .map(|i| open_with(server.addr(), format!("{TOKEN} partial {i}").as_bytes()))
        .collect();
    let last = idle.last().unwrap().local_addr().unwrap().port();
    server
        .log
        .wait_for(&format!("connection from 127.0.0.1:{last}"));
    let started = Instant::now();
    assert_eq!(server.ask("busy day"), "payload=busy day\n");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(threads_of(server.child.id()), threads);
    drop(idle);
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_sticks() {
    assert!(
        have("prlimit"),
        "prlimit is missing: apt-get install util-linux"
    );
    let scratch = Scratch::new();
    let script = scratch.write("handler.rhai", r#"fn handle(req) { "ok" }"#);
    let mut command = Command::new("prlimit");
    command
        .arg("--nofile=40:40")
        .arg(binary())
        .env("TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .args(["serve", "--script"])
        .arg(&script)
        .args(["--token-env", "TOKEN"]);
    let server = Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], &[]);
    assert_eq!(server.ask("x"), "ok");
    let pid = server.child.id();
    let streams: Vec<TcpStream> = (0..60).map(|_| connect(server.addr())).collect();
    server.log.wait_for("pausing accepts");
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "the server used {used} ticks of CPU in 1 s while out of descriptors"
    );
    drop(streams);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = open_with(server.addr(), format!("{TOKEN} again\n").as_bytes());
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        if reply == b"ok" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered; log:\n{}",
            server.log.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- lifecycle ----

#[test]
fn listens_on_ipv4_and_ipv6_and_logs_each_listener() {
    if TcpListener::bind("[::1]:0").is_err() {
        println!("skipped: ::1 is not available here");
        return;
    }
    let scratch = Scratch::new();
    let mut command = serve_command(&scratch, ECHO);
    command.args(["--token-env", "TOKEN"]);
    let server = Server::spawn(
        command,
        scratch,
        &["--listen", "127.0.0.1:0", "--listen", "[::1]:0"],
        &[],
    );
    assert_eq!(server.addrs.len(), 2);
    for addr in &server.addrs {
        server.log.wait_for(&format!("listening on {addr}"));
        let reply = exchange(*addr, format!("{TOKEN} via {addr}\n").as_bytes());
        assert_eq!(text(&reply), format!("payload=via {addr}\n"));
    }
    assert!(server.addrs[1].is_ipv6());
}

#[test]
fn sigterm_lets_running_handlers_finish_and_refuses_queued_ones() {
    let mut server = Server::start(GATED, &["--workers", "1", "--queue", "4"]);
    let mut held = hold(&server);
    let mut queued = open_with(server.addr(), format!("{TOKEN} queued\n").as_bytes());
    probe(&server);
    server.signal(15);
    server.log.wait_for("shutting down: 2 request(s)");
    assert_eq!(text(&read_to_close(&mut queued)), "ERR shutting down\n");
    assert!(
        TcpStream::connect_timeout(&server.addr(), Duration::from_secs(2)).is_err(),
        "still accepting after SIGTERM"
    );
    touch(&server.scratch.path("release"));
    assert_eq!(text(&read_to_close(&mut held)), "done hold\n");
    assert_eq!(server.wait_exit().code(), Some(0));
    server.log.wait_for("outcome=shutting-down");
}

#[test]
fn shutdown_timeout_kills_commands_that_outlast_it() {
    let script = r#"
fn handle(req) {
    run("echo $$ > sleeper; exec sleep 30", #{ cwd: req.payload });
    "finished"
}"#;
    let mut server = Server::start(script, &["--shutdown-timeout", "500ms"]);
    let dir = server.scratch.dir.path().display().to_string();
    let mut stream = open_with(server.addr(), format!("{TOKEN} {dir}\n").as_bytes());
    let pid = read_pid(&server.scratch.path("sleeper"));
    let started = Instant::now();
    server.signal(15);
    assert_eq!(server.wait_exit().code(), Some(0));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    assert!(
        process_gone_within(pid, Duration::from_secs(2)),
        "sleep {pid} survived"
    );
    // Flushed either way: the handler's own reply, or the abort that followed the kill.
    let reply = text(&read_to_close(&mut stream));
    let aborted = reply.starts_with("ERR handler timed out (request 1)");
    assert!(reply == "finished" || aborted, "{reply:?}");
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let script =
        r#"fn handle(req) { run("echo $$ > sleeper; exec sleep 30", #{ cwd: req.payload }); "x" }"#;
    let mut server = Server::start(script, &[]);
    let dir = server.scratch.dir.path().display().to_string();
    let _stream = open_with(server.addr(), format!("{TOKEN} {dir}\n").as_bytes());
    let pid = read_pid(&server.scratch.path("sleeper"));
    server.signal(15);
    server.log.wait_for("shutting down");
    let started = Instant::now();
    server.signal(15);
    let status = server.wait_exit();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!status.success(), "{status:?}");
    assert!(
        process_gone_within(pid, Duration::from_secs(2)),
        "sleep {pid} survived"
    );
}

#[test]
fn sigint_stops_cleanly_too() {
    let mut server = Server::start(ECHO, &[]);
    assert_eq!(server.ask("x"), "payload=x\n");
    server.signal(2);
    assert_eq!(server.wait_exit().code(), Some(0));
    server.log.wait_for("shut down cleanly");
}

#[test]
fn one_info_line_per_request_with_its_fields() {
    let script = r#"fn handle(req) { exec(["sh", "-c", "exit 3"]); run("true"); "reply" }"#;
    let server = Server::start(script, &[]);
    let mut stream = open_with(server.addr(), format!("{TOKEN} hello\n").as_bytes());
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let peer: SocketAddr = stream.local_addr().unwrap();
    assert_eq!(text(&read_to_close(&mut stream)), "reply");
    let line = server.log.wait_for("request 1 peer");
    let want = format!("request 1 peer={peer} token=default payload=5B outcome=ok duration=");
    assert!(line.contains(" INFO ") && line.contains(&want), "{line}");
    assert!(line.ends_with("ms reply=5B commands=[3, 0]"), "{line}");
    assert_eq!(ask_as(&server, "nope", "x"), "ERR unauthorized\n");
    let line = server.log.wait_for("request 2 peer");
    assert!(
        line.contains("token=- payload=1B outcome=unauthorized"),
        "{line}"
    );
    probe(&server);
    let count = |n: &str| server.log.text().matches(n).count();
    assert_eq!((count("request 1 peer"), count("request 2 peer")), (1, 1));
}
