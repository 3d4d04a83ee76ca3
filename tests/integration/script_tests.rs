//! Developing scripts (SPEC §14) through the real binary: `command-trigger test` with its
//! mocks, recorded commands and exact output; `call --dry-run`; `check`'s caret and unknown
//! functions; and the test files shipped for every handler in `scripts/`.

use crate::util::{Scratch, Server, WAIT, command, output_within};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the binary with `args` (logging off, so stderr holds only what the command prints)
/// to its end, within `WAIT`.
#[track_caller]
fn run(args: &[&str]) -> Output {
    let mut command = command();
    command.env("RUST_LOG", "off").args(args);
    finish(command)
}

fn out(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn err(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A scratch directory holding `handler.rhai` and `handler.test.rhai`.
fn pair(handler: &str, tests: &str) -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let handler = scratch.write("handler.rhai", handler);
    let tests = scratch.write("handler.test.rhai", tests);
    (scratch, handler, tests)
}

/// `command-trigger test --script HANDLER TESTS extra...`, run from the scratch directory so
/// file names print as given.
#[track_caller]
fn test_run(scratch: &Scratch, extra: &[&str]) -> Output {
    let mut command = command();
    command
        .env("RUST_LOG", "off")
        .current_dir(scratch.dir.path())
        .args(["test", "--script", "handler.rhai", "handler.test.rhai"])
        .args(extra);
    finish(command)
}

/// Touches a file: if it exists afterwards, a command really ran.
const TOUCHER: &str = r#"
fn handle(req) {
    let r = exec(["touch", req.args[0] + "/exec"]);
    run("touch " + shell_quote(req.args[0] + "/run"));
    let id = start(["touch", req.args[0] + "/start"], #{ lock: "t", timeout: 5000 });
    `${r.code} ${r.stdout} job ${id}: ${job(id).code}`
}
"#;

#[test]
fn commands_are_recorded_in_order_and_never_run() {
    let scratch = Scratch::new();
    let dir = scratch.dir.path().to_str().unwrap();
    let tests = format!(
        r#"
fn test_nothing_runs() {{
    let reply = handle(request("{dir}"));
    assert_eq(reply, "0  job 1: 0");
    assert_eq(commands(), [
        #{{ argv: ["touch", "{dir}/exec"], opts: #{{}} }},
        #{{ cmd: "touch '{dir}/run'", opts: #{{}} }},
        #{{ argv: ["touch", "{dir}/start"], opts: #{{ lock: "t", timeout: 5000 }} }},
    ]);
}}
"#
    );
    scratch.write("handler.rhai", TOUCHER);
    scratch.write("handler.test.rhai", &tests);
    let output = test_run(&scratch, &[]);
    assert_eq!(
        out(&output),
        "test test_nothing_runs ... ok\n1 passed, 0 failed\n",
        "{}",
        err(&output)
    );
    assert_eq!(output.status.code(), Some(0));
    for name in ["exec", "run", "start"] {
        assert!(!scratch.path(name).exists(), "{name} really ran");
    }
}

const ECHO: &str = r#"
fn handle(req) {
    let r = exec(["echo", req.payload]);
    if !r.success { return `failed ${r.code}: ${r.stderr}`; }
    r.stdout
}
"#;

#[test]
fn a_failing_test_shows_its_message_and_line_and_the_run_exits_1() {
    let tests = r#"fn test_passes() {
    assert(true);
}

fn test_fails_with_assert_eq() {
    let reply = handle(request("hi"));
    assert_eq(reply, "hi\n");
}

fn test_fails_with_a_message() {
    assert(1 > 2, "one is not more than two");
}

fn test_fails_with_assert_match() {
    assert_match("version 1.2", "^v\\d");
}
"#;
    let (scratch, _, _) = pair(ECHO, tests);
    let output = test_run(&scratch, &[]);
    assert_eq!(
        out(&output),
        "test test_passes ... ok\n\
         test test_fails_with_assert_eq ... FAILED: assert_eq failed: left: \"\", right: \"hi\\n\" at handler.test.rhai:7\n\
         test test_fails_with_a_message ... FAILED: one is not more than two at handler.test.rhai:11\n\
         test test_fails_with_assert_match ... FAILED: assert_match failed: \"version 1.2\" does not match /^v\\d/ at handler.test.rhai:15\n\
         1 passed, 3 failed\n"
    );
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn an_error_thrown_by_the_handler_points_at_the_handler_line() {
    let handler = "fn handle(req) {\n    if req.payload == \"boom\" {\n        throw \"no such verb\";\n    }\n}\n";
    let (scratch, _, _) = pair(
        handler,
        "fn test_boom() {\n    handle(request(\"boom\"));\n}\n",
    );
    let output = test_run(&scratch, &[]);
    assert_eq!(
        out(&output),
        "test test_boom ... FAILED: no such verb at handler.rhai:3\n0 passed, 1 failed\n"
    );
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn mocks_take_effect_and_every_test_starts_fresh() {
    let tests = r#"
fn test_a_mock_answers() {
    mock(["echo"], #{ code: 2, stderr: "mocked" });
    assert_eq(handle(request("x")), "failed 2: mocked");
    assert_eq(request("y").id, 2);
    mock_env("NAME", "set");
    assert_eq(env("NAME"), "set");
}

fn test_the_later_mock_wins() {
    mock(["echo"], #{ stdout: "first" });
    mock(["echo", "x"], #{ stdout: "second" });
    assert_eq(handle(request("x")), "second");
    assert_eq(handle(request("z")), "first");
}

fn test_nothing_is_left_from_the_tests_before() {
    assert_eq(commands(), []);
    assert_eq(handle(request("x")), "");
    assert_eq(request("y").id, 2);
    assert_eq(env("NAME"), ());
}
"#;
    let (scratch, _, _) = pair(ECHO, tests);
    let output = test_run(&scratch, &[]);
    assert_eq!(
        out(&output),
        "test test_a_mock_answers ... ok\n\
         test test_the_later_mock_wins ... ok\n\
         test test_nothing_is_left_from_the_tests_before ... ok\n\
         3 passed, 0 failed\n",
        "{}",
        err(&output)
    );
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn request_builds_http_and_stream_requests_as_the_server_does() {
    let tests = r#"
fn test_http() {
    let req = request(#{ method: "POST", path: "/hook/a%20b", query: #{ q: "1 2" },
                         headers: #{ "X-Event": "push" }, body: "{}" });
    assert_eq(req.framing, "http");
    assert_eq(req.args, ["hook", "a b"]);
    assert_eq(req.query, #{ q: "1 2" });
    assert_eq(req.headers, #{ "x-event": "push" });
    assert_eq(req.payload, "{}");
}

fn test_line_and_stream() {
    let req = request("deploy  v1");
    assert_eq([req.framing, req.token_name, req.peer], ["line", "default", "127.0.0.1:0"]);
    assert_eq(req.args, ["deploy", "v1"]);
    let req = request(#{ payload: "upload", body: "data", token_name: (), peer: "unix" });
    assert_eq([req.framing, req.token_name, req.peer], ["stream", (), "unix"]);
    assert_eq(req.body.as_string(), "data");
}
"#;
    let (scratch, _, _) = pair(ECHO, tests);
    let output = test_run(&scratch, &[]);
    assert_eq!(
        out(&output),
        "test test_http ... ok\ntest test_line_and_stream ... ok\n2 passed, 0 failed\n",
        "{}",
        err(&output)
    );
}

#[test]
fn filter_runs_only_matching_tests_and_several_files_prefix_names() {
    let tests = "fn test_alpha() {}\nfn test_beta() {}\nfn helper() {}\nfn test_takes_args(x) {}\n";
    let (scratch, _, _) = pair(ECHO, tests);
    let output = test_run(&scratch, &["--filter", "bet"]);
    assert_eq!(out(&output), "test test_beta ... ok\n1 passed, 0 failed\n");
    assert_eq!(output.status.code(), Some(0));

    scratch.write("other.test.rhai", "fn test_gamma() { assert(false); }\n");
    let output = test_run(&scratch, &["other.test.rhai"]);
    assert_eq!(
        out(&output),
        "test handler.test.rhai::test_alpha ... ok\n\
         test handler.test.rhai::test_beta ... ok\n\
         test other.test.rhai::test_gamma ... FAILED: assertion failed at other.test.rhai:1\n\
         2 passed, 1 failed\n"
    );
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn advance_takes_durations_and_refuses_nonsense() {
    let tests = "fn test_ok() {\n    advance(\"5s\");\n    advance(250);\n}\n\nfn test_nonsense() {\n    advance(\"soon\");\n}\n";
    let (scratch, _, _) = pair(ECHO, tests);
    let output = test_run(&scratch, &[]);
    let stdout = out(&output);
    assert!(
        stdout.starts_with(
            "test test_ok ... ok\ntest test_nonsense ... FAILED: advance: 'soon' is not a duration"
        ),
        "{stdout}"
    );
    assert!(
        stdout.ends_with(" at handler.test.rhai:7\n1 passed, 1 failed\n"),
        "{stdout}"
    );
}

#[test]
fn scripts_that_do_not_compile_exit_2_with_the_line_and_a_caret() {
    let (scratch, _, _) = pair(ECHO, "fn test_x() {\n    let = 1;\n}\n");
    let output = test_run(&scratch, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(out(&output), "");
    assert!(
        err(&output).ends_with("\n  |\n2 |     let = 1;\n  |         ^\n"),
        "{}",
        err(&output)
    );

    scratch.write(
        "handler.test.rhai",
        "fn test_x() {\n    handle(request(\"a\"));\n    nosuch(1, 2);\n}\n",
    );
    let output = test_run(&scratch, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        err(&output),
        "handler.test.rhai:3:5: unknown function nosuch() called with 2 arguments: neither defined in the script nor registered by command-trigger\n  |\n3 |     nosuch(1, 2);\n  |     ^\n"
    );

    scratch.write("handler.rhai", "fn handler(req) {}\n");
    let output = test_run(&scratch, &[]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        err(&output),
        "handler.rhai: no function handle(req) with one parameter\n"
    );
}

#[test]
fn check_shows_the_line_with_a_caret_and_rejects_unknown_functions() {
    let scratch = Scratch::new();
    let bad = scratch.write("bad.rhai", "fn handle(req) {\n\tlet x = ;\n}\n");
    let output = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        err(&output),
        format!(
            "{}:2:10: Syntax error: Unexpected ';'\n  |\n2 | \tlet x = ;\n  | \t        ^\n",
            bad.display()
        )
    );

    let unknown = scratch.write("unknown.rhai", "fn handle(req) { nosuchfn(1) }\n");
    let output = run(&["check", unknown.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        err(&output),
        format!(
            "{}:1:18: unknown function nosuchfn() called with 1 argument: neither defined in the script nor registered by command-trigger\n  |\n1 | fn handle(req) {{ nosuchfn(1) }}\n  |                  ^\n",
            unknown.display()
        )
    );

    // Calls to the script's own functions, Rhai's, command-trigger's, and through a variable
    // holding a function pointer are all fine; test helpers are not a handler's.
    let fine = scratch.write(
        "fine.rhai",
        "fn handle(req) { let f = Fn(\"twice\"); let g = |x| x; twice(req.args.len()) + f.call(1) + g(1) + exec([\"true\"]).code }\nfn twice(x) { x * 2 }\n",
    );
    let output = run(&["check", fine.to_str().unwrap()]);
    assert_eq!(
        (out(&output).as_str(), output.status.code()),
        ("ok\n", Some(0)),
        "{}",
        err(&output)
    );
    let helper = scratch.write("helper.rhai", "fn handle(req) { mock([\"a\"], #{}) }\n");
    assert_eq!(
        run(&["check", helper.to_str().unwrap()]).status.code(),
        Some(1)
    );
}

#[test]
fn a_failed_reload_logs_the_line_with_a_caret() {
    let server = Server::start("fn handle(req) { \"v1\" }", &[]);
    std::fs::write(
        server.scratch.path("handler.rhai"),
        "fn handle(req) {\n    nosuchfn(1)\n}\n",
    )
    .unwrap();
    let line = server.log.wait_for("script reload failed");
    assert!(
        line.contains("handler.rhai:2:5: unknown function nosuchfn()"),
        "{line}"
    );
    server.log.wait_for("2 |     nosuchfn(1)");
    server.log.wait_for("  |     ^");
    assert_eq!(server.ask("x"), "v1");
}

#[test]
fn call_dry_run_prints_the_reply_and_each_command_as_json_without_running_it() {
    let scratch = Scratch::new();
    let handler = scratch.write("handler.rhai", TOUCHER);
    let dir = scratch.dir.path().to_str().unwrap();
    let output = run(&[
        "call",
        "--dry-run",
        "--script",
        handler.to_str().unwrap(),
        "--",
        dir,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", err(&output));
    assert_eq!(out(&output), "0  job 1: 0");
    assert_eq!(
        err(&output),
        format!(
            "{{\"argv\":[\"touch\",\"{dir}/exec\"],\"opts\":{{}}}}\n\
             {{\"cmd\":\"touch '{dir}/run'\",\"opts\":{{}}}}\n\
             {{\"argv\":[\"touch\",\"{dir}/start\"],\"opts\":{{\"lock\":\"t\",\"timeout\":5000}}}}\n"
        )
    );
    for name in ["exec", "run", "start"] {
        assert!(!scratch.path(name).exists(), "{name} really ran");
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn every_shipped_handler_has_tests_and_they_pass() {
    let mut handlers: Vec<String> = std::fs::read_dir(repo("scripts"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".rhai").map(str::to_owned))
        .collect();
    handlers.sort();
    assert!(handlers.len() >= 9, "{handlers:?}");
    for name in handlers {
        let tests = repo(&format!("scripts/tests/{name}.test.rhai"));
        assert!(
            tests.exists(),
            "scripts/{name}.rhai has no scripts/tests/{name}.test.rhai"
        );
        let handler = repo(&format!("scripts/{name}.rhai"));
        let output = run(&[
            "test",
            "--script",
            handler.to_str().unwrap(),
            tests.to_str().unwrap(),
        ]);
        let stdout = out(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}:\n{stdout}{}",
            err(&output)
        );
        let summary = stdout.lines().last().unwrap_or_default();
        assert!(
            summary.ends_with(" passed, 0 failed") && !summary.starts_with("0 "),
            "{name}: {summary}"
        );
    }
}

/// Runs `command` to its end with its output captured, within `WAIT`.
#[track_caller]
fn finish(command: Command) -> Output {
    output_within(command, WAIT)
}
