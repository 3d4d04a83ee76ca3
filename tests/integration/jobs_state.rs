//! Keyed jobs, debounce, retry, kept output, attach, cancel (SPEC §12), and the shared state,
//! `once`, `rate_limit` and `--state-file` durability, through the real binary.
//!
//! Jobs record each run in `$DIR/runs` and wait for `$DIR/release` where a test needs them to
//! stay running, so no test depends on how fast the machine is; every wait is bounded.

use crate::util::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// One script for every test here: the first word picks the operation.
const SCRIPT: &str = r#"
fn hold(word) {
    // Records the run, prints, then waits for the release file (bounded by the command timeout).
    ["sh", "-c", "echo \"$1\" >> \"$2/runs\"; echo \"out-$1\"; while [ ! -e \"$2/release\" ]; do sleep 0.02; done; echo \"done-$1\"", "sh", word, env("DIR")]
}

fn handle(req) {
    let a = req.args;
    let op = a[0];
    if op == "start" { return `${start(hold(a[3]), #{ key: a[1], if_running: a[2] })}`; }
    if op == "free" { return `${start(hold(a[1]))}`; }
    if op == "stubborn" {
        let cmd = "trap '' TERM; echo stubborn >> \"$DIR/runs\"; while :; do sleep 0.05; done";
        return `${start(cmd, #{ key: a[1], env: #{ DIR: env("DIR") } })}`;
    }
    if op == "debounce" {
        let cmd = ["sh", "-c", "echo \"$1\" >> \"$2/runs\"", "sh", a[3], env("DIR")];
        return `${start(cmd, #{ key: a[1], debounce: a[2] })}`;
    }
    if op == "retry" {
        return `${start("echo try; exit 3", #{ retry: #{ attempts: parse_int(a[1]), backoff: a[2] } })}`;
    }
    if op == "print" { return `${start(["printf", "%s", a[1]])}`; }
    if op == "job" {
        let j = job(parse_int(a[1]));
        if j == () { return "none"; }
        return `${j.state} ${j.key} ${j.code} ${j.attempt}`;
    }
    if op == "jobs" { return to_json(jobs()); }
    if op == "output" { return job_output(parse_int(a[1])); }
    if op == "attach" {
        let r = attach(parse_int(a[1]));
        return `end ${r.state} ${r.code}`;
    }
    if op == "cancel" { return `${cancel(parse_int(a[1]))}`; }
    if op == "incr" { return `${state_incr(a[1])}`; }
    if op == "incr_many" {
        for i in 0..parse_int(a[2]) { state_incr(a[1]); }
        return "ok";
    }
    if op == "once" { return `${once(a[1], "1h")}`; }
    if op == "once_many" {
        let won = 0;
        for i in 0..parse_int(a[2]) { if once(`${a[1]}-${i}`, "1h") { won += 1; } }
        return `${won}`;
    }
    if op == "set" {
        if a.len() > 3 { state_set(a[1], a[2], #{ ttl: a[3] }); } else { state_set(a[1], a[2]); }
        return "ok";
    }
    if op == "setmap" { state_set(a[1], #{ n: 1, list: [1, "two"] }); return "ok"; }
    if op == "get" { return to_json(state_get(a[1])); }
    if op == "del" { return `${state_delete(a[1])}`; }
    if op == "keys" { return to_json(if a.len() > 1 { state_keys(a[1]) } else { state_keys() }); }
    if op == "rl" { return `${rate_limit(a[1], parse_int(a[2]), a[3])}`; }
    throw "unknown op " + op;
}
"#;

/// Serves `SCRIPT` with `DIR` set to the scratch directory, plus `args`.
fn serve(args: &[&str]) -> Server {
    serve_in(Scratch::new(), args)
}

fn serve_in(scratch: Scratch, args: &[&str]) -> Server {
    serve_listening(scratch, &["--listen", "127.0.0.1:0"], args)
}

fn serve_listening(scratch: Scratch, listen: &[&str], args: &[&str]) -> Server {
    let script = scratch.write("handler.rhai", SCRIPT);
    let mut command = serve_command(&script);
    command.env("DIR", scratch.dir.path());
    Server::spawn(command, scratch, listen, args)
}

/// Polls `probe` until it returns true, failing the test after `WAIT`.
#[track_caller]
fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !probe() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runs(server: &Server) -> Vec<String> {
    std::fs::read_to_string(server.scratch.path("runs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn release(server: &Server) {
    server.scratch.write("release", "");
}

#[track_caller]
fn wait_state(server: &Server, id: &str, state: &str) -> String {
    let mut last = String::new();
    wait_until(&format!("job {id} {state}"), || {
        last = server.ask(&format!("job {id}"));
        last.starts_with(state)
    });
    last
}

#[test]
fn ten_triggers_during_a_run_give_one_follow_up_with_the_latest_command() {
    let server = serve(&[]);
    let first = server.ask("start deploy queue v0");
    wait_until("the first run", || runs(&server) == ["v0"]);
    let queued: Vec<String> = (1..=10)
        .map(|i| server.ask(&format!("start deploy queue v{i}")))
        .collect();
    assert!(queued.iter().all(|id| *id == queued[0]), "{queued:?}");
    assert_ne!(queued[0], first);
    assert_eq!(
        server.ask(&format!("job {}", queued[0])),
        "pending deploy  0"
    );
    assert_eq!(server.ask(&format!("job {first}")), "running deploy  1");
    release(&server);
    wait_state(&server, &queued[0], "done deploy 0 1");
    assert_eq!(runs(&server), ["v0", "v10"]);
    assert_eq!(server.ask(&format!("job {first}")), "done deploy 0 1");
}

#[test]
fn skip_returns_the_running_id_and_replace_kills_a_stubborn_group_after_two_seconds() {
    let server = serve(&[]);
    let first = server.ask("start k queue a");
    wait_until("the first run", || runs(&server) == ["a"]);
    assert_eq!(server.ask("start k skip b"), first);
    server.log.wait_for("skipped: job");

    let stubborn = server.ask("stubborn s");
    wait_until("the stubborn run", || {
        runs(&server).contains(&"stubborn".into())
    });
    let asked = Instant::now();
    let new = server.ask("start s replace c");
    assert_ne!(new, stubborn);
    wait_state(&server, &stubborn, "cancelled s");
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "SIGTERM ignored, so SIGKILL after 2 s, not {took:?}"
    );
    wait_until("the replacement run", || {
        runs(&server).contains(&"c".into())
    });
    assert!(server.ask(&format!("job {new}")).starts_with("running s"));
    release(&server);
    wait_state(&server, &new, "done s 0");
}

#[test]
fn debounce_runs_once_with_the_latest_command_after_the_key_is_quiet() {
    let server = serve(&[]);
    let mut last_trigger = Instant::now();
    let ids: Vec<String> = (1..=5)
        .map(|i| {
            // A pause between triggers, far below the quiet time the debounce waits for.
            std::thread::sleep(Duration::from_millis(60));
            last_trigger = Instant::now();
            server.ask(&format!("debounce d 1500ms w{i}"))
        })
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(runs(&server).is_empty(), "ran before the key was quiet");
    wait_until("the debounced run", || !runs(&server).is_empty());
    let waited = last_trigger.elapsed();
    // The server got the last trigger after `last_trigger`, and waits 1500 ms from there.
    assert!(
        waited >= Duration::from_millis(1500),
        "started {waited:?} after the last trigger"
    );
    wait_state(&server, &ids[0], "done d 0");
    assert_eq!(runs(&server), ["w5"]);
}

#[test]
fn retry_runs_up_to_attempts_with_doubling_backoff() {
    let server = serve(&[]);
    let asked = Instant::now();
    let id = server.ask("retry 3 150ms");
    wait_state(&server, &id, "done  3 3");
    assert!(
        asked.elapsed() >= Duration::from_millis(450),
        "150 + 300 ms of backoff"
    );
    assert_eq!(server.ask(&format!("output {id}")), "try\ntry\ntry\n");
    server.log.wait_for("retrying in");
}

#[test]
fn kept_output_is_the_tail_and_attach_streams_it_before_the_job_ends() {
    let server = serve(&["--job-output-bytes", "10"]);
    let printed = server.ask("print 0123456789abcdef");
    wait_state(&server, &printed, "done");
    assert_eq!(server.ask(&format!("output {printed}")), "6789abcdef");

    let id = server.ask("free x");
    let mut stream = open_with(server.addr(), format!("{TOKEN} attach {id}\n").as_bytes());
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("reading attach output");
    assert_eq!(line, "out-x\n", "kept output arrives while the job runs");
    assert!(server.ask(&format!("job {id}")).starts_with("running"));
    release(&server);
    stream.flush().unwrap();
    let rest = String::from_utf8_lossy(&read_to_close(reader.get_mut())).into_owned();
    assert_eq!(rest, "done-x\nend done 0");
}

#[test]
fn cancel_stops_pending_and_running_jobs_once_and_jobs_lists_them() {
    let server = serve(&[]);
    let running = server.ask("start c queue r");
    wait_until("the run", || runs(&server) == ["r"]);
    let pending = server.ask("start c queue p");
    assert_eq!(server.ask(&format!("cancel {pending}")), "true");
    assert_eq!(server.ask(&format!("cancel {pending}")), "false");
    assert_eq!(server.ask("cancel 999"), "false");
    server
        .log
        .wait_for(&format!("pending job {pending} cancelled"));
    let list = server.ask("jobs");
    for needle in [
        format!(r#""id":{running}"#),
        r#""key":"c""#.into(),
        r#""state":"cancelled""#.into(),
        r#""state":"running""#.into(),
    ] {
        assert!(list.contains(&needle), "{needle} in {list}");
    }
    assert_eq!(server.ask(&format!("cancel {running}")), "true");
    wait_state(&server, &running, "cancelled c");
    assert_eq!(runs(&server), ["r"], "the cancelled pending job never ran");
}

#[test]
fn shutdown_cancels_pending_jobs_and_logs_it_and_metrics_count_job_ends() {
    let listen = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let mut server = serve_listening(Scratch::new(), &listen, &[]);
    let metrics = server.addrs[1];
    let done = server.ask("print x");
    wait_state(&server, &done, "done");
    let scrape = String::from_utf8_lossy(&exchange(
        metrics,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ))
    .into_owned();
    for series in [
        r#"command_trigger_jobs_ended_total{result="success"} 1"#,
        r#"command_trigger_jobs_ended_total{result="cancelled"} 0"#,
    ] {
        assert!(scrape.contains(series), "{series} in\n{scrape}");
    }
    let running = server.ask("start k queue a");
    wait_until("the run", || runs(&server) == ["a"]);
    let pending = server.ask("start k queue b");
    server.signal(15);
    let line = server
        .log
        .wait_for(&format!("pending job {pending} cancelled"));
    assert!(line.contains("shutting down"), "{line}");
    release(&server);
    assert!(server.wait_exit().success());
    assert_eq!(runs(&server), ["a"]);
    let _ = running;
}

#[test]
fn twenty_concurrent_increments_give_twenty_and_one_once_wins() {
    let server = serve(&["--workers", "8"]);
    let ask_all = |payload: &str| -> Vec<String> {
        let addr = server.addr();
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let request = format!("{TOKEN} {payload}\n");
                std::thread::spawn(move || {
                    String::from_utf8_lossy(&exchange(addr, request.as_bytes())).into_owned()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    ask_all("incr hits");
    assert_eq!(server.ask("get hits"), "20");
    let answers = ask_all("once delivery-1");
    assert_eq!(
        answers.iter().filter(|a| *a == "true").count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|a| *a == "false").count(),
        19,
        "{answers:?}"
    );
}

#[test]
fn state_values_ttls_keys_the_key_limit_and_rate_limits() {
    let server = serve(&["--state-max-keys", "3"]);
    assert_eq!(server.ask("setmap m"), "ok");
    assert_eq!(server.ask("get m"), r#"{"list":[1,"two"],"n":1}"#);
    assert_eq!(server.ask("get missing"), "null");
    let set_at = Instant::now();
    assert_eq!(server.ask("set t v 400ms"), "ok");
    assert_eq!(server.ask("get t"), r#""v""#);
    wait_until("the TTL", || server.ask("get t") == "null");
    assert!(set_at.elapsed() >= Duration::from_millis(400));
    assert_eq!(server.ask("set a 1"), "ok");
    assert_eq!(server.ask("set b 1"), "ok");
    assert!(server.ask("set c 1").starts_with("ERR handler failed"));
    server.log.wait_for("state is full: 3 keys");
    assert_eq!(server.ask("set a 2"), "ok", "updating a key at the limit");
    assert_eq!(server.ask("keys "), r#"["a","b","m"]"#);
    assert_eq!(server.ask("del a"), "true");
    assert_eq!(server.ask("del a"), "false");
    let limited: Vec<String> = (0..5).map(|_| server.ask("rl api 3 1m")).collect();
    assert_eq!(limited, ["true", "true", "true", "false", "false"]);
    assert_eq!(server.ask("rl other 3 1m"), "true");
}

#[test]
fn a_state_file_keeps_what_was_replied_through_kill_9() {
    let scratch = Scratch::new();
    let file = scratch.path("state.redb");
    let file_arg = file.to_str().unwrap().to_owned();
    let mut server = serve_in(scratch, &["--state-file", &file_arg]);
    assert_eq!(server.ask("set deployed v42"), "ok");
    assert_eq!(server.ask("once d-1"), "true");
    assert_eq!(server.ask("incr n"), "1");
    server.signal(9);
    server.wait_exit();
    let scratch = std::mem::replace(&mut server.scratch, Scratch::new());
    let server = serve_in(scratch, &["--state-file", &file_arg]);
    assert_eq!(server.ask("get deployed"), r#""v42""#);
    assert_eq!(server.ask("once d-1"), "false");
    assert_eq!(server.ask("incr n"), "2");
}

#[test]
fn a_corrupt_state_file_is_a_start_up_error_that_leaves_it_untouched() {
    let scratch = Scratch::new();
    let garbage = b"not a database: an operator's notes\n".repeat(200);
    let file = scratch.path("state.redb");
    std::fs::write(&file, &garbage).unwrap();
    let script = scratch.write("handler.rhai", SCRIPT);
    let mut child = command()
        .args([
            "serve",
            "--token-env",
            "TOKEN",
            "--listen",
            "127.0.0.1:0",
            "--script",
        ])
        .arg(&script)
        .arg("--state-file")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, WAIT).expect("the server should exit");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--state-file") && stderr.contains("state.redb"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), garbage);
    assert!(Path::new(&file).exists());
}

/// Serves one of `scripts/` with `env` added.
fn serve_script(name: &str, env: &[(&str, &str)], args: &[&str]) -> Server {
    let scratch = Scratch::new();
    let mut command = command();
    command
        .arg("serve")
        .arg("--script")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(name),
        )
        .args(["--token-env", "TOKEN"])
        .envs(env.iter().copied());
    Server::spawn(command, scratch, &["--listen", "127.0.0.1:0"], args)
}

#[test]
fn coalesce_script_debounces_rebuilds_and_follows_one() {
    let scratch = Scratch::new();
    let rebuild = scratch.write_executable("rebuild", "#!/bin/sh\necho rebuilt\n");
    let server = serve_script(
        "coalesce.rhai",
        &[
            ("REBUILD_COMMAND", rebuild.to_str().unwrap()),
            ("QUIET", "300ms"),
        ],
        &[],
    );
    let replies: Vec<String> = (0..3).map(|_| server.ask("rebuild")).collect();
    assert!(replies.iter().all(|r| *r == replies[0]), "{replies:?}");
    let id = replies[0].split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(
        server.ask(&format!("status {id}")),
        format!("job {id}: pending\n")
    );
    let followed = server.ask(&format!("follow {id}"));
    assert_eq!(followed, format!("rebuilt\njob {id}: done, code 0\n"));
    assert_eq!(server.ask("jobs"), format!("{id} rebuild done\n"));
}

/// Sends a signed GitHub push with `delivery`; returns the status line and the body.
fn github_push(server: &Server, secret: &str, delivery: &str) -> (String, String) {
    use hmac::{KeyInit, Mac};
    let body = r#"{"ref":"refs/heads/main"}"#;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let request = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-GitHub-Event: push\r\n\
         X-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: sha256={signature}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = String::from_utf8_lossy(&server.exchange(request.as_bytes())).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

#[test]
fn github_webhook_acts_once_per_delivery_and_keys_its_pulls() {
    let scratch = Scratch::new();
    let repo = scratch.path("not-a-repo");
    std::fs::create_dir(&repo).unwrap();
    let secret = "webhook-secret";
    let server = serve_script(
        "github-webhook.rhai",
        &[
            ("GITHUB_WEBHOOK_SECRET", secret),
            ("REPO_DIR", repo.to_str().unwrap()),
        ],
        &["--framing", "http", "--auth", "script"],
    );
    let (status, first) = github_push(&server, secret, "d-1");
    assert!(status.contains(" 202 "), "{status} {first}");
    assert!(
        first.contains(r#""job":1"#) && first.contains(r#""delivery":"d-1""#),
        "{first}"
    );
    let (status, again) = github_push(&server, secret, "d-1");
    assert!(
        status.contains(" 200 ") && again == "already handled delivery d-1\n",
        "{status} {again}"
    );
    let (_, other) = github_push(&server, secret, "d-2");
    assert!(
        other.contains(r#""job":"#) && other.contains("d-2"),
        "{other}"
    );
    let follow = format!(
        "GET /jobs/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let followed = String::from_utf8_lossy(&server.exchange(follow.as_bytes())).into_owned();
    assert!(followed.contains("job 1 done: code"), "{followed}");
    server.log.wait_for("pull is job 1");
}
